// User-assigned managed identity of the Function app. It is the app's identity for Storage, Log Analytics
// ingestion, Sentinel, Key Vault references and Application Insights, and (secretless default) the federated
// credential of the multi-tenant Defender app registration.

@description('Region of the identity.')
param location string

@description('Tags applied to the identity.')
param tags object = {}

@description('Name of the user-assigned managed identity.')
param identityName string

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: identityName
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
