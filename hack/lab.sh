#!/usr/bin/env bash
# make lab: provision (cached), build, and run the lab program (hack/lab) that
# brings up a 2-node namespace cluster with a real kube-apiserver, runs
# miniproxy (MODE=iptables|nftables|ipvs, default iptables), sends 1,000 short
# connections through a ClusterIP Service and writes lab-report/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=${MODE:-iptables}
CONNECTIONS=${CONNECTIONS:-1000}
T0=$(date +%s)
say() { printf '[lab.sh %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf 'lab: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the lab needs root (it creates network namespaces and netfilter rules inside them): run 'sudo make lab'"
command -v go >/dev/null || die "go not found on PATH: install Go 1.26 (https://go.dev/dl) and retry"
case $MODE in
iptables | nftables) ;;
ipvs) [[ -e /proc/net/ip_vs ]] || die "MODE=ipvs needs the ip_vs kernel module, which this kernel does not have" ;;
*) die "unknown MODE=$MODE (iptables, nftables or ipvs)" ;;
esac

say "provisioning (apt tools, etcd, kube-apiserver; cached after the first run)"
# The lab needs only kube-apiserver; kube-proxy/kubectl are built by `make provision`.
MINIPROXY_K8S_TOOLS=${MINIPROXY_K8S_TOOLS:-kube-apiserver} bash hack/provision.sh >/dev/null
for t in ip iptables nft conntrack etcd; do
	PATH=$PATH:/usr/sbin:/sbin command -v "$t" >/dev/null || die "$t missing after provisioning"
done

if [[ ! -x bin/miniproxy || ! -x bin/podserver ]]; then
	say "building bin/ (make build)"
	go build -o bin/ ./cmd/...
fi
say "building the lab program"
go build -o bin/.lab ./hack/lab

say "running the lab (MODE=$MODE, $CONNECTIONS connections)"
exec bin/.lab --mode "$MODE" --connections "$CONNECTIONS" --out lab-report
