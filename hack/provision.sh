#!/usr/bin/env bash
# Provision the real components the e2e suite and the lab run against:
#   - Debian tools: iptables nftables conntrack iproute2 ipset, and qemu-system-x86
#     busybox-static xz-utils for the IPVS guest
#   - etcd v3.6.16, built from the Go module proxy through hack/etcd
#   - kube-apiserver, kube-proxy and kubectl v1.37.2, built from the Go module
#     proxy through the wrapper module in hack/k8s (kubelet,
#     kube-controller-manager and kube-scheduler too when MINIPROXY_K8S_TOOLS
#     names them).
#   - with MINIPROXY_NODE_TOOLS=1: containerd, runc and the CNI plugins
#     (hack/provision-node.sh), for the kubelet test bed.
#
# Idempotent and cached under ${MINIPROXY_CACHE:-/var/cache/miniproxy}: binaries
# live in $CACHE/k8s/<version>-<key>/bin where <key> hashes the wrapper module
# and the Go version, so a changed pin or toolchain rebuilds instead of reusing
# a stale binary. Nothing here depends on the cache being warm.
#
# etcd: built, not Debian's etcd-server 3.4.23. kube-apiserver 1.37 serves
# streaming initial lists (WatchList, on by default in client-go) only when
# etcd answers watch progress requests (3.4.31+/3.5.13+); against 3.4.23 every
# informer falls back to one LIST of everything, which changes the startup
# memory and time the benchmarks measure. The build is ~1 min cold.
#
# Prints the binary directory on the last line of stdout as
# "MINIPROXY_K8S_BIN=<dir>" so callers may pick it up; the e2e framework finds
# the same directory itself by running this script's lookup rules.
set -euo pipefail

K8S_VERSION=v1.37.2
K8S_MINOR=37
CACHE=${MINIPROXY_CACHE:-/var/cache/miniproxy}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WRAPPER=$ROOT/hack/k8s
ETCD_WRAPPER=$ROOT/hack/etcd
ETCD_VERSION=v3.6.16
GO=${GO:-go}

