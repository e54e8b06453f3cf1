"""sync.rows: schema agreement, types, the 64 KB rule, RecordIds and evidence flattening."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sync import rows
from sync.rows import (
    CHANGE_LOG_TABLES,
    FIELD_MAX_BYTES,
    ROW_MAX_BYTES,
    STREAMS,
    TRUNCATION_MARKER,
    alert_row,
    evidence_rows,
    incident_row,
    load_columns,
    record_id,
)

TABLES_DIR = Path(__file__).resolve().parent.parent / "infra" / "tables"
READ_AT = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
TENANT = "b3c1b5fc-0000-4000-8000-00000000000a"
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?Z$")
RESERVED = {"tenantid", "title", "id", "type", "_resourceid", "_subscriptionid", "uniqueid"}
KW: dict[str, Any] = {"tenant_id": TENANT, "tenant_name": "Contoso", "read_at": READ_AT}


# ---------------------------------------------------------------------------------------------------------------
# Row validity: the one check every test below relies on


def assert_valid_row(row: dict[str, Any], table: str) -> None:
    columns = load_columns(table)
    assert set(row) <= set(columns), set(row) - set(columns)
    for name in ("TimeGenerated", "RecordId", "DefenderTenantId", "IncidentId"):
        assert name in row, name
    for name, value in row.items():
        ctype = columns[name]
        assert value is not None, name
        if ctype == "string":
            assert isinstance(value, str), (name, value)
            assert len(value.encode("utf-8")) <= FIELD_MAX_BYTES, name
        elif ctype == "datetime":
            assert isinstance(value, str) and ISO_Z.match(value), (name, value)
        elif ctype == "int":
            assert type(value) is int and -(2**31) <= value < 2**31, (name, value)
        elif ctype == "long":
            assert type(value) is int and -(2**63) <= value < 2**63, (name, value)
        elif ctype == "dynamic":
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
            if isinstance(value, str):
                assert len(value.encode("utf-8")) <= FIELD_MAX_BYTES, name
            else:
                assert len(text.encode("utf-8")) <= FIELD_MAX_BYTES, name
        else:  # pragma: no cover - the schemas use only the types above
            raise AssertionError(f"unexpected column type {ctype}")
    truncated = row.get("TruncatedFields", [])
    assert isinstance(truncated, list) and set(truncated) <= set(columns)
    assert "TruncatedFields" not in truncated
    # The whole row: valid JSON (no NaN), encodable as UTF-8 and within one request with room to spare.
    wire = json.dumps(row, allow_nan=False)
    assert len(wire) <= ROW_MAX_BYTES
    json.dumps(row, ensure_ascii=False).encode("utf-8")
    # Change-log rows carry a deterministic uuid5; a mirror request's RecordId is its RequestId (a random GUID).
    assert (ANY_UUID if table == "DefenderMirrorRequests_CL" else UUID).match(row["RecordId"])


ANY_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# ---------------------------------------------------------------------------------------------------------------
# Realistic objects (shapes from Graph v1.0 docs / metadata)


def full_incident() -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.security.incident",
        "id": "2972395",
        "tenantId": TENANT,
        "displayName": "Multi-stage incident involving Initial access & Command and control on one endpoint",
        "description": "Microsoft observed Raspberry Robin worm activity spreading through infected USB on devices.",
        "summary": "Overview of an attack…",
        "createdDateTime": "2021-08-13T08:43:35.5533333Z",
        "lastUpdateDateTime": "2021-09-30T09:35:45.1133333Z",
        "status": "resolved",
        "severity": "medium",
        "classification": "truePositive",
        "determination": "multiStagedAttack",
        "assignedTo": "KaiC@contoso.onmicrosoft.com",
        "customTags": ["Demo", "tier-1"],
        "systemTags": ["Defender Experts"],
        "comments": [
            {"comment": "Demo incident", "createdByDisplayName": "DavidS@contoso.onmicrosoft.com",
             "createdDateTime": "2021-09-30T12:07:37.2756993Z"},
            {"comment": "legacy keys", "createdBy": "AmyJ@contoso.onmicrosoft.com",
             "createdTime": "2021-09-30T13:07:37.2756993+01:00"},
        ],
        "incidentWebUrl": f"https://security.microsoft.com/incidents/2972395?tid={TENANT}",
        "redirectIncidentId": "2972390",
        "resolvingComment": "Contained; USB blocked by policy.",
        "lastModifiedBy": "API-App:0a1b2c3d",
        "priorityScore": 87,
        "alerts": [full_alert()],
    }


def full_alert() -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.security.alert",
        "id": "da637551227677560813_-961444813",
        "providerAlertId": "da637551227677560813_-961444813",
        "incidentId": "2972395",
        "status": "resolved",
        "severity": "medium",
        "classification": "truePositive",
        "determination": "malware",
        "serviceSource": "microsoftDefenderForEndpoint",
        "detectionSource": "antivirus",
        "detectorId": "e0da400f-affd-43ef-b1d5-afc2eb6f2756",
        "tenantId": TENANT,
        "title": "Suspicious execution of hidden file",
        "description": "A hidden file has been launched.",
        "recommendedActions": "Collect artifacts and determine scope.",
        "category": "DefenseEvasion",
        "categories": ["DefenseEvasion", "Execution"],
        "assignedTo": "KaiC@contoso.onmicrosoft.com",
        "alertWebUrl": "https://security.microsoft.com/alerts/da637551227677560813_-961444813?tid=x",
        "incidentWebUrl": "https://security.microsoft.com/incidents/2972395?tid=x",
        "actorDisplayName": "Storm-0123",
        "threatDisplayName": "Raspberry Robin",
        "threatFamilyName": "RaspberryRobin",
        "mitreTechniques": ["T1564.001"],
        "createdDateTime": "2021-04-27T12:52:47.6416616Z",
        "lastUpdateDateTime": "2021-05-02T14:19:01.3266667Z",
        "resolvedDateTime": "2021-05-02T14:19:01.3266667Z",
        "firstActivityDateTime": "2021-04-26T07:45:50.116Z",
        "lastActivityDateTime": "2021-05-02T07:56:58.222Z",
        "comments": [{"comment": "looked at it", "createdByDisplayName": "Kai",
                      "createdDateTime": "2021-05-02T10:00:00Z"}],
        "systemTags": ["Defender Experts"],
        "additionalData": {"key": {"nested": [1, 2, 3]}},
        "alertPolicyId": "policy-1",
        "customDetails": {"Computer": "host-1"},
        "investigationState": "successfullyRemediated",
        "productName": "Microsoft Defender for Endpoint",
        "evidence": all_evidence(),
    }


def user_account(name: str = "bob") -> dict[str, Any]:
    return {"accountName": name, "domainName": "CONTOSO", "userSid": "S-1-5-21-1-2-3-1001",
            "azureAdUserId": "aa0a0a0a-0000-4000-8000-000000000001", "userPrincipalName": f"{name}@contoso.com",
            "displayName": name.title()}


def file_details(name: str = "evil.exe") -> dict[str, Any]:
    return {"fileName": name, "filePath": "C:\\Users\\bob\\Downloads", "sha1": "a" * 40, "sha256": "b" * 64,
            "md5": "c" * 32, "fileSize": 1024, "filePublisher": None, "signer": None, "issuer": None}


BASE = {"createdDateTime": "2021-04-27T12:52:47.6416616Z", "verdict": "malicious", "remediationStatus": "remediated",
        "remediationStatusDetails": None, "roles": ["compromised"], "detailedRoles": [], "tags": ["t1"]}


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@odata.type": f"#microsoft.graph.security.{kind}", **BASE, **fields}


def all_evidence() -> list[Any]:
    return [
        ev("deviceEvidence", mdeDeviceId="mde-1", azureAdDeviceId="aad-1", deviceDnsName="host-1.contoso.com",
           hostName="host-1", osPlatform="Windows10", osBuild=22631, lastIpAddress="10.0.0.5",
           loggedOnUsers=[{"accountName": "bob", "domainName": "CONTOSO"}], ipInterfaces=["10.0.0.5"],
           vmMetadata={"vmId": "vm", "cloudProvider": "azure", "resourceId": "/x", "subscriptionId": "s"}),
        ev("userEvidence", userAccount=user_account("alice"), stream=None),
        ev("fileEvidence", mdeDeviceId="mde-1", detectionStatus="detected", fileDetails=file_details()),
        ev("processEvidence", mdeDeviceId="mde-1", processId=4242, parentProcessId=4000,
           processCommandLine="evil.exe -hide", processCreationDateTime="2021-04-27T12:50:00Z",
           imageFile=file_details("evil.exe"), parentProcessImageFile=file_details("explorer.exe"),
           userAccount=user_account("bob")),
        ev("ipEvidence", ipAddress="203.0.113.7", countryLetterCode="NL"),
        ev("urlEvidence", url="https://bad.example/payload"),
        ev("mailboxEvidence", primaryAddress="alice@contoso.com", displayName="Alice",
           userAccount=user_account("alice")),
        ev("analyzedMessageEvidence", networkMessageId="nmid-1", internetMessageId="<m@x>",
           recipientEmailAddress="alice@contoso.com", senderIp="198.51.100.1", subject="Invoice",
           p1Sender={"emailAddress": "evil@bad.example", "displayName": "Evil", "domainName": "bad.example"}),
        ev("dnsEvidence", domainName="bad.example", ipAddresses=[{"ipAddress": "203.0.113.9"}]),
        ev("oauthApplicationEvidence", appId="app-1", displayName="Consent phish app", objectId="obj-1"),
        ev("azureResourceEvidence", resourceId="/subscriptions/s/rg/sa", resourceName="sa"),
        ev("registryValueEvidence", mdeDeviceId="mde-1", registryKey="Run", registryHive="HKEY_CURRENT_USER",
           registryValueName="evil"),
        ev("cloudLogonSessionEvidence", account={"userAccount": user_account("bob")}, sessionId="s-1"),
        ev("cloudLogonRequestEvidence", requestId="req-1"),
        ev("malwareEvidence", name="Trojan:Win32/Wacatac", category="Trojan"),
        ev("mailClusterEvidence", networkMessageIds=["n1", "n2"], clusterBy="Subject"),
    ]


def realistic_rows() -> dict[str, list[dict[str, Any]]]:
    return rows.rows_for_incident(full_incident(), **KW)


# ---------------------------------------------------------------------------------------------------------------
# Schema <-> code agreement


def test_schema_files_define_the_three_tables_and_no_reserved_names() -> None:
    assert sorted(p.stem for p in TABLES_DIR.glob("*_CL.json")) == sorted(STREAMS)
    for table in STREAMS:
        columns = load_columns(table)
        assert not {c.lower() for c in columns} & RESERVED
        assert columns["TimeGenerated"] == "datetime"
        for name in ("RecordId", "DefenderTenantId", "TenantName", "IncidentId"):
            assert columns[name] == "string"
        assert columns["TruncatedFields"] == "dynamic"
    assert load_columns("DefenderAlerts_CL")["AlertId"] == "string"
    assert load_columns("DefenderEvidence_CL")["AlertId"] == "string"
    incident = load_columns("DefenderIncidents_CL")
    for name in ("LastUpdateDateTime", "Status", "Severity", "Classification", "Determination", "AssignedTo"):
        assert name in incident


def test_load_columns_reads_the_files_and_returns_a_copy() -> None:
    for table in STREAMS:
        document = json.loads((TABLES_DIR / f"{table}.json").read_text(encoding="utf-8"))
        assert load_columns(table) == {c["name"]: c["type"] for c in document["columns"]}
    copy_ = load_columns("DefenderIncidents_CL")
    copy_["Bogus"] = "string"
    assert "Bogus" not in load_columns("DefenderIncidents_CL")
    with pytest.raises(ValueError, match="unknown table"):
        load_columns("../../etc/passwd")


@pytest.mark.parametrize("table", sorted(CHANGE_LOG_TABLES))
def test_every_declared_column_is_produced_for_a_realistic_object(table: str) -> None:
    produced = {name for row in realistic_rows()[table] for name in row}
    # TruncatedFields appears only on a cut row: make one cut to cover it.
    huge = full_incident()
    huge["description"] = "x" * (FIELD_MAX_BYTES + 1)
    huge["alerts"][0]["description"] = "x" * (FIELD_MAX_BYTES + 1)
    huge["alerts"][0]["evidence"][0]["osPlatform"] = "x" * (FIELD_MAX_BYTES + 1)
    produced |= {name for row in rows.rows_for_incident(huge, **KW)[table] for name in row}
    assert produced == set(load_columns(table)), set(load_columns(table)) ^ produced


def test_realistic_rows_are_valid_and_fill_the_expected_values() -> None:
    built = realistic_rows()
    for table, table_rows in built.items():
        assert table_rows
        for row in table_rows:
            assert_valid_row(row, table)
            assert row["TimeGenerated"] == "2026-05-01T12:00:00.1234560Z"
            assert row["DefenderTenantId"] == TENANT and row["TenantName"] == "Contoso"
            assert row["IncidentId"] == "2972395"
            assert "TruncatedFields" not in row
    (incident,) = built["DefenderIncidents_CL"]
    assert incident["LastUpdateDateTime"] == "2021-09-30T09:35:45.1133333Z"
    assert incident["IncidentName"].startswith("Multi-stage")
    assert incident["PriorityScore"] == 87
    assert incident["AlertIds"] == ["da637551227677560813_-961444813"] and incident["AlertCount"] == 1
    assert incident["CustomTags"] == ["Demo", "tier-1"]
    assert incident["Comments"][1] == {"comment": "legacy keys", "createdByDisplayName": "AmyJ@contoso.onmicrosoft.com",
                                       "createdDateTime": "2021-09-30T12:07:37.2756993Z"}
    (alert,) = built["DefenderAlerts_CL"]
    assert alert["AlertTitle"] == "Suspicious execution of hidden file"
    assert alert["EvidenceCount"] == len(all_evidence()) == len(built["DefenderEvidence_CL"])
    assert alert["AdditionalData"] == {"key": {"nested": [1, 2, 3]}}
    assert alert["Category"] == "DefenseEvasion" and alert["Categories"] == ["DefenseEvasion", "Execution"]
    assert alert["FirstActivityDateTime"] == "2021-04-26T07:45:50.116Z"
    evidence = built["DefenderEvidence_CL"]
    assert [r["EvidenceIndex"] for r in evidence] == list(range(len(evidence)))
    assert all(r["AlertLastUpdateDateTime"] == "2021-05-02T14:19:01.3266667Z" for r in evidence)
    assert evidence[0]["Evidence"] == all_evidence()[0]
    assert evidence[0]["Roles"] == ["compromised"] and evidence[0]["Tags"] == ["t1"]
    assert evidence[0]["Verdict"] == "malicious" and evidence[0]["RemediationStatus"] == "remediated"


def test_builders_do_not_mutate_their_input() -> None:
    incident = full_incident()
    before = copy.deepcopy(incident)
    rows.rows_for_incident(incident, **KW)
    assert incident == before


# ---------------------------------------------------------------------------------------------------------------
# Evidence flattening per type


def flat(evidence: Any) -> dict[str, Any]:
    (row,) = evidence_rows({"id": "a1", "lastUpdateDateTime": "2021-05-02T14:19:01Z", "evidence": [evidence]},
                           incident_id="7", **KW)
    assert_valid_row(row, "DefenderEvidence_CL")
    return row


KEYS = ("DeviceId", "DeviceName", "AccountName", "AccountDomain", "AccountUpn", "AccountSid", "AccountObjectId",
        "IpAddress", "Url", "FileName", "FilePath", "Sha1", "Sha256", "Md5", "ProcessId", "ProcessCommandLine",
        "MailboxAddress", "NetworkMessageId")


def keys_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in KEYS if k in row}


ACCOUNT = {"AccountName": "bob", "AccountDomain": "CONTOSO", "AccountUpn": "bob@contoso.com",
           "AccountSid": "S-1-5-21-1-2-3-1001", "AccountObjectId": "aa0a0a0a-0000-4000-8000-000000000001"}
FILE = {"FileName": "evil.exe", "FilePath": "C:\\Users\\bob\\Downloads", "Sha1": "a" * 40, "Sha256": "b" * 64,
        "Md5": "c" * 32}


@pytest.mark.parametrize(("evidence", "expected"), [
    (ev("deviceEvidence", mdeDeviceId="mde-1", deviceDnsName="host-1.contoso.com", hostName="host-1",
        lastIpAddress="10.0.0.5"),
     {"DeviceId": "mde-1", "DeviceName": "host-1.contoso.com", "IpAddress": "10.0.0.5"}),
    (ev("deviceEvidence", mdeDeviceId="mde-2", deviceDnsName=None, hostName="host-2"),
     {"DeviceId": "mde-2", "DeviceName": "host-2"}),
    (ev("userEvidence", userAccount=user_account("bob")), ACCOUNT),
    (ev("fileEvidence", mdeDeviceId="mde-1", fileDetails=file_details()), {"DeviceId": "mde-1", **FILE}),
    (ev("processEvidence", mdeDeviceId="mde-1", processId=4242, processCommandLine="evil.exe -hide",
        imageFile=file_details(), userAccount=user_account("bob")),
     {"DeviceId": "mde-1", "ProcessId": 4242, "ProcessCommandLine": "evil.exe -hide", **FILE, **ACCOUNT}),
    (ev("ipEvidence", ipAddress="2001:db8::1"), {"IpAddress": "2001:db8::1"}),
    (ev("urlEvidence", url="https://bad.example/x"), {"Url": "https://bad.example/x"}),
    (ev("mailboxEvidence", primaryAddress="bob@contoso.com", userAccount=user_account("bob")),
     {"MailboxAddress": "bob@contoso.com", **ACCOUNT}),
    (ev("mailboxEvidence", primaryAddress="bob@contoso.com", upn="bob@contoso.com"),
     {"MailboxAddress": "bob@contoso.com", "AccountUpn": "bob@contoso.com"}),
    (ev("analyzedMessageEvidence", networkMessageId="nmid-1", recipientEmailAddress="bob@contoso.com",
        senderIp="198.51.100.1"),
     {"NetworkMessageId": "nmid-1", "MailboxAddress": "bob@contoso.com", "IpAddress": "198.51.100.1"}),
    (ev("submissionMailEvidence", networkMessageId="nmid-2", recipient="bob@contoso.com", senderIp="198.51.100.2"),
     {"NetworkMessageId": "nmid-2", "MailboxAddress": "bob@contoso.com", "IpAddress": "198.51.100.2"}),
    (ev("mailboxConfigurationEvidence", mailboxPrimaryAddress="bob@contoso.com", upn="bob@contoso.com",
        externalDirectoryObjectId="aa0a0a0a-0000-4000-8000-000000000009"),
     {"MailboxAddress": "bob@contoso.com", "AccountUpn": "bob@contoso.com",
      "AccountObjectId": "aa0a0a0a-0000-4000-8000-000000000009"}),
    (ev("hostLogonSessionEvidence", account=ev("userEvidence", userAccount=user_account("bob")),
        host=ev("deviceEvidence", mdeDeviceId="mde-3", deviceDnsName="host-3.contoso.com")),
     {"DeviceId": "mde-3", "DeviceName": "host-3.contoso.com", **ACCOUNT}),
    (ev("cloudLogonSessionEvidence", account=ev("userEvidence", userAccount=user_account("bob")),
        deviceName="Bob's iPhone"),
     {"DeviceName": "Bob's iPhone", **ACCOUNT}),
    (ev("nicEvidence", ipAddress=ev("ipEvidence", ipAddress="10.1.1.1"), macAddress="00-11"),
     {"IpAddress": "10.1.1.1"}),
    (ev("networkConnectionEvidence", sourceAddress=ev("ipEvidence", ipAddress="10.0.0.5"),
        destinationAddress=ev("ipEvidence", ipAddress="203.0.113.9"), destinationPort=443),
     {"IpAddress": "203.0.113.9"}),
    (ev("fileHashEvidence", algorithm="sha256", value="d" * 64), {"Sha256": "d" * 64}),
    (ev("fileHashEvidence", algorithm="md5", value="e" * 32), {"Md5": "e" * 32}),
    (ev("registryKeyEvidence", registryKey="HKLM\\Run", registryHive="HKEY_LOCAL_MACHINE"), {}),
])
def test_evidence_flattening(evidence: dict[str, Any], expected: dict[str, Any]) -> None:
    row = flat(evidence)
    assert keys_of(row) == expected
    assert row["EvidenceType"] == evidence["@odata.type"].removeprefix("#microsoft.graph.security.")
    assert row["Evidence"] == evidence


def test_unknown_and_broken_evidence_items_still_get_rows() -> None:
    assert flat(ev("aiAgentEvidence", agentName="x"))["EvidenceType"] == "aiAgentEvidence"
    assert flat({"@odata.type": "microsoft.graph.security.futureEvidence"})["EvidenceType"] == "futureEvidence"
    assert flat({"@odata.type": "#contoso.custom"})["EvidenceType"] == "contoso.custom"
    row = flat("just a string")
    assert row["Evidence"] == "just a string" and "EvidenceType" not in row
    assert flat(None)["EvidenceIndex"] == 0 and "Evidence" not in flat(None)
    row = flat(ev("processEvidence", processId="77", userAccount="not an object", imageFile=["x"]))
    assert row["ProcessId"] == 77 and "AccountName" not in row and "FileName" not in row
    assert "ProcessId" not in flat(ev("processEvidence", processId=True))
    assert "ProcessId" not in flat(ev("processEvidence", processId=2**70))


def test_evidence_list_shapes() -> None:
    alert = {"id": "a1", "lastUpdateDateTime": "2021-05-02T14:19:01Z"}
    assert evidence_rows({**alert, "evidence": None}, incident_id="7", **KW) == []
    assert evidence_rows({**alert, "evidence": "oops"}, incident_id="7", **KW) == []
    assert len(evidence_rows({**alert, "evidence": {"@odata.type": "#x.ipEvidence"}}, incident_id="7", **KW)) == 1
    assert alert_row({**alert, "evidence": "oops"}, incident_id="7", **KW)["EvidenceCount"] == 0
    assert alert_row({**alert, "evidence": [1, 2, 3]}, incident_id="7", **KW)["EvidenceCount"] == 3


# ---------------------------------------------------------------------------------------------------------------
# Required fields, times, wrong types


def test_missing_required_fields_raise_naming_the_field() -> None:
    incident = full_incident()
    for value in (None, "", "  ", True, {"x": 1}):
        with pytest.raises(ValueError, match="'id'"):
            incident_row({**incident, "id": value}, **KW)
    without = {k: v for k, v in incident.items() if k != "id"}
    with pytest.raises(ValueError, match="'id'"):
        incident_row(without, **KW)
    for bad_time in (None, "", "yesterday", 42):
        with pytest.raises(ValueError, match="lastUpdateDateTime"):
            incident_row({**incident, "lastUpdateDateTime": bad_time}, **KW)
    with pytest.raises(ValueError, match="'id'"):
        alert_row({"title": "no id"}, incident_id="1", **KW)
    with pytest.raises(ValueError, match="'id'"):
        evidence_rows({"evidence": []}, incident_id="1", **KW)
    with pytest.raises(ValueError, match="JSON object"):
        incident_row(["not", "a", "dict"], **KW)  # type: ignore[arg-type]
    assert incident_row({**incident, "id": 2972395}, **KW)["IncidentId"] == "2972395"


def test_alert_incident_id_falls_back_to_the_alert() -> None:
    assert alert_row({"id": "a", "incidentId": "9"}, incident_id="", **KW)["IncidentId"] == "9"
    with pytest.raises(ValueError, match="incident"):
        alert_row({"id": "a"}, incident_id="", **KW)


@pytest.mark.parametrize(("value", "expected"), [
    ("2021-09-30T09:35:45.1133333Z", "2021-09-30T09:35:45.1133333Z"),
    ("2021-09-30T09:35:45Z", "2021-09-30T09:35:45Z"),
    ("2021-09-30T09:35:45.12Z", "2021-09-30T09:35:45.12Z"),
    ("2021-09-30T09:35:45.123456789Z", "2021-09-30T09:35:45.1234567Z"),
    ("2021-09-30T11:35:45.1133333+02:00", "2021-09-30T09:35:45.1133333Z"),
    ("2021-09-30T00:35:45.5-03:00", "2021-09-30T03:35:45.5Z"),
    ("2021-09-30T09:35:45.1133333", "2021-09-30T09:35:45.1133333Z"),
    ("2021-09-30t09:35:45z", "2021-09-30T09:35:45Z"),
    ("2021-09-30", "2021-09-30T00:00:00Z"),
    ("not a time", None), ("", None), (None, None), (12, None), ("2021-13-45T00:00:00Z", None),
    ("0001-01-01T00:00:00+01:00", None),
    (datetime(2021, 1, 2, 3, 4, 5, 600000, tzinfo=timezone(timedelta(hours=1))), "2021-01-02T02:04:05.6000000Z"),
])
def test_datetime_normalisation(value: Any, expected: str | None) -> None:
    assert rows.normalize_time(value) == expected
    row = alert_row({"id": "a", "createdDateTime": value}, incident_id="1", **KW)
    assert row.get("CreatedDateTime") == expected


def test_wrong_types_are_coerced_or_dropped_never_crash() -> None:
    incident = {
        "id": "1", "lastUpdateDateTime": "2021-09-30T09:35:45Z",
        "customTags": "single", "systemTags": None, "comments": "a bare comment",
        "priorityScore": "42", "status": 7, "severity": True, "assignedTo": {"upn": "x"},
        "description": ["a", "list"], "displayName": 1.5, "alerts": "not a list", "createdDateTime": 20210101,
        "summary": float("nan"),
    }
    row = incident_row(incident, **KW)
    assert_valid_row(row, "DefenderIncidents_CL")
    assert row["CustomTags"] == ["single"] and "SystemTags" not in row
    assert row["Comments"] == [{"comment": "a bare comment"}]
    assert row["PriorityScore"] == 42
    assert row["Status"] == "7" and row["Severity"] == "true"
    assert row["AssignedTo"] == '{"upn":"x"}' and row["Description"] == '["a","list"]'
    assert row["IncidentName"] == "1.5" and row["Summary"] == "nan"
    assert "AlertIds" not in row and "AlertCount" not in row and "CreatedDateTime" not in row
    for bad in (True, 2**31, "4.5", "x", 1.5, [1]):
        assert "PriorityScore" not in incident_row({**incident, "priorityScore": bad}, **KW)
    assert incident_row({**incident, "priorityScore": 7.0}, **KW)["PriorityScore"] == 7
    dynamic = alert_row({"id": "a", "additionalData": {"n": float("inf"), 1: "k", "s": {1, 2}}}, incident_id="1",
                        **KW)["AdditionalData"]
    assert dynamic == {"n": "inf", "1": "k", "s": [1, 2]}


def test_lone_surrogates_are_replaced() -> None:
    text = json.loads('"a\\ud800b"')
    row = incident_row({"id": "1", "lastUpdateDateTime": "2021-09-30T09:35:45Z", "description": text,
                        "customTags": [text]}, **KW)
    assert row["Description"] == "a\ufffdb" and row["CustomTags"] == ["a\ufffdb"]
    assert_valid_row(row, "DefenderIncidents_CL")


# ---------------------------------------------------------------------------------------------------------------
# The 64 KB rule and the row budget


@pytest.mark.parametrize("unit", ["x", "é", "€", "😀", "a😀", "\x01"])
@pytest.mark.parametrize("extra", [-1, 0, 1, 5])
def test_string_cut_at_the_limit_on_a_character_boundary(unit: str, extra: int) -> None:
    size = len(unit.encode("utf-8"))
    text = unit * ((FIELD_MAX_BYTES + extra * size) // size)
    row = incident_row({"id": "1", "lastUpdateDateTime": "2021-09-30T09:35:45Z", "description": text}, **KW)
    assert_valid_row(row, "DefenderIncidents_CL")
    cut = len(text.encode("utf-8")) > FIELD_MAX_BYTES
    assert ("Description" in row.get("TruncatedFields", [])) == cut
    if cut:
        assert row["Description"].endswith(TRUNCATION_MARKER)
        kept = row["Description"][: -len(TRUNCATION_MARKER)]
        assert text.startswith(kept) and len(kept.encode("utf-8")) > FIELD_MAX_BYTES - 100
    else:
        assert row["Description"] == text


def test_big_dynamic_value_becomes_a_string_of_cut_json() -> None:
    details = {f"k{i}": "v" * 100 for i in range(1000)}
    row = alert_row({"id": "a", "customDetails": details, "mitreTechniques": ["T1"]}, incident_id="1", **KW)
    assert_valid_row(row, "DefenderAlerts_CL")
    assert row["TruncatedFields"] == ["CustomDetails"]
    value = row["CustomDetails"]
    assert isinstance(value, str) and value.endswith(TRUNCATION_MARKER)
    compact = json.dumps(details, ensure_ascii=False, separators=(",", ":"))
    assert compact.startswith(value[: -len(TRUNCATION_MARKER)])
    assert row["MitreTechniques"] == ["T1"]


def test_deep_nesting_is_cut_and_flagged() -> None:
    deep: Any = "leaf"
    for _ in range(5000):  # deeper than Python's recursion limit: must not crash
        deep = [deep]
    (row,) = evidence_rows({"id": "a", "evidence": [{"@odata.type": "#x.y", "nested": deep}]}, incident_id="1", **KW)
    assert_valid_row(row, "DefenderEvidence_CL")
    assert row["TruncatedFields"] == ["Evidence"]
    assert rows.DEPTH_MARKER in json.dumps(row["Evidence"], ensure_ascii=False)


def test_row_budget_cuts_the_largest_fields_so_the_row_fits_one_request() -> None:
    # Control characters serialise as \\u00XX: 60 KB of them is 360 KB on the wire, per field.
    junk = "\x01" * FIELD_MAX_BYTES
    incident = {"id": "1", "lastUpdateDateTime": "2021-09-30T09:35:45Z", "description": junk, "summary": junk,
                "resolvingComment": junk, "displayName": "short", "customTags": [junk[:10_000]] * 3}
    row = incident_row(incident, **KW)
    assert_valid_row(row, "DefenderIncidents_CL")
    assert len(json.dumps(row)) <= ROW_MAX_BYTES
    assert {"Description", "Summary", "ResolvingComment"} <= set(row["TruncatedFields"])
    assert row["IncidentName"] == "short"


# ---------------------------------------------------------------------------------------------------------------
# RecordId


def test_record_ids_are_deterministic_and_version_specific() -> None:
    a = incident_row(full_incident(), **KW)
    b = incident_row(full_incident(), **{**KW, "read_at": READ_AT + timedelta(hours=1)})
    assert a["RecordId"] == b["RecordId"]
    later = incident_row({**full_incident(), "lastUpdateDateTime": "2021-09-30T09:35:45.1133334Z"}, **KW)
    assert later["RecordId"] != a["RecordId"]
    # Same instant, another spelling; tenant GUID case: same version, same id.
    same = incident_row({**full_incident(), "lastUpdateDateTime": "2021-09-30T11:35:45.11333330+02:00"},
                        **{**KW, "tenant_id": TENANT.upper()})
    assert same["RecordId"] == a["RecordId"]
    other_tenant = incident_row(full_incident(), **{**KW, "tenant_id": "another"})
    assert other_tenant["RecordId"] != a["RecordId"]
    evidence = realistic_rows()["DefenderEvidence_CL"]
    assert len({r["RecordId"] for r in evidence}) == len(evidence)
    alert = full_alert()
    newer = {**alert, "lastUpdateDateTime": "2021-05-03T00:00:00Z"}
    old_ids = {r["RecordId"] for r in evidence_rows(alert, incident_id="1", **KW)}
    new_ids = {r["RecordId"] for r in evidence_rows(newer, incident_id="1", **KW)}
    assert not old_ids & new_ids
    assert alert_row(alert, incident_id="1", **KW)["RecordId"] != alert_row(newer, incident_id="1", **KW)["RecordId"]
    assert record_id("a|b", "c") != record_id("a", "b|c")
    assert record_id("x", "y") == record_id("x", "y")


# ---------------------------------------------------------------------------------------------------------------
# Property tests


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=10), children, max_size=5)),
    max_leaves=25,
)
# Large strings by repetition (fast to generate), including multi-byte and escaped characters.
huge_text = st.builds(lambda unit, n: unit * n,
                      st.sampled_from(["a", "é", "€", "😀", "\x00", '"', "\\", "日本"]),
                      st.integers(min_value=FIELD_MAX_BYTES // 8, max_value=FIELD_MAX_BYTES // 2))
anything = st.one_of(json_values, huge_text, st.lists(huge_text, max_size=2))
valid_times = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2100, 1, 1),
                           timezones=st.just(UTC)).map(lambda d: d.replace(tzinfo=None).isoformat() + "Z")
times = st.one_of(valid_times, st.text(max_size=30))

INCIDENT_KEYS = ["displayName", "description", "summary", "createdDateTime", "status", "severity", "classification",
                 "determination", "assignedTo", "customTags", "systemTags", "comments", "incidentWebUrl",
                 "redirectIncidentId", "resolvingComment", "lastModifiedBy", "priorityScore", "alerts"]
ALERT_KEYS = ["providerAlertId", "incidentId", "status", "severity", "title", "description", "recommendedActions",
              "createdDateTime", "lastUpdateDateTime", "resolvedDateTime", "mitreTechniques", "comments",
              "systemTags", "additionalData", "customDetails", "evidence", "serviceSource", "assignedTo"]
EVIDENCE_KEYS = ["@odata.type", "createdDateTime", "verdict", "roles", "tags", "mdeDeviceId", "deviceDnsName",
                 "hostName", "userAccount", "ipAddress", "url", "fileDetails", "imageFile", "processId",
                 "processCommandLine", "primaryAddress", "networkMessageId", "account", "host", "algorithm", "value"]


def objects(keys: list[str], required: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    optional = {key: st.one_of(anything, times) for key in keys if key not in required}
    return st.fixed_dictionaries(required, optional=optional)


incidents = objects(INCIDENT_KEYS, {"id": st.text(min_size=1, max_size=20).filter(str.strip),
                                    "lastUpdateDateTime": valid_times})
evidence_items = st.one_of(objects(EVIDENCE_KEYS, {}), anything)
alerts = objects(ALERT_KEYS, {"id": st.text(min_size=1, max_size=20).filter(str.strip),
                              "evidence": st.lists(evidence_items, max_size=4)})

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


def expected_flags(obj: dict[str, Any], mapping: dict[str, str], table: str) -> set[str]:
    """Columns whose source value is oversize (a string over the limit, or a container whose JSON is)."""
    columns = load_columns(table)
    flagged = set()
    for key, column in mapping.items():
        value = obj.get(key)
        if (isinstance(value, str) and columns[column] in ("string", "dynamic")
                and len(value.encode("utf-8", "surrogatepass")) > FIELD_MAX_BYTES):
            flagged.add(column)
    return flagged


@PROPS
@given(incident=incidents)
def test_property_incident_rows_are_always_valid(incident: dict[str, Any]) -> None:
    row = incident_row(incident, **KW)
    assert_valid_row(row, "DefenderIncidents_CL")
    event("truncated" if "TruncatedFields" in row else "not truncated")
    # Plain oversize strings are always flagged (other columns may be flagged too by the row budget).
    must = expected_flags(incident, {"description": "Description", "summary": "Summary",
                                     "displayName": "IncidentName", "assignedTo": "AssignedTo"},
                          "DefenderIncidents_CL")
    assert must <= set(row.get("TruncatedFields", []))
    for name in row.get("TruncatedFields", []):
        value = row[name]
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        assert text.endswith(TRUNCATION_MARKER) or rows.DEPTH_MARKER in text
    assert incident_row(incident, **KW) == row  # deterministic


@PROPS
@given(alert=alerts, incident_id=st.text(min_size=1, max_size=10).filter(str.strip))
def test_property_alert_and_evidence_rows_are_always_valid(alert: dict[str, Any], incident_id: str) -> None:
    row = alert_row(alert, incident_id=incident_id, **KW)
    assert_valid_row(row, "DefenderAlerts_CL")
    assert row["EvidenceCount"] == len(alert["evidence"])
    must = expected_flags(alert, {"title": "AlertTitle", "description": "Description"}, "DefenderAlerts_CL")
    assert must <= set(row.get("TruncatedFields", []))
    event("alert truncated" if "TruncatedFields" in row else "alert not truncated")
    ev_rows = evidence_rows(alert, incident_id=incident_id, **KW)
    assert len(ev_rows) == len(alert["evidence"])
    for index, ev_row in enumerate(ev_rows):
        assert_valid_row(ev_row, "DefenderEvidence_CL")
        assert ev_row["EvidenceIndex"] == index and ev_row["AlertId"] == row["AlertId"]
    assert len({r["RecordId"] for r in ev_rows} | {row["RecordId"]}) == len(ev_rows) + 1


@settings(max_examples=200, deadline=None)
@given(first=st.datetimes(timezones=st.just(UTC)), second=st.datetimes(timezones=st.just(UTC)),
       incident_id=st.text(min_size=1, max_size=12).filter(str.strip))
def test_property_record_id_distinct_across_versions(first: datetime, second: datetime, incident_id: str) -> None:
    def rid(when: datetime) -> str:
        stamp = when.replace(tzinfo=None).isoformat(timespec="microseconds") + "0Z"
        return str(incident_row({"id": incident_id, "lastUpdateDateTime": stamp}, **KW)["RecordId"])

    assert (rid(first) == rid(second)) == (first == second)


def test_generated_incidents_all_build_valid_rows() -> None:
    """Seeded realistic data from the Graph emulator's generator (unicode, ties, huge values, big incidents)."""
    from dataclasses import replace

    generator = pytest.importorskip("emulators.generator")
    profile = replace(generator.PROFILES["realistic"], huge_rate=0.1)
    flagged = 0
    for seed in (1, 2, 3):
        for incident in generator.generate_incidents(seed, TENANT, 60, profile=profile):
            for table, table_rows in rows.rows_for_incident(incident, **KW).items():
                for row in table_rows:
                    assert_valid_row(row, table)
                    flagged += "TruncatedFields" in row
    assert flagged


