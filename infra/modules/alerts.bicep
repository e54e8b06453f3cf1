// Two log alert rules on the Application Insights resource. Alert rules cannot call the keyed sync/status
// endpoint, so they watch the telemetry the app emits: the sync.lag_seconds gauge and the sync.dead_letters
// counter (customMetrics, dimension tenantId), with the structured traces (customDimensions.tenantId, action,
// outcome, lagSeconds) as a fallback. Queries: infra/kql/alert-*.kql.

@description('Region of the alert rules (the Application Insights region).')
param location string

@description('Tags applied to the alert rules and the action group.')
param tags object = {}

@description('Unique suffix for names.')
param resourceToken string

@description('Resource ID of the Application Insights component the rules query.')
param appInsightsId string

@description('E-mail address notified through a new action group. Empty: no action group is created.')
param alertEmailAddress string = ''

@description('Resource IDs of existing action groups to notify as well.')
param alertActionGroupIds array = []

@minValue(300)
@maxValue(86400)
@description('Fire when a tenant is more than this many seconds behind Defender.')
param lagAlertThresholdSeconds int = 1800

@minValue(0)
@maxValue(100000)
@description('Fire when more than this many dead letters are added in the 15-minute window.')
param deadLetterAlertThreshold int = 0

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmailAddress)) {
  name: 'ag-defender-sync-${resourceToken}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'defsync'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmailAddress
        useCommonAlertSchema: true
      }
    ]
  }
}

var actionGroups = empty(alertEmailAddress) ? alertActionGroupIds : concat(alertActionGroupIds, [
  actionGroup.id
])

// Lag: latest lag per tenant plus the time since it was reported, so a tenant whose cycles stopped reporting
// keeps growing towards the threshold instead of going quiet. The one-day window bounds that look-back.
resource lagAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: 'defender-sync-lag-${resourceToken}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Defender sync: tenant lagging behind Defender'
    description: 'A Defender tenant is more than the threshold behind Defender XDR (sync.lag_seconds), or its lag has not been reported for that long. Check sync/status and the traces of that tenant (docs/OPERATIONS.md).'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'P1D'
    scopes: [
      appInsightsId
    ]
    targetResourceTypes: [
      'Microsoft.Insights/components'
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../kql/alert-sync-lag.kql')
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'LagSeconds'
          dimensions: [
            {
              name: 'DefenderTenantId'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: lagAlertThresholdSeconds
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroups
    }
  }
}

// Dead letters: new dead letters per tenant in the last 15 minutes (counter increments, or dead-letter traces).
resource deadLetterAlert 'Microsoft.Insights/scheduledQueryRules@2026-03-01' = {
  name: 'defender-sync-dead-letters-${resourceToken}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'Defender sync: dead letters growing'
    description: 'Incidents or webhook deliveries were dead-lettered (sync.dead_letters). Inspect them with sync/status and the traces with outcome dead-lettered (docs/OPERATIONS.md).'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    scopes: [
      appInsightsId
    ]
    targetResourceTypes: [
      'Microsoft.Insights/components'
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../kql/alert-dead-letters.kql')
          timeAggregation: 'Total'
          metricMeasureColumn: 'DeadLetters'
          dimensions: [
            {
              name: 'DefenderTenantId'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: deadLetterAlertThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroups
    }
  }
}

output lagAlertId string = lagAlert.id
output deadLetterAlertId string = deadLetterAlert.id
