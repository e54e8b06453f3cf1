"""The unified-portal world of the emulators: mirror request rows go in through the real Logs Ingestion client, the
test advances the rule's clock, and incidents and their alerts come out of the real ARM routes."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from azure.identity import ManagedIdentityCredential

from emulators.hub import EmulatorHub
from emulators.portal import PREVIEW_API_VERSION, mirror_rule_properties
from emulators.sentinel import API_VERSION, format_ticks, parse_ticks
from sync.rows import mirror_request_row

RULE_ID = "5f1d3c2b-7a6e-4d1c-9b8a-0e1f2a3b4c5d"
TENANT = "7f1c6d1e-0000-4000-8000-0000000000aa"
STREAM = "Custom-DefenderMirrorRequests"


@pytest.fixture
def portal(emulators: EmulatorHub, managed_identity_env: dict[str, str]) -> EmulatorHub:
    """The reset hub in unified-portal mode with the mirror rule deployed and enabled."""
    if emulators.sentinel is None:
        pytest.skip("emulators.sentinel is not available")
    emulators.world.portal.enable()
    emulators.world.portal.put_rule(RULE_ID)
    return emulators


def request_row(incident_id: str, *, request_id: str | None = None, severity: str = "high") -> dict[str, Any]:
    incident = {
        "id": incident_id, "displayName": f"Ransomware on host {incident_id}", "severity": severity,
        "description": "Files encrypted.",
        "incidentWebUrl": f"https://security.microsoft.com/incidents/{incident_id}?tid={TENANT}",
        "alerts": [{"id": f"a{incident_id}", "evidence": [
            {"@odata.type": "#microsoft.graph.security.userEvidence",
             "userAccount": {"userPrincipalName": f"user{incident_id}@contoso.com"}},
            {"@odata.type": "#microsoft.graph.security.deviceEvidence", "deviceDnsName": "pc1.contoso.com"},
            {"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": "203.0.113.7"}]}],
    }
    return mirror_request_row(incident, tenant_id=TENANT, tenant_name="Contoso",
                              request_id=request_id or str(uuid.uuid4()), now=datetime.now(UTC))


def ingest(hub: EmulatorHub, rows: list[dict[str, Any]]) -> None:
    """Upload through the real azure-monitor-ingestion client, as the app does."""
    from azure.monitor.ingestion import LogsIngestionClient

    assert hub.endpoints is not None
    client = LogsIngestionClient(hub.endpoints.ingestion, ManagedIdentityCredential(), retry_total=0)
    client.upload(hub.endpoints.dcr_immutable_id, STREAM, rows)


def arm(hub: EmulatorHub, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
        api_version: str = API_VERSION) -> requests.Response:
    assert hub.endpoints is not None and hub.endpoints.arm is not None
    token = ManagedIdentityCredential().get_token(f"{hub.endpoints.arm}/.default").token
    url = f"{hub.endpoints.arm}{hub.endpoints.sentinel_workspace_id}/providers/Microsoft.SecurityInsights/{path}"
    return requests.request(method, url, json=body, params={"api-version": api_version, **(params or {})},
                            headers={"Authorization": f"Bearer {token}"}, timeout=30)


def incidents(hub: EmulatorHub, **params: str) -> list[dict[str, Any]]:
    response = arm(hub, "GET", "incidents", params={"$top": "1000", **params})
    assert response.status_code == 200, response.text
    return list(response.json()["value"])


def alerts_of(hub: EmulatorHub, name: str) -> list[dict[str, Any]]:
    response = arm(hub, "POST", f"incidents/{name}/alerts")
    assert response.status_code == 200, response.text
    return list(response.json()["value"])


def rule_resource_id(hub: EmulatorHub) -> str:
    assert hub.endpoints is not None
    return f"{hub.endpoints.sentinel_workspace_id}/providers/Microsoft.SecurityInsights/alertRules/{RULE_ID}"


# ---------------------------------------------------------------------------------------------------------------


def test_each_request_row_becomes_one_incident_with_its_alert(portal: EmulatorHub) -> None:
    rows = [request_row("101"), request_row("102", severity="low"), request_row("103", severity="informational")]
    ingest(portal, rows)
    assert portal.world.portal.run_rules()[0].rows == 3        # a run now sees what was ingested

    assert [len(r.incidents) for r in portal.world.portal.advance(minutes=1)] == [0]   # nothing new since
    found = sorted(incidents(portal), key=lambda i: i["properties"]["incidentNumber"])
    assert len(found) == 3
    for row, incident in zip(rows, found, strict=True):
        p = incident["properties"]
        assert p["providerName"] == "Microsoft XDR"
        assert p["relatedAnalyticRuleIds"] == [rule_resource_id(portal)]
        assert p["title"] == row["IncidentTitle"] and p["severity"] == row["Severity"]
        assert p["description"] == row["Description"] and p["status"] == "New"
        assert portal.world.portal.is_visible(incident["name"])
        (alert,) = alerts_of(portal, incident["name"])
        assert alert["kind"] == "SecurityAlert" and alert["type"] == "Microsoft.SecurityInsights/Entities"
        ap = alert["properties"]
        assert ap["alertLink"] == row["IncidentWebUrl"]
        assert ap["alertDisplayName"] == row["IncidentTitle"] and ap["severity"] == row["Severity"]
        for key in ("systemAlertId", "alertType", "friendlyName", "status", "productName", "providerAlertId",
                    "timeGenerated", "startTimeUtc", "endTimeUtc", "resourceIdentifiers"):
            assert key in ap, key
        details = json.loads(ap["additionalData"]["Custom Details"])
        assert details == {"SourceKey": [f"{TENANT}/{row['IncidentId']}"], "DefenderTenantId": [TENANT],
                           "IncidentId": [row["IncidentId"]]}
        entities = portal.world.portal.entities(incident["name"])
        assert {"kind": "Account", "properties": {"FullName": row["Accounts"][0]}} in entities
        assert {"kind": "Host", "properties": {"FullName": "pc1.contoso.com"}} in entities
        assert {"kind": "IP", "properties": {"Address": "203.0.113.7"}} in entities


def test_a_run_stamps_its_incidents_with_the_run_time_and_filters_find_them(portal: EmulatorHub) -> None:
    ingest(portal, [request_row("1")])
    (first,) = portal.world.portal.advance(minutes=1)
    ingest(portal, [request_row("2"), request_row("3")])
    (second,) = portal.world.portal.advance(minutes=1)
    assert (first.rows, second.rows) == (1, 2)
    assert second.at - first.at >= 60 * 10_000_000              # one rule minute apart, no sleeping

    created = {i["name"]: parse_ticks(i["properties"]["createdTimeUtc"]) for i in incidents(portal)}
    assert all(0 <= created[name] - first.at < 10_000 for name in first.incidents)
    since = format_ticks(second.at)
    later = incidents(portal, **{"$filter": f"properties/createdTimeUtc ge {since}",
                                 "$orderby": "properties/createdTimeUtc asc"})
    assert [i["name"] for i in later] == second.incidents
    window = incidents(portal, **{"$filter": f"properties/createdTimeUtc gt {format_ticks(first.at - 1)} and "
                                             f"properties/createdTimeUtc lt {since}"})
    assert [i["name"] for i in window] == first.incidents
    newest_first = incidents(portal, **{"$orderby": "properties/createdTimeUtc desc"})
    assert [i["name"] for i in newest_first] == [*reversed(second.incidents), *first.incidents]


@pytest.mark.parametrize(("count", "own", "summary"), [(30, 30, False), (31, 29, True), (45, 29, True)])
def test_a_run_over_more_than_30_rows_makes_29_alerts_and_a_summary(portal: EmulatorHub, count: int, own: int,
                                                                    summary: bool) -> None:
    ingest(portal, [request_row(str(500 + i)) for i in range(count)])
    (run,) = portal.world.portal.advance(minutes=1)
    assert (run.rows, run.alerts, run.summary) == (count, own + summary, summary)
    linked = [alerts_of(portal, name)[0]["properties"] for name in run.incidents]
    assert sum("alertLink" in a for a in linked) == own
    assert [a["alertLink"] for a in linked[:own]] == [
        f"https://security.microsoft.com/incidents/{500 + i}?tid={TENANT}" for i in range(own)]
    if summary:
        last = portal.sentinel.get(run.incidents[-1])
        assert last["properties"]["title"] == mirror_rule_properties()["displayName"]
        assert last["properties"]["relatedAnalyticRuleIds"] == [rule_resource_id(portal)]
        assert "Custom Details" not in linked[-1]["additionalData"]


def test_a_disabled_rule_does_not_run(portal: EmulatorHub) -> None:
    portal.world.portal.set_rule_enabled(RULE_ID, False)
    ingest(portal, [request_row("7")])
    assert portal.world.portal.advance(minutes=3) == []
    assert incidents(portal) == []
    # Enabled again, it starts from then: the earlier row stays unanswered (the app re-requests it).
    portal.world.portal.set_rule_enabled(RULE_ID, True)
    assert [r.rows for r in portal.world.portal.advance(minutes=1)] == [0]
    ingest(portal, [request_row("7")])
    assert [r.rows for r in portal.world.portal.advance(minutes=1)] == [1]


def test_a_row_ingested_twice_makes_two_incidents_and_closed_ones_stay_closed(portal: EmulatorHub) -> None:
    row = request_row("42")
    ingest(portal, [row])
    ingest(portal, [row])
    (run,) = portal.world.portal.advance(minutes=1)
    assert run.rows == 2 and len(run.incidents) == 2
    links = {alerts_of(portal, name)[0]["properties"]["alertLink"] for name in run.incidents}
    assert links == {row["IncidentWebUrl"]}

    portal.sentinel.analyst_update(run.incidents[0], status="Closed", classification="Undetermined")
    ingest(portal, [request_row("42")])
    (again,) = portal.world.portal.advance(minutes=1)
    assert len(again.incidents) == 1 and again.incidents[0] not in run.incidents
    assert portal.sentinel.get(run.incidents[0])["properties"]["status"] == "Closed"


def test_incidents_created_through_the_api_are_invisible_in_portal_mode(portal: EmulatorHub) -> None:
    body = {"properties": {"title": "Made by the API", "severity": "High", "status": "New"}}
    created = arm(portal, "PUT", "incidents/api-made", body=body)
    assert created.status_code == 201, created.text
    assert created.json()["properties"]["providerName"] == "Microsoft XDR"
    assert "visible" not in json.dumps(created.json())            # not an ARM property
    assert not portal.world.portal.is_visible("api-made")
    assert portal.world.portal.invisible_incidents() == ["api-made"]
    # An update keeps it invisible; an analyst-less world (portal mode off) shows new API incidents again.
    assert arm(portal, "PUT", "incidents/api-made", body=body).status_code == 200
    assert not portal.world.portal.is_visible("api-made")
    portal.world.portal.enable(False)
    assert arm(portal, "PUT", "incidents/classic", body=body).json()["properties"]["providerName"] == "Azure Sentinel"
    assert portal.world.portal.is_visible("classic")
    with pytest.raises(KeyError):
        portal.world.portal.is_visible("nope")


def test_alert_rules_api(portal: EmulatorHub) -> None:
    token = ManagedIdentityCredential().get_token(f"{portal.endpoints.arm}/.default").token  # type: ignore[union-attr]
    oid = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["oid"]
    responder_put = arm(portal, "PUT", "alertRules/other", body={"kind": "Scheduled", "properties": {}})
    assert responder_put.status_code == 403, "Sentinel Responder (the app's role) may not write analytics rules"
    portal.sentinel.permissions.assign(oid, ["Microsoft.SecurityInsights/*",
                                             "Microsoft.OperationalInsights/workspaces/read"])
    got = arm(portal, "GET", f"alertRules/{RULE_ID}")
    assert got.status_code == 200 and got.json()["kind"] == "NRT"
    assert got.json()["id"] == rule_resource_id(portal) and got.json()["properties"]["enabled"] is True
    assert arm(portal, "GET", "alertRules/missing").status_code == 404

    nrt = {"kind": "NRT", "properties": {**mirror_rule_properties(), "enabled": False}}
    refused = arm(portal, "PUT", "alertRules/other", body=nrt)
    assert refused.status_code == 400 and PREVIEW_API_VERSION in refused.json()["error"]["message"]
    assert arm(portal, "GET", "alertRules/other").status_code == 404
    assert arm(portal, "PUT", "alertRules/other", body=nrt, api_version=PREVIEW_API_VERSION).status_code == 201
    assert arm(portal, "PUT", "alertRules/other", body=nrt, api_version=PREVIEW_API_VERSION).status_code == 200
    assert arm(portal, "GET", "alertRules/other").json()["properties"]["enabled"] is False

    scheduled = {"kind": "Scheduled", "properties": {**mirror_rule_properties(), "queryFrequency": "PT5M"}}
    assert arm(portal, "PUT", "alertRules/sched", body=scheduled).status_code == 201
    for bad in ({"kind": "Fusion", "properties": {}}, {"kind": "NRT", "properties": {"displayName": "x"}},
                {"kind": "NRT", "properties": {**mirror_rule_properties(), "severity": "Critical"}}, [1]):
        response = arm(portal, "PUT", "alertRules/bad", body=bad, api_version=PREVIEW_API_VERSION)
        assert response.status_code == 400, bad
        assert response.json()["error"]["message"]
    assert arm(portal, "GET", "alertRules/bad").status_code == 404
    assert arm(portal, "DELETE", f"alertRules/{RULE_ID}").status_code == 405
    assert arm(portal, "GET", f"alertRules/{RULE_ID}", api_version="2019-01-01-preview").status_code == 400

    # A Scheduled rule is not the NRT model's: only the NRT rule runs over the requests.
    ingest(portal, [request_row("9")])
    assert [r.rule_id for r in portal.world.portal.advance(minutes=1)] == [RULE_ID]


def test_the_portal_control_api_over_http(portal: EmulatorHub) -> None:
    assert portal.endpoints is not None
    base = f"{portal.endpoints.arm}/_control/sentinel/portal"

    def control(op: str, **args: Any) -> Any:
        response = requests.post(base, json={"op": op, "args": args}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["result"]

    ingest(portal, [request_row("77")])
    (run,) = control("advance", minutes=1)
    assert run["rows"] == 1 and control("is_visible", incident_name=run["incidents"][0]) is True
    assert control("alerts", incident_name=run["incidents"][0])[0]["properties"]["alertLink"]
    assert control("rule", rule_id=RULE_ID)["kind"] == "NRT"
    assert len(control("runs")) == 1
    response = requests.post(base, json={"op": "bogus", "args": {}}, timeout=30)
    assert response.status_code == 404 and "unknown portal operation" in response.text


def test_a_reset_brings_the_advanced_clock_back_to_real_time(portal: EmulatorHub) -> None:
    """Rule minutes advanced in one test must not put the next test's Graph and Sentinel times in the future."""
    portal.world.portal.advance(minutes=30)
    real = int(datetime.now(UTC).timestamp() * 10_000_000)
    assert parse_ticks(portal.world.clock.now()) - real >= 30 * 60 * 10_000_000
    portal.reset()
    assert abs(parse_ticks(portal.world.clock.now()) - real) < 60 * 10_000_000
