# The two entry points of the README. Both install what they need first
# (idempotently) and share one cargo target directory outside the clone.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/otabox/target
SHELL := /bin/bash

.PHONY: setup setup-demo demo test test-cross bench bench-compare deb

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
	cargo test -p otabox --bench handler_call --bench agent --bench download --bench apt --bench firmware --bench languages --bench service
	@# The device build (no `fleet` feature) compiles and links neither the
	@# cloud side (otabox-fleet, SQLite) nor a web or database server.
	cargo check -p otabox --no-default-features --bin otabox
	@bash tools/check-device-tree.sh
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
	cargo bench -p otabox --bench handler_call --bench agent --bench download --bench apt --bench firmware --bench languages --bench service

## Compare one benchmark between revision REV and the work tree, built alike
## and run alternately: make bench-compare REV=dfa8818 BENCH=handler_call
## PATTERN=is-installed ROUNDS=6
bench-compare:
	bash host/benches/support/before-after.sh $(REV) $(BENCH) $(or $(ROUNDS),6) '$(or $(PATTERN), (us|ms|s) )'

## Build the Debian package into $(CARGO_TARGET_DIR)/debian: the device
## binary (release, no `fleet` feature), the four first-party handlers and
## the service (see packaging/). ARCH=amd64 (default); ARCH=arm64 or
## ARCH=armhf cross-build once their Rust targets and linkers are set up.
ARCH ?= amd64
DEB_TRIPLE_amd64 :=
DEB_TRIPLE_arm64 := aarch64-unknown-linux-gnu
DEB_TRIPLE_armhf := armv7-unknown-linux-gnueabihf
DEB_TRIPLE = $(DEB_TRIPLE_$(ARCH))
deb: setup
	@test -n "$(filter $(ARCH),amd64 arm64 armhf)" || { echo "ARCH=$(ARCH): use amd64, arm64 or armhf"; exit 1; }
	cargo build --release -p otabox --no-default-features --bin otabox $(if $(DEB_TRIPLE),--target $(DEB_TRIPLE))
	cargo build -p otabox-test-guests
	TARGET=$(DEB_TRIPLE) bash packaging/build-deb \
		$(CARGO_TARGET_DIR)/$(if $(DEB_TRIPLE),$(DEB_TRIPLE)/)release/otabox \
		$(CARGO_TARGET_DIR)/wasm-guests/handlers $(CARGO_TARGET_DIR)/debian
