# SimStore.ps1 - tenant storage of the ExchangeOnlineManagement SIMULATION (psbridge tests).
#
# Dot-sourced by ExchangeOnlineManagement.psm1 and by ../../New-SimTenant.ps1, so seeding a tenant is
# one piece of code. Nothing here talks to Exchange Online: the "tenant" is a folder shared by every
# pwsh process that uses the simulation.
#
# Layout of a tenant folder (all text UTF-8 without BOM):
#   tenant.json               organization, tenant id, registered AppIds, server names. Written LAST
#                             when seeding: its presence means "the tenant is complete".
#   mailboxes/<alias>.json    one mailbox per file, alias lower-cased. Always replaced atomically
#                             (temp file in the same folder + rename(2)), so readers never take a lock
#                             and never see half a file.
#   names/<key>               Name -> alias claim (content: the alias) of a mailbox whose Name differs
#                             from its Alias. When Name equals Alias the mailbox file itself is the
#                             claim (this keeps a seeded tenant at one file per mailbox).
#   softdeleted/<alias>.json  mailboxes removed without -Permanent (Get-Mailbox -SoftDeletedMailbox).
#   locks/*.lock              write locks: a FileStream opened with FileShare.None (flock(LOCK_EX) on
#                             Unix). Lock files are never deleted, which avoids unlink/open races.
#   .seed.lock                held while a tenant is (re)seeded.
#   audit.jsonl               one JSON line per completed write (see Add-SimAuditEntry).
#
# Concurrency rules (several pwsh processes write at once):
#   * a writer of mailbox <alias> holds locks/<alias>.lock for its read-modify-write;
#   * New-Mailbox / Remove-Mailbox also hold locks/name-<key>.lock (always AFTER the alias lock), so
#     checking that a Name is free and taking it happen as one step;
#   * readers never lock: they read whole files that are only ever replaced by rename.
# Note: .NET honours DOTNET_SYSTEM_IO_DISABLEFILELOCKING; with it set, FileShare.None locks nothing.

Set-StrictMode -Version Latest
# No $ErrorActionPreference at file level: a value set here would leak into the module's script scope
# (and change how the public commands report errors) and into New-SimTenant.ps1. Functions that must
# fail fast set it locally.

# The JSON converters of Microsoft.PowerShell.Commands.Utility are public, and calling them directly
# costs about a tenth of ConvertFrom-Json / ConvertTo-Json (no cmdlet pipeline per object).
Add-Type -AssemblyName Microsoft.PowerShell.Commands.Utility
$script:SimJsonType = [Microsoft.PowerShell.Commands.JsonObject]
$script:SimJsonContextType = [Microsoft.PowerShell.Commands.JsonObject+ConvertToJsonContext]
$script:SimUtf8 = [Text.UTF8Encoding]::new($false)
$script:SimWellKnownAppId = '11111111-2222-3333-4444-555555555555'
$script:SimDefaultMailboxCount = 200
# Characters allowed in an alias here: RFC 5322 atoms as Exchange allows them, minus '*', '/', '|'
# and '?', which would be wildcards or path separators in the simulation's file names.
$script:SimAliasPattern = '^[A-Za-z0-9!#$%&''+=^_`{}~-]+(\.[A-Za-z0-9!#$%&''+=^_`{}~-]+)*$'
$script:SimLayoutCache = @{}
$script:SimTenantCache = $null
$script:SimIndex = $null

function Get-SimTenantPath {
    <# Folder of the shared tenant: $env:EXO_SIM_TENANT, else XDG data home / psbridge/sim-tenant. #>
    [CmdletBinding()]
    [OutputType([string])]
    param()
    # Read at every call, never cached: tests point processes at different tenants.
    $explicit = [Environment]::GetEnvironmentVariable('EXO_SIM_TENANT')
    if (-not [string]::IsNullOrWhiteSpace($explicit)) {
        return [IO.Path]::GetFullPath($explicit)
    }
    $xdg = [Environment]::GetEnvironmentVariable('XDG_DATA_HOME')
    $base = if (-not [string]::IsNullOrWhiteSpace($xdg)) { $xdg } else { [IO.Path]::Combine($HOME, '.local', 'share') }
    return [IO.Path]::GetFullPath([IO.Path]::Combine($base, 'psbridge', 'sim-tenant'))
}

