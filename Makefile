# fedmesh build entry points. Every target installs or builds what it needs,
# so a fresh machine (Go, gcc, git, Debian apt) can run any of them.

SHELL := /bin/bash
KUBE_VERSION := v1.36.3
BIN := $(CURDIR)/bin
KUBE_APISERVER := $(BIN)/kube-apiserver-$(KUBE_VERSION)
# A local node's Kubernetes components, all from the pinned k8s.io/kubernetes
# module in tools/kubernetes, and CoreDNS from its own module in tools/coredns.
KUBE_COMPONENTS := kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy
KUBE_BINS := $(foreach c,$(KUBE_COMPONENTS),$(BIN)/$(c)-$(KUBE_VERSION))
COREDNS_VERSION := $(shell sed -n 's|^require github.com/coredns/coredns ||p' tools/coredns/go.mod)
COREDNS := $(BIN)/coredns-$(COREDNS_VERSION)
ETCD := $(shell command -v etcd 2>/dev/null)
GO_TEST_FLAGS ?= -race -count=1 -timeout 20m
export FEDMESH_KUBE_APISERVER := $(KUBE_APISERVER)

.PHONY: all build test lint bench e2e demo deps fuzz clean generate kind-e2e gateway-crds

all: build

## deps: install etcd, iproute2, iptables, containerd, runc and the CNI plugins (Debian packages) and build
## kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy $(KUBE_VERSION) and CoreDNS
## $(COREDNS_VERSION) into bin/ (cached by version: a second run builds nothing).
deps: $(KUBE_BINS) $(COREDNS) debian-deps

.PHONY: debian-deps
debian-deps:
	@scripts/install-deps.sh

# One Kubernetes component per rule, one build at a time (flock: also across
# concurrent `make deps`), all sharing the module and build caches: the first
# (kube-apiserver, cold ~16 min on 2 cores) compiles most of what the others need.
$(BIN)/%-$(KUBE_VERSION): tools/kubernetes/go.mod tools/kubernetes/go.sum
	@mkdir -p $(BIN)
	@echo ">> building $* $(KUBE_VERSION) from the Go module proxy (cached in bin/)"
	cd tools/kubernetes && flock $(BIN)/.build.lock go build -trimpath -ldflags='-s -w' -o $@.tmp k8s.io/kubernetes/cmd/$*
	@mv $@.tmp $@

# Static: it runs in a container image with nothing else in it.
$(COREDNS): tools/coredns/go.mod tools/coredns/go.sum tools/coredns/main.go
	@mkdir -p $(BIN)
	@echo ">> building CoreDNS $(COREDNS_VERSION) from the Go module proxy (cached in bin/)"
	cd tools/coredns && CGO_ENABLED=0 flock $(BIN)/.build.lock go build -trimpath -ldflags='-s -w' -o $@.tmp .
	@mv $@.tmp $@

## node-smoke: one real single-node Kubernetes cluster (package kubenode; as root), verbose: progress while it
## starts, time to Ready, a pod reached through kube-proxy and CoreDNS, the node's RSS, nothing left behind.
## (`make test` runs the same test among the other packages.)
.PHONY: node-smoke
node-smoke: deps
	go test -count=1 -v -timeout 15m -run 'TestNodeServesPodsThroughServicesAndDNS' ./kubenode

