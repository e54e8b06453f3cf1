// Defender XDR <-> Microsoft Sentinel incident sync: everything the Function app needs, in one deployment.
//
// Layout (plain resource declarations, no registry modules):
//   main.bicep (subscription scope)
//     modules/identity.bicep   user-assigned managed identity of the Function app          (app resource group)
//     modules/workspace.bicep  custom tables, Direct DCR, KQL functions, app roles there    (Sentinel workspace's group)
//     modules/app.bicep        storage, queue, App Insights, Key Vault, Flex Consumption app (app resource group)
//     modules/alerts.bicep     log alert rules on lag and dead letters                      (app resource group)
//     modules/workbook.bicep   sync health + incident picture workbook                      (Sentinel workspace's group)
//     modules/playbook.bicep   Logic App that forwards incident updates to the webhook      (app resource group)
//     modules/automation.bicep automation rule "when incident is updated" -> playbook       (Sentinel workspace's group)
//     modules/mirror-rule.bicep NRT analytics rule creating the mirrors (defender-portal)    (Sentinel workspace's group)
//
// Deploy with `azd up` (azure.yaml at the repo root) or
//   az deployment sub create -l <region> -f infra/main.bicep -p environmentName=... sentinelWorkspaceResourceId=... ...
// See docs/OPERATIONS.md for the full procedure.
targetScope = 'subscription'

// ---------------------------------------------------------------------------------------------------------------
// Deployment and naming

@minLength(1)
@maxLength(40)
@description('Name of the environment (azd sets it from AZURE_ENV_NAME). Seeds resource names and the azd-env-name tag.')
param environmentName string

@minLength(1)
@description('Region of the Function app and its resources. It must offer the Flex Consumption plan (az functionapp list-flexconsumption-locations).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group for the app resources; created if missing. Empty: rg-<environmentName>.')
param resourceGroupName string = ''

@description('Tags applied to every resource this template creates.')
param tags object = {}

