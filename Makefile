# The two commands of the README: `make demo` and `make test`.
# Builds use at most two jobs: the reference machine has two cores.
export CARGO_BUILD_JOBS ?= 2
export CARGO_TERM_COLOR ?= never

.PHONY: demo test deps bench bench-long cluster proto fuzz image

## Run the demo on the embedded exchange (no Redis, no cluster).
demo:
	cargo run --release -p academy-examples --bin quickstart
	cargo run --release -p academy-examples --bin pipeline

## Install what the tests need, when missing (returns at once when all is
## there): redis-server, podman, buildah and runc (apt-get, as root or with
## sudo), grpcio-tools, mcp and kubernetes-validate (pip), cargo-nextest, and buf,
## @grpc/grpc-js and @grpc/proto-loader (npm, into .tools/). kubectl (for `kubectl kustomize`) must be there.
BUF := .tools/node_modules/.bin/buf
deps:
	@command -v kubectl >/dev/null || { echo "kubectl is needed (kubectl kustomize renders deploy/kubernetes)"; exit 1; }
	@for tool in redis-server podman buildah runc; do command -v $$tool >/dev/null || MISSING=1; done; \
		[ -z "$$MISSING" ] || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server podman buildah runc; }
	@python3 -c 'import grpc_tools' 2>/dev/null || \
		python3 -m pip install -q --disable-pip-version-check grpcio-tools
	@python3 -c 'import mcp.client.session' 2>/dev/null || \
		python3 -m pip install -q --disable-pip-version-check mcp==2.3.0
	@command -v kubernetes-validate >/dev/null || \
		python3 -m pip install -q --disable-pip-version-check kubernetes-validate==1.37.0
	@command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
	@test -x $(BUF) || npm install -s --prefix .tools --no-audit --no-fund @bufbuild/buf@1.75.0
	@test -d .tools/node_modules/@grpc/proto-loader || npm install -s --prefix .tools \
		--no-audit --no-fund @grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1

## Run every check and test (what CI runs).
test: deps
	cargo fmt --all --check
	$(BUF) lint proto
	cargo clippy --workspace --all-targets --locked -- -D warnings
	# The SDK on its own, as a user's crate gets it: the workspace's other
	# crates turn features on that would hide what it lacks.
	cargo check --locked -p academy-sdk
	cargo check --locked -p academy-sdk --no-default-features
	cargo test --workspace --doc --locked
	cargo nextest run --workspace --locked --profile ci

## A local cluster: exchange, launcher and two workers, with the pipeline on them.
cluster:
	examples/cluster.sh

## Run the end-to-end benchmark (figures for BENCHMARKS.md).
bench:
	cargo run --release -p academy-bench

## The long run (minutes; not in CI): a million agents through the launcher,
## a million mailboxes terminated per backend; rates per round and memory.
bench-long:
	cargo run --release -p academy-bench -- --only h

## Fuzz every path that decodes network input, 10^6 cases per target.
fuzz:
	cargo run --release -p academy-fuzz

## Regenerate proto/src/generated/ after changing a .proto file.
proto:
	cargo run -q -p academy-proto-codegen

## The image every process runs from, tagged with the workspace's version
## (the tag deploy/kubernetes refers to), packaged by buildah without Docker
## or a registry. With Docker: docker build -f deploy/Dockerfile -t academy:$(VERSION) .
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image:
	CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --locked \
		-p academy-exchange -p academy-launcher -p academy-cli -p academy-examples --bins
	deploy/image.sh target/release academy:$(VERSION)
