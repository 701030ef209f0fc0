#!/usr/bin/env bash
# Runs every fuzz target for a bounded time, one after the other, in one process each (the
# machine is shared), on the committed corpus plus fresh seeds; prints libFuzzer's execution
# count per target and the total, and keeps each target's log in fuzz/logs/.
#
#   fuzz/run.sh                 # 60 s per target
#   fuzz/run.sh 900             # 15 minutes per target
#   fuzz/run.sh 600 frame json_command
#   MINIMIZE=1 fuzz/run.sh 60   # then merge-minimise the corpus into fuzz/corpus/<target>
#
# Findings are written to fuzz/artifacts/<target>/ (crash-*, timeout-*, oom-*); the script
# exits non-zero when a target finds one. Needs cargo-fuzz (`cargo install cargo-fuzz`); runs
# on the stable toolchain without sanitizers (`-s none`), with overflow checks and debug
# assertions on (`-a`).
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET="${1:-60}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(frame request json_command config audit_log file_chunk p2p_wire)
fi
# The fuzz build has its own target directory unless CARGO_TARGET_DIR says otherwise.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
FUZZ=(cargo fuzz run -s none -O -a)
# Per input: 2 s (a timeout is a finding) and 2 GiB; inputs at most 64 KiB.
FLAGS=(-timeout=2 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1)

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 2; }
cargo fuzz build -s none -O -a
"${FUZZ[@]}" seeds -- -runs=0 >/dev/null 2>&1

mkdir -p logs
total=0
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "corpus-work/$t" "artifacts/$t"
    log="logs/$t.log"
    echo "== $t: ${SECONDS_PER_TARGET} s"
    status=0
    "${FUZZ[@]}" "$t" "corpus-work/$t" "corpus/$t" "seeds/$t" -- \
        "${FLAGS[@]}" -max_total_time="$SECONDS_PER_TARGET" \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    execs=${execs:-0}
    total=$((total + execs))
    cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -o 'cov: [0-9]*' || true)
    echo "   $execs executions, $cov, exit $status"
    if [ "$status" -ne 0 ]; then
        failed=1
        echo "   FINDING: see $log and artifacts/$t/" >&2
    fi
    if [ "${MINIMIZE:-0}" = 1 ]; then
        mkdir -p "corpus-min/$t"
        "${FUZZ[@]}" "$t" "corpus-min/$t" "corpus/$t" "corpus-work/$t" -- -merge=1 \
            -max_len=65536 >>"$log" 2>&1
        rm -rf "corpus/$t" && mv "corpus-min/$t" "corpus/$t"
        echo "   corpus: $(find "corpus/$t" -type f | wc -l) files after merge"
    fi
done
rmdir corpus-min 2>/dev/null || true
echo "== total: $total executions"
exit "$failed"
