<#
.SYNOPSIS
    Writes a self-signed certificate as a password-protected PFX, for certificate sign-in tests of
    the Exchange Online simulation.
.DESCRIPTION
    The password is read from -PasswordFile (first line; a trailing CR/LF is not part of it), so it
    never appears on a command line. -ExpiresInDays may be negative: the certificate is then already
    expired (Connect-ExchangeOnline rejects it). Prints the thumbprint on the output stream.
.EXAMPLE
    ./New-SimCertificate.ps1 -Path ./app.pfx -PasswordFile ./pfx-password.txt -ExpiresInDays 30
#>
[CmdletBinding()]
[OutputType([string])]
param(
    [Parameter(Mandatory)]
    [string]$Path,
    [Parameter(Mandatory)]
    [string]$PasswordFile,
    [ValidateRange(-36500, 36500)]
    [int]$ExpiresInDays = 365,
    [string]$Subject = 'CN=psbridge-exo-sim-app'
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Read-PasswordFile {
    # The first line of the file, without its line ending.
    [CmdletBinding()]
    [OutputType([string])]
    param([Parameter(Mandatory)][string]$File)
    $text = [IO.File]::ReadAllText($File, [Text.UTF8Encoding]::new($false))
    $newline = $text.IndexOfAny([char[]]"`r`n")
    if ($newline -ge 0) { $text = $text.Substring(0, $newline) }
    return $text
}

function New-SelfSignedPfx {
    # A 2048-bit RSA certificate valid until now + $Days (before now when $Days is negative).
    [CmdletBinding()]
    [OutputType([byte[]])]
    param([Parameter(Mandatory)][string]$SubjectName, [Parameter(Mandatory)][int]$Days, [Parameter(Mandatory)][AllowEmptyString()][string]$Password)
    $rsa = [Security.Cryptography.RSA]::Create(2048)
    try {
        $request = [Security.Cryptography.X509Certificates.CertificateRequest]::new($SubjectName, $rsa,
            [Security.Cryptography.HashAlgorithmName]::SHA256, [Security.Cryptography.RSASignaturePadding]::Pkcs1)
        $request.CertificateExtensions.Add([Security.Cryptography.X509Certificates.X509BasicConstraintsExtension]::new($false, $false, 0, $false))
        $request.CertificateExtensions.Add([Security.Cryptography.X509Certificates.X509KeyUsageExtension]::new(
                [Security.Cryptography.X509Certificates.X509KeyUsageFlags]::DigitalSignature, $false))
        $notAfter = [DateTimeOffset]::UtcNow.AddDays($Days)
        # An already-expired certificate still needs NotBefore < NotAfter.
        $notBefore = if ($Days -gt 0) { [DateTimeOffset]::UtcNow.AddMinutes(-5) } else { $notAfter.AddDays(-30) }
        $certificate = $request.CreateSelfSigned($notBefore, $notAfter)
        try {
            $pfx = $certificate.Export([Security.Cryptography.X509Certificates.X509ContentType]::Pfx, $Password)
            return , [byte[]]$pfx
        }
        finally {
            $certificate.Dispose()
        }
    }
    finally {
        $rsa.Dispose()
    }
}

$pfxPath = $PSCmdlet.GetUnresolvedProviderPathFromPSPath($Path)
$password = Read-PasswordFile -File $PSCmdlet.GetUnresolvedProviderPathFromPSPath($PasswordFile)
$bytes = New-SelfSignedPfx -SubjectName $Subject -Days $ExpiresInDays -Password $password
$folder = [IO.Path]::GetDirectoryName($pfxPath)
if ($folder) { $null = [IO.Directory]::CreateDirectory($folder) }
[IO.File]::WriteAllBytes($pfxPath, $bytes)

# Thumbprint of what was written (read back with the password, which also checks the file).
$loader = 'System.Security.Cryptography.X509Certificates.X509CertificateLoader' -as [type]
$written = if ($null -ne $loader) { $loader::LoadPkcs12FromFile($pfxPath, $password) } else { [Security.Cryptography.X509Certificates.X509Certificate2]::new($pfxPath, $password) }
try { $written.Thumbprint } finally { $written.Dispose() }