function Get-SimTenantLayout {
    <# The paths of one tenant folder (cached per folder). #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][string]$Path)
    $root = [IO.Path]::GetFullPath($Path)
    $layout = $script:SimLayoutCache[$root]
    if ($null -eq $layout) {
        $layout = [pscustomobject]@{
            Root        = $root
            TenantFile  = [IO.Path]::Combine($root, 'tenant.json')
            Mailboxes   = [IO.Path]::Combine($root, 'mailboxes')
            Names       = [IO.Path]::Combine($root, 'names')
            SoftDeleted = [IO.Path]::Combine($root, 'softdeleted')
            Locks       = [IO.Path]::Combine($root, 'locks')
            Audit       = [IO.Path]::Combine($root, 'audit.jsonl')
            AuditLock   = [IO.Path]::Combine($root, 'locks', 'audit.lock')
            SeedLock    = [IO.Path]::Combine($root, '.seed.lock')
        }
        $script:SimLayoutCache[$root] = $layout
    }
    return $layout
}

function Enter-SimFileLock {
    <# Opens $Path with FileShare.None, retrying while another process holds it. Dispose to release. #>
    [CmdletBinding()]
    [OutputType([IO.FileStream])]
    param(
        [Parameter(Mandatory)][string]$Path,
        [ValidateRange(1, [int]::MaxValue)][int]$TimeoutMilliseconds = 60000
    )
    $ErrorActionPreference = 'Stop'
    $clock = [Diagnostics.Stopwatch]::StartNew()
    while ($true) {
        try {
            return [IO.FileStream]::new($Path, [IO.FileMode]::OpenOrCreate, [IO.FileAccess]::ReadWrite, [IO.FileShare]::None, 1)
        }
        catch [IO.DirectoryNotFoundException] {
            $null = [IO.Directory]::CreateDirectory([IO.Path]::GetDirectoryName($Path))
        }
        catch [IO.IOException] {
            # "being used by another process": somebody else holds it.
            if ($clock.ElapsedMilliseconds -ge $TimeoutMilliseconds) {
                throw [TimeoutException]::new("Timed out after $TimeoutMilliseconds ms waiting for the lock '$Path'.")
            }
            # Short jittered sleeps. Start-Sleep (not Thread.Sleep) keeps the wait stoppable.
            Start-Sleep -Milliseconds ([Random]::Shared.Next(1, 5))
        }
    }
}

function Write-SimFileAtomic {
    <# Replaces $Path with $Text atomically: temp file in the same folder, then rename(2) over it. #>
    [CmdletBinding()]
    param(
        [Parameter(Mandatory)][string]$Path,
        [Parameter(Mandatory)][AllowEmptyString()][string]$Text
    )
    $ErrorActionPreference = 'Stop'
    $folder = [IO.Path]::GetDirectoryName($Path)
    # The temp name does not end in .json, so folder enumerations never pick it up.
    $temp = [IO.Path]::Combine($folder, '.' + [IO.Path]::GetFileName($Path) + '.' + [Guid]::NewGuid().ToString('N') + '.tmp')
    try {
        [IO.File]::WriteAllText($temp, $Text, $script:SimUtf8)
        [IO.File]::Move($temp, $Path, $true)
    }
    catch {
        if ([IO.File]::Exists($temp)) { [IO.File]::Delete($temp) }
        throw
    }
}

function ConvertTo-SimJson {
    <# Compact JSON (dates as ISO 8601 round-trip, enums as strings). #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][AllowNull()][object]$InputObject)
    $context = $script:SimJsonContextType::new(8, $true, $true)
    return $script:SimJsonType::ConvertToJson($InputObject, [ref]$context)
}

function ConvertFrom-SimJson {
    <# Parses JSON into PSCustomObjects; ISO 8601 strings become DateTime. Throws on bad JSON. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][AllowEmptyString()][string]$Text, [string]$Source = 'JSON')
    $parseError = $null
    $value = $script:SimJsonType::ConvertFromJson($Text, [ref]$parseError)
    if ($null -ne $parseError) {
        throw [IO.InvalidDataException]::new("Cannot parse $Source`: $($parseError.Exception.Message)")
    }
    return $value
}

function Read-SimMailboxFile {
    <# The mailbox stored in $File as a PSCustomObject, or $null when the file does not exist (any more). #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][string]$File)
    if (-not [IO.File]::Exists($File)) { return $null }
    try {
        $text = [IO.File]::ReadAllText($File, $script:SimUtf8)
    }
    catch [IO.FileNotFoundException] {
        return $null    # removed between the check and the read
    }
    # ConvertFrom-SimJson inlined: this is on the path of every identity lookup.
    $parseError = $null
    $record = $script:SimJsonType::ConvertFromJson($text, [ref]$parseError)
    if ($null -ne $parseError) { throw [IO.InvalidDataException]::new("Cannot parse $File`: $($parseError.Exception.Message)") }
    return $record
}

