"""Real payloads written by others (tests/fixtures/real-payloads, sources in its README) through the row builders,
the validators, the field mapping and the webhook parser, with values compared.

Known traits of the samples (see the README) are handled here, not in the app: the Elastic records are split (one
alert object instead of a list), one Graph docs example has trailing commas, and some docs examples use ``tags``
instead of ``customTags`` or PascalCase enum values.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_rows import assert_valid_row

from emulators.ingestion import _type_problem
from sync import mapping as m
from sync.mapping import OwnerMap, SyncedFields
from sync.models import RequestError
from sync.pushback import incident_reference
from sync.rows import alert_row, evidence_rows, evidence_type, load_columns, normalize_time, rows_for_incident

FIXTURES = Path(__file__).parent / "fixtures" / "real-payloads"
GRAPH, SENTINEL, WEBHOOK = FIXTURES / "graph", FIXTURES / "sentinel", FIXTURES / "webhook"
TENANT = "b3c1b5fc-828c-45fa-a1e1-10d74f6d6e9c"
KW: dict[str, Any] = {"tenant_id": TENANT, "tenant_name": "Contoso", "read_at": datetime(2026, 5, 1, tzinfo=UTC)}
OM = OwnerMap()
METADATA = "msgraph-metadata_v1.0_security-types-and-enums.json"


def load(path: Path) -> list[Any]:
    """The JSON documents of a fixture (one per line for .ndjson; trailing commas of one docs example removed)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ndjson":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        return [json.loads(text)]
    except ValueError:
        return [json.loads(re.sub(r",(\s*[}\]])", r"\1", text))]


def graph_objects(path: Path) -> list[dict[str, Any]]:
    """The incidents/alerts of a Graph fixture, Elastic's split ``alerts`` object made a list again."""
    found: list[dict[str, Any]] = []
    for document in load(path):
        for obj in document.get("value", [document]):
            if isinstance(obj.get("alerts"), dict):
                obj = {**obj, "alerts": [obj["alerts"]]}
            found.append(obj)
    return found


def is_incident(obj: dict[str, Any]) -> bool:
    return "displayName" in obj and "title" not in obj


GRAPH_FILES = sorted(p.name for p in GRAPH.iterdir() if p.name != METADATA)
SENTINEL_FILES = sorted(p.name for p in SENTINEL.iterdir())


def test_every_fixture_file_is_covered() -> None:
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file()} - {"README.md"}
    covered = ({f"graph/{n}" for n in GRAPH_FILES} | {f"graph/{METADATA}"} | {f"sentinel/{n}" for n in SENTINEL_FILES}
               | {f"webhook/{p.name}" for p in WEBHOOK.iterdir()})
    assert on_disk == covered
    assert set(EXPECTED_INCIDENTS) | set(EXPECTED_ALERTS) == set(GRAPH_FILES)


# --------------------------------------------------------------------------------------------------------------
# Row builders and validators

def check_row(row: dict[str, Any], table: str) -> None:
    """The row builders' own contract and the Logs Ingestion emulator's checks (names and types per column)."""
    assert_valid_row(row, table)
    columns = load_columns(table)
    for name, value in row.items():
        assert _type_problem(columns[name], value) is None, (name, value)