# ---------------------------------------------------------------------------------------------------------------
# Mirror requests (defender-portal target)

REQUEST_ID = "0b7e8f4e-3c1a-4d2b-9e6f-1a2b3c4d5e6f"
# What all_evidence() names, in first-seen order, each once.
ACCOUNTS = ["alice@contoso.com", "bob@contoso.com"]
HOSTS = ["host-1.contoso.com"]
IPS = ["10.0.0.5", "203.0.113.7", "198.51.100.1", "203.0.113.9"]  # 203.0.113.9: the DNS evidence resolves to it


def request_row(incident: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"tenant_id": TENANT.upper(), "tenant_name": "Contoso", "request_id": REQUEST_ID,
                            "now": READ_AT, **kwargs}
    row = rows.mirror_request_row(incident, **args)
    assert_valid_row(row, "DefenderMirrorRequests_CL")
    return row


def test_mirror_request_table_has_the_product_columns() -> None:
    columns = load_columns("DefenderMirrorRequests_CL")
    assert STREAMS["DefenderMirrorRequests_CL"] == "Custom-DefenderMirrorRequests"
    expected = {"TimeGenerated": "datetime", "RequestId": "string", "RecordId": "string", "DefenderTenantId": "string",
                "TenantName": "string", "IncidentId": "string", "SourceKey": "string", "IncidentTitle": "string",
                "Severity": "string", "Description": "string", "IncidentWebUrl": "string", "Accounts": "dynamic",
                "Hosts": "dynamic", "IPs": "dynamic", "TruncatedFields": "dynamic"}
    assert columns == expected
    # The pull's rows never include requests: only the defender-portal target sends them.
    assert set(realistic_rows()) == set(CHANGE_LOG_TABLES)


