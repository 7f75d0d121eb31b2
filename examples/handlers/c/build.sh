#!/bin/sh
# Builds the C config-file handler: OUT/config-file.wasm (default ./out).
# Needs zig (pip install ziglang==0.14.1) and cargo (for otabox-component,
# this repository's wrapper around wit-bindgen's C generator and
# wit-component with the WASI preview1 adapter).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out/gen"
tool() { cargo run --quiet --manifest-path "$here/../../../tools/component/Cargo.toml" -- "$@"; }
tool c-bindings --wit "$here/../wit" --world handler --out "$out/gen"
python3 -m ziglang cc --target=wasm32-wasi -mexec-model=reactor -Os -Wall -Werror \
    -Wno-unused-function -I "$out/gen" \
    "$here/config_file.c" "$here/json.c" "$out/gen/handler.c" "$out/gen/handler_component_type.o" \
    -o "$out/core.wasm"
tool new "$out/core.wasm" --out "$out/config-file.wasm"
sha=$(sha256sum "$out/config-file.wasm" | cut -d' ' -f1)
sed "s/@SHA256@/$sha/" "$here/config-file.toml" > "$out/config-file.toml"
