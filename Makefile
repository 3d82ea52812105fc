# miniproxy — see README.md. The two commands a new user needs: `make lab` and `make test`.
SHELL := /bin/bash
GO ?= go
export MINIPROXY_CACHE ?= /var/cache/miniproxy
BIN := $(CURDIR)/bin
STATICCHECK_VERSION := v0.7.0

.PHONY: build test unit e2e guest lab bench bench-quick soak lint provision clean

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# -short: unit tests never boot the qemu guest; `make guest` does.
unit:
	$(GO) test -short -count=1 $$($(GO) list ./... | grep -v /test/e2e)

# e2e: the namespace cluster against a real apiserver (iptables, nftables),
# then the IPVS cases inside a qemu guest with an IPVS kernel.
e2e: build
	bash hack/provision.sh
	MINIPROXY_E2E_MODES=$${MINIPROXY_E2E_MODES:-iptables,nftables} $(GO) test -count=1 -v -timeout 40m ./test/e2e/...
	$(MAKE) guest
	$(GO) run ./test/e2e/matrixmerge e2e-results
	@cat e2e-results/e2e-matrix.md

guest: build
	bash test/guest/run.sh

test: unit e2e

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
