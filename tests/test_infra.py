"""Static checks of infra/ without a Bicep compiler (none can be installed here).

Every ``.bicep`` file is parsed with pycep (the parser checkov uses). The checks then read the parsed resources:
the DCR and the custom tables take their columns from ``infra/tables/*.json`` (and those match the app's row
builders), every app setting the code reads is set on the Function app, every role the app needs is assigned at
the right scope, the security switches are on, the playbook keeps its run history clean, and the module wiring
of ``main.bicep`` is consistent (what a compiler would otherwise catch). ``checkov -d infra`` runs in the slow test
at the end (about 15 s); CI runs it too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
MODULES = INFRA / "modules"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

CHANGE_LOG_STREAMS = {
    "DefenderIncidents_CL": "Custom-DefenderIncidents",
    "DefenderAlerts_CL": "Custom-DefenderAlerts",
    "DefenderEvidence_CL": "Custom-DefenderEvidence",
}
# With mirrorTarget defender-portal only.
MIRROR_STREAMS = {"DefenderMirrorRequests_CL": "Custom-DefenderMirrorRequests"}
TABLE_STREAMS = {**CHANGE_LOG_STREAMS, **MIRROR_STREAMS}
DCR_COLUMN_TYPES = {"string", "int", "long", "real", "boolean", "datetime", "dynamic"}
RESERVED_COLUMNS = {"tenantid", "title", "id", "type", "_resourceid", "_subscriptionid", "uniqueid"}
# Columns PRODUCT.md requires of every row, and of each table's rows.
REQUIRED_COLUMNS = {
    "DefenderIncidents_CL": {"TimeGenerated", "DefenderTenantId", "IncidentId", "RecordId", "LastUpdateDateTime",
                             "Status", "Severity", "Classification", "Determination", "AssignedTo"},
    "DefenderAlerts_CL": {"TimeGenerated", "DefenderTenantId", "IncidentId", "RecordId", "AlertId",
                          "LastUpdateDateTime"},
    "DefenderEvidence_CL": {"TimeGenerated", "DefenderTenantId", "IncidentId", "RecordId", "AlertId",
                            "AlertLastUpdateDateTime"},
    "DefenderMirrorRequests_CL": {"TimeGenerated", "RequestId", "RecordId", "DefenderTenantId", "TenantName",
                                  "IncidentId", "SourceKey", "IncidentTitle", "Severity", "Description",
                                  "IncidentWebUrl", "Accounts", "Hosts", "IPs"},
}

# PRODUCT.md's app settings, used only when sync.settings.SETTING_NAMES cannot be imported.
PRODUCT_SETTING_NAMES = (
    "DEFENDER_TENANT_IDS", "SYNC_TENANTS", "DEFENDER_CLIENT_ID", "DEFENDER_CLIENT_SECRET",
    "DEFENDER_CLIENT_CERTIFICATE", "DEFENDER_CLIENT_CERTIFICATE_PATH", "AZURE_AUTHORITY_HOST", "GRAPH_ENDPOINT",
    "LOGS_INGESTION_ENDPOINT",
    "LOGS_DCR_IMMUTABLE_ID", "LOGS_INGESTION_SCOPE", "SENTINEL_WORKSPACE_ID", "ARM_ENDPOINT", "AzureWebJobsStorage",
    "SYNC_STATE_STORAGE", "SYNC_INITIAL_LOOKBACK_DAYS", "SYNC_OVERLAP_SECONDS", "SYNC_TIME_BUDGET_SECONDS",
    "GRAPH_MAX_REQUESTS_PER_MINUTE", "SENTINEL_MAX_WRITES_PER_MINUTE", "SYNC_CONFLICT_POLICY", "SYNC_OWNER_MAP",
    "WEBHOOK_MAX_BODY_BYTES", "SYNC_FANOUT", "SYNC_QUEUE", "DEFENDER_PULL_SCHEDULE", "SENTINEL_RECONCILE_SCHEDULE",
    "AZURE_CLIENT_ID",
)
# Settings the code reads that the Bicep deliberately leaves unset, and why.
UNSET_ON_PURPOSE = {
    "DEFENDER_CLIENT_CERTIFICATE_PATH": "a file path for local runs; in Azure the certificate arrives as the Key Vault "
                                        "reference DEFENDER_CLIENT_CERTIFICATE",
    "SYNC_STATE_STORAGE": "optional separate state account; the state lives in AzureWebJobsStorage by default",
    # Defaults apply (sentinel-api); the defender-portal infra sets them with its mirror rule.
    "SYNC_MIRROR_TARGET": "defaults to sentinel-api",
    "SYNC_MIRROR_RULE_ID": "only with defender-portal",
    "SYNC_MIRROR_REQUESTS_PER_MINUTE": "defaults to 25",
}
IDENTITY_STORAGE_SETTINGS = ("AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId",
                             "AzureWebJobsStorage__blobServiceUri", "AzureWebJobsStorage__queueServiceUri",
                             "AzureWebJobsStorage__tableServiceUri")

# Built-in role definition ID -> name. Every role assignment in infra/ must use one of these (least privilege).
ROLE_NAMES = {
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "3e150937-b8fe-4cfb-8069-0eaf05ecd056": "Microsoft Sentinel Responder",
    "8d289c81-5878-46d4-8554-54e1e3d8b5cb": "Microsoft Sentinel Reader",
    "f4c81013-99ee-4d62-a7ee-b3f1f648599a": "Microsoft Sentinel Automation Contributor",
    "4633458b-17de-408a-b874-0445c86b69e6": "Key Vault Secrets User",
    "b86a8fe4-44ce-4948-aee5-eccb2c155cd7": "Key Vault Secrets Officer",
    "a4417e6f-fecd-4de8-b567-7b0420556985": "Key Vault Certificates Officer",
}
# (role ID, file, scope resource type or "resourceGroup", principal expression): what the app and the playbook need.
REQUIRED_ROLES = (
    ("3913510d-42f4-4e42-8a64-420c390055eb", "workspace.bicep", "Microsoft.Insights/dataCollectionRules",
     "appPrincipalId"),
    ("3913510d-42f4-4e42-8a64-420c390055eb", "app.bicep", "Microsoft.Insights/components",
     "identity.properties.principalId"),
    ("b7e6dc6d-f1e8-4753-8033-0f276bb0955b", "app.bicep", "Microsoft.Storage/storageAccounts",
     "identity.properties.principalId"),
    ("974c5e8b-45b9-4653-ba55-5f855dd0fb88", "app.bicep", "Microsoft.Storage/storageAccounts",
     "identity.properties.principalId"),
    ("0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3", "app.bicep", "Microsoft.Storage/storageAccounts",
     "identity.properties.principalId"),
    ("3e150937-b8fe-4cfb-8069-0eaf05ecd056", "workspace.bicep", "Microsoft.OperationalInsights/workspaces",
     "appPrincipalId"),
    ("4633458b-17de-408a-b874-0445c86b69e6", "app.bicep", "Microsoft.KeyVault/vaults",
     "identity.properties.principalId"),
    ("4633458b-17de-408a-b874-0445c86b69e6", "playbook.bicep", "Microsoft.KeyVault/vaults/secrets",
     "playbook.identity.principalId"),
    ("8d289c81-5878-46d4-8554-54e1e3d8b5cb", "automation.bicep", "Microsoft.OperationalInsights/workspaces",
     "playbookPrincipalId"),
    ("f4c81013-99ee-4d62-a7ee-b3f1f648599a", "playbook.bicep", "resourceGroup",
     "sentinelAutomationPrincipalObjectId"),
)
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ---------------------------------------------------------------------------------------------------------------
# Parsing helpers


@cache
def _parser() -> BicepParser:
    return BicepParser()


@cache
def parse(path: Path) -> dict[str, Any]:
    return _parser().parse(file_path=path)


def module(name: str) -> dict[str, Any]:
    return parse(MODULES / name)


def body(attrs: dict[str, Any]) -> dict[str, Any]:
    """A resource's or module's object, also when it is declared with ``= if (condition) { ... }``."""
    config = attrs["config"]
    if isinstance(config, dict) and "condition" in config and isinstance(config.get("config"), dict):
        return config["config"]
    return config


def unquote(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == "'" else key


def unquoted(obj: dict[str, Any]) -> dict[str, Any]:
    return {unquote(k): v for k, v in obj.items()}


def render(node: Any) -> str:
    """Approximate Bicep text of a pycep expression node, for substring assertions."""
    if node is None:
        return "null"
    if isinstance(node, bool):
        return str(node).lower()
    if isinstance(node, int | float | str):
        return str(node)
    if isinstance(node, list):
        return "[" + ", ".join(render(item) for item in node) + "]"
    if isinstance(node, dict):
        if set(node) == {"function"}:
            function = node["function"]
            args = ", ".join(render(v) for v in (function.get("parameters") or {}).values() if v is not None)
            text = f"{function['type']}({args})"
            prop = function.get("property_name")
            if prop:
                # pycep gives some property names as the text of a token list: "[Token('STRING', 'tenantId')]".
                tokens = re.findall(r"Token\('STRING', '([^']*)'\)", str(prop))
                text += "." + (".".join(tokens) if tokens else render(prop))
            return text
        if set(node) == {"operator"}:
            operator = node["operator"]
            operands = operator.get("operands") or {}
            if operator["type"] == "property_accessor":
                return f"{render(operands['operand_1'])}.{render(operands['operand_2'])}"
            if operator["type"] == "function_accessor":
                target, argument = render(operands["operand_1"]), render(operands.get("operand_2"))
                return f"{target}.{operands.get('func_name')}({argument})"
            return f"{operator['type']}(" + ", ".join(render(v) for v in operands.values()) + ")"
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in node.items()) + "}"
    return repr(node)


def resources_of_type(document: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {name: attrs for name, attrs in document.get("resources", {}).items()
            if attrs["type"].lower() == rtype.lower()}


def only_resource(document: dict[str, Any], rtype: str) -> dict[str, Any]:
    found = resources_of_type(document, rtype)
    assert len(found) == 1, f"expected one {rtype}, found {sorted(found)}"
    return body(next(iter(found.values())))


def table_columns(table: str) -> list[dict[str, str]]:
    columns = json.loads((INFRA / "tables" / f"{table}.json").read_text(encoding="utf-8"))["columns"]
    assert isinstance(columns, list)
    return columns


def assert_loads_table_json(node: Any, bicep_file: Path, table: str, where: str) -> None:
    """``node`` must be ``loadJsonContent('<path to infra/tables/<table>.json>').columns``."""
    function = node.get("function") if isinstance(node, dict) else None
    assert function and function["type"] == "load_json_content", (
        f"{where}: columns must come from loadJsonContent('.../tables/{table}.json').columns, not be written inline")
    target = (bicep_file.parent / function["parameters"]["file_path"]).resolve()
    assert target == (INFRA / "tables" / f"{table}.json").resolve(), f"{where}: loads {target}, not {table}.json"
    assert function.get("property_name") == "columns", f"{where}: must select .columns of {table}.json"


def app_settings() -> dict[str, Any]:
    """Name -> value node of every app setting the Function app declares (conditional ones included)."""
    document = module("app.bicep")
    variables = document.get("variables", {})
    site = only_resource(document, "Microsoft.Web/sites")
    found: dict[str, Any] = {}
    seen: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, str) and node in variables and node not in seen:
            seen.add(node)
            walk(variables[node]["value"])
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            if set(node) == {"name", "value"} and isinstance(node["name"], str):
                found[node["name"]] = node["value"]
            else:
                for value in node.values():
                    walk(value)

    walk(site["properties"]["siteConfig"]["appSettings"])
    return found


def resolve_var(document: dict[str, Any], node: Any) -> Any:
    variables = document.get("variables", {})
    while isinstance(node, str) and node in variables:
        node = variables[node]["value"]
    return node


def param_default(document: dict[str, Any], name: str) -> Any:
    return document["parameters"][name]["default"]


def when(node: Any, condition: str) -> tuple[Any, Any]:
    """(always, only-when-``condition``) parts of ``union(always, condition ? extra : {})`` or ``concat(...)``."""
    function = node["function"]
    assert function["type"] in ("union", "concat"), render(node)
    always, extra = function["parameters"]["arg_1"], function["parameters"]["arg_2"]["operator"]
    assert extra["type"] == "conditional" and extra["operands"]["condition"] == condition, render(node)
    assert extra["operands"]["false_value"] in ({}, []), render(node)
    return always, extra["operands"]["true_value"]


def decorator(attrs: dict[str, Any], kind: str) -> Any:
    return next((d.get("argument") for d in attrs.get("decorators", []) if d.get("type") == kind), None)


# ---------------------------------------------------------------------------------------------------------------
# Every file parses and documents its parameters; module wiring is consistent


def test_infra_has_the_expected_bicep_files() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in BICEP_FILES}
    assert {"main.bicep", "modules/app.bicep", "modules/workspace.bicep", "modules/identity.bicep",
            "modules/playbook.bicep", "modules/automation.bicep", "modules/alerts.bicep",
            "modules/workbook.bicep"} <= names


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_bicep_file_parses_and_documents_every_parameter(path: Path) -> None:
    document = parse(path)
    assert document.get("resources") or document.get("modules"), f"{path.name} declares nothing"
    undocumented = [name for name, attrs in document.get("parameters", {}).items()
                    if not (decorator(attrs, "description") or "").strip()]
    assert not undocumented, f"{path.name}: parameters without @description: {undocumented}"


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_module_calls_match_the_module_parameters(path: Path) -> None:
    for name, attrs in parse(path).get("modules", {}).items():
        target = (path.parent / attrs["detail"]["path"]).resolve()
        assert target.is_file(), f"{path.name}: module {name} points to missing {target}"
        declared = parse(target).get("parameters", {})
        given = body(attrs).get("params", {})
        unknown = sorted(set(given) - set(declared))
        assert not unknown, f"{path.name}: module {name} passes parameters {target.name} does not declare: {unknown}"
        missing = sorted(p for p, a in declared.items() if a.get("default") is None and p not in given)
        assert not missing, f"{path.name}: module {name} leaves required parameters of {target.name} unset: {missing}"


def test_secure_values_stay_secure_across_modules() -> None:
    main = parse(MAIN)
    app = module("app.bicep")
    for document, name in ((main, "sentinelWebhookFunctionKey"), (app, "sentinelWebhookFunctionKey")):
        assert any(d.get("type") == "secure" for d in document["parameters"][name]["decorators"]), name
    azd = decorator(main["parameters"]["sentinelWebhookFunctionKey"], "metadata")
    assert azd["azd"]["type"] == "generate", "azd must generate the webhook key (no prompt, kept per environment)"


def test_azd_parameter_file_names_only_declared_parameters() -> None:
    values = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    declared = parse(MAIN)["parameters"]
    assert set(values) <= set(declared), sorted(set(values) - set(declared))
    assert "sentinelWebhookFunctionKey" not in values, "azd generates the webhook key; never put it in a file"


def test_main_wires_identities_into_the_role_modules() -> None:
    modules = {name: body(attrs) for name, attrs in parse(MAIN)["modules"].items()}
    assert render(modules["workspace"]["params"]["appPrincipalId"]) == "identity.outputs.principalId"
    assert render(modules["app"]["params"]["identityName"]) == "identity.outputs.name"
    assert render(modules["automation"]["params"]["playbookPrincipalId"]) == "playbook.outputs.playbookPrincipalId"
    assert render(modules["automation"]["params"]["playbookId"]) == "playbook.outputs.playbookId"
    assert modules["playbook"]["params"]["sentinelAutomationPrincipalObjectId"] == "sentinelAutomationPrincipalObjectId"
    # Workspace-side modules go to the workspace's own resource group (it may differ from the app's).
    for name in ("workspace", "workbook", "automation"):
        scope = render(modules[name]["scope"])
        assert "workspaceSubscriptionId" in scope and "workspaceResourceGroupName" in scope, name
    # The DCR sits in the workspace region, which has its own parameter.
    assert modules["workspace"]["params"]["location"] == "sentinelWorkspaceLocation"


# ---------------------------------------------------------------------------------------------------------------
# Tables, DCR and row builders: one source of truth


@pytest.mark.parametrize("table", sorted(TABLE_STREAMS))
def test_table_json_is_a_valid_dcr_schema(table: str) -> None:
    columns = table_columns(table)
    names = [c["name"] for c in columns]
    assert len(names) == len(set(names)), f"{table}: duplicate columns"
    for column in columns:
        assert set(column) == {"name", "type"}, column
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,44}", column["name"]), column
        assert column["name"].lower() not in RESERVED_COLUMNS, f"{table}: {column['name']} is reserved"
        assert column["type"] in DCR_COLUMN_TYPES, column
    types = {c["name"]: c["type"] for c in columns}
    missing = REQUIRED_COLUMNS[table] - set(types)
    assert not missing, f"{table}.json lacks columns PRODUCT.md requires: {sorted(missing)}"
    assert types["TimeGenerated"] == "datetime"


def test_dcr_streams_come_from_the_table_json_files() -> None:
    path = MODULES / "workspace.bicep"
    dcr = only_resource(parse(path), "Microsoft.Insights/dataCollectionRules")
    assert dcr["kind"] == "Direct", "a Direct DCR has its own logs ingestion endpoint (no DCE)"
    assert dcr["location"] == "location"
    properties = dcr["properties"]
    always, mirror = when(properties["streamDeclarations"], "deployMirrorRequests")
    assert set(unquoted(always)) == set(CHANGE_LOG_STREAMS.values())
    assert set(unquoted(mirror)) == set(MIRROR_STREAMS.values())
    declarations = {**unquoted(always), **unquoted(mirror)}
    for table, stream in TABLE_STREAMS.items():
        assert_loads_table_json(declarations[stream]["columns"], path, table, f"streamDeclarations[{stream}]")
    destinations = [d["name"] for d in properties["destinations"]["logAnalytics"]]
    assert len(destinations) == 1
    destination = resolve_var(parse(path), destinations[0])
    assert render(properties["destinations"]["logAnalytics"][0]["workspaceResourceId"]) == "workspace.id"
    always_flows, mirror_flows = when(properties["dataFlows"], "deployMirrorRequests")
    assert {tuple(flow["streams"]) for flow in mirror_flows} == {(s,) for s in MIRROR_STREAMS.values()}
    flows = {tuple(flow["streams"]): flow for flow in [*always_flows, *mirror_flows]}
    assert set(flows) == {(stream,) for stream in TABLE_STREAMS.values()}
    for table, stream in TABLE_STREAMS.items():
        flow = flows[(stream,)]
        assert flow["outputStream"] == f"Custom-{table}"
        assert flow["transformKql"] == "source"
        assert [resolve_var(parse(path), d) for d in flow["destinations"]] == [destination]


def test_custom_tables_take_their_schema_from_the_table_json_files() -> None:
    path = MODULES / "workspace.bicep"
    found = resources_of_type(parse(path), "Microsoft.OperationalInsights/workspaces/tables")
    tables = {body(attrs)["name"]: body(attrs) for attrs in found.values()}
    assert set(tables) == set(TABLE_STREAMS)
    conditions = {body(attrs)["name"]: attrs["config"].get("condition") for attrs in found.values()}
    assert conditions == {table: ("deployMirrorRequests" if table in MIRROR_STREAMS else None)
                          for table in TABLE_STREAMS}
    dcr = next(iter(resources_of_type(parse(path), "Microsoft.Insights/dataCollectionRules").values()))
    assert "mirrorRequestsTable" in body(dcr)["dependsOn"], "the DCR must wait for the table its flow writes"
    for table, config in tables.items():
        assert config["properties"]["plan"] == "Analytics"
        assert config["properties"]["schema"]["name"] == table
        assert_loads_table_json(config["properties"]["schema"]["columns"], path, table, f"table {table}")


def test_row_builders_write_only_declared_columns() -> None:
    try:
        from sync import rows
    except ImportError as exc:  # pragma: no cover - only while sync/rows.py is being written
        pytest.skip(f"sync.rows is not importable yet ({exc}); the JSON files are still checked above")
    for name in ("load_columns", "incident_row", "alert_row", "evidence_rows"):
        if not hasattr(rows, name):  # pragma: no cover
            pytest.skip(f"sync.rows has no {name} yet")
    if hasattr(rows, "STREAMS"):
        assert dict(rows.STREAMS) == TABLE_STREAMS, "the code's stream names differ from the DCR's"
    for table in TABLE_STREAMS:
        assert rows.load_columns(table) == {c["name"]: c["type"] for c in table_columns(table)}
    request = rows.mirror_request_row({"id": "7", "severity": "high"}, tenant_id="t", tenant_name="T",
                                      request_id="r", now=datetime(2026, 1, 2, tzinfo=UTC))
    assert set(request) <= {c["name"] for c in table_columns("DefenderMirrorRequests_CL")}

    tenant = "11111111-2222-3333-4444-555555555555"
    read_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    alert = {
        "id": "da637f", "incidentId": "2972395", "providerAlertId": "p-1", "title": "Suspicious PowerShell",
        "description": "desc", "recommendedActions": "isolate", "status": "new", "severity": "high",
        "classification": "truePositive", "determination": "malware", "category": "Execution",
        "serviceSource": "microsoftDefenderForEndpoint", "detectionSource": "microsoftDefenderForEndpoint",
        "detectorId": "d-1", "productName": "Microsoft Defender for Endpoint", "assignedTo": "analyst@contoso.com",
        "alertWebUrl": "https://security.microsoft.com/alerts/da637f",
        "incidentWebUrl": "https://security.microsoft.com/incidents/2972395", "actorDisplayName": "actor",
        "threatDisplayName": "threat", "threatFamilyName": "family", "investigationState": "running",
        "alertPolicyId": "policy", "mitreTechniques": ["T1059.001"], "systemTags": ["tag"],
        "createdDateTime": "2026-01-01T10:00:00.1234567Z", "lastUpdateDateTime": "2026-01-01T11:00:00.1234567Z",
        "resolvedDateTime": None, "firstActivityDateTime": "2026-01-01T09:00:00Z",
        "lastActivityDateTime": "2026-01-01T09:30:00Z",
        "comments": [{"comment": "seen", "createdByDisplayName": "analyst", "createdDateTime": "2026-01-01T10:05:00Z"}],
        "additionalData": {"k": "v"},
        "evidence": [
            {"@odata.type": "#microsoft.graph.security.deviceEvidence", "createdDateTime": "2026-01-01T10:00:00Z",
             "verdict": "malicious", "remediationStatus": "remediated", "roles": ["compromised"], "tags": [],
             "mdeDeviceId": "dev-1", "deviceDnsName": "host.contoso.com"},
            {"@odata.type": "#microsoft.graph.security.userEvidence", "roles": [], "tags": [],
             "userAccount": {"accountName": "alice", "domainName": "CONTOSO", "userPrincipalName": "alice@contoso.com",
                             "userSid": "S-1-5-21-1", "azureAdUserId": "aad-1"}},
            {"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": "203.0.113.7"},
            {"@odata.type": "#microsoft.graph.security.processEvidence", "processId": 4242,
             "processCommandLine": "powershell -enc AAA",
             "imageFile": {"fileName": "powershell.exe", "filePath": "C:\\Windows", "sha1": "a" * 40,
                           "sha256": "b" * 64, "md5": "c" * 32}},
            {"@odata.type": "#microsoft.graph.security.urlEvidence", "url": "https://evil.example/x"},
            {"@odata.type": "#microsoft.graph.security.mailboxEvidence", "primaryAddress": "alice@contoso.com"},
            {"@odata.type": "#microsoft.graph.security.analyzedMessageEvidence", "networkMessageId": "nm-1"},
        ],
    }
    incident = {
        "id": "2972395", "tenantId": tenant, "displayName": "Multi-stage incident", "description": "d",
        "summary": "s", "status": "active", "severity": "high", "classification": "truePositive",
        "determination": "malware", "assignedTo": "analyst@contoso.com",
        "incidentWebUrl": "https://security.microsoft.com/incidents/2972395", "redirectIncidentId": None,
        "resolvingComment": None, "lastModifiedBy": "API-App:1", "priorityScore": 80,
        "createdDateTime": "2026-01-01T10:00:00.1234567Z", "lastUpdateDateTime": "2026-01-01T11:00:00.1234567Z",
        "customTags": ["vip"], "systemTags": ["auto"],
        "comments": [{"comment": "c", "createdByDisplayName": "x", "createdDateTime": "2026-01-01T10:01:00Z"}],
        "alerts": [alert],
    }
    common = {"tenant_id": tenant, "tenant_name": "Contoso", "read_at": read_at}
    try:
        produced = {
            "DefenderIncidents_CL": [rows.incident_row(incident, **common)],
            "DefenderAlerts_CL": [rows.alert_row(alert, incident_id="2972395", **common)],
            "DefenderEvidence_CL": rows.evidence_rows(alert, incident_id="2972395", **common),
        }
    except KeyError as exc:  # the builders refuse a column the schema (hence the DCR) does not declare
        pytest.fail(f"a row builder writes a column missing from infra/tables/*.json and so from the DCR: {exc}")
    python_types = {"string": str, "int": int, "long": int, "real": (int, float), "boolean": bool, "datetime": str,
                    "dynamic": (list, dict, str, int, float, bool)}
    for table, table_rows in produced.items():
        assert table_rows, f"no {table} rows built"
        declared = {c["name"]: c["type"] for c in table_columns(table)}
        for row in table_rows:
            undeclared = set(row) - set(declared)
            assert not undeclared, f"{table}: the row builder writes columns the DCR does not declare: {undeclared}"
            missing = (REQUIRED_COLUMNS[table] - {"Status", "Severity", "Classification", "Determination",
                                                  "AssignedTo"}) - set(row)
            assert not missing, f"{table}: rows lack {sorted(missing)}"
            for name, value in row.items():
                assert isinstance(value, python_types[declared[name]]), f"{table}.{name}={value!r} vs {declared[name]}"
    assert len(produced["DefenderEvidence_CL"]) == len(alert["evidence"])


# ---------------------------------------------------------------------------------------------------------------
# App settings


def code_setting_names() -> tuple[str, ...]:
    try:
        from sync.settings import SETTING_NAMES
    except ImportError:  # pragma: no cover - before sync/settings.py existed
        return PRODUCT_SETTING_NAMES
    return tuple(SETTING_NAMES)


def test_every_setting_the_code_reads_is_set_by_the_bicep() -> None:
    declared = app_settings()
    missing = []
    for name in code_setting_names():
        if name in UNSET_ON_PURPOSE:
            continue
        if name == "AzureWebJobsStorage":
            missing += [n for n in IDENTITY_STORAGE_SETTINGS if n not in declared]
        elif name not in declared:
            missing.append(name)
    assert not missing, f"app settings the code reads but infra/modules/app.bicep does not set: {missing}"
    assert set(PRODUCT_SETTING_NAMES) - set(UNSET_ON_PURPOSE) - {"AzureWebJobsStorage"} <= set(declared)
    assert "AzureWebJobsStorage" not in declared, "host storage must be identity-based, not a connection string"


def test_app_setting_values_follow_the_contracts() -> None:
    document = module("app.bicep")
    settings = {name: resolve_var(document, value) for name, value in app_settings().items()}
    assert settings["SYNC_QUEUE"] == "defender-tenant-work"
    assert settings["DEFENDER_PULL_SCHEDULE"] == "0 */5 * * * *"
    assert settings["SENTINEL_RECONCILE_SCHEDULE"] == "0 */15 * * * *"
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert render(settings["AzureWebJobsStorage__clientId"]) == "identity.properties.clientId"
    assert render(settings["AZURE_CLIENT_ID"]) == "identity.properties.clientId"
    for service in ("blob", "queue", "table"):
        assert render(settings[f"AzureWebJobsStorage__{service}ServiceUri"]) == \
            f"storage.properties.primaryEndpoints.{service}"
    assert render(settings["APPLICATIONINSIGHTS_CONNECTION_STRING"]) == "appInsights.properties.ConnectionString"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == \
        "Authorization=AAD;ClientId=${identity.properties.clientId}"
    assert settings["LOGS_INGESTION_ENDPOINT"] == "logsIngestionEndpoint"
    assert settings["LOGS_DCR_IMMUTABLE_ID"] == "logsDcrImmutableId"
    assert settings["SENTINEL_WORKSPACE_ID"] == "sentinelWorkspaceResourceId"
    # Secret and certificate only as Key Vault references, resolved with the user-assigned identity.
    prefix = resolve_var(document, "kvReferencePrefix")
    assert prefix.startswith("@Microsoft.KeyVault(SecretUri=${keyVault.properties.vaultUri}secrets/")
    for name in ("DEFENDER_CLIENT_SECRET", "DEFENDER_CLIENT_CERTIFICATE"):
        assert settings[name].startswith("${kvReferencePrefix}"), name
    # ... and only when a parameter asks for them (absent = secretless federated credential).
    for var, credential in (("secretSettings", "secret"), ("certificateSettings", "certificate")):
        condition = document["variables"][var]["value"]["operator"]["operands"]["condition"]
        assert render(condition) == f"equals(defenderCredentialType, {credential})", render(condition)
    assert param_default(parse(MAIN), "defenderCredentialType") == "federated"
    site = only_resource(document, "Microsoft.Web/sites")
    assert render(site["properties"]["keyVaultReferenceIdentity"]) == "identity.id"


def test_time_budget_stays_below_the_function_timeout() -> None:
    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    hours, minutes, seconds = (int(part) for part in host["functionTimeout"].split(":"))
    timeout = hours * 3600 + minutes * 60 + seconds
    main = parse(MAIN)
    budget = main["parameters"]["syncTimeBudgetSeconds"]
    assert budget["default"] == 540
    assert decorator(budget, "max_value") < timeout, "the largest allowed budget must stay below functionTimeout"


def test_endpoints_default_per_cloud() -> None:
    main = parse(MAIN)
    text = MAIN.read_text(encoding="utf-8")
    for literal in ("https://graph.microsoft.us", "https://graph.microsoft.com", "https://monitor.azure.us/.default",
                    "https://monitor.azure.com/.default"):
        assert literal in text
    assert render(resolve_var(main, "envArm")) == "environment().resourceManager"
    assert render(resolve_var(main, "envLogin")) == "environment().authentication.loginEndpoint"
    assert "environment().name" in render(resolve_var(main, "cloudName"))


# ---------------------------------------------------------------------------------------------------------------
# Roles


def role_assignments() -> list[dict[str, Any]]:
    found = []
    for path in BICEP_FILES:
        document = parse(path)
        symbols = document.get("resources", {})
        for name, attrs in resources_of_type(document, "Microsoft.Authorization/roleAssignments").items():
            config = body(attrs)
            role_ids = GUID.findall(render(config["properties"]["roleDefinitionId"]))
            assert len(role_ids) == 1, f"{path.name}:{name}: use a built-in role definition ID literal"
            scope = config.get("scope")
            scope_type = symbols[scope]["type"] if isinstance(scope, str) and scope in symbols else (
                "resourceGroup" if scope is None else f"unresolved:{render(scope)}")
            found.append({"file": path.name, "name": name, "role": role_ids[0], "scope": scope_type,
                          "principal": render(config["properties"]["principalId"]),
                          "principalType": config["properties"].get("principalType"),
                          "assignmentName": render(config["name"])})
    return found


@pytest.mark.parametrize(("role", "file", "scope", "principal"), REQUIRED_ROLES,
                         ids=[f"{ROLE_NAMES[r[0]]} on {r[2].split('/')[-1]}" for r in REQUIRED_ROLES])
def test_required_role_is_assigned(role: str, file: str, scope: str, principal: str) -> None:
    matches = [a for a in role_assignments()
               if a["role"] == role and a["file"] == file and a["scope"] == scope and a["principal"] == principal]
    assert matches, f"{ROLE_NAMES[role]} ({role}) for {principal} on {scope} is not assigned in {file}"
    for assignment in matches:
        assert role in assignment["assignmentName"], "name the assignment guid(scope, principal, role)"
        assert assignment["principalType"] == "ServicePrincipal"


def test_no_role_beyond_the_known_least_privilege_set() -> None:
    for assignment in role_assignments():
        assert assignment["role"] in ROLE_NAMES, f"unexpected role {assignment}"
        assert not assignment["scope"].startswith("unresolved"), assignment
    operator_roles = {a["role"] for a in role_assignments() if a["principal"] == "operatorPrincipalId"}
    assert operator_roles <= {"b86a8fe4-44ce-4948-aee5-eccb2c155cd7", "a4417e6f-fecd-4de8-b567-7b0420556985"}


def test_role_names_are_commented_next_to_their_ids() -> None:
    for path in BICEP_FILES:
        text = path.read_text(encoding="utf-8")
        for role in set(GUID.findall(text)) & set(ROLE_NAMES):
            assert re.search(rf"//[^\n]*{re.escape(ROLE_NAMES[role])}[^\n]*\({role}\)", text), \
                f"{path.name}: comment the role name next to {role} ({ROLE_NAMES[role]})"


# ---------------------------------------------------------------------------------------------------------------
# Security switches and resources


def test_storage_is_identity_only() -> None:
    document = module("app.bicep")
    storage = only_resource(document, "Microsoft.Storage/storageAccounts")["properties"]
    assert storage["allowSharedKeyAccess"] is False
    assert storage["minimumTlsVersion"] == "TLS1_2"
    assert storage["allowBlobPublicAccess"] is False
    assert storage["supportsHttpsTrafficOnly"] is True
    queues = {resolve_var(document, body(a)["name"]) for a in
              resources_of_type(document, "Microsoft.Storage/storageAccounts/queueServices/queues").values()}
    assert queues == {"defender-tenant-work", "${queueName}-poison"}


def test_application_insights_accepts_entra_id_only() -> None:
    document = module("app.bicep")
    properties = only_resource(document, "Microsoft.Insights/components")["properties"]
    assert properties["DisableLocalAuth"] is True
    assert "appInsightsWorkspaceResourceId" in render(properties["WorkspaceResourceId"])


def test_key_vault_uses_rbac_with_purge_protection() -> None:
    vault = only_resource(module("app.bicep"), "Microsoft.KeyVault/vaults")["properties"]
    assert vault["enableRbacAuthorization"] is True
    assert vault["enablePurgeProtection"] is True
    assert vault["enableSoftDelete"] is True


def test_function_app_runs_on_flex_consumption_with_its_identity() -> None:
    document = module("app.bicep")
    plan = only_resource(document, "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"tier": "FlexConsumption", "name": "FC1"}
    site = only_resource(document, "Microsoft.Web/sites")
    assert site["identity"]["type"] == "UserAssigned"
    properties = site["properties"]
    assert properties["httpsOnly"] is True
    assert properties["siteConfig"]["ftpsState"] == "Disabled"
    flex = properties["functionAppConfig"]
    assert flex["runtime"] == {"name": "python", "version": "3.11"}
    assert flex["deployment"]["storage"]["type"] == "blobContainer"
    assert flex["deployment"]["storage"]["authentication"]["type"] == "UserAssignedIdentity"
    assert set(flex["scaleAndConcurrency"]) == {"instanceMemoryMB", "maximumInstanceCount"}
    policies = {body(a)["name"]: body(a)["properties"]["allow"] for a in
                resources_of_type(document, "Microsoft.Web/sites/basicPublishingCredentialsPolicies").values()}
    assert policies == {"ftp": False, "scm": False}
    assert "{'azd-service-name': api}" in render(site["tags"]), "azd finds the app by this tag (azure.yaml service)"


# ---------------------------------------------------------------------------------------------------------------
# Sentinel side: playbook and automation rule


def test_playbook_forwards_the_trigger_body_with_secure_run_history() -> None:
    document = module("playbook.bicep")
    connection = only_resource(document, "Microsoft.Web/connections")["properties"]
    assert connection["parameterValueType"] == "Alternative", "the azuresentinel connection uses managed identity"
    assert "azuresentinel" in render(connection["api"]["id"])
    workflow = only_resource(document, "Microsoft.Logic/workflows")
    assert workflow["identity"]["type"] == "SystemAssigned"
    definition = workflow["properties"]["definition"]
    (trigger,) = definition["triggers"].values()
    assert trigger["type"] == "ApiConnectionWebhook"
    assert trigger["inputs"]["path"] == "/incident-creation"
    connections = unquoted(workflow["properties"]["parameters"])["$connections"]["value"]["azuresentinel"]
    assert connections["connectionProperties"]["authentication"]["type"] == "ManagedServiceIdentity"
    actions = definition["actions"]
    assert actions, "the playbook has no action"
    for name, action in actions.items():
        assert action["type"] == "Http", name
        secure = action["runtimeConfiguration"]["secureData"]["properties"]
        assert set(secure) >= {"inputs", "outputs"}, f"{name}: run history must not keep the key or the incident"
    key_fetch = actions["Get_webhook_key"]["inputs"]
    assert key_fetch["authentication"]["type"] == "ManagedServiceIdentity"
    assert "webhookKeySecretName" in key_fetch["uri"]
    forward = actions["Forward_to_sentinel_webhook"]
    assert forward["inputs"]["method"] == "POST"
    assert forward["inputs"]["uri"].endswith("/api/sentinel/incidents")
    assert forward["inputs"]["body"] == "@triggerBody()"
    headers = unquoted(forward["inputs"]["headers"])
    assert "Get_webhook_key" in headers["x-functions-key"]
    assert headers["Content-Type"] == "application/json"
    assert forward["runAfter"] == {"Get_webhook_key": ["Succeeded"]}


def test_automation_rule_runs_the_playbook_on_analyst_updates_only() -> None:
    document = module("automation.bicep")
    rule = only_resource(document, "Microsoft.SecurityInsights/automationRules")
    assert rule["scope"] == "workspace"
    logic = rule["properties"]["triggeringLogic"]
    assert (logic["triggersOn"], logic["triggersWhen"], logic["isEnabled"]) == ("Incidents", "Updated", True)
    scope, *rest = logic["conditions"]
    # The mirror scope: the app's label (sentinel-api) or the mirror analytics rule (defender-portal).
    choice = scope["operator"]
    assert choice["type"] == "conditional" and render(choice["operands"]["condition"]) == "empty(mirrorRuleId)"
    assert (choice["operands"]["true_value"], choice["operands"]["false_value"]) == \
        ("labelCondition", "labelOrMirrorRuleCondition")
    # defender-portal: the rule's incidents OR the label (mirrors a sentinel-api deployment made before migrating).
    either = resolve_var(document, "labelOrMirrorRuleCondition")
    assert either["conditionType"] == "Boolean" and either["conditionProperties"]["operator"] == "Or"
    assert either["conditionProperties"]["innerConditions"] == ["labelCondition", "mirrorRuleCondition"]
    rule_condition = resolve_var(document, "mirrorRuleCondition")
    assert rule_condition["conditionType"] == "Property"
    by_rule = rule_condition["conditionProperties"]
    assert (by_rule["propertyName"], by_rule["operator"]) == ("IncidentRelatedAnalyticRuleIds", "Contains")
    assert by_rule["propertyValues"] == [
        "${workspace.id}/providers/Microsoft.SecurityInsights/alertRules/${mirrorRuleId}"]
    assert param_default(document, "mirrorRuleId") == ""
    conditions_list = [resolve_var(document, "labelCondition"), *rest]
    conditions = {c["conditionProperties"]["propertyName"]: c["conditionProperties"] for c in conditions_list}
    assert all(c["conditionType"] == "Property" for c in conditions_list)
    assert "IncidentProviderName" not in conditions, "provider conditions do not match API-created incidents"
    label = conditions["IncidentLabel"]
    assert label["operator"] == "Contains"
    source_label = resolve_var(document, label["propertyValues"][0])
    assert source_label == "defender-sync"
    try:
        from sync.mapping import SOURCE_LABEL
    except ImportError:  # pragma: no cover
        pass
    else:
        assert source_label == SOURCE_LABEL, "the automation rule must match the label the app puts on incidents"
    updated_by = conditions["IncidentUpdatedBySource"]
    assert (updated_by["operator"], updated_by["propertyValues"]) == ("NotEquals", ["Application"])
    (action,) = rule["properties"]["actions"]
    assert action["actionType"] == "RunPlaybook"
    assert action["actionConfiguration"]["logicAppResourceId"] == "playbookId"
    assert render(action["actionConfiguration"]["tenantId"]) == "tenant().tenantId"


# ---------------------------------------------------------------------------------------------------------------
# Analyst content and alerts


KQL_FUNCTIONS = {
    "DefenderIncidentsLatest": ("DefenderIncidents_CL", {"LastUpdateDateTime", "DefenderTenantId", "IncidentId"}),
    "DefenderAlertsLatest": ("DefenderAlerts_CL", {"LastUpdateDateTime", "DefenderTenantId", "AlertId"}),
    "DefenderEvidenceForLatestAlerts": ("DefenderEvidence_CL", {"AlertLastUpdateDateTime", "DefenderTenantId",
                                                                "AlertId", "RecordId"}),
}


def test_kql_functions_are_deployed_from_the_kql_files() -> None:
    path = MODULES / "workspace.bicep"
    searches = {body(a)["properties"]["functionAlias"]: body(a)["properties"]
                for a in resources_of_type(parse(path),
                                           "Microsoft.OperationalInsights/workspaces/savedSearches").values()}
    assert set(searches) == set(KQL_FUNCTIONS)
    for alias, (table, columns) in KQL_FUNCTIONS.items():
        query = searches[alias]["query"]["function"]
        assert query["type"] == "load_text_content"
        kql_file = (path.parent / query["parameters"]["file_path"]).resolve()
        assert kql_file.name == f"{alias}.kql" and kql_file.is_file()
        text = kql_file.read_text(encoding="utf-8")
        assert table in text and "arg_max(LastUpdateDateTime, *)" in text
        declared = {c["name"] for c in table_columns(table)}
        assert columns <= declared, f"{alias} uses columns {table}.json lacks: {columns - declared}"
        for column in columns:
            assert column in text, f"{alias} should use {column}"
    evidence = (INFRA / "kql" / "DefenderEvidenceForLatestAlerts.kql").read_text(encoding="utf-8")
    assert "join" in evidence and "AlertLastUpdateDateTime" in evidence and "DefenderAlerts_CL" in evidence


def test_workbook_is_valid_and_queries_both_resources() -> None:
    path = MODULES / "workbook.bicep"
    document = parse(path)
    workbook = only_resource(document, "Microsoft.Insights/workbooks")
    assert workbook["properties"]["category"] == "sentinel"
    content = resolve_var(document, "content")["function"]
    assert content["type"] == "load_text_content"
    workbook_file = (path.parent / content["parameters"]["file_path"]).resolve()
    text = workbook_file.read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["version"] == "Notebook/1.0"
    replaced = render(document["variables"]["withAppInsights"]["value"]) + \
        render(document["variables"]["serialized"]["value"])
    queries: list[dict[str, Any]] = []

    def walk(items: list[dict[str, Any]]) -> None:
        for item in items:
            if item["type"] == 3:
                queries.append(item["content"])
            if item["type"] == 12:
                walk(item["content"]["items"])

    walk(data["items"])
    resources = {q["crossComponentResources"][0] for q in queries}
    assert resources == {"__APPINSIGHTS_RESOURCE_ID__", "__WORKSPACE_RESOURCE_ID__"}
    for placeholder in resources:
        assert placeholder in replaced, f"the Bicep does not replace {placeholder}"
    joined = "\n".join(q["query"] for q in queries)
    for needle in ("sync.lag_seconds", "sync.dead_letters", "DefenderIncidentsLatest", "DefenderAlertsLatest",
                   "customDimensions.tenantId", "Severity", "Status"):
        assert needle in joined, needle


def test_alert_rules_watch_lag_and_dead_letters() -> None:
    path = MODULES / "alerts.bicep"
    rules = {name: body(a) for name, a in
             resources_of_type(parse(path), "Microsoft.Insights/scheduledQueryRules").items()}
    assert len(rules) == 2
    seen = set()
    for rule in rules.values():
        properties = rule["properties"]
        assert properties["scopes"] == ["appInsightsId"]
        (criterion,) = properties["criteria"]["allOf"]
        query_file = (path.parent / criterion["query"]["function"]["parameters"]["file_path"]).resolve()
        kql = query_file.read_text(encoding="utf-8")
        assert "customMetrics" in kql and "traces" in kql, query_file.name
        assert criterion["metricMeasureColumn"] in kql
        assert [d["name"] for d in criterion["dimensions"]] == ["DefenderTenantId"]
        assert "customDimensions.tenantId" in kql
        seen |= {name for name in ("sync.lag_seconds", "sync.dead_letters") if f'"{name}"' in kql}
        assert properties["autoMitigate"] is True
    assert seen == {"sync.lag_seconds", "sync.dead_letters"}


def test_main_outputs_every_endpoint_the_app_needs() -> None:
    outputs = set(parse(MAIN)["outputs"])
    assert {"AZURE_FUNCTION_APP_NAME", "FUNCTION_APP_HOST", "LOGS_DCR_IMMUTABLE_ID", "LOGS_INGESTION_ENDPOINT",
            "LOGS_INGESTION_SCOPE", "AZURE_STORAGE_BLOB_ENDPOINT", "AZURE_STORAGE_QUEUE_ENDPOINT",
            "AZURE_STORAGE_TABLE_ENDPOINT", "AZURE_CLIENT_ID", "AZURE_IDENTITY_PRINCIPAL_ID", "AZURE_KEY_VAULT_URI",
            "AZURE_KEY_VAULT_NAME", "SENTINEL_WORKSPACE_ID", "GRAPH_ENDPOINT", "ARM_ENDPOINT", "AZURE_AUTHORITY_HOST",
            "AZURE_RESOURCE_GROUP", "SENTINEL_WEBHOOK_KEY_SECRET_NAME"} <= outputs


def test_azure_yaml_describes_the_function_service_and_hook() -> None:
    text = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:  # PyYAML is not a dev requirement: fall back on the lines that matter
        for line in ("  path: infra", "  api:", "    project: .", "    language: python", "    host: function"):
            assert f"\n{line}\n" in text, line
        runs = re.findall(r"run: (\S+)", text)
    else:
        project = yaml.safe_load(text)
        assert project["infra"]["path"] == "infra"
        service = project["services"]["api"]  # the name the Function app's azd-service-name tag carries
        assert (service["language"], service["host"]) == ("python", "function")
        assert (ROOT / service["project"] / "function_app.py").is_file()
        runs = [variant["run"] for variant in project["hooks"]["postdeploy"].values()]
    assert runs
    for run in runs:
        assert (ROOT / run).is_file(), run


# ---------------------------------------------------------------------------------------------------------------
# checkov


SKIP = re.compile(r"checkov:skip=([A-Z0-9_]+)(.*)")


def test_every_checkov_suppression_carries_its_reason() -> None:
    count = 0
    for path in BICEP_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            match = SKIP.search(line)
            if match:
                count += 1
                reason = match.group(2).lstrip(":").strip()
                assert len(reason) >= 30, f"{path.name}: {match.group(1)} is suppressed without a real reason"
    assert count, "expected the documented suppressions"


@pytest.mark.slow
def test_checkov_passes_on_infra() -> None:
    # `make infra-check` installs checkov in a venv of its own (.venv-checkov); a developer may have it on PATH.
    candidates = [ROOT / ".venv-checkov" / "bin" / "checkov", Path(sys.executable).with_name("checkov")]
    on_path = shutil.which("checkov")
    checkov = next((c for c in [*candidates, *([Path(on_path)] if on_path else [])] if c.is_file()), None)
    if checkov is None:
        pytest.skip("checkov is not installed here; `make infra-check` runs it (checkov -d infra)")
    result = subprocess.run(
        [str(checkov), "-d", "infra", "--framework", "bicep", "--skip-download", "-o", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert summary["parsing_errors"] == 0, "checkov could not parse a Bicep file (it would silently skip it)"
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in report["results"]["failed_checks"]]
    assert not failed, failed
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary["passed"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Mirror target (defender-portal): the rule that creates the mirrors


def mirror_rule() -> dict[str, Any]:
    document = module("mirror-rule.bicep")
    (attrs,) = resources_of_type(document, "Microsoft.SecurityInsights/alertRules").values()
    assert attrs["api_version"] == "2025-10-01-preview", "NRT rules exist only in preview api-versions"
    return body(attrs)


def test_mirror_target_parameter_defaults_to_defender_portal_and_wires_everything() -> None:
    main = parse(MAIN)
    assert param_default(main, "mirrorTarget") == "defender-portal"
    assert decorator(main["parameters"]["mirrorTarget"], "allowed") == ["defender-portal", "sentinel-api"]
    assert render(resolve_var(main, "portalMirror")) == "equals(mirrorTarget, defender-portal)"
    rule_id = resolve_var(main, "mirrorRuleId")
    assert rule_id["function"]["type"] == "guid", "the rule name must be deterministic (redeployments keep it)"
    modules = main["modules"]
    assert modules["mirrorRule"]["config"]["condition"] == "portalMirror"
    mirror = body(modules["mirrorRule"])
    assert mirror["params"]["ruleId"] == "mirrorRuleId" and mirror["dependsOn"] == ["workspace"]
    assert render(mirror["scope"]) == render(body(modules["workspace"])["scope"])
    assert body(modules["workspace"])["params"]["deployMirrorRequests"] == "portalMirror"
    app = body(modules["app"])["params"]
    assert app["mirrorTarget"] == "mirrorTarget"
    assert render(app["mirrorRuleId"]) == "conditional(portalMirror, mirrorRuleId, )"
    automation = body(modules["automation"])
    assert render(automation["params"]["mirrorRuleId"]) == "conditional(portalMirror, mirrorRuleId, )"
    assert "mirrorRule" in automation["dependsOn"]
    # The app keeps sentinel-api when the setting is absent; the Bicep always sets it.
    document = module("app.bicep")
    assert param_default(document, "mirrorTarget") == "sentinel-api"
    settings = app_settings()
    assert settings["SYNC_MIRROR_TARGET"] == "mirrorTarget"
    assert settings["SYNC_MIRROR_RULE_ID"] == "mirrorRuleId"
    assert render(settings["SYNC_MIRROR_REQUESTS_PER_MINUTE"]) == "string(mirrorRequestsPerMinute)"
    condition = document["variables"]["mirrorRuleSettings"]["value"]["operator"]["operands"]["condition"]
    assert render(condition) == "equals(mirrorTarget, defender-portal)"
    for doc in (main, document):
        pace = doc["parameters"]["mirrorRequestsPerMinute"]
        assert (decorator(pace, "max_value"), pace["default"]) == (30, 25)
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert parameters["mirrorTarget"]["value"] == "${SYNC_MIRROR_TARGET=defender-portal}"


def test_mirror_rule_makes_one_uncorrelated_incident_per_request_row() -> None:
    rule = mirror_rule()
    assert rule["kind"] == "NRT" and rule["scope"] == "workspace" and rule["name"] == "ruleId"
    props = rule["properties"]
    assert props["description"].startswith("#DONT_CORR#"), "#DONT_CORR# must open the description"
    assert props["enabled"] is True and props["suppressionEnabled"] is False
    assert props["severity"] in ("High", "Medium", "Low", "Informational")
    assert props["eventGroupingSettings"] == {"aggregationKind": "AlertPerResult"}
    incident = props["incidentConfiguration"]
    assert incident["createIncident"] is True
    grouping = incident["groupingConfiguration"]
    assert grouping["enabled"] is False and grouping["reopenClosedIncident"] is False
    assert {"lookbackDuration", "matchingMethod"} <= set(grouping), "required by the type even when disabled"
    assert props["alertDetailsOverride"] == {
        "alertDisplayNameFormat": "{{IncidentTitle}}", "alertDescriptionFormat": "{{Description}}",
        "alertSeverityColumnName": "Severity",
        "alertDynamicProperties": [{"alertProperty": "AlertLink", "value": "IncidentWebUrl"}]}
    assert props["customDetails"] == {"SourceKey": "SourceKey", "DefenderTenantId": "DefenderTenantId",
                                      "IncidentId": "IncidentId"}
    # The emulator's rule model reads the same settings (so the app's tests run against the deployed rule).
    from emulators.portal import mirror_rule_properties

    model = mirror_rule_properties()
    for key in ("eventGroupingSettings", "alertDetailsOverride", "customDetails"):
        assert model[key] == props[key], key
    assert model["incidentConfiguration"]["createIncident"] is True
    assert model["incidentConfiguration"]["groupingConfiguration"]["enabled"] is False
    assert model["description"].startswith("#DONT_CORR#")


def test_mirror_rule_query_and_entity_mappings_fit_the_table() -> None:
    rule = mirror_rule()
    query = rule["properties"]["query"]["function"]
    assert query["type"] == "load_text_content"
    text = (MODULES / query["parameters"]["file_path"]).resolve().read_text(encoding="utf-8")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
    assert code.lstrip().startswith("DefenderMirrorRequests_CL")
    assert "mv-expand" not in code, "mv-expand would make several alerts (and incidents) of one request"
    assert "summarize" not in code, "one result per row: every request becomes its own alert"
    columns = {c["name"] for c in table_columns("DefenderMirrorRequests_CL")}
    projected = set(re.findall(r"\b([A-Za-z][A-Za-z0-9]*)\b", code.split("| project", 1)[1]))
    props = rule["properties"]
    used = {"Severity", "IncidentWebUrl", "IncidentTitle", "Description", *props["customDetails"].values()}
    assert used <= projected and used <= columns
    mappings = props["entityMappings"]
    assert len(mappings) <= 10, "Sentinel accepts at most 10 entity mappings per rule"
    identifiers = {"Account": "FullName", "Host": "FullName", "IP": "Address"}
    for mapping in mappings:
        (field,) = mapping["fieldMappings"]
        assert field["identifier"] == identifiers[mapping["entityType"]], mapping
        assert field["columnName"] in projected, f"{field['columnName']} is not a column of the query"
        source = {"Account": "Accounts", "Host": "Hosts", "IP": "IPs"}[mapping["entityType"]]
        assert re.search(rf"{field['columnName']} = tostring\({source}\[\d\]\)", code), field
    assert {m["entityType"] for m in mappings} == set(identifiers)


def test_mirror_rule_properties_exist_in_the_azure_type_definitions() -> None:
    """Every property name and enum value of the rule, checked against Azure's own type data for the version."""
    types_path = (ROOT.parent.parent / "shared" / "reference" / "azure-types" / "Microsoft.SecurityInsights" /
                  "2025-10-01-preview" / "types.json")
    if not types_path.is_file():
        types_path = Path("/work/shared/reference/azure-types/Microsoft.SecurityInsights/2025-10-01-preview/types.json")
    if not types_path.is_file():
        pytest.skip("the Azure type definitions are not on this machine")
    nodes = json.loads(types_path.read_text(encoding="utf-8"))

    def node(ref: dict[str, str]) -> dict[str, Any]:
        return dict(nodes[int(ref["$ref"].split("/")[-1])])

    nrt = next(n for n in nodes if n.get("$type") == "ObjectType" and n.get("name") == "NrtAlertRuleProperties")

    def check(value: Any, type_node: dict[str, Any], where: str) -> None:
        kind = type_node["$type"]
        if kind == "ObjectType":
            known = type_node.get("properties", {})
            extra = type_node.get("additionalProperties")
            assert isinstance(value, dict), where
            required = {k for k, p in known.items() if p.get("flags", 0) & 1}
            assert required <= set(value), f"{where}: missing required {sorted(required - set(value))}"
            for key, item in value.items():
                if key in known:
                    check(item, node(known[key]["type"]), f"{where}.{key}")
                else:
                    assert extra is not None, f"{where}: unknown property {key!r}"
        elif kind == "ArrayType":
            assert isinstance(value, list), where
            for index, item in enumerate(value):
                check(item, node(type_node["itemType"]), f"{where}[{index}]")
        elif kind == "UnionType":
            literals = [node(e) for e in type_node["elements"]]
            if all(lit["$type"] == "StringLiteralType" for lit in literals):
                assert value in [lit["value"] for lit in literals], f"{where}: {value!r} is not a known value"
            elif isinstance(value, str):
                values = [lit.get("value") for lit in literals if lit["$type"] == "StringLiteralType"]
                assert value in values or any(lit["$type"] == "StringType" for lit in literals), where

    props = dict(mirror_rule()["properties"])
    props["query"] = "DefenderMirrorRequests_CL"           # loadTextContent(...) stands for a string
    props["displayName"] = "name"                          # a parameter
    check(props, nrt, "properties")