def test_mirror_request_row_fills_every_column_from_a_realistic_incident() -> None:
    row = request_row(full_incident())
    huge = full_incident()
    huge["displayName"] = "x" * (FIELD_MAX_BYTES + 1)
    assert set(row) | set(request_row(huge)) == set(load_columns("DefenderMirrorRequests_CL"))
    assert row["RecordId"] == row["RequestId"] == REQUEST_ID
    assert row["TimeGenerated"] == "2026-05-01T12:00:00.1234560Z"
    assert row["DefenderTenantId"] == TENANT.upper() and row["IncidentId"] == "2972395"
    assert row["SourceKey"] == f"{TENANT}/2972395"                 # tenant lower-cased
    assert row["IncidentTitle"] == full_incident()["displayName"]
    assert row["Severity"] == "Medium"
    assert row["IncidentWebUrl"] == f"https://security.microsoft.com/incidents/2972395?tid={TENANT}"
    assert row["Description"].startswith("Defender XDR incident 2972395: https://security.microsoft.com/")
    assert "Raspberry Robin" in row["Description"] and "Suspicious execution of hidden file" in row["Description"]
    assert row["Accounts"] == ACCOUNTS and row["Hosts"] == HOSTS and row["IPs"] == IPS


@pytest.mark.parametrize(("severity", "expected"), [("high", "High"), ("medium", "Medium"), ("low", "Low"),
                                                    ("informational", "Informational"), ("unknown", "Informational"),
                                                    (None, "Informational"), ("HIGH", "High")])
