#!/usr/bin/env bash
# What `psbridge serve` buys a CI job, and what it costs a command, on the simulated module with a
# 3 s connect (EXO_SIM_CONNECT_DELAY_MS=3000):
#
#  1. a 10-step CI job, each step one `Get-Mailbox`: its wall time with local `psbridge run` (a worker
#     started and connected per step) and with `psbridge run --server` (the server started as step 0,
#     stopped at the end, both counted);
#  2. the latency the server adds per command: the same sequential Get-Mailbox calls through an
#     in-process RunspacePool and through the server's API (crates/bench/examples/bench_serve.rs); p50
#     and p99 ratios.
#
#   scripts/bench/serve.sh [CALLS]        (default 2000 measured calls, after CALLS/2 warm-up calls)
#
# Writes target/bench/serve.md (and serve.json) and scripts/bench/results/serve.md, and prints it. Needs
# the README's set-up (pwsh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
calls=${1:-2000}
steps=10
export PATH="$PATH:$HOME/.dotnet/tools"
cargo build --release --quiet --bin psbridge --example bench_serve
psbridge=$root/target/release/psbridge
bench_serve=$root/target/release/examples/bench_serve

out=$root/target/bench/serve
rm -rf "$out"
mkdir -p "$out/tmp"
export TMPDIR=$out/tmp XDG_DATA_HOME=$out/data XDG_STATE_HOME=$out/state EXO_SIM_TENANT=$out/tenant
unset EXO_SIM_LATENCY_MS EXO_SIM_THROTTLE_RATE EXO_SIM_TOKEN_LIFETIME_S EXO_SIM_CRASH_ON EXO_SIM_HANG_ON EXO_SIM_NOISE PSBRIDGE_CONFIG PSBRIDGE_PROFILE PSBRIDGE_SERVER
"$psbridge" run --simulated Get-Date >/dev/null # seeds the tenant and installs the module
export EXO_SIM_CONNECT_DELAY_MS=3000
socket=$out/psbridge.sock

now() { date +%s.%N; }
step() { # the CI step: one Get-Mailbox, its output checked
  "$psbridge" run "$@" --simulated Get-Mailbox --params "{\"Identity\": \"ContosoUser$i\"}" --select Alias --format jsonl >"$out/step.out"
  grep -q "\"ContosoUser$i\"" "$out/step.out"
}

# 1a. local run: every step starts, imports, connects and disconnects a worker
start=$(now)
for ((i = 1; i <= steps; i++)); do step; done
local_s=$(awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')

# 1b. run --server: step 0 starts the server and waits until it is healthy; the last stops it
start=$(now)
: >"$out/serve.log"
"$psbridge" serve --simulated --listen "unix:$socket" --audit "$out/audit.jsonl" 2>"$out/serve.log" &
server=$!
until grep -q "psbridge serve: ready" "$out/serve.log"; do
  kill -0 "$server" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 0.05
done
ready=$(now)
for ((i = 1; i <= steps; i++)); do step --server "unix:$socket"; done
steps_done=$(now)
kill -TERM "$server"
wait "$server"
stopped=$(now)
server_s=$(awk -v a="$start" -v b="$stopped" 'BEGIN { printf "%.2f", b - a }')
server_steps_s=$(awk -v a="$ready" -v b="$steps_done" 'BEGIN { printf "%.2f", b - a }')
server_start_s=$(awk -v a="$start" -v b="$ready" 'BEGIN { printf "%.2f", b - a }')

# 2. added latency per command: the server against the in-process pool, in alternating blocks (the
#    server restarted, so that its worker is as fresh as the pool's)
: >"$out/serve-latency.log"
"$psbridge" serve --simulated --listen "unix:$socket" --audit /dev/null 2>"$out/serve-latency.log" &
server=$!
until grep -q "psbridge serve: ready" "$out/serve-latency.log"; do
  kill -0 "$server" 2>/dev/null || { cat "$out/serve-latency.log" >&2; exit 1; }
  sleep 0.05
done
"$bench_serve" "$socket" "$EXO_SIM_TENANT" "$calls" "$out/latency.json" >/dev/null
kill -TERM "$server"
wait "$server"

figure() { sed -nE "/\"$1\"/,/\}/ s/.*\"$2\": ([0-9.e+-]+).*/\1/p" "$out/latency.json" | head -n 1 | xargs printf "%.3f"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
pool_p50=$(figure in_process_pool p50_ms)
pool_p99=$(figure in_process_pool p99_ms)
server_p50=$(figure server p50_ms)
server_p99=$(figure server p99_ms)

{
  echo "# psbridge serve: a $steps-step CI job and the added latency per command ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores)"
  echo
  echo "Simulated module, EXO_SIM_CONNECT_DELAY_MS=3000; each step is one \`psbridge run ... Get-Mailbox\`."
  echo
  echo "| $steps-step CI job | wall s | per step s |"
  echo "|---|---|---|"
  echo "| local \`run\` (a worker per step) | $local_s | $(awk -v a="$local_s" -v n="$steps" 'BEGIN { printf "%.2f", a / n }') |"
  echo "| \`run --server\`, server start and stop included | $server_s | $(awk -v a="$server_steps_s" -v n="$steps" 'BEGIN { printf "%.3f", a / n }') |"
  echo
  echo "Local / server wall time: **$(ratio "$local_s" "$server_s")×** (the server's start-up, $server_start_s s, is paid once; the steps alone took $server_steps_s s)."
  echo
  echo "| $calls sequential Get-Mailbox (after $((calls / 2)) warm-up each; 20 alternating blocks) | p50 ms | p99 ms |"
  echo "|---|---|---|"
  echo "| in-process RunspacePool (1 worker) | $pool_p50 | $pool_p99 |"
  echo "| server: POST /v1/profiles/simulated/invoke (keep-alive, unix socket) | $server_p50 | $server_p99 |"
  echo
  echo "Server / in-process latency: p50 **$(ratio "$server_p50" "$pool_p50")×**, p99 **$(ratio "$server_p99" "$pool_p99")×** (server minus in-process at the median: $(awk -v a="$server_p50" -v b="$pool_p50" 'BEGIN { printf "%+.2f", a - b }') ms; the server adds HTTP over the socket and JSON both ways)."
} | tee "$out/../serve.md"
cp "$out/latency.json" "$out/../serve.json"
# the repository keeps the last run's report
cp "$out/../serve.md" "$root/scripts/bench/results/serve.md"
rm -rf "$out/tmp"