def check_alert_rows(alert: dict[str, Any], alert_rows: list[dict[str, Any]],
                     evidence: list[dict[str, Any]], incident_id: str) -> None:
    (row,) = [r for r in alert_rows if r["AlertId"] == alert["id"] and r["LastUpdateDateTime"] ==
              normalize_time(alert["lastUpdateDateTime"])]
    check_row(row, "DefenderAlerts_CL")
    assert row["IncidentId"] == incident_id
    for column, key in (("Status", "status"), ("Severity", "severity"), ("Category", "category"),
                        ("ServiceSource", "serviceSource"), ("DetectionSource", "detectionSource"),
                        ("AlertTitle", "title"), ("ProductName", "productName"), ("DetectorId", "detectorId"),
                        ("AlertPolicyId", "alertPolicyId"), ("ThreatDisplayName", "threatDisplayName")):
        assert row.get(column) == (alert.get(key) or None), column
    assert row.get("Categories") == alert.get("categories")
    assert row.get("MitreTechniques") == alert.get("mitreTechniques")
    assert row.get("CreatedDateTime") == normalize_time(alert.get("createdDateTime"))
    assert row["EvidenceCount"] == len(alert.get("evidence") or [])
    assert [c["comment"] for c in row.get("Comments") or []] == [c["comment"] for c in alert.get("comments") or []]
    mine = [r for r in evidence if r["AlertId"] == alert["id"]]
    assert [r["EvidenceType"] for r in mine] == [evidence_type(e) for e in alert.get("evidence") or []]
    for r, item in zip(mine, alert.get("evidence") or [], strict=True):
        check_row(r, "DefenderEvidence_CL")
        assert r["Evidence"] == item and r["IncidentId"] == incident_id


@pytest.mark.parametrize("name", GRAPH_FILES)
def test_graph_fixture_rows(name: str) -> None:
    for obj in graph_objects(GRAPH / name):
        if is_incident(obj):
            built = rows_for_incident(obj, **KW)
            (row,) = built["DefenderIncidents_CL"]
            check_row(row, "DefenderIncidents_CL")
            assert row["IncidentId"] == str(obj["id"])
            assert row["LastUpdateDateTime"] == normalize_time(obj["lastUpdateDateTime"])
            for column, key in (("Status", "status"), ("Severity", "severity"), ("AssignedTo", "assignedTo"),
                                ("Classification", "classification"), ("Determination", "determination"),
                                ("IncidentName", "displayName"), ("RedirectIncidentId", "redirectIncidentId"),
                                ("IncidentWebUrl", "incidentWebUrl"), ("ResolvingComment", "resolvingComment")):
                assert row.get(column) == obj.get(key), column
            assert row.get("CustomTags") == obj.get("customTags")
            assert [c["comment"] for c in row.get("Comments") or []] == [c["comment"] for c in obj.get("comments")
                                                                          or []]
            # Legacy comment keys (docs examples) are read as the typed ones.
            for comment, source in zip(row.get("Comments") or [], obj.get("comments") or [], strict=True):
                assert comment["createdByDisplayName"] == (source.get("createdByDisplayName")
                                                           or source.get("createdBy"))
            alerts = obj.get("alerts")
            assert row.get("AlertCount") == (len(alerts) if isinstance(alerts, list) else None)
            for alert in alerts or []:
                check_alert_rows(alert, built["DefenderAlerts_CL"], built["DefenderEvidence_CL"], str(obj["id"]))
        else:
            incident = str(obj["incidentId"])
            rows = [alert_row(obj, incident_id=incident, **KW)]
            check_alert_rows(obj, rows, evidence_rows(obj, incident_id=incident, **KW), incident)


