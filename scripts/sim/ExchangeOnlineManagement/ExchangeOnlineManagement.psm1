# ExchangeOnlineManagement.psm1 - SIMULATION of the ExchangeOnlineManagement module (EXO V3, REST)
# for the psbridge tests. Real Exchange Online cannot be reached from the test machines, so this module
# copies what the real one shows a caller: command names, parameters, output objects, warnings, error
# texts and error shapes, as observed on the real 3.9.0 and listed in ../README.md. It keeps a "tenant" in a
# folder shared by all processes (Private/SimStore.ps1).
#
# As in the real module:
#   * Connect-ExchangeOnline, Disconnect-ExchangeOnline, Get-ConnectionInformation and Get-EXOMailbox
#     belong to this module;
#   * Get-Mailbox, Set-Mailbox, New-Mailbox, Remove-Mailbox, Get-User and Set-User exist only after a connect:
#     they are functions of a generated tmpEXO_xxxxxxxx.xxx module (thin wrappers; the functions of
#     the same names below, which this module does not export, do the work).
# Error shapes and fault-injection variables: Private/SimFaults.ps1. Storage: Private/SimStore.ps1.

Set-StrictMode -Version Latest
# $ErrorActionPreference is deliberately NOT set at module scope: module functions resolve it through
# the module's scope chain, and 'Stop' here would turn the non-terminating "couldn't be found" errors
# into terminating ones. The functions that must fail fast set it locally.

. ([IO.Path]::Combine($PSScriptRoot, 'Private', 'SimStore.ps1'))
. ([IO.Path]::Combine($PSScriptRoot, 'Private', 'SimFaults.ps1'))
. ([IO.Path]::Combine($PSScriptRoot, 'Private', 'SimFilter.ps1'))
. ([IO.Path]::Combine($PSScriptRoot, 'Private', 'SimConnection.ps1'))

$script:SimMailboxTypeName = 'Deserialized.Microsoft.Exchange.Data.Directory.Management.Mailbox'
$script:SimUserTypeName = 'Deserialized.Microsoft.Exchange.Data.Directory.Management.User'
$script:SimConnectionTypeName = 'Microsoft.Exchange.Management.ExoPowershellSnapin.ConnectionInformation'
$script:SimTruncationWarning = 'There are more results available than are currently displayed. To view them, increase the value for the ResultSize parameter.'
$script:SimRecipientTypes = @('DiscoveryMailbox', 'EquipmentMailbox', 'GroupMailbox', 'LegacyMailbox', 'LinkedMailbox',
    'LinkedRoomMailbox', 'RoomMailbox', 'SchedulingMailbox', 'SharedMailbox', 'TeamMailbox', 'UserMailbox')
# Mailbox properties in output order. A stored record also holds the USER properties below: in
# Exchange, Department, City, FirstName and LastName belong to the user (Get-User / Set-User); the
# Mailbox objects of Get-Mailbox and Get-EXOMailbox do not carry them (the REST Mailbox entity has
# no Department or City). Office is a mailbox property.
$script:SimUserOnlyProperties = @('FirstName', 'LastName', 'Department', 'City')
$script:SimMailboxProperties = @('Identity', 'Id', 'Name', 'Alias', 'DisplayName', 'PrimarySmtpAddress', 'UserPrincipalName',
    'EmailAddresses', 'RecipientType', 'RecipientTypeDetails', 'Guid', 'ExchangeGuid', 'ExternalDirectoryObjectId',
    'DistinguishedName', 'OrganizationId', 'ExchangeVersion', 'Office', 'CustomAttribute1',
    'CustomAttribute2', 'CustomAttribute3', 'CustomAttribute4', 'CustomAttribute5', 'HiddenFromAddressListsEnabled',
    'IsMailboxEnabled', 'IsInactiveMailbox', 'IsSoftDeletedByRemove', 'WhenSoftDeleted', 'ArchiveStatus',
    'ProhibitSendQuota', 'ProhibitSendReceiveQuota', 'IssueWarningQuota', 'WhenCreated', 'WhenChanged')
# Get-EXOMailbox: the documented minimum set, and what each property set adds from the stored properties.
$script:SimExoMinimumProperties = @('Alias', 'DisplayName', 'DistinguishedName', 'EmailAddresses', 'ExchangeVersion',
    'ExternalDirectoryObjectId', 'Guid', 'Id', 'Name', 'OrganizationId', 'PrimarySmtpAddress', 'RecipientType',
    'RecipientTypeDetails', 'UserPrincipalName')
$script:SimExoPropertySets = @{
    All            = $script:SimMailboxProperties
    Minimum        = $script:SimExoMinimumProperties
    AddressList    = @('HiddenFromAddressListsEnabled')
    Archive        = @('ArchiveStatus')
    Custom         = @('CustomAttribute1', 'CustomAttribute2', 'CustomAttribute3', 'CustomAttribute4', 'CustomAttribute5')
    Quota          = @('ProhibitSendQuota', 'ProhibitSendReceiveQuota', 'IssueWarningQuota')
    SoftDelete     = @('IsInactiveMailbox', 'IsSoftDeletedByRemove', 'WhenSoftDeleted')
    StatisticsSeed = @('ExchangeGuid')
    Audit          = @(); Delivery = @(); Hold = @(); Moderation = @(); Move = @(); Policy = @()
    PublicFolder   = @(); Resource = @(); Retention = @(); SCL = @()
}

# Deserialized Exchange objects print as their identity ("$mailbox" -> 'ContosoUser1'). Type data
# costs nothing per object, and it lets Set-Mailbox & co. bind a piped Get-EXOMailbox object (which
# has no Identity property) by value.
foreach ($typeName in $script:SimMailboxTypeName, $script:SimUserTypeName) {
    Update-TypeData -TypeName $typeName -MemberType ScriptMethod -MemberName ToString -Force -Value {
        $property = $this.PSObject.Properties['Identity']
        if ($null -eq $property) { $property = $this.PSObject.Properties['Name'] }
        if ($null -eq $property) { return '' }
        return [string]$property.Value
    }
}

#region helpers shared by the commands

function Assert-SimConnected {
    <#
        The command's connection, or the terminating "not connected" error on $Cmdlet: for
        Get-EXOMailbox the real RestClientException shape, for the tmpEXO_ functions (whose
        connection went away) an InvalidOperation error.
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][Management.Automation.PSCmdlet]$Cmdlet, [int]$ConnectionId = 0)
    $connection = Get-SimActiveConnection -ConnectionId $ConnectionId
    if ($null -ne $connection) { return $connection }
    if ($Cmdlet.MyInvocation.MyCommand.Name -eq 'Get-EXOMailbox') {
        # Thrown on the command's own PSCmdlet so that it ends the command (statement-terminating,
        # as the real one); the price is the id's suffix: ',Get-EXOMailbox', not the class name.
        $Cmdlet.ThrowTerminatingError((New-SimRestError -Message $script:SimNotConnectedMessage))
    }
    $Cmdlet.ThrowTerminatingError((New-SimNotConnectedError))
}

function Invoke-SimRequest {
    <#
        What every REST request of a command goes through, in the order a real call meets it:
        connection, the round trip (EXO_SIM_LATENCY_MS), the tenant's budget (EXO_SIM_BUDGET), then the
        service's answer: 401 once the token has expired, 429 for the share EXO_SIM_THROTTLE_RATE of calls. Failures go through
        the module's own retry schedule (Invoke-SimRetrySchedule) and end as a NON-terminating
        error written on $Cmdlet; then this returns $null and the command skips this request.
        Write commands pass -SkipLatency and apply the latency inside their audited write window.
        (The environment checks are inlined: this runs on every call.)
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][Management.Automation.PSCmdlet]$Cmdlet, [int]$ConnectionId = 0, [switch]$SkipLatency)
    $connection = Assert-SimConnected -Cmdlet $Cmdlet -ConnectionId $ConnectionId
    if (-not $SkipLatency -and $env:EXO_SIM_LATENCY_MS) { Invoke-SimLatency }
    if ($env:EXO_SIM_BUDGET) {
        # The tenant's cmdlet budget refuses the call itself: the caller sees the 429 at once, with the
        # service's Retry-After (the module's own REST retry schedule is not run for it).
        $budget = Get-SimBudget
        $retryAfter = Request-SimBudget -Budget $budget -Layout (Get-SimTenant).Layout
        if ($retryAfter -gt 0) {
            $body = '{{"error":{{"code":"TooManyRequests","message":"Rate limit exceeded. Retry after {0} seconds."}}}}' -f $retryAfter
            Write-SimRestError -Cmdlet $Cmdlet -ErrorRecord (New-SimHttpError -StatusCode 429 -Body $body)
            return $null
        }
    }
    $canExpire = $env:EXO_SIM_TOKEN_LIFETIME_S -or $null -ne $connection.TokenClaimExpiryUtc
    $staysThrottled = $env:EXO_SIM_THROTTLE_RATE -and (Test-SimThrottled)
    if (-not $staysThrottled -and -not ($canExpire -and (Test-SimTokenExpired -Connection $connection))) { return $connection }
    # The attempt runs in Invoke-SimRetrySchedule's scope, a child of this one (dynamic scoping),
    # so it sees $canExpire, $staysThrottled and $connection. The token may expire mid-schedule.
    $finalStatus = Invoke-SimRetrySchedule -Attempt {
        if ($canExpire -and (Test-SimTokenExpired -Connection $connection)) { 401 } elseif ($staysThrottled) { 429 } else { 0 }
    }
    if ($finalStatus -eq 0) { return $connection }
    $body = if ($finalStatus -eq 401) { $script:SimExpiredTokenBody } else { $script:SimThrottleBody }
    Write-SimRestError -Cmdlet $Cmdlet -ErrorRecord (New-SimHttpError -StatusCode $finalStatus -Body $body)
    return $null
}