function Get-SimMailboxFile {
    <# Path of the file of mailbox $Alias. #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)]$Layout, [Parameter(Mandatory)][string]$Alias, [switch]$SoftDeleted)
    $folder = if ($SoftDeleted) { $Layout.SoftDeleted } else { $Layout.Mailboxes }
    return [IO.Path]::Combine($folder, $Alias.ToLowerInvariant() + '.json')
}

function Test-SimAlias {
    <# True when $Alias can be an alias (and so a file name) in the simulation. #>
    [CmdletBinding()]
    [OutputType([bool])]
    param([AllowEmptyString()][string]$Alias)
    return ($Alias.Length -ge 1 -and $Alias.Length -le 64 -and $Alias -match $script:SimAliasPattern)
}

function Get-SimNameKey {
    <# File name under names/ for a mailbox Name (readable when the Name is simple, else a hash). #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][string]$Name)
    $lower = $Name.Trim().ToLowerInvariant()
    if ($lower -cmatch '^[a-z0-9][a-z0-9_.-]{0,99}$') { return 'n-' + $lower }
    $hash = [Security.Cryptography.SHA256]::HashData($script:SimUtf8.GetBytes($lower))
    return 'h-' + [Convert]::ToHexString($hash).ToLowerInvariant()
}

function Get-SimDeterministicGuid {
    <# A stable GUID (version-4 shaped) derived from $Seed, so seeded tenants are identical everywhere. #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][string]$Seed)
    $bytes = [Security.Cryptography.MD5]::HashData($script:SimUtf8.GetBytes($Seed))
    $bytes[7] = ($bytes[7] -band 0x0F) -bor 0x40
    $bytes[8] = ($bytes[8] -band 0x3F) -bor 0x80
    return [Guid]::new($bytes).ToString()
}

function New-SimTenantInfo {
    <# Content of tenant.json for a freshly seeded tenant. #>
    [CmdletBinding()]
    param([int]$Mailboxes = $script:SimDefaultMailboxCount, [string[]]$ExtraAppId = @())
    $appIds = [Collections.Generic.List[string]]::new()
    $appIds.Add($script:SimWellKnownAppId)
    foreach ($id in $ExtraAppId) { if ($id -and -not $appIds.Contains($id)) { $appIds.Add($id) } }
    return [ordered]@{
        SchemaVersion    = 1
        Simulation       = 'ExchangeOnlineManagement simulation for psbridge tests'
        Organization     = 'contoso.onmicrosoft.com'
        DisplayName      = 'Contoso'
        TenantId         = Get-SimDeterministicGuid -Seed 'psbridge-sim:tenant:contoso'
        AppIds           = $appIds.ToArray()
        # Server: the mailbox server named in FullyQualifiedErrorIds ([Server=...]);
        # DomainController: the server named in "couldn't be found on '...'" messages.
        Server           = 'SN6PR01MB4444'
        DomainController = 'SN6PR01A001DC03.NAMPR01A001.PROD.OUTLOOK.COM'
        Forest           = 'NAMPR01A001.PROD.OUTLOOK.COM'
        InitialMailboxes = $Mailboxes
    }
}

function Format-SimByteQuota {
    <# Exchange's ByteQuantifiedSize text, e.g. 99 GB (106,300,440,576 bytes). #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][long]$Bytes)
    $units = @(@('TB', 1TB), @('GB', 1GB), @('MB', 1MB), @('KB', 1KB))
    $text = "$Bytes B"
    foreach ($unit in $units) {
        if ($Bytes -ge $unit[1]) {
            $value = [Math]::Round($Bytes / $unit[1], 3)
            $text = '{0} {1}' -f $value.ToString([Globalization.CultureInfo]::InvariantCulture), $unit[0]
            break
        }
    }
    return '{0} ({1} bytes)' -f $text, $Bytes.ToString('N0', [Globalization.CultureInfo]::InvariantCulture)
}

