#!/usr/bin/env bash
# Soak: a few hundred clients with churn (connect, chat, quit, come back) against the real
# server for a bounded time; prints memory, file descriptors and delivery latency every 10 s
# (CSV on stdout, and in SOAK_REPORT), then checks there is no growth trend.
#
#   scripts/soak.sh                      # 10 minutes, 300 clients
#   SOAK_SECS=3600 SOAK_CLIENTS=500 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECS="${SOAK_SECS:-600}"
export SOAK_CLIENTS="${SOAK_CLIENTS:-300}"
export SOAK_REPORT="${SOAK_REPORT:-$PWD/soak-report.csv}"
exec cargo test --release -p conclave --test soak -- --ignored --nocapture
