// The Function app and what it runs on, in the app resource group: storage (identity-only), the fan-out queue,
// Application Insights (Entra-only ingestion), Key Vault (RBAC), the Flex Consumption plan and app, and the app
// identity's roles on them. Every app setting PRODUCT.md names is set here.

@description('Region of the app resources.')
param location string

@description('Tags applied to every resource.')
param tags object = {}

@description('Unique suffix for globally unique names.')
param resourceToken string

@description('Name of the user-assigned managed identity (modules/identity.bicep) the app runs as.')
param identityName string

@description('Resource ID of an existing Log Analytics workspace for Application Insights. Empty: create one.')
param appInsightsWorkspaceResourceId string = ''

@description('SENTINEL_WORKSPACE_ID: full ARM resource ID of the Sentinel workspace.')
param sentinelWorkspaceResourceId string

@description('LOGS_INGESTION_ENDPOINT: the DCR logs ingestion endpoint.')
param logsIngestionEndpoint string

@description('LOGS_DCR_IMMUTABLE_ID: the DCR immutable ID.')
param logsDcrImmutableId string

@description('LOGS_INGESTION_SCOPE: token scope of the Logs Ingestion API in this cloud.')
param logsIngestionScope string

@description('GRAPH_ENDPOINT: Microsoft Graph endpoint of the Defender tenants cloud.')
param graphEndpoint string

@description('ARM_ENDPOINT: Resource Manager endpoint of this cloud, without a trailing slash.')
param armEndpoint string

@description('AZURE_AUTHORITY_HOST: Entra authority host of this cloud, without a trailing slash.')
param authorityHost string

@description('DEFENDER_TENANT_IDS: comma-separated tenant IDs.')
param defenderTenantIds string

@description('SYNC_TENANTS: per-tenant overrides.')
param syncTenants object = {}

@description('DEFENDER_CLIENT_ID: multi-tenant app registration client ID; empty leaves the setting out.')
param defenderClientId string = ''

@allowed([
  'federated'
  'secret'
  'certificate'
])
@description('federated (secretless), secret or certificate: which DEFENDER_CLIENT_* Key Vault reference is set.')
param defenderCredentialType string = 'federated'

@description('Key Vault secret name of the app registration client secret.')
param defenderSecretName string = 'defender-client-secret'

@description('Key Vault certificate name of the app registration certificate.')
param defenderCertificateName string = 'defender-client-certificate'

@description('SYNC_INITIAL_LOOKBACK_DAYS.')
param syncInitialLookbackDays int = 7

@description('SYNC_OVERLAP_SECONDS.')
param syncOverlapSeconds int = 120

@description('SYNC_TIME_BUDGET_SECONDS: below functionTimeout (600 s in host.json).')
param syncTimeBudgetSeconds int = 540

@description('GRAPH_MAX_REQUESTS_PER_MINUTE.')
param graphMaxRequestsPerMinute int = 100

@description('SENTINEL_MAX_WRITES_PER_MINUTE.')
param sentinelMaxWritesPerMinute int = 300

@description('SYNC_GRAPH_PAGE_SIZE.')
param graphPageSize int = 50

@description('SYNC_CONFLICT_POLICY.')
param syncConflictPolicy string = 'latest'

@description('SYNC_OWNER_MAP.')
param syncOwnerMap object = {}

@description('WEBHOOK_MAX_BODY_BYTES.')
param webhookMaxBodyBytes int = 4194304

@description('SYNC_FANOUT: inline or queue.')
param syncFanout string = 'inline'

@allowed([
  'defender-portal'
  'sentinel-api'
])
@description('SYNC_MIRROR_TARGET: how mirrors are created (defender-portal: by the mirror analytics rule; sentinel-api: through the incidents API).')
param mirrorTarget string = 'sentinel-api'

@description('SYNC_MIRROR_RULE_ID: resource name (GUID) of the mirror analytics rule (defender-portal only).')
param mirrorRuleId string = ''

@minValue(1)
@maxValue(30)
@description('SYNC_MIRROR_REQUESTS_PER_MINUTE: mirror requests in any rolling 60 seconds (defender-portal only).')
param mirrorRequestsPerMinute int = 25

@description('Flex Consumption instance memory in MB.')
param instanceMemoryMB int = 2048

@description('Flex Consumption maximum instance count.')
param maximumInstanceCount int = 100

@secure()
@description('Value of the sentinel_webhook function key the playbook sends; stored as a Key Vault secret.')
param sentinelWebhookFunctionKey string