function New-SimMailboxRecord {
    <#
        The stored form of a mailbox and its user: an ordered dictionary with the properties
        Get-Mailbox emits, in output order, followed by the user's FirstName, LastName, Department and
        City (Get-User / Set-User; Get-Mailbox and Get-EXOMailbox drop them).
        $Spec keys: Alias, Name (required); DisplayName, FirstName, LastName, UserPrincipalName,
        PrimarySmtpAddress, RecipientTypeDetails, Department, Office, City, CustomAttribute1..5,
        HiddenFromAddressListsEnabled, ArchiveStatus, WhenCreated, Guid, ExchangeGuid,
        ExternalDirectoryObjectId (all optional).
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)]$TenantInfo, [Parameter(Mandatory)][hashtable]$Spec)
    $org = $TenantInfo.Organization
    $forest = $TenantInfo.Forest
    $alias = $Spec['Alias']
    $name = $Spec['Name']
    $upn = if ($Spec['UserPrincipalName']) { $Spec['UserPrincipalName'] } else { "$alias@$org" }
    $smtp = if ($Spec['PrimarySmtpAddress']) { $Spec['PrimarySmtpAddress'] } else { "$alias@$org" }
    $created = if ($null -ne $Spec['WhenCreated']) { ([datetime]$Spec['WhenCreated']).ToUniversalTime() } else { [datetime]::UtcNow }
    $addresses = [Collections.Generic.List[string]]::new()
    $addresses.Add("SMTP:$smtp")
    if (-not [string]::Equals($upn, $smtp, [StringComparison]::OrdinalIgnoreCase)) { $addresses.Add("smtp:$upn") }
    $dcPart = 'DC=' + $forest.Replace('.', ',DC=')
    $record = [ordered]@{
        Identity                      = $name
        Id                            = $name
        Name                          = $name
        Alias                         = $alias
        DisplayName                   = if ($null -ne $Spec['DisplayName']) { [string]$Spec['DisplayName'] } else { $name }
        PrimarySmtpAddress            = $smtp
        UserPrincipalName             = $upn
        EmailAddresses                = $addresses.ToArray()
        RecipientType                 = 'UserMailbox'
        RecipientTypeDetails          = if ($Spec['RecipientTypeDetails']) { $Spec['RecipientTypeDetails'] } else { 'UserMailbox' }
        Guid                          = if ($Spec['Guid']) { $Spec['Guid'] } else { [Guid]::NewGuid().ToString() }
        ExchangeGuid                  = if ($Spec['ExchangeGuid']) { $Spec['ExchangeGuid'] } else { [Guid]::NewGuid().ToString() }
        ExternalDirectoryObjectId     = if ($Spec['ExternalDirectoryObjectId']) { $Spec['ExternalDirectoryObjectId'] } else { [Guid]::NewGuid().ToString() }
        DistinguishedName             = "CN=$name,OU=$org,OU=Microsoft Exchange Hosted Organizations,$dcPart"
        OrganizationId                = "$forest/Microsoft Exchange Hosted Organizations/$org - $forest/ConfigurationUnits/$org/Configuration"
        ExchangeVersion               = '0.20 (15.0.0.0)'
        Office                        = [string]$Spec['Office']
        CustomAttribute1              = [string]$Spec['CustomAttribute1']
        CustomAttribute2              = [string]$Spec['CustomAttribute2']
        CustomAttribute3              = [string]$Spec['CustomAttribute3']
        CustomAttribute4              = [string]$Spec['CustomAttribute4']
        CustomAttribute5              = [string]$Spec['CustomAttribute5']
        HiddenFromAddressListsEnabled = [bool]$Spec['HiddenFromAddressListsEnabled']
        IsMailboxEnabled              = $true
        IsInactiveMailbox             = $false
        IsSoftDeletedByRemove         = $false
        WhenSoftDeleted               = $null
        ArchiveStatus                 = if ($Spec['ArchiveStatus']) { $Spec['ArchiveStatus'] } else { 'None' }
        ProhibitSendQuota             = '99 GB (106,300,440,576 bytes)'
        ProhibitSendReceiveQuota      = '100 GB (107,374,182,400 bytes)'
        IssueWarningQuota             = '98 GB (105,226,698,752 bytes)'
        WhenCreated                   = $created
        WhenChanged                   = $created
        FirstName                     = [string]$Spec['FirstName']
        LastName                      = [string]$Spec['LastName']
        Department                    = [string]$Spec['Department']
        City                          = [string]$Spec['City']
    }
    return $record
}

# People of the sample tenant whose names exercise Unicode (BMP, right-to-left, CJK, a surrogate pair).
$script:SimSeedPeople = @{
    1 = @('José Müller', 'José', 'Müller')
    2 = @('Zoë 李', 'Zoë', '李')
    3 = @('مريم', 'مريم', '')
    4 = @('Анна Петрова', 'Анна', 'Петрова')
    5 = @('François Ñúñez', 'François', 'Ñúñez')
    6 = @('田中 太郎', '太郎', '田中')
    7 = @('Emoji 😀 Tester', 'Emoji', 'Tester')
}
$script:SimSeedDepartments = @('Sales', 'Marketing', 'Engineering', 'Finance', 'Human Resources', 'Legal', 'Support', 'Operations')
$script:SimSeedCities = @('Seattle', 'London', 'München', 'Tokyo', 'São Paulo', 'Zürich', 'Paris', 'Reykjavík')
$script:SimSeedEpoch = [datetime]::new(2023, 1, 1, 0, 0, 0, [DateTimeKind]::Utc)

