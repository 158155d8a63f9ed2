#!/usr/bin/env bash
# Benchmarks psbridge against the alternatives, side by side in one run on this machine, against the
# simulated ExchangeOnlineManagement module (scripts/sim) with no simulated latency:
#   in-process C# (Microsoft's Samples 1 and 2 on Microsoft.PowerShell.SDK)  scripts/bench/csharp
#   psbridge (Runspace; RunspacePool of 3 x 1, 1 x 3, 2 x 2 runspaces)        crates/bench/examples/bench_psbridge.rs
#   node-powershell (its persistent shell, JSON via ConvertTo-Json)          scripts/bench/node
#   one-shot pwsh (a new pwsh -Command per cmdlet)                           crates/bench/examples/bench_oneshot.rs
#
# and a throttled batch of 2,000 Set-Mailbox under the tenant budget EXO_SIM_BUDGET=100/5s with 200 ms of
# service latency, psbridge's pool (2 x 4 runspaces) at fixed concurrency 8 and adaptive  bench_throttled.rs
#
#   scripts/bench.sh           full run: 2,000 small calls, 1,000 writes, 50,000 mailboxes
#   scripts/bench.sh --quick   same shape, smaller counts (200, 100, 5,000); the throttled batch is the same
#
# Builds what it needs (dotnet restore/build, npm ci, cargo build --release --examples), then writes
# target/bench/summary.json, target/bench/summary.md and target/bench/summary.svg. Needs the README's
# set-up (scripts/setup.sh), the .NET SDK and Node.js with npm; NuGet and npm must be reachable the
# first time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

quick=()
case "${1:-}" in
  --quick) quick=(-Quick) mailboxes=5000 ;;
  "") mailboxes=50000 ;;
  *) echo "usage: scripts/bench.sh [--quick]" >&2; exit 2 ;;
esac

export PATH="$PATH:$HOME/.dotnet/tools"
for tool in pwsh dotnet node npm cargo; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is not installed (see README and scripts/setup.sh)" >&2; exit 3; }
done
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 POWERSHELL_TELEMETRY_OPTOUT=1 POWERSHELL_UPDATECHECK=Off

out=$root/target/bench
bench=$root/scripts/bench
mkdir -p "$out"
step() { printf '\n== %s (%d s)\n' "$*" "$SECONDS" >&2; }

step "building the comparators"
dotnet build "$bench/csharp/PsBench.csproj" -c Release --nologo -v quiet -p:RestoreLockedMode=true >&2
# npm ci starts from scratch every time: skip it while node_modules was installed from this lockfile.
if ! cmp -s "$bench/node/package-lock.json" "$bench/node/node_modules/.bench-lock"; then
  (cd "$bench/node" && npm ci --no-audit --no-fund --loglevel=error >&2)
  cp "$bench/node/package-lock.json" "$bench/node/node_modules/.bench-lock"
fi
cargo build --release --examples --quiet

# The large tenant takes a while to seed (about 20 s for 50,000 mailboxes), so it is kept between
# runs; the writes only change CustomAttribute1 of some mailboxes.
tenant=$out/tenant-$mailboxes
if [ ! -f "$tenant/.complete" ]; then
  step "seeding a tenant of $mailboxes mailboxes"
  rm -rf "$tenant"
  pwsh -NoLogo -NoProfile -NonInteractive -File scripts/sim/New-SimTenant.ps1 -Path "$tenant" -Mailboxes "$mailboxes" >&2
  touch "$tenant/.complete"
fi
pwsh -NoLogo -NoProfile -NonInteractive -File "$bench/New-BenchConfig.ps1" -Path "$out/config.json" -Mailboxes "$mailboxes" "${quick[@]}"

# Every comparator gets the same module, tenant and settings from the environment. Connects leave a
# tmpEXO_ folder in the temp folder when a process ends without Disconnect (one-shot, killed shells):
# keep those out of /tmp.
export PSModulePath=$root/scripts/sim EXO_SIM_TENANT=$tenant EXO_SIM_LATENCY_MS=0 EXO_SIM_CONNECT_DELAY_MS=0
unset EXO_SIM_THROTTLE_RATE EXO_SIM_TOKEN_LIFETIME_S EXO_SIM_CRASH_ON EXO_SIM_HANG_ON EXO_SIM_NOISE
rm -rf "$out/raw" "$out/tmp"
mkdir -p "$out/raw" "$out/tmp"
export TMPDIR=$out/tmp

examples=$root/target/release/examples
run() { # comparator phase command...
  local name=$1 phase=$2
  shift 2
  step "$name: $phase"
  "$@" "$phase" "$out/config.json" "$out/raw/$name-$phase.json"
}
# Phase by phase, every comparator in turn, so that a change in the machine's load hits them alike.
# Each phase is a process of its own: cold start-up, and a peak memory of its own.
for phase in single parallel large; do
  run csharp "$phase" dotnet "$bench/csharp/bin/Release/net10.0/PsBench.dll"
  run psbridge "$phase" "$examples/bench_psbridge"
  if [ "$phase" = parallel ]; then
    # The same three lanes on one process of three runspaces, and on two of two.
    run psbridge parallel-1x3 "$examples/bench_psbridge"
    run psbridge parallel-2x2 "$examples/bench_psbridge"
  fi
  run node "$phase" node "$bench/node/bench.js"
  run oneshot "$phase" "$examples/bench_oneshot"
done

# The throttled batch: a tenant of its own (200 mailboxes, seeded on first connect), whose budget every
# worker process shares; the service answers each call after 200 ms (an assumption: a REST cmdlet's
# round trip to the real service takes a few hundred ms; at 50 ms the best concurrency is about 1, too
# coarse a unit for any concurrency limit to track a rate budget).
(
  export EXO_SIM_TENANT=$out/tenant-throttled EXO_SIM_BUDGET=100/5s EXO_SIM_LATENCY_MS=200
  rm -rf "$EXO_SIM_TENANT"
  for mode in fixed adaptive; do
    run psbridge-throttled "$mode" "$examples/bench_throttled"
  done
)
rm -rf "$out/tmp"

step "report"
"$examples/bench_report" "$out"
"$examples/bench_chart" "$out" >/dev/null
echo "wrote $out/summary.json, $out/summary.md and $out/summary.svg in $SECONDS s" >&2
