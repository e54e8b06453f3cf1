// Deployed in the resource group of the Sentinel workspace (which can be another group or subscription than the app).
// Creates the three change-log tables and a Direct data collection rule whose stream declarations and table schemas
// both come from infra/tables/<Table>_CL.json (the single source of truth shared with sync/rows.py), the KQL
// functions that return the latest state, and the app identity's roles on the DCR and on the workspace.

@description('Name of the existing Log Analytics workspace that has Microsoft Sentinel.')
param workspaceName string

@description('Region of the workspace; the Direct DCR must be in the same region.')
param location string

@description('Tags applied to the DCR.')
param tags object = {}

@description('Name of the data collection rule.')
param dataCollectionRuleName string

@description('Principal (object) ID of the Function app user-assigned identity.')
param appPrincipalId string

@description('Also create DefenderMirrorRequests_CL and its DCR stream (SYNC_MIRROR_TARGET=defender-portal).')
param deployMirrorRequests bool = false

@description('true: the custom tables keep data for tableRetentionInDays; false: the workspace default retention.')
param tableRetentionOverride bool = false

// The tables API accepts 4-730 days; 1-3 are refused at deployment, so they are refused here.
@minValue(4)
@maxValue(730)
@description('Interactive retention in days of the custom tables, used when tableRetentionOverride is true (4-730).')
param tableRetentionInDays int = 90

var destinationName = 'sentinelWorkspace'
var retention = tableRetentionOverride ? tableRetentionInDays : null

resource workspace 'Microsoft.OperationalInsights/workspaces@2026-03-01' existing = {
  name: workspaceName
}

// ----- Custom tables (Analytics plan). Columns: infra/tables/*.json, never copied here.

resource incidentsTable 'Microsoft.OperationalInsights/workspaces/tables@2026-03-01' = {
  parent: workspace
  name: 'DefenderIncidents_CL'
  properties: {
    plan: 'Analytics'
    retentionInDays: retention
    schema: {
      name: 'DefenderIncidents_CL'
      description: 'Defender XDR incidents, one row per incident version (tenant, incident ID, lastUpdateDateTime).'
      columns: loadJsonContent('../tables/DefenderIncidents_CL.json').columns
    }
  }
}

resource alertsTable 'Microsoft.OperationalInsights/workspaces/tables@2026-03-01' = {
  parent: workspace
  name: 'DefenderAlerts_CL'
  properties: {
    plan: 'Analytics'
    retentionInDays: retention
    schema: {
      name: 'DefenderAlerts_CL'
      description: 'Defender XDR alerts, one row per alert version (alert ID, lastUpdateDateTime).'
      columns: loadJsonContent('../tables/DefenderAlerts_CL.json').columns
    }
  }
}

resource evidenceTable 'Microsoft.OperationalInsights/workspaces/tables@2026-03-01' = {
  parent: workspace
  name: 'DefenderEvidence_CL'
  properties: {
    plan: 'Analytics'
    retentionInDays: retention
    schema: {
      name: 'DefenderEvidence_CL'
      description: 'Evidence of each Defender XDR alert version, one row per evidence item.'
      columns: loadJsonContent('../tables/DefenderEvidence_CL.json').columns
    }
  }
}

// With defender-portal: one row per mirror request, read by the mirror analytics rule (modules/mirror-rule.bicep).
resource mirrorRequestsTable 'Microsoft.OperationalInsights/workspaces/tables@2026-03-01' = if (deployMirrorRequests) {
  parent: workspace
  name: 'DefenderMirrorRequests_CL'
  properties: {
    plan: 'Analytics'
    retentionInDays: retention
    schema: {
      name: 'DefenderMirrorRequests_CL'
      description: 'Mirror requests of the Defender sync app: one row per Defender incident to mirror; the mirror analytics rule turns each into one incident.'
      columns: loadJsonContent('../tables/DefenderMirrorRequests_CL.json').columns
    }
  }
}

// ----- Direct DCR: its own logs ingestion endpoint, no DCE needed (no Private Link).

