# The two entry points of the README. Both install what they need first
# (idempotently) and share one cargo target directory outside the clone.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/otabox/target
SHELL := /bin/bash

.PHONY: setup setup-demo demo test test-cross bench bench-compare deb idle-functions

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
	cargo check -p otabox --no-default-features --features compiler --bin otabox
	@bash tools/check-device-tree.sh
	$(MAKE) --no-print-directory test-cross
	bash .ci/test-runtime-only
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
## binary (no `fleet` feature), the four first-party handlers and
## the service (see packaging/). ARCH=amd64 (default); ARCH=arm64 or
## ARCH=armhf cross-build once their Rust targets and linkers are set up.
## Both are built for size (profile `small`, see Cargo.toml) and linked
## with the idle agent's functions together (packaging/link-ordered).
## VARIANT=runtime-only builds otabox-runtime-only: the agent without the
## compiler, and the handlers precompiled
## for ARCH on this machine (for another ARCH by a build with the
## `all-targets` feature, kept apart under $(CARGO_TARGET_DIR)/<host triple>/).
ARCH ?= amd64
VARIANT ?=
DEB_TRIPLE_amd64 :=
DEB_TRIPLE_arm64 := aarch64-unknown-linux-gnu
DEB_TRIPLE_armhf := armv7-unknown-linux-gnueabihf
DEB_TRIPLE = $(DEB_TRIPLE_$(ARCH))
DEB_CC_amd64 := cc
DEB_CC_arm64 := aarch64-linux-gnu-gcc
DEB_CC_armhf := arm-linux-gnueabihf-gcc
HOST_TRIPLE = $(shell rustc -vV | sed -n 's/^host: //p')
DEB_FEATURES = $(if $(filter runtime-only,$(VARIANT)),,--features compiler)
DEB_PROFILE = small
deb: setup
	@test -n "$(filter $(ARCH),amd64 arm64 armhf)" || { echo "ARCH=$(ARCH): use amd64, arm64 or armhf"; exit 1; }
	@test -z "$(VARIANT)" -o "$(VARIANT)" = runtime-only || { echo "VARIANT=$(VARIANT): the only variant is runtime-only"; exit 1; }
	OTABOX_LINK_CC=$(DEB_CC_$(ARCH)) cargo rustc --profile $(DEB_PROFILE) -p otabox --no-default-features $(DEB_FEATURES) --bin otabox $(if $(DEB_TRIPLE),--target $(DEB_TRIPLE)) -- -C linker=$(CURDIR)/packaging/link-ordered
	cargo build -p otabox-test-guests
	set -e; handlers=$(CARGO_TARGET_DIR)/wasm-guests/handlers; \
	if [ "$(VARIANT)" = runtime-only ]; then \
		stage=$$(mktemp -d); trap 'rm -rf "$$stage"' EXIT; \
		for n in file apt container firmware; do cp $$handlers/$$n.wasm $$handlers/$$n.toml "$$stage/"; done; \
		if [ -z "$(DEB_TRIPLE)" ]; then \
			cargo build -p otabox --bin otabox; precompiler=$(CARGO_TARGET_DIR)/debug/otabox; \
		else \
			cargo build -p otabox --features all-targets --bin otabox --target $(HOST_TRIPLE); \
			precompiler=$(CARGO_TARGET_DIR)/$(HOST_TRIPLE)/debug/otabox; \
		fi; \
		$$precompiler handlers precompile --dir "$$stage" --target $(or $(DEB_TRIPLE),$(HOST_TRIPLE)); \
		handlers=$$stage; \
	fi; \
	TARGET=$(DEB_TRIPLE) VARIANT=$(VARIANT) bash packaging/build-deb \
		$(CARGO_TARGET_DIR)/$(if $(DEB_TRIPLE),$(DEB_TRIPLE)/)$(DEB_PROFILE)/otabox \
		$$handlers $(CARGO_TARGET_DIR)/debian

## Record which functions the idle agent runs (packaging/idle-functions.txt,
## read when `make deb` links): both packages' amd64 builds run under
## valgrind with the four handlers and a broker of their own. Rerun when
## the agent's start or idle loop changed much; a stale list only costs
## resident memory. Needs valgrind.
idle-functions: setup
	cargo build -p otabox-test-guests
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cargo build --profile small -p otabox --no-default-features --features compiler --bin otabox; \
	cp $(CARGO_TARGET_DIR)/small/otabox $$tmp/otabox; \
	cargo build --profile small -p otabox --no-default-features --bin otabox; \
	cp $(CARGO_TARGET_DIR)/small/otabox $$tmp/otabox-runtime-only; \
	COMPILER=$$tmp/otabox bash tools/idle-functions.sh packaging/idle-functions.txt \
		$$tmp/otabox $$tmp/otabox-runtime-only
