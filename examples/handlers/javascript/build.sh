#!/bin/sh
# Builds the JavaScript config-file handler: OUT/config-file.wasm (default
# ./out) with componentize-js (StarlingMonkey), or with ENGINE=quickjs with
# componentize-qjs (jco's QuickJS backend; a much smaller component). The
# npm packages come from package-lock.json (installed once).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"
[ -d "$here/node_modules" ] || npm install --prefix "$here" --no-save --no-audit --no-fund --loglevel=error
bin="$here/node_modules/.bin"
case "${ENGINE:-starlingmonkey}" in
starlingmonkey)
    # http and fetch-event are left out: the host does not offer wasi:http.
    "$bin/componentize-js" --wit "$here/wit" --world-name example:config-file-js/handler \
        --disable http fetch-event -o "$out/config-file.wasm" "$here/handler.js" ;;
quickjs)
    # --sync: the host calls handlers synchronously (no component-model async).
    "$bin/componentize-qjs" --wit "$here/wit" --world example:config-file-js/handler \
        --sync --opt-size --js "$here/handler.js" -o "$out/config-file.wasm" ;;
*) echo "ENGINE must be starlingmonkey or quickjs" >&2; exit 2 ;;
esac
sha=$(sha256sum "$out/config-file.wasm" | cut -d' ' -f1)
sed "s/@SHA256@/$sha/" "$here/config-file.toml" > "$out/config-file.toml"
