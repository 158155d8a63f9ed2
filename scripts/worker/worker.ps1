<#
.SYNOPSIS
    psbridge worker: one long-lived PowerShell session driven over line-delimited JSON on stdin/stdout.

.DESCRIPTION
    Started by psbridge as `pwsh -NoLogo -NoProfile -NonInteractive -File worker.ps1 -CacheDirectory DIR`.
    The protocol, the host and the object serializer live in host/*.cs beside this file (one file per
    concept); this script puts the process into a safe state, loads that code, and runs the request loop.

    Order matters: encodings and the stdio guard come before anything that could print, and the ready
    message is the first line the owner ever sees on stdout.
#>
[CmdletBinding()]
param(
    # Where the compiled host is cached between workers; empty compiles in memory every time.
    [string] $CacheDirectory = ''
)

Set-StrictMode -Version Latest
# A failure of the worker's own plumbing must end the process (the owner reports exit status and
# stderr); failures of user commands are handled inside the host and never reach this preference.
$ErrorActionPreference = 'Stop'

function Set-Utf8Everywhere {
    # Pitfall: non-ASCII text garbles when these disagree. UTF-8 without BOM, both directions.
    $utf8 = [System.Text.UTF8Encoding]::new($false)
    [Console]::InputEncoding = $utf8
    [Console]::OutputEncoding = $utf8
    $global:OutputEncoding = $utf8
    # stderr is read by people and logs: no ANSI colour codes around error text.
    $PSStyle.OutputRendering = 'PlainText'
}

function Clear-WorkerOnlySetting {
    <#
        psbridge turns .NET's tiered PGO off for its workers (see process_command in src/runspace/builder.rs). The
        runtime read it at start-up; removing it here keeps it from user commands and child processes.
    #>
    if ($env:PSBRIDGE_UNSET_TIERED_PGO -eq '1') {
        [Environment]::SetEnvironmentVariable('DOTNET_TieredPGO', $null)
        [Environment]::SetEnvironmentVariable('PSBRIDGE_UNSET_TIERED_PGO', $null)
    }
}

function Get-HostSource {
    <# The host's C# files, in a fixed order. #>
    [System.IO.Directory]::GetFiles((Join-Path $PSScriptRoot 'host'), '*.cs') | Sort-Object
}

function Get-HostBuildName {
    <#
        The cached DLL's name: the PowerShell version it was compiled against, then a hash of the sources.
        Two PowerShell versions sharing one cache keep a build each instead of deleting each other's.
    #>
    param([string[]] $Files)
    $text = [System.Text.StringBuilder]::new()
    foreach ($file in $Files) {
        [void]$text.Append([System.IO.Path]::GetFileName($file)).Append("`n").Append([System.IO.File]::ReadAllText($file))
    }
    $bytes = [System.Text.Encoding]::UTF8.GetBytes($text.ToString())
    $hash = [Convert]::ToHexString([System.Security.Cryptography.SHA256]::HashData($bytes)).Substring(0, 16)
    "PsBridgeHost-{0}-{1}.dll" -f $PSVersionTable.PSVersion, $hash
}

function Import-BridgeHost {
    <# Compiles host/*.cs, or loads the DLL an earlier worker compiled from the same sources. #>
    param([string] $CacheDirectory)
    if ('PsBridge.Protocol' -as [type]) { return }
    $files = @(Get-HostSource)
    if (-not $CacheDirectory) {
        Add-Type -Path $files
        return
    }
    $dll = Join-Path $CacheDirectory (Get-HostBuildName -Files $files)
    if (-not [System.IO.File]::Exists($dll)) {
        [void][System.IO.Directory]::CreateDirectory($CacheDirectory)
        # Compile to a private name, then rename: workers starting together never load a half-written DLL.
        $partial = "$dll.$PID.tmp"
        try {
            Add-Type -Path $files -OutputAssembly $partial -OutputType Library
            [System.IO.File]::Move($partial, $dll, $true)
        }
        finally {
            [System.IO.File]::Delete($partial) # no-op after the rename
        }
    }
    [void][System.Reflection.Assembly]::LoadFrom($dll)
    Remove-StaleHostBuild -CacheDirectory $CacheDirectory -Keep $dll
}

function Remove-StaleHostBuild {
    <#
        Deletes DLLs that older psbridge builds cached for this PowerShell version (and those named before
        builds carried the version); one still loaded elsewhere (Windows) is left.
    #>
    param([string] $CacheDirectory, [string] $Keep)
    $ours = [System.IO.Directory]::GetFiles($CacheDirectory, "PsBridgeHost-$($PSVersionTable.PSVersion)-*.dll")
    $unversioned = [System.IO.Directory]::GetFiles($CacheDirectory, 'PsBridgeHost-*.dll') |
        Where-Object { [System.IO.Path]::GetFileName($_) -match '^PsBridgeHost-[0-9A-F]{16}\.dll$' }
    foreach ($stale in @($ours) + @($unversioned)) {
        if ($stale -eq $Keep) { continue }
        try { [System.IO.File]::Delete($stale) } catch [System.IO.IOException], [System.UnauthorizedAccessException] { }
    }
}

function Invoke-RequestLoop {
    <#
        Runspace 0 runs its requests on this thread, one at a time; further runspaces (the owner's
        runspaces_per_worker) run theirs on threads of their own. Cancel and exit are handled by the
        host's inbox thread meanwhile. Returns once every runspace has finished after exit.
    #>
    [PsBridge.Lanes]::Run()
}

Clear-WorkerOnlySetting
Set-Utf8Everywhere
Import-BridgeHost -CacheDirectory $CacheDirectory
[PsBridge.Protocol]::Claim()
[PsBridge.Inbox]::Start()
[PsBridge.Executor]::SendReady()
try {
    Invoke-RequestLoop
}
finally {
    [PsBridge.Lanes]::Close()
}
exit 0
