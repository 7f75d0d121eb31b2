#!/bin/bash
# Records which functions of otabox an idle agent runs, for
# packaging/link-ordered (which places them together in the packaged
# binary, see there). Run by `make idle-functions`; rerun it when the
# agent's start or idle loop changes much (a stale list costs memory, not
# correctness).
#
# usage: tools/idle-functions.sh OUT BINARY...
#
# Each BINARY (a device build: with or without the compiler) runs as the
# packaged service does: the four first-party handlers, precompiled (by
# $COMPILER, a build with a compiler, default BINARY itself), a mosquitto
# of its own on loopback, under valgrind's callgrind until it has
# connected and idled a few seconds.
# OUT gets the union of the functions each run executed (their symbols).
# Needs valgrind, mosquitto, python3; $HANDLERS (default:
# $CARGO_TARGET_DIR/wasm-guests/handlers) holds the built handlers.
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,20p' "$0" | sed 's/^# \?//'; exit 2; }
out=$1; shift
handlers=${HANDLERS:-${CARGO_TARGET_DIR:?set CARGO_TARGET_DIR or HANDLERS}/wasm-guests/handlers}
for tool in valgrind mosquitto python3; do
    command -v $tool >/dev/null || { echo "idle-functions: $tool is needed" >&2; exit 1; }
done

work=$(mktemp -d)
broker= listener= agent=
cleanup() {
    for pid in $agent $listener $broker; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

port=$((20000 + $$ % 20000))
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' $port > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker=$!

# Every function a run executed in BINARY, mangled, one per line (not
# callgrind's names for code without a symbol, such as `0x1234`). Callgrind
# names objects and functions once, as `ob=(id) name` (or cob=, fn=, cfn=),
# and by id alone after that.
executed() {
    local binary=$1 callgrind=$2
    awk -v binary="$(realpath "$binary")" '
        match($0, /^c?(ob|fn)=\([0-9]+\)/) {
            kind = ($0 ~ /^c?ob/) ? "ob" : "fn"
            id = substr($0, index($0, "(") + 1); id = substr(id, 1, index(id, ")") - 1)
            if (RLENGTH < length($0)) name[kind, id] = substr($0, RLENGTH + 2)
            if ($0 ~ /^ob=/) current = name["ob", id]
            if ($0 ~ /^fn=/ && current == binary) print name["fn", id]
        }' "$callgrind" | grep -E '^[A-Za-z_][A-Za-z0-9_.$]*$' | sort -u
}

triple=$(rustc -vV | sed -n 's/^host: //p')
n=0
for binary in "$@"; do
    n=$((n + 1))
    run=$work/run$n
    mkdir -p "$run/handlers" "$run/state"
    for h in file apt container firmware; do cp "$handlers/$h.wasm" "$handlers/$h.toml" "$run/handlers/"; done
    : > "$run/grubenv"
    cat > "$run/device.toml" <<EOF
[device]
id = "idle-profile"
[mqtt]
host = "127.0.0.1"
port = $port
[paths]
handlers = ["$run/handlers"]
state = "$run/state"
cache = "$run/state/cache"
[handlers.firmware]
enabled = true
config = { compatible = "profile", bootloader = { kind = "grub", env = "$run/grubenv" } }
EOF
    # Artifacts for the baseline CPU: valgrind's CPU lacks some features
    # this one has, and code tuned to them would be compiled again.
    "${COMPILER:-$binary}" handlers precompile --dir "$run/handlers" --target "$triple" \
        > "$run/precompile.log" 2>&1 || { cat "$run/precompile.log" >&2; exit 1; }
    # As under systemd: READY=1 and watchdog pings to a notify socket.
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1])
while True: s.recv(4096)' "$run/notify" &
    listener=$!
    NOTIFY_SOCKET=$run/notify WATCHDOG_USEC=2000000 \
        valgrind --tool=callgrind --demangle=no --dump-instr=no \
        --callgrind-out-file="$run/callgrind.out" \
        "$binary" run --config "$run/device.toml" > "$run/agent.log" 2>&1 &
    agent=$!
    for _ in $(seq 1200); do
        grep -q "connected to 127.0.0.1:$port" "$run/agent.log" && break
        kill -0 $agent 2>/dev/null || { cat "$run/agent.log" >&2; exit 1; }
        sleep 0.1
    done
    grep -q "connected to 127.0.0.1:$port" "$run/agent.log" \
        || { echo "idle-functions: $binary did not connect" >&2; cat "$run/agent.log" >&2; exit 1; }
    sleep 12 # idle: watchdog pings, keep-alive, reporting timers
    kill -INT $agent
    wait $agent || true
    kill $listener
    executed "$binary" "$run/callgrind.out" > "$run/functions"
    echo "idle-functions: $binary ran $(wc -l < "$run/functions") functions" >&2
done

{
    echo "# Symbols of the functions the idle agent runs (tools/idle-functions.sh;"
    echo "# read by packaging/link-ordered). Generated: rerun \`make idle-functions\`."
    sort -u "$work"/run*/functions
} > "$out"
echo "idle-functions: $out: $(grep -vc '^#' "$out") functions" >&2
