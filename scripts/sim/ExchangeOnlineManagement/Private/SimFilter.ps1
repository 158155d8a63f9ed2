# SimFilter.ps1 - the OPATH subset understood by -Filter in the ExchangeOnlineManagement SIMULATION.
#
# Grammar (keywords case-insensitive; an outer { } pair is accepted and ignored):
#   filter     := or
#   or         := and ( '-or' and )*
#   and        := unary ( '-and' unary )*
#   unary      := '-not' unary | '(' or ')' | comparison
#   comparison := Property ( '-eq' | '-ne' | '-like' | '-notlike' ) value
#   value      := 'text' (with '' for a quote) | "text" (with "" or `" for a quote)
#                 | $true | $false | $null | bare word (letters, digits, . _ @ - *)
# -and binds tighter than -or. A multi-valued property (EmailAddresses) matches when any value does.
# The filter is parsed into a tree and evaluated by walking it: it is never run as PowerShell.
# Parse errors are thrown as [FormatException] with the text Exchange puts after
# 'Exception setting "Filter": '; the cmdlets wrap it into the full error.

Set-StrictMode -Version Latest
# No $ErrorActionPreference here: this file is dot-sourced into the module's script scope (see
# SimStore.ps1); functions that must fail fast set it locally.

$script:SimFilterProperties = @(
    'Alias', 'ArchiveStatus', 'City', 'CustomAttribute1', 'CustomAttribute2', 'CustomAttribute3',
    'CustomAttribute4', 'CustomAttribute5', 'Department', 'DisplayName', 'EmailAddresses',
    'ExternalDirectoryObjectId', 'FirstName', 'Guid', 'HiddenFromAddressListsEnabled', 'LastName',
    'Name', 'Office', 'PrimarySmtpAddress', 'RecipientType', 'RecipientTypeDetails', 'UserPrincipalName'
)

function Split-SimOpathToken {
    <# Tokens of $Filter: @{ Kind = LParen|RParen|Op|Value|Word; Text; Value; Offset (0-based) }. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][AllowEmptyString()][string]$Filter)
    $tokens = [Collections.Generic.List[hashtable]]::new()
    $i = 0
    $n = $Filter.Length
    while ($i -lt $n) {
        $c = $Filter[$i]
        if ([char]::IsWhiteSpace($c)) { $i++; continue }
        $start = $i
        if ($c -eq '(' -or $c -eq ')') {
            $tokens.Add(@{ Kind = $(if ($c -eq '(') { 'LParen' } else { 'RParen' }); Text = [string]$c; Value = $null; Offset = $start })
            $i++
            continue
        }
        if ($c -eq "'" -or $c -eq '"') {
            # Quoted text; the quote character doubled (or `" inside "...") stands for itself.
            $quote = $c
            $text = [Text.StringBuilder]::new()
            $i++
            $closed = $false
            while ($i -lt $n) {
                $d = $Filter[$i]
                if ($quote -eq '"' -and $d -eq '`' -and $i + 1 -lt $n) { $null = $text.Append($Filter[$i + 1]); $i += 2; continue }
                if ($d -eq $quote) {
                    if ($i + 1 -lt $n -and $Filter[$i + 1] -eq $quote) { $null = $text.Append($quote); $i += 2; continue }
                    $closed = $true
                    $i++
                    break
                }
                $null = $text.Append($d)
                $i++
            }
            if (-not $closed) { throw (New-SimFilterSyntaxError -Filter $Filter -Offset $start) }
            $tokens.Add(@{ Kind = 'Value'; Text = $Filter.Substring($start, $i - $start); Value = $text.ToString(); Offset = $start })
            continue
        }
        if ($c -eq '-' -or $c -eq '$' -or [char]::IsLetterOrDigit($c) -or $c -eq '_') {
            $i++
            while ($i -lt $n -and ([char]::IsLetterOrDigit($Filter[$i]) -or '._@-*'.Contains($Filter[$i]))) { $i++ }
            $word = $Filter.Substring($start, $i - $start)
            if ($c -eq '-' -and $word.Length -gt 1) {
                $tokens.Add(@{ Kind = 'Op'; Text = $word; Value = $word.Substring(1).ToLowerInvariant(); Offset = $start })
            }
            elseif ($c -eq '$') {
                $value = switch ($word.ToLowerInvariant()) {
                    '$true' { $true }
                    '$false' { $false }
                    '$null' { $null }
                    default { throw (New-SimFilterSyntaxError -Filter $Filter -Offset $start) }
                }
                $tokens.Add(@{ Kind = 'Value'; Text = $word; Value = $value; Offset = $start })
            }
            else {
                $tokens.Add(@{ Kind = 'Word'; Text = $word; Value = $word; Offset = $start })
            }
            continue
        }
        throw (New-SimFilterSyntaxError -Filter $Filter -Offset $start)
    }
    return , $tokens
}