function ConvertTo-SimResultSize {
    <# -ResultSize: a positive number or 'Unlimited' (default 1000). #>
    [CmdletBinding()]
    [OutputType([int])]
    param([Parameter(Mandatory)][Management.Automation.PSCmdlet]$Cmdlet, [AllowNull()][object]$ResultSize)
    if ($null -eq $ResultSize) { return 1000 }
    $text = ([string]$ResultSize).Trim()
    if ($text -eq 'Unlimited') { return [int]::MaxValue }
    $number = 0L
    if ([long]::TryParse($text, [Globalization.NumberStyles]::Integer, $script:SimInvariant, [ref]$number)) {
        if ($number -le 0) {
            $Cmdlet.ThrowTerminatingError((New-SimErrorRecord -Exception ([ArgumentException]::new('ResultSize must be greater than 0')) `
                        -ErrorId 'InvalidResultSize' -Category InvalidArgument -TargetObject $ResultSize))
        }
        return [int][Math]::Min($number, [int]::MaxValue)
    }
    $message = 'Cannot process argument transformation on parameter ''ResultSize''. Cannot convert value "{0}" to type "Microsoft.Exchange.Data.Unlimited`1[System.UInt32]".' -f $text
    $Cmdlet.ThrowTerminatingError((New-SimErrorRecord -Exception ([ArgumentException]::new($message)) `
                -ErrorId 'ParameterArgumentTransformationError' -Category InvalidData -Reason 'ParameterBindingArgumentTransformationException' -TargetObject $ResultSize))
}

function ConvertTo-SimFilterTree {
    <# Parses -Filter; a bad filter is a terminating parameter-binding error, as on the server. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][Management.Automation.PSCmdlet]$Cmdlet, [AllowEmptyString()][string]$Filter)
    if ([string]::IsNullOrWhiteSpace($Filter)) { return $null }
    try {
        return ConvertFrom-SimOpathFilter -Filter $Filter
    }
    catch [FormatException] {
        $message = 'Cannot bind parameter ''Filter'' to the target. Exception setting "Filter": "{0}"' -f $_.Exception.Message
        $Cmdlet.ThrowTerminatingError((New-SimErrorRecord -Exception ([ArgumentException]::new($message)) `
                    -ErrorId 'ParameterBindingFailed' -Category InvalidArgument -Reason 'ParameterBindingException' -TargetObject $Filter))
    }
}

function Get-SimInvalidExoProperty {
    <#
        The -Properties of Get-EXOMailbox that the Mailbox entity does not have, in the order asked
        (the real module refuses them all at once). The simulation knows only the properties it
        stores, so a real property it does not model is refused too.
    #>
    [CmdletBinding()]
    [OutputType([string[]])]
    param([string[]]$Properties)
    $known = [Collections.Generic.HashSet[string]]::new([string[]]$script:SimMailboxProperties, [StringComparer]::OrdinalIgnoreCase)
    foreach ($name in $Properties) {
        if ($name -and -not $known.Contains($name.Trim())) { $name.Trim() }
    }
}

function Get-SimExoPropertyList {
    <# The properties Get-EXOMailbox emits: minimum set + -PropertySets + -Properties, in stored order. #>
    [CmdletBinding()]
    [OutputType([string[]])]
    param([string[]]$Properties, [string[]]$PropertySets)
    $wanted = [Collections.Generic.HashSet[string]]::new([StringComparer]::OrdinalIgnoreCase)
    foreach ($name in $script:SimExoMinimumProperties) { $null = $wanted.Add($name) }
    foreach ($set in @($PropertySets)) { if ($set) { foreach ($name in $script:SimExoPropertySets[$set]) { $null = $wanted.Add($name) } } }
    foreach ($name in @($Properties)) { if ($name) { $null = $wanted.Add($name.Trim()) } }
    $list = [Collections.Generic.List[string]]::new()
    foreach ($name in $script:SimMailboxProperties) { if ($wanted.Contains($name)) { $list.Add($name) } }
    return , $list.ToArray()
}

function ConvertTo-SimShape {
    <#
        The object a command emits for a stored mailbox record:
          Mailbox    - every stored property (Get-Mailbox, New-Mailbox), type Deserialized...Mailbox;
          User       - the Get-User view, type Deserialized...User;
          ExoMailbox - only $Properties (Get-EXOMailbox).
        The record itself is reused for 'Mailbox' (it was parsed for this call only).
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)]$Record, [Parameter(Mandatory)][string]$Shape, [string[]]$Properties)
    if ($Shape -eq 'Mailbox') {
        $all = $Record.PSObject.Properties
        foreach ($name in $script:SimUserOnlyProperties) { $all.Remove($name) }
        $Record.PSTypeNames.Insert(0, $script:SimMailboxTypeName)
        return $Record
    }
    if ($Shape -eq 'User') {
        $user = [pscustomobject][ordered]@{
            Identity                  = $Record.Identity
            Name                      = $Record.Name
            DisplayName               = $Record.DisplayName
            UserPrincipalName         = $Record.UserPrincipalName
            FirstName                 = $Record.FirstName
            LastName                  = $Record.LastName
            Department                = $Record.Department
            Office                    = $Record.Office
            City                      = $Record.City
            RecipientType             = 'UserMailbox'
            RecipientTypeDetails      = $Record.RecipientTypeDetails
            WindowsEmailAddress       = $Record.PrimarySmtpAddress
            Guid                      = $Record.Guid
            ExternalDirectoryObjectId = $Record.ExternalDirectoryObjectId
            DistinguishedName         = $Record.DistinguishedName
            WhenCreated               = $Record.WhenCreated
            WhenChanged               = $Record.WhenChanged
        }
        $user.PSTypeNames.Insert(0, $script:SimUserTypeName)
        return $user
    }
    $selected = [ordered]@{}
    foreach ($name in $Properties) {
        $property = $Record.PSObject.Properties[$name]
        if ($null -ne $property) { $selected[$name] = $property.Value }
    }
    $exo = [pscustomobject]$selected
    $exo.PSTypeNames.Insert(0, $script:SimMailboxTypeName)
    return $exo
}

function Test-SimAnr {
    <# Ambiguous name resolution: prefix match on Name, Alias, DisplayName, FirstName, LastName, SMTP local part. #>
    [CmdletBinding()]
    [OutputType([bool])]
    param([Parameter(Mandatory)]$Record, [Parameter(Mandatory)][string]$Anr)
    $ignoreCase = [StringComparison]::OrdinalIgnoreCase
    foreach ($value in $Record.Name, $Record.Alias, $Record.DisplayName, $Record.FirstName, $Record.LastName, $Record.PrimarySmtpAddress) {
        if (([string]$value).StartsWith($Anr, $ignoreCase)) { return $true }
    }
    return $false
}