def test_mirror_request_severity_uses_sentinel_spelling(severity: Any, expected: str) -> None:
    assert request_row({"id": "1", "severity": severity})["Severity"] == expected


def test_mirror_request_link_gets_the_tenant_and_keeps_other_parameters() -> None:
    row = request_row({"id": "5", "incidentWebUrl": "https://security.microsoft.com/incidents/5?x=1"})
    assert row["IncidentWebUrl"] == f"https://security.microsoft.com/incidents/5?x=1&tid={TENANT}"
    kept = request_row({"id": "5", "incidentWebUrl": "https://security.microsoft.com/incidents/5?TID=other"})
    assert kept["IncidentWebUrl"] == "https://security.microsoft.com/incidents/5?TID=other"
    assert "IncidentWebUrl" not in request_row({"id": "5"})
    assert request_row({"id": "5"})["IncidentTitle"] == "Defender XDR incident 5"


def test_mirror_request_entities_are_extracted_and_deduplicated() -> None:
    user = {"@odata.type": "#microsoft.graph.security.userEvidence"}
    incident = {"id": "9", "alerts": [
        {"id": "a1", "evidence": [
            {**user, "userAccount": {"accountName": "bob", "domainName": "CONTOSO", "userPrincipalName": "Bob@x.com"}},
            {**user, "userAccount": {"accountName": "svc", "domainName": "CONTOSO"}},
            {**user, "userAccount": {"accountName": "local"}},
            {"@odata.type": "#microsoft.graph.security.deviceEvidence", "deviceDnsName": "pc1.contoso.com",
             "hostName": "pc1", "lastIpAddress": "10.0.0.5"},
            {"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": "203.0.113.7"},
        ]},
        {"id": "a2", "evidence": [
            {**user, "userAccount": {"userPrincipalName": "bob@x.com"}},          # same account, other case
            {"@odata.type": "#microsoft.graph.security.deviceEvidence", "hostName": "PC1.contoso.com"},
            {"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": "203.0.113.7"},
            "not an object",
        ]},
        "not an alert",
    ]}
    row = request_row(incident)
    assert row["Accounts"] == ["Bob@x.com", "CONTOSO\\svc", "local"]
    assert row["Hosts"] == ["pc1.contoso.com"]
    assert row["IPs"] == ["10.0.0.5", "203.0.113.7"]
    empty = request_row({"id": "9"})
    assert empty["Accounts"] == empty["Hosts"] == empty["IPs"] == []