## images: the fedmesh image without Docker, as an OCI image-layout tarball (bin/images/fedmesh.tar) that
## `ctr -n k8s.io images import`, `kind load image-archive` and `docker load` read: ghcr.io/fedmesh/fedmesh:dev,
## every binary of cmd/ in /usr/local/bin, non-root, like clusters/Dockerfile's default target.
.PHONY: images
images: build
	@mkdir -p $(BIN)/images
	go run ./cmd/ociimage -o $(BIN)/images/fedmesh.tar -name ghcr.io/fedmesh/fedmesh:dev \
	  -entrypoint /usr/local/bin/fedmesh-controller -user 65532:65532 $(patsubst cmd/%,$(BIN)/%,$(wildcard cmd/*))

## build: compile every binary into bin/: static (no libc mapped into every
## sidecar) and without grpc-go's x/net/trace (html/template and friends,
## 2.9 MB of text and rodata the sidecar would map for nothing).
build:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 go build -tags=grpcnotrace -ldflags "-X github.com/fedmesh/fedmesh/federation.buildRevision=$$(git describe --always --dirty 2>/dev/null)" -o $(BIN)/ ./cmd/...

## test: everything CI runs: lint, unit and integration tests (real kube-apiserver + etcd), short fuzzing.
# The end-to-end federation (./fedctl: 31 processes, drills that time
# failover and dead-peer detection) runs after the other packages, not
# beside them: on 2 cores a concurrent package once pushed its 2 s
# detection objective to 2.2 s.
test: deps lint
	go test $(GO_TEST_FLAGS) $$(go list ./... | grep -v '/fedctl$$')
	go test $(GO_TEST_FLAGS) ./fedctl
	$(MAKE) fuzz

## fuzz: run every fuzz target for a short, bounded time.
FUZZTIME ?= 100000x
fuzz:
	@scripts/fuzz.sh $(FUZZTIME)

## lint: gofmt, a doc comment on every package, go vet, pinned staticcheck (go.mod tool directive).
lint:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi
	@undocumented=$$(go list -f '{{if not .Doc}}{{.ImportPath}}{{end}}' ./...); \
	  if [ -n "$$undocumented" ]; then echo "packages without a doc comment (say why the package exists):"; echo "$$undocumented"; exit 1; fi
	go vet ./...
	go tool staticcheck ./...

## bench: every figure an issue names, as a table with its goal beside it.
BENCHTIME ?= 1x
bench: deps
	@mkdir -p .cache
	@# The table is printed even when a benchmark failed; then make bench fails
	@# (as it does when a figure misses its goal or a goal's benchmark did not run).
	@set -o pipefail; go test -count=1 -run '^$$' -bench . -benchtime $(BENCHTIME) -timeout 30m ./... | tee .cache/bench.out; rc=$$?; \
	  go run ./cmd/benchtable -goals bench/goals.tsv < .cache/bench.out && exit $$rc

## e2e: multi-cluster end-to-end scenarios on the local federation (fedctl up, drills, down).
e2e: $(KUBE_APISERVER) debian-deps
	go test -race -timeout 20m -count=1 -run 'TestUpStatusDrillDown' ./fedctl/

## demo: the main job: a local three-cluster federation, a drill, and its status; it keeps running.
demo: $(KUBE_APISERVER) debian-deps build # the local federation needs no kubelet yet (kubenode: make node-smoke)
	@$(BIN)/fedctl down >/dev/null 2>&1 || true
	$(BIN)/fedctl up
	$(BIN)/fedctl drill kill-local-endpoints --cluster east
	$(BIN)/fedctl status
	@echo
	@echo "The federation keeps running. Try: curl http://198.18.1.100:8080/ (east's client sidecar; as root),"
	@echo "bin/fedctl status, bin/fedctl drill --help; stop it with: bin/fedctl down"

clean:
	rm -rf $(BIN) .cache

## generate: regenerate the discovery API's Go code (protoc from Debian's protobuf-compiler, plugins pinned in go.mod).
generate:
	@command -v protoc >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq protobuf-compiler)
	@mkdir -p $(BIN)
	go build -o $(BIN)/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
	go build -o $(BIN)/protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc
	PATH=$(BIN):$$PATH protoc --go_out=. --go_opt=paths=source_relative \
	  --go-grpc_out=. --go-grpc_opt=paths=source_relative federation/discovery/discoveryv1/discovery.proto

## kind-e2e: kind clusters east/west/north, image build+load, SPIRE + fedmesh install, peer links, sample export/import.
## Needs docker, kind, kubectl, openssl and stops at once naming what is missing. KIND_E2E_FLAGS=--no-tear-down keeps the clusters.
kind-e2e:
	clusters/kind-e2e.sh $(KIND_E2E_FLAGS)

## gateway-crds: refresh the embedded Gateway API standard CRDs from the module version in go.mod.
gateway-crds:
	@dir=$$(go list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api) && for r in httproutes grpcroutes referencegrants; do \
	  install -m 644 $$dir/config/crd/standard/gateway.networking.k8s.io_$$r.yaml federation/crds/gatewayapi/; done