function Invoke-SimMailboxQuery {
    <#
        Streams the mailboxes matching the criteria to the pipeline, one by one as the files are read
        (the file NAMES are listed and sorted first, for a stable order; no object list is built unless
        -SortBy asks for it). Stops after $ResultSize objects and then writes the truncation warning
        when one more match exists.
    #>
    [CmdletBinding()]
    param(
        [Parameter(Mandatory)]$Tenant,
        [Parameter(Mandatory)][ValidateSet('Mailbox', 'User', 'ExoMailbox')][string]$Shape,
        [string[]]$Properties,
        [hashtable]$FilterTree,
        [string[]]$RecipientTypeDetails,
        [string]$Anr,
        [string]$IdentityPattern,
        [switch]$ArchiveOnly,
        [switch]$SoftDeleted,
        [int]$ResultSize = 1000,
        [string]$SortBy
    )
    $folder = if ($SoftDeleted) { $Tenant.Layout.SoftDeleted } else { $Tenant.Layout.Mailboxes }
    if (-not [IO.Directory]::Exists($folder)) { return }
    $files = [IO.Directory]::GetFiles($folder, '*.json')
    [Array]::Sort($files, [StringComparer]::Ordinal)
    $types = $null
    if ($RecipientTypeDetails) { $types = [Collections.Generic.HashSet[string]]::new([string[]]$RecipientTypeDetails, [StringComparer]::OrdinalIgnoreCase) }
    $wildcard = $null
    if ($IdentityPattern) { $wildcard = [Management.Automation.WildcardPattern]::new($IdentityPattern, [Management.Automation.WildcardOptions]::IgnoreCase) }
    $sorted = $null
    if ($SortBy) { $sorted = [Collections.Generic.List[object]]::new() }
    $emitted = 0
    $jsonType = $script:SimJsonType
    $utf8 = $script:SimUtf8
    foreach ($file in $files) {
        # Inlined Read-SimMailboxFile: this loop is the hot path of Get-Mailbox -ResultSize Unlimited.
        try { $text = [IO.File]::ReadAllText($file, $utf8) } catch [IO.FileNotFoundException] { continue }
        $parseError = $null
        $record = $jsonType::ConvertFromJson($text, [ref]$parseError)
        if ($null -ne $parseError) { throw [IO.InvalidDataException]::new("Cannot parse $file`: $($parseError.Exception.Message)") }
        if ($null -ne $types -and -not $types.Contains($record.RecipientTypeDetails)) { continue }
        if ($ArchiveOnly -and $record.ArchiveStatus -ne 'Active') { continue }
        if ($Anr -and -not (Test-SimAnr -Record $record -Anr $Anr)) { continue }
        if ($null -ne $wildcard -and -not ($wildcard.IsMatch($record.Name) -or $wildcard.IsMatch($record.Alias) -or
                $wildcard.IsMatch($record.DisplayName) -or $wildcard.IsMatch($record.PrimarySmtpAddress))) { continue }
        if ($null -ne $FilterTree -and -not (Test-SimOpathFilter -Node $FilterTree -Record $record)) { continue }
        if ($null -ne $sorted) { $sorted.Add($record); continue }
        if ($emitted -ge $ResultSize) {
            Write-Warning $script:SimTruncationWarning
            return
        }
        $emitted++
        if ($Shape -eq 'Mailbox') {
            $all = $record.PSObject.Properties
            foreach ($name in $script:SimUserOnlyProperties) { $all.Remove($name) }
            $record.PSTypeNames.Insert(0, $script:SimMailboxTypeName)
            $record
        }
        elseif ($Shape -eq 'ExoMailbox') {
            $selected = [ordered]@{}
            $all = $record.PSObject.Properties
            foreach ($name in $Properties) {
                $property = $all[$name]
                if ($null -ne $property) { $selected[$name] = $property.Value }
            }
            $exo = [pscustomobject]$selected
            $exo.PSTypeNames.Insert(0, $script:SimMailboxTypeName)
            $exo
        }
        else {
            ConvertTo-SimShape -Record $record -Shape $Shape -Properties $Properties
        }
    }
    if ($null -ne $sorted) {
        $ordered = @($sorted | Sort-Object -Property $SortBy)
        $count = [Math]::Min($ordered.Count, $ResultSize)
        for ($i = 0; $i -lt $count; $i++) { ConvertTo-SimShape -Record $ordered[$i] -Shape $Shape -Properties $Properties }
        if ($ordered.Count -gt $ResultSize) { Write-Warning $script:SimTruncationWarning }
    }
}

function Find-SimMailboxForWrite {
    <#
        Resolves -Identity for Set-Mailbox, Set-User and Remove-Mailbox: exactly one mailbox, or $null
        after writing the non-terminating not-found / ambiguous error ($Activity: the server-side
        command named in its CategoryInfo).
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)]$Tenant, [Parameter(Mandatory)][string]$Identity, [string]$Activity = 'Get-Recipient')
    Invoke-SimLookupFault -Identity $Identity
    $found = Resolve-SimMailbox -Layout $Tenant.Layout -Identity $Identity
    if ($found.Count -eq 0) {
        Write-ErrorMessage -ErrorRecord (New-SimNotFoundError -TenantInfo $Tenant.Info -Identity $Identity -Activity $Activity)
        return $null
    }
    if ($found.Count -gt 1) {
        Write-ErrorMessage -ErrorRecord (New-SimAmbiguousError -TenantInfo $Tenant.Info -Identity $Identity -Activity $Activity)
        return $null
    }
    Invoke-SimLookupFault -Identity $found[0].Alias
    return $found[0]
}

function Write-SimIdentityResult {
    <# Get-* by identity: emits every match (Get cmdlets return all of an ambiguous identity) or the not-found error. #>
    [CmdletBinding()]
    param(
        [Parameter(Mandatory)]$Tenant,
        [Parameter(Mandatory)][string]$Identity,
        [Parameter(Mandatory)][string]$Shape,
        [string[]]$Properties,
        [string[]]$RecipientTypeDetails,
        [switch]$SoftDeleted,
        [string]$Activity = 'Get-Recipient'
    )
    $faults = $env:EXO_SIM_CRASH_ON -or $env:EXO_SIM_HANG_ON
    if ($faults) { Invoke-SimLookupFault -Identity $Identity }
    $found = Resolve-SimMailbox -Layout $Tenant.Layout -Identity $Identity -SoftDeleted:$SoftDeleted
    $emitted = 0
    foreach ($record in $found) {
        if ($RecipientTypeDetails -and $RecipientTypeDetails -notcontains $record.RecipientTypeDetails) { continue }
        if ($faults) { Invoke-SimLookupFault -Identity $record.Alias }
        $emitted++
        if ($Shape -eq 'Mailbox') {
            # ConvertTo-SimShape -Shape Mailbox, inlined (hot path).
            $all = $record.PSObject.Properties
            foreach ($name in $script:SimUserOnlyProperties) { $all.Remove($name) }
            $record.PSTypeNames.Insert(0, $script:SimMailboxTypeName)
            $record
        }
        else {
            ConvertTo-SimShape -Record $record -Shape $Shape -Properties $Properties
        }
    }
    if ($emitted -eq 0) {
        if ($Shape -eq 'ExoMailbox') {
            # The compiled Get-EXOMailbox: the service's 404, in the module's REST error text.
            $text = "Error executing request. The operation couldn't be performed because object '{0}' couldn't be found on '{1}'." -f $Identity, $Tenant.Info.DomainController
            $body = ConvertTo-SimJson -InputObject ([ordered]@{ error = [ordered]@{ code = 'NotFound'; message = $text } })
            Microsoft.Exchange.Management.RestApiClient.GetExoMailbox -ErrorRecord (New-SimHttpError -StatusCode 404 -Body $body)
            return
        }
        Write-ErrorMessage -ErrorRecord (New-SimNotFoundError -TenantInfo $Tenant.Info -Identity $Identity -Activity $Activity)
    }
}

function ConvertTo-SimAlias {
    <# An alias derived from a Name: accents folded to ASCII, other invalid characters dropped. #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][string]$Name)
    $folded = [Text.StringBuilder]::new()
    foreach ($character in $Name.Normalize([Text.NormalizationForm]::FormD).ToCharArray()) {
        if ([Globalization.CharUnicodeInfo]::GetUnicodeCategory($character) -eq [Globalization.UnicodeCategory]::NonSpacingMark) { continue }
        if ("$character" -match '^[A-Za-z0-9!#$%&''+=^_`{}~.-]$') { $null = $folded.Append($character) }
    }
    $alias = ($folded.ToString() -replace '\.{2,}', '.').Trim('.')
    if ($alias.Length -gt 64) { $alias = $alias.Substring(0, 64).TrimEnd('.') }
    if (-not (Test-SimAlias -Alias $alias)) {
        $hash = [Convert]::ToHexString([Security.Cryptography.SHA256]::HashData($script:SimUtf8.GetBytes($Name))).Substring(0, 8).ToLowerInvariant()
        $alias = "mbx$hash"
    }
    return $alias
}

function ConvertTo-SimQuota {
    <# 'Unlimited', '<n> [B|KB|MB|GB|TB]' or bytes -> Exchange's display form; $null when invalid. #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][string]$Value)
    $text = $Value.Trim()
    if ($text -eq 'Unlimited') { return 'Unlimited' }
    if ($text -match '^(?<n>\d+(\.\d+)?)\s*(?<u>B|KB|MB|GB|TB)?(\s*\([\d,]+ bytes\))?$') {
        $factor = switch ($Matches['u']) { 'KB' { 1KB } 'MB' { 1MB } 'GB' { 1GB } 'TB' { 1TB } default { 1 } }
        $bytes = [long][Math]::Round([double]::Parse($Matches['n'], $script:SimInvariant) * $factor)
        return Format-SimByteQuota -Bytes $bytes
    }
    return $null
}

