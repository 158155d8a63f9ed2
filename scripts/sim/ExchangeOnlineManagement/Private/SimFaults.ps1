# SimFaults.ps1 - error shapes and fault injection of the ExchangeOnlineManagement SIMULATION.
#
# Every variable below is read at call time (never cached at import), so a test can change it
# between two commands of one long-lived worker.
#   EXO_SIM_LATENCY_MS        added to every REST-backed call (Start-Sleep, so it is stoppable).
#   EXO_SIM_THROTTLE_RATE     0..1: that share of calls (random) stays throttled (HTTP 429) through
#                             the module's own retries and then fails.
#   EXO_SIM_TOKEN_LIFETIME_S  seconds after Connect-ExchangeOnline when calls fail with HTTP 401.
#   EXO_SIM_RETRY_SCALE       0..1 (default 1): factor on the waits of the module's own retry
#                             schedule (2, 4, 8, 16, 32 s; a 429 waits its Retry-After, 2 s here).
#   EXO_SIM_CRASH_ON          identity (alias etc., case-insensitive): looking it up exits the process (134).
#   EXO_SIM_HANG_ON           identity: looking it up blocks the thread forever (PowerShell.Stop() cannot end it).
#   EXO_SIM_NOISE             1: stray console writes inside every call; 2: also a native child that
#                             writes straight to the inherited stdout/stderr file descriptors.
#   EXO_SIM_BUDGET            N/duration (100/5s, 600/1m, 5/2000ms): the tenant's cmdlet budget, shared
#                             by every process: at most N REST-backed calls in any window of that length;
#                             beyond it a call fails at once with HTTP 429 and a Retry-After.
#
# Error shapes (what a caller sees in $_ / $Error[0]), as observed on the real module 3.9.0:
#   not connected   Get-EXOMailbox: terminating; 'You must call Connect-ExchangeOnline before calling
#                   any other cmdlet.', CategoryInfo 'ProtocolError: (:) [Get-EXOMailbox], RestClientException',
#                   FullyQualifiedErrorId '<message>,Get-EXOMailbox' (real: '<message>,Microsoft.Exchange.
#                   Management.RestApiClient.GetExoMailbox'; a script function cannot throw with that suffix
#                   and still end the command).
#                   (The tmpEXO_ functions of a connection that is gone: InvalidOperation,
#                   'NotConnected,<Cmdlet>' - not observed on the real module.)
#   REST failure    NON-terminating, after the retry schedule (HTTP 401, 429, 500, 503: five retries,
#                   Verbose '[ThreadID: #] Retry count N. Request failed with error "An error occurred
#                   while processing this request.". . Waiting N seconds'; no warning):
#                   'Error while querying REST service. HttpStatusCode=<n> ErrorMessage=<service JSON>',
#                   CategoryInfo 'ProtocolError: (:) [<Cmdlet>], RestClientException', FullyQualifiedErrorId
#                   'An error occurred while processing this request.,Microsoft.Exchange.Management.RestApiClient.GetExoMailbox'
#                   for Get-EXOMailbox (',<Cmdlet>' for the tmpEXO_ functions), exception type
#                   Microsoft.Exchange.Management.RestApiClient.RestClientException, nothing in Exception.Data.
#                   A missing identity in Get-EXOMailbox is HTTP 404 through the same text (no retries).
#   server errors   the tmpEXO_ functions: message 'stringId|Class|Text' (as Exchange sends them),
#                   CategoryInfo 'NotSpecified: (<identity>:String) [<Activity>], <short class name>'.
#     not found / ambiguous: NON-terminating, FullyQualifiedErrorId
#                   '[Server=<s>,RequestId=<guid>,TimeStamp=<RFC 1123 date>],Write-ErrorMessage'
#     duplicate New-Mailbox: terminating, FullyQualifiedErrorId '[Server=...,RequestId=...,TimeStamp=...],New-Mailbox'

Set-StrictMode -Version Latest
# No $ErrorActionPreference here: this file is dot-sourced into the module's script scope (see
# SimStore.ps1); functions that must fail fast set it locally.

