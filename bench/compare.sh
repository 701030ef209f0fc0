#!/usr/bin/env bash
# Runs the same workloads against ngircd, InspIRCd (both from Debian's packages) and Conclave,
# over TLS 1.3 on loopback, each server pinned to CPU 0 and the load generator on the others,
# and writes a markdown comparison table (stdout and bench/results-DATE.md).
#
#   bench/compare.sh                       fanout-100 fanout-500 paced-100 idle-10k
#   bench/compare.sh idle-50k              any presets of `conclave bench`
#   CONCLAVE=path/to/conclave bench/compare.sh
#   BENCH_ARGS=--in-step bench/compare.sh paced-100    extra flags for every run
#   OUT=bench/results-x.md bench/compare.sh            where the table goes
#   FLOOR=0 bench/compare.sh paced-100         without the paced median's floor (below)
#
# Under the table it prints each figure as a ratio to the best IRC server in the same run,
# and, when paced-100 is among the presets, the floor that "deliver only once durable" allows
# for its median: the same paced-100 against a build that does not sync (the `bench-no-sync`
# feature, built once into target/bench-no-sync: never serve from it) plus the disk's own
# sync (`conclave bench --sync-floor`), both measured in this run.
#
# Needs root for apt-get (skipped when the servers are installed already). A server whose
# package cannot be installed or that does not start is reported and skipped. Each server is
# started afresh for every preset, so a memory figure never carries a previous run's heap.
# Every change from the servers' defaults is listed (and explained) in the config files below
# and in docs/benchmarks.md; nothing else is tuned.
#
# Tests never call this script: it installs packages and takes minutes.
set -euo pipefail

