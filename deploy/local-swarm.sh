#!/usr/bin/env bash
# A local swarm of N shoal nodes on 127.0.0.1, each with its own home under .demo/.
#   NODES=4            how many nodes
#   BASE_PORT=4150     node i listens on BASE_PORT+i
#   DEMO_SECONDS=      stop by itself after this many seconds (default: until Ctrl-C)
#   TRAIN=diloco       training mode of every node (none: membership only)
#   DILOCO_H=20        DiLoCo inner steps per round (tiny model, default corpus)
#   SHOAL_ARGS=        extra flags for every `shoal start`
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${NODES:-4}
base=${BASE_PORT:-4150}
root=${DEMO_ROOT:-.demo}
shoal=.venv/bin/shoal
train=${TRAIN:-diloco}
train_args=()
if [ "$train" != none ]; then
    # one torch thread per node: several nodes share this machine's cores
    train_args=(--train "$train" --diloco-model tiny --diloco-inner-steps "${DILOCO_H:-20}"
        --diloco-threads 1)
fi
mkdir -p "$root"
pids=()

stop_all() {
    trap - INT TERM EXIT
    echo; echo "stopping the swarm (graceful leave)..."
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap stop_all INT TERM EXIT

start_node() {  # $1 = index, $2 = join address or empty
    local home="$root/node$1" log="$root/node$1.log"
    local args=(start --home "$home" --listen "/ip4/127.0.0.1/tcp/$((base + $1))"
        ${train_args[@]+"${train_args[@]}"} ${SHOAL_ARGS:-})
    [ -n "$2" ] && args+=(--join "$2")
    : >"$log"
    "$shoal" "${args[@]}" >"$log" 2>&1 &
    pids+=($!)
    for _ in $(seq 200); do
        grep -q '^ready$' "$log" && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || { echo "node$1 failed:"; cat "$log"; exit 1; }
        sleep 0.1
    done
    echo "node$1 did not become ready:"; cat "$log"; exit 1
}

start_node 0 ""
join=$(sed -n 's/^join with shoal start --join //p' "$root/node0.log" | head -1)
for i in $(seq 1 $((nodes - 1))); do start_node "$i" "$join"; done

for _ in $(seq 100); do
    size=$("$shoal" status --home "$root/node0" --json | sed -n 's/.*"swarm_size": \([0-9]*\).*/\1/p')
    [ "$size" = "$nodes" ] && break
    sleep 0.2
done
"$shoal" status --home "$root/node0"
cat <<MSG

$nodes nodes are running (logs in $root/node*.log). Watch them from another terminal:
    $shoal status --watch --home $root/node0
    $shoal peers  --home $root/node1
    $shoal status --home $root/node2 --json
Join this swarm from elsewhere on this machine:
    $shoal start --home /tmp/shoal-extra --listen /ip4/127.0.0.1/tcp/0 --join $join
Ctrl-C stops the swarm.
MSG
if [ "$train" = diloco ]; then
    cat <<MSG
The nodes train a tiny transformer with DiLoCo on Python's standard library: the "training"
lines of 'shoal status' show the round, the train and eval loss (it starts near 5 and falls
within a few minutes), tokens/s and the bytes each round sent. Per-round history:
    $shoal status --home $root/node0 --json
MSG
fi
if [ -n "${DEMO_SECONDS:-}" ]; then
    sleep "$DEMO_SECONDS"
else
    wait
fi
