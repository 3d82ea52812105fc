# miniproxy — see README.md. The two commands a new user needs: `make lab` and `make test`.
SHELL := /bin/bash
GO ?= go
export MINIPROXY_CACHE ?= /var/cache/miniproxy
BIN := $(CURDIR)/bin
STATICCHECK_VERSION := v0.7.0

.PHONY: build test unit e2e guest lab bench bench-quick soak lint provision clean fuzz crash-full image

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# image: the OCI image, built without a container engine from Debian 12
# packages (cached under $(MINIPROXY_CACHE)/image) and a static miniproxy;
# one archive that docker load, ctr images import and kind load
# image-archive read. Prints the digest: equal inputs, equal digest.
IMAGE ?= $(BIN)/miniproxy-image.tar
IMAGE_TAG ?= miniproxy:dev
image:
	$(GO) run ./image/mkimage -go $(GO) -o $(IMAGE) -tag $(IMAGE_TAG)

# -short: unit tests never boot the qemu guest; `make guest` does.
# -race: every package of `make test` runs under the race detector (the sync
# runner, informer handlers and health servers share state across goroutines).
unit:
	$(GO) test -race -short -count=1 $$($(GO) list ./... | grep -v /test/e2e)

# e2e: the image (built twice, same digest; its binaries run chrooted in
# private namespaces), the namespace cluster against a real apiserver
# (iptables, nftables), then the IPVS cases inside a qemu guest with an IPVS
# kernel.
e2e: build
	bash hack/provision.sh
	MINIPROXY_IMAGE_REQUIRED=1 $(GO) test -count=1 -v -run '^TestImage$$' ./image/
	MINIPROXY_E2E_MODES=$${MINIPROXY_E2E_MODES:-iptables,nftables} $(GO) test -count=1 -v -timeout 40m ./test/e2e/...
	MINIPROXY_CRASH_SERVICES=$${MINIPROXY_CRASH_SERVICES:-2000} $(GO) test -p 1 -count=1 -v -timeout 30m -run '^TestKernelCrash$$' ./pkg/iptables ./pkg/nftables
	$(MAKE) guest
	$(GO) run ./test/e2e/matrixmerge e2e-results
	@cat e2e-results/e2e-matrix.md

# crash-full: the SIGKILL fault row at the issue's size (10k Services, 10
# trials per mode and xtables variant); ~30 min on 2 cores, so `make e2e`
# (and CI) runs the same trials at 2k Services.
crash-full:
	MINIPROXY_CRASH_SERVICES=10000 MINIPROXY_CRASH_TRIALS=10 $(GO) test -p 1 -count=1 -v -timeout 90m -run '^TestKernelCrash$$' ./pkg/iptables ./pkg/nftables

# fuzz: run each Go fuzz target for FUZZTIME (default 10s). Without -fuzz
# the same targets run in `make unit` over their seeds and committed corpora
# (testdata/fuzz/<Target>); a crash found here is written there as a new
# corpus entry to commit with its fix.
FUZZTIME ?= 10s
FUZZ_TARGETS := ./pkg/watch:FuzzServicePorts ./pkg/watch:FuzzTrackerSlices ./cmd/miniproxy:FuzzParseOptions
FUZZ_TARGETS += ./pkg/nftables/ruleset/trace:FuzzNFTablesRender ./pkg/iptables:FuzzIPTablesRender ./pkg/ipvs:FuzzIPVSPlan
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name in $$pkg for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

# The guest is required here: a run that cannot boot it fails instead of
# passing with the IPVS column skipped. provision.sh installs qemu.
guest: build
	bash hack/provision.sh >/dev/null
	MINIPROXY_GUEST_REQUIRED=1 bash test/guest/run.sh

# make test: unit tests (-race), each fuzz target for FUZZTIME, then e2e.
test: unit fuzz e2e

lab: build
	bash hack/lab.sh

bench:
	bash bench/run.sh

bench-quick:
	QUICK=1 bash bench/run.sh

# soak: miniproxy under 15 minutes of churn per mode, sampled for leaks (SOAK=30m, SOAK_N=10000 override).
soak:
	SOAK=$${SOAK:-15m} bash bench/run.sh

provision:
	bash hack/provision.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

clean:
	rm -rf $(BIN) lab-report e2e-results
