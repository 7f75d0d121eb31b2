#!/bin/sh
# Builds the Python config-file handler: OUT/config-file.wasm (default
# ./out). Needs componentize-py (pip install componentize-py==0.25.1).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"
componentize-py --wit-path "$here/../wit" --world example:config-file/handler@1.0.0 \
    componentize --python-path "$here" app --output "$out/config-file.wasm"
sha=$(sha256sum "$out/config-file.wasm" | cut -d' ' -f1)
sed "s/@SHA256@/$sha/" "$here/config-file.toml" > "$out/config-file.toml"