function Get-SimSeedSpec {
    <#
        Mailbox number $Index of the sample tenant. Deterministic: ContosoUser<Index> is the Alias and
        Name; every 50th (from 10) is a RoomMailbox, every other 20th a SharedMailbox; 1..7 carry
        Unicode display names; every 3rd has an active archive; every 25th is hidden from address lists.
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][int]$Index)
    $alias = "ContosoUser$Index"
    $type = 'UserMailbox'
    $display = "Contoso User $Index"
    $first = 'Contoso'
    $last = "User$Index"
    if ($Index % 50 -eq 10) {
        $type = 'RoomMailbox'; $display = "Conference Room $Index"; $first = ''; $last = ''
    }
    elseif ($Index % 20 -eq 0) {
        $type = 'SharedMailbox'; $display = "Shared Mailbox $Index"; $first = ''; $last = ''
    }
    elseif ($script:SimSeedPeople.ContainsKey($Index)) {
        $person = $script:SimSeedPeople[$Index]
        $display = $person[0]; $first = $person[1]; $last = $person[2]
    }
    $spec = @{
        Alias                         = $alias
        Name                          = $alias
        DisplayName                   = $display
        FirstName                     = $first
        LastName                      = $last
        RecipientTypeDetails          = $type
        Department                    = $script:SimSeedDepartments[$Index % $script:SimSeedDepartments.Count]
        Office                        = 'Building {0}' -f (($Index % 5) + 1)
        City                          = $script:SimSeedCities[$Index % $script:SimSeedCities.Count]
        CustomAttribute1              = 'CostCenter-{0}' -f (1000 + ($Index % 10))
        CustomAttribute2              = 'Tier{0}' -f (($Index % 3) + 1)
        HiddenFromAddressListsEnabled = ($Index % 25 -eq 0)
        ArchiveStatus                 = if ($Index % 3 -eq 0) { 'Active' } else { 'None' }
        WhenCreated                   = $script:SimSeedEpoch.AddMinutes($Index)
    }
    # Get-SimDeterministicGuid, inlined: seeding 50,000 mailboxes calls this 150,000 times.
    foreach ($kind in 'Guid', 'ExchangeGuid', 'ExternalDirectoryObjectId') {
        $bytes = [Security.Cryptography.MD5]::HashData($script:SimUtf8.GetBytes("psbridge-sim:$($kind.ToLowerInvariant()):$Index"))
        $bytes[7] = ($bytes[7] -band 0x0F) -bor 0x40
        $bytes[8] = ($bytes[8] -band 0x3F) -bor 0x80
        $spec[$kind] = [Guid]::new($bytes).ToString()
    }
    return $spec
}

