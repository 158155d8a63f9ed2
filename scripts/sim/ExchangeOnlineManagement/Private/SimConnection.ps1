# SimConnection.ps1 - connection state, sign-in and the generated tmpEXO_ module of the
# ExchangeOnlineManagement SIMULATION.
#
# Connection state is per PROCESS, as in the real module (a Disconnect in one runspace breaks all
# runspaces of the process): it lives in AppDomain data, not in a module variable, because every
# runspace gets its own copy of a script module's variables.

Set-StrictMode -Version Latest
# No $ErrorActionPreference here: this file is dot-sourced into the module's script scope (see
# SimStore.ps1); functions that must fail fast set it locally.

$script:SimConnectionSlot = 'psbridge.ExchangeOnlineManagementSimulation.Connections'
$script:SimConnectionStore = $null
$script:SimRestCommandNames = @('Get-Mailbox', 'Set-Mailbox', 'New-Mailbox', 'Remove-Mailbox', 'Get-User', 'Set-User')
$script:SimDefaultConnectionUri = 'https://outlook.office365.com'
$script:SimDefaultAuthorityUri = 'https://login.microsoftonline.com/organizations'
$script:SimAccessTokenExpiry = [DateTimeOffset]::new(9999, 12, 31, 23, 59, 59, [TimeSpan]::Zero)

function Get-SimConnectionStore {
    <#
        The process-wide store: @{ NextId; Connections = List[hashtable]; Snapshot = hashtable[];
        LastInbuilt = the connection the Get-EXO* commands used last, kept after a Disconnect }.
        Writers lock it and replace Snapshot after each change; readers just take Snapshot.
    #>
    [CmdletBinding()]
    param()
    if ($null -ne $script:SimConnectionStore) { return $script:SimConnectionStore }
    $domain = [AppDomain]::CurrentDomain
    # Two runspaces may get here at once; the type object is a process-wide lock.
    [Threading.Monitor]::Enter([AppDomain])
    try {
        $store = $domain.GetData($script:SimConnectionSlot)
        if ($null -eq $store) {
            $store = @{ NextId = 1; Connections = [Collections.Generic.List[hashtable]]::new(); Snapshot = [hashtable[]]@(); LastInbuilt = $null }
            $domain.SetData($script:SimConnectionSlot, $store)
        }
    }
    finally {
        [Threading.Monitor]::Exit([AppDomain])
    }
    $script:SimConnectionStore = $store
    return $store
}

function Get-SimConnectionList {
    <# A snapshot of the live connections of this process (emitted one by one; wrap in @()). #>
    [CmdletBinding()]
    param()
    return (Get-SimConnectionStore).Snapshot
}

function Get-SimActiveConnection {
    <#
        The connection a command runs on: the one whose id the generated module passed, or (id 0, the
        Get-EXO* commands of the main module) the one used for inbuilt cmdlets, which is the newest.
        $null when there is none. Like the real module's compiled cmdlets, Get-EXO* keep working after
        Disconnect-ExchangeOnline with the last connection's token (observed with 3.9.0: the token
        provider stays), until the process ends.
    #>
    [CmdletBinding()]
    param([int]$ConnectionId = 0)
    $store = $script:SimConnectionStore
    if ($null -eq $store) { $store = Get-SimConnectionStore }
    $connections = $store.Snapshot
    if ($ConnectionId -gt 0) {
        foreach ($connection in $connections) { if ($connection.Id -eq $ConnectionId) { return $connection } }
        return $null
    }
    foreach ($connection in $connections) { if ($connection.ConnectionUsedForInbuiltCmdlets) { return $connection } }
    if ($connections.Count -gt 0) { return $connections[-1] }
    return $store.LastInbuilt
}

function Add-SimConnection {
    <# Adds $Connection to the process; it becomes the one used for inbuilt cmdlets, as in the real module. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$Connection)
    $store = Get-SimConnectionStore
    [Threading.Monitor]::Enter($store)
    try {
        foreach ($existing in $store.Connections) { $existing.ConnectionUsedForInbuiltCmdlets = $false }
        $Connection.ConnectionUsedForInbuiltCmdlets = $true
        $store.Connections.Add($Connection)
        $store.LastInbuilt = $Connection
        $store.Snapshot = $store.Connections.ToArray()
    }
    finally {
        [Threading.Monitor]::Exit($store)
    }
}