function Merge-SimEmailAddress {
    <#
        New EmailAddresses for Set-Mailbox -EmailAddresses: a list replaces them, @{Add=...;Remove=...}
        edits them. Addresses without a prefix are smtp:. 'SMTP:' (upper case) marks the primary; when
        none is left the first smtp address becomes primary. Returns $null when an address is invalid.
    #>
    [CmdletBinding()]
    param([AllowEmptyCollection()][string[]]$Current, [Parameter(Mandatory)][object]$Change)
    $normalize = {
        param([string]$address)
        $address = $address.Trim()
        if ($address -notmatch '^[A-Za-z0-9]+:') { $address = "smtp:$address" }
        $address
    }
    $result = [Collections.Generic.List[string]]::new()
    if ($Change -is [Collections.IDictionary]) {
        foreach ($address in @($Current)) { $result.Add($address) }
        foreach ($key in $Change.Keys) {
            foreach ($item in @($Change[$key])) {
                $address = & $normalize ([string]$item)
                if ($key -eq 'Remove') {
                    for ($i = $result.Count - 1; $i -ge 0; $i--) { if ([string]::Equals($result[$i], $address, [StringComparison]::OrdinalIgnoreCase)) { $result.RemoveAt($i) } }
                }
                elseif ($key -eq 'Add') {
                    if ($address.StartsWith('SMTP:', [StringComparison]::Ordinal)) {
                        for ($i = 0; $i -lt $result.Count; $i++) { if ($result[$i].StartsWith('SMTP:', [StringComparison]::Ordinal)) { $result[$i] = 'smtp:' + $result[$i].Substring(5) } }
                    }
                    $result.Add($address)
                }
                else { return $null }
            }
        }
    }
    else {
        foreach ($item in @($Change)) { $result.Add((& $normalize ([string]$item))) }
    }
    $primary = -1
    for ($i = 0; $i -lt $result.Count; $i++) {
        if ($result[$i] -notmatch '^[A-Za-z0-9]+:.+') { return $null }
        if ($result[$i].StartsWith('smtp:', [StringComparison]::OrdinalIgnoreCase) -and $result[$i] -notmatch '^smtp:[^@\s]+@[^@\s]+$') { return $null }
        if ($result[$i].StartsWith('SMTP:', [StringComparison]::Ordinal)) {
            if ($primary -ge 0) { $result[$i] = 'smtp:' + $result[$i].Substring(5) } else { $primary = $i }
        }
    }
    if ($primary -lt 0) {
        for ($i = 0; $i -lt $result.Count; $i++) {
            if ($result[$i].StartsWith('smtp:', [StringComparison]::OrdinalIgnoreCase)) { $result[$i] = 'SMTP:' + $result[$i].Substring(5); $primary = $i; break }
        }
    }
    if ($primary -lt 0) { return $null }
    return , $result.ToArray()
}

#endregion

#region Connect-ExchangeOnline / Disconnect-ExchangeOnline / Get-ConnectionInformation

function Connect-ExchangeOnline {
    <#
    .SYNOPSIS
        SIMULATION of Connect-ExchangeOnline (ExchangeOnlineManagement 3.9): signs in to the simulated
        tenant and generates the tmpEXO_ module holding the REST-backed commands.
    .DESCRIPTION
        No parameter sets, as in the real module: the auth mode comes from the bound parameters.
        Works without a browser: -ManagedIdentity -Organization, -AccessToken <JWT> -Organization,
        -Credential, -AppId with -CertificateFilePath/-CertificatePassword, -Certificate or
        -CertificateThumbprint (CurrentUser\My), and -Organization contoso.onmicrosoft.com.
        EXO_SIM_CONNECT_DELAY_MS adds a (stoppable) delay.
    #>
    [CmdletBinding()]
    param(
        [string]$ConnectionUri = '',
        [string]$AzureADAuthorizationEndpointUri = '',
        [ValidateSet('O365Default', 'O365GermanyCloud', 'O365China', 'O365USGovGCCHigh', 'O365USGovDoD')]
        [string]$ExchangeEnvironmentName = 'O365Default',
        [string]$DelegatedOrganization = '',
        [string]$Prefix = '',
        [switch]$ShowBanner = $true,
        [string[]]$CommandName = @('*'),
        [switch]$SkipLoadingFormatData,
        [switch]$SkipLoadingCmdletHelp,
        [switch]$LoadCmdletHelp,
        [string]$AccessToken,
        [switch]$DisableWAM,
        [string]$EXOModuleBasePath = '',
        [string]$UserPrincipalName,
        [pscredential]$Credential,
        [Security.Cryptography.X509Certificates.X509Certificate2]$Certificate,
        [string]$CertificateFilePath,
        [securestring]$CertificatePassword,
        [string]$CertificateThumbprint,
        [string]$AppId,
        [string]$Organization,
        [switch]$ManagedIdentity,
        [string]$ManagedIdentityAccountId,
        [switch]$Device,
        [bool]$ShowProgress = $true,
        [bool]$UseMultithreading = $true,
        [ValidateRange(1, 1000)]
        [uint32]$PageSize = 1000
    )
    $ErrorActionPreference = 'Stop'
    $bound = @{} + $PSBoundParameters
    # The real module starts by looking up a script variable that is normally not set, with
    # -ErrorAction SilentlyContinue. The suppressed error still lands in $Error and sets the
    # caller's PowerShell.HadErrors, so even a successful connect reports HadErrors = True with no
    # error record in the Error stream. Kept on purpose: hosts must not judge by HadErrors alone.
    $searchOnly = Get-Variable -Name 'EnableSearchOnlySession' -Scope Script -ErrorAction SilentlyContinue
    $null = $searchOnly

    # 1. Parameter validation, before anything is printed. Texts are the real module's; it throws
    #    plain strings, which gives OperationStopped / RuntimeException / id = message.
    if ($ConnectionUri -ne '' -and -not (Test-SimHttpsUri -Text $ConnectionUri)) {
        throw "Invalid ConnectionUri parameter '$ConnectionUri'"
    }
    if ($AzureADAuthorizationEndpointUri -ne '' -and -not (Test-SimHttpsUri -Text $AzureADAuthorizationEndpointUri)) {
        throw "Invalid AzureADAuthorizationEndpointUri parameter '$AzureADAuthorizationEndpointUri'"
    }
    if ($Prefix -ne '') {
        # -notmatch / -eq: case-insensitive, as in the real module.
        if ($Prefix -notmatch '^[a-z0-9]+$') { throw 'Use of any special characters in the Prefix string is not supported.' }
        if ($Prefix -eq 'EXO') { throw "Prefix 'EXO' is a reserved Prefix, please use a different prefix." }
    }
    $guid = [Guid]::Empty
    if ($Organization -and [Guid]::TryParse($Organization, [ref]$guid)) {
        throw 'Organization cannot be a Guid, please enter the name of the tenant instead.'
    }
    $certificateMode = $bound.ContainsKey('Certificate') -or $bound.ContainsKey('CertificateFilePath') -or $bound.ContainsKey('CertificateThumbprint')
    if ($certificateMode -and [string]::IsNullOrWhiteSpace($AppId)) {
        throw 'AppId cannot be null for certificate based connections.'
    }

    # 2. The banner comes before sign-in, so it is printed even when the connect then fails. The
    #    Information record echoes -ConnectionUri as given (a port stays in this text; only the
    #    connection's ConnectionUri keeps just scheme://host).
    if ($ShowBanner) { Write-SimBanner }
    if ($ConnectionUri -ne '' -and $AzureADAuthorizationEndpointUri -eq '') {
        Write-Information "Using ConnectionUri:'$ConnectionUri', in the environment:'$ExchangeEnvironmentName'."
    }
    if ($AzureADAuthorizationEndpointUri -ne '' -and $ConnectionUri -eq '') {
        Write-Information "Using AzureADAuthorizationEndpointUri:'$AzureADAuthorizationEndpointUri', in the environment:'$ExchangeEnvironmentName'."
    }

    # 3. Sign-in.
    $delay = Get-SimEnvNumber -Name 'EXO_SIM_CONNECT_DELAY_MS'
    if ($delay -gt 0) { Start-Sleep -Milliseconds ([int][Math]::Ceiling($delay)) }
    $tenant = Get-SimTenant
    $signIn = Get-SimSignIn -Bound $bound -TenantInfo $tenant.Info -Cmdlet $PSCmdlet

    # 4. Connecting again ADDS a connection (ExchangeOnline_2, ...), each with its own tmpEXO_
    #    module, as the real module does; the newest one serves the Get-EXO* commands.

    # 5. The generated module: <temp>/tmpEXO_xxxxxxxx.xxx/tmpEXO_xxxxxxxx.xxx.psm1, imported -Global.
    $basePath = if ($EXOModuleBasePath) { $PSCmdlet.GetUnresolvedProviderPathFromPSPath($EXOModuleBasePath) } else { [IO.Path]::GetTempPath() }
    $moduleName = 'tmpEXO_' + [IO.Path]::GetRandomFileName()
    $folder = [IO.Path]::Combine($basePath, $moduleName)
    $commands = @($script:SimRestCommandNames | Where-Object {
            $name = $_
            @($CommandName | Where-Object { $name -like $_ }).Count -gt 0
        })
    $store = Get-SimConnectionStore
    [Threading.Monitor]::Enter($store)
    try { $id = $store.NextId; $store.NextId = $id + 1 } finally { [Threading.Monitor]::Exit($store) }
    $connection = @{
        ConnectionId                    = [Guid]::NewGuid()
        Id                              = [uint32]$id
        Name                            = "ExchangeOnline_$id"
        UserPrincipalName               = $signIn.UserPrincipalName
        ConnectionUri                   = if ($ConnectionUri) { ConvertTo-SimSchemeAndHost -Text $ConnectionUri } else { $script:SimDefaultConnectionUri }
        AzureAdAuthorizationEndpointUri = if ($AzureADAuthorizationEndpointUri) { $AzureADAuthorizationEndpointUri } else { $script:SimDefaultAuthorityUri }
        CertificateAuthentication       = $signIn.CertificateAuthentication
        ModuleName                      = $folder
        ModulePrefix                    = $Prefix
        Organization                    = if ($Organization) { $Organization } else { $tenant.Info.Organization }
        DelegatedOrganization           = if ($DelegatedOrganization) { $DelegatedOrganization } else { $null }
        AppId                           = if ($signIn.AppId) { $signIn.AppId } else { $null }
        PageSize                        = $PageSize
        TenantID                        = $signIn.TenantId
        ConnectionUsedForInbuiltCmdlets = $false
        IsEopSession                    = $false
        ConnectedAtUtc                  = [DateTime]::UtcNow
        TokenClaimExpiryUtc             = $signIn.TokenClaimExpiryUtc
        AuthMode                        = $signIn.Mode
        ImportedModuleName              = $moduleName
    }
    try {
        $null = [IO.Directory]::CreateDirectory($folder)
        $source = New-SimRestModuleText -CommandName $commands -ModuleName $moduleName
        $psm1 = [IO.Path]::Combine($folder, "$moduleName.psm1")
        [IO.File]::WriteAllText($psm1, $source, $script:SimUtf8)
        $implementation = @{}
        foreach ($name in $commands) { $implementation[$name] = Get-Item -LiteralPath "function:$name" }
        $import = @{ Name = $psm1; Global = $true; Force = $true; DisableNameChecking = $true; ArgumentList = @($implementation, $id); Verbose = $false }
        if ($Prefix) { $import['Prefix'] = $Prefix }
        $null = Import-Module @import
    }
    catch {
        if ([IO.Directory]::Exists($folder)) { [IO.Directory]::Delete($folder, $true) }
        throw
    }

    Add-SimConnection -Connection $connection
}

