// In the Sentinel workspace's resource group: the playbook identity's role on the workspace and the automation rule
// that runs the playbook when an analyst updates a mirrored incident.

@description('Name of the Sentinel workspace.')
param workspaceName string

@description('Resource ID of the playbook (Logic App) to run.')
param playbookId string

@description('Principal ID of the playbook system-assigned identity (the azuresentinel connection authenticates with it).')
param playbookPrincipalId string

@minValue(1)
@maxValue(1000)
@description('Order of the automation rule.')
param automationRuleOrder int = 100

@description('Resource name (GUID) of the mirror analytics rule with SYNC_MIRROR_TARGET=defender-portal: the automation rule then matches incidents of that rule. Empty (sentinel-api): it matches the app label.')
param mirrorRuleId string = ''

// The label the app puts on every incident it mirrors (sync/mapping.py SOURCE_LABEL).
var sourceLabel = 'defender-sync'

resource workspace 'Microsoft.OperationalInsights/workspaces@2026-03-01' existing = {
  name: workspaceName
}

// Which incidents are the app's mirrors: those carrying its label (sentinel-api: the app creates them), or, with
// defender-portal, those of the mirror analytics rule OR carrying the label (the rule's incidents; and the mirrors an
// earlier sentinel-api deployment made, which stay linked after a migration and keep their immediate push back).
var labelCondition = {
  conditionType: 'Property'
  conditionProperties: {
    propertyName: 'IncidentLabel'
    operator: 'Contains'
    propertyValues: [
      sourceLabel
    ]
  }
}
var mirrorRuleCondition = {
  conditionType: 'Property'
  conditionProperties: {
    propertyName: 'IncidentRelatedAnalyticRuleIds'
    operator: 'Contains'
    propertyValues: [
      '${workspace.id}/providers/Microsoft.SecurityInsights/alertRules/${mirrorRuleId}'
    ]
  }
}

var labelOrMirrorRuleCondition = {
  conditionType: 'Boolean'
  conditionProperties: {
    operator: 'Or'
    innerConditions: [
      labelCondition
      mirrorRuleCondition
    ]
  }
}

// Microsoft Sentinel Reader (8d289c81-5878-46d4-8554-54e1e3d8b5cb) on the workspace: the least role for the
// Microsoft Sentinel incident trigger. The playbook only forwards the trigger body; it never updates an incident
// (the app does that with its own identity), so Responder is not needed.
resource playbookSentinelReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, playbookPrincipalId, '8d289c81-5878-46d4-8554-54e1e3d8b5cb')
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '8d289c81-5878-46d4-8554-54e1e3d8b5cb')
    principalId: playbookPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// When an incident is updated, if it is a mirror (the app's source label, or the mirror rule's incident: provider-name
// conditions match neither) and the update was not made by an application (the app's own writes come back as
// "Application"; skipping them prevents echo), run the playbook.
resource forwardUpdates 'Microsoft.SecurityInsights/automationRules@2025-09-01' = {
  name: guid(workspace.id, 'defender-sync-forward-incident-updates')
  scope: workspace
  properties: {
    displayName: 'Defender sync: forward analyst updates of mirrored incidents'
    order: automationRuleOrder
    triggeringLogic: {
      isEnabled: true
      triggersOn: 'Incidents'
      triggersWhen: 'Updated'
      conditions: [
        empty(mirrorRuleId) ? labelCondition : labelOrMirrorRuleCondition
        {
          conditionType: 'Property'
          conditionProperties: {
            propertyName: 'IncidentUpdatedBySource'
            operator: 'NotEquals'
            propertyValues: [
              'Application'
            ]
          }
        }
      ]
    }
    actions: [
      {
        order: 1
        actionType: 'RunPlaybook'
        actionConfiguration: {
          logicAppResourceId: playbookId
          tenantId: tenant().tenantId
        }
      }
    ]
  }
  dependsOn: [
    playbookSentinelReader
  ]
}

output automationRuleId string = forwardUpdates.id
