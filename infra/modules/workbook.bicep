// The analyst workbook, in the Sentinel workspace's resource group with category 'sentinel' so it is listed under
// Microsoft Sentinel > Workbooks > My workbooks. Sync health queries run against Application Insights, the
// incident picture against the workspace (KQL functions from modules/workspace.bicep). Content:
// infra/workbooks/defender-sync.workbook.json, with two placeholders replaced by resource IDs.

@description('Name of the Sentinel workspace the workbook belongs to.')
param workspaceName string

@description('Region of the workbook (the workspace region).')
param location string

@description('Tags applied to the workbook.')
param tags object = {}

@description('Resource ID of the Application Insights component with the app telemetry.')
param appInsightsId string

resource workspace 'Microsoft.OperationalInsights/workspaces@2026-03-01' existing = {
  name: workspaceName
}

var content = loadTextContent('../workbooks/defender-sync.workbook.json')
var withAppInsights = replace(content, '__APPINSIGHTS_RESOURCE_ID__', appInsightsId)
var serialized = replace(withAppInsights, '__WORKSPACE_RESOURCE_ID__', workspace.id)

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(workspace.id, 'defender-sync-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'Defender XDR sync: health and incidents'
    category: 'sentinel'
    sourceId: workspace.id
    version: 'Notebook/1.0'
    serializedData: serialized
  }
}

output workbookId string = workbook.id
