"""End to end, issue 7: the ``defender-portal`` mirror target against a unified-portal world, through function_app.py.

Three customer tenants and the MSSP's own tenant (its built-in connector's incidents carry the same small IDs). The
app never creates an incident through the API; it sends request rows; the mirror rule (NRT, advanced by the test,
never slept for) makes one incident per row; the app links each by its alert's link and keeps it current. Duplicates
are closed, closures made in Sentinel reach Defender through the webhook and the reconcile, and a quiet run writes
nothing.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from azure.identity import ManagedIdentityCredential
from azure.monitor.ingestion import LogsIngestionClient
from conftest import apply_settings
from harness import http, run_timer

from emulators.portal import AppClock
from sync.context import get_context
from sync.timeutil import utcnow

RULE_ID = "7c1e5a1e-0000-4000-8000-00000000d0c5"
TENANT_NAMES = ("Contoso", "Fabrikam", "Woodgrove")


class Portal:
    """Three customer tenants plus the MSSP's home tenant, in a unified-portal world with the mirror rule."""

    def __init__(self, emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hub, self.world, self.sentinel = emulators, emulators.world, emulators.sentinel
        self.tenants = [self.world.add_tenant(name=n) for n in TENANT_NAMES]
        self.world.portal.enable()
        self.world.portal.put_rule(RULE_ID)
        self.make_app_settings, self.monkeypatch = make_app_settings, monkeypatch
        self.clock = AppClock()

    def configure(self, **overrides: str) -> dict[str, str]:
        spec = {t: {"name": n} for t, n in zip(self.tenants, TENANT_NAMES, strict=True)}
        settings = self.make_app_settings(self.tenants, SYNC_TENANTS=json.dumps(spec),
                                          SYNC_MIRROR_TARGET="defender-portal", SYNC_MIRROR_RULE_ID=RULE_ID,
                                          **{"SYNC_TIME_BUDGET_SECONDS": "30", **overrides})
        apply_settings(self.monkeypatch, settings)
        ctx = get_context()
        ctx.clock, ctx.sleep = self.clock, self.clock.sleep
        return settings

    def incident(self, tenant: str, incident_id: str, **fields: Any) -> dict[str, Any]:
        doc = {"id": incident_id, "displayName": f"Incident {incident_id} on WS-01", "severity": "high",
               "status": "active", "description": "Suspicious PowerShell",
               "alerts": [{"title": f"Alert of {incident_id}", "severity": "high", "status": "new",
                           "serviceSource": "microsoftDefenderForEndpoint"}]}
        doc.update(fields)
        return self.world.add_incident(tenant, doc)

    def minute(self) -> None:
        """One minute passes: the rule runs over the rows ingested in it; the app's clock moves too."""
        self.world.portal.advance(minutes=1)
        self.clock.sleep(60)

    def mirrors(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every incident of the mirror rule, by the Defender incident its alert links to."""
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for resource in self.sentinel.all_incidents():
            rules = resource["properties"].get("relatedAnalyticRuleIds") or []
            if not any(r.lower().endswith(RULE_ID) for r in rules):
                continue
            for alert in self.world.portal.alerts(resource["name"]):
                link = alert["properties"].get("alertLink") or ""
                if "tid=" in link:
                    tid = link.split("tid=")[1].split("&")[0]
                    out.setdefault((tid, link.split("/incidents/")[1].split("?")[0]), []).append(resource)
        return out

    def linked(self, tenant: str, incident_id: str) -> dict[str, Any]:
        link = get_context().state.get_link(tenant, incident_id)
        assert link is not None and link.get("state") == "active", f"{incident_id} of {tenant} is not linked"
        resource = self.sentinel.get(link["sentinelName"])
        assert resource is not None
        return dict(resource)

    def request_rows(self) -> list[dict[str, Any]]:
        return list(self.world.rows("DefenderMirrorRequests_CL"))


@pytest.fixture
def portal(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Portal:
    return Portal(emulators, make_app_settings, monkeypatch)


def labels(resource: dict[str, Any]) -> set[str]:
    return {lbl["labelName"] for lbl in resource["properties"].get("labels") or []}


def test_every_incident_gets_one_visible_mirror_and_stays_in_sync(portal: Portal) -> None:
    a, b, c = portal.tenants
    portal.incident(a, "1", assignedTo="kai@contoso.com", customTags=["VIP"])
    portal.incident(a, "2", status="resolved", classification="truePositive", determination="malware",
                    severity="medium")
    portal.incident(b, "1", severity="low")             # the same small ID in another tenant
    portal.incident(c, "7", severity="informational")
    # The MSSP's own tenant: its built-in connector mirrors its own incidents, with the same small IDs.
    builtin = {portal.sentinel.seed_xdr_incident(i)["name"] for i in ("1", "2", "7")}
    portal.configure()

    status, body = http("sync_run", body={})
    assert status == 200 and body["mirrorRequests"]["sent"] == 4, body.get("mirrorRequests")
    assert sum(t["mirrorRequested"] for t in body["tenants"]) == 4
    assert {r["name"] for r in portal.sentinel.all_incidents()} == builtin, "nothing is created through the API"
    rows = portal.request_rows()
    assert sorted((r["DefenderTenantId"], r["IncidentId"]) for r in rows) == sorted(
        [(a, "1"), (a, "2"), (b, "1"), (c, "7")])
    assert all(r["RecordId"] == r["RequestId"] and r["SourceKey"] == f"{r['DefenderTenantId']}/{r['IncidentId']}"
               for r in rows)

    portal.minute()                                      # the rule makes one incident per row
    run_timer("defender_pull")                           # the app links and syncs them

    assert portal.world.portal.invisible_incidents() == [], "every incident is visible in the Defender portal"
    assert all(not run.summary and run.rows <= 29 for run in portal.world.portal.runs)
    mirrors = portal.mirrors()
    assert set(mirrors) == {(a, "1"), (a, "2"), (b, "1"), (c, "7")}
    assert all(len(v) == 1 for v in mirrors.values()), "one incident per Defender incident"
    a1 = portal.linked(a, "1")["properties"]
    assert a1["title"] == "Incident 1 on WS-01" and a1["severity"] == "High" and a1["status"] == "New"
    assert labels(portal.linked(a, "1")) == {"VIP", "defender-sync", "tenant:Contoso"}
    assert (a1.get("owner") or {}).get("userPrincipalName") == "kai@contoso.com"
    a2 = portal.linked(a, "2")["properties"]
    assert (a2["status"], a2["classification"]) == ("Closed", "TruePositive"), "resolved when first seen: closed"
    assert portal.linked(b, "1")["properties"]["severity"] == "Low"

    # Quiet: no new request, no Sentinel write, no Graph write.
    portal.sentinel.reset_write_log()
    graph_writes = len(portal.world.graph.writes)
    rows_before = len(portal.request_rows())
    run_timer("defender_pull")
    portal.minute()
    run_timer("defender_pull")
    assert portal.sentinel.writes() == 0 and len(portal.world.graph.writes) == graph_writes
    assert len(portal.request_rows()) == rows_before


def test_closures_in_sentinel_reach_defender_by_webhook_and_by_reconcile(portal: Portal) -> None:
    a, b, _c = portal.tenants
    portal.incident(a, "11")
    portal.incident(b, "12")
    portal.configure()
    run_timer("defender_pull")
    portal.minute()
    run_timer("defender_pull")

    first = portal.linked(a, "11")
    portal.sentinel.analyst_update(first["name"], status="Closed", classification="TruePositive",
                                   classificationReason="SuspiciousActivity", classificationComment="confirmed")
    status, answer = http("sentinel_webhook", body=portal.sentinel.trigger_body(first["name"]),
                          route="sentinel/incidents")
    assert status == 200 and answer["result"] == "applied", answer
    defender = portal.world.get_incident(a, "11")
    assert (defender["status"], defender["classification"]) == ("resolved", "truePositive")

    second = portal.linked(b, "12")
    portal.sentinel.analyst_update(second["name"], status="Closed", classification="FalsePositive",
                                   classificationReason="InaccurateData")
    run_timer("sentinel_reconcile")                      # the webhook was lost: the reconcile catches it
    defender = portal.world.get_incident(b, "12")
    assert (defender["status"], defender["classification"]) == ("resolved", "falsePositive")


def test_a_request_ingested_twice_leaves_one_mirror_and_closes_the_duplicate(portal: Portal,
                                                                              emulators: Any) -> None:
    a = portal.tenants[0]
    portal.incident(a, "21")
    settings = portal.configure()
    run_timer("defender_pull")
    (row,) = portal.request_rows()
    assert emulators.endpoints is not None
    client = LogsIngestionClient(settings["LOGS_INGESTION_ENDPOINT"], ManagedIdentityCredential(),
                                 credential_scopes=["https://monitor.azure.com/.default"])
    client.upload(rule_id=settings["LOGS_DCR_IMMUTABLE_ID"], stream_name="Custom-DefenderMirrorRequests",
                  logs=[{k: v for k, v in row.items() if not k.startswith("_")}])
    portal.minute()
    run_timer("defender_pull")

    (pair,) = portal.mirrors().values()
    assert len(pair) == 2
    kept, duplicate = sorted(pair, key=lambda r: (r["properties"]["createdTimeUtc"], r["properties"]["incidentNumber"]))
    assert portal.linked(a, "21")["name"] == kept["name"], "the earliest created is kept"
    closed = portal.sentinel.get(duplicate["name"])["properties"]
    assert (closed["status"], closed["classification"]) == ("Closed", "Undetermined")
    assert "duplicate" in {lbl["labelName"] for lbl in closed["labels"]}
    texts = [c["properties"]["message"] for c in portal.sentinel.comments(duplicate["name"])]
    assert any(kept["name"] in t and f"#{kept['properties']['incidentNumber']}" in t for t in texts), texts
    status, answer = http("sentinel_webhook", body=portal.sentinel.trigger_body(duplicate["name"]),
                          route="sentinel/incidents")
    assert status == 200 and answer["result"] == "ignored", "the duplicate is not a mirror"


def test_requests_are_paced_in_order_and_a_lost_one_is_sent_again_after_thirty_minutes(portal: Portal) -> None:
    a, b, _c = portal.tenants
    for n in range(30):
        portal.incident(a if n % 2 else b, str(100 + n), severity="high" if n < 5 else "low")
    portal.incident(a, "999", status="resolved", classification="falsePositive", severity="high")
    portal.configure(SYNC_MIRROR_REQUESTS_PER_MINUTE="10")
    status, body = http("sync_run", body={})
    assert status == 200
    assert body["mirrorRequests"]["sent"] == 10 and body["mirrorRequests"]["waiting"] == 21
    rows = portal.request_rows()
    assert {r["IncidentId"] for r in rows} == {str(100 + n) for n in range(5)} | {
        r["IncidentId"] for r in rows if r["Severity"] == "Low"}, "high before low"
    assert "999" not in {r["IncidentId"] for r in rows}, "resolved ones wait behind open ones"
    _status, health = http("sync_status", "GET")
    waiting = {t["tenantId"]: t["mirrorsWaiting"] for t in health["tenants"]}
    assert sum(waiting.values()) >= 21

    portal.world.portal.set_rule_enabled(RULE_ID, False)   # the rule misses these rows: no incident ever comes
    portal.minute()
    portal.world.portal.set_rule_enabled(RULE_ID, True)
    for _ in range(3):
        http("sync_run", body={})
        portal.minute()
    assert len(portal.request_rows()) == 31, "every incident requested once"
    portal.clock.sleep(31 * 60)
    _status, body = http("sync_run", body={})
    assert body["mirrorRequests"]["rerequested"] == 10, "the ten the disabled rule missed are requested again"
    portal.minute()
    for _ in range(3):
        http("sync_run", body={})
        portal.minute()
    http("sync_run", body={})
    mirrors = portal.mirrors()
    assert len(mirrors) == 31 and all(len(v) == 1 for v in mirrors.values())
    assert all(not run.summary for run in portal.world.portal.runs)


def test_rule_incidents_naming_nothing_the_app_requested_are_left_alone(portal: Portal,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A summary alert (a rule run over 30 rows) and an alert whose link names no Defender incident the app knows
    are never linked, never changed, and reported once."""
    a = portal.tenants[0]
    portal.incident(a, "31")
    settings = portal.configure()
    run_timer("defender_pull")
    (row,) = portal.request_rows()
    strangers = [{**{k: v for k, v in row.items() if not k.startswith("_")}, "RequestId": f"r{n}",
                  "RecordId": f"r{n}", "IncidentId": f"9{n:03d}",
                  "IncidentWebUrl": f"https://security.microsoft.com/incidents/9{n:03d}?tid=00000000-0000-0000-0000-"
                                    f"00000000beef"} for n in range(31)]
    client = LogsIngestionClient(settings["LOGS_INGESTION_ENDPOINT"], ManagedIdentityCredential(),
                                 credential_scopes=["https://monitor.azure.com/.default"])
    client.upload(rule_id=settings["LOGS_DCR_IMMUTABLE_ID"], stream_name="Custom-DefenderMirrorRequests",
                  logs=strangers)
    portal.minute()                                    # 32 rows: 29 alerts, a summary alert; 31 come from nowhere
    assert any(run.summary for run in portal.world.portal.runs)
    portal.sentinel.reset_write_log()
    with caplog.at_level("WARNING", logger="sync.targets.defender_portal"):
        run_timer("defender_pull")
        run_timer("defender_pull")
    left_alone = [r for r in caplog.records if "left alone" in r.getMessage()]
    ours = portal.linked(a, "31")["name"]              # our row was ingested first: among the 29
    strangers_made = [r["name"] for r in portal.sentinel.all_incidents() if r["name"] != ours]
    assert len(strangers_made) == 29, "28 strangers' alerts of their own and one summary alert"
    for name in strangers_made:
        assert portal.sentinel.writes(name) == 0, "an incident the app did not ask for is never written"
        assert get_context().state.find_link_by_sentinel_name(name) is None, "and never linked"
    assert len(left_alone) == 29, "each is reported once, not on every run"
    assert portal.sentinel.get(ours)["properties"]["title"] == "Incident 31 on WS-01"


def test_a_disabled_rule_holds_the_requests_and_is_reported_not_retried_in_a_loop(portal: Portal) -> None:
    a = portal.tenants[0]
    portal.incident(a, "41")
    portal.incident(a, "42")
    portal.world.portal.set_rule_enabled(RULE_ID, False)
    portal.configure()
    rule_reads = len([r for r in portal.hub.log.entries() if "/alertRules/" in r.path])
    for _ in range(3):
        status, body = http("sync_run", body={})
        assert status == 200 and body["mirrorRequests"]["sent"] == 0 and body["mirrorRequests"]["rule"] == "disabled"
    assert portal.request_rows() == [], "no row is sent that no rule would turn into an incident"
    assert len([r for r in portal.hub.log.entries() if "/alertRules/" in r.path]) - rule_reads == 1, \
        "the rule is read once per five minutes, not on every run"
    _status, health = http("sync_status", "GET")
    assert health["mirrorRule"]["state"] == "disabled" and health["healthy"] is False
    assert {t["tenantId"]: t["mirrorRequestsWaiting"] for t in health["tenants"]}[a] == 2
    portal.world.portal.set_rule_enabled(RULE_ID, True)
    portal.clock.sleep(301)                                  # the next look at the rule
    _status, body = http("sync_run", body={})
    assert body["mirrorRequests"]["sent"] == 2 and body["mirrorRequests"]["rule"] == "ok"
    portal.minute()
    run_timer("defender_pull")
    assert portal.linked(a, "41") and portal.linked(a, "42")
    _status, health = http("sync_status", "GET")
    assert health["mirrorRule"]["state"] == "ok" and health["tenants"][0]["mirrorsWaiting"] == 0


def test_an_analysts_closure_before_the_link_reaches_defender(portal: Portal) -> None:
    """The mirror is in the Defender portal's queue from the rule's run on; an analyst may take and close it before
    the app's next run links it. That closure is a Sentinel change, never overwritten by the first sync."""
    a = portal.tenants[0]
    portal.incident(a, "51")
    portal.configure()
    run_timer("defender_pull")
    portal.minute()
    (pair,) = portal.mirrors().values()
    portal.sentinel.analyst_update(pair[0]["name"], status="Closed", classification="TruePositive",
                                   classificationReason="SuspiciousActivity", owner="lead@mssp.example")
    run_timer("defender_pull")
    mirror = portal.linked(a, "51")["properties"]
    assert (mirror["status"], mirror["classification"]) == ("Closed", "TruePositive")
    defender = portal.world.get_incident(a, "51")
    assert (defender["status"], defender["classification"]) == ("resolved", "truePositive")
    assert (defender.get("assignedTo") or "").lower() == "lead@mssp.example"


def test_with_the_workspaces_own_tenant_synced_a_mirror_is_never_mirrored_again(
        emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a unified-portal workspace every mirror the rule makes is also a Defender incident of the workspace's own
    tenant (its ``providerIncidentId``, a link without ``tid``). An MSSP that syncs its own tenant too must not get a
    mirror of that mirror, then of that one, without end."""
    portal = Portal(emulators, make_app_settings, monkeypatch)
    home = emulators.world.home_tenant_id
    a = portal.tenants[0]
    portal.tenants.append(home)
    portal.incident(a, "61")
    spec = {t: {"name": n} for t, n in zip(portal.tenants, [*TENANT_NAMES, "MSSP"], strict=True)}
    settings = make_app_settings(portal.tenants, SYNC_TENANTS=json.dumps(spec), SYNC_MIRROR_TARGET="defender-portal",
                                 SYNC_MIRROR_RULE_ID=RULE_ID, SYNC_TIME_BUDGET_SECONDS="30")
    apply_settings(monkeypatch, settings)
    ctx = get_context()
    ctx.clock, ctx.sleep = portal.clock, portal.clock.sleep
    run_timer("defender_pull")
    portal.minute()
    run_timer("defender_pull")
    mirror = portal.linked(a, "61")
    # The unified portal shows the mirror as the home tenant's Defender incident with the mirror's number.
    number = str(mirror["properties"]["providerIncidentId"])
    seen = (utcnow() - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # the rule's clock ran ahead
    portal.incident(home, number, displayName=mirror["properties"]["title"], createdDateTime=seen,
                    lastUpdateDateTime=seen)
    rows = len(portal.request_rows())
    _status, body = http("sync_run", body={})
    assert len(portal.request_rows()) == rows, "no request for the home tenant's copy of a mirror"
    assert body["mirrorRequests"]["sent"] == 0
    assert [t["incidents"] for t in body["tenants"] if t["tenantId"] == home] == [1], "the home tenant was read"
    portal.minute()
    run_timer("defender_pull")
    assert len(portal.mirrors()) == 1 and len(portal.sentinel.all_incidents()) == 1