@description('Object ID of the deploying operator; gets Key Vault Secrets Officer (and Certificates Officer) on the vault. Empty: none.')
param operatorPrincipalId string = ''

@description('Principal type of operatorPrincipalId.')
param operatorPrincipalType string = 'User'

// Contract values (PRODUCT.md): the fan-out queue and the timer schedules (NCRONTAB, six fields).
var queueName = 'defender-tenant-work'
var pullSchedule = '0 */5 * * * *'
var reconcileSchedule = '0 */15 * * * *'
var webhookKeySecretName = 'sentinel-webhook-function-key'

var storageAccountName = 'st${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'
var createWorkspace = empty(appInsightsWorkspaceResourceId)

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: identityName
}

// ----- Storage: AzureWebJobsStorage, deployment package, state tables, fan-out queue. Identity access only.

resource storage 'Microsoft.Storage/storageAccounts@2026-04-01' = {
  // checkov:skip=CKV_AZURE_35: The network default stays Allow: Flex Consumption without VNet integration reaches the account over its public endpoint (no fixed egress addresses); access is Entra ID only (allowSharedKeyAccess false).
  // checkov:skip=CKV_AZURE_59: Public network access is required for the same reason as CKV_AZURE_35.
  // checkov:skip=CKV_AZURE_43: The name is 'st' + uniqueString() (13 lower-case letters and digits), 15 characters and valid; checkov cannot evaluate the interpolation.
  // checkov:skip=CKV_AZURE_206: LRS is enough: the account holds cursors, links and leases that the app rebuilds by re-reading Defender and Sentinel; geo-replication buys nothing here.
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2026-04-01' = {
  parent: storage
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2026-04-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2026-04-01' = {
  parent: storage
  name: 'default'
}

resource workQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2026-04-01' = {
  parent: queueService
  name: queueName
}

// The Functions host moves a message here after maxDequeueCount failed attempts (host.json).
resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2026-04-01' = {
  parent: queueService
  name: '${queueName}-poison'
}

// ----- Application Insights on an existing or new workspace; local (instrumentation key) auth off.

resource logWorkspace 'Microsoft.OperationalInsights/workspaces@2026-03-01' = if (createWorkspace) {
  name: 'log-defender-sync-${resourceToken}'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
    features: {
      disableLocalAuth: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-defender-sync-${resourceToken}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: createWorkspace ? logWorkspace.id : appInsightsWorkspaceResourceId
    IngestionMode: 'LogAnalytics'
    DisableLocalAuth: true
    publicNetworkAccessForIngestion: 'Enabled'
    publicNetworkAccessForQuery: 'Enabled'
  }
}

// ----- Key Vault: the Defender secret or certificate (when one is used) and the playbook's webhook key.

