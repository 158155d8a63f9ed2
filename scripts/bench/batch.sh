#!/usr/bin/env bash
# Batch throughput of `psbridge batch`: 1,000 Set-Mailbox items (CSV, keyed by Identity) against the
# simulated module with EXO_SIM_LATENCY_MS=50, at 1, 3 and 8 workers with the journal, and at 8 workers
# without it (the journal's overhead). Rates are psbridge's own summary figure (items/s from the moment
# the workers are connected), and every figure is also given as a ratio to the 1-worker run of the same
# script.
#
#   scripts/bench/batch.sh [ITEMS]        (default 1000)
#
# Writes target/bench/batch.md and prints it. Needs the README's set-up (pwsh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
items=${1:-1000}
export PATH="$PATH:$HOME/.dotnet/tools"
cargo build --release --quiet --bin psbridge
psbridge=$root/target/release/psbridge

out=$root/target/bench/batch
rm -rf "$out"
mkdir -p "$out/tmp"
export TMPDIR=$out/tmp XDG_DATA_HOME=$out/data EXO_SIM_TENANT=$out/tenant EXO_SIM_LATENCY_MS=50
unset EXO_SIM_THROTTLE_RATE EXO_SIM_TOKEN_LIFETIME_S EXO_SIM_CRASH_ON EXO_SIM_HANG_ON EXO_SIM_NOISE PSBRIDGE_CONFIG PSBRIDGE_PROFILE

# The simulated tenant seeds 200 mailboxes on first connect: each gets items/200 changes, in order.
{
  echo "Identity,Office,CustomAttribute1"
  for ((i = 0; i < items; i++)); do
    echo "ContosoUser$((i % 200 + 1)),Office $((i / 200)),batch-$i"
  done
} >"$out/items.csv"
"$psbridge" run --simulated Get-Date >/dev/null # seeds the tenant and installs the module

rate() { # label workers journal(yes|no)
  local label=$1 workers=$2 journal=$3 args=()
  [ "$journal" = no ] && args=(--no-journal)
  rm -f "$out/results.jsonl" "$out/results.jsonl.journal"
  "$psbridge" batch --simulated --command Set-Mailbox --key-column Identity "$out/items.csv" \
    --workers "$workers" --output "$out/results.jsonl" "${args[@]}" --progress-interval 3600 2>"$out/$label.log" || {
    cat "$out/$label.log" >&2
    exit 1
  }
  local summary
  summary=$(tail -n 1 "$out/$label.log")
  echo "$summary" >&2
  [[ $summary == *"$items succeeded, 0 failed"* ]] || { echo "bench: not every item succeeded" >&2; exit 1; }
  sed -E 's/.*\(([0-9.]+) items\/s\).*/\1/' <<<"$summary"
}

one=$(rate w1 1 yes)
three=$(rate w3 3 yes)
eight=$(rate w8 8 yes)
eight_plain=$(rate w8-nojournal 8 no)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

{
  echo "# psbridge batch: $items × Set-Mailbox, EXO_SIM_LATENCY_MS=50 ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores)"
  echo
  echo "| workers | journal | items/s | ratio to 1 worker |"
  echo "|---|---|---|---|"
  echo "| 1 | yes | $one | 1.00 |"
  echo "| 3 | yes | $three | $(ratio "$three" "$one") |"
  echo "| 8 | yes | $eight | $(ratio "$eight" "$one") |"
  echo "| 8 | no | $eight_plain | $(ratio "$eight_plain" "$one") |"
  echo
  echo "Journal overhead at 8 workers: with / without = $(ratio "$eight" "$eight_plain")."
} | tee "$out/../batch.md"
rm -rf "$out/tmp"