$script:SimInvariant = [Globalization.CultureInfo]::InvariantCulture
$script:SimNotConnectedMessage = 'You must call Connect-ExchangeOnline before calling any other cmdlet.'
# The service's answers. Their bodies were never seen from the real service: these are plausible
# OData error bodies; the module puts them after 'ErrorMessage=' unchanged.
$script:SimRetryAfterSeconds = 2
$script:SimThrottleBody = '{"error":{"code":"TooManyRequests","message":"Rate limit exceeded. Retry after 2 seconds."}}'
$script:SimExpiredTokenBody = '{"error":{"code":"InvalidAuthenticationToken","message":"Access token has expired or is not yet valid."}}'
$script:SimRestQueryFailed = 'An error occurred while processing this request.'
$script:SimRestMaxRetries = 5
# FullyQualifiedErrorIds of the compiled Get-EXOMailbox end in its class name, not in the command name.
$script:SimExoMailboxClass = 'Microsoft.Exchange.Management.RestApiClient.GetExoMailbox'

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

function Get-SimRestClientExceptionType {
    <#
        [Microsoft.Exchange.Management.RestApiClient.RestClientException]: an Exception subclass with a
        (string message, Exception inner) constructor, so $_.Exception.GetType().FullName reads as in
        the real module. Emitted once per process with Reflection.Emit (a few milliseconds, no
        compiler) and kept in AppDomain data, because every runspace imports its own copy of this
        module. It is a stand-in: it has none of the real type's members beyond Exception's.
    #>
    [CmdletBinding()]
    [OutputType([type])]
    param()
    if ($null -ne $script:SimRestClientExceptionType) { return $script:SimRestClientExceptionType }
    $slot = 'psbridge.ExchangeOnlineManagementSimulation.RestClientException'
    $domain = [AppDomain]::CurrentDomain
    [Threading.Monitor]::Enter([AppDomain])
    try {
        $type = $domain.GetData($slot)
        if ($null -eq $type) {
            $assembly = [Reflection.Emit.AssemblyBuilder]::DefineDynamicAssembly(
                [Reflection.AssemblyName]::new('Microsoft.Exchange.Management.RestApiClient.Simulation'), [Reflection.Emit.AssemblyBuilderAccess]::Run)
            $builder = $assembly.DefineDynamicModule('Simulation').DefineType(
                'Microsoft.Exchange.Management.RestApiClient.RestClientException', [Reflection.TypeAttributes]'Public, Class', [Exception])
            $signature = [Type[]]@([string], [Exception])
            $constructor = $builder.DefineConstructor([Reflection.MethodAttributes]::Public, [Reflection.CallingConventions]::Standard, $signature)
            $il = $constructor.GetILGenerator()
            $il.Emit([Reflection.Emit.OpCodes]::Ldarg_0)
            $il.Emit([Reflection.Emit.OpCodes]::Ldarg_1)
            $il.Emit([Reflection.Emit.OpCodes]::Ldarg_2)
            $il.Emit([Reflection.Emit.OpCodes]::Call, [Exception].GetConstructor($signature))
            $il.Emit([Reflection.Emit.OpCodes]::Ret)
            $type = $builder.CreateType()
            $domain.SetData($slot, $type)
        }
    }
    finally {
        [Threading.Monitor]::Exit([AppDomain])
    }
    $script:SimRestClientExceptionType = $type
    return $type
}
$script:SimRestClientExceptionType = $null

function New-SimRestError {
    <#
        A failure reported by the REST client: ProtocolError / RestClientException, no TargetObject,
        nothing in Exception.Data. -Message is what the caller reads; -ErrorId the first half of the
        FullyQualifiedErrorId (for HTTP failures the inner OData exception's message, for checks made
        before any request the message itself).
    #>
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param([Parameter(Mandatory)][string]$Message, [string]$ErrorId = $Message, [string]$InnerMessage)
    $inner = if ($InnerMessage) { [Exception]::new($InnerMessage) } else { $null }
    $exception = (Get-SimRestClientExceptionType)::new($Message, $inner)
    return New-SimErrorRecord -Exception $exception -ErrorId $ErrorId -Category ProtocolError -Reason 'RestClientException'
}

