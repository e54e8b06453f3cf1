#!/bin/sh
# Gives the sentinel_webhook function the key the Sentinel playbook sends (x-functions-key), taking the value from
# the Key Vault secret that Bicep wrote (sentinel-webhook-function-key). Run by azd as the postdeploy hook
# (azure.yaml); run it by hand after `func azure functionapp publish` or after rotating the key.
#
# Needs the Azure CLI, logged in as a principal with
#   - Key Vault Secrets Officer or Secrets User on the vault (Bicep grants Secrets Officer to principalId), and
#   - Website Contributor or Contributor on the Function app.
# Reads (azd exports them from the deployment outputs): AZURE_RESOURCE_GROUP, AZURE_FUNCTION_APP_NAME,
# AZURE_KEY_VAULT_NAME, SENTINEL_WEBHOOK_KEY_SECRET_NAME and, optionally, SENTINEL_PLAYBOOK_ID.
set -eu

: "${AZURE_RESOURCE_GROUP:?set AZURE_RESOURCE_GROUP (deployment output)}"
: "${AZURE_FUNCTION_APP_NAME:?set AZURE_FUNCTION_APP_NAME (deployment output)}"
: "${AZURE_KEY_VAULT_NAME:?set AZURE_KEY_VAULT_NAME (deployment output)}"
SECRET_NAME="${SENTINEL_WEBHOOK_KEY_SECRET_NAME:-sentinel-webhook-function-key}"
KEY_NAME="${SENTINEL_WEBHOOK_KEY_NAME:-sentinel-playbook}"
FUNCTION_NAME="sentinel_webhook"

if [ "${SENTINEL_PLAYBOOK_ID-unset}" = "" ]; then
  echo "No playbook deployed (deploySentinelAutomation=false): no webhook key to set."
  exit 0
fi

# Flex Consumption indexes the functions shortly after a deployment: wait for sentinel_webhook (up to 5 minutes).
attempt=0
until az functionapp function show --resource-group "$AZURE_RESOURCE_GROUP" --name "$AZURE_FUNCTION_APP_NAME" \
    --function-name "$FUNCTION_NAME" --output none 2>/dev/null; do
  attempt=$((attempt + 1))
  if [ "$attempt" -ge 30 ]; then
    echo "The function $FUNCTION_NAME is not visible on $AZURE_FUNCTION_APP_NAME after 5 minutes; deploy the code first." >&2
    exit 1
  fi
  sleep 10
done

value="$(az keyvault secret show --vault-name "$AZURE_KEY_VAULT_NAME" --name "$SECRET_NAME" --query value --output tsv)"
if [ -z "$value" ]; then
  echo "The Key Vault secret $SECRET_NAME is empty." >&2
  exit 1
fi
az functionapp function keys set --resource-group "$AZURE_RESOURCE_GROUP" --name "$AZURE_FUNCTION_APP_NAME" \
  --function-name "$FUNCTION_NAME" --key-name "$KEY_NAME" --key-value "$value" --output none
unset value
echo "Function key $KEY_NAME of $FUNCTION_NAME now matches the Key Vault secret $SECRET_NAME."