function Initialize-SimTenant {
    <#
        Seeds the tenant at $Path with $Mailboxes sample mailboxes (ContosoUser1..N).
        Without -Force it only seeds when the folder has no complete tenant yet (returns $false when
        another process got there first); with -Force it re-creates the tenant.
        Safe when several processes start at once: the work happens under <Path>/.seed.lock, and
        tenant.json (the "complete" marker) is written last.
    #>
    [CmdletBinding()]
    [OutputType([bool])]
    param(
        [Parameter(Mandatory)][string]$Path,
        [ValidateRange(0, 10000000)][int]$Mailboxes = $script:SimDefaultMailboxCount,
        [string[]]$ExtraAppId = @(),
        [switch]$Force
    )
    $ErrorActionPreference = 'Stop'
    $layout = Get-SimTenantLayout -Path $Path
    $null = [IO.Directory]::CreateDirectory($layout.Root)
    # Seeding 50,000 mailboxes takes a while; waiters must outlast it.
    $seedLock = Enter-SimFileLock -Path $layout.SeedLock -TimeoutMilliseconds 600000
    try {
        if (-not $Force -and [IO.File]::Exists($layout.TenantFile)) { return $false }

        # Remove the previous tenant, or the debris of an interrupted seed. tenant.json goes first so
        # no process treats the half-deleted folder as a tenant.
        if ([IO.File]::Exists($layout.TenantFile)) { [IO.File]::Delete($layout.TenantFile) }
        foreach ($folder in $layout.Mailboxes, $layout.Names, $layout.SoftDeleted) {
            if ([IO.Directory]::Exists($folder)) { [IO.Directory]::Delete($folder, $true) }
        }
        if ([IO.File]::Exists($layout.Audit)) { [IO.File]::Delete($layout.Audit) }
        foreach ($folder in $layout.Mailboxes, $layout.Names, $layout.SoftDeleted, $layout.Locks) {
            $null = [IO.Directory]::CreateDirectory($folder)
        }

        $info = New-SimTenantInfo -Mailboxes $Mailboxes -ExtraAppId $ExtraAppId
        $utf8 = $script:SimUtf8
        # Plain (non-atomic) writes are fine here: nobody reads the tenant before tenant.json exists.
        # They are issued asynchronously in batches, which overlaps file creation with the JSON work.
        # Seeded mailboxes have Name = Alias, so they need no names/ claim.
        $pending = [Collections.Generic.List[Threading.Tasks.Task]]::new()
        for ($i = 1; $i -le $Mailboxes; $i++) {
            $record = New-SimMailboxRecord -TenantInfo $info -Spec (Get-SimSeedSpec -Index $i)
            $file = [IO.Path]::Combine($layout.Mailboxes, $record.Alias.ToLowerInvariant() + '.json')
            $pending.Add([IO.File]::WriteAllTextAsync($file, (ConvertTo-SimJson -InputObject $record), $utf8))
            if ($pending.Count -ge 128) {
                [Threading.Tasks.Task]::WaitAll($pending.ToArray())
                $pending.Clear()
            }
        }
        [Threading.Tasks.Task]::WaitAll($pending.ToArray())
        Write-SimFileAtomic -Path $layout.TenantFile -Text (ConvertTo-SimJson -InputObject $info)
        $script:SimTenantCache = $null
        $script:SimIndex = $null
        return $true
    }
    finally {
        $seedLock.Dispose()
    }
}

function Get-SimTenant {
    <#
        The current tenant ($env:EXO_SIM_TENANT etc.): @{ Layout; Info }. Seeds the 200-mailbox sample
        tenant when the folder has none. Cached per environment value and tenant.json timestamp, so
        the common call costs one stat().
    #>
    [CmdletBinding()]
    param()
    $ErrorActionPreference = 'Stop'
    $environment = '{0}|{1}' -f [Environment]::GetEnvironmentVariable('EXO_SIM_TENANT'), [Environment]::GetEnvironmentVariable('XDG_DATA_HOME')
    $cache = $script:SimTenantCache
    if ($null -ne $cache -and $cache.Environment -eq $environment -and
        $cache.Stamp -eq [IO.File]::GetLastWriteTimeUtc($cache.Layout.TenantFile).Ticks) {
        return $cache
    }
    $path = Get-SimTenantPath
    $layout = Get-SimTenantLayout -Path $path
    for ($attempt = 0; $attempt -lt 3; $attempt++) {
        $stamp = [IO.File]::GetLastWriteTimeUtc($layout.TenantFile).Ticks
        if ([IO.File]::Exists($layout.TenantFile)) {
            try {
                $text = [IO.File]::ReadAllText($layout.TenantFile, $script:SimUtf8)
            }
            catch [IO.FileNotFoundException] {
                continue    # being re-created right now
            }
            $info = ConvertFrom-SimJson -Text $text -Source $layout.TenantFile
            $cache = [pscustomobject]@{ Environment = $environment; Root = $layout.Root; Stamp = $stamp; Layout = $layout; Info = $info }
            $script:SimTenantCache = $cache
            return $cache
        }
        $null = Initialize-SimTenant -Path $path -Mailboxes $script:SimDefaultMailboxCount
    }
    throw [IO.InvalidDataException]::new("No simulated tenant could be loaded or created at '$path'.")
}

function Add-SimAuditEntry {
    <#
        Appends {"cmdlet","identity","pid","start","end"} as one line to audit.jsonl. start/end are UTC
        ISO 8601 with 100 ns digits. .NET's FileMode.Append does not use O_APPEND on Unix, so appends
        are serialised with locks/audit.lock; the line goes out in a single Write call.
    #>
    [CmdletBinding()]
    param(
        [Parameter(Mandatory)]$Layout,
        [Parameter(Mandatory)][string]$Cmdlet,
        [Parameter(Mandatory)][AllowEmptyString()][string]$Identity,
        [Parameter(Mandatory)][datetime]$Start,
        [Parameter(Mandatory)][datetime]$End
    )
    $ErrorActionPreference = 'Stop'
    $entry = [ordered]@{
        cmdlet   = $Cmdlet
        identity = $Identity
        pid      = $PID
        start    = $Start.ToUniversalTime().ToString('o', [Globalization.CultureInfo]::InvariantCulture)
        end      = $End.ToUniversalTime().ToString('o', [Globalization.CultureInfo]::InvariantCulture)
    }
    $bytes = $script:SimUtf8.GetBytes((ConvertTo-SimJson -InputObject $entry) + "`n")
    $lock = Enter-SimFileLock -Path $Layout.AuditLock
    try {
        $stream = [IO.FileStream]::new($Layout.Audit, [IO.FileMode]::Append, [IO.FileAccess]::Write, [IO.FileShare]::ReadWrite)
        try { $stream.Write($bytes, 0, $bytes.Length) } finally { $stream.Dispose() }
    }
    finally {
        $lock.Dispose()
    }
}

