#!/usr/bin/env bash
# Crashes, long run: SIGKILL the real server at random moments under mixed load (messages,
# room creations and joins, file uploads) CRASH_ROUNDS times in a row (default 25), with the
# clients reconnecting by themselves; then checks every acknowledged message and completed
# upload, exactly once, and SQLite's integrity. Prints the figures.
#
#   scripts/crash.sh                     # 25 kills
#   CRASH_ROUNDS=100 CRASH_SEED=7 scripts/crash.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CRASH_ROUNDS="${CRASH_ROUNDS:-25}"
export CRASH_SEED="${CRASH_SEED:-12648430}"
exec cargo test --release -p conclave --test crash -- --nocapture
