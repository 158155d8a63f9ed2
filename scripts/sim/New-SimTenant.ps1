<#
.SYNOPSIS
    Creates (or re-creates) a simulated Exchange Online tenant for the psbridge tests.
.DESCRIPTION
    Writes a tenant folder with -Mailboxes sample mailboxes ContosoUser1..N, deterministically (the
    same GUIDs, names and attributes on every machine). Any previous tenant in the folder (its
    mailboxes, names, soft-deleted mailboxes and audit log) is replaced. Uses the same code as the
    module's automatic seeding (ExchangeOnlineManagement/Private/SimStore.ps1), under the same lock,
    so it is safe while other processes use the folder (they see the old or the new tenant).
.PARAMETER Path
    The tenant folder; point EXO_SIM_TENANT at it.
.PARAMETER Mailboxes
    How many mailboxes (default 200).
.PARAMETER AppId
    Application ids registered in the tenant in addition to 11111111-2222-3333-4444-555555555555.
.EXAMPLE
    ./New-SimTenant.ps1 -Path /tmp/tenant -Mailboxes 50000
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory)]
    [string]$Path,
    [ValidateRange(0, 10000000)]
    [int]$Mailboxes = 200,
    [string[]]$AppId = @()
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

. ([IO.Path]::Combine($PSScriptRoot, 'ExchangeOnlineManagement', 'Private', 'SimStore.ps1'))

$fullPath = $PSCmdlet.GetUnresolvedProviderPathFromPSPath($Path)
$clock = [Diagnostics.Stopwatch]::StartNew()
$null = Initialize-SimTenant -Path $fullPath -Mailboxes $Mailboxes -ExtraAppId $AppId -Force
$clock.Stop()
Write-Information -MessageData ('Seeded {0} mailboxes in {1} ({2:N1} s)' -f $Mailboxes, $fullPath, $clock.Elapsed.TotalSeconds) -InformationAction Continue