function Test-SimTokenExpired {
    <#
        True once EXO_SIM_TOKEN_LIFETIME_S seconds have passed since the connect (any auth mode), or
        once the 'exp' claim of the -AccessToken used has passed (those tokens are never refreshed).
    #>
    [CmdletBinding()]
    [OutputType([bool])]
    param([Parameter(Mandatory)][hashtable]$Connection)
    $now = [DateTime]::UtcNow
    $lifetime = -1
    if ($env:EXO_SIM_TOKEN_LIFETIME_S) { $lifetime = Get-SimEnvNumber -Name 'EXO_SIM_TOKEN_LIFETIME_S' -Default -1 }
    if ($lifetime -ge 0 -and ($now - $Connection.ConnectedAtUtc).TotalSeconds -ge $lifetime) { return $true }
    if ($null -ne $Connection.TokenClaimExpiryUtc -and $now -ge $Connection.TokenClaimExpiryUtc) { return $true }
    return $false
}

function Get-SimTokenExpiry {
    <#
        TokenExpiryTimeUTC shown by Get-ConnectionInformation. Access-token connections always show
        9999-12-31 23:59:59 +00:00: the real module never reads the token's 'exp' (observed with 3.9.0).
    #>
    [CmdletBinding()]
    [OutputType([DateTimeOffset])]
    param([Parameter(Mandatory)][hashtable]$Connection)
    if ($Connection.AuthMode -eq 'AccessToken') { return $script:SimAccessTokenExpiry }
    $lifetime = Get-SimEnvNumber -Name 'EXO_SIM_TOKEN_LIFETIME_S' -Default -1
    $expiry = if ($lifetime -ge 0) { $Connection.ConnectedAtUtc.AddSeconds($lifetime) } else { $Connection.ConnectedAtUtc.AddHours(1) }
    if ($null -ne $Connection.TokenClaimExpiryUtc -and $Connection.TokenClaimExpiryUtc -lt $expiry) { $expiry = $Connection.TokenClaimExpiryUtc }
    return [DateTimeOffset]::new([DateTime]::SpecifyKind($expiry, [DateTimeKind]::Utc))
}

function Test-SimHttpsUri {
    <# The real module's Test-Uri: converts to [Uri] and accepts only https. #>
    [CmdletBinding()]
    [OutputType([bool])]
    param([Parameter(Mandatory)][AllowEmptyString()][string]$Text)
    $uri = $Text -as [Uri]
    return ($null -ne $uri -and $uri.IsAbsoluteUri -and $uri.Scheme -eq 'https')
}

function ConvertTo-SimSchemeAndHost {
    <# The ConnectionUri a connection keeps: scheme://host only (path and port are dropped). #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][string]$Text)
    $uri = [Uri]$Text
    return '{0}://{1}' -f $uri.Scheme, $uri.Host
}

function New-SimConnectError {
    <#
        The shape of Connect-ExchangeOnline failures: the real module re-throws the inner exception,
        so the caller sees category OperationStopped and a FullyQualifiedErrorId equal to the message.
        ($PSCmdlet.ThrowTerminatingError would append ',Connect-ExchangeOnline' to the id, so these
        records are thrown with 'throw', which keeps the id as built.)
    #>
    [CmdletBinding()]
    [OutputType([Management.Automation.ErrorRecord])]
    param([Parameter(Mandatory)][Exception]$Exception, [string]$Reason)
    return New-SimErrorRecord -Exception $Exception -ErrorId $Exception.Message -Category OperationStopped -Reason $Reason
}

function Get-SimAadTrace {
    # The tail Entra ID puts on AADSTS messages.
    [CmdletBinding()]
    [OutputType([string])]
    param()
    return 'Trace ID: {0} Correlation ID: {1} Timestamp: {2}' -f [Guid]::NewGuid(), [Guid]::NewGuid(), [DateTime]::UtcNow.ToString('yyyy-MM-dd HH:mm:ssZ', $script:SimInvariant)
}