def test_mirror_request_entities_are_capped_so_the_column_stays_a_list() -> None:
    ips = [{"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": f"10.0.{i // 256}.{i % 256}"}
           for i in range(5000)]
    row = request_row({"id": "3", "alerts": [{"id": "a", "evidence": ips}]})
    assert isinstance(row["IPs"], list) and len(row["IPs"]) == rows.MAX_REQUEST_ENTITIES


def test_mirror_request_values_over_64_kb_are_cut_and_flagged() -> None:
    row = request_row({"id": "4", "displayName": "t" * (FIELD_MAX_BYTES * 2), "description": "d" * 200_000})
    assert row["IncidentTitle"].endswith(TRUNCATION_MARKER)
    assert "IncidentTitle" in row["TruncatedFields"]


def test_mirror_request_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'id'"):
        rows.mirror_request_row({"displayName": "x"}, tenant_id=TENANT, tenant_name="C", request_id=REQUEST_ID,
                                now=READ_AT)
    with pytest.raises(ValueError, match="request_id"):
        rows.mirror_request_row({"id": "1"}, tenant_id=TENANT, tenant_name="C", request_id=" ", now=READ_AT)
    with pytest.raises(TypeError, match="datetime"):
        rows.mirror_request_row({"id": "1"}, tenant_id=TENANT, tenant_name="C", request_id=REQUEST_ID,
                                now="2026-01-01")  # type: ignore[arg-type]


