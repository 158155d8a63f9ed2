<#
.SYNOPSIS
    Writes target/bench/config.json: the counts every comparator of scripts/bench.sh runs, the random
    existing mailboxes they all ask for (the same ones, in the same order), and the machine it ran on.
.PARAMETER Path
    The config file to write.
.PARAMETER Mailboxes
    The size of the tenant (ContosoUser1..N exist).
.PARAMETER Quick
    Smaller counts, same shape (scripts/bench.sh --quick).
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory)][string]$Path,
    [Parameter(Mandatory)][int]$Mailboxes,
    [switch]$Quick
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

# One-shot pwsh takes seconds per call, so it gets far fewer calls. The throttled batch is the issue's
# 2,000 items in both runs (against a budget of 100 calls per 5 s its lower bound is 100 s).
$throttledItems = 2000
if ($Quick) {
    $counts = [ordered]@{ warmup = 100; small = 200; writes = 100 }
    $oneshot = [ordered]@{ warmup = 1; small = 10; writes = 3 }
}
else {
    $counts = [ordered]@{ warmup = 200; small = 2000; writes = 1000 }
    $oneshot = [ordered]@{ warmup = 3; small = 30; writes = 15 }
}

# A fixed seed: every run, and every comparator, asks for the same mailboxes.
$random = [Random]::new(5)
$identities = [string[]]@(1..($counts.warmup + $counts.small) | ForEach-Object { 'ContosoUser{0}' -f $random.Next(1, $Mailboxes + 1) })

function Get-ProcFact([string]$File, [string]$Pattern) {
    $match = Select-String -LiteralPath $File -Pattern $Pattern | Select-Object -First 1
    if ($null -eq $match) { return 'unknown' }
    return $match.Matches[0].Groups[1].Value.Trim()
}

function Get-ToolVersion([string]$Name, [string[]]$Arguments) {
    if (-not (Get-Command -Name $Name -CommandType Application -ErrorAction Ignore)) { return 'not installed' }
    return (& $Name @Arguments | Select-Object -First 1).Trim()
}

$memoryKb = [double](Get-ProcFact '/proc/meminfo' '^MemTotal:\s+(\d+)')
$machine = [ordered]@{
    date      = [DateTime]::UtcNow.ToString('yyyy-MM-dd HH:mm') + ' UTC'
    cpu       = Get-ProcFact '/proc/cpuinfo' '^model name\s*:\s*(.+)$'
    cores     = [Environment]::ProcessorCount
    memory_gb = [Math]::Round($memoryKb / 1MB, 1)
    os        = [Runtime.InteropServices.RuntimeInformation]::OSDescription
    load_1m   = [double]((Get-Content -LiteralPath '/proc/loadavg' -Raw).Split(' ')[0])
    pwsh      = $PSVersionTable.PSVersion.ToString()
    dotnet    = Get-ToolVersion 'dotnet' @('--version')
    node      = Get-ToolVersion 'node' @('--version')
    rustc     = Get-ToolVersion 'rustc' @('--version')
}

$config = [ordered]@{
    quick      = [bool]$Quick
    run_id     = [DateTime]::UtcNow.ToString('yyyyMMddHHmmss')
    mailboxes  = $Mailboxes
    counts     = $counts
    oneshot    = $oneshot
    throttled_items = $throttledItems
    machine    = $machine
    identities = $identities
}
$config | ConvertTo-Json -Depth 4 | Set-Content -LiteralPath $Path -Encoding utf8NoBOM