function ConvertFrom-SimBase64Url {
    [CmdletBinding()]
    [OutputType([byte[]])]
    param([Parameter(Mandatory)][AllowEmptyString()][string]$Text)
    $padded = $Text.Replace('-', '+').Replace('_', '/')
    switch ($padded.Length % 4) {
        2 { $padded += '==' }
        3 { $padded += '=' }
        1 { throw [FormatException]::new('Not base64url.') }
    }
    return , [Convert]::FromBase64String($padded)
}

function Read-SimJwt {
    <#
        @{ Header; Claims } of a JWT, or $null when $Token is not one: three base64url segments
        separated by dots (the signature may be empty), the first decoding to a JSON object. The
        payload's claims are used when it is JSON (exp, upn, appid, tid); nothing is verified.
    #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][AllowEmptyString()][string]$Token)
    $parts = $Token.Trim().Split('.')
    if ($parts.Count -ne 3 -or $parts[0].Length -eq 0 -or $parts[1].Length -eq 0) { return $null }
    foreach ($part in $parts) { if ($part -notmatch '^[A-Za-z0-9_-]*$') { return $null } }
    try {
        $header = ConvertFrom-SimJson -Text ($script:SimUtf8.GetString((ConvertFrom-SimBase64Url -Text $parts[0]))) -Source 'JWT header'
    }
    catch {
        return $null
    }
    if ($header -isnot [Management.Automation.PSCustomObject]) { return $null }
    $claims = $null
    try {
        $claims = ConvertFrom-SimJson -Text ($script:SimUtf8.GetString((ConvertFrom-SimBase64Url -Text $parts[1]))) -Source 'JWT payload'
    }
    catch {
        $claims = $null
    }
    if ($claims -isnot [Management.Automation.PSCustomObject]) { $claims = [pscustomobject]@{} }
    return @{ Header = $header; Claims = $claims }
}

function Get-SimClaim {
    [CmdletBinding()]
    param([Parameter(Mandatory)]$Claims, [Parameter(Mandatory)][string[]]$Name)
    foreach ($claim in $Name) {
        $property = $Claims.PSObject.Properties[$claim]
        if ($null -ne $property -and $null -ne $property.Value -and "$($property.Value)" -ne '') { return $property.Value }
    }
    return $null
}

function Import-SimPfxCertificate {
    <#
        Loads a PFX with its password like the real module does, so a wrong password fails with what
        the platform's X509 loader throws. Throws that exception itself (the real module re-throws
        the inner exception).
    #>
    [CmdletBinding()]
    [OutputType([Security.Cryptography.X509Certificates.X509Certificate2])]
    param([Parameter(Mandatory)][string]$Path, [securestring]$Password)
    $plain = if ($null -ne $Password) { [Net.NetworkCredential]::new('', $Password).Password } else { $null }
    $loader = 'System.Security.Cryptography.X509Certificates.X509CertificateLoader' -as [type]
    try {
        if ($null -ne $loader) { return $loader::LoadPkcs12FromFile($Path, $plain) }
        return [Security.Cryptography.X509Certificates.X509Certificate2]::new($Path, $plain)
    }
    catch {
        $exception = $_.Exception
        if ($exception -is [Management.Automation.MethodInvocationException] -and $null -ne $exception.InnerException) {
            $exception = $exception.InnerException
        }
        throw (New-SimConnectError -Exception $exception)
    }
}

function Find-SimStoreCertificate {
    <#
        -CertificateThumbprint. The real module has it on Windows only (CurrentUser\My, then
        LocalMachine\My); the simulation looks in CurrentUser\My on every platform (.NET's X509Store
        works on Linux and macOS too).
    #>
    [CmdletBinding()]
    [OutputType([Security.Cryptography.X509Certificates.X509Certificate2])]
    param([Parameter(Mandatory)][string]$Thumbprint)
    $wanted = ($Thumbprint -replace '[^0-9A-Fa-f]', '').ToUpperInvariant()
    $locations = @([Security.Cryptography.X509Certificates.StoreLocation]::CurrentUser)
    if ($IsWindows) { $locations += [Security.Cryptography.X509Certificates.StoreLocation]::LocalMachine }
    foreach ($location in $locations) {
        $store = [Security.Cryptography.X509Certificates.X509Store]::new('My', $location)
        try {
            $store.Open([Security.Cryptography.X509Certificates.OpenFlags]::ReadOnly)
            foreach ($certificate in $store.Certificates) {
                if ($certificate.Thumbprint -eq $wanted) { return $certificate }
            }
        }
        catch [Security.Cryptography.CryptographicException] {
            continue    # a store that does not exist yet holds no certificate
        }
        finally {
            $store.Dispose()
        }
    }
    $message = "Certificate with thumbprint '$Thumbprint' was not found in the CurrentUser\My certificate store."
    throw (New-SimConnectError -Exception ([Security.Cryptography.CryptographicException]::new($message)))
}

