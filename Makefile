# The two commands of the README: `make demo` and `make test`.
# Builds use at most two jobs: the reference machine has two cores.
export CARGO_BUILD_JOBS ?= 2
export CARGO_TERM_COLOR ?= never

.PHONY: demo test bench cluster proto

## Run the demo on the embedded exchange (no Redis, no cluster).
demo:
	cargo run --release -p academy-examples --bin quickstart
	cargo run --release -p academy-examples --bin pipeline

## Run every check and test (what CI runs). Redis tests need redis-server:
## installed here when missing (as root, or with sudo); the Python client test
## needs grpcio-tools: installed with pip when missing.
test:
	@command -v redis-server >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; }
	@python3 -c 'import grpc_tools' 2>/dev/null || \
		python3 -m pip install -q --disable-pip-version-check grpcio-tools
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo test --workspace --doc --locked
	@command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
	cargo nextest run --workspace --locked --profile ci

## A local cluster: exchange, launcher and two workers, with the pipeline on them.
cluster:
	examples/cluster.sh

## Run the end-to-end benchmark (figures for BENCHMARKS.md).
bench:
	cargo run --release -p academy-bench

## Regenerate proto/src/generated/ after changing a .proto file.
proto:
	ACADEMY_REGENERATE=1 cargo test -p academy-proto --test generated