function New-SimHttpError {
    <# 'Error while querying REST service. HttpStatusCode=<n> ErrorMessage=<body>', as the module words it. #>
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param([Parameter(Mandatory)][int]$StatusCode, [Parameter(Mandatory)][string]$Body)
    $message = 'Error while querying REST service. HttpStatusCode={0} ErrorMessage={1}' -f $StatusCode, $Body
    return New-SimRestError -Message $message -ErrorId $script:SimRestQueryFailed -InnerMessage $script:SimRestQueryFailed
}

function Microsoft.Exchange.Management.RestApiClient.GetExoMailbox {
    <#
        Reports an error of Get-EXOMailbox. PowerShell ends a FullyQualifiedErrorId with the name of
        the command that writes the record; for the real, compiled Get-EXOMailbox that is its class
        name, so this helper carries that name. (Its price: the record's InvocationInfo.MyCommand
        names this helper, where the real one names Get-EXOMailbox; CategoryInfo.Activity is set to
        Get-EXOMailbox explicitly.) Non-terminating errors only: a terminating error thrown here
        would end only the statement that called this helper, not Get-EXOMailbox.
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][Management.Automation.ErrorRecord]$ErrorRecord)
    $ErrorRecord.CategoryInfo.Activity = 'Get-EXOMailbox'
    $PSCmdlet.WriteError($ErrorRecord)
}

function Write-SimRestError {
    <# Writes a REST failure of $Cmdlet as a non-terminating error, in the shape of that command. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][Management.Automation.PSCmdlet]$Cmdlet, [Parameter(Mandatory)][Management.Automation.ErrorRecord]$ErrorRecord)
    if ($Cmdlet.MyInvocation.MyCommand.Name -eq 'Get-EXOMailbox') {
        Microsoft.Exchange.Management.RestApiClient.GetExoMailbox -ErrorRecord $ErrorRecord
    }
    else {
        $Cmdlet.WriteError($ErrorRecord)
    }
}

function Get-SimRetryScale {
    <# EXO_SIM_RETRY_SCALE clamped to 0..1 (default 1: the real waits). #>
    [CmdletBinding()]
    [OutputType([double])]
    param()
    return [Math]::Min(1.0, [Math]::Max(0.0, (Get-SimEnvNumber -Name 'EXO_SIM_RETRY_SCALE' -Default 1)))
}

function Invoke-SimRetrySchedule {
    <#
        The module's own retry loop around one REST request: $Attempt is called before each try and
        returns 0 (the request goes through) or the HTTP status the service answered. On 401, 429,
        500 and 503 it tries again up to five times, waiting 2, 4, 8, 16, 32 s (a 429: the server's
        Retry-After) times EXO_SIM_RETRY_SCALE, writing the real Verbose lines. Returns the final
        status: 0, or the one that outlasted the retries (the caller reports it).
    #>
    [CmdletBinding()]
    [OutputType([int])]
    param([Parameter(Mandatory)][scriptblock]$Attempt)
    for ($retry = 0; ; $retry++) {
        $status = [int](& $Attempt)
        if ($status -eq 0) { return 0 }
        Write-Verbose "[ThreadID: #] HTTP Status Code: $status"
        if ($status -notin 401, 429, 500, 503) { return $status }
        if ($retry -ge $script:SimRestMaxRetries) {
            Write-Verbose "[ThreadID: #] Retry attempts exhausted, Max Allowed : $($script:SimRestMaxRetries)"
            return $status
        }
        $seconds = if ($status -eq 429) { $script:SimRetryAfterSeconds } else { [int][Math]::Pow(2, $retry + 1) }
        Write-Verbose ('[ThreadID: #] Retry count {0}. Request failed with error "{1}". . Waiting {2} seconds' -f ($retry + 1), $script:SimRestQueryFailed, $seconds)
        $milliseconds = [int][Math]::Round($seconds * 1000 * (Get-SimRetryScale))
        if ($milliseconds -gt 0) { Start-Sleep -Milliseconds $milliseconds }
    }
}

