#!/usr/bin/env bash
# Compares one benchmark between a git revision and the work tree in one
# sitting: both are built in the same target directory with the same
# profile, then run alternately, so the day's machine speed and the noise of
# other work fall on both sides alike.
#
#   host/benches/support/before-after.sh REV BENCH [ROUNDS] [PATTERN]
#   make bench-compare REV=dfa8818 BENCH=handler_call PATTERN=is-installed
#
# PATTERN selects the result rows to compare (an extended regex; default:
# every row with a median). For each row it prints the median of the
# per-run medians on each side and their ratio. COLUMN=N compares the Nth
# figure with a time unit of each row instead of the first, COLUMN="2 3"
# the second and the third, one table each (the apt
# benchmark prints apt-get's time first and the handler's second; the
# languages benchmark the cold compile, then the cached load and the call). The release profile is used
# without LTO (opt-level 3, 16 codegen units) unless LTO=fat is set: the
# comparison needs the same profile on both sides, not the shipping one, and
# this keeps a cold build of both under ten minutes on two cores.
# BEFORE_PATCH=FILE applies a patch to the revision's tree for the run and
# takes it back afterwards: a change to the benchmark's own code (say, the
# resolution it prints) so that both sides measure alike.
set -euo pipefail
rev=${1:?usage: before-after.sh REV BENCH [ROUNDS] [PATTERN]}
bench=${2:?usage: before-after.sh REV BENCH [ROUNDS] [PATTERN]}
rounds=${3:-6}
pattern=${4:-' (us|ms|s) '}
root=$(git rev-parse --show-toplevel)
# Two target directories, one per side: cargo names the artifacts of a
# workspace's own crates (the SDK, the handlers, the wasm guests the build
# script writes) alike in every checkout, so one shared directory would let
# one side's build pass for the other's.
compare_dir=${CARGO_TARGET_DIR:-$HOME/.cache/otabox/target}-compare
if [[ ${LTO:-} != fat ]]; then
    export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
fi
# The revision's tree is kept beside the target directory, so a second
# comparison with the same revision rebuilds nothing.
before_tree=$compare_dir/trees/$(git -C "$root" rev-parse --short "$rev")
if [[ ! -d $before_tree ]]; then
    git -C "$root" worktree add --quiet --detach "$before_tree" "$rev"
fi
work=$(mktemp -d)
patched=
cleanup() {
    if [[ -n $patched ]]; then git -C "$before_tree" apply -R "$patched"; fi
    rm -rf "$work"
}
trap cleanup EXIT
if [[ -n ${BEFORE_PATCH:-} ]]; then
    cp "$BEFORE_PATCH" "$work/before.patch"
    git -C "$before_tree" apply "$work/before.patch"
    patched=$work/before.patch
fi

# The path of the benchmark executable built in directory $1, into target
# directory $2.
build() {
    (cd "$1" && CARGO_TARGET_DIR=$2 cargo bench -p otabox --bench "$bench" --no-run --message-format=json 2>/dev/null) |
        grep -F '"kind":["bench"]' | grep -F "\"name\":\"$bench\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1
}
before=$(build "$before_tree" "$compare_dir/before")
after=$(build "$root" "$compare_dir/after")
[[ -x $before && -x $after ]] || { echo "cannot build $bench at both revisions" >&2; exit 1; }

for ((i = 1; i <= rounds; i++)); do
    (cd "$before_tree/host" && "$before" --bench) | grep -E "$pattern" | sed 's/^/before\t/' || true
    (cd "$root/host" && "$after" --bench) | grep -E "$pattern" | sed 's/^/after\t/' || true
done | tee "$work/rows"
(cd "$root/host" && "$after" --bench) | grep '^calibration' || true

# Per row: the median of the per-run medians (the first figure with a unit)
# and the best run's median, the figure least touched by other load.
for column in ${COLUMN:-1}; do
echo; echo "figure $column of each row:"
awk -F'\t' -v column="$column" '
    function value(text,   n, parts, i, seen) {
        n = split(text, parts, / +/)
        for (i = 1; i < n; i++)
            if (parts[i] ~ /^[0-9.]+$/ && parts[i + 1] ~ /^(us|ms|s)$/ && ++seen == column)
                return parts[i] * (parts[i + 1] == "s" ? 1e6 : parts[i + 1] == "ms" ? 1e3 : 1)
        return -1
    }
    function sorted(list, v,   n, i, j, t) {
        n = split(list, v, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
        return n
    }
    function median(list,   n, v) {
        n = sorted(list, v)
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function best(list,   v) { sorted(list, v); return v[1] }
    {
        label = $2; sub(/ +[0-9.]+ +(us|ms|s).*/, "", label); sub(/ \| [0-9.]+ (KiB|MiB) \|.*/, "", label)
        x = value($2); if (x < 0) next
        if (!(label in seen)) { seen[label] = 1; order[++rows] = label }
        runs[$1, label] = runs[$1, label] " " x
    }
    END {
        printf "\n%-52s %22s %22s\n", "", "median of run medians", "best run"
        printf "%-52s %9s %9s %7s %9s %9s %7s\n", "", "before", "after", "change", "before", "after", "change"
        for (r = 1; r <= rows; r++) {
            l = order[r]
            if (!(("before", l) in runs) || !(("after", l) in runs)) continue
            b = median(runs["before", l]); a = median(runs["after", l])
            bb = best(runs["before", l]); ab = best(runs["after", l])
            printf "%-52s %6.1f us %6.1f us %+6.1f%% %6.1f us %6.1f us %+6.1f%%\n", substr(l, 1, 52), b, a, (a - b) / b * 100, bb, ab, (ab - bb) / bb * 100
        }
    }' "$work/rows"
done
