# Windows variant of set-webhook-key.sh (azd postdeploy hook): gives the sentinel_webhook function the key the
# Sentinel playbook sends, taking the value from the Key Vault secret that Bicep wrote. Same inputs and rights.
$ErrorActionPreference = 'Stop'

foreach ($name in 'AZURE_RESOURCE_GROUP', 'AZURE_FUNCTION_APP_NAME', 'AZURE_KEY_VAULT_NAME') {
    if (-not [Environment]::GetEnvironmentVariable($name)) { throw "Set $name (deployment output)." }
}
$resourceGroup = $env:AZURE_RESOURCE_GROUP
$app = $env:AZURE_FUNCTION_APP_NAME
$vault = $env:AZURE_KEY_VAULT_NAME
$secretName = if ($env:SENTINEL_WEBHOOK_KEY_SECRET_NAME) { $env:SENTINEL_WEBHOOK_KEY_SECRET_NAME } else { 'sentinel-webhook-function-key' }
$keyName = if ($env:SENTINEL_WEBHOOK_KEY_NAME) { $env:SENTINEL_WEBHOOK_KEY_NAME } else { 'sentinel-playbook' }
$functionName = 'sentinel_webhook'

if ((Test-Path env:SENTINEL_PLAYBOOK_ID) -and -not $env:SENTINEL_PLAYBOOK_ID) {
    Write-Host 'No playbook deployed (deploySentinelAutomation=false): no webhook key to set.'
    exit 0
}

$found = $false
for ($attempt = 0; $attempt -lt 30; $attempt++) {
    az functionapp function show --resource-group $resourceGroup --name $app --function-name $functionName --output none 2>$null
    if ($LASTEXITCODE -eq 0) { $found = $true; break }
    Start-Sleep -Seconds 10
}
if (-not $found) { throw "The function $functionName is not visible on $app after 5 minutes; deploy the code first." }

$value = az keyvault secret show --vault-name $vault --name $secretName --query value --output tsv
if ($LASTEXITCODE -ne 0 -or -not $value) { throw "Cannot read the Key Vault secret $secretName." }
az functionapp function keys set --resource-group $resourceGroup --name $app --function-name $functionName --key-name $keyName --key-value $value --output none
if ($LASTEXITCODE -ne 0) { throw "Setting the function key failed." }
Remove-Variable value
Write-Host "Function key $keyName of $functionName now matches the Key Vault secret $secretName."