def test_rows_carry_their_one_serialisation_and_drop_it_when_changed() -> None:
    """The sink sends ``Row.wire`` as it is: it must be the row's JSON (valid UTF-8, no NaN), never longer than
    ``json.dumps(row)`` (by which rows are sized), and never stale."""
    from sync.rows import Row, rows_for_incident

    incident = {"id": "7", "lastUpdateDateTime": "2026-01-02T03:04:05.1234567Z", "title": "é \\ud800 x",
                "alerts": [{"id": "da1", "lastUpdateDateTime": "2026-01-02T03:04:05Z",
                            "evidence": [{"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": "1.2.3.4",
                                          "n": float("nan"), "deep": [[[1.5]]]}]}]}
    read_at = datetime.now(UTC)
    built = rows_for_incident(incident, tenant_id="t", tenant_name="n", read_at=read_at)
    for table_rows in built.values():
        for row in table_rows:
            assert isinstance(row, Row) and row.wire is not None
            assert json.loads(row.wire.decode("utf-8")) == row
            assert len(row.wire) <= len(json.dumps(row, allow_nan=False))
    row = built["DefenderEvidence_CL"][0]
    row["Verdict"] = "malicious"
    assert row.wire is None
    big = dict(incident, description="x" * (FIELD_MAX_BYTES + 10))
    row = rows_for_incident(big, tenant_id="t", tenant_name="n", read_at=read_at)["DefenderIncidents_CL"][0]
    assert row.wire is not None and json.loads(row.wire) == row and "Description" in row["TruncatedFields"]


