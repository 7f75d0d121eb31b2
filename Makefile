# The two entry points of the README. Both install what they need first
# (idempotently) and share one cargo target directory outside the clone.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/otabox/target

.PHONY: setup demo test bench audit

## Install the wasm32-wasip2 target and the system packages the tests use.
setup:
	@bash .ci/setup

## Walk through a whole update with the built-in file handler.
demo: setup
	cargo run -p otabox -- demo

## Run the whole test suite (the wasm handlers are built by host/build.rs),
## and the benchmarks as short smoke runs so they cannot rot.
test: setup
	cargo test -p otabox --bench handler_call --bench agent --bench download
	cargo test --workspace

## Run the benchmarks (release build) and print the figures.
bench: setup
	cargo bench -p otabox --bench handler_call --bench agent --bench download