function Disconnect-ExchangeOnline {
    <#
    .SYNOPSIS
        SIMULATION of Disconnect-ExchangeOnline: removes the connections of this process, their
        tmpEXO_ modules and folders. ConfirmImpact High: pass -Confirm:$false when nobody can answer.
    #>
    [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'High')]
    param(
        [string[]]$ConnectionId,
        [string[]]$ModulePrefix
    )
    $ErrorActionPreference = 'Stop'
    $targets = @(Get-SimConnectionList | Where-Object {
            (-not $ConnectionId -or $ConnectionId -contains $_.ConnectionId) -and
            (-not $ModulePrefix -or $ModulePrefix -contains $_.ModulePrefix)
        })
    $description = 'Running this cmdlet clears all active sessions created using Connect-ExchangeOnline or Connect-IPPSSession.'
    if (-not $PSCmdlet.ShouldProcess($description, "$description Press(Y/y/A/a) if you want to continue.", 'Confirm')) { return }
    foreach ($connection in $targets) { Remove-SimConnection -Connection $connection }
    Write-Host 'Disconnected successfully !'
}

function Get-ConnectionInformation {
    <#
    .SYNOPSIS
        SIMULATION of Get-ConnectionInformation: one object per connection of this process, nothing
        when there is none. Once the token has expired the service answers 401 and State shows
        Broken; TokenStatus shows Expired too, except for -AccessToken connections, which always
        show Active (and TokenExpiryTimeUTC 9999-12-31), as in the real module.
    #>
    [CmdletBinding()]
    param(
        [string[]]$ConnectionId,
        [string[]]$ModulePrefix
    )
    foreach ($connection in @(Get-SimConnectionList)) {
        if ($ConnectionId -and $ConnectionId -notcontains $connection.ConnectionId) { continue }
        if ($ModulePrefix -and $ModulePrefix -notcontains $connection.ModulePrefix) { continue }
        $expired = Test-SimTokenExpired -Connection $connection
        $info = [pscustomobject][ordered]@{
            ConnectionId                    = $connection.ConnectionId
            State                           = if ($expired) { 'Broken' } else { 'Connected' }
            Id                              = $connection.Id
            Name                            = $connection.Name
            UserPrincipalName               = $connection.UserPrincipalName
            ConnectionUri                   = $connection.ConnectionUri
            AzureAdAuthorizationEndpointUri = $connection.AzureAdAuthorizationEndpointUri
            TokenExpiryTimeUTC              = Get-SimTokenExpiry -Connection $connection
            CertificateAuthentication       = $connection.CertificateAuthentication
            ModuleName                      = $connection.ModuleName
            ModulePrefix                    = $connection.ModulePrefix
            Organization                    = $connection.Organization
            DelegatedOrganization           = $connection.DelegatedOrganization
            AppId                           = $connection.AppId
            PageSize                        = $connection.PageSize
            TenantID                        = $connection.TenantID
            TokenStatus                     = if ($expired -and $connection.AuthMode -ne 'AccessToken') { 'Expired' } else { 'Active' }
            ConnectionUsedForInbuiltCmdlets = $connection.ConnectionUsedForInbuiltCmdlets
            IsEopSession                    = $connection.IsEopSession
        }
        $info.PSTypeNames.Insert(0, $script:SimConnectionTypeName)
        $info
    }
}

#endregion

#region Get-EXOMailbox (main module, like the real module's compiled Get-EXO* cmdlets)