function Get-SimBudget {
    <#
        EXO_SIM_BUDGET parsed: @{ Limit = N; Window = ticks } or $null when unset. 'N/duration', the
        duration a number with ms, s (the default) or m. A malformed value is an error, not ignored.
    #>
    [CmdletBinding()]
    param()
    $text = [Environment]::GetEnvironmentVariable('EXO_SIM_BUDGET')
    if ([string]::IsNullOrWhiteSpace($text)) { return $null }
    $cached = $script:SimBudgetCache
    if ($null -ne $cached -and $cached.Text -eq $text) { return $cached }
    if ($text.Trim() -notmatch '^(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?$') {
        throw [ArgumentException]::new("EXO_SIM_BUDGET '$text' is not N/duration (for example 100/5s).")
    }
    $unit = @{ ms = 1; s = 1000; m = 60000 }[$(if ($Matches[3]) { $Matches[3] } else { 's' })]
    $milliseconds = [double]::Parse($Matches[2], $script:SimInvariant) * $unit
    $budget = [pscustomobject]@{ Text = $text; Limit = [int]$Matches[1]; Window = [long]($milliseconds * [TimeSpan]::TicksPerMillisecond) }
    $script:SimBudgetCache = $budget
    return $budget
}
$script:SimBudgetCache = $null

function Request-SimBudget {
    <#
        Charges one call to the tenant's budget (EXO_SIM_BUDGET), which every process of the tenant
        shares through <tenant>/budget.state, read and rewritten under locks/budget.lock. A sliding
        window of every call the service answered, refused ones included (as SharePoint Online documents
        for its own throttling: throttled requests count towards the usage limits, so a client that does
        not back off is throttled longer): a call is admitted when fewer than N calls fell in the last
        window. Returns 0 when admitted, else the Retry-After in whole seconds (at least 1): when the
        oldest call leaves the window. budget.state keeps, on its first line, how many calls were admitted
        and how many refused since the tenant was made ('admitted throttled'), then the times (UTC ticks)
        of the calls in the current window.
    #>
    [CmdletBinding()]
    [OutputType([int])]
    param([Parameter(Mandatory)]$Budget, [Parameter(Mandatory)]$Layout)
    $ErrorActionPreference = 'Stop'
    $path = [IO.Path]::Combine($Layout.Root, 'budget.state')
    $lock = Enter-SimFileLock -Path ([IO.Path]::Combine($Layout.Locks, 'budget.lock'))
    try {
        $lines = [string[]]@(if ([IO.File]::Exists($path)) { [IO.File]::ReadAllLines($path) } else { '0 0' })
        $totals = $lines[0].Split(' ')
        $admitted = [long]$totals[0]
        $throttled = [long]$totals[1]
        $now = [DateTime]::UtcNow.Ticks
        $recent = [Collections.Generic.List[long]]::new()
        for ($i = 1; $i -lt $lines.Count; $i++) {
            $tick = [long]$lines[$i]
            if ($tick -gt $now - $Budget.Window) { $recent.Add($tick) }
        }
        $retryAfter = 0
        if ($recent.Count -lt $Budget.Limit) {
            $recent.Add($now)
            $admitted++
        }
        else {
            $throttled++
            $recent.Add($now)
            $wait = $recent[0] + $Budget.Window - $now
            $retryAfter = [int][Math]::Max(1, [Math]::Ceiling($wait / [double][TimeSpan]::TicksPerSecond))
        }
        $text = [Text.StringBuilder]::new()
        $null = $text.Append($admitted).Append(' ').Append($throttled).Append("`n")
        foreach ($tick in $recent) { $null = $text.Append($tick).Append("`n") }
        [IO.File]::WriteAllText($path, $text.ToString(), $script:SimUtf8)
        return $retryAfter
    }
    finally {
        $lock.Dispose()
    }
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
