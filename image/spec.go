// Package image builds miniproxy's container image without a container
// engine: the static miniproxy binary and the userspace tools its modes run
// (iptables and ip6tables in both variants behind iptables-wrapper, nft,
// ipset, modprobe, sysctl, cat), taken from Debian 12 packages with
// `apt-get download` and `dpkg-deb -x`, written as layers with
// go-containerregistry. The same inputs (the .deb files, the source tree and
// the Go toolchain) give the same image digest.
//
// What the image holds is declared once, in this file; the Dockerfile at the
// repository root runs the same code (mkimage -rootfs), so both produce the
// same files, and spec_test.go checks the Dockerfile and deploy/daemonset.yaml
// against these values.
package image

// Packages are the Debian 12 (bookworm) packages files are taken from: the
// tools below and the libraries they load. Build fails when a shipped ELF
// file needs a library none of them has, and when a package contributes
// nothing, so this list cannot silently rot.
var Packages = []string{
	// iptables-nft, iptables-legacy (both families) and their libraries.
	"iptables", "libip4tc2", "libip6tc2", "libxtables12", "libnftnl11", "libmnl0",
	"libnetfilter-conntrack3", "libnfnetlink0",
	// nft.
	"nftables", "libnftables1", "libjansson4", "libgmp10", "libedit2", "libbsd0", "libmd0", "libtinfo6",
	// ipset: the takeover lists and destroys kube-proxy's IPVS-mode sets.
	"ipset", "libipset13",
	// modprobe: iptables-legacy loads ip_tables modules itself (the
	// DaemonSet mounts the host's /lib/modules for it).
	"kmod", "libzstd1", "liblzma5", "libssl3",
	// cat (the takeover reads /proc/net/ip_tables_names, ip_vs) and sysctl
	// (route_localnet in iptables mode).
	"coreutils", "procps",
	// /etc/protocols, /etc/services and /etc/ethertypes for the iptables tools.
	"netbase",
	"libc6",
}

// Files are the files taken from Packages, with paths as in a merged-/usr
// system (/sbin/sysctl ships as /usr/sbin/sysctl; /sbin is a link to it).
// Every symlink in a bin or sbin directory of those packages that leads to
// one of them ships too (iptables-nft, ip6tables-legacy-save, modprobe, ...).
var Files = []string{
	"/usr/sbin/xtables-nft-multi",
	"/usr/sbin/xtables-legacy-multi",
	"/usr/sbin/nft",
	"/usr/sbin/ipset",
	"/usr/bin/kmod",
	"/usr/bin/cat",
	"/usr/sbin/sysctl",
	"/etc/protocols",
	"/etc/services",
	"/etc/ethertypes",
}

// Trees are directories shipped whole: the iptables extensions, which the
// tools dlopen (so no NEEDED entry names them).
var Trees = []string{
	"/usr/lib/x86_64-linux-gnu/xtables",
}

// LibraryDirs are where NEEDED sonames are looked up, as ld.so does here.
var LibraryDirs = []string{"/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/lib64"}

// MergedUsr are the top-level links of a merged-/usr Debian system.
var MergedUsr = map[string]string{"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/lib64": "usr/lib64"}

const (
	// Miniproxy is where the binary lives; deploy/daemonset.yaml's command
	// names it.
	Miniproxy = "/usr/local/bin/miniproxy"
	// Wrapper stands in for the iptables commands until its first call.
	Wrapper = "/usr/sbin/iptables-wrapper"
	// DefaultTag is what `make image` tags and deploy/daemonset.yaml runs.
	DefaultTag = "miniproxy:dev"
	// Path is the image's PATH: the iptables backends run tools by name.
	Path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// WrapperLinks are the commands that point at Wrapper in the image; the
// wrapper re-points them at the variant it picks (see image/iptables-wrapper).
var WrapperLinks = []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"}

// Entrypoint is the image's entrypoint.
var Entrypoint = []string{Miniproxy}

// EmptyDirs exist in the image so runtimes and tools find them: /run holds
// xtables.lock (the DaemonSet mounts the host's), /tmp is scratch.
var EmptyDirs = map[string]int64{"/run": 0o755, "/tmp": 0o1777, "/etc": 0o755}