function Test-SimMailboxKey {
    <#
        True when $Record answers to $Key (case-insensitive): Alias, Name, Identity, DisplayName, UPN,
        primary or secondary address, Guid, ExchangeGuid, ExternalDirectoryObjectId, DN. The index in
        Update-SimMailboxIndex uses the same list.
    #>
    [CmdletBinding()]
    [OutputType([bool])]
    param([Parameter(Mandatory)]$Record, [Parameter(Mandatory)][string]$Key)
    $ignoreCase = [StringComparison]::OrdinalIgnoreCase
    foreach ($value in $Record.Alias, $Record.Name, $Record.Identity, $Record.DisplayName, $Record.UserPrincipalName,
        $Record.PrimarySmtpAddress, $Record.Guid, $Record.ExchangeGuid, $Record.ExternalDirectoryObjectId, $Record.DistinguishedName) {
        if ([string]::Equals([string]$value, $Key, $ignoreCase)) { return $true }
    }
    foreach ($address in @($Record.EmailAddresses)) {
        $colon = $address.IndexOf(':')
        if ([string]::Equals($(if ($colon -ge 0) { $address.Substring($colon + 1) } else { $address }), $Key, $ignoreCase)) { return $true }
    }
    return $false
}

function Update-SimMailboxIndex {
    <#
        Per-process index key -> mailbox files, for identities that cannot be turned into a file name
        (GUIDs, DisplayName, secondary addresses). Incremental: only files whose timestamp or size
        changed since the last refresh are parsed again.
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)]$Layout)
    $ErrorActionPreference = 'Stop'
    $index = $script:SimIndex
    if ($null -eq $index -or $index.Root -ne $Layout.Root) {
        $index = @{
            Root  = $Layout.Root
            Files = [Collections.Generic.Dictionary[string, object]]::new([StringComparer]::Ordinal)
            Keys  = [Collections.Generic.Dictionary[string, object]]::new([StringComparer]::OrdinalIgnoreCase)
        }
        $script:SimIndex = $index
    }
    $seen = [Collections.Generic.HashSet[string]]::new([StringComparer]::Ordinal)
    $utf8 = $script:SimUtf8
    $jsonType = $script:SimJsonType
    foreach ($file in [IO.DirectoryInfo]::new($Layout.Mailboxes).EnumerateFiles('*.json')) {
        $name = $file.Name
        $null = $seen.Add($name)
        $stamp = '{0}/{1}' -f $file.LastWriteTimeUtc.Ticks, $file.Length
        $entry = $null
        if ($index.Files.TryGetValue($name, [ref]$entry)) {
            if ($entry.Stamp -eq $stamp) { continue }
            Remove-SimIndexEntry -Index $index -File $name
        }
        # Read-SimMailboxFile inlined, keys as in Test-SimMailboxKey: a first lookup on a
        # 50,000-mailbox tenant parses every file once.
        try { $text = [IO.File]::ReadAllText($file.FullName, $utf8) } catch [IO.FileNotFoundException] { continue }
        $parseError = $null
        $record = $jsonType::ConvertFromJson($text, [ref]$parseError)
        if ($null -ne $parseError) { continue }
        $keys = [Collections.Generic.List[string]]::new(16)
        foreach ($value in $record.Alias, $record.Name, $record.Identity, $record.DisplayName, $record.UserPrincipalName,
            $record.PrimarySmtpAddress, $record.Guid, $record.ExchangeGuid, $record.ExternalDirectoryObjectId, $record.DistinguishedName) {
            if ($value) { $keys.Add([string]$value) }
        }
        foreach ($address in $record.EmailAddresses) {
            $colon = $address.IndexOf(':')
            $keys.Add($(if ($colon -ge 0) { $address.Substring($colon + 1) } else { $address }))
        }
        $index.Files[$name] = @{ Stamp = $stamp; Keys = $keys }
        foreach ($key in $keys) {
            $set = $null
            if (-not $index.Keys.TryGetValue($key, [ref]$set)) {
                $set = [Collections.Generic.HashSet[string]]::new([StringComparer]::Ordinal)
                $index.Keys[$key] = $set
            }
            $null = $set.Add($name)
        }
    }
    foreach ($name in @($index.Files.Keys)) {
        if (-not $seen.Contains($name)) { Remove-SimIndexEntry -Index $index -File $name }
    }
}