# ---------------------------------------------------------------------------------------------- fast paths


def test_record_id_is_the_uuid5_of_its_parts() -> None:
    import uuid

    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "urn:defender-sentinel-sync:log-analytics:record")
    for parts in [("t", "1", "2026-01-01T00:00:00.0000000Z"), ("a|b", "c"), ("é\U0001f600", "", "0"), ()]:
        assert rows.record_id(*parts) == str(uuid.uuid5(namespace, json.dumps([str(p) for p in parts])))


_ID_PARTS = ["t", "1", "", "a|b", 'q"uote', "back\\slash", "\x7f", "\x1f", "é", "\U0001f600", " x "]


def test_record_ids_of_an_alert_s_evidence_equal_record_id() -> None:
    # The evidence rows' RecordIds hash the shared prefix once; any part that JSON escapes takes json.dumps.
    for prefix in [[], ["t"], *[["tenant", part, "2026-01-01T00:00:00.0000000Z"] for part in _ID_PARTS]]:
        assert rows._record_ids(prefix, _ID_PARTS) == [rows.record_id(*prefix, last) for last in _ID_PARTS]


@given(st.lists(st.text(max_size=8), max_size=4), st.lists(st.text(max_size=8), max_size=3))
def test_property_record_ids_equal_record_id(prefix: list[str], last: list[str]) -> None:
    assert rows._record_ids(prefix, last) == [rows.record_id(*prefix, item) for item in last]