function Write-SimBanner {
    <# The V3 banner: Write-Host (Information stream, and the console under a console host). #>
    [CmdletBinding()]
    param()
    $rule = '-' * 88
    Write-Host $rule
    Write-Host 'This V3 EXO PowerShell module contains new REST API backed Exchange Online cmdlets which doesn''t require WinRM for Client-Server communication. You can now run these cmdlets after turning off WinRM Basic Auth in your client machine thus making it more secure.'
    Write-Host ''
    Write-Host 'Unlike the EXO* prefixed cmdlets, the cmdlets in this module support full functional parity with the RPS (V1) cmdlets.'
    Write-Host ''
    Write-Host 'V3 cmdlets in the downloaded module are resilient to transient failures, handling retries and throttling errors inherently.'
    Write-Host ''
    Write-Host 'SIMULATION: this is the ExchangeOnlineManagement simulation shipped with psbridge for tests; no Microsoft service is contacted.'
    Write-Host $rule
}

function Get-SimSignIn {
    <#
        Signs in the way the bound parameters ask for and returns what the connection records:
        @{ Mode; AppId; UserPrincipalName; CertificateAuthentication; TokenClaimExpiryUtc; TenantId }.
        Throws Connect-shaped ErrorRecords.
    #>
    [CmdletBinding()]
    param(
        [Parameter(Mandatory)][hashtable]$Bound,
        [Parameter(Mandatory)]$TenantInfo,
        [Parameter(Mandatory)][Management.Automation.PSCmdlet]$Cmdlet
    )
    $organization = [string]$Bound['Organization']
    $result = @{ Mode = ''; AppId = $null; UserPrincipalName = $null; CertificateAuthentication = $false; TokenClaimExpiryUtc = $null; TenantId = $TenantInfo.TenantId }
    $appOnly = $false

    if ($Bound.ContainsKey('AccessToken')) {
        $jwt = Read-SimJwt -Token ([string]$Bound['AccessToken'])
        if ($null -eq $jwt) { throw (New-SimConnectError -Exception ([ArgumentException]::new('AccessToken is not a well formed JWT token'))) }
        $result.Mode = 'AccessToken'
        $appOnly = $true
        $exp = Get-SimClaim -Claims $jwt.Claims -Name 'exp'
        if ($null -ne $exp) {
            $seconds = 0L
            if ([long]::TryParse("$exp", [ref]$seconds)) { $result.TokenClaimExpiryUtc = [DateTimeOffset]::FromUnixTimeSeconds($seconds).UtcDateTime }
        }
        # What the real module reports for any access token (observed with 3.9.0): the user is
        # OAuthUser@<Organization> even when the token carries a upn, there is no AppId, and the
        # tenant is the 'tid' claim, or the Organization when the token has none.
        $result.UserPrincipalName = "OAuthUser@$organization"
        $result.AppId = $null
        $tid = Get-SimClaim -Claims $jwt.Claims -Name 'tid'
        $result.TenantId = if ($null -ne $tid) { [string]$tid } else { $organization }
    }
    elseif ($Bound.ContainsKey('ManagedIdentity') -and [bool]$Bound['ManagedIdentity']) {
        # No secret needed: the platform's identity endpoint vouches for the caller.
        $result.Mode = 'ManagedIdentity'
        $appOnly = $true
        $result.AppId = [string]$Bound['ManagedIdentityAccountId']
    }
    elseif ($Bound.ContainsKey('Certificate') -or $Bound.ContainsKey('CertificateFilePath') -or $Bound.ContainsKey('CertificateThumbprint')) {
        $result.Mode = 'Certificate'
        $result.CertificateAuthentication = $true
        $appOnly = $true
        $certificate = if ($Bound.ContainsKey('Certificate')) {
            $Bound['Certificate']
        }
        elseif ($Bound.ContainsKey('CertificateFilePath')) {
            $path = $Cmdlet.GetUnresolvedProviderPathFromPSPath([string]$Bound['CertificateFilePath'])
            Import-SimPfxCertificate -Path $path -Password $Bound['CertificatePassword']
        }
        else {
            Find-SimStoreCertificate -Thumbprint ([string]$Bound['CertificateThumbprint'])
        }
        if ($null -eq $certificate) {
            throw (New-SimConnectError -Exception ([ArgumentNullException]::new('Certificate', 'Certificate cannot be null for certificate based connections.')))
        }
        if ($certificate.NotAfter.ToUniversalTime() -lt [DateTime]::UtcNow) {
            throw (New-SimConnectError -Exception ([ArgumentException]::new('The certificate is expired. Please link a new certificate to your app and pass the valid value.')))
        }
        $result.AppId = [string]$Bound['AppId']
    }
    elseif ($Bound.ContainsKey('Credential')) {
        # Resource-owner password flow: the simulation accepts any credential.
        $result.Mode = 'Credential'
        $result.UserPrincipalName = $Bound['Credential'].UserName
    }
    else {
        $message = 'Interactive sign-in (browser, WAM or device code) is not available in the ExchangeOnlineManagement simulation. Use -ManagedIdentity -Organization, -AccessToken -Organization, -Credential, or -AppId with -CertificateFilePath/-Certificate/-CertificateThumbprint and -Organization.'
        throw (New-SimConnectError -Exception ([PlatformNotSupportedException]::new($message)) -Reason 'MsalClientException')
    }

    if ($appOnly -and [string]::IsNullOrWhiteSpace($organization)) {
        $message = 'Organization cannot be null or empty for app-only, managed identity or access token based connections. Please pass the primary .onmicrosoft.com domain of the tenant.'
        throw (New-SimConnectError -Exception ([ArgumentException]::new($message)))
    }
    if (-not [string]::IsNullOrWhiteSpace($organization) -and -not [string]::Equals($organization.Trim(), $TenantInfo.Organization, [StringComparison]::OrdinalIgnoreCase)) {
        $message = "AADSTS90002: Tenant '$organization' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant. $(Get-SimAadTrace)"
        throw (New-SimConnectError -Exception ([InvalidOperationException]::new($message)) -Reason 'MsalServiceException')
    }
    if ($result.Mode -eq 'Certificate') {
        $registered = @($TenantInfo.AppIds | Where-Object { [string]::Equals([string]$_, $result.AppId.Trim(), [StringComparison]::OrdinalIgnoreCase) })
        if ($registered.Count -eq 0) {
            $message = "AADSTS700016: Application with identifier '$($result.AppId)' was not found in the directory '$organization'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant. $(Get-SimAadTrace)"
            throw (New-SimConnectError -Exception ([InvalidOperationException]::new($message)) -Reason 'MsalServiceException')
        }
    }
    return $result
}