T0=$(date +%s)
step() { printf '[provision %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf 'provision: ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. Debian tools -------------------------------------------------------
# command -> package that ships it
declare -A NEED=(
	[iptables]=iptables
	[nft]=nftables
	[conntrack]=conntrack
	[ip]=iproute2
	[ipset]=ipset
	# The IPVS column runs in a qemu guest (this kernel has no ip_vs).
	[qemu-system-x86_64]=qemu-system-x86
	[busybox]=busybox-static
	[xz]=xz-utils
)
missing=()
for cmd in "${!NEED[@]}"; do
	if ! PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1; then
		missing+=("${NEED[$cmd]}")
	fi
done
if ((${#missing[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		die "missing packages: ${missing[*]} — run as root or: apt-get install -y ${missing[*]}"
	fi
	step "apt: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	step "apt: done"
else
	step "apt: all tools present (iptables nft conntrack ip ipset qemu busybox xz)"
fi

# --- 2. kube-apiserver, kube-proxy, kubectl ---------------------------------
command -v "$GO" >/dev/null || die "go not found on PATH (need Go 1.26)"
GOVER=$("$GO" env GOVERSION)
KEY=$(cat "$WRAPPER/go.mod" "$WRAPPER/go.sum" <(echo "$GOVER") | sha256sum | cut -c1-12)
BINDIR=$CACHE/k8s/$K8S_VERSION-$KEY/bin
mkdir -p "$BINDIR"

# Two provisions at once (parallel test runs) must not race on the same files.
exec 9>"$CACHE/provision.lock"
flock 9

# MINIPROXY_K8S_TOOLS narrows what is built: the e2e suite and the lab only
# need kube-apiserver; kube-proxy and kubectl are comparators/debug tools for
# later work and cost extra minutes on a cold cache (.ci/run builds only the
# apiserver). kubelet, kube-controller-manager and kube-scheduler are built
# only when named here: the kubelet test bed (test/e2e/framework/kubelet.go)
# needs them, plus MINIPROXY_NODE_TOOLS (hack/provision-node.sh).
TOOLS=${MINIPROXY_K8S_TOOLS:-kube-apiserver kube-proxy kubectl}
want=()
for b in $TOOLS; do
	case $b in
	kube-apiserver | kube-proxy | kubectl | kubelet | kube-controller-manager | kube-scheduler) ;;
	*) die "MINIPROXY_K8S_TOOLS: unknown tool $b" ;;
	esac
	if [[ -x $BINDIR/$b ]]; then
		step "cached: $BINDIR/$b"
	else
		want+=("k8s.io/kubernetes/cmd/$b")
	fi
done

if ((${#want[@]})); then
	# A build cache of its own under $CACHE keeps the warm state in one place
	# (and measurable); modules are shared with the user's GOMODCACHE.
	export GOCACHE=${MINIPROXY_GOCACHE:-$CACHE/gocache}
	export GOFLAGS=-mod=readonly
	export CGO_ENABLED=0
	LDFLAGS="-s -w"
	LDFLAGS+=" -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
	LDFLAGS+=" -X k8s.io/component-base/version.gitMajor=1"
	LDFLAGS+=" -X k8s.io/component-base/version.gitMinor=$K8S_MINOR"
	LDFLAGS+=" -X k8s.io/component-base/version.gitTreeState=clean"
	LDFLAGS+=" -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
	step "go: building ${want[*]##*/} (kube-apiserver takes ~5 min cold on 2 cores)"
	tmp=$(mktemp -d "$BINDIR/.build.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	b0=$(date +%s)
	# One invocation shares the compile of common packages between the three.
	(cd "$WRAPPER" && "$GO" build -trimpath -ldflags "$LDFLAGS" -o "$tmp/" "${want[@]}")
	for p in "${want[@]}"; do
		mv -f "$tmp/${p##*/}" "$BINDIR/${p##*/}"
	done
	step "go: built ${want[*]##*/} in $(($(date +%s) - b0))s"
fi

# --- 3. etcd -----------------------------------------------------------------
# Its own key, so a changed etcd pin rebuilds etcd only; linked into $BINDIR,
# where the e2e framework and the lab look for it.
EKEY=$(cat "$ETCD_WRAPPER/go.mod" "$ETCD_WRAPPER/go.sum" <(echo "$GOVER") | sha256sum | cut -c1-12)
EDIR=$CACHE/etcd/$ETCD_VERSION-$EKEY
if [[ -x $EDIR/etcd ]]; then
	step "cached: $EDIR/etcd"
else
	mkdir -p "$EDIR"
	step "go: building etcd $ETCD_VERSION"
	etmp=$(mktemp -d "$EDIR/.build.XXXXXX")
	b0=$(date +%s)
	(cd "$ETCD_WRAPPER" && GOCACHE=${MINIPROXY_GOCACHE:-$CACHE/gocache} GOFLAGS=-mod=readonly CGO_ENABLED=0 \
		"$GO" build -trimpath -ldflags "-s -w" -o "$etmp/etcd" go.etcd.io/etcd/server/v3) ||
		{ rm -rf "$etmp"; die "etcd build failed"; }
	mv -f "$etmp/etcd" "$EDIR/etcd"
	rm -rf "$etmp"
	step "go: built etcd in $(($(date +%s) - b0))s"
fi
ln -sfn "$EDIR/etcd" "$BINDIR/etcd"
# Read whole outputs, then keep the first line: `cmd | head -1` under pipefail
# fails with SIGPIPE whenever cmd writes after head has exited.
etcd_version=$("$BINDIR/etcd" --version 2>/dev/null || true)
step "etcd: ${etcd_version%%$'\n'*}"

"$BINDIR/kube-apiserver" --version >&2
if [[ -x $BINDIR/kubectl ]]; then
	kubectl_version=$("$BINDIR/kubectl" version --client 2>&1 || true)
	echo "${kubectl_version%%$'\n'*}" >&2
fi
ln -sfn "$BINDIR" "$CACHE/k8s/current"

# --- 4. node runtime, only when asked ----------------------------------------
# containerd, runc and the CNI plugins for the kubelet test bed
# (MINIPROXY_NODE_TOOLS=1, with kubelet, kube-controller-manager and
# kube-scheduler in MINIPROXY_K8S_TOOLS).
if [[ -n ${MINIPROXY_NODE_TOOLS:-} ]]; then
	GO=$GO MINIPROXY_CACHE=$CACHE bash "$ROOT/hack/provision-node.sh"
fi
step "done: binaries in $BINDIR (also $CACHE/k8s/current)"
echo "MINIPROXY_K8S_BIN=$BINDIR"
