# The two entry points of the README. Both install what they need first
# (idempotently) and share one cargo target directory outside the clone.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/otabox/target
SHELL := /bin/bash

.PHONY: setup setup-demo demo test test-cross bench bench-compare

## Install what the demo needs: mosquitto, nginx-light and the wasm32-wasip2
## target.
setup-demo:
	@bash .ci/setup-demo

## Install that, and the system packages and toolchains the tests use.
setup:
	@bash .ci/setup

## Walk through a whole update with the built-in file handler (builds only
## the handler the binary embeds, not the test guests).
demo: setup-demo
	cargo run -p otabox -- demo

## Run the whole test suite (the wasm handlers are built by host/build.rs and
## host/tests/guests/packaged/build.rs,
## the example handlers in other languages by their build.sh; a missing
## toolchain fails the run), the benchmarks as short smoke runs so they
## cannot rot, and the ARM builds' tests under qemu-user (test-cross).
test: export OTABOX_REQUIRE_TOOLCHAINS = 1
test: setup
	cargo test -p otabox --bench handler_call --bench agent --bench download --bench apt --bench firmware --bench languages
	@# The device build (no `fleet` feature) compiles and links no SQLite.
	cargo check -p otabox --no-default-features --bin otabox
	@if cargo tree -p otabox --no-default-features -e normal --prefix none | grep -qE '^(rusqlite|libsqlite3-sys) '; then \
		echo "the device build (--no-default-features) links SQLite"; exit 1; fi
	$(MAKE) --no-print-directory test-cross
	set -o pipefail; log=$$(mktemp); \
	cargo test --workspace 2>&1 | tee "$$log"; status=$$?; \
	awk '/^test result:/ { p += $$4; f += $$6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$$log"; \
	rm -f "$$log"; exit $$status

## Cross build the device binary for arm64 (Cranelift) and armhf (Pulley)
## and run the sandbox and file-handler tests under qemu-user; one target
## with CROSS_TARGETS=aarch64-unknown-linux-gnu.
test-cross: setup
	bash .ci/test-cross $(CROSS_TARGETS)

## Run the benchmarks (release build) and print the figures.
bench: setup
	cargo bench -p otabox --bench handler_call --bench agent --bench download --bench apt --bench firmware --bench languages

## Compare one benchmark between revision REV and the work tree, built alike
## and run alternately: make bench-compare REV=dfa8818 BENCH=handler_call
## PATTERN=is-installed ROUNDS=6
bench-compare:
	bash host/benches/support/before-after.sh $(REV) $(BENCH) $(or $(ROUNDS),6) '$(or $(PATTERN), (us|ms|s) )'