function New-SimRestModuleText {
    <#
        Source of the generated tmpEXO_ module: one thin wrapper function per REST-backed command. Each
        copies the parameter block of the implementation in the main module (minus the hidden
        -ExoSimConnectionId) and forwards the call through a steppable pipeline, so pipeline input,
        -WhatIf/-Confirm and the error/warning streams behave as if the wrapper did the work.
    #>
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][AllowEmptyCollection()][string[]]$CommandName, [Parameter(Mandatory)][string]$ModuleName)
    $text = [Text.StringBuilder]::new()
    $null = $text.AppendLine("# $ModuleName - generated by Connect-ExchangeOnline of the ExchangeOnlineManagement SIMULATION")
    $null = $text.AppendLine('# (psbridge tests). Thin wrappers over the implementations in the main module; removed again')
    $null = $text.AppendLine('# by Disconnect-ExchangeOnline.')
    $null = $text.AppendLine('param([hashtable]$SimImplementation, [int]$SimConnectionId)')
    $null = $text.AppendLine('Set-StrictMode -Version Latest')
    $null = $text.AppendLine('# $ErrorActionPreference is left to the caller on purpose: a module-scope value would override the')
    $null = $text.AppendLine('# caller''s global preference for the errors the wrapped commands write.')
    foreach ($name in $CommandName) {
        $ast = (Get-Item -LiteralPath "function:$name").ScriptBlock.Ast
        if ($ast -is [Management.Automation.Language.FunctionDefinitionAst]) { $ast = $ast.Body }
        $paramBlock = $ast.ParamBlock
        $attributes = @($paramBlock.Attributes | ForEach-Object { '    ' + $_.Extent.Text })
        $parameters = @($paramBlock.Parameters |
            Where-Object { $_.Name.VariablePath.UserPath -ne 'ExoSimConnectionId' } |
            ForEach-Object { '        ' + ($_.Extent.Text -replace '\r?\n\s*', ' ') })
        $null = $text.AppendLine()
        $null = $text.AppendLine("function $name {")
        foreach ($attribute in $attributes) { $null = $text.AppendLine($attribute) }
        $null = $text.AppendLine('    param(')
        $null = $text.AppendLine(($parameters -join ",`n"))
        $null = $text.AppendLine('    )')
        $null = $text.AppendLine('    begin {')
        $null = $text.AppendLine('        $PSBoundParameters[''ExoSimConnectionId''] = $script:SimConnectionId')
        $null = $text.AppendLine("        `$implementation = `$script:SimImplementation['$name']")
        $null = $text.AppendLine('        $pipeline = { & $implementation @PSBoundParameters }.GetSteppablePipeline($MyInvocation.CommandOrigin)')
        $null = $text.AppendLine('        $pipeline.Begin($PSCmdlet)')
        $null = $text.AppendLine('    }')
        $null = $text.AppendLine('    process { $pipeline.Process($_) }')
        $null = $text.AppendLine('    end { $pipeline.End() }')
        $null = $text.AppendLine('}')
    }
    $null = $text.AppendLine()
    $null = $text.AppendLine('Export-ModuleMember -Function @(' + ((@($CommandName) | ForEach-Object { "'$_'" }) -join ', ') + ')')
    return $text.ToString()
}