cd "$(dirname "$0")/.."
CONCLAVE=${CONCLAVE:-target/release/conclave}
PRESETS=("$@")
if [ ${#PRESETS[@]} -eq 0 ]; then
    PRESETS=(fanout-100 fanout-500 paced-100 idle-10k)
fi
NGIRCD_PORT=16697
INSPIRCD_PORT=16698
DATE=$(date -u +%Y-%m-%d)
OUT=${OUT:-bench/results-$DATE.md}
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
WORK=$(mktemp -d /tmp/conclave-compare.XXXXXX)
SERVER_PID=""

say() { echo "compare: $*" >&2; }

stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap 'stop_server; [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT

if [ ! -x "$CONCLAVE" ]; then
    say "building conclave (release)"
    cargo build --release -p conclave
fi

# InspIRCd 3.15 was seen to crash on SIGTERM at the end of a run: no core files in the tree.
ulimit -c 0

# Enough open files for 50,000 connections on each side (root may raise the hard limit).
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
say "open-file limit: $(ulimit -n)"

# ---- packages ----------------------------------------------------------------------------
install() {
    local pkg=$1
    dpkg -s "$pkg" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" != 0 ]; then
        say "$pkg is not installed and this is not root: skipping it"
        return 1
    fi
    # The packages' own services are not wanted: a policy-rc.d that says "no" keeps them
    # from starting during the install.
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
    fi
    local ok=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >"$WORK/apt-$pkg.log" 2>&1 || ok=1
    [ -n "$created_policy" ] && rm -f "$policy"
    if [ $ok -ne 0 ]; then
        say "could not install $pkg (see the apt output below); skipping it"
        tail -5 "$WORK/apt-$pkg.log" >&2
        return 1
    fi
}

HAVE_NGIRCD=0
HAVE_INSPIRCD=0
if [ "$(id -u)" = 0 ]; then
    say "apt-get update"
    apt-get update >"$WORK/apt-update.log" 2>&1 || say "apt-get update failed; trying with the lists there are"
fi
install ngircd && HAVE_NGIRCD=1
install inspircd && HAVE_INSPIRCD=1
command -v jq >/dev/null || install jq || { say "jq is needed for the table"; exit 1; }
command -v taskset >/dev/null || say "taskset not found: servers will not be pinned"

# ---- one self-signed certificate for both IRC servers --------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj /CN=localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
FINGERPRINT=$(openssl x509 -noout -fingerprint -sha256 -in "$WORK/cert.pem" | cut -d= -f2)

# ---- ngircd --------------------------------------------------------------------------------
cat > "$WORK/ngircd.conf" <<EOF
# ngircd for the Conclave comparison: loopback only, TLS on $NGIRCD_PORT.
[Global]
    Name = bench.ngircd.local
    Info = conclave bench comparison
    Listen = 127.0.0.1
    # A plain port must exist; nothing connects to it.
    Ports = 16667
    MotdPhrase = "bench"
    PidFile = $WORK/ngircd.pid
[Limits]
    # Default 5 connections per IP address; every client comes from 127.0.0.0/8.
    MaxConnectionsIP = 0
    # Default -1 (penalties of up to 2 s per command): 0 turns flood penalties off, so a
    # sender at full speed is not throttled to about one line per second.
    MaxPenaltyTime = 0
[Options]
    # Defaults yes: no reverse DNS, IDENT or PAM round trips on loopback.
    DNS = no
    Ident = no
    PAM = no
[SSL]
    CertFile = $WORK/cert.pem
    KeyFile = $WORK/key.pem
    Ports = $NGIRCD_PORT
EOF

# ---- InspIRCd ------------------------------------------------------------------------------
cat > "$WORK/motd.txt" <<EOF
bench
EOF
cat > "$WORK/inspircd.conf" <<EOF
<config format="xml">
<server name="bench.inspircd.local" description="conclave bench comparison" network="bench">
<admin name="bench" nick="bench" email="bench@localhost">
<module name="ssl_gnutls">
<sslprofile name="Clients" provider="gnutls" certfile="$WORK/cert.pem" keyfile="$WORK/key.pem"
            dhfile="" hash="sha256" priority="NORMAL" requestclientcert="no">
<bind address="127.0.0.1" port="$INSPIRCD_PORT" type="clients" sslprofile="Clients">
<connect name="bench" allow="127.0.0.0/8"
         timeout="60"
         pingfreq="120"
         maxchans="20"
         hardsendq="67108864"
         softsendq="67108864"
         recvq="1048576"
         threshold="1000000"
         commandrate="100000000"
         fakelag="no"
         localmax="200000"
         globalmax="200000"
         limit="200000"
         maxconnwarn="no"
         resolvehostnames="no"
         useident="no">
<performance softlimit="200000" somaxconn="4096">
<channels users="20" opers="60">
<files motd="$WORK/motd.txt">
<pid file="$WORK/inspircd.pid">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="$WORK/inspircd.log">
EOF
# What the <connect> and <performance> lines change from the shipped config, and why:
#   hardsendq 262144 -> 64 MiB, softsendq 8192 -> 64 MiB: a member of a 500-member channel
#     receives bursts far above 256 KiB while it reads; with the defaults the server drops it.
#   recvq 8192 -> 1 MiB, threshold 10 -> 1000000, commandrate 1000 -> 100000000 (millicommands
#     per second), fakelag yes -> no: flood protection off, so senders at full speed are read
#     at full speed instead of one line per second.
#   localmax / globalmax 3 -> 200000, limit 5000 -> 200000, softlimit 1024 -> 200000:
#     all clients come from loopback, and the idle presets open 10,000-50,000 of them.
#   resolvehostnames yes -> no, useident: no reverse DNS or IDENT round trips on loopback.

# Waits until 127.0.0.1:$1 accepts connections (up to 10 s).
wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# The subshell execs taskset, which execs the server: $! is the server's own PID (a shell
# function run in the background would leave $! on a shell instead).
PIN=()
command -v taskset >/dev/null && PIN=(taskset -c 0)

start_ngircd() {
    (cd "$WORK" && exec "${PIN[@]}" ngircd --nodaemon --config "$WORK/ngircd.conf" >"$WORK/ngircd.out" 2>&1) &
    SERVER_PID=$!
    wait_port "$NGIRCD_PORT"
}

start_inspircd() {
    (cd "$WORK" && exec "${PIN[@]}" inspircd --nofork --runasroot --config="$WORK/inspircd.conf" >"$WORK/inspircd.out" 2>&1) &
    SERVER_PID=$!
    wait_port "$INSPIRCD_PORT"
}

# run_irc NAME LABEL PORT START_FUNCTION PRESET
run_irc() {
    local name=$1 label=$2 port=$3 start=$4 preset=$5
    local json="$WORK/$name-$preset.json"
    if ! $start; then
        say "$label did not start; its output:"
        tail -20 "$WORK/$name.out" >&2 || true
        stop_server
        return 0
    fi
    say "$label: $preset"
    "$CONCLAVE" bench --irc --server "127.0.0.1:$port" --fingerprint "$FINGERPRINT" \
        --server-pid "$SERVER_PID" --preset "$preset" --label "$label" ${EXTRA[@]+"${EXTRA[@]}"} --json >"$json" \
        || say "$label $preset: the run reported errors (kept in the table)"
    stop_server
}

WANT_FLOOR=0
for preset in "${PRESETS[@]}"; do
    [ "$preset" = paced-100 ] && [ "${FLOOR:-1}" != 0 ] && WANT_FLOOR=1
done
NOSYNC=target/bench-no-sync/release/conclave
if [ $WANT_FLOOR = 1 ]; then
    say "building the no-sync benchmark build (target/bench-no-sync; once, then incremental)"
    cargo build --release -p conclave --features bench-no-sync --target-dir target/bench-no-sync >&2 \
        || { say "the no-sync build failed: no floor"; WANT_FLOOR=0; }
fi

for preset in "${PRESETS[@]}"; do
    if [ $HAVE_NGIRCD = 1 ]; then
        run_irc ngircd "ngircd $(dpkg-query -W -f '${Version}' ngircd)" $NGIRCD_PORT start_ngircd "$preset"
    fi
    if [ $HAVE_INSPIRCD = 1 ]; then
        run_irc inspircd "InspIRCd $(dpkg-query -W -f '${Version}' inspircd)" $INSPIRCD_PORT start_inspircd "$preset"
    fi
    say "Conclave: $preset"
    "$CONCLAVE" bench --preset "$preset" ${EXTRA[@]+"${EXTRA[@]}"} --json >"$WORK/conclave-$preset.json" \
        || say "Conclave $preset: the run reported errors (kept in the table)"
    if [ "$preset" = paced-100 ] && [ $WANT_FLOOR = 1 ]; then
        say "Conclave without the sync (floor): $preset"
        "$NOSYNC" bench --preset "$preset" --label "Conclave, no sync (floor only)" ${EXTRA[@]+"${EXTRA[@]}"} --json \
            >"$WORK/nosync-$preset.json" || say "no-sync $preset: the run reported errors"
        say "the disk's sync floor"
        "$CONCLAVE" bench --sync-floor --json >"$WORK/sync-floor.json" || say "sync floor failed"
    fi
done

# ---- the table ---------------------------------------------------------------------------
{
    echo "# conclave bench comparison, $DATE"
    echo
    echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)."
    echo "Each server pinned to CPU 0, the generator on the others; TLS 1.3 on loopback."
    echo "Made by bench/compare.sh; settings changed from the defaults are listed there."
    if [ -n "${BENCH_ARGS:-}" ]; then
        echo "Extra flags for every run: \`$BENCH_ARGS\`."
    fi
    echo
    echo "| preset | server | connected | conn/s | deliveries/s | p50 ms | p99 ms | max ms | socket p50 / p99 ms | server CPU µs/delivery | server CPU use | RSS KiB/conn | peak RSS MiB | generator CPU use | errors |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for preset in "${PRESETS[@]}"; do
        for name in ngircd inspircd conclave nosync; do
            f="$WORK/$name-$preset.json"
            [ -s "$f" ] || continue
            jq -r --arg preset "$preset" '
                def n(d): if . == null then "-" else (. * pow(10; d) | round / pow(10; d) | tostring) end;
                def pct: if . == null then "-" else ((. * 100 | round | tostring) + "%") end;
                "| \($preset) | \(.server.label) | \(.clients_connected) | \(.connects_per_sec | n(0)) | \(.deliveries_per_sec | n(0)) | \(.latency_ms.p50 | n(2)) | \(.latency_ms.p99 | n(2)) | \(.latency_ms.max | n(1)) | \(.socket_latency_ms.p50 | n(2)) / \(.socket_latency_ms.p99 | n(2)) | \(.server_cpu_us_per_delivery | n(2)) | \(.server_cpu_util | pct) | \(.server_rss_kib_per_conn | n(1)) | \(if .server_peak_rss_kib == null then "-" else (.server_peak_rss_kib / 1024 | n(0)) end) | \(.generator_cpu_util | pct) | \(.errors)\(if .complete then "" else " (partial)" end) |"
            ' "$f"
        done
    done
    # ---- against the best peer, and the paced floor ---------------------------------------
    # ratio FIGURE PRESET JQ_PATH TARGET: Conclave's figure over the lower of the two IRC
    # servers' in this run.
    ratio() {
        local what=$1 preset=$2 path=$3 target=$4
        local c="$WORK/conclave-$preset.json"
        [ -s "$c" ] || return 0
        local mine best
        mine=$(jq -r "$path // empty" "$c")
        best=$(for name in ngircd inspircd; do
            f="$WORK/$name-$preset.json"
            [ -s "$f" ] && jq -r "$path // empty" "$f"
        done | sort -g | head -1)
        if [ -z "$mine" ] || [ -z "$best" ]; then
            echo "| $what | ${mine:--} | ${best:--} | - | $target | no peer figure |"
            return 0
        fi
        awk -v what="$what" -v m="$mine" -v b="$best" -v t="$target" 'BEGIN {
            r = (b > 0) ? m / b : 0;
            limit = t + 0;
            printf "| %s | %.3g | %.3g | %.2f | ≤ %s | %s |\n", what, m, b, r, t, (r <= limit) ? "met" : "missed";
        }'
    }
    echo
    echo "Against the best IRC server in this run (Conclave / best; lower is better):"
    echo
    echo "| figure | Conclave | best peer | ratio | target | |"
    echo "|---|---|---|---|---|---|"
    ratio "CPU µs per delivery, fanout-100" fanout-100 .server_cpu_us_per_delivery 0.9
    ratio "CPU µs per delivery, fanout-500" fanout-500 .server_cpu_us_per_delivery 0.9
    ratio "CPU µs per delivery, paced-100" paced-100 .server_cpu_us_per_delivery 0.9
    ratio "RSS KiB per busy connection, fanout-100" fanout-100 .server_rss_kib_per_conn 0.9
    ratio "RSS KiB per idle connection, idle-10k" idle-10k .server_rss_kib_per_conn 0.9
    if [ -s "$WORK/conclave-idle-10k.json" ]; then
        jq -r '.server_rss_kib_per_conn // empty | "| RSS KiB per idle connection, idle-10k (absolute) | \(. * 10 | round / 10) | | | ≤ 5 KiB | \(if . <= 5 then "met" else "missed" end) |"' "$WORK/conclave-idle-10k.json"
    fi
    if [ -s "$WORK/conclave-paced-100.json" ] && [ -s "$WORK/nosync-paced-100.json" ] && [ -s "$WORK/sync-floor.json" ]; then
        p50=$(jq -r '.socket_latency_ms.p50' "$WORK/conclave-paced-100.json")
        p99=$(jq -r '.socket_latency_ms.p99' "$WORK/conclave-paced-100.json")
        nosync=$(jq -r '.socket_latency_ms.p50' "$WORK/nosync-paced-100.json")
        sync_us=$(jq -r '.sync_floor_us.p50' "$WORK/sync-floor.json")
        echo
        echo "The paced median against what delivering only durable messages allows on this disk:"
        echo
        awk -v p50="$p50" -v p99="$p99" -v ns="$nosync" -v s="$sync_us" 'BEGIN {
            floor = ns + s / 1000;
            printf "| paced-100 socket p50 | no-sync build p50 | disk sync p50 | floor | p50 / floor | target | |\n";
            printf "|---|---|---|---|---|---|---|\n";
            printf "| %.3f ms | %.3f ms | %.0f µs | %.3f ms | %.2f | ≤ 1.1 | %s |\n", p50, ns, s, floor, p50 / floor, (p50 <= 1.1 * floor) ? "met" : "missed";
            printf "\npaced-100 socket p99: %.2f ms (target ≤ 2 ms: %s)\n", p99, (p99 <= 2) ? "met" : "missed";
        }'
    fi
} | tee "$OUT"
say "written to $OUT"