def test_finish_orders_a_raw_dict_given_out_of_schema_order() -> None:
    raw = {"IncidentId": "1", "TimeGenerated": datetime(2026, 1, 2, tzinfo=UTC), "RecordId": "r",
           "DefenderTenantId": "t", "TenantName": "n", "AlertCount": 2, "Description": None}
    ordered = rows._finish("DefenderIncidents_CL", dict(sorted(raw.items())))
    assert list(ordered) == ["TimeGenerated", "RecordId", "DefenderTenantId", "TenantName", "IncidentId",
                             "AlertCount"]
    assert ordered.wire == rows._finish("DefenderIncidents_CL", dict(reversed(raw.items()))).wire
    with pytest.raises(KeyError, match="'Nope'"):
        rows._finish("DefenderIncidents_CL", {**raw, "Nope": 1})


_NESTED: Any = "leaf"
for _ in range(rows.MAX_DYNAMIC_DEPTH + 1):
    _NESTED = [_NESTED]

_EDGE_VALUES: list[Any] = [
    "plain", "é", "\ud800", "x" * 60_001, "é" * 30_001, 0, 2**31, -(2**31) - 1, 2**63, True, 1.5, float("nan"),
    float("inf"), None, "2026-01-02T03:04:05Z", "2026-01-02T03:04:05.123456789Z", "2026-02-30T00:00:00Z",
    "2026-01-02T03:04:05.1+02:00", "0999-01-01T00:00:00Z", " 2026-01-02T03:04:05Z", "2026-01-02t03:04:05z",
    datetime(2026, 1, 2, 3, 4, 5, 6), datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2))),
    {"a": [1, {"b": None}]}, {"a": float("nan")}, {1: "x"}, {"k\ud800": 1}, ["\udfff"], _NESTED, (1, 2), {"t": (1,)},
    {"s": {1, 2}}, "12", "true",
]


@pytest.mark.parametrize("ctype", sorted(rows.COLUMN_TYPES))
def test_fast_converters_agree_with_the_general_coercion(ctype: str) -> None:
    for value in _EDGE_VALUES:
        fast = rows._FAST[ctype](value)
        if fast is not rows._SLOW:
            expected, cut = rows._coerce(ctype, value, sized=False)
            assert not cut and fast == expected and type(fast) is type(expected), (ctype, value)
