#!/usr/bin/env bash
# Cluster figures (issue 24): a throwaway PostgreSQL 15 and nats-server on loopback (Debian's
# packages), one and then two `conclave serve --store … --bus … --node …` nodes on them, and
# `conclave bench` against them, with the same presets as bench/compare.sh:
#
#   - paced-100 on one node, then with the 100 clients spread over two nodes (connection i on
#     node i mod 2, so about half of the deliveries cross nodes): latency p50/p99 at the client
#     and at the socket;
#   - fanout-100 on one node and on two: durable messages/s (each acknowledged only once
#     committed in PostgreSQL, synchronous_commit on) and deliveries/s, with the CPU time of
#     the nodes, of PostgreSQL (all its processes) and of nats-server per message;
#   - idle connections on one cluster node (memory per connection), IDLE (default 5000)
#     accounts inserted into PostgreSQL directly with the bench's cheap password hash.
#
#   bench/cluster.sh                  everything above
#   CONCLAVE=path/to/conclave bench/cluster.sh
#   IDLE=0 bench/cluster.sh           without the idle run
#   OUT=bench/cluster-x.md bench/cluster.sh
#
# The nodes run unpinned (two nodes and the broker and database share this machine's CPUs with
# the generator), so compare figures from the same run only. Tests never call this script.
set -euo pipefail

cd "$(dirname "$0")/.."
CONCLAVE=${CONCLAVE:-target/release/conclave}
CONCLAVE=$(realpath "$CONCLAVE")
PG_BIN=${CONCLAVE_PG_BIN:-/usr/lib/postgresql/15/bin}
IDLE=${IDLE:-5000}
DATE=$(date -u +%Y-%m-%d)
OUT=${OUT:-bench/cluster-$DATE.md}
WORK=$(mktemp -d /tmp/conclave-cluster.XXXXXX)
chmod 755 "$WORK"
PIDS=()

say() { echo "cluster: $*" >&2; }