resource keyVault 'Microsoft.KeyVault/vaults@2026-02-01' = {
  // checkov:skip=CKV_AZURE_109: The firewall stays open: Key Vault references of a Flex Consumption app without VNet integration and the Consumption Logic App do not come from trusted-service or fixed addresses; access is Entra RBAC only.
  // checkov:skip=CKV_AZURE_189: Public network access is required for the same reason as CKV_AZURE_109.
  name: 'kv-${resourceToken}'
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

// The function key the playbook sends in x-functions-key. Bicep owns the value (a secure parameter that azd
// generates once and keeps), so the playbook's read access can be scoped to this one secret; the postdeploy hook
// sets the same value as the sentinel_webhook function's key "sentinel-playbook".
resource webhookKeySecret 'Microsoft.KeyVault/vaults/secrets@2026-02-01' = {
  // checkov:skip=CKV_AZURE_41: No expiry: the playbook reads this secret on every run and an expired secret would silently stop the push-back; rotate it with the procedure in docs/OPERATIONS.md.
  parent: keyVault
  name: webhookKeySecretName
  properties: {
    value: sentinelWebhookFunctionKey
    contentType: 'text/plain; function key of sentinel_webhook'
    attributes: {
      enabled: true
    }
  }
}

// ----- Flex Consumption plan and Function app

resource plan 'Microsoft.Web/serverfarms@2025-03-01' = {
  // checkov:skip=CKV_AZURE_225: Zone redundancy of Flex Consumption exists only in some regions; the app keeps no state on instances (all of it is in Storage), so a zone outage only delays a run and the next run catches up.
  name: 'plan-defender-sync-${resourceToken}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

var kvReferencePrefix = '@Microsoft.KeyVault(SecretUri=${keyVault.properties.vaultUri}secrets/'

var baseSettings = [
  // Identity-based host storage (no connection string, no account key).
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identity.properties.clientId
  }
  {
    name: 'AzureWebJobsStorage__blobServiceUri'
    value: storage.properties.primaryEndpoints.blob
  }
  {
    name: 'AzureWebJobsStorage__queueServiceUri'
    value: storage.properties.primaryEndpoints.queue
  }
  {
    name: 'AzureWebJobsStorage__tableServiceUri'
    value: storage.properties.primaryEndpoints.table
  }
  // DefaultAzureCredential picks the user-assigned identity.
  {
    name: 'AZURE_CLIENT_ID'
    value: identity.properties.clientId
  }
  // Telemetry: Entra ID authenticated ingestion (local auth is off on the component).
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: appInsights.properties.ConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'Authorization=AAD;ClientId=${identity.properties.clientId}'
  }
  // Defender tenants.
  {
    name: 'DEFENDER_TENANT_IDS'
    value: defenderTenantIds
  }
  {
    name: 'SYNC_TENANTS'
    value: string(syncTenants)
  }
  // Endpoints of this cloud.
  {
    name: 'AZURE_AUTHORITY_HOST'
    value: authorityHost
  }
  {
    name: 'GRAPH_ENDPOINT'
    value: graphEndpoint
  }
  {
    name: 'LOGS_INGESTION_ENDPOINT'
    value: logsIngestionEndpoint
  }
  {
    name: 'LOGS_DCR_IMMUTABLE_ID'
    value: logsDcrImmutableId
  }
  {
    name: 'LOGS_INGESTION_SCOPE'
    value: logsIngestionScope
  }
  {
    name: 'SENTINEL_WORKSPACE_ID'
    value: sentinelWorkspaceResourceId
  }
  {
    name: 'ARM_ENDPOINT'
    value: armEndpoint
  }
  // Sync behaviour.
  {
    name: 'SYNC_INITIAL_LOOKBACK_DAYS'
    value: string(syncInitialLookbackDays)
  }
  {
    name: 'SYNC_OVERLAP_SECONDS'
    value: string(syncOverlapSeconds)
  }
  {
    name: 'SYNC_TIME_BUDGET_SECONDS'
    value: string(syncTimeBudgetSeconds)
  }
  {
    name: 'GRAPH_MAX_REQUESTS_PER_MINUTE'
    value: string(graphMaxRequestsPerMinute)
  }
  {
    name: 'SENTINEL_MAX_WRITES_PER_MINUTE'
    value: string(sentinelMaxWritesPerMinute)
  }
  {
    name: 'SYNC_GRAPH_PAGE_SIZE'
    value: string(graphPageSize)
  }
  {
    name: 'SYNC_CONFLICT_POLICY'
    value: syncConflictPolicy
  }
  {
    name: 'SYNC_OWNER_MAP'
    value: string(syncOwnerMap)
  }
  {
    name: 'WEBHOOK_MAX_BODY_BYTES'
    value: string(webhookMaxBodyBytes)
  }
  {
    name: 'SYNC_FANOUT'
    value: syncFanout
  }
  {
    name: 'SYNC_QUEUE'
    value: queueName
  }
  {
    name: 'SYNC_MIRROR_TARGET'
    value: mirrorTarget
  }
  // Timer schedules: %DEFENDER_PULL_SCHEDULE% and %SENTINEL_RECONCILE_SCHEDULE% must resolve or the host drops the function.
  {
    name: 'DEFENDER_PULL_SCHEDULE'
    value: pullSchedule
  }
  {
    name: 'SENTINEL_RECONCILE_SCHEDULE'
    value: reconcileSchedule
  }
]

// Only with an app registration; absent means the app identity calls Graph (home tenant only).
var clientIdSettings = empty(defenderClientId) ? [] : [
  {
    name: 'DEFENDER_CLIENT_ID'
    value: defenderClientId
  }
]

// Absent by default: the secretless federated credential. Key Vault references resolved with keyVaultReferenceIdentity.
var secretSettings = (defenderCredentialType == 'secret') ? [
  {
    name: 'DEFENDER_CLIENT_SECRET'
    value: '${kvReferencePrefix}${defenderSecretName}/)'
  }
] : []

