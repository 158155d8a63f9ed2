# SimFaults.ps1 - error shapes and fault injection of the ExchangeOnlineManagement SIMULATION.
#
# Every variable below is read at call time (never cached at import), so a test can change it
# between two commands of one long-lived worker.
#   EXO_SIM_LATENCY_MS        added to every REST-backed call (Start-Sleep, so it is stoppable).
#   EXO_SIM_THROTTLE_RATE     0..1: that share of calls (random) ends throttled (HTTP 429).
#   EXO_SIM_TOKEN_LIFETIME_S  seconds after Connect-ExchangeOnline when calls fail with HTTP 401.
#   EXO_SIM_CRASH_ON          identity (alias etc., case-insensitive): looking it up exits the process (134).
#   EXO_SIM_HANG_ON           identity: looking it up blocks the thread forever (PowerShell.Stop() cannot end it).
#   EXO_SIM_NOISE             1: stray console writes inside every call; 2: also a native child that
#                             writes straight to the inherited stdout/stderr file descriptors.
#
# Error shapes (what a caller sees in $_ / $Error[0]) - the bridge classifies on these:
#   not connected   terminating; InvalidOperationException
#                   'You must call Connect-ExchangeOnline before calling any other cmdlet.'
#                   CategoryInfo 'InvalidOperation: (:) [<Cmdlet>], InvalidOperationException'
#                   FullyQualifiedErrorId 'NotConnected,<Cmdlet>'
#   REST failure    terminating; CategoryInfo 'ProtocolError: (:) [<Cmdlet>], RestClientException'
#                   FullyQualifiedErrorId 'An error occurred while processing this request.,<Cmdlet>'
#                   Exception.Data['HttpStatusCode'] = 401 | 429; for 429 also Data['RetryAfterSeconds'].
#     401 expired   'Error while querying REST service. HttpStatusCode=401 ErrorMessage={"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}'
#     429 throttled the raw JSON body of the server's answer:
#                   '{"error":{"code":"TooManyRequests","message":"Rate limit exceeded. Retry after 2 seconds."}}'
#                   preceded by five Verbose records 'The current request is throttled at the server,
#                   waiting for <2000*2^n> milliseconds' (n = 0..4; the simulation waits 1 ms each) and
#                   the Warning 'Maximum retry count reached.'.
#   server errors   message 'stringId|Class|Text' (as Exchange sends them), CategoryInfo
#                   'NotSpecified: (<identity>:String) [<Activity>], <short class name>'.
#     not found / ambiguous: NON-terminating, FullyQualifiedErrorId
#                   '[Server=<s>,RequestId=<guid>,TimeStamp=<RFC 1123 date>],Write-ErrorMessage'
#     duplicate New-Mailbox: terminating, FullyQualifiedErrorId '[Server=...,RequestId=...,TimeStamp=...],New-Mailbox'

Set-StrictMode -Version Latest
# No $ErrorActionPreference here: this file is dot-sourced into the module's script scope (see
# SimStore.ps1); functions that must fail fast set it locally.

$script:SimInvariant = [Globalization.CultureInfo]::InvariantCulture
$script:SimNotConnectedMessage = 'You must call Connect-ExchangeOnline before calling any other cmdlet.'
$script:SimThrottleBody = '{"error":{"code":"TooManyRequests","message":"Rate limit exceeded. Retry after 2 seconds."}}'
$script:SimExpiredTokenMessage = 'Error while querying REST service. HttpStatusCode=401 ErrorMessage={"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}'

function Get-SimEnvNumber {
    <# Numeric value of environment variable $Name (invariant culture), or $Default when unset/invalid. #>
    [CmdletBinding()]
    [OutputType([double])]
    param([Parameter(Mandatory)][string]$Name, [double]$Default = 0)
    $raw = [Environment]::GetEnvironmentVariable($Name)
    if ([string]::IsNullOrWhiteSpace($raw)) { return $Default }
    $value = 0.0
    if ([double]::TryParse($raw.Trim(), [Globalization.NumberStyles]::Float, $script:SimInvariant, [ref]$value)) { return $value }
    return $Default
}

function New-SimErrorRecord {
    <# An ErrorRecord with the category reason / activity overridden (no custom exception types needed). #>
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param(
        [Parameter(Mandatory)][Exception]$Exception,
        [Parameter(Mandatory)][string]$ErrorId,
        [Parameter(Mandatory)][Management.Automation.ErrorCategory]$Category,
        [string]$Reason,
        [string]$Activity,
        [object]$TargetObject
    )
    $record = [Management.Automation.ErrorRecord]::new($Exception, $ErrorId, $Category, $TargetObject)
    if ($Reason) { $record.CategoryInfo.Reason = $Reason }
    if ($Activity) { $record.CategoryInfo.Activity = $Activity }
    return $record
}

