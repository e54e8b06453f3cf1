// The Sentinel side of the webhook, in the app resource group: a Consumption Logic App with the Microsoft Sentinel
// incident trigger (azuresentinel API connection authenticated with the Logic App's managed identity) that reads
// the sentinel_webhook function key from Key Vault and POSTs the trigger body to /api/sentinel/incidents. Secure
// inputs and outputs keep the key and the incident out of the run history.

@description('Region of the Logic App and its API connection.')
param location string

@description('Tags applied to the Logic App and the connection.')
param tags object = {}

@description('Unique suffix for names.')
param resourceToken string

@description('Default host name of the Function app (func-....azurewebsites.net).')
param functionAppHostName string

@description('Name of the Key Vault that holds the webhook key secret.')
param keyVaultName string

@description('Name of the Key Vault secret with the sentinel_webhook function key.')
param webhookKeySecretName string

@description('Object ID of the Azure Security Insights service principal (gets Microsoft Sentinel Automation Contributor on this resource group). Empty: skip.')
param sentinelAutomationPrincipalObjectId string = ''

// The Key Vault data-plane audience of this cloud (https://vault.azure.net, https://vault.usgovcloudapi.net, ...).
var keyVaultAudience = 'https://${substring(environment().suffixes.keyvaultDns, 1)}'

resource keyVault 'Microsoft.KeyVault/vaults@2026-02-01' existing = {
  name: keyVaultName
}

resource webhookKeySecret 'Microsoft.KeyVault/vaults/secrets@2026-02-01' existing = {
  parent: keyVault
  name: webhookKeySecretName
}

resource sentinelConnection 'Microsoft.Web/connections@2016-06-01' = {
  name: 'azuresentinel-defender-sync-${resourceToken}'
  location: location
  tags: tags
  properties: {
    displayName: 'Microsoft Sentinel (managed identity of the Defender sync playbook)'
    customParameterValues: {}
    // Right for a managed-identity connection (what the Logic App designer itself writes), though the
    // Microsoft.Web/connections@2016-06-01 type does not declare it: Bicep warns, ARM accepts it.
    parameterValueType: 'Alternative'
    api: {
      id: subscriptionResourceId('Microsoft.Web/locations/managedApis', location, 'azuresentinel')
    }
  }
}

resource playbook 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'logic-defender-sync-webhook-${resourceToken}'
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    state: 'Enabled'
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      parameters: {
        '$connections': {
          defaultValue: {}
          type: 'Object'
        }
      }
      triggers: {
        Microsoft_Sentinel_incident: {
          type: 'ApiConnectionWebhook'
          inputs: {
            body: {
              callback_url: '@{listCallbackUrl()}'
            }
            host: {
              connection: {
                name: '@parameters(\'$connections\')[\'azuresentinel\'][\'connectionId\']'
              }
            }
            path: '/incident-creation'
          }
        }
      }
      actions: {
        Get_webhook_key: {
          type: 'Http'
          runAfter: {}
          inputs: {
            method: 'GET'
            uri: '${keyVault.properties.vaultUri}secrets/${webhookKeySecretName}?api-version=7.4'
            authentication: {
              type: 'ManagedServiceIdentity'
              audience: keyVaultAudience
            }
          }
          runtimeConfiguration: {
            secureData: {
              properties: [
                'inputs'
                'outputs'
              ]
            }
          }
        }
        Forward_to_sentinel_webhook: {
          type: 'Http'
          runAfter: {
            Get_webhook_key: [
              'Succeeded'
            ]
          }
          inputs: {
            method: 'POST'
            uri: 'https://${functionAppHostName}/api/sentinel/incidents'
            headers: {
              'Content-Type': 'application/json'
              'x-functions-key': '@{body(\'Get_webhook_key\')?[\'value\']}'
            }
            body: '@triggerBody()'
            retryPolicy: {
              type: 'exponential'
              count: 4
              interval: 'PT15S'
            }
          }
          runtimeConfiguration: {
            secureData: {
              properties: [
                'inputs'
                'outputs'
              ]
            }
          }
        }
      }
      outputs: {}
    }
    parameters: {
      '$connections': {
        value: {
          azuresentinel: {
            connectionId: sentinelConnection.id
            connectionName: sentinelConnection.name
            id: sentinelConnection.properties.api.id
            connectionProperties: {
              authentication: {
                type: 'ManagedServiceIdentity'
              }
            }
          }
        }
      }
    }
  }
}

// Key Vault Secrets User (4633458b-17de-408a-b874-0445c86b69e6) on the one secret the playbook reads.
resource playbookSecretReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(webhookKeySecret.id, playbook.id, '4633458b-17de-408a-b874-0445c86b69e6')
  scope: webhookKeySecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')
    principalId: playbook.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// Microsoft Sentinel Automation Contributor (f4c81013-99ee-4d62-a7ee-b3f1f648599a) for the Azure Security Insights
// service principal on this resource group (the playbook's): lets automation rules run the playbook.
resource sentinelAutomationContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(sentinelAutomationPrincipalObjectId)) {
  name: guid(resourceGroup().id, sentinelAutomationPrincipalObjectId, 'f4c81013-99ee-4d62-a7ee-b3f1f648599a')
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'f4c81013-99ee-4d62-a7ee-b3f1f648599a')
    principalId: sentinelAutomationPrincipalObjectId
    principalType: 'ServicePrincipal'
  }
}

output playbookId string = playbook.id
output playbookName string = playbook.name
output playbookPrincipalId string = playbook.identity.principalId