#: Key columns of evidence rows, per fixture: (alert id, evidence index) -> expected key values (read from the files).
EVIDENCE_KEYS: dict[str, dict[tuple[str, int], dict[str, Any]]] = {
    "elastic-m365_defender_incident_benchmark-incident-sample.lines3-4.ndjson": {
        ("da8acc61bf-ade2-41c7-8810-1c7e3d164170_1", 0): {
            "DeviceId": "e0fd628281e06405ab6c0431b4e344bbd6325f18", "DeviceName": "app01.corp.example.com"},
        ("da8acc61bf-ade2-41c7-8810-1c7e3d164170_1", 1): {
            "DeviceId": "e0fd628281e06405ab6c0431b4e344bbd6325f18", "FileName": "K3V15.1安装盘访问密码i5fy.zip",
            "FilePath": "E:", "Sha1": "90da10004c8f6fafdaa2cf18922670a745564f45",
            "Sha256": "c9d5dc956841e000bfd8762e2f0b48b66c79b79500e894b4efa7fb9ba17e4e9e"},
    },
    "msgraph-docs_v1.0_security-alert-get.response.json": {
        ("da637578995287051192_756343937", 1): {
            "DeviceId": "73e7e2de709dff64ef64b1d0c30e67fab63279db", "FileName": "MsSense.exe",
            "FilePath": "C:\\Program Files\\temp", "Sha1": "5f1e8acedc065031aad553b710838eb366cfee9a",
            "Sha256": "8963a19fb992ad9a76576c5638fd68292cffb9aaac29eb8285f9abf6196a7dec"},
        ("da637578995287051192_756343937", 2): {"ProcessId": 4780, "ProcessCommandLine": "\"MsSense.exe\"",
                                                "AccountName": "SYSTEM", "AccountDomain": "NT AUTHORITY",
                                                "AccountSid": "S-1-5-18", "FileName": "MsSense.exe"},
        ("da637578995287051192_756343937", 3): {
            "RegistryKey": "HKEY_LOCAL_MACHINE\\SYSTEM\\CONTROLSET001\\CONTROL\\WMI\\AUTOLOGGER\\SENSEAUDITLOGGER"},
    },
}


def _key_values(row: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in expected}


@pytest.mark.parametrize("name", sorted(EVIDENCE_KEYS))
def test_evidence_key_values_of_real_payloads(name: str) -> None:
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for obj in graph_objects(GRAPH / name):
        for alert in obj.get("alerts") or [obj]:
            for row in evidence_rows(alert, incident_id=str(alert.get("incidentId")), **KW):
                rows[(row["AlertId"], row["EvidenceIndex"])] = row
    for key, expected in EVIDENCE_KEYS[name].items():
        assert _key_values(rows[key], expected) == expected, key


def test_every_evidence_item_of_every_fixture_fills_a_key_column() -> None:
    keys = set(m for m in load_columns("DefenderEvidence_CL")) - {
        "TimeGenerated", "RecordId", "DefenderTenantId", "TenantName", "IncidentId", "AlertId",
        "AlertLastUpdateDateTime", "EvidenceIndex", "EvidenceType", "CreatedDateTime", "Verdict",
        "RemediationStatus", "Roles", "Tags", "Evidence", "TruncatedFields"}
    seen = 0
    for name in GRAPH_FILES:
        for obj in graph_objects(GRAPH / name):
            for alert in obj.get("alerts") or ([obj] if not is_incident(obj) else []):
                for row in evidence_rows(alert, incident_id="x", **KW):
                    seen += 1
                    assert keys & set(row), (name, row["EvidenceType"])
    assert seen > 30


def _sample(properties: dict[str, str]) -> dict[str, Any]:
    """A value per Graph property that can be recognised in a row: times get distinct seconds, the rest a text."""
    return {key: (f"2026-01-01T00:00:{index:02d}Z" if kind == "Edm.DateTimeOffset" else f"v-{key}")
            for index, (key, kind) in enumerate(sorted(properties.items()))}


@pytest.mark.parametrize("entity", ["alert", "incident"])
def test_every_alert_and_incident_property_of_graph_v1_reaches_a_column(entity: str) -> None:
    properties = load(GRAPH / METADATA)[0]["entityTypes"][entity]["properties"]
    obj = _sample(properties) | {"id": "a1", "categories": ["Execution", "Persistence"], "mitreTechniques": ["T1059"],
                                 "evidence": [], "alerts": [], "systemTags": ["v-systemTags"],
                                 "customTags": ["v-customTags"], "additionalData": {"k": "v-additionalData"},
                                 "customDetails": {"c": "v-customDetails"}, "priorityScore": 42,
                                 "comments": [{"comment": "v-comments", "createdByDisplayName": "x"}]}
    if entity == "alert":
        row = alert_row(obj, incident_id="1", **KW)
        skipped = {"tenantId", "evidence", "incidentId", "id"}  # DefenderTenantId, EvidenceCount, IncidentId, AlertId
    else:
        row = rows_for_incident(obj, **KW)["DefenderIncidents_CL"][0]
        skipped = {"tenantId", "id"}
    text = json.dumps(row)
    for key in set(properties) - skipped:
        assert json.dumps(obj[key]).strip('"[]{}') in text, key
    if entity == "alert":
        assert row["Categories"] == ["Execution", "Persistence"]


