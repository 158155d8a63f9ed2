#!/usr/bin/env bash
# One-time set-up of a machine for psbridge (safe to run again):
#   - cargo builds from ../shared/vendor when that offline crate set exists beside the checkout;
#   - PowerShell 7.6.9 is installed as a dotnet global tool when no pwsh is found.
# psbridge finds ~/.dotnet/tools/pwsh by itself; add that folder to PATH to use pwsh by hand.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -f "$root/../shared/cargo-offline.sh" ]; then
  sh "$root/../shared/cargo-offline.sh"
fi
export PATH="$PATH:$HOME/.dotnet/tools"
if ! command -v pwsh >/dev/null 2>&1; then
  command -v dotnet >/dev/null 2>&1 || { echo "setup: neither pwsh nor the .NET SDK (dotnet) is installed; install one of them first" >&2; exit 1; }
  dotnet tool install --global PowerShell --version 7.6.9
fi
echo "setup: $(pwsh -NoLogo -NoProfile -NonInteractive -Command '"pwsh $($PSVersionTable.PSVersion)"') is ready"
