#!/usr/bin/env bash
# Throughput of `psbridge batch --queue`: 1,000 keyed Set-Mailbox items (200 mailboxes, 5 changes each,
# in order) against the simulated module with EXO_SIM_LATENCY_MS=100, through one nats-server (loopback,
# JetStream, a temporary store) and 1, 2 and 3 `psbridge serve --queue` hosts of WORKERS workers each
# (default 2), all on this machine; and the same items as a local `psbridge batch` on one host with
# the same workers, for the queue's added cost per item (and both again without the latency, where that
# cost is not hidden by the service's). Rates are psbridge's own summary figure
# (items/s from the moment the items are published, or the workers are connected).
#
#   scripts/bench/queue.sh [ITEMS] [WORKERS]      (default 1000 2)
#
# Writes target/bench/queue.md and prints it. Needs the README's set-up (pwsh) and nats-server.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
items=${1:-1000}
workers=${2:-2}
export PATH="$PATH:$HOME/.dotnet/tools:/usr/sbin"
command -v nats-server >/dev/null || { echo "bench: needs nats-server (apt-get install -y nats-server)" >&2; exit 1; }
cargo build --release --quiet --bin psbridge
psbridge=$root/target/release/psbridge

out=$root/target/bench/queue
rm -rf "$out"
mkdir -p "$out/tmp"
export TMPDIR=$out/tmp XDG_DATA_HOME=$out/data XDG_RUNTIME_DIR=$out EXO_SIM_TENANT=$out/tenant EXO_SIM_LATENCY_MS=100
unset EXO_SIM_THROTTLE_RATE EXO_SIM_TOKEN_LIFETIME_S EXO_SIM_CRASH_ON EXO_SIM_HANG_ON EXO_SIM_NOISE PSBRIDGE_CONFIG PSBRIDGE_PROFILE

# The simulated tenant seeds 200 mailboxes on first connect: each gets items/200 changes, in order.
for ((i = 0; i < items; i++)); do
  mailbox=ContosoUser$((i % 200 + 1))
  echo "{\"command\": \"Set-Mailbox\", \"parameters\": {\"Identity\": \"$mailbox\", \"Office\": \"Office $((i / 200))\"}, \"key\": \"$mailbox\"}"
done >"$out/items.jsonl"
"$psbridge" run --simulated Get-Date >/dev/null # seeds the tenant and installs the module

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nats-server -js -a 127.0.0.1 -p "$port" -sd "$out/nats" >"$out/nats.log" 2>&1 &
pids+=($!)
url=nats://127.0.0.1:$port
until grep -q "Server is ready" "$out/nats.log"; do sleep 0.1; done

host() { # n: starts host n and waits until it pulls (a host whose workers fail to start exits: again)
  local n=$1 try pid
  for try in 1 2 3; do
    EXO_SIM_LATENCY_MS=$latency "$psbridge" serve --simulated --queue "$url" --workers "$workers" --min-workers "$workers" \
      --listen "unix:$out/host$n.sock" --audit "$out/host$n.audit" 2>"$out/host$n.log" &
    pid=$!
    pids+=("$pid")
    until grep -q "serve: ready" "$out/host$n.log" && grep -q "pulling queued items" "$out/host$n.log"; do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    grep -q "serve: ready" "$out/host$n.log" && return
    echo "bench: host $n did not start (try $try): $(tail -n 2 "$out/host$n.log")" >&2
  done
  exit 1
}

summary_rate() { # log: the items/s of its summary line, after checking every item succeeded
  local summary
  summary=$(grep "succeeded, " "$1" | tail -n 1)
  echo "$summary" >&2
  [[ $summary == *"$items succeeded, 0 failed"* ]] || { echo "bench: not every item succeeded" >&2; cat "$1" >&2; exit 1; }
  sed -E 's/.*\(([0-9.]+) items\/s\).*/\1/' <<<"$summary"
}

queued() { # label: one batch through the queue
  local label=$1
  "$psbridge" batch --simulated --queue "$url" --batch-id "bench-$label" "$out/items.jsonl" \
    --output "$out/$label.jsonl" --progress-interval 3600 2>"$out/$label.log"
  summary_rate "$out/$label.log"
}

local_batch() { # label: the same items as a local batch on this host
  EXO_SIM_LATENCY_MS=$latency "$psbridge" batch --simulated "$out/items.jsonl" --workers "$workers" --output "$out/$1.jsonl" \
    --progress-interval 3600 2>"$out/$1.log"
  summary_rate "$out/$1.log"
}

latency=100
local_rate=$(local_batch local)
host 1
one=$(queued hosts1)
host 2
two=$(queued hosts2)
host 3
three=$(queued hosts3)
# Without service latency the queue's own cost per item shows: one fresh host, then the local batch.
cleanup
pids=()
nats-server -js -a 127.0.0.1 -p "$port" -sd "$out/nats" >"$out/nats.log" 2>&1 &
pids+=($!)
until grep -q "Server is ready" "$out/nats.log"; do sleep 0.1; done
latency=0
host 4
bare_one=$(queued hosts1-latency0)
bare_local=$(local_batch local-latency0)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# The time an item holds a worker: workers / rate; the queue's added cost is the difference.
added() { awk -v w="$workers" -v q="$1" -v l="$2" 'BEGIN { printf "%.1f", 1000 * w / q - 1000 * w / l }'; }
added_ms=$(added "$one" "$local_rate")
bare_added_ms=$(added "$bare_one" "$bare_local")

{
  echo "# psbridge batch --queue: $items keyed Set-Mailbox items, EXO_SIM_LATENCY_MS=100, $workers workers per host ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(nats-server --version))"
  echo
  echo "| run | items/s | ratio to 1 host |"
  echo "|---|---|---|"
  echo "| local batch, 1 host | $local_rate | $(ratio "$local_rate" "$one") |"
  echo "| queue, 1 host | $one | 1.00 |"
  echo "| queue, 2 hosts | $two | $(ratio "$two" "$one") |"
  echo "| queue, 3 hosts | $three | $(ratio "$three" "$one") |"
  echo
  echo "Queue on 1 host / local batch on 1 host: $(ratio "$one" "$local_rate") (items/s); the queue adds $added_ms ms per item"
  echo "(the time an item holds a worker, $workers / items/s, minus the local batch's)."
  echo
  echo "Without service latency (EXO_SIM_LATENCY_MS=0, 1 host): queue $bare_one items/s, local batch $bare_local items/s,"
  echo "ratio $(ratio "$bare_one" "$bare_local"); the queue adds $bare_added_ms ms per item."
  echo
  echo "All hosts, the nats-server and the submitter share this machine's $(nproc) cores."
} | tee "$out/../queue.md"
rm -rf "$out/tmp"
