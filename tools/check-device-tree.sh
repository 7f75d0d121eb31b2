#!/usr/bin/env bash
# Fails when the device build of `otabox` (--no-default-features) links a
# crate only the cloud side needs: the replica, SQLite, a database client,
# a web framework, or an HTTP server (hyper's `server` feature).
set -euo pipefail
tree=$(cargo tree -p otabox --no-default-features -e normal --prefix none)
features=$(cargo tree -p otabox --no-default-features -e features --prefix none)
forbidden='^(otabox-fleet|rusqlite|libsqlite3-sys|tokio-postgres|postgres|sqlx|axum|actix-web|warp|tower-http-server) '
if found=$(grep -E "$forbidden" <<<"$tree" | sort -u) && [ -n "$found" ]; then
    echo "the device build (--no-default-features) links cloud-side crates:" >&2
    echo "$found" >&2
    exit 1
fi
if grep -qE '^hyper feature "server"' <<<"$features"; then
    echo "the device build (--no-default-features) links an HTTP server (hyper feature \"server\")" >&2
    exit 1
fi
echo "device build: no cloud-side crates ($(sort -u <<<"$tree" | wc -l) crates)"
