#!/usr/bin/env bash
# make bench / make bench-quick: miniproxy vs upstream kube-proxy on this
# machine, in one run (bench/cmd/mpbench), then the Go micro-benchmarks and
# CPU profiles of the render paths. Results: bench/results/<date>.json,
# bench/results/latest.md (+ PNG plots), bench/results/microbench-latest.txt.
#
#   QUICK=1 bash bench/run.sh          # N = 1,000 only
#   bash bench/run.sh                  # N = 1,000 and 10,000 (BENCH_N overrides)
#   BENCH_TIMEOUT=10m                  # bound on one proxy's cold start
#   BENCH_SKIP_MICRO=1                 # skip micro-benchmarks and profiles
#   BENCH_REPORT_ONLY=a.json,b.json    # only rebuild latest.md from result files
#   SOAK=15m [SOAK_N=1000]             # soak mode only (make soak): bench/results/soak-<date>.{md,json,png}
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
GO=${GO:-go}
OUT=bench/results
mkdir -p "$OUT"
append_micro() {
	[[ -f $OUT/microbench-latest.txt ]] || return 0
	{
		echo
		echo "## Go micro-benchmarks"
		echo
		echo '```'
		grep -E '^(Benchmark|ok|FAIL|PASS|goos|cpu|pkg|#)' "$OUT/microbench-latest.txt" || true
		echo '```'
		echo
		echo "CPU profiles (top functions): \`bench/results/profiles/*-top.txt\`, \`*-cum.txt\`."
	} >>"$OUT/latest.md"
}
step() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# BENCH_REPORT_ONLY=a.json,b.json: merge earlier result files into latest.md
# (e.g. a quick 1k run and a later 10k run) without running anything.
if [[ -n ${BENCH_REPORT_ONLY:-} ]]; then
	$GO run ./bench/cmd/mpbench -out "$OUT" -report-from "$BENCH_REPORT_ONLY"
	append_micro
	exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
	echo "bench: needs root (network namespaces, proxies' rules inside them); run as root" >&2
	exit 1
fi

step "build miniproxy, podserver, mpbench"
$GO build -o bin/ ./cmd/...
$GO build -o "${TMPDIR:-/tmp}/mpbench" ./bench/cmd/mpbench

step "provision kube-apiserver / kube-proxy ${K8S_VERSION:-v1.37.2}"
# provision.sh can exit non-zero after everything is in place (its
# `kubectl version | head -1` under pipefail may see SIGPIPE); the binaries
# are checked below instead.
PROV_OUT=$(bash hack/provision.sh) || echo "bench: warning: hack/provision.sh exited $?; checking the binaries" >&2
K8S_DIR=$(printf '%s\n' "$PROV_OUT" | sed -n 's/^MINIPROXY_K8S_BIN=//p' | tail -1)
# The framework's own lookup rule when the line is missing.
export MINIPROXY_K8S_BIN=${K8S_DIR:-${MINIPROXY_CACHE:-/var/cache/miniproxy}/k8s/current}
[[ -x $MINIPROXY_K8S_BIN/kube-proxy ]] || { echo "bench: $MINIPROXY_K8S_BIN/kube-proxy missing" >&2; exit 1; }

ARGS=(-out "$OUT" -timeout "${BENCH_TIMEOUT:-10m}")
if [[ -n ${SOAK:-} ]]; then
	# Soak: miniproxy alone, each mode for $SOAK under churn (bench/README.md).
	ARGS+=(-soak "$SOAK" -n "${SOAK_N:-1000}" -modes "${BENCH_MODES:-iptables,nftables}")
	step "mpbench ${ARGS[*]}"
	exec "${TMPDIR:-/tmp}/mpbench" "${ARGS[@]}"
fi
if [[ ${QUICK:-} == 1 ]]; then
	ARGS+=(-quick -timeout "${BENCH_TIMEOUT:-5m}")
else
	# 44,000 Services is left out by default: kube-proxy's iptables cold start
	# grows super-linearly (~7.5 min at 10k here), and kube-apiserver creates
	# Services in O(N) each (bench/results/44k-attempt.md), so 44k cannot
	# finish inside any bound that keeps `make bench` under an hour.
	# BENCH_N=1000,10000,44000 runs it anyway; kube-proxy runs past the
	# timeout are recorded as such.
	ARGS+=(-n "${BENCH_N:-1000,10000}")
	if [[ -z ${BENCH_N:-} ]]; then
		ARGS+=(-skip-note "44,000 Services not run by default: kube-proxy's iptables cold start alone would exceed the ${BENCH_TIMEOUT:-10m} bound (super-linear --noflush restore, ~7.5 min at 10k on this class of machine); and creating 44k Services takes about an hour on 2 cores, because kube-apiserver's ClusterIP allocation is O(N) per Service (44k-attempt.md); run with BENCH_N=1000,10000,44000.")
	fi
fi
step "mpbench ${ARGS[*]}"
"${TMPDIR:-/tmp}/mpbench" "${ARGS[@]}"

if [[ -n ${BENCH_SKIP_MICRO:-} ]]; then
	exit 0
fi
PKGS=()
for p in ./pkg/iptables ./pkg/nftables/... ./pkg/watch ./pkg/model ./pkg/conntrack; do
	if compgen -G "${p%/...}/*_test.go" >/dev/null || [[ $p == *... ]]; then PKGS+=("$p"); fi
done
BT=1x
[[ ${QUICK:-} == 1 ]] || BT=3x
MICRO=$OUT/microbench-latest.txt
step "micro-benchmarks (${PKGS[*]}, -benchtime $BT)"
{
	echo "# go test -run XXX -bench . -benchmem -benchtime $BT ${PKGS[*]}"
	echo "# $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
	$GO test -run XXX -bench . -benchmem -benchtime "$BT" "${PKGS[@]}" 2>&1 || echo "(some benchmarks failed)"
} | tee "$MICRO" >&2

step "CPU profiles of the render paths"
PROF=$OUT/profiles
mkdir -p "$PROF"
profile() { # pkg bench name
	local pkg=$1 bench=$2 name=$3
	if $GO test -run XXX -bench "^$bench\$" -benchtime 5x -cpuprofile "$PROF/$name.pprof" -o "$PROF/$name.test" "$pkg" >/dev/null 2>&1; then
		$GO tool pprof -top -nodecount 25 "$PROF/$name.test" "$PROF/$name.pprof" >"$PROF/$name-top.txt" 2>/dev/null || true
		$GO tool pprof -top -cum -nodecount 25 "$PROF/$name.test" "$PROF/$name.pprof" >"$PROF/$name-cum.txt" 2>/dev/null || true
	else
		echo "profile $name failed" >"$PROF/$name-top.txt"
	fi
	rm -f "$PROF/$name.test" "$PROF/$name.pprof"
}
profile ./pkg/iptables BenchmarkRenderFull10k iptables-render-10k
profile ./pkg/iptables BenchmarkRenderOneChange iptables-render-one-change
profile ./pkg/nftables BenchmarkRender10k nftables-render-10k

append_micro
step "done: $OUT/latest.md"