function Get-SimServerErrorId {
    <# '[Server=<s>,RequestId=<guid>,TimeStamp=<http date>]', the id Exchange gives server-side errors. #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)]$TenantInfo)
    return '[Server={0},RequestId={1},TimeStamp={2}]' -f $TenantInfo.Server, [Guid]::NewGuid(), [DateTime]::UtcNow.ToString('r', $script:SimInvariant)
}

function New-SimServerError {
    <# A server-side Exchange error: message 'stringId|Class|Text', category NotSpecified. #>
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param(
        [Parameter(Mandatory)]$TenantInfo,
        [Parameter(Mandatory)][string]$StringId,
        [Parameter(Mandatory)][string]$Class,
        [Parameter(Mandatory)][string]$Text,
        [string]$Activity,
        [object]$TargetObject
    )
    $exception = [Exception]::new(('{0}|{1}|{2}' -f $StringId, $Class, $Text))
    $reason = $Class.Substring($Class.LastIndexOf('.') + 1)
    return New-SimErrorRecord -Exception $exception -ErrorId (Get-SimServerErrorId -TenantInfo $TenantInfo) `
        -Category NotSpecified -Reason $reason -Activity $Activity -TargetObject $TargetObject
}

function New-SimNotFoundError {
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param([Parameter(Mandatory)]$TenantInfo, [Parameter(Mandatory)][string]$Identity, [string]$Activity = 'Get-Recipient')
    $text = "The operation couldn't be performed because object '{0}' couldn't be found on '{1}'." -f $Identity, $TenantInfo.DomainController
    return New-SimServerError -TenantInfo $TenantInfo -StringId 'Ex6F9304' -Class 'Microsoft.Exchange.Configuration.Tasks.ManagementObjectNotFoundException' `
        -Text $text -Activity $Activity -TargetObject $Identity
}

function New-SimAmbiguousError {
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param([Parameter(Mandatory)]$TenantInfo, [Parameter(Mandatory)][string]$Identity, [string]$Activity = 'Get-Recipient')
    $text = "The operation couldn't be performed because '{0}' matches multiple entries." -f $Identity
    return New-SimServerError -TenantInfo $TenantInfo -StringId 'Ex0E4E5B' -Class 'Microsoft.Exchange.Configuration.Tasks.ManagementObjectAmbiguousException' `
        -Text $text -Activity $Activity -TargetObject $Identity
}

function Write-ErrorMessage {
    <#
        Writes a non-terminating server error. Named like the real module's helper on purpose: errors
        written from here get a FullyQualifiedErrorId ending in ',Write-ErrorMessage', as in real
        Exchange Online output. It inherits the caller's $ErrorActionPreference (so -ErrorAction Stop
        on the public command still makes the error terminating).
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][Management.Automation.ErrorRecord]$ErrorRecord)
    $PSCmdlet.WriteError($ErrorRecord)
}

function New-SimNotConnectedError {
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param()
    return New-SimErrorRecord -Exception ([InvalidOperationException]::new($script:SimNotConnectedMessage)) `
        -ErrorId 'NotConnected' -Category InvalidOperation
}