@description('Object ID of the person or pipeline that deploys (azd sets AZURE_PRINCIPAL_ID). When set, it gets Key Vault Secrets Officer (and Certificates Officer when a certificate is used) on the vault, so it can store the Defender credential and run the webhook-key hook. Empty: no operator role.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
@description('Principal type of principalId.')
param principalType string = 'User'

// ---------------------------------------------------------------------------------------------------------------
// Sentinel workspace (may live in another resource group or subscription of the same tenant)

@minLength(1)
@description('Full ARM resource ID of the Log Analytics workspace that has Microsoft Sentinel: /subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.OperationalInsights/workspaces/<name>. The custom tables, the DCR, the KQL functions, the workbook, the automation rule and the workspace-scoped roles are deployed in its resource group. Becomes SENTINEL_WORKSPACE_ID.')
param sentinelWorkspaceResourceId string

@minLength(1)
@description('Region of the Sentinel workspace. The Direct data collection rule must be in the workspace region, which can differ from the Function app region.')
@metadata({
  azd: {
    type: 'location'
  }
})
param sentinelWorkspaceLocation string

@description('Resource ID of an existing Log Analytics workspace for Application Insights (it may be the Sentinel workspace). Empty: a new workspace is created in the app resource group.')
param appInsightsWorkspaceResourceId string = ''

@description('true: the custom tables keep data for tableRetentionInDays; false: the workspace default retention.')
param tableRetentionOverride bool = false

// The tables API accepts 4-730 days (-1: the workspace default); 1-3 used to pass here and fail at deployment.
@minValue(4)
@maxValue(730)
@description('Interactive retention in days of the custom tables, used when tableRetentionOverride is true (4-730).')
param tableRetentionInDays int = 90

// ---------------------------------------------------------------------------------------------------------------
// Defender tenants and credentials

@description('DEFENDER_TENANT_IDS: comma-separated Entra tenant IDs whose Defender XDR incidents are synced. Empty: the home tenant of this deployment only.')
param defenderTenantIds string = ''

@description('SYNC_TENANTS: per-tenant overrides keyed by tenant ID, e.g. {"<tenant-id>": {"name": "Contoso", "mode": "pull-only", "minSeverity": "medium"}}. Modes: sync (default), pull-only, data-only.')
param syncTenants object = {}

@description('DEFENDER_CLIENT_ID: application (client) ID of the multi-tenant app registration that calls Graph in each Defender tenant. Empty: the app identity calls Graph itself, which works for its home tenant only.')
param defenderClientId string = ''

@allowed([
  'federated'
  'secret'
  'certificate'
])
@description('How the app registration authenticates. federated (default, secretless): the Function app user-assigned identity is a federated credential of the app registration, no secret anywhere. secret: DEFENDER_CLIENT_SECRET is a Key Vault reference to the secret named defenderSecretName. certificate: DEFENDER_CLIENT_CERTIFICATE is a Key Vault reference to the certificate named defenderCertificateName. The operator stores the secret or certificate in the vault (docs/OPERATIONS.md).')
param defenderCredentialType string = 'federated'

@description('Key Vault secret name holding the app registration client secret (defenderCredentialType = secret).')
param defenderSecretName string = 'defender-client-secret'

@description('Key Vault certificate name holding the app registration certificate with its private key (defenderCredentialType = certificate).')
param defenderCertificateName string = 'defender-client-certificate'

// ---------------------------------------------------------------------------------------------------------------
// Cloud endpoints: empty means derived from environment() (public cloud, US Government, China)

@description('GRAPH_ENDPOINT. Empty: https://graph.microsoft.com in the public cloud, https://graph.microsoft.us in Azure US Government (GCC High). Set https://dod-graph.microsoft.us for DoD tenants.')
param graphEndpoint string = ''

@description('AZURE_AUTHORITY_HOST. Empty: the Entra login endpoint of this cloud (environment().authentication.loginEndpoint).')
param authorityHost string = ''

@description('ARM_ENDPOINT. Empty: the Resource Manager endpoint of this cloud (environment().resourceManager).')
param armEndpoint string = ''

@description('LOGS_INGESTION_SCOPE. Empty: https://monitor.azure.com/.default, https://monitor.azure.us/.default in US Government, https://monitor.azure.cn/.default in China.')
param logsIngestionScope string = ''

// ---------------------------------------------------------------------------------------------------------------
// Sync tuning (app settings)

@minValue(0)
@maxValue(3650)
@description('SYNC_INITIAL_LOOKBACK_DAYS: how far back the first pull of a tenant reaches.')
param syncInitialLookbackDays int = 7

@minValue(0)
@maxValue(86400)
@description('SYNC_OVERLAP_SECONDS: how far behind the cursor each pull re-reads, for late-visible updates.')
param syncOverlapSeconds int = 120

@minValue(60)
@maxValue(570)
@description('SYNC_TIME_BUDGET_SECONDS: wall-clock budget of one run. Must stay below functionTimeout (host.json sets 00:10:00 = 600 s); 540 leaves a minute for checkpointing and shutdown.')
param syncTimeBudgetSeconds int = 540

@minValue(1)
@maxValue(100000)
@description('GRAPH_MAX_REQUESTS_PER_MINUTE: client-side cap on Graph requests per tenant (Graph security APIs allow about 150 per minute per app per tenant).')
param graphMaxRequestsPerMinute int = 100

@minValue(1)
@maxValue(100000)
@description('SENTINEL_MAX_WRITES_PER_MINUTE: client-side cap on Sentinel incident and comment writes.')
param sentinelMaxWritesPerMinute int = 300

@minValue(1)
@maxValue(50)
@description('SYNC_GRAPH_PAGE_SIZE: $top of the Graph incident list with $expand=alerts (50 is the documented safe maximum).')
param graphPageSize int = 50

@allowed([
  'latest'
  'defender'
  'sentinel'
])
@description('SYNC_CONFLICT_POLICY: who wins a field changed on both sides (a tie goes to Defender).')
param syncConflictPolicy string = 'latest'

@description('SYNC_OWNER_MAP: owner identities mapped between the two sides, e.g. {"analyst@mssp.com": "analyst@customer.com"}.')
param syncOwnerMap object = {}

@minValue(1024)
@maxValue(104857600)
@description('WEBHOOK_MAX_BODY_BYTES: largest accepted webhook body (a trigger body with 150 alerts and their entities is large).')
param webhookMaxBodyBytes int = 4194304

@allowed([
  'defender-portal'
  'sentinel-api'
])
@description('SYNC_MIRROR_TARGET: defender-portal (default for new deployments: Microsoft onboards every new workspace to the unified Defender portal, where incidents created through the API are never shown) deploys the DefenderMirrorRequests_CL table and the mirror analytics rule that creates each mirror; sentinel-api creates mirrors through the incidents API (workspaces still managed in the Azure portal). The app itself defaults to sentinel-api when the setting is absent, so existing deployments keep their behaviour.')
param mirrorTarget string = 'defender-portal'

@minValue(1)
@maxValue(30)
@description('SYNC_MIRROR_REQUESTS_PER_MINUTE (defender-portal): mirror requests in any rolling 60 seconds. At most 30: a rule run over more than 30 rows turns only 29 of them into their own alerts.')
param mirrorRequestsPerMinute int = 25

@allowed([
  'inline'
  'queue'
])
@description('SYNC_FANOUT: inline (the timers do every tenant inside the budget) or queue (one queue message per tenant, tenant_pull scales out). Use queue beyond a handful of tenants.')
param syncFanout string = 'inline'

// ---------------------------------------------------------------------------------------------------------------
// Function app sizing

@allowed([
  512
  2048
  4096
])
@description('Flex Consumption instance memory in MB.')
param instanceMemoryMB int = 2048

@minValue(40)
@maxValue(1000)
@description('Flex Consumption maximum instance count (scale-out limit for the tenant_pull queue workers and the webhook).')
param maximumInstanceCount int = 100

// ---------------------------------------------------------------------------------------------------------------
// Sentinel side of the webhook

@description('Deploy the playbook (Logic App), its API connection, the automation rule and their roles. false: pull and mirror only; Sentinel changes still reach Defender through the reconcile timer.')
param deploySentinelAutomation bool = true

@description('Object ID of the Azure Security Insights service principal in this tenant (application ID 98785600-1bb7-4fb9-b9fa-19afe2c8a360): az ad sp show --id 98785600-1bb7-4fb9-b9fa-19afe2c8a360 --query id -o tsv. It gets Microsoft Sentinel Automation Contributor on the playbook resource group so the automation rule can run the playbook. Empty: that assignment is skipped (grant it in the portal under Settings > Playbook permissions).')
param sentinelAutomationPrincipalObjectId string = ''

@minValue(1)
@maxValue(1000)
@description('Order of the automation rule among the workspace automation rules.')
param automationRuleOrder int = 100

@secure()
@minLength(32)
@description('Value of the function key named sentinel-playbook on the sentinel_webhook function. Stored in Key Vault as sentinel-webhook-function-key, read by the playbook at run time. azd generates and keeps it; the postdeploy hook (infra/scripts/set-webhook-key.sh) sets it on the function once the code is deployed. With the Azure CLI, pass 32 to 128 letters and digits, e.g. openssl rand -hex 32.')
@metadata({
  azd: {
    type: 'generate'
    config: {
      length: 48
      noSpecial: true
    }
  }
})
param sentinelWebhookFunctionKey string

// ---------------------------------------------------------------------------------------------------------------
// Alerts

@description('E-mail address that receives the two alert rules (lag, dead letters) through a new action group. Empty: no action group is created.')
param alertEmailAddress string = ''

@description('Resource IDs of existing action groups the alert rules notify, in addition to the e-mail one.')
param alertActionGroupIds array = []

@minValue(300)
@maxValue(86400)
@description('Lag alert threshold in seconds: fires when a tenant is this far behind Defender (or its lag metric has been silent that long).')
param lagAlertThresholdSeconds int = 1800

@minValue(0)
@maxValue(100000)
@description('Dead-letter alert threshold: fires when more dead letters than this are added in 15 minutes.')
param deadLetterAlertThreshold int = 0

// ---------------------------------------------------------------------------------------------------------------
// Derived values

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var allTags = union(tags, {
  'azd-env-name': environmentName
})
var appResourceGroupName = empty(resourceGroupName) ? 'rg-${environmentName}' : resourceGroupName

// /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.OperationalInsights/workspaces/<name>
var workspaceSubscriptionId = split(sentinelWorkspaceResourceId, '/')[2]
var workspaceResourceGroupName = split(sentinelWorkspaceResourceId, '/')[4]
var workspaceName = split(sentinelWorkspaceResourceId, '/')[8]

// Endpoints that differ per cloud. Graph and Azure Monitor are not in environment(), so they follow its name.
var cloudName = environment().name
var isUsGov = toLower(cloudName) == 'azureusgovernment'
var isChina = toLower(cloudName) == 'azurechinacloud'
var defaultGraphEndpoint = isUsGov ? 'https://graph.microsoft.us' : (isChina ? 'https://microsoftgraph.chinacloudapi.cn' : 'https://graph.microsoft.com')
var defaultLogsIngestionScope = isUsGov ? 'https://monitor.azure.us/.default' : (isChina ? 'https://monitor.azure.cn/.default' : 'https://monitor.azure.com/.default')
var envArm = environment().resourceManager
var envLogin = environment().authentication.loginEndpoint
var defaultArmEndpoint = endsWith(envArm, '/') ? substring(envArm, 0, length(envArm) - 1) : envArm
var defaultAuthorityHost = endsWith(envLogin, '/') ? substring(envLogin, 0, length(envLogin) - 1) : envLogin

var effectiveGraphEndpoint = empty(graphEndpoint) ? defaultGraphEndpoint : graphEndpoint
var effectiveArmEndpoint = empty(armEndpoint) ? defaultArmEndpoint : armEndpoint
var effectiveAuthorityHost = empty(authorityHost) ? defaultAuthorityHost : authorityHost
var effectiveLogsIngestionScope = empty(logsIngestionScope) ? defaultLogsIngestionScope : logsIngestionScope
var effectiveTenantIds = empty(defenderTenantIds) ? tenant().tenantId : defenderTenantIds

var portalMirror = mirrorTarget == 'defender-portal'
// Deterministic per workspace: redeployments keep the rule (and the app's SYNC_MIRROR_RULE_ID) the same.
var mirrorRuleId = guid(sentinelWorkspaceResourceId, 'defender-sync-mirror-rule')

// ---------------------------------------------------------------------------------------------------------------
// Resources

resource rg 'Microsoft.Resources/resourceGroups@2025-04-01' = {
  name: appResourceGroupName
  location: location
  tags: allTags
}

module identity 'modules/identity.bicep' = {
  name: 'defender-sync-identity'
  scope: rg
  params: {
    location: location
    tags: allTags
    identityName: 'id-defender-sync-${resourceToken}'
  }
}

module workspace 'modules/workspace.bicep' = {
  name: 'defender-sync-workspace-${resourceToken}'
  scope: resourceGroup(workspaceSubscriptionId, workspaceResourceGroupName)
  params: {
    workspaceName: workspaceName
    location: sentinelWorkspaceLocation
    tags: allTags
    dataCollectionRuleName: 'dcr-defender-sync-${resourceToken}'
    appPrincipalId: identity.outputs.principalId
    tableRetentionOverride: tableRetentionOverride
    tableRetentionInDays: tableRetentionInDays
    deployMirrorRequests: portalMirror
  }
}

// After the workspace module: the rule's query needs DefenderMirrorRequests_CL to exist.
module mirrorRule 'modules/mirror-rule.bicep' = if (portalMirror) {
  name: 'defender-sync-mirror-rule-${resourceToken}'
  scope: resourceGroup(workspaceSubscriptionId, workspaceResourceGroupName)
  params: {
    workspaceName: workspaceName
    ruleId: mirrorRuleId
  }
  dependsOn: [
    workspace
  ]
}

module app 'modules/app.bicep' = {
  name: 'defender-sync-app'
  scope: rg
  params: {
    location: location
    tags: allTags
    resourceToken: resourceToken
    identityName: identity.outputs.name
    appInsightsWorkspaceResourceId: appInsightsWorkspaceResourceId
    sentinelWorkspaceResourceId: sentinelWorkspaceResourceId
    logsIngestionEndpoint: workspace.outputs.logsIngestionEndpoint
    logsDcrImmutableId: workspace.outputs.dataCollectionRuleImmutableId
    logsIngestionScope: effectiveLogsIngestionScope
    graphEndpoint: effectiveGraphEndpoint
    armEndpoint: effectiveArmEndpoint
    authorityHost: effectiveAuthorityHost
    defenderTenantIds: effectiveTenantIds
    syncTenants: syncTenants
    defenderClientId: defenderClientId
    defenderCredentialType: defenderCredentialType
    defenderSecretName: defenderSecretName
    defenderCertificateName: defenderCertificateName
    syncInitialLookbackDays: syncInitialLookbackDays
    syncOverlapSeconds: syncOverlapSeconds
    syncTimeBudgetSeconds: syncTimeBudgetSeconds
    graphMaxRequestsPerMinute: graphMaxRequestsPerMinute
    sentinelMaxWritesPerMinute: sentinelMaxWritesPerMinute
    graphPageSize: graphPageSize
    syncConflictPolicy: syncConflictPolicy
    syncOwnerMap: syncOwnerMap
    webhookMaxBodyBytes: webhookMaxBodyBytes
    syncFanout: syncFanout
    mirrorTarget: mirrorTarget
    mirrorRuleId: portalMirror ? mirrorRuleId : ''
    mirrorRequestsPerMinute: mirrorRequestsPerMinute
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    sentinelWebhookFunctionKey: sentinelWebhookFunctionKey
    operatorPrincipalId: principalId
    operatorPrincipalType: principalType
  }
}

module alerts 'modules/alerts.bicep' = {
  name: 'defender-sync-alerts'
  scope: rg
  params: {
    location: location
    tags: allTags
    resourceToken: resourceToken
    appInsightsId: app.outputs.appInsightsId
    alertEmailAddress: alertEmailAddress
    alertActionGroupIds: alertActionGroupIds
    lagAlertThresholdSeconds: lagAlertThresholdSeconds
    deadLetterAlertThreshold: deadLetterAlertThreshold
  }
}

module workbook 'modules/workbook.bicep' = {
  name: 'defender-sync-workbook-${resourceToken}'
  scope: resourceGroup(workspaceSubscriptionId, workspaceResourceGroupName)
  params: {
    workspaceName: workspaceName
    location: sentinelWorkspaceLocation
    tags: allTags
    appInsightsId: app.outputs.appInsightsId
  }
}

module playbook 'modules/playbook.bicep' = if (deploySentinelAutomation) {
  name: 'defender-sync-playbook'
  scope: rg
  params: {
    location: location
    tags: allTags
    resourceToken: resourceToken
    functionAppHostName: app.outputs.functionAppHostName
    keyVaultName: app.outputs.keyVaultName
    webhookKeySecretName: app.outputs.webhookKeySecretName
    sentinelAutomationPrincipalObjectId: sentinelAutomationPrincipalObjectId
  }
}

module automation 'modules/automation.bicep' = if (deploySentinelAutomation) {
  name: 'defender-sync-automation-${resourceToken}'
  scope: resourceGroup(workspaceSubscriptionId, workspaceResourceGroupName)
  params: {
    workspaceName: workspaceName
    playbookId: playbook.outputs.playbookId
    playbookPrincipalId: playbook.outputs.playbookPrincipalId
    automationRuleOrder: automationRuleOrder
    mirrorRuleId: portalMirror ? mirrorRuleId : ''
  }
  dependsOn: [
    mirrorRule
  ]
}

// ---------------------------------------------------------------------------------------------------------------
// Outputs: azd stores them in the environment (.azure/<env>/.env); the postdeploy hook and local runs use them.

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = app.outputs.functionAppName
output FUNCTION_APP_HOST string = app.outputs.functionAppHostName
output SENTINEL_WEBHOOK_URL string = 'https://${app.outputs.functionAppHostName}/api/sentinel/incidents'
output AZURE_CLIENT_ID string = identity.outputs.clientId
output AZURE_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output AZURE_IDENTITY_RESOURCE_ID string = identity.outputs.id
output DEFENDER_TENANT_IDS string = effectiveTenantIds
output DEFENDER_CREDENTIAL_TYPE string = defenderCredentialType
output FEDERATED_CREDENTIAL_ISSUER string = '${effectiveAuthorityHost}/${tenant().tenantId}/v2.0'
output FEDERATED_CREDENTIAL_SUBJECT string = identity.outputs.principalId
output LOGS_INGESTION_ENDPOINT string = workspace.outputs.logsIngestionEndpoint
output LOGS_DCR_IMMUTABLE_ID string = workspace.outputs.dataCollectionRuleImmutableId
output LOGS_DCR_RESOURCE_ID string = workspace.outputs.dataCollectionRuleId
output LOGS_INGESTION_SCOPE string = effectiveLogsIngestionScope
output SENTINEL_WORKSPACE_ID string = sentinelWorkspaceResourceId
output GRAPH_ENDPOINT string = effectiveGraphEndpoint
output ARM_ENDPOINT string = effectiveArmEndpoint
output AZURE_AUTHORITY_HOST string = effectiveAuthorityHost
output AZURE_STORAGE_ACCOUNT_NAME string = app.outputs.storageAccountName
output AZURE_STORAGE_BLOB_ENDPOINT string = app.outputs.blobServiceUri
output AZURE_STORAGE_QUEUE_ENDPOINT string = app.outputs.queueServiceUri
output AZURE_STORAGE_TABLE_ENDPOINT string = app.outputs.tableServiceUri
output SYNC_QUEUE string = app.outputs.queueName
output AZURE_KEY_VAULT_NAME string = app.outputs.keyVaultName
output AZURE_KEY_VAULT_URI string = app.outputs.keyVaultUri
output SENTINEL_WEBHOOK_KEY_SECRET_NAME string = app.outputs.webhookKeySecretName
output APPLICATIONINSIGHTS_CONNECTION_STRING string = app.outputs.appInsightsConnectionString
output APPLICATIONINSIGHTS_RESOURCE_ID string = app.outputs.appInsightsId
output SENTINEL_PLAYBOOK_ID string = deploySentinelAutomation ? playbook.outputs.playbookId : ''
output SENTINEL_AUTOMATION_RULE_ID string = deploySentinelAutomation ? automation.outputs.automationRuleId : ''
output SYNC_MIRROR_TARGET string = mirrorTarget
output SYNC_MIRROR_RULE_ID string = portalMirror ? mirrorRuleId : ''
// An empty sentinelAutomationPrincipalObjectId skips the Automation Contributor role: the automation rule then cannot
// run the playbook and Sentinel edits reach Defender only through the reconcile timer. Say so instead of staying silent.
output DEPLOYMENT_WARNING string = (deploySentinelAutomation && empty(sentinelAutomationPrincipalObjectId)) ? 'sentinelAutomationPrincipalObjectId is empty, so the Azure Security Insights service principal did not get Microsoft Sentinel Automation Contributor on resource group ${rg.name}: the automation rule cannot run the playbook until you grant it (Microsoft Sentinel > Settings > Playbook permissions, or redeploy with the parameter; see docs/OPERATIONS.md).' : ''
