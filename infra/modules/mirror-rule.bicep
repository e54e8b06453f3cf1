// In the Sentinel workspace's resource group, with SYNC_MIRROR_TARGET=defender-portal: the near-real-time analytics
// rule that turns each row of DefenderMirrorRequests_CL into one alert and one incident. Incidents created through the
// API never show in the unified Defender portal; incidents of an analytics rule do (PRODUCT.md "Mirror targets").

@description('Name of the existing Log Analytics workspace that has Microsoft Sentinel.')
param workspaceName string

@description('Resource name (a GUID) of the mirror rule; the app finds its incidents by it (SYNC_MIRROR_RULE_ID).')
param ruleId string

@description('Display name of the rule in the portal.')
param displayName string = 'Defender sync: mirror Defender XDR incidents'

resource workspace 'Microsoft.OperationalInsights/workspaces@2026-03-01' existing = {
  name: workspaceName
}

// api-version: NRT rules exist in the REST API only in preview versions (newest 2025-10-01-preview); every GA version
// up to 2025-09-01 knows only the kinds Fusion, MicrosoftSecurityIncidentCreation and Scheduled.
resource mirrorRule 'Microsoft.SecurityInsights/alertRules@2025-10-01-preview' = {
  name: ruleId
  scope: workspace
  kind: 'NRT'
  properties: {
    displayName: displayName
    // #DONT_CORR# first: the Defender correlation engine leaves each alert to this rule's own (disabled) grouping.
    description: '#DONT_CORR# One alert and one incident per mirror request of the Defender sync app (table DefenderMirrorRequests_CL). Do not edit: the app links each incident to its Defender incident by the alert link.'
    enabled: true
    severity: 'Medium'
    query: loadTextContent('../kql/mirror-rule.kql')
    suppressionEnabled: false
    suppressionDuration: 'PT5H'
    tactics: []
    eventGroupingSettings: {
      aggregationKind: 'AlertPerResult'
    }
    incidentConfiguration: {
      createIncident: true
      groupingConfiguration: {
        enabled: false
        reopenClosedIncident: false
        lookbackDuration: 'PT5M'
        matchingMethod: 'AllEntities'
      }
    }
    alertDetailsOverride: {
      alertDisplayNameFormat: '{{IncidentTitle}}'
      alertDescriptionFormat: '{{Description}}'
      alertSeverityColumnName: 'Severity'
      alertDynamicProperties: [
        {
          alertProperty: 'AlertLink'
          value: 'IncidentWebUrl'
        }
      ]
    }
    customDetails: {
      SourceKey: 'SourceKey'
      DefenderTenantId: 'DefenderTenantId'
      IncidentId: 'IncidentId'
    }
    entityMappings: [
      {
        entityType: 'Account'
        fieldMappings: [
          {
            identifier: 'FullName'
            columnName: 'Account1'
          }
        ]
      }
      {
        entityType: 'Account'
        fieldMappings: [
          {
            identifier: 'FullName'
            columnName: 'Account2'
          }
        ]
      }
      {
        entityType: 'Account'
        fieldMappings: [
          {
            identifier: 'FullName'
            columnName: 'Account3'
          }
        ]
      }
      {
        entityType: 'Host'
        fieldMappings: [
          {
            identifier: 'FullName'
            columnName: 'Host1'
          }
        ]
      }
      {
        entityType: 'Host'
        fieldMappings: [
          {
            identifier: 'FullName'
            columnName: 'Host2'
          }
        ]
      }
      {
        entityType: 'Host'
        fieldMappings: [
          {
            identifier: 'FullName'
            columnName: 'Host3'
          }
        ]
      }
      {
        entityType: 'IP'
        fieldMappings: [
          {
            identifier: 'Address'
            columnName: 'IP1'
          }
        ]
      }
      {
        entityType: 'IP'
        fieldMappings: [
          {
            identifier: 'Address'
            columnName: 'IP2'
          }
        ]
      }
      {
        entityType: 'IP'
        fieldMappings: [
          {
            identifier: 'Address'
            columnName: 'IP3'
          }
        ]
      }
    ]
  }
}

output ruleId string = mirrorRule.name
output ruleResourceId string = mirrorRule.id
