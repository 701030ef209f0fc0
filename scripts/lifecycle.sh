#!/usr/bin/env bash
# Lifecycle, long run: N seeded random sequences of membership changes, messages, reconnects,
# kills, new devices and server restarts against the real server, every client through the
# test relay at DELAY_MS one way (default 0.5), THE RULE checked after every step (see
# crates/conclave/tests/lifecycle.rs). Release build. Prints one line per seed and a summary;
# each failure's report (its seed, the replay command and the full step list) goes to stderr
# and to the log.
#
#   scripts/lifecycle.sh 50              # seeds 1..50 at 0.5 ms
#   scripts/lifecycle.sh 20 5            # seeds 1..20 at 5 ms
#   LIFECYCLE_FIRST=100 LIFECYCLE_STEPS=40 scripts/lifecycle.sh 10 50
#   LIFECYCLE_SCRIPTED=1 scripts/lifecycle.sh 0 # only the scripted cases, at every setting (50 ms too)
#   LIFECYCLE_DEBUG=1 scripts/lifecycle.sh 3    # a debug build (no release build needed)
set -uo pipefail
cd "$(dirname "$0")/.."
N="${1:-10}"
DELAY="${2:-0.5}"
FIRST="${LIFECYCLE_FIRST:-1}"
LOG="${LIFECYCLE_LOG:-$PWD/lifecycle-report.txt}"
: > "$LOG"
PROFILE=(--release)
[ "${LIFECYCLE_DEBUG:-0}" = 1 ] && PROFILE=()
status=0
if [ "$N" -gt 0 ]; then
    LIFECYCLE_SEEDS="$FIRST..$((FIRST + N - 1))" LIFECYCLE_DELAY_MS="$DELAY" \
        LIFECYCLE_STEPS="${LIFECYCLE_STEPS:-25}" \
        cargo test "${PROFILE[@]}" -p conclave --test lifecycle random_lifecycle -- --nocapture \
        2>&1 | tee -a "$LOG" | grep -E '^LIFECYCLE (seed|SUMMARY|STEPS)|^  note:'
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "${LIFECYCLE_SCRIPTED:-0}" = 1 ]; then
    cargo test "${PROFILE[@]}" -p conclave --test lifecycle -- --include-ignored --test-threads 2 \
        2>&1 | tee -a "$LOG" | grep -E '^test |^test result'
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "full output: $LOG"
if [ "$N" -gt 0 ]; then
    seeds=$(grep -o '^LIFECYCLE FAILURE: seed [0-9]*' "$LOG" | awk '{print $4}' | sort -un | tr '\n' ' ')
    steps=$(grep -o '^LIFECYCLE seed .*: [0-9]* steps' "$LOG" | awk '{s += $(NF-1)} END {print s + 0}')
    echo "seeds $FIRST..$((FIRST + N - 1)) at $DELAY ms one way: $steps steps run, $(echo $seeds | wc -w) failed${seeds:+ (seeds ${seeds% })}"
fi
exit $status