function Remove-SimConnection {
    <# Forgets $Connection, removes its tmpEXO_ module (in this runspace) and deletes its folder. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$Connection)
    $store = Get-SimConnectionStore
    [Threading.Monitor]::Enter($store)
    try {
        for ($i = $store.Connections.Count - 1; $i -ge 0; $i--) {
            if ($store.Connections[$i].ConnectionId -eq $Connection.ConnectionId) { $store.Connections.RemoveAt($i) }
        }
        # A targeted Disconnect of the inbuilt connection hands that role to the newest one left.
        if ($Connection.ConnectionUsedForInbuiltCmdlets -and $store.Connections.Count -gt 0) {
            $store.Connections[$store.Connections.Count - 1].ConnectionUsedForInbuiltCmdlets = $true
            $store.LastInbuilt = $store.Connections[$store.Connections.Count - 1]
        }
        $store.Snapshot = $store.Connections.ToArray()
    }
    finally {
        [Threading.Monitor]::Exit($store)
    }
    # Other runspaces of the process keep their copy of the wrappers; those now fail with
    # "You must call Connect-ExchangeOnline ...", like a real broken connection.
    # Remove-Module drops only the functions it can see from the caller's session state, and in this
    # module the private implementations (same names as the wrappers) hide the global wrappers. A
    # throw-away dynamic module (not imported anywhere) sees the global function table unobstructed.
    $modules = @(Get-Module -Name $Connection.ImportedModuleName -All)
    if ($modules.Count -gt 0) {
        $remover = New-Module -Name 'ExoSimModuleRemover' -ScriptBlock { }
        & $remover { param($Modules) $Modules | Remove-Module -Force -ErrorAction SilentlyContinue } $modules
    }
    if ([IO.Directory]::Exists($Connection.ModuleName)) {
        try { [IO.Directory]::Delete($Connection.ModuleName, $true) } catch { Write-Verbose "Could not delete '$($Connection.ModuleName)': $($_.Exception.Message)" }
    }
}