function New-SimFilterSyntaxError {
    [CmdletBinding()]
    [OutputType([FormatException])]
    param([Parameter(Mandatory)][AllowEmptyString()][string]$Filter, [int]$Offset)
    $message = 'Invalid filter syntax. For a description of the filter parameter syntax see the command help. "{0}" at position {1}.' -f $Filter, ($Offset + 1)
    return [FormatException]::new($message)
}

function ConvertFrom-SimOpathFilter {
    <# Parses $Filter into a tree of hashtables (Kind = and|or|not|cmp). Throws [FormatException]. #>
    [CmdletBinding()]
    param([Parameter(Mandatory)][AllowEmptyString()][string]$Filter)
    $text = $Filter.Trim()
    if ($text.Length -ge 2 -and $text[0] -eq '{' -and $text[-1] -eq '}') { $text = $text.Substring(1, $text.Length - 2) }
    $state = @{ Filter = $text; Tokens = (Split-SimOpathToken -Filter $text); Position = 0 }
    if ($state.Tokens.Count -eq 0) { throw (New-SimFilterSyntaxError -Filter $text -Offset 0) }
    $tree = Read-SimOpathOr -State $state
    if ($state.Position -lt $state.Tokens.Count) {
        throw (New-SimFilterSyntaxError -Filter $text -Offset $state.Tokens[$state.Position].Offset)
    }
    return $tree
}

function Get-SimOpathToken {
    # The token at the parser's position, or $null at the end.
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$State)
    if ($State.Position -lt $State.Tokens.Count) { return $State.Tokens[$State.Position] }
    return $null
}

function Read-SimOpathOr {
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$State)
    $left = Read-SimOpathAnd -State $State
    while ($true) {
        $token = Get-SimOpathToken -State $State
        if ($null -eq $token -or $token.Kind -ne 'Op' -or $token.Value -ne 'or') { return $left }
        $State.Position++
        $left = @{ Kind = 'or'; Left = $left; Right = (Read-SimOpathAnd -State $State) }
    }
}

function Read-SimOpathAnd {
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$State)
    $left = Read-SimOpathUnary -State $State
    while ($true) {
        $token = Get-SimOpathToken -State $State
        if ($null -eq $token -or $token.Kind -ne 'Op' -or $token.Value -ne 'and') { return $left }
        $State.Position++
        $left = @{ Kind = 'and'; Left = $left; Right = (Read-SimOpathUnary -State $State) }
    }
}

function Read-SimOpathUnary {
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$State)
    $token = Get-SimOpathToken -State $State
    if ($null -eq $token) { throw (New-SimFilterSyntaxError -Filter $State.Filter -Offset $State.Filter.Length) }
    if ($token.Kind -eq 'Op' -and $token.Value -eq 'not') {
        $State.Position++
        return @{ Kind = 'not'; Operand = (Read-SimOpathUnary -State $State) }
    }
    if ($token.Kind -eq 'LParen') {
        $State.Position++
        $inner = Read-SimOpathOr -State $State
        $close = Get-SimOpathToken -State $State
        if ($null -eq $close -or $close.Kind -ne 'RParen') {
            $offset = if ($null -eq $close) { $State.Filter.Length } else { $close.Offset }
            throw (New-SimFilterSyntaxError -Filter $State.Filter -Offset $offset)
        }
        $State.Position++
        return $inner
    }
    return Read-SimOpathComparison -State $State
}

