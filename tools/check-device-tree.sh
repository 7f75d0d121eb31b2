#!/usr/bin/env bash
# Fails when the device build of `otabox` (--no-default-features --features
# compiler) links a
# crate only the cloud side needs: the replica, SQLite, a database client,
# a web framework, or an HTTP server (hyper's `server` feature).
set -euo pipefail
tree=$(cargo tree -p otabox --no-default-features --features compiler -e normal --prefix none)
features=$(cargo tree -p otabox --no-default-features --features compiler -e features --prefix none)
forbidden='^(otabox-fleet|rusqlite|libsqlite3-sys|tokio-postgres|postgres|sqlx|axum|actix-web|warp|tower-http-server) '
if found=$(grep -E "$forbidden" <<<"$tree" | sort -u) && [ -n "$found" ]; then
    echo "the device build (--no-default-features --features compiler) links cloud-side crates:" >&2
    echo "$found" >&2
    exit 1
fi
if grep -qE '^hyper feature "server"' <<<"$features"; then
    echo "the device build (--no-default-features --features compiler) links an HTTP server (hyper feature \"server\")" >&2
    exit 1
fi
echo "device build: no cloud-side crates ($(sort -u <<<"$tree" | wc -l) crates)"

# The runtime-only build (no features at all) links no compiler: no
# Cranelift code generator, and nothing else that compiles wasm to code
# (wasmtime's runtime keeps cranelift-entity and -bforest, data structures).
small=$(cargo tree -p otabox --no-default-features -e normal --prefix none)
if found=$(grep -E '^(cranelift-(codegen|frontend|native|assembler-x64)|wasmtime-(internal-)?(cranelift|winch)|winch-codegen|otabox-fleet|rusqlite) ' <<<"$small" | sort -u) && [ -n "$found" ]; then
    echo "the runtime-only build (--no-default-features) links a compiler or the cloud side:" >&2
    echo "$found" >&2
    exit 1
fi
echo "runtime-only build: no compiler ($(sort -u <<<"$small" | wc -l) crates)"
