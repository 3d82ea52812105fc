#!/usr/bin/env bash
# make lab: the NAT-selection study. Provisions (cached), builds miniproxy,
# podserver and a minimal CoreDNS (hack/coredns, cached), then runs the lab
# program (hack/lab): for each MODE a real kube-apiserver, a 2-node namespace
# cluster with miniproxy, and the experiments → lab-report/.
#
#   make lab                                   # every experiment, iptables and nftables
#   make lab EXPERIMENT=grpc MODE=nftables     # one part
#
# EXPERIMENT: all | spread,pin,stale,affinity,grpc. MODE: iptables,nftables
# (comma-separated); ipvs needs the ip_vs module (the qemu guest suite,
# `make guest`, covers IPVS on this machine).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=${MODE:-iptables,nftables}
EXPERIMENT=${EXPERIMENT:-all}
CONNECTIONS=${CONNECTIONS:-1000}
CACHE=${MINIPROXY_CACHE:-/var/cache/miniproxy}
T0=$(date +%s)
say() { printf '[lab.sh %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf 'lab: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "the lab needs root (it creates network namespaces and netfilter rules inside them): run 'sudo make lab'"
command -v go >/dev/null || die "go not found on PATH: install Go 1.26 (https://go.dev/dl) and retry"
for m in ${MODE//,/ }; do
	case $m in
	iptables | nftables | ipvs) ;;
	*) die "unknown MODE=$m (iptables, nftables or ipvs; comma-separated)" ;;
	esac
done

say "provisioning (apt tools, etcd, kube-apiserver; cached after the first run)"
# The lab needs only kube-apiserver; kube-proxy/kubectl are built by `make provision`.
MINIPROXY_K8S_TOOLS=${MINIPROXY_K8S_TOOLS:-kube-apiserver} bash hack/provision.sh >/dev/null
for t in ip iptables nft conntrack; do
	PATH=$PATH:/usr/sbin:/sbin command -v "$t" >/dev/null || die "$t missing after provisioning"
done

if [[ ! -x bin/miniproxy || ! -x bin/podserver ]]; then
	say "building bin/ (make build)"
	go build -o bin/ ./cmd/...
fi

# CoreDNS for gRPC experiment (c): only when grpc runs. A failed build skips
# (c) with the reason in the report instead of failing the lab.
COREDNS=${MINIPROXY_COREDNS:-}
if [[ -z $COREDNS && ( $EXPERIMENT == all || $EXPERIMENT == *grpc* ) ]]; then
	KEY=$(cat hack/coredns/go.mod hack/coredns/go.sum hack/coredns/main.go <(go env GOVERSION) | sha256sum | cut -c1-12)
	out=$CACHE/coredns/v1.15.0-$KEY/coredns
	if [[ -x $out ]]; then
		say "CoreDNS cached: $out"
		COREDNS=$out
	else
		say "building CoreDNS v1.15.0 (errors, kubernetes plugins only; a few minutes cold)"
		mkdir -p "$(dirname "$out")"
		if (cd hack/coredns && GOCACHE=${MINIPROXY_GOCACHE:-$CACHE/gocache} GOFLAGS=-mod=readonly CGO_ENABLED=0 \
			go build -trimpath -ldflags "-s -w" -o "$out.tmp" .) >"$CACHE/coredns/build.log" 2>&1; then
			mv -f "$out.tmp" "$out"
			COREDNS=$out
			say "CoreDNS built: $out"
		else
			say "CoreDNS build failed (gRPC (c) will be skipped): $(tail -3 "$CACHE/coredns/build.log")"
		fi
	fi
fi

say "building the lab program"
go build -o bin/.lab ./hack/lab

say "running the lab (MODE=$MODE EXPERIMENT=$EXPERIMENT, $CONNECTIONS per measurement)"
exec bin/.lab --mode "$MODE" --experiment "$EXPERIMENT" --connections "$CONNECTIONS" --coredns "$COREDNS" --out lab-report