resource dataCollectionRule 'Microsoft.Insights/dataCollectionRules@2024-03-11' = {
  name: dataCollectionRuleName
  location: location
  tags: tags
  kind: 'Direct'
  properties: {
    description: 'Defender XDR incidents, alerts and evidence sent by the Defender sync Function app through the Logs Ingestion API.'
    streamDeclarations: union({
      'Custom-DefenderIncidents': {
        columns: loadJsonContent('../tables/DefenderIncidents_CL.json').columns
      }
      'Custom-DefenderAlerts': {
        columns: loadJsonContent('../tables/DefenderAlerts_CL.json').columns
      }
      'Custom-DefenderEvidence': {
        columns: loadJsonContent('../tables/DefenderEvidence_CL.json').columns
      }
    }, deployMirrorRequests ? {
      'Custom-DefenderMirrorRequests': {
        columns: loadJsonContent('../tables/DefenderMirrorRequests_CL.json').columns
      }
    } : {})
    destinations: {
      logAnalytics: [
        {
          name: destinationName
          workspaceResourceId: workspace.id
        }
      ]
    }
    dataFlows: concat([
      {
        streams: [
          'Custom-DefenderIncidents'
        ]
        destinations: [
          destinationName
        ]
        transformKql: 'source'
        outputStream: 'Custom-DefenderIncidents_CL'
      }
      {
        streams: [
          'Custom-DefenderAlerts'
        ]
        destinations: [
          destinationName
        ]
        transformKql: 'source'
        outputStream: 'Custom-DefenderAlerts_CL'
      }
      {
        streams: [
          'Custom-DefenderEvidence'
        ]
        destinations: [
          destinationName
        ]
        transformKql: 'source'
        outputStream: 'Custom-DefenderEvidence_CL'
      }
    ], deployMirrorRequests ? [
      {
        streams: [
          'Custom-DefenderMirrorRequests'
        ]
        destinations: [
          destinationName
        ]
        transformKql: 'source'
        outputStream: 'Custom-DefenderMirrorRequests_CL'
      }
    ] : [])
  }
  dependsOn: [
    incidentsTable
    alertsTable
    evidenceTable
    mirrorRequestsTable
  ]
}

// ----- Roles of the app identity

// Monitoring Metrics Publisher (3913510d-42f4-4e42-8a64-420c390055eb) on the DCR: the Logs Ingestion API data action.
resource dcrMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(dataCollectionRule.id, appPrincipalId, '3913510d-42f4-4e42-8a64-420c390055eb')
  scope: dataCollectionRule
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '3913510d-42f4-4e42-8a64-420c390055eb')
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Microsoft Sentinel Responder (3e150937-b8fe-4cfb-8069-0eaf05ecd056) on the workspace: read, create and update
// incidents and comments (not delete), which is all the mirror and the push-back need.
resource sentinelResponder 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, appPrincipalId, '3e150937-b8fe-4cfb-8069-0eaf05ecd056')
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '3e150937-b8fe-4cfb-8069-0eaf05ecd056')
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// ----- KQL functions (saved searches with a function alias), text in infra/kql/*.kql

resource incidentsLatest 'Microsoft.OperationalInsights/workspaces/savedSearches@2026-03-01' = {
  parent: workspace
  name: 'defender-sync-DefenderIncidentsLatest'
  properties: {
    category: 'Defender sync'
    displayName: 'DefenderIncidentsLatest: latest version of each Defender incident'
    functionAlias: 'DefenderIncidentsLatest'
    query: loadTextContent('../kql/DefenderIncidentsLatest.kql')
    version: 2
  }
  dependsOn: [
    incidentsTable
  ]
}

resource alertsLatest 'Microsoft.OperationalInsights/workspaces/savedSearches@2026-03-01' = {
  parent: workspace
  name: 'defender-sync-DefenderAlertsLatest'
  properties: {
    category: 'Defender sync'
    displayName: 'DefenderAlertsLatest: latest version of each Defender alert'
    functionAlias: 'DefenderAlertsLatest'
    query: loadTextContent('../kql/DefenderAlertsLatest.kql')
    version: 2
  }
  dependsOn: [
    alertsTable
  ]
}

resource evidenceForLatestAlerts 'Microsoft.OperationalInsights/workspaces/savedSearches@2026-03-01' = {
  parent: workspace
  name: 'defender-sync-DefenderEvidenceForLatestAlerts'
  properties: {
    category: 'Defender sync'
    displayName: 'DefenderEvidenceForLatestAlerts: evidence of the latest version of each alert'
    functionAlias: 'DefenderEvidenceForLatestAlerts'
    query: loadTextContent('../kql/DefenderEvidenceForLatestAlerts.kql')
    version: 2
  }
  dependsOn: [
    alertsTable
    evidenceTable
  ]
}

output dataCollectionRuleId string = dataCollectionRule.id
output dataCollectionRuleImmutableId string = dataCollectionRule.properties.immutableId
output logsIngestionEndpoint string = dataCollectionRule.properties.endpoints.logsIngestion