# --------------------------------------------------------------------------------------------------------------
# Field mapping (Defender -> canonical -> Sentinel -> canonical -> Defender)

def fields(status: str, owner: str | None = None, cls: str | None = None, det: str | None = None,
           tags: frozenset[str] = frozenset()) -> SyncedFields:
    return SyncedFields(status, owner, cls, det, tags)


KAI = "kaic@contoso.onmicrosoft.com"
#: file -> incident id -> (canonical fields, Sentinel status, severity, owner UPN or None, the app's extra labels)
EXPECTED_INCIDENTS: dict[str, dict[str, tuple[SyncedFields, str, str, str | None, set[str]]]] = {
    "elastic-m365_defender_incident_benchmark-incident-sample.lines3-4.ndjson": {
        "1924": (fields("active"), "New", "Low", None, set()),
        "1923": (fields("resolved", None, "unknown", "unknown"), "Closed", "High", None, set()),
    },
    "elastic-m365_defender_incident_test-incident-no-alerts.ndjson": {
        "29": (fields("active", "admin@contoso.com"), "New", "High", "admin@contoso.com", set()),
        "42": (fields("resolved", "securityteam@contoso.onmicrosoft.com", "truePositive", "malware"), "Closed",
               "Medium", "securityteam@contoso.onmicrosoft.com", {"determination:malware"}),
    },
    "elastic-m365_defender_incident_test-incident.ndjson": {
        "2972395": (fields("active", KAI), "New", "Medium", KAI, set())},
    "msgraph-docs_v1.0_security-incident-get.response.json": {
        "2972395": (fields("active", KAI, tags=frozenset({"Demo"})), "New", "Medium", KAI, set())},
    "msgraph-docs_v1.0_security-incident-update.response.json": {
        "2972395": (fields("active", KAI, tags=frozenset({"Demo"})), "New", "Medium", KAI, set())},
    "msgraph-docs_v1.0_security-list-incidents.example1.response.json": {
        "2972395": (fields("active", KAI, tags=frozenset({"Demo"})), "New", "Medium", KAI, set())},
    "msgraph-docs_v1.0_security-list-incidents.example2-expand-alerts.response.json": {
        "2972395": (fields("active", KAI), "New", "Medium", KAI, set())},
    "xsoar-MicrosoftGraphSecurity_incident_update_response.json": {
        "12345": (fields("resolved", None, "unknown", "unknown"), "Closed", "Medium", None,
                  {"redirected", "owner:Cortex XSOAR MS Graph Dev"})},
    "xsoar-MicrosoftGraphSecurity_incidents_list_response.json": {
        "12345": (fields("active"), "New", "Medium", None, set()),
        "12346": (fields("resolved", None, "unknown", "unknown"), "Closed", "Informational", None, set())},
    "xsoar-MicrosoftGraphSecurity_incidents_single_response.json": {
        "12345": (fields("active"), "New", "Medium", None, set())},
}
EXPECTED_ALERTS = {name for name in GRAPH_FILES if name not in EXPECTED_INCIDENTS}