as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [ -f "$WORK/pg/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" stop -m immediate >/dev/null 2>&1 || true
    fi
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

for need in "$PG_BIN/initdb" "$PG_BIN/pg_ctl" "$(command -v nats-server || echo /usr/sbin/nats-server)"; do
    if [ ! -x "$need" ]; then
        say "$need is missing: apt-get install -y postgresql nats-server"
        exit 1
    fi
done
if [ ! -x "$CONCLAVE" ]; then
    say "building conclave (release)"
    cargo build --release -p conclave
fi

# PostgreSQL: durable as the cluster needs it (fsync and synchronous_commit on).
PG_PORT=$(free_port)
mkdir -p "$WORK/pg" "$WORK/pgsock"
if [ "$(id -u)" -eq 0 ]; then chown postgres "$WORK/pg" "$WORK/pgsock"; fi
as_pg "$PG_BIN/initdb" -D "$WORK/pg" -U conclave --auth=trust -N >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pgsock/pg.log" -w start \
    -o "-p $PG_PORT -k $WORK/pgsock -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c max_connections=50" >/dev/null
PG_MAIN=$(head -1 "$WORK/pg/postmaster.pid")
STORE="postgres://conclave@127.0.0.1:$PG_PORT/postgres"

NATS_PORT=$(free_port)
nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
PIDS+=("$NATS_PID")
BUS="nats://127.0.0.1:$NATS_PORT"
sleep 0.5

# The bench's relaxed limits (open registration, generous rates), for every node.
cat >"$WORK/node.toml" <<'EOF'
registration = "open"

[limits]
max_connections = 200000
requests_per_second = 1000000
request_burst = 1000000

[security]
max_connections_per_ip = 200000
connections_per_ip_per_minute = 10000000
flood_refusals_per_ip = 1000000
auto_ban = false

[files]
dir = "SHARED_FILES"
EOF
sed -i "s#SHARED_FILES#$WORK/files#" "$WORK/node.toml"

cpu_ticks() { # total utime+stime of the given pids, in clock ticks
    local total=0
    for p in "$@"; do
        if [ -r "/proc/$p/stat" ]; then
            local t
            t=$(awk '{print $14+$15}' "/proc/$p/stat")
            total=$((total + t))
        fi
    done
    echo "$total"
}
pg_pids() { echo "$PG_MAIN" $(pgrep -P "$PG_MAIN" || true); }
TICKS=$(getconf CLK_TCK)

NODE_PIDS=()
NODE_ADDRS=()
start_node() { # name
    local name=$1 data="$WORK/$1" log="$WORK/$1.log"
    if [ ! -d "$data" ] && [ -d "$WORK/n1" ]; then cp -a "$WORK/n1" "$data"; rm -f "$data"/*.sock; fi
    "$CONCLAVE" serve --data-dir "$data" --config "$WORK/node.toml" --listen 127.0.0.1:0 \
        --store "$STORE" --bus "$BUS" --node "$name" >"$log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do
        if grep -q -- "--fingerprint" "$log"; then break; fi
        sleep 0.1
    done
    local addr fp
    addr=$(grep -o 'serving on [0-9.]*:[0-9]*' "$log" | head -1 | awk '{print $3}')
    fp=$(grep -o -- '--fingerprint [0-9a-f]*' "$log" | head -1 | awk '{print $2}')
    if [ -z "$addr" ] || [ -z "$fp" ]; then
        say "node $name did not start:"; cat "$log" >&2; exit 1
    fi
    NODE_PIDS+=("$pid")
    NODE_ADDRS+=("$addr")
    FINGERPRINT=$fp
}
stop_nodes() {
    for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${NODE_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    NODE_PIDS=()
    NODE_ADDRS=()
}

RESULTS="$WORK/results.jsonl"
run() { # label preset servers...
    local label=$1 preset=$2
    shift 2
    local list
    list=$(IFS=,; echo "$*")
    local before_pg before_nats before_nodes after_pg after_nats after_nodes
    before_pg=$(cpu_ticks $(pg_pids))
    before_nats=$(cpu_ticks "$NATS_PID")
    before_nodes=$(cpu_ticks "${NODE_PIDS[@]}")
    say "$label: $preset against $list"
    "$CONCLAVE" bench --preset "$preset" --server "$list" --fingerprint "$FINGERPRINT" \
        --server-pid "${NODE_PIDS[0]}" --no-pin --json "${EXTRA[@]}" >"$WORK/run.json"
    after_pg=$(cpu_ticks $(pg_pids))
    after_nats=$(cpu_ticks "$NATS_PID")
    after_nodes=$(cpu_ticks "${NODE_PIDS[@]}")
    jq -c --arg lbl "$label" --arg preset "$preset" --argjson nodes "${#NODE_PIDS[@]}" \
        --argjson pg "$(( after_pg - before_pg ))" --argjson nats "$(( after_nats - before_nats ))" \
        --argjson all "$(( after_nodes - before_nodes ))" --argjson hz "$TICKS" \
        '{"label": $lbl, "preset": $preset, "nodes": $nodes, accepted, deliveries, traffic_s,
          deliveries_per_sec, latency_ms, socket_latency_ms, latency_by_node, server_rss_kib_per_conn,
          clients_connected, errors, complete,
          "pg_cpu_s": ($pg/$hz), "nats_cpu_s": ($nats/$hz), "nodes_cpu_s": ($all/$hz)}' \
        "$WORK/run.json" >>"$RESULTS"
}
EXTRA=()

# The first node creates the identity, the data key and the schema; the others are copies.
start_node n1
stop_nodes
if [ "$IDLE" -gt 0 ]; then
    say "inserting $IDLE accounts for the idle run"
    # The bench's own cheap hash: made by `conclave bench --data-dir` on a scratch directory.
    "$CONCLAVE" serve --data-dir "$WORK/seed" --listen 127.0.0.1:0 >"$WORK/seed.log" 2>&1 &
    SEED=$!
    PIDS+=("$SEED")
    for _ in $(seq 100); do grep -q -- "--fingerprint" "$WORK/seed.log" && break; sleep 0.1; done
    SEED_ADDR=$(grep -o 'serving on [0-9.]*:[0-9]*' "$WORK/seed.log" | head -1 | awk '{print $3}')
    SEED_FP=$(grep -o -- '--fingerprint [0-9a-f]*' "$WORK/seed.log" | head -1 | awk '{print $2}')
    "$CONCLAVE" bench --server "$SEED_ADDR" --fingerprint "$SEED_FP" --data-dir "$WORK/seed" \
        --clients 1 --rooms 0 --senders 0 --messages 0 --hold 0 --json >/dev/null 2>&1 || true
    kill "$SEED" 2>/dev/null || true
    sleep 1
    HASH=$(sqlite3 "$WORK/seed/conclave.db" "SELECT pw_hash FROM users WHERE name = 'bench0'")
    as_pg "$PG_BIN/psql" -h "$WORK/pgsock" -p "$PG_PORT" -U conclave -d postgres -q -c \
        "INSERT INTO users (name, pw_hash, admin, created_ms)
         SELECT 'bench' || i, '$HASH', false, 0 FROM generate_series(0, $((IDLE - 1))) AS i
         ON CONFLICT (name) DO NOTHING" >/dev/null
fi

start_node n1
run "one node" paced-100 "${NODE_ADDRS[@]}"
run "one node" fanout-100 "${NODE_ADDRS[@]}"
if [ "$IDLE" -gt 0 ]; then
    EXTRA=(--clients "$IDLE")
    run "one node" idle-10k "${NODE_ADDRS[@]}"
    EXTRA=()
fi
start_node n2
run "two nodes" paced-100 "${NODE_ADDRS[@]}"
run "two nodes" fanout-100 "${NODE_ADDRS[@]}"
stop_nodes

# PostgreSQL's own group commit, without the server: batches of 1, 10 and 100 messages from
# one connection (the store thread's), durable.
PG_APPEND=${PG_APPEND:-target/release/examples/pg_append}
if [ -x "$PG_APPEND" ]; then
    say "pg_append"
    # A database of its own: pg_append opens it with a key of its own.
    as_pg "$PG_BIN/psql" -h "$WORK/pgsock" -p "$PG_PORT" -U conclave -d postgres -q \
        -c "CREATE DATABASE pg_append" >/dev/null
    CONCLAVE_PG="host=$WORK/pgsock port=$PG_PORT user=conclave dbname=pg_append" "$PG_APPEND" \
        >"$WORK/pg_append.txt" 2>&1 || true
fi

{
    echo "# Cluster figures, $DATE"
    echo
    echo "\`bench/cluster.sh\` on $(nproc) CPUs ($(uname -m)), $(as_pg "$PG_BIN/postgres" --version), $(nats-server --version 2>&1 | head -1); nodes unpinned."
    echo
    echo "CPU columns: the whole run (connections and logins included), all nodes together, per acknowledged message (and for the nodes also per delivery); KiB/conn: node 1's memory per connection, one-node runs only."
    echo
    echo "| run | preset | durable msg/s | deliveries/s | latency p50 / p99 ms | socket p50 / p99 ms | nodes CPU µs/msg (/delivery) | PostgreSQL CPU µs/msg | NATS CPU µs/msg | KiB/conn | complete |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    jq -r '
      def r(x): if x == null then "–" else (x * 100 | round / 100 | tostring) end;
      def per(x): if .accepted > 0 then r(x * 1000000 / .accepted) else "–" end;
      "| \(.label) | \(.preset) | \(if .traffic_s != null and .traffic_s > 0 then r(.accepted / .traffic_s) else "–" end) | \(r(.deliveries_per_sec)) | \(r(.latency_ms.p50)) / \(r(.latency_ms.p99)) | \(r(.socket_latency_ms.p50)) / \(r(.socket_latency_ms.p99)) | \(per(.nodes_cpu_s)) (\(if .deliveries > 0 then r(.nodes_cpu_s * 1000000 / .deliveries) else "–" end)) | \(per(.pg_cpu_s)) | \(per(.nats_cpu_s)) | \(if .nodes == 1 then r(.server_rss_kib_per_conn) else "–" end) | \(.complete) |"
    ' "$RESULTS"
    echo
    echo "Two nodes, split by whether a delivery crossed nodes (the sender's and the receiver's connections on different nodes):"
    echo
    echo "| preset | same node p50 / p99 ms | across nodes p50 / p99 ms | same node, socket | across nodes, socket |"
    echo "|---|---|---|---|---|"
    jq -r '
      def r(x): if x == null then "–" else (x * 100 | round / 100 | tostring) end;
      select(.latency_by_node != null) | .latency_by_node as $s |
      "| \(.preset) | \(r($s.same_node_ms.p50)) / \(r($s.same_node_ms.p99)) | \(r($s.cross_node_ms.p50)) / \(r($s.cross_node_ms.p99)) | \(r($s.same_node_socket_ms.p50)) / \(r($s.same_node_socket_ms.p99)) | \(r($s.cross_node_socket_ms.p50)) / \(r($s.cross_node_socket_ms.p99)) |"
    ' "$RESULTS"
    if [ -s "$WORK/pg_append.txt" ]; then
        echo
        echo "\`pg_append\` (one connection, durable batches, no server):"
        echo
        echo '```'
        cat "$WORK/pg_append.txt"
        echo '```'
    fi
} | tee "$OUT"
say "written to $OUT"
