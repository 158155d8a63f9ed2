# Module manifest of the ExchangeOnlineManagement SIMULATION used by the psbridge tests.
# It carries the real module's name and version so that scripts written for Exchange Online
# (Import-Module ExchangeOnlineManagement; Connect-ExchangeOnline ...) run unchanged against it.
@{
    RootModule           = 'ExchangeOnlineManagement.psm1'
    ModuleVersion        = '3.9.0'
    CompatiblePSEditions = @('Core')
    GUID                 = '6d4f1b7e-3c2a-4f58-9e0b-5a7c1d2e8f30'
    Author               = 'psbridge'
    CompanyName          = 'psbridge'
    Copyright            = '(c) psbridge contributors.'
    Description          = 'SIMULATION of the ExchangeOnlineManagement module (EXO V3, REST) for psbridge tests. It contacts no Microsoft service: the tenant is a local folder ($env:EXO_SIM_TENANT) and faults are injected through EXO_SIM_* environment variables.'
    PowerShellVersion    = '7.0'
    FunctionsToExport    = @('Connect-ExchangeOnline', 'Disconnect-ExchangeOnline', 'Get-ConnectionInformation', 'Get-EXOMailbox')
    CmdletsToExport      = @()
    VariablesToExport    = @()
    AliasesToExport      = @()
    FileList             = @(
        'ExchangeOnlineManagement.psd1'
        'ExchangeOnlineManagement.psm1'
        'Private/SimStore.ps1'
        'Private/SimFaults.ps1'
        'Private/SimFilter.ps1'
        'Private/SimConnection.ps1'
    )
    PrivateData          = @{
        PSData = @{
            Tags = @('Simulation', 'Test', 'ExchangeOnline')
        }
    }
}