@pytest.mark.parametrize("name", sorted(EXPECTED_INCIDENTS))
def test_graph_fixture_mapping_round_trip(name: str) -> None:
    incidents = {str(o["id"]): o for o in graph_objects(GRAPH / name) if is_incident(o)}
    assert set(incidents) == set(EXPECTED_INCIDENTS[name])
    for incident_id, (expected, status, severity, owner, extra_labels) in EXPECTED_INCIDENTS[name].items():
        incident = incidents[incident_id]
        canonical = m.from_defender(incident)
        assert canonical == expected, incident_id
        props = m.to_sentinel_properties(incident, canonical, None, owner_map=OM, tenant_name="Contoso")
        assert (props["status"], props["severity"]) == (status, severity)
        assert props["title"] == " ".join(incident["displayName"].split())
        assert (props.get("owner") or {}).get("userPrincipalName") == owner
        label_names = {label["labelName"] for label in props["labels"]}
        assert label_names == {"defender-sync", "tenant:Contoso"} | set(expected.tags) | extra_labels
        assert f"Defender XDR incident {incident_id}" in props["description"]
        if expected.status == "resolved":
            sentinel_cls = m.CLASSIFICATION_TO_SENTINEL[str(expected.classification)][0]
            assert props["classification"] == sentinel_cls
        # Back: Sentinel reads as the same values, and Defender needs no write (no echo of our own mirror).
        back, problems = m.from_sentinel(props, owner_map=OM, base=canonical, defender=incident)
        assert (back, problems) == (canonical, [])
        assert m.to_defender_patch(back, incident) == {}


def test_a_sentinel_closure_of_a_docs_incident_patches_defender_in_graph_v1_spelling() -> None:
    (incident,) = graph_objects(GRAPH / "msgraph-docs_v1.0_security-incident-get.response.json")
    canonical = m.from_defender(incident)
    props = m.to_sentinel_properties(incident, canonical, None, owner_map=OM, tenant_name="Contoso")
    props.update(status="Closed", classification="FalsePositive", classificationReason="InaccurateData",
                 classificationComment="Not a malicious activity",
                 labels=[*props["labels"], {"labelName": "determination:clean", "labelType": "User"}])
    closed, problems = m.from_sentinel(props, owner_map=OM, base=canonical, defender=incident)
    assert (closed.status, closed.classification, closed.determination, problems) == (
        "resolved", "falsePositive", "notMalicious", [])
    patch = m.to_defender_patch(closed, incident, closing_comment=m.sentinel_closing_comment(props))
    assert patch == {"status": "resolved", "classification": "falsePositive", "determination": "notMalicious",
                     "resolvingComment": "Not a malicious activity"}
    assert m.determination_respelled(patch) == {**patch, "determination": "clean"}


# --------------------------------------------------------------------------------------------------------------
# Sentinel resources: mapping and the webhook parser

def sentinel_resources(name: str) -> list[dict[str, Any]]:
    """Every incident resource of a Sentinel fixture (x-ms-examples bodies, the PUT request, or a plain list)."""
    (document,) = load(SENTINEL / name)
    if "responses" not in document:
        return list(document["value"])
    found = []
    request = document["parameters"].get("incident")
    if request is not None:
        found.append(request)
    for response in document["responses"].values():
        body = response.get("body") or {}
        found.extend(body.get("value", [body]))
    return found


def workspace_of(resource_id: str) -> str:
    return resource_id.split("/providers/Microsoft.SecurityInsights/", 1)[0]


JOHN = "john@contoso.com"
VIJAY = "vijay.ganesh@sstlab.in"
#: file -> canonical fields of each incident resource in order (the PUT request of CreateIncident first)
EXPECTED_SENTINEL: dict[str, list[SyncedFields]] = {
    "azure-rest-api-specs_2024-09-01_CreateIncident.json": [
        fields("resolved", None, "falsePositive", "other"),  # the PUT request: owner by objectId only
        fields("resolved", JOHN, "falsePositive", "other"), fields("resolved", JOHN, "falsePositive", "other")],
    "azure-rest-api-specs_2024-09-01_GetIncidentById.json": [fields("resolved", JOHN, "falsePositive", "other")],
    "azure-rest-api-specs_2024-09-01_GetIncidents.json": [fields("resolved", JOHN, "falsePositive", "other")],
    "soc-agent_ss-js_incident-list.items0-3.json": [
        fields("inProgress", VIJAY, tags=frozenset({"AI"})), fields("resolved", VIJAY, "unknown", "unknown"),
        fields("inProgress", VIJAY, tags=frozenset({"AI"})), fields("resolved", VIJAY, "unknown", "unknown")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SENTINEL))
