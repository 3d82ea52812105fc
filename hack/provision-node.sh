#!/usr/bin/env bash
# Provision the node runtime the kubelet test bed (test/e2e/framework/kubelet.go)
# runs on each namespace node, all built from the Go module proxy:
#   - containerd, ctr, containerd-shim-runc-v2   github.com/containerd/containerd/v2
#   - runc with seccomp                          github.com/opencontainers/runc
#   - CNI bridge, host-local, loopback           github.com/containernetworking/plugins
#
# Built only when asked: hack/provision.sh calls this when MINIPROXY_NODE_TOOLS
# is set (any non-empty value, "1" or a list), so CI and the plain e2e suite never
# pay for it. Cached under ${MINIPROXY_CACHE:-/var/cache/miniproxy}/node/<key>/bin,
# <key> hashing the pinned versions, the Go version and RECIPE. Nothing here
# depends on the cache being warm.
#
# runc: kubelet asks for the RuntimeDefault seccomp profile on every sandbox, so
# runc must be built with -tags seccomp. libseccomp comes from Debian's
# libseccomp-dev, fetched with `apt-get download` and unpacked with dpkg-deb -x
# (nothing installed on the host), and linked statically so the binary does not
# need it at run time.
#
# Prints "MINIPROXY_NODE_BIN=<dir>" on the last line of stdout.
set -euo pipefail

CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.3
CNI_VERSION=v1.10.0
CACHE=${MINIPROXY_CACHE:-/var/cache/miniproxy}
GO=${GO:-go}

T0=$(date +%s)
step() { printf '[provision-node %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf 'provision-node: ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$GO" >/dev/null || die "go not found on PATH (need Go 1.26)"
GOVER=$("$GO" env GOVERSION)
# Bump RECIPE when a build step changes what a binary holds.
RECIPE=1
KEY=$(echo "$CONTAINERD_VERSION $RUNC_VERSION $CNI_VERSION $GOVER recipe-$RECIPE" | sha256sum | cut -c1-12)
BINDIR=$CACHE/node/$KEY/bin
mkdir -p "$BINDIR"
exec 8>"$CACHE/provision-node.lock"
flock 8

export GOCACHE=${MINIPROXY_GOCACHE:-$CACHE/gocache}
tmp=$(mktemp -d "$BINDIR/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

have() { for b in "$@"; do [[ -x $BINDIR/$b ]] || return 1; done; }
install_from() { # install_from <dir>: move the built binaries into BINDIR
	for f in "$1"/*; do mv -f "$f" "$BINDIR/"; done
}

# --- containerd ---------------------------------------------------------------
if have containerd ctr containerd-shim-runc-v2; then
	step "cached: containerd ctr containerd-shim-runc-v2"
else
	step "go: building containerd $CONTAINERD_VERSION (~2 min cold on 2 cores)"
	b0=$(date +%s)
	mkdir -p "$tmp/containerd"
	# CGO off: the btrfs snapshotter (cgo only) drops out; overlayfs and native stay.
	GOBIN=$tmp/containerd CGO_ENABLED=0 "$GO" install -trimpath \
		-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
		"github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
	install_from "$tmp/containerd"
	step "go: built containerd in $(($(date +%s) - b0))s"
fi

# --- runc (cgo, static, seccomp) -----------------------------------------------
if have runc; then
	step "cached: runc"
else
	command -v gcc >/dev/null || die "gcc not found (runc needs cgo): apt-get install -y gcc libc6-dev"
	[[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] || die "static libc missing: apt-get install -y libc6-dev"
	step "apt: fetching libseccomp-dev (download + unpack only)"
	mkdir -p "$tmp/deb" "$tmp/seccomp"
	(cd "$tmp/deb" && apt-get download -qq libseccomp-dev >/dev/null) ||
		die "apt-get download libseccomp-dev failed (run apt-get update?)"
	dpkg-deb -x "$tmp"/deb/libseccomp-dev_*.deb "$tmp/seccomp"
	sdir=$tmp/seccomp/usr
	[[ -e $sdir/lib/x86_64-linux-gnu/libseccomp.a ]] || die "libseccomp.a not in libseccomp-dev"
	step "go: building runc $RUNC_VERSION with seccomp (~1 min cold)"
	b0=$(date +%s)
	mkdir -p "$tmp/runc"
	# The unpacked .pc file names prefix=/usr: skip pkg-config and point the
	# compiler and linker at the unpacked tree (-static picks libseccomp.a).
	GOBIN=$tmp/runc CGO_ENABLED=1 \
		CGO_CFLAGS="-I$sdir/include" \
		CGO_LDFLAGS="-L$sdir/lib/x86_64-linux-gnu -lseccomp" \
		PKG_CONFIG=/bin/true \
		"$GO" install -trimpath -tags "seccomp netgo osusergo urfave_cli_no_docs" \
		-ldflags "-s -w -X main.version=${RUNC_VERSION#v} -extldflags -static" \
		"github.com/opencontainers/runc@$RUNC_VERSION"
	install_from "$tmp/runc"
	step "go: built runc in $(($(date +%s) - b0))s"
fi

# --- CNI plugins -----------------------------------------------------------------
if have cni/bridge cni/host-local cni/loopback; then
	step "cached: CNI bridge host-local loopback"
else
	step "go: building CNI plugins $CNI_VERSION"
	b0=$(date +%s)
	mkdir -p "$tmp/cni" "$BINDIR/cni"
	GOBIN=$tmp/cni CGO_ENABLED=0 "$GO" install -trimpath \
		-ldflags "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_VERSION" \
		"github.com/containernetworking/plugins/plugins/main/bridge@$CNI_VERSION" \
		"github.com/containernetworking/plugins/plugins/main/loopback@$CNI_VERSION" \
		"github.com/containernetworking/plugins/plugins/ipam/host-local@$CNI_VERSION"
	for f in "$tmp"/cni/*; do mv -f "$f" "$BINDIR/cni/"; done
	step "go: built CNI plugins in $(($(date +%s) - b0))s"
fi

v=$("$BINDIR/containerd" --version 2>&1 || true)
step "containerd: ${v%%$'\n'*}"
v=$("$BINDIR/runc" --version 2>&1 || true)
step "runc: ${v//$'\n'/; }"
ln -sfn "$BINDIR" "$CACHE/node/current"
step "done: binaries in $BINDIR (also $CACHE/node/current)"
echo "MINIPROXY_NODE_BIN=$BINDIR"