# API versions: GA only (except the NRT mirror rule), the newest in Azure's type data, every property known to it

AZURE_TYPES = Path("/work/shared/reference/azure-types")
if not AZURE_TYPES.is_dir():  # pragma: no cover - a checkout next to the shared reference
    AZURE_TYPES = ROOT.parent / "shared" / "reference" / "azure-types"
# Bicep keywords of a resource body that are not properties of the resource type.
BICEP_KEYWORDS = {"parent", "scope", "dependsOn"}
# pycep expression nodes (a value computed by Bicep, not an object literal to check property by property).
EXPRESSION_KEYS = {"function", "operator", "property_name", "interpolation", "ternary", "for", "condition"}


def all_resources() -> list[tuple[str, str, dict[str, Any]]]:
    """(file name, symbolic name, parsed resource) of every resource declared (or referenced) in infra/."""
    found = []
    for path in BICEP_FILES:
        for name, attrs in (parse(path).get("resources") or {}).items():
            found.append((path.name, name, attrs))
    return found


def preview_versions(resources: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """Resources on a preview API version, except the NRT mirror rule (NRT exists only in preview versions)."""
    previews = []
    for file, name, attrs in resources:
        if "preview" not in attrs["api_version"]:
            continue
        nrt_rule = attrs["type"].lower() == "microsoft.securityinsights/alertrules" and body(attrs).get("kind") == "NRT"
        if not nrt_rule:
            previews.append(f"{file}: {name} {attrs['type']}@{attrs['api_version']}")
    return previews


def test_no_resource_uses_a_preview_api_version_except_the_nrt_mirror_rule() -> None:
    assert not preview_versions(all_resources())


def test_the_preview_check_fails_on_a_preview_version_and_spares_only_an_nrt_rule(tmp_path: Path) -> None:
    text = (MODULES / "workspace.bicep").read_text(encoding="utf-8")
    assert "workspaces/savedSearches@2026-03-01" in text
    text = text.replace("workspaces/savedSearches@2026-03-01", "workspaces/savedSearches@2025-07-01-preview", 1)
    rules = """
resource nrt 'Microsoft.SecurityInsights/alertRules@2025-10-01-preview' = {
  scope: workspace
  name: 'a'
  kind: 'NRT'
  properties: {}
}
resource scheduled 'Microsoft.SecurityInsights/alertRules@2025-10-01-preview' = {
  scope: workspace
  name: 'b'
  kind: 'Scheduled'
  properties: {}
}
"""
    (tmp_path / "w.bicep").write_text(text + rules, encoding="utf-8")
    parsed = _parser().parse(file_path=tmp_path / "w.bicep")
    found = preview_versions([("w.bicep", n, a) for n, a in parsed["resources"].items()])
    assert found == [
        "w.bicep: incidentsLatest Microsoft.OperationalInsights/workspaces/savedSearches@2025-07-01-preview",
        "w.bicep: scheduled Microsoft.SecurityInsights/alertRules@2025-10-01-preview"], found


@cache
def _versions() -> dict[str, list[str]]:
    data: dict[str, list[str]] = json.loads((AZURE_TYPES / "versions.json").read_text(encoding="utf-8"))
    return {k.lower(): v for k, v in data.items()}


def test_every_resource_uses_the_newest_ga_version_in_the_type_data() -> None:
    if not AZURE_TYPES.is_dir():
        pytest.skip("the Azure type data (shared/reference/azure-types) is not here")
    behind = []
    for file, name, attrs in all_resources():
        versions = _versions().get(attrs["type"].lower())
        ga = sorted(v for v in versions or [] if "preview" not in v)
        if ga and "preview" not in attrs["api_version"] and attrs["api_version"] != ga[-1]:
            behind.append(f"{file}: {name} {attrs['type']}@{attrs['api_version']} (newest GA {ga[-1]})")
    assert not behind, behind


@cache
def _resource_type(type_name: str, version: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """(type nodes, the resource body node) of ``type@version`` in the type data, or None when absent."""
    namespace = type_name.split("/")[0]
    for path in sorted((AZURE_TYPES / namespace / version).glob("types*.json")):
        nodes = json.loads(path.read_text(encoding="utf-8"))
        for node in nodes:
            if node.get("$type") == "ResourceType" and node.get("name", "").lower() == f"{type_name}@{version}".lower():
                return nodes, node["body"]
    return None


def _resolve(nodes: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, Any]:
    return nodes[int(ref["$ref"].split("/")[-1])] if "$ref" in ref else ref


def _unknown_properties(nodes: list[dict[str, Any]], type_ref: dict[str, Any], value: Any, path: str) -> list[str]:
    """Property paths in ``value`` (an object literal of the Bicep) that the type does not declare."""
    node = _resolve(nodes, type_ref)
    kind = node.get("$type")
    if kind == "AnyType" or value is None:
        return []
    if kind == "UnionType":
        results = [_unknown_properties(nodes, e, value, path) for e in node["elements"]]
        return min(results, key=len)
    if kind == "ArrayType":
        if not isinstance(value, list):
            return []
        return [p for i, item in enumerate(value) for p in _unknown_properties(nodes, node["itemType"], item,
                                                                                  f"{path}[{i}]")]
    if not isinstance(value, dict) or set(value) & EXPRESSION_KEYS:
        return []
    if kind == "DiscriminatedObjectType":
        props = dict(node.get("baseProperties") or {})
        chosen = value.get(node["discriminator"])
        for key, element in (node.get("elements") or {}).items():
            if chosen is None or str(chosen) == key:
                props.update(_resolve(nodes, element).get("properties") or {})
        node = {"$type": "ObjectType", "properties": props}
    if node.get("$type") != "ObjectType":
        return []
    declared = {k.lower(): v for k, v in (node.get("properties") or {}).items()}
    extra = node.get("additionalProperties")
    unknown = []
    for key, item in value.items():
        key = unquote(str(key))
        if not path and key in BICEP_KEYWORDS:
            continue
        prop = declared.get(key.lower())
        if prop is None:
            if extra is None:
                unknown.append(f"{path}{key}")
            continue
        unknown += _unknown_properties(nodes, prop["type"], item, f"{path}{key}.")
    return unknown


def test_every_property_the_bicep_sets_exists_in_the_type_of_its_api_version() -> None:
    if not AZURE_TYPES.is_dir():
        pytest.skip("the Azure type data (shared/reference/azure-types) is not here")
    problems, checked = [], 0
    for file, name, attrs in all_resources():
        if attrs.get("existing"):
            continue
        found = _resource_type(attrs["type"], attrs["api_version"])
        if found is None:
            problems.append(f"{file}: {name}: no type data for {attrs['type']}@{attrs['api_version']}")
            continue
        nodes, body_ref = found
        checked += 1
        for unknown in _unknown_properties(nodes, body_ref, body(attrs), ""):
            if not (attrs["type"] == "Microsoft.Web/connections" and unknown == "properties.parameterValueType"):
                problems.append(f"{file}: {name} ({attrs['type']}@{attrs['api_version']}): {unknown}")
    assert checked > 20
    assert not problems, problems


def test_table_retention_refuses_what_the_tables_api_refuses() -> None:
    """The tables API takes 4-730 days (-1: workspace default): 1-3 must fail at the parameter, not mid-deployment."""
    for document in (parse(MAIN), module("workspace.bicep")):
        param = document["parameters"]["tableRetentionInDays"]
        assert (decorator(param, "min_value"), decorator(param, "max_value")) == (4, 730)
        assert 4 <= param["default"] <= 730
        assert param_default(document, "tableRetentionOverride") is False   # default: the workspace's retention
    retention = module("workspace.bicep")["variables"]["retention"]["value"]
    assert render(retention) == "conditional(tableRetentionOverride, tableRetentionInDays, null)", render(retention)


def test_an_empty_automation_principal_is_reported_by_the_deployment() -> None:
    output = parse(MAIN)["outputs"]["DEPLOYMENT_WARNING"]["value"]
    condition = render(output["operator"]["operands"]["condition"])
    assert "deploySentinelAutomation" in condition and "empty(sentinelAutomationPrincipalObjectId)" in condition
    message = output["operator"]["operands"]["true_value"]
    assert "Automation Contributor" in message and "docs/OPERATIONS.md" in message
    assert output["operator"]["operands"]["false_value"] == ""
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    assert "DEPLOYMENT_WARNING" in operations and "Automation Contributor" in operations