def test_sentinel_fixture_mapping_and_webhook_parser(name: str) -> None:
    resources = sentinel_resources(name)
    assert [m.from_sentinel(r["properties"], owner_map=OM, base=None)[0] for r in resources] == \
        EXPECTED_SENTINEL[name]
    for resource in resources:
        props = resource["properties"]
        assert m.sentinel_closing_comment(props) == (props.get("classificationComment") or None)
        if "id" not in resource:
            continue  # the PUT request body has no ID: nothing for the webhook to name
        workspace = workspace_of(resource["id"])
        assert incident_reference(resource, workspace) == (resource["name"], resource.get("etag"))
        assert incident_reference({"object": resource}, workspace.upper())[0] == resource["name"]
        with pytest.raises(RequestError) as info:
            incident_reference(resource, workspace + "-other")
        assert info.value.status == 403


def test_soc_agent_autoassigned_redirected_label_is_a_customer_label_not_ours() -> None:
    # A real workspace's automation rule labels merged incidents "Redirected": not the app's label (exact match), so
    # it is no app label; being AutoAssigned, it is no user tag either unless the tag is known.
    (_, closed, _, _) = sentinel_resources("soc-agent_ss-js_incident-list.items0-3.json")
    labels = closed["properties"]["labels"]
    assert not m.is_app_label("Redirected")
    assert m.user_tags_from_labels(labels) == frozenset()
    assert m.user_tags_from_labels(labels, known_tags={"Redirected"}) == {"Redirected"}


def test_sentinel_comments_fixture() -> None:
    (document,) = load(SENTINEL / "azure-rest-api-specs_2024-09-01_GetAllIncidentComments.json")
    (comment,) = document["responses"]["200"]["body"]["value"]
    parts = m.sentinel_comment_parts(comment)
    assert parts == m.CommentParts("john doe", "2019-01-01T13:15:30Z", "Some message")
    assert m.is_mirrored_comment(parts.text) is None
    text = m.mirrored_comment_text("sentinel", parts.author, parts.created, parts.text)
    assert text.endswith("\nSome message") and m.is_mirrored_comment(text) == "sentinel"
    assert m.mirrored_comment_key(text) == m.comment_key("sentinel", "john doe", "2019-01-01T13:15:30Z",
                                                         "Some message")


def test_graph_comment_fixtures_keep_author_and_time() -> None:
    (incident,) = graph_objects(GRAPH / "msgraph-docs_v1.0_security-incident-get.response.json")
    (parts,) = [m.defender_comment_parts(c) for c in incident["comments"]]
    assert parts == m.CommentParts("DavidS@contoso.onmicrosoft.com", "2021-09-30T12:07:37.2756993Z",
                                   "Demo incident")


def test_logic_app_trigger_body_fixture() -> None:
    (document,) = load(WEBHOOK / "logicapp-sentinel-incident-trigger-outputs_redacted.json")
    body = document["body"]
    workspace = workspace_of(body["object"]["id"])
    assert incident_reference(body, workspace) == ("63883bf7-5be1-42f4-809a-0417943b837b", None)
    # The object ID spells "Incidents" with a capital I, like the real service: accepted.
    assert "/Incidents/" in body["object"]["id"]
    with pytest.raises(RequestError) as info:
        incident_reference({**body, "object": {**body["object"], "name": "another"}}, workspace)
    assert (info.value.status, info.value.code) == (400, "inconsistent_incident")