function Get-EXOMailbox {
    <#
    .SYNOPSIS
        SIMULATION of Get-EXOMailbox: the minimum property set unless -Properties / -PropertySets ask
        for more.
    #>
    [CmdletBinding(DefaultParameterSetName = 'Identity')]
    param(
        [Parameter(ParameterSetName = 'Identity', Position = 0, ValueFromPipeline, ValueFromPipelineByPropertyName)]
        [string]$Identity,
        [Parameter(ParameterSetName = 'ExternalDirectoryObjectId', Mandatory)]
        [guid]$ExternalDirectoryObjectId,
        [Parameter(ParameterSetName = 'PrimarySmtpAddress', Mandatory)]
        [string]$PrimarySmtpAddress,
        [Parameter(ParameterSetName = 'UserPrincipalName', Mandatory)]
        [string]$UserPrincipalName,
        [Parameter(ParameterSetName = 'Anr', Mandatory)]
        [string]$Anr,
        [string]$Filter,
        [string[]]$Properties,
        [ValidateSet('All', 'Minimum', 'AddressList', 'Archive', 'Audit', 'Custom', 'Delivery', 'Hold', 'Moderation', 'Move',
            'Policy', 'PublicFolder', 'Quota', 'Resource', 'Retention', 'SCL', 'SoftDelete', 'StatisticsSeed')]
        [string[]]$PropertySets,
        [ValidateSet('DiscoveryMailbox', 'EquipmentMailbox', 'GroupMailbox', 'LegacyMailbox', 'LinkedMailbox', 'LinkedRoomMailbox',
            'RoomMailbox', 'SchedulingMailbox', 'SharedMailbox', 'TeamMailbox', 'UserMailbox')]
        [string[]]$RecipientTypeDetails,
        [object]$ResultSize = 1000,
        [switch]$Archive,
        [switch]$SoftDeletedMailbox,
        [switch]$InactiveMailboxOnly,
        [switch]$IncludeInactiveMailbox
    )
    begin {
        $null = Assert-SimConnected -Cmdlet $PSCmdlet
        if ($env:EXO_SIM_NOISE) { Invoke-SimNoise -CommandName $MyInvocation.MyCommand.Name }
        $limit = 1000
        if ($PSBoundParameters.ContainsKey('ResultSize')) { $limit = ConvertTo-SimResultSize -Cmdlet $PSCmdlet -ResultSize $ResultSize }
        $filterTree = $null
        if ($Filter) { $filterTree = ConvertTo-SimFilterTree -Cmdlet $PSCmdlet -Filter $Filter }
        $invalid = @(Get-SimInvalidExoProperty -Properties $Properties)
        if ($invalid.Count -gt 0) {
            $PSCmdlet.ThrowTerminatingError((New-SimRestError -Message ('Some of requested properties are not valid. InvalidProperties = {0}' -f ($invalid -join ','))))
        }
        $propertyList = Get-SimExoPropertyList -Properties $Properties -PropertySets $PropertySets
    }
    process {
        if ($null -eq (Invoke-SimRequest -Cmdlet $PSCmdlet)) { return }
        $tenant = Get-SimTenant
        $key = switch ($PSCmdlet.ParameterSetName) {
            'ExternalDirectoryObjectId' { $ExternalDirectoryObjectId.ToString() }
            'PrimarySmtpAddress' { $PrimarySmtpAddress }
            'UserPrincipalName' { $UserPrincipalName }
            default { $Identity }
        }
        if ($InactiveMailboxOnly) { return }
        if ($PSCmdlet.ParameterSetName -ne 'Anr' -and -not [string]::IsNullOrWhiteSpace($key) -and -not $key.Contains('*')) {
            Write-SimIdentityResult -Tenant $tenant -Identity $key -Shape ExoMailbox -Properties $propertyList `
                -RecipientTypeDetails $RecipientTypeDetails -SoftDeleted:$SoftDeletedMailbox
            return
        }
        $query = @{
            Tenant = $tenant; Shape = 'ExoMailbox'; Properties = $propertyList; FilterTree = $filterTree
            RecipientTypeDetails = $RecipientTypeDetails; ArchiveOnly = $Archive; SoftDeleted = $SoftDeletedMailbox; ResultSize = $limit
        }
        if ($PSCmdlet.ParameterSetName -eq 'Anr') { $query['Anr'] = $Anr }
        elseif ($key) { $query['IdentityPattern'] = $key }
        Invoke-SimMailboxQuery @query
    }
}

#endregion

#region REST-backed commands (not exported: the generated tmpEXO_ module wraps them)

function Get-Mailbox {
    [CmdletBinding(DefaultParameterSetName = 'Identity')]
    param(
        [Parameter(ParameterSetName = 'Identity', Position = 0, ValueFromPipeline, ValueFromPipelineByPropertyName)]
        [string]$Identity,
        [Parameter(ParameterSetName = 'AnrSet', Mandatory)]
        [string]$Anr,
        [switch]$Archive,
        [string]$Filter,
        [switch]$InactiveMailboxOnly,
        [switch]$IncludeInactiveMailbox,
        [ValidateSet('DiscoveryMailbox', 'EquipmentMailbox', 'GroupMailbox', 'LegacyMailbox', 'LinkedMailbox', 'LinkedRoomMailbox',
            'RoomMailbox', 'SchedulingMailbox', 'SharedMailbox', 'TeamMailbox', 'UserMailbox')]
        [string[]]$RecipientTypeDetails,
        [object]$ResultSize = 1000,
        [switch]$SoftDeletedMailbox,
        [ValidateSet('Name', 'DisplayName', 'Alias', 'City', 'FirstName', 'LastName', 'Office')]
        [string]$SortBy,
        [Parameter(DontShow)]
        [int]$ExoSimConnectionId
    )
    begin {
        $null = Assert-SimConnected -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId
        if ($env:EXO_SIM_NOISE) { Invoke-SimNoise -CommandName $MyInvocation.MyCommand.Name }
        $limit = 1000
        if ($PSBoundParameters.ContainsKey('ResultSize')) { $limit = ConvertTo-SimResultSize -Cmdlet $PSCmdlet -ResultSize $ResultSize }
        $filterTree = $null
        if ($Filter) { $filterTree = ConvertTo-SimFilterTree -Cmdlet $PSCmdlet -Filter $Filter }
    }
    process {
        if ($null -eq (Invoke-SimRequest -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId)) { return }
        $tenant = Get-SimTenant
        if ($InactiveMailboxOnly) { return }    # the simulated tenant has no inactive mailboxes
        if ($PSCmdlet.ParameterSetName -eq 'Identity' -and -not [string]::IsNullOrWhiteSpace($Identity) -and -not $Identity.Contains('*')) {
            Write-SimIdentityResult -Tenant $tenant -Identity $Identity -Shape Mailbox -RecipientTypeDetails $RecipientTypeDetails -SoftDeleted:$SoftDeletedMailbox
            return
        }
        $query = @{
            Tenant = $tenant; Shape = 'Mailbox'; FilterTree = $filterTree; RecipientTypeDetails = $RecipientTypeDetails
            ArchiveOnly = $Archive; SoftDeleted = $SoftDeletedMailbox; ResultSize = $limit; SortBy = $SortBy
        }
        if ($PSCmdlet.ParameterSetName -eq 'AnrSet') { $query['Anr'] = $Anr }
        elseif ($Identity) { $query['IdentityPattern'] = $Identity }
        Invoke-SimMailboxQuery @query
    }
}

function Get-User {
    [CmdletBinding(DefaultParameterSetName = 'Identity')]
    param(
        [Parameter(ParameterSetName = 'Identity', Position = 0, ValueFromPipeline, ValueFromPipelineByPropertyName)]
        [string]$Identity,
        [Parameter(ParameterSetName = 'AnrSet', Mandatory)]
        [string]$Anr,
        [string]$Filter,
        [ValidateSet('User', 'UserMailbox', 'SharedMailbox', 'RoomMailbox', 'EquipmentMailbox', 'MailUser', 'GuestMailUser', 'DisabledUser', 'LinkedUser')]
        [string[]]$RecipientTypeDetails,
        [object]$ResultSize = 1000,
        [Parameter(DontShow)]
        [int]$ExoSimConnectionId
    )
    begin {
        $null = Assert-SimConnected -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId
        if ($env:EXO_SIM_NOISE) { Invoke-SimNoise -CommandName $MyInvocation.MyCommand.Name }
        $limit = 1000
        if ($PSBoundParameters.ContainsKey('ResultSize')) { $limit = ConvertTo-SimResultSize -Cmdlet $PSCmdlet -ResultSize $ResultSize }
        $filterTree = $null
        if ($Filter) { $filterTree = ConvertTo-SimFilterTree -Cmdlet $PSCmdlet -Filter $Filter }
    }
    process {
        if ($null -eq (Invoke-SimRequest -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId)) { return }
        $tenant = Get-SimTenant
        if ($PSCmdlet.ParameterSetName -eq 'Identity' -and -not [string]::IsNullOrWhiteSpace($Identity) -and -not $Identity.Contains('*')) {
            Write-SimIdentityResult -Tenant $tenant -Identity $Identity -Shape User -RecipientTypeDetails $RecipientTypeDetails -Activity 'Get-User'
            return
        }
        $query = @{ Tenant = $tenant; Shape = 'User'; FilterTree = $filterTree; RecipientTypeDetails = $RecipientTypeDetails; ResultSize = $limit }
        if ($PSCmdlet.ParameterSetName -eq 'AnrSet') { $query['Anr'] = $Anr }
        elseif ($Identity) { $query['IdentityPattern'] = $Identity }
        Invoke-SimMailboxQuery @query
    }
}

function Set-Mailbox {
    [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'Medium')]
    param(
        [Parameter(Mandatory, Position = 0, ValueFromPipeline, ValueFromPipelineByPropertyName)]
        [string]$Identity,
        [string]$DisplayName,
        [string]$Office,
        [AllowEmptyString()][string]$CustomAttribute1,
        [AllowEmptyString()][string]$CustomAttribute2,
        [AllowEmptyString()][string]$CustomAttribute3,
        [AllowEmptyString()][string]$CustomAttribute4,
        [AllowEmptyString()][string]$CustomAttribute5,
        [bool]$HiddenFromAddressListsEnabled,
        [object]$EmailAddresses,
        [string]$ProhibitSendQuota,
        [switch]$Force,
        [Parameter(DontShow)]
        [int]$ExoSimConnectionId
    )
    begin {
        $null = Assert-SimConnected -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId
        if ($env:EXO_SIM_NOISE) { Invoke-SimNoise -CommandName $MyInvocation.MyCommand.Name }
        # The requested changes, validated once for the whole pipeline.
        $changes = [ordered]@{}
        foreach ($name in 'DisplayName', 'Office', 'CustomAttribute1', 'CustomAttribute2',
            'CustomAttribute3', 'CustomAttribute4', 'CustomAttribute5', 'HiddenFromAddressListsEnabled') {
            if ($PSBoundParameters.ContainsKey($name)) { $changes[$name] = $PSBoundParameters[$name] }
        }
        if ($PSBoundParameters.ContainsKey('ProhibitSendQuota')) {
            $quota = ConvertTo-SimQuota -Value $ProhibitSendQuota
            if ($null -eq $quota) {
                $message = 'Cannot process argument transformation on parameter ''ProhibitSendQuota''. Cannot convert value "{0}" to type "Microsoft.Exchange.Data.Unlimited`1[Microsoft.Exchange.Data.ByteQuantifiedSize]".' -f $ProhibitSendQuota
                $PSCmdlet.ThrowTerminatingError((New-SimErrorRecord -Exception ([ArgumentException]::new($message)) -ErrorId 'ParameterArgumentTransformationError' `
                            -Category InvalidData -Reason 'ParameterBindingArgumentTransformationException' -TargetObject $ProhibitSendQuota))
            }
            $changes['ProhibitSendQuota'] = $quota
        }
        if ($PSBoundParameters.ContainsKey('EmailAddresses') -and $null -eq (Merge-SimEmailAddress -Current @() -Change $EmailAddresses)) {
            if ($EmailAddresses -isnot [Collections.IDictionary]) {
                $PSCmdlet.ThrowTerminatingError((New-SimErrorRecord -Exception ([ArgumentException]::new('The value of EmailAddresses is not valid: every address needs the form prefix:address, and SMTP addresses need an @.')) `
                            -ErrorId 'ParameterArgumentValidationError' -Category InvalidArgument -Reason 'ParameterBindingValidationException' -TargetObject $EmailAddresses))
            }
        }
    }
    process {
        if ($null -eq (Invoke-SimRequest -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId -SkipLatency)) { return }
        $tenant = Get-SimTenant
        $target = Find-SimMailboxForWrite -Tenant $tenant -Identity $Identity
        if ($null -eq $target) { return }
        $description = 'Setting mailbox "{0}".' -f $target.Identity
        if (-not $PSCmdlet.ShouldProcess($description, "Are you sure you want to perform this action?`n$description", 'Confirm')) { return }

        # The EmailAddresses change, if one was given: whether it changed the record. The block runs inside
        # Update-SimMailboxRecord, whose own $PSCmdlet and $PSBoundParameters would shadow ours: what it
        # needs of this command is taken here.
        $setMailbox = $PSCmdlet
        $addressChange = if ($PSBoundParameters.ContainsKey('EmailAddresses')) { $EmailAddresses } else { $null }
        $applyAddresses = {
            param($current)
            if ($null -eq $addressChange) { return $false }
            $addresses = Merge-SimEmailAddress -Current @($current.EmailAddresses) -Change $addressChange
            if ($null -eq $addresses) {
                $setMailbox.ThrowTerminatingError((New-SimServerError -TenantInfo $tenant.Info -StringId 'Ex2C6D0E' -Class 'Microsoft.Exchange.Data.DataValidationException' `
                            -Text 'The EmailAddresses change leaves the mailbox without a valid primary SMTP address.' -Activity 'Set-Mailbox' -TargetObject $Identity))
            }
            if ((@($current.EmailAddresses) -join "`n") -ceq ($addresses -join "`n")) { return $false }
            $current.EmailAddresses = $addresses
            $current.PrimarySmtpAddress = ($addresses | Where-Object { $_.StartsWith('SMTP:', [StringComparison]::Ordinal) } | Select-Object -First 1).Substring(5)
            $true
        }
        Update-SimMailboxRecord -Tenant $tenant -Target $target -Identity $Identity -Cmdlet 'Set-Mailbox' -Changes $changes -Also $applyAddresses
    }
}

function Set-User {
    <#
        The user side of a mailbox: Department, City, FirstName, LastName (what Get-User shows). Same
        write path as Set-Mailbox: one mailbox lock, an audit line per completed write, the real
        no-change warning. (The -WhatIf text 'Setting user "<Identity>".' is a guess.)
    #>
    [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'Medium')]
    param(
        [Parameter(Mandatory, Position = 0, ValueFromPipeline, ValueFromPipelineByPropertyName)]
        [string]$Identity,
        [AllowEmptyString()][string]$Department,
        [AllowEmptyString()][string]$City,
        [AllowEmptyString()][string]$FirstName,
        [AllowEmptyString()][string]$LastName,
        [Parameter(DontShow)]
        [int]$ExoSimConnectionId
    )
    begin {
        $null = Assert-SimConnected -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId
        if ($env:EXO_SIM_NOISE) { Invoke-SimNoise -CommandName $MyInvocation.MyCommand.Name }
        $changes = [ordered]@{}
        foreach ($name in 'Department', 'City', 'FirstName', 'LastName') {
            if ($PSBoundParameters.ContainsKey($name)) { $changes[$name] = $PSBoundParameters[$name] }
        }
    }
    process {
        if ($null -eq (Invoke-SimRequest -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId -SkipLatency)) { return }
        $tenant = Get-SimTenant
        $target = Find-SimMailboxForWrite -Tenant $tenant -Identity $Identity -Activity 'Set-User'
        if ($null -eq $target) { return }
        $description = 'Setting user "{0}".' -f $target.Identity
        if (-not $PSCmdlet.ShouldProcess($description, "Are you sure you want to perform this action?`n$description", 'Confirm')) { return }

        Update-SimMailboxRecord -Tenant $tenant -Target $target -Identity $Identity -Cmdlet 'Set-User' -Changes $changes -NotFoundActivity 'Set-User'
    }
}

function Update-SimMailboxRecord {
    <#
        The write path Set-Mailbox and Set-User share. Under the mailbox's lock (read-modify-write:
        concurrent writers never lose an update) it reads the record, applies $Changes and whatever $Also
        changes (a script block given the record, returning whether it changed it), and writes the record
        back when anything changed; then it audits the write and warns, as the real module does, when
        nothing changed. The latency is inside the audited window.
    #>
    [CmdletBinding()]
    param(
        [Parameter(Mandatory)]$Tenant,
        [Parameter(Mandatory)]$Target,
        [Parameter(Mandatory)][string]$Identity,
        [Parameter(Mandatory)][string]$Cmdlet,
        [Parameter(Mandatory)][Collections.IDictionary]$Changes,
        [scriptblock]$Also,
        [string]$NotFoundActivity = 'Get-Recipient'
    )
    $start = [DateTime]::UtcNow
    Invoke-SimLatency
    $file = Get-SimMailboxFile -Layout $Tenant.Layout -Alias $Target.Alias
    $changed = $false
    $lock = Enter-SimFileLock -Path ([IO.Path]::Combine($Tenant.Layout.Locks, $Target.Alias.ToLowerInvariant() + '.lock'))
    try {
        $current = Read-SimMailboxFile -File $file
        if ($null -eq $current) {
            Write-ErrorMessage -ErrorRecord (New-SimNotFoundError -TenantInfo $Tenant.Info -Identity $Identity -Activity $NotFoundActivity)
            return
        }
        $changed = Set-SimRecordProperty -Record $current -Changes $Changes
        if ($Also -and (& $Also $current)) { $changed = $true }
        if ($changed) {
            $current.WhenChanged = [DateTime]::UtcNow
            Write-SimFileAtomic -Path $file -Text (ConvertTo-SimJson -InputObject $current)
        }
    }
    finally {
        $lock.Dispose()
    }
    Add-SimAuditEntry -Layout $Tenant.Layout -Cmdlet $Cmdlet -Identity $Identity -Start $start -End ([DateTime]::UtcNow)
    if (-not $changed) {
        Write-Warning ("The command completed successfully but no settings of '{0}' have been modified." -f $current.Identity)
    }
}

function Set-SimRecordProperty {
    <#
        Applies $Changes (name -> value) to a stored record; returns whether anything changed
        (ordinal string comparison). A property missing from an older record is added.
    #>
    [CmdletBinding()]
    [OutputType([bool])]
    param([Parameter(Mandatory)]$Record, [Parameter(Mandatory)][Collections.IDictionary]$Changes)
    $changed = $false
    foreach ($name in $Changes.Keys) {
        $property = $Record.PSObject.Properties[$name]
        if ($null -eq $property) {
            $Record | Add-Member -NotePropertyName $name -NotePropertyValue $Changes[$name]
            $changed = $true
        }
        elseif (-not [string]::Equals([string]$property.Value, [string]$Changes[$name], [StringComparison]::Ordinal)) {
            $property.Value = $Changes[$name]
            $changed = $true
        }
    }
    return $changed
}

function New-Mailbox {
    [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'Medium', DefaultParameterSetName = 'User')]
    param(
        [Parameter(Mandatory, Position = 0)]
        [ValidateLength(1, 64)]
        [string]$Name,
        [string]$Alias,
        [string]$DisplayName,
        [string]$PrimarySmtpAddress,
        [string]$MicrosoftOnlineServicesID,
        [Parameter(ParameterSetName = 'User')]
        [securestring]$Password,
        [Parameter(ParameterSetName = 'Shared', Mandatory)]
        [switch]$Shared,
        [Parameter(ParameterSetName = 'Room', Mandatory)]
        [switch]$Room,
        [string]$FirstName,
        [string]$LastName,
        [Parameter(DontShow)]
        [int]$ExoSimConnectionId
    )
    begin {
        $null = Assert-SimConnected -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId
        if ($env:EXO_SIM_NOISE) { Invoke-SimNoise -CommandName $MyInvocation.MyCommand.Name }
    }
    process {
        if ($null -eq (Invoke-SimRequest -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId -SkipLatency)) { return }
        $tenant = Get-SimTenant
        $info = $tenant.Info
        $Name = $Name.Trim()
        if ($PSBoundParameters.ContainsKey('Alias')) {
            if (-not (Test-SimAlias -Alias $Alias)) {
                $text = 'Property expression "{0}" isn''t valid. Valid values are: Strings formed with characters from A to Z (uppercase or lowercase), digits from 0 to 9, !, #, $, %, &, '', +, -, =, ^, _, `, {{, }} or ~. One or more periods may be embedded in an alias, but each period should be preceded and followed by at least one of the other characters. (The simulation does not accept *, /, | or ?.)' -f $Alias
                $PSCmdlet.ThrowTerminatingError((New-SimServerError -TenantInfo $info -StringId 'Ex7B2A1C' -Class 'Microsoft.Exchange.Data.DataValidationException' -Text $text -Activity 'New-Mailbox' -TargetObject $Alias))
            }
            $newAlias = $Alias
        }
        else {
            $newAlias = ConvertTo-SimAlias -Name $Name
        }
        foreach ($address in $PrimarySmtpAddress, $MicrosoftOnlineServicesID) {
            if ($address -and $address -notmatch '^[^@\s]+@[^@\s]+\.[^@\s]+$') {
                $text = 'The email address "{0}" isn''t correct. Please use this format: user name, the @ sign, followed by the domain name. For example, tonysmith@contoso.com or tony.smith@contoso.com.' -f $address
                $PSCmdlet.ThrowTerminatingError((New-SimServerError -TenantInfo $info -StringId 'Ex5A3F6B' -Class 'Microsoft.Exchange.Data.DataValidationException' -Text $text -Activity 'New-Mailbox' -TargetObject $address))
            }
        }
        $type = if ($Shared) { 'SharedMailbox' } elseif ($Room) { 'RoomMailbox' } else { 'UserMailbox' }
        $description = 'Creating mailbox "{0}".' -f $Name
        if (-not $PSCmdlet.ShouldProcess($description, "Are you sure you want to perform this action?`n$description", 'Confirm')) { return }

        $start = [DateTime]::UtcNow
        Invoke-SimLatency
        $file = Get-SimMailboxFile -Layout $tenant.Layout -Alias $newAlias
        $nameKey = Get-SimNameKey -Name $Name
        $claim = [IO.Path]::Combine($tenant.Layout.Names, $nameKey)
        # Lock order: alias, then name (Remove-Mailbox takes them in the same order).
        $aliasLock = Enter-SimFileLock -Path ([IO.Path]::Combine($tenant.Layout.Locks, $newAlias.ToLowerInvariant() + '.lock'))
        try {
            $nameLock = Enter-SimFileLock -Path ([IO.Path]::Combine($tenant.Layout.Locks, "name-$nameKey.lock"))
            try {
                $existing = Read-SimMailboxFile -File $file
                if ($null -ne $existing) {
                    if ([string]::Equals($existing.Name, $Name, [StringComparison]::OrdinalIgnoreCase)) {
                        $PSCmdlet.ThrowTerminatingError((New-SimDuplicateNameError -TenantInfo $info -Name $Name))
                    }
                    $text = 'The proxy address "SMTP:{0}" is already being used by the proxy addresses or LegacyExchangeDN. Please choose another proxy address.' -f $existing.PrimarySmtpAddress
                    $PSCmdlet.ThrowTerminatingError((New-SimServerError -TenantInfo $info -StringId 'Ex1E8F3B' -Class 'Microsoft.Exchange.Data.Directory.ProxyAddressExistsException' -Text $text -Activity 'New-Mailbox' -TargetObject $Name))
                }
                # Is the Name taken? By a claim (mailboxes whose Name differs from their Alias), or by
                # the mailbox whose Alias is this Name and whose Name is too (it has no claim).
                if ([IO.File]::Exists($claim)) {
                    $owner = [IO.File]::ReadAllText($claim, $script:SimUtf8).Trim()
                    $ownerRecord = if (Test-SimAlias -Alias $owner) { Read-SimMailboxFile -File (Get-SimMailboxFile -Layout $tenant.Layout -Alias $owner) } else { $null }
                    if ($null -ne $ownerRecord -and [string]::Equals($ownerRecord.Name, $Name, [StringComparison]::OrdinalIgnoreCase)) {
                        $PSCmdlet.ThrowTerminatingError((New-SimDuplicateNameError -TenantInfo $info -Name $Name))
                    }
                    # A claim whose mailbox is gone (a process died between the two deletes of
                    # Remove-Mailbox) is stale and may be taken over: we hold the Name's lock.
                    [IO.File]::Delete($claim)
                }
                if (Test-SimAlias -Alias $Name) {
                    $sameAlias = Read-SimMailboxFile -File (Get-SimMailboxFile -Layout $tenant.Layout -Alias $Name)
                    if ($null -ne $sameAlias -and [string]::Equals($sameAlias.Name, $Name, [StringComparison]::OrdinalIgnoreCase)) {
                        $PSCmdlet.ThrowTerminatingError((New-SimDuplicateNameError -TenantInfo $info -Name $Name))
                    }
                }
                if (-not [string]::Equals($Name, $newAlias, [StringComparison]::OrdinalIgnoreCase)) {
                    $stream = [IO.FileStream]::new($claim, [IO.FileMode]::CreateNew, [IO.FileAccess]::Write, [IO.FileShare]::Read)
                    try { $bytes = $script:SimUtf8.GetBytes($newAlias); $stream.Write($bytes, 0, $bytes.Length) } finally { $stream.Dispose() }
                }

                $spec = @{
                    Alias = $newAlias; Name = $Name; RecipientTypeDetails = $type
                    DisplayName = if ($DisplayName) { $DisplayName } else { $Name }
                    FirstName = $FirstName; LastName = $LastName
                    UserPrincipalName = if ($MicrosoftOnlineServicesID) { $MicrosoftOnlineServicesID } else { "$newAlias@$($info.Organization)" }
                    PrimarySmtpAddress = if ($PrimarySmtpAddress) { $PrimarySmtpAddress } else { "$newAlias@$($info.Organization)" }
                }
                $record = New-SimMailboxRecord -TenantInfo $info -Spec $spec
                Write-SimFileAtomic -Path $file -Text (ConvertTo-SimJson -InputObject $record)
            }
            finally {
                $nameLock.Dispose()
            }
        }
        finally {
            $aliasLock.Dispose()
        }
        $end = [DateTime]::UtcNow
        Add-SimAuditEntry -Layout $tenant.Layout -Cmdlet 'New-Mailbox' -Identity $Name -Start $start -End $end
        ConvertTo-SimShape -Record ([pscustomobject]$record) -Shape Mailbox
    }
}

function New-SimDuplicateNameError {
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param([Parameter(Mandatory)]$TenantInfo, [Parameter(Mandatory)][string]$Name)
    $text = 'The name "{0}" is being used by another recipient object. Please specify a unique value.' -f $Name
    return New-SimServerError -TenantInfo $TenantInfo -StringId 'Ex9A5A5D' -Class 'Microsoft.Exchange.Data.Directory.ADObjectAlreadyExistsException' `
        -Text $text -Activity 'New-Mailbox' -TargetObject $Name
}

function Remove-Mailbox {
    [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'High')]
    param(
        [Parameter(Mandatory, Position = 0, ValueFromPipeline, ValueFromPipelineByPropertyName)]
        [string]$Identity,
        [bool]$Permanent = $false,
        [switch]$Force,
        [Parameter(DontShow)]
        [int]$ExoSimConnectionId
    )
    begin {
        $null = Assert-SimConnected -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId
        if ($env:EXO_SIM_NOISE) { Invoke-SimNoise -CommandName $MyInvocation.MyCommand.Name }
    }
    process {
        if ($null -eq (Invoke-SimRequest -Cmdlet $PSCmdlet -ConnectionId $ExoSimConnectionId -SkipLatency)) { return }
        $tenant = Get-SimTenant
        $target = Find-SimMailboxForWrite -Tenant $tenant -Identity $Identity
        if ($null -eq $target) { return }
        $description = 'Removing mailbox Identity:"{0}" will remove the user object and mark the mailbox and the archive (if present) for removal.' -f $target.Identity
        if (-not $PSCmdlet.ShouldProcess($description, "Are you sure you want to perform this action?`n$description", 'Confirm')) { return }

        $start = [DateTime]::UtcNow
        Invoke-SimLatency
        $file = Get-SimMailboxFile -Layout $tenant.Layout -Alias $target.Alias
        $nameKey = Get-SimNameKey -Name $target.Name
        $aliasLock = Enter-SimFileLock -Path ([IO.Path]::Combine($tenant.Layout.Locks, $target.Alias.ToLowerInvariant() + '.lock'))
        try {
            $nameLock = Enter-SimFileLock -Path ([IO.Path]::Combine($tenant.Layout.Locks, "name-$nameKey.lock"))
            try {
                $current = Read-SimMailboxFile -File $file
                if ($null -eq $current) {
                    Write-ErrorMessage -ErrorRecord (New-SimNotFoundError -TenantInfo $tenant.Info -Identity $Identity)
                    return
                }
                if (-not $Permanent) {
                    $current.IsSoftDeletedByRemove = $true
                    $current.WhenSoftDeleted = [DateTime]::UtcNow
                    $null = [IO.Directory]::CreateDirectory($tenant.Layout.SoftDeleted)
                    Write-SimFileAtomic -Path (Get-SimMailboxFile -Layout $tenant.Layout -Alias $target.Alias -SoftDeleted) -Text (ConvertTo-SimJson -InputObject $current)
                }
                # Mailbox first, then its Name claim: a claim without a mailbox is recognised as stale.
                [IO.File]::Delete($file)
                [IO.File]::Delete([IO.Path]::Combine($tenant.Layout.Names, $nameKey))    # no-op when there is no claim
            }
            finally {
                $nameLock.Dispose()
            }
        }
        finally {
            $aliasLock.Dispose()
        }
        $end = [DateTime]::UtcNow
        Add-SimAuditEntry -Layout $tenant.Layout -Cmdlet 'Remove-Mailbox' -Identity $Identity -Start $start -End $end
    }
}

#endregion

Export-ModuleMember -Function Connect-ExchangeOnline, Disconnect-ExchangeOnline, Get-ConnectionInformation, Get-EXOMailbox