function Remove-SimIndexEntry {
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$Index, [Parameter(Mandatory)][string]$File)
    $entry = $Index.Files[$File]
    if ($null -eq $entry) { return }
    foreach ($key in $entry.Keys) {
        $set = $null
        if ($Index.Keys.TryGetValue($key, [ref]$set)) {
            $null = $set.Remove($File)
            if ($set.Count -eq 0) { $null = $Index.Keys.Remove($key) }
        }
    }
    $null = $Index.Files.Remove($File)
}

function Find-SimMailboxByIndex {
    <# Mailboxes answering to $Key through the index; refreshes it on a miss or a stale hit. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)]$Layout, [Parameter(Mandatory)][string]$Key)
    $found = [Collections.Generic.List[object]]::new()
    $fresh = $false
    if ($null -eq $script:SimIndex -or $script:SimIndex.Root -ne $Layout.Root) {
        Update-SimMailboxIndex -Layout $Layout
        $fresh = $true
    }
    for ($attempt = 0; $attempt -lt 2; $attempt++) {
        $found.Clear()
        $stale = $false
        $set = $null
        if ($script:SimIndex.Keys.TryGetValue($Key, [ref]$set)) {
            foreach ($file in @($set)) {
                $record = Read-SimMailboxFile -File ([IO.Path]::Combine($Layout.Mailboxes, $file))
                if ($null -ne $record -and (Test-SimMailboxKey -Record $record -Key $Key)) { $found.Add($record) }
                else { $stale = $true }
            }
            if (-not $stale) { return , $found }
        }
        # A miss may be a mailbox created by another process since the last refresh.
        if ($fresh) { break }
        Update-SimMailboxIndex -Layout $Layout
        $fresh = $true
    }
    return , $found
}

function Resolve-SimMailbox {
    <#
        The mailboxes an identity refers to (List, 0..n records). Alias, UPN and primary SMTP address
        map straight to a file name; Name goes through names/; everything else (GUIDs, DisplayName,
        secondary addresses, DN) through the index.
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)]$Layout, [Parameter(Mandatory)][string]$Identity, [switch]$SoftDeleted)
    $id = $Identity.Trim()
    $found = [Collections.Generic.List[object]]::new()
    if ($SoftDeleted) {
        # The soft-deleted folder is small: scan it.
        if ([IO.Directory]::Exists($Layout.SoftDeleted)) {
            foreach ($file in [IO.Directory]::GetFiles($Layout.SoftDeleted, '*.json')) {
                $record = Read-SimMailboxFile -File $file
                if ($null -ne $record -and (Test-SimMailboxKey -Record $record -Key $id)) { $found.Add($record) }
            }
        }
        return , $found
    }
    $at = $id.IndexOf('@')
    $candidate = if ($at -gt 0) { $id.Substring(0, $at) } else { $id }
    if ($candidate.Length -le 64 -and $candidate -match $script:SimAliasPattern) {
        $record = Read-SimMailboxFile -File ([IO.Path]::Combine($Layout.Mailboxes, $candidate.ToLowerInvariant() + '.json'))
        if ($null -ne $record -and (Test-SimMailboxKey -Record $record -Key $id)) {
            $found.Add($record)
            return , $found
        }
    }
    $claim = [IO.Path]::Combine($Layout.Names, (Get-SimNameKey -Name $id))
    if ([IO.File]::Exists($claim)) {
        $alias = $null
        try { $alias = [IO.File]::ReadAllText($claim, $script:SimUtf8).Trim() } catch [IO.IOException] { $alias = $null }
        if ($alias -and (Test-SimAlias -Alias $alias)) {
            $record = Read-SimMailboxFile -File ([IO.Path]::Combine($Layout.Mailboxes, $alias.ToLowerInvariant() + '.json'))
            if ($null -ne $record -and [string]::Equals($record.Name, $id, [StringComparison]::OrdinalIgnoreCase)) {
                $found.Add($record)
                return , $found
            }
        }
    }
    return , (Find-SimMailboxByIndex -Layout $Layout -Key $id)
}