// A certificate's secret holds the PFX (base64) with its private key; the app accepts that content as is.
var certificateSettings = (defenderCredentialType == 'certificate') ? [
  {
    name: 'DEFENDER_CLIENT_CERTIFICATE'
    value: '${kvReferencePrefix}${defenderCertificateName}/)'
  }
] : []

// The mirror rule and the request pace only mean something when the rule creates the mirrors.
var mirrorRuleSettings = (mirrorTarget == 'defender-portal') ? [
  {
    name: 'SYNC_MIRROR_RULE_ID'
    value: mirrorRuleId
  }
  {
    name: 'SYNC_MIRROR_REQUESTS_PER_MINUTE'
    value: string(mirrorRequestsPerMinute)
  }
] : []

resource functionApp 'Microsoft.Web/sites@2025-03-01' = {
  // checkov:skip=CKV_AZURE_17: Client certificates are not used: the webhook is called by the Consumption Logic App with a function key, the other endpoints with the admin key.
  // checkov:skip=CKV_AZURE_222: Public network access is required: Sentinel automation runs a Consumption Logic App that calls the webhook over the internet; every HTTP function needs a key.
  // checkov:skip=CKV_AZURE_213: The Flex Consumption plan has no App Service health check; sync health is watched by the lag and dead-letter alert rules and served by sync/status.
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales from zero by itself; a minimum instance count does not apply to this plan.
  name: 'func-defender-sync-${resourceToken}'
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    keyVaultReferenceIdentity: identity.id
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: concat(baseSettings, clientIdSettings, secretSettings, certificateSettings, mirrorRuleSettings)
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
  dependsOn: [
    deploymentContainer
    blobOwner
    queueContributor
    tableContributor
    appInsightsPublisher
    keyVaultSecretsUser
  ]
}

// No basic (publishing profile) authentication: deployments use Entra ID.
resource ftpPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

// ----- Roles of the app identity (built-in role definition IDs)

// Storage Blob Data Owner (b7e6dc6d-f1e8-4753-8033-0f276bb0955b): host leases and keys, deployment package.
resource blobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b')
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Storage Queue Data Contributor (974c5e8b-45b9-4653-ba55-5f855dd0fb88): fan-out queue, its trigger and poison queue.
resource queueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, '974c5e8b-45b9-4653-ba55-5f855dd0fb88')
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '974c5e8b-45b9-4653-ba55-5f855dd0fb88')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Storage Table Data Contributor (0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3): cursors, links, leases, dead letters.
resource tableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3')
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Monitoring Metrics Publisher (3913510d-42f4-4e42-8a64-420c390055eb) on Application Insights: Entra ID ingestion.
resource appInsightsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, identity.id, '3913510d-42f4-4e42-8a64-420c390055eb')
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '3913510d-42f4-4e42-8a64-420c390055eb')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// Key Vault Secrets User (4633458b-17de-408a-b874-0445c86b69e6) on the vault: resolves the Key Vault references
// (a certificate reference reads the certificate's secret, so Secrets User covers both credential types).
resource keyVaultSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(keyVault.id, identity.id, '4633458b-17de-408a-b874-0445c86b69e6')
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ----- Operator roles (optional): store the Defender credential and read the webhook key in the postdeploy hook.

// Key Vault Secrets Officer (b86a8fe4-44ce-4948-aee5-eccb2c155cd7).
resource operatorSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(keyVault.id, operatorPrincipalId, 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7')
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7')
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

// Key Vault Certificates Officer (a4417e6f-fecd-4de8-b567-7b0420556985), only with a certificate credential.
resource operatorCertificatesOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId) && (defenderCredentialType == 'certificate')) {
  name: guid(keyVault.id, operatorPrincipalId, 'a4417e6f-fecd-4de8-b567-7b0420556985')
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'a4417e6f-fecd-4de8-b567-7b0420556985')
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

output functionAppName string = functionApp.name
output functionAppHostName string = functionApp.properties.defaultHostName
output storageAccountName string = storage.name
output blobServiceUri string = storage.properties.primaryEndpoints.blob
output queueServiceUri string = storage.properties.primaryEndpoints.queue
output tableServiceUri string = storage.properties.primaryEndpoints.table
output queueName string = workQueue.name
output keyVaultName string = keyVault.name
output keyVaultUri string = keyVault.properties.vaultUri
output webhookKeySecretName string = webhookKeySecret.name
output appInsightsId string = appInsights.id
output appInsightsConnectionString string = appInsights.properties.ConnectionString