function New-SimRestError {
    <# An HTTP failure of the REST endpoint (ProtocolError / RestClientException). #>
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param([Parameter(Mandatory)][string]$Message, [Parameter(Mandatory)][int]$StatusCode, [int]$RetryAfterSeconds = 0)
    $exception = [Exception]::new($Message)
    $exception.Data['HttpStatusCode'] = $StatusCode
    if ($RetryAfterSeconds -gt 0) { $exception.Data['RetryAfterSeconds'] = $RetryAfterSeconds }
    return New-SimErrorRecord -Exception $exception -ErrorId 'An error occurred while processing this request.' `
        -Category ProtocolError -Reason 'RestClientException'
}

function Invoke-SimLatency {
    <# Sleeps EXO_SIM_LATENCY_MS (stoppable). #>
    [CmdletBinding()]
    param()
    $milliseconds = Get-SimEnvNumber -Name 'EXO_SIM_LATENCY_MS'
    if ($milliseconds -gt 0) { Start-Sleep -Milliseconds ([int][Math]::Ceiling($milliseconds)) }
}

function Test-SimThrottled {
    <# True for the share EXO_SIM_THROTTLE_RATE of calls. #>
    [CmdletBinding()]
    [OutputType([bool])]
    param()
    $rate = Get-SimEnvNumber -Name 'EXO_SIM_THROTTLE_RATE'
    if ($rate -le 0) { return $false }
    return ([Random]::Shared.NextDouble() -lt $rate)
}

function Invoke-SimThrottleFailure {
    <#
        What a call that stays throttled looks like: the real generated cmdlets retry (6 attempts,
        2000 ms x 2^retry) writing a Verbose line per wait, then give up with 'Maximum retry count
        reached.' and the server's raw 429 body. The simulation prints the real wait times but waits
        1 ms each, so tests stay fast.
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][Management.Automation.PSCmdlet]$Cmdlet)
    for ($retry = 0; $retry -lt 5; $retry++) {
        Write-Verbose ('The current request is throttled at the server, waiting for {0} milliseconds' -f (2000 * [Math]::Pow(2, $retry)))
        Start-Sleep -Milliseconds 1
    }
    Write-Warning 'Maximum retry count reached.'
    $Cmdlet.ThrowTerminatingError((New-SimRestError -Message $script:SimThrottleBody -StatusCode 429 -RetryAfterSeconds 2))
}

function Invoke-SimLookupFault {
    <# EXO_SIM_CRASH_ON / EXO_SIM_HANG_ON: called with each identity a command is about to look up. #>
    [CmdletBinding()]
    param([AllowEmptyCollection()][AllowNull()][string[]]$Identity)
    $crashOn = [Environment]::GetEnvironmentVariable('EXO_SIM_CRASH_ON')
    $hangOn = [Environment]::GetEnvironmentVariable('EXO_SIM_HANG_ON')
    if ([string]::IsNullOrWhiteSpace($crashOn) -and [string]::IsNullOrWhiteSpace($hangOn)) { return }
    foreach ($id in $Identity) {
        if ([string]::IsNullOrWhiteSpace($id)) { continue }
        $id = $id.Trim()
        if (-not [string]::IsNullOrWhiteSpace($crashOn) -and [string]::Equals($id, $crashOn.Trim(), [StringComparison]::OrdinalIgnoreCase)) {
            [Console]::Error.WriteLine("EXO_SIM_CRASH_ON: simulated crash of process $PID while looking up '$id' (exit code 134)")
            [Console]::Error.Flush()
            [Environment]::Exit(134)
        }
        if (-not [string]::IsNullOrWhiteSpace($hangOn) -and [string]::Equals($id, $hangOn.Trim(), [StringComparison]::OrdinalIgnoreCase)) {
            [Console]::Error.WriteLine("EXO_SIM_HANG_ON: process $PID hangs for ever while looking up '$id'")
            [Console]::Error.Flush()
            # A blocked thread, not Start-Sleep: PowerShell.Stop() cannot interrupt it; only killing
            # the process ends it.
            [Threading.Thread]::Sleep([Threading.Timeout]::Infinite)
        }
    }
}

function Invoke-SimNoise {
    <# EXO_SIM_NOISE: stray writes from inside a command, once per call. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][string]$CommandName)
    $level = Get-SimEnvNumber -Name 'EXO_SIM_NOISE'
    if ($level -lt 1) { return }
    [Console]::WriteLine("noise: [Console]::WriteLine from $CommandName")
    [Console]::Out.Write("noise: [Console]::Out.Write without a newline from $CommandName ")
    [Console]::Out.Flush()
    [Console]::Error.WriteLine("noise: [Console]::Error.WriteLine from $CommandName")
    Write-Host "noise: Write-Host from $CommandName"
    # A native program whose output PowerShell does not capture into the command's output: it goes
    # to the host (the console under a console host).
    if ($IsWindows) {
        & "$env:SystemRoot\System32\cmd.exe" /d /c "echo noise: native cmd echo from $CommandName" | Out-Host
    }
    else {
        & /bin/echo "noise: native /bin/echo from $CommandName" | Out-Host
    }
    if ($level -ge 2) {
        # A native child that inherits the process's own stdout/stderr descriptors and writes to them
        # directly, bypassing [Console]::Out and the host altogether.
        # ProcessStartInfo without redirection = the child inherits descriptors 0/1/2.
        $start = [Diagnostics.ProcessStartInfo]::new()
        $start.UseShellExecute = $false
        if ($IsWindows) {
            $start.FileName = "$env:SystemRoot\System32\cmd.exe"
            foreach ($argument in '/d', '/c', "echo noise: inherited-fd native from $CommandName") { $start.ArgumentList.Add($argument) }
        }
        else {
            $start.FileName = '/bin/sh'
            $shellCommand = "echo 'noise: inherited-fd native stdout from $CommandName'; echo 'noise: inherited-fd native stderr from $CommandName' >&2"
            foreach ($argument in '-c', $shellCommand) { $start.ArgumentList.Add($argument) }
        }
        $child = [Diagnostics.Process]::Start($start)
        try { $child.WaitForExit() } finally { $child.Dispose() }
    }
}