function Read-SimOpathComparison {
    [CmdletBinding()]
    param([Parameter(Mandatory)][hashtable]$State)
    $property = Get-SimOpathToken -State $State
    if ($property.Kind -ne 'Word') { throw (New-SimFilterSyntaxError -Filter $State.Filter -Offset $property.Offset) }
    $known = $script:SimFilterProperties | Where-Object { $_ -eq $property.Value } | Select-Object -First 1
    if (-not $known) {
        $message = '"{0}" is not a recognized filterable property. This simulation filters on: {1}. "{2}" at position {3}.' -f `
            $property.Value, ($script:SimFilterProperties -join ', '), $State.Filter, ($property.Offset + 1)
        throw [FormatException]::new($message)
    }
    $State.Position++
    $operator = Get-SimOpathToken -State $State
    if ($null -eq $operator -or $operator.Kind -ne 'Op' -or $operator.Value -notin 'eq', 'ne', 'like', 'notlike') {
        $offset = if ($null -eq $operator) { $State.Filter.Length } else { $operator.Offset }
        throw (New-SimFilterSyntaxError -Filter $State.Filter -Offset $offset)
    }
    $State.Position++
    $operand = Get-SimOpathToken -State $State
    if ($null -eq $operand -or ($operand.Kind -ne 'Value' -and $operand.Kind -ne 'Word')) {
        $offset = if ($null -eq $operand) { $State.Filter.Length } else { $operand.Offset }
        throw (New-SimFilterSyntaxError -Filter $State.Filter -Offset $offset)
    }
    $State.Position++
    # Values are compared as text: $true/$false as True/False, $null as the empty string.
    $text = if ($null -eq $operand.Value) { '' } else { [string]$operand.Value }
    $node = @{ Kind = 'cmp'; Property = [string]$known; Operator = $operator.Value; Text = $text; Pattern = $null }
    if ($operator.Value -eq 'like' -or $operator.Value -eq 'notlike') {
        $node.Pattern = [Management.Automation.WildcardPattern]::new($text, [Management.Automation.WildcardOptions]::IgnoreCase)
    }
    return $node
}

function Test-SimOpathFilter {
    <# True when $Record matches the parsed filter $Node. #>
    [CmdletBinding()]
    [OutputType([bool])]
    param([Parameter(Mandatory)][hashtable]$Node, [Parameter(Mandatory)]$Record)
    $kind = $Node.Kind
    if ($kind -eq 'and') { return ((Test-SimOpathFilter -Node $Node.Left -Record $Record) -and (Test-SimOpathFilter -Node $Node.Right -Record $Record)) }
    if ($kind -eq 'or') { return ((Test-SimOpathFilter -Node $Node.Left -Record $Record) -or (Test-SimOpathFilter -Node $Node.Right -Record $Record)) }
    if ($kind -eq 'not') { return (-not (Test-SimOpathFilter -Node $Node.Operand -Record $Record)) }

    $property = $Record.PSObject.Properties[$Node.Property]
    $values = if ($null -eq $property -or $null -eq $property.Value) { @('') } else { @($property.Value) }
    $like = ($Node.Operator -eq 'like' -or $Node.Operator -eq 'notlike')
    $any = $false
    foreach ($value in $values) {
        $text = if ($null -eq $value) { '' } else { [string]$value }
        $hit = if ($like) { $Node.Pattern.IsMatch($text) } else { [string]::Equals($text, $Node.Text, [StringComparison]::OrdinalIgnoreCase) }
        if ($hit) { $any = $true; break }
    }
    if ($Node.Operator -eq 'ne' -or $Node.Operator -eq 'notlike') { return (-not $any) }
    return $any
}
