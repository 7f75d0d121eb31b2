#!/bin/sh
# Builds the JavaScript config-file handler: OUT/config-file.wasm (default
# ./out) with componentize-js (StarlingMonkey), or with ENGINE=quickjs with
# jco's QuickJS backend (componentize-qjs; a much smaller component). The
# npm packages (pinned in package.json) are installed on first use.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"
[ -d "$here/node_modules" ] || npm install --prefix "$here" --no-audit --no-fund --loglevel=error
bin="$here/node_modules/.bin"
case "${ENGINE:-starlingmonkey}" in
starlingmonkey)
    # http and fetch-event are left out: the host does not offer wasi:http.
    "$bin/componentize-js" --wit "$here/wit" --world-name example:config-file-js/handler \
        --disable http fetch-event -o "$out/config-file.wasm" "$here/handler.js" ;;
quickjs)
    # jco's QuickJS backend (componentize-qjs). The host calls handlers
    # synchronously (no component-model async ABI).
    (cd "$here" && "$bin/jco" componentize handler.js --wit wit \
        --world-name example:config-file-js/handler \
        --backend quickjs --backend-qjs-disable-async -o "$out/config-file.wasm") ;;
*) echo "ENGINE must be starlingmonkey or quickjs" >&2; exit 2 ;;
esac
sha=$(sha256sum "$out/config-file.wasm" | cut -d' ' -f1)
sed "s/@SHA256@/$sha/" "$here/config-file.toml" > "$out/config-file.toml"
