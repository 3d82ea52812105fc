#!/usr/bin/env bash
# Runs the tests that need a kernel this host lacks (IPVS, dummy) inside a
# qemu guest, and prints their results as ordinary `go test` subtests.
#
#   test/guest/run.sh            # IPVS guest suite, runner self test, apiserver-driven guest (needs make build + hack/provision.sh, else skips)
#   test/guest/run.sh --install  # first apt-get install qemu-system-x86 busybox-static xz-utils
#
# The kernel package is fetched once into ${MINIPROXY_CACHE:-/var/cache/miniproxy}/guest.
# Results: e2e-results/ipvs-guest.json (per case pass/fail/skip, boot and test times).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ "${1:-}" == "--install" ]]; then
	shift
	apt-get install -y --no-install-recommends qemu-system-x86 busybox-static xz-utils
fi
exec go test -count=1 -v -run '^(TestGuest|TestGuestSelf|TestGuestAPIServer)$' ./pkg/ipvs ./test/guest/... "$@"
