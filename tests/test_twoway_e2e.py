"""End to end, issue 3: Defender XDR ⇄ Sentinel two-way incident sync, driven only through function_app.py.

Mirror (defender_pull), push back (sentinel_webhook, as the Logic App forwards ``@triggerBody()``), reconcile
(sentinel_reconcile timer, sync_run direction reconcile) against the Graph and Sentinel emulators and Azurite.
Every write either side receives is counted: a quiet system makes none, a replayed webhook makes none, and every
rejected webhook leaves both sides exactly as they were.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import pytest
from azure.storage.queue import QueueClient, TextBase64DecodePolicy
from conftest import apply_settings
from harness import http, run_queue, run_timer

from emulators.base import Fault
from sync.context import get_context
from sync.targets.sentinel_api import SentinelTarget
from sync.timeutil import format_time, utcnow

CONTOSO, FABRIKAM = "Contoso", "Fabrikam"


# ------------------------------------------------------------------------------------------------------- helpers


def sentinel_name(tenant_id: str, incident_id: str) -> str:
    """The deterministic Sentinel incident name the app must use (uuid5 of tenant + incident ID)."""
    return SentinelTarget(None).name_for(tenant_id, incident_id)  # type: ignore[arg-type]


def labels(resource: dict[str, Any]) -> set[str]:
    return {lbl["labelName"] for lbl in resource["properties"].get("labels") or []}


def owner_upn(resource: dict[str, Any]) -> str | None:
    owner = resource["properties"].get("owner") or {}
    return owner.get("userPrincipalName") or owner.get("email")


def messages(sentinel: Any, name: str) -> list[str]:
    return [c["properties"]["message"] for c in sentinel.comments(name)]


def defender_comments(world: Any, tenant: str, incident_id: str) -> list[str]:
    return [c["comment"] for c in world.get_incident(tenant, incident_id)["comments"]]


def alert(title: str, severity: str = "high", **extra: Any) -> dict[str, Any]:
    return {"title": title, "severity": severity, "status": "new", "serviceSource": "microsoftDefenderForEndpoint",
            "firstActivityDateTime": "2026-11-20T08:00:00Z", "lastActivityDateTime": "2026-11-20T09:00:00Z",
            **extra}


def comment(text: str, who: str = "Jane Analyst", at: str = "2026-11-20T09:30:00.1234567Z") -> dict[str, Any]:
    return {"@odata.type": "#microsoft.graph.security.alertComment", "comment": text, "createdByDisplayName": who,
            "createdDateTime": at}


class Writes:
    """Counts the writes both sides received since :meth:`mark`."""

    def __init__(self, world: Any, sentinel: Any) -> None:
        self.world, self.sentinel = world, sentinel
        self.mark()

    def mark(self) -> None:
        self.graph_base = len(self.world.graph.writes)
        self.sentinel.reset_write_log()

    @property
    def graph(self) -> list[Any]:
        return list(self.world.graph.writes[self.graph_base:])

    @property
    def sentinel_count(self) -> int:
        return self.sentinel.writes()

    def assert_none(self, what: str) -> None:
        assert not self.graph, f"{what}: Graph received {[(w.kind, w.body) for w in self.graph]}"
        assert self.sentinel_count == 0, f"{what}: Sentinel received {self.sentinel.write_counts()} writes"


class Env:
    """Two tenants with hand-made incidents, the settings applied, and helpers to play both sides."""

    def __init__(self, emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hub = emulators
        self.world = emulators.world
        self.sentinel = emulators.sentinel
        self.monkeypatch = monkeypatch
        self.make_app_settings = make_app_settings
        self.a = self.world.add_tenant(name=CONTOSO)
        self.b = self.world.add_tenant(name=FABRIKAM)
        self.writes = Writes(self.world, self.sentinel)

    def configure(self, tenants: dict[str, dict[str, Any]] | None = None, **overrides: str) -> dict[str, str]:
        spec = {self.a: {"name": CONTOSO}, self.b: {"name": FABRIKAM}}
        for tid, extra in (tenants or {}).items():
            spec[tid] = {**spec[tid], **extra}
        settings = self.make_app_settings([self.a, self.b], SYNC_TENANTS=json.dumps(spec), **overrides)
        apply_settings(self.monkeypatch, settings)
        return settings

    def reconfigure(self, settings: dict[str, str], **changes: str) -> None:
        apply_settings(self.monkeypatch, {**settings, **changes})

    def incident(self, tenant: str, incident_id: str, **fields: Any) -> dict[str, Any]:
        doc = {"id": incident_id, "displayName": f"Incident {incident_id} <b>on</b> WS-01", "severity": "high",
               "status": "active", "description": "Suspicious PowerShell", "alerts": [alert(f"Alert of {incident_id}")]}
        doc.update(fields)
        return self.world.add_incident(tenant, doc)

    def name(self, tenant: str, incident_id: str) -> str:
        return sentinel_name(tenant, incident_id)

    def get(self, tenant: str, incident_id: str) -> dict[str, Any]:
        resource = self.sentinel.get(self.name(tenant, incident_id))
        assert resource is not None, f"incident {incident_id} of {tenant} has no Sentinel incident"
        return resource

    def defender(self, tenant: str, incident_id: str) -> dict[str, Any]:
        return self.world.get_incident(tenant, incident_id)

    def webhook(self, tenant: str, incident_id: str) -> tuple[int, Any]:
        """Deliver the webhook as the Logic App would: POST the trigger body to sentinel_webhook."""
        return http("sentinel_webhook", body=self.sentinel.trigger_body(self.name(tenant, incident_id)),
                    route="sentinel/incidents")

    def analyst(self, tenant: str, incident_id: str, **changes: Any) -> dict[str, Any]:
        return self.sentinel.analyst_update(self.name(tenant, incident_id), **changes)

    def add_labels(self, tenant: str, incident_id: str, *names: str) -> None:
        current = [lbl for lbl in self.get(tenant, incident_id)["properties"]["labels"]]
        self.analyst(tenant, incident_id, labels=current + [{"labelName": n} for n in names])

    def assert_quiet(self, what: str) -> None:
        """A pull and a reconcile after everything settled write nothing on either side."""
        self.writes.mark()
        run_timer("defender_pull")
        http("sync_run", body={"direction": "reconcile"})
        self.writes.assert_none(what)

    def remove_labels(self, tenant: str, incident_id: str, *names: str) -> None:
        current = [lbl for lbl in self.get(tenant, incident_id)["properties"]["labels"]
                   if lbl["labelName"] not in names]
        self.analyst(tenant, incident_id, labels=current)


@pytest.fixture
def env(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(emulators, make_app_settings, monkeypatch)


def pulled(env: Env, tenants: dict[str, dict[str, Any]] | None = None, **overrides: str) -> dict[str, str]:
    settings = env.configure(tenants, **overrides)
    run_timer("defender_pull")
    env.writes.mark()
    return settings


# ------------------------------------------------------------------------------------------------------- mirror


def test_mirror_one_incident_each_with_mapped_fields_and_comments_once(env: Env) -> None:
    a, b = env.a, env.b
    env.incident(a, "101", assignedTo="Kai.C@contoso.com", customTags=["VIP", "Finance"],
                 comments=[comment("first look <script>alert(1)</script>"), comment("second", "Bob",
                                                                                  "2026-11-20T10:00:00Z")],
                 alerts=[alert("Ransomware <img src=x> detected"), alert("Credential theft", "medium")])
    env.incident(a, "102", status="resolved", classification="truePositive", determination="phishing",
                 severity="low", resolvingComment="Phish confirmed")
    env.incident(a, "103", status="inProgress", severity="informational", classification="falsePositive",
                 determination="notMalicious")
    env.incident(b, "101", severity="unknown", status="resolved", classification="informationalExpectedActivity",
                 determination="securityTesting", customTags=["pentest"])
    env.configure()
    run_timer("defender_pull")

    s = env.sentinel
    assert len(s.all_incidents()) == 4, "one Sentinel incident per Defender incident (IDs repeat across tenants)"
    i101 = env.get(a, "101")
    p = i101["properties"]
    assert p["title"] == "Incident 101 <b>on</b> WS-01"
    assert p["severity"] == "High" and p["status"] == "New" and p.get("classification") is None
    assert "https://security.microsoft.com/incidents/101" in p["description"]
    assert "Ransomware <img src=x> detected" in p["description"] and "Credential theft" in p["description"]
    assert owner_upn(i101) == "kai.c@contoso.com"
    assert labels(i101) == {"VIP", "Finance", "defender-sync", f"tenant:{CONTOSO}"}
    texts = messages(s, env.name(a, "101"))
    assert len(texts) == 2
    assert any("<script>alert(1)</script>" in t and "Jane Analyst" in t for t in texts), texts
    assert all(t.startswith("[Synced from Defender XDR") for t in texts)

    i102 = env.get(a, "102")["properties"]
    assert (i102["status"], i102["classification"], i102["classificationReason"], i102["severity"]) == \
        ("Closed", "TruePositive", "SuspiciousActivity", "Low")
    assert {lbl["labelName"] for lbl in i102["labels"]} == {"defender-sync", f"tenant:{CONTOSO}",
                                                            "determination:phishing"}
    i103 = env.get(a, "103")["properties"]
    assert (i103["status"], i103.get("classification"), i103["severity"]) == ("Active", None, "Informational")
    b101 = env.get(b, "101")
    assert (b101["properties"]["status"], b101["properties"]["classification"],
            b101["properties"]["classificationReason"]) == ("Closed", "BenignPositive", "SuspiciousButExpected")
    assert labels(b101) == {"pentest", "defender-sync", f"tenant:{FABRIKAM}", "determination:securityTesting"}
    assert b101["properties"]["severity"] == "Informational"
    assert env.name(a, "101") != env.name(b, "101")

    # Quiet system: a second pull writes nothing anywhere.
    env.writes.mark()
    run_timer("defender_pull")
    env.writes.assert_none("second pull")
    # A Defender change of a field the app does not sync writes nothing; a synced one is one Sentinel write.
    env.world.update_incident(a, "101", priorityScore=80)
    run_timer("defender_pull")
    env.writes.assert_none("unsynced Defender field")
    env.world.update_incident(a, "101", assignedTo="tier2@contoso.com")
    run_timer("defender_pull")
    assert s.write_counts() == {env.name(a, "101"): 1} and not env.writes.graph
    assert owner_upn(env.get(a, "101")) == "tier2@contoso.com"
    assert len(messages(s, env.name(a, "101"))) == 2, "existing comments are copied once"


def test_defender_edits_and_new_comments_flow_to_sentinel_and_analyst_edits_of_defender_fields_are_put_back(
        env: Env) -> None:
    a = env.a
    env.incident(a, "201", severity="medium")
    pulled(env)
    env.analyst(a, "201", title="Analyst renamed it", severity="Low")
    run_timer("defender_pull")
    assert env.get(a, "201")["properties"]["title"] == "Analyst renamed it", "no write is made without a change"
    env.world.update_incident(a, "201", severity="high",
                              comments=[comment("new evidence found", "SOC", "2026-11-21T00:00:00Z")])
    run_timer("defender_pull")
    p = env.get(a, "201")["properties"]
    assert p["title"] == "Incident 201 <b>on</b> WS-01" and p["severity"] == "High", "Defender owns these fields"
    assert len(messages(env.sentinel, env.name(a, "201"))) == 1
    assert not env.writes.graph


def test_redirected_incident_closes_its_mirror_as_undetermined_with_a_link(env: Env) -> None:
    a = env.a
    env.incident(a, "301")
    env.incident(a, "302")
    pulled(env)
    env.world.redirect_incident(a, "301", "302")
    run_timer("defender_pull")
    loser = env.get(a, "301")
    p = loser["properties"]
    assert p["status"] == "Closed" and p["classification"] == "Undetermined"
    assert "redirected" in labels(loser)
    texts = messages(env.sentinel, env.name(a, "301"))
    assert len(texts) == 1 and "302" in texts[0] and env.name(a, "302") in texts[0]
    assert env.get(a, "302")["properties"]["status"] == "New"
    assert not env.writes.graph, "a redirected incident is terminal in Defender: nothing is written back"
    # Analyst reopens the losing mirror: Defender is not touched (redirected is terminal) and the mirror is put back.
    env.analyst(a, "301", status="Active")
    status, _ = env.webhook(a, "301")
    assert status == 200 and not env.writes.graph
    assert env.get(a, "301")["properties"]["status"] == "Closed"
    env.assert_quiet("redirected incident at rest")
    assert len(messages(env.sentinel, env.name(a, "301"))) == 1


def test_builtin_connector_incidents_are_left_alone_and_said_once_per_tenant(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    a, b = env.a, env.b
    for incident_id in ("401", "402", "403"):
        env.incident(a, incident_id)
    env.incident(b, "401")
    builtin = [env.sentinel.seed_xdr_incident(i, tenant_id=a) for i in ("401", "402")]
    caplog.set_level(logging.INFO)
    env.configure()
    run_timer("defender_pull")
    names = {r["name"] for r in env.sentinel.all_incidents()}
    assert env.name(a, "401") not in names and env.name(a, "402") not in names
    assert env.name(a, "403") in names and env.name(b, "401") in names, "the link names tenant a: b is the app's"
    notes = [r for r in caplog.records if getattr(r, "outcome", None) == "builtin-connector"]
    assert [getattr(r, "tenantId", None) for r in notes] == [a], "said once, for the tenant the connector serves"
    # Nothing is pushed back from (or written to) the connector's incidents.
    for resource in builtin:
        env.sentinel.analyst_update(resource["name"], status="Closed", classification="FalsePositive",
                                    classification_reason="InaccurateData")
        status, body = http("sentinel_webhook", body=env.sentinel.trigger_body(resource["name"]),
                            route="sentinel/incidents")
        assert status == 200 and body["result"] == "ignored"
    env.writes.mark()
    caplog.clear()
    run_timer("defender_pull")
    env.world.update_incident(a, "401", status="inProgress")
    run_timer("defender_pull")
    http("sync_run", body={"direction": "reconcile"})
    assert not env.writes.graph
    assert set(env.sentinel.write_counts()) <= {env.name(a, "403"), env.name(b, "401")}
    assert not [r for r in caplog.records if getattr(r, "outcome", None) == "builtin-connector"], "said once"
    assert env.defender(a, "401")["status"] == "inProgress"


@pytest.mark.parametrize("lenient", [False, True], ids=["filtering-service", "service-ignoring-filter"])
def test_an_mssp_home_tenants_builtin_mirrors_never_claim_a_customers_incidents_with_the_same_ids(
        env: Env, lenient: bool) -> None:
    home, a = env.hub.world.home_tenant_id, env.a
    ids = [str(n) for n in range(1, 6)]
    # The built-in connector mirrors the MSSP's own Defender incidents 1..5 (its links carry no tid).
    for incident_id in ids:
        env.sentinel.seed_xdr_incident(incident_id)
        env.incident(a, incident_id)
    env.sentinel.seed_xdr_incident("3", tenant_id=a)   # a customer-tenant link claims 3 of tenant a only
    env.sentinel.seed_xdr_incident("40", tenant_id=a)
    env.configure()
    if lenient:
        env.sentinel.ignore_provider_filter = True
    run_timer("defender_pull")
    names = {r["name"] for r in env.sentinel.all_incidents()}
    mirrored = {i for i in ids if env.name(a, i) in names}
    assert mirrored == set(ids) - {"3"}, "the home tenant's built-in incidents must not hide the customer's"
    assert home != a


def test_deleted_sentinel_incident_is_not_recreated_and_a_gone_defender_incident_ends_its_link(env: Env) -> None:
    a = env.a
    env.incident(a, "501")
    env.incident(a, "502")
    pulled(env)
    env.sentinel.analyst_delete(env.name(a, "501"))
    env.world.update_incident(a, "501", status="inProgress", assignedTo="x@contoso.com")
    run_timer("defender_pull")
    assert env.sentinel.get(env.name(a, "501")) is None, "a deleted Sentinel incident is not recreated"
    env.world.update_incident(a, "501", severity="low")
    run_timer("defender_pull")
    http("sync_run", body={"direction": "reconcile"})
    assert env.sentinel.get(env.name(a, "501")) is None and env.sentinel.writes() == 0
    assert not env.writes.graph

    env.world.delete_incident(a, "502")
    env.analyst(a, "502", status="Active", owner="someone@mssp.example")
    status, body = env.webhook(a, "502")
    assert status == 200 and body["result"] == "ignored", body
    assert "gone" in (body.get("reason") or "")
    env.analyst(a, "502", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    status, body = env.webhook(a, "502")
    assert status == 200 and body["result"] == "ignored"
    http("sync_run", body={"direction": "reconcile"})
    assert not env.writes.graph and env.sentinel.writes() == 0


def test_tenant_modes_pull_only_mirrors_without_writing_defender_and_data_only_never_mirrors(env: Env) -> None:
    a, b = env.a, env.b
    env.incident(a, "601")
    env.incident(b, "601")
    settings = env.configure({a: {"mode": "pull-only"}, b: {"mode": "data-only"}})
    run_timer("defender_pull")
    assert env.sentinel.get(env.name(a, "601")) is not None
    assert env.sentinel.get(env.name(b, "601")) is None and len(env.sentinel.all_incidents()) == 1
    assert {r["IncidentId"] for r in env.world.rows("DefenderIncidents_CL")
            if r["DefenderTenantId"] == b} == {"601"}, "data-only still fills the tables"
    env.writes.mark()
    env.analyst(a, "601", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    env.sentinel.analyst_comment(env.name(a, "601"), "closing it")
    status, _ = env.webhook(a, "601")
    assert status == 200
    http("sync_run", body={"direction": "reconcile"})
    assert not env.writes.graph, "pull-only never writes Defender"
    assert env.defender(a, "601")["status"] == "active"
    # Defender wins in pull-only: the mirror is put back to what Defender says.
    assert env.get(a, "601")["properties"]["status"] == "New"
    env.reconfigure(settings, SYNC_TENANTS=json.dumps({a: {"name": CONTOSO}, b: {"name": FABRIKAM}}))
    env.world.update_incident(b, "601", severity="medium")
    run_timer("defender_pull")
    assert env.sentinel.get(env.name(b, "601")) is not None, "switching data-only to sync starts mirroring"


def test_min_severity_is_evaluated_per_version(env: Env) -> None:
    a = env.a
    env.incident(a, "701", severity="low")
    env.incident(a, "702", severity="high")
    env.configure({a: {"minSeverity": "medium"}})
    run_timer("defender_pull")
    assert env.sentinel.get(env.name(a, "701")) is None
    assert env.sentinel.get(env.name(a, "702")) is not None
    env.world.update_incident(a, "701", severity="high")
    run_timer("defender_pull")
    assert env.get(a, "701")["properties"]["severity"] == "High", "raised to high later: it starts syncing"


def test_filters_decide_the_mirror_only_every_incident_reaches_the_tables(env: Env) -> None:
    a = env.a
    env.incident(a, "711", severity="low")
    env.incident(a, "712", severity="high", alerts=[alert("Cloud app", serviceSource="microsoftDefenderForCloudApps")])
    env.incident(a, "713", severity="high")
    # An out-of-scope incident whose earlier ingest failed, older than the window: only its dead letter brings it in.
    old = format_time(utcnow() - timedelta(days=30))
    env.incident(a, "714", severity="low", createdDateTime=old, lastUpdateDateTime=old)
    env.configure({a: {"minSeverity": "medium", "serviceSources": ["microsoftDefenderForEndpoint"]}})
    get_context().state.dead_letter(a, "ingest", "714", "rows refused once", version=old)
    run_timer("defender_pull")
    tabled = {r["IncidentId"] for r in env.world.rows("DefenderIncidents_CL") if r["DefenderTenantId"] == a}
    assert tabled == {"711", "712", "713", "714"}, "filters must not keep incidents out of the tables"
    assert {r["AlertId"] for r in env.world.rows("DefenderAlerts_CL")} >= {
        x["id"] for i in ("711", "712", "714") for x in env.defender(a, i)["alerts"]}
    assert env.sentinel.get(env.name(a, "711")) is None and env.sentinel.get(env.name(a, "712")) is None
    assert env.sentinel.get(env.name(a, "714")) is None
    assert env.sentinel.get(env.name(a, "713")) is not None
    assert not list(get_context().state.dead_letters(a)), "the retried letter is resolved once ingested"


# ------------------------------------------------------------------------------------------------------- round trip


def test_close_in_sentinel_round_trip_then_replay_then_reopen(env: Env) -> None:
    a = env.a
    env.incident(a, "801", determination="malware", classification="truePositive")   # still active in Defender
    env.incident(a, "802", determination="notMalicious", classification="falsePositive")
    pulled(env)
    s = env.sentinel
    env.analyst(a, "801", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    s.analyst_comment(env.name(a, "801"), "Confirmed <b>ransomware</b> <script>x()</script>", "analyst@mssp.example")
    old_body = s.trigger_body(env.name(a, "801"))
    status, body = http("sentinel_webhook", body=old_body, route="sentinel/incidents")
    assert status == 200 and body["result"] == "applied", body
    d = env.defender(a, "801")
    assert (d["status"], d["classification"], d["determination"]) == ("resolved", "truePositive", "malware")
    texts = defender_comments(env.world, a, "801")
    assert len(texts) == 1 and "Confirmed <b>ransomware</b> <script>x()</script>" in texts[0]
    assert texts[0].startswith("[Synced from Microsoft Sentinel") and "analyst@mssp.example" in texts[0]
    graph_writes = len(env.writes.graph)
    assert graph_writes == 2, f"one PATCH and one comment, got {[(w.kind, w.body) for w in env.writes.graph]}"
    assert "determination:malware" in labels(env.get(a, "801"))
    # On the Sentinel side, one PUT adds the app's determination label (a closure's own repair); no comment echo.
    assert env.writes.sentinel_count == 1 and env.sentinel.writes(kind="comment") == 0
    # Re-delivered webhook: nothing changes.
    env.writes.mark()
    for _ in range(2):
        status, body = http("sentinel_webhook", body=old_body, route="sentinel/incidents")
        assert status == 200 and body["result"] in ("stale", "unchanged"), json.dumps(body)
    status, body = env.webhook(a, "801")
    assert status == 200 and body["result"] == "unchanged", body
    env.writes.assert_none("replayed webhook")
    run_timer("defender_pull")
    env.writes.assert_none("pull after the round trip")
    assert len(s.comments(env.name(a, "801"))) == 1, "the analyst's comment is not echoed back to Sentinel"

    # Determination not valid for the new classification: other.
    env.analyst(a, "802", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    env.webhook(a, "802")
    d = env.defender(a, "802")
    assert (d["status"], d["classification"], d["determination"]) == ("resolved", "truePositive", "other")

    # Reopen in Sentinel: Defender active again, classification left alone.
    env.writes.mark()
    env.analyst(a, "801", status="New")
    status, body = env.webhook(a, "801")
    assert status == 200 and body["result"] == "applied"
    d = env.defender(a, "801")
    assert (d["status"], d["classification"], d["determination"]) == ("active", "truePositive", "malware")
    assert [w.body for w in env.writes.graph] == [{"status": "active"}]
    env.analyst(a, "801", status="Active")
    env.webhook(a, "801")
    assert env.defender(a, "801")["status"] == "inProgress"
    env.writes.mark()
    run_timer("defender_pull")
    env.writes.assert_none("pull after reopen")


def test_determination_labels_set_it_and_invalid_ones_are_ignored_and_reported(env: Env) -> None:
    a = env.a
    env.incident(a, "901")
    env.incident(a, "902")
    pulled(env)
    env.add_labels(a, "901", "determination:malware")
    env.analyst(a, "901", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    status, body = env.webhook(a, "901")
    assert status == 200 and body["result"] == "applied"
    d = env.defender(a, "901")
    assert (d["classification"], d["determination"]) == ("truePositive", "malware")
    assert labels(env.get(a, "901")) >= {"determination:malware"}

    env.add_labels(a, "902", "determination:phishing")
    env.analyst(a, "902", status="Closed", classification="FalsePositive", classification_reason="InaccurateData")
    status, body = env.webhook(a, "902")
    assert status == 200
    assert any("determination:phishing" in p for p in body["problems"]), body
    d = env.defender(a, "902")
    assert (d["status"], d["classification"], d["determination"]) == ("resolved", "falsePositive", "other")
    # A later valid label on the closed incident reclassifies the determination only.
    env.add_labels(a, "902", "determination:notMalicious")
    env.webhook(a, "902")
    assert env.defender(a, "902")["determination"] == "notMalicious"
    after = labels(env.get(a, "902"))
    assert "determination:notMalicious" in after and "determination:phishing" not in after
    env.assert_quiet("at rest after determination labels")


def test_owner_goes_through_the_owner_map_both_ways(env: Env) -> None:
    a = env.a
    env.incident(a, "1001", assignedTo="analyst@customer.com")
    env.incident(a, "1002")
    pulled(env, SYNC_OWNER_MAP=json.dumps({"analyst@mssp.com": "analyst@customer.com"}))
    assert owner_upn(env.get(a, "1001")) == "analyst@mssp.com"
    env.analyst(a, "1002", owner="analyst@mssp.com")
    env.webhook(a, "1002")
    assert env.defender(a, "1002")["assignedTo"] == "analyst@customer.com"
    env.analyst(a, "1001", owner="other@mssp.com")
    env.webhook(a, "1001")
    assert env.defender(a, "1001")["assignedTo"] == "other@mssp.com"
    env.analyst(a, "1001", owner=None)
    env.webhook(a, "1001")
    assert env.defender(a, "1001")["assignedTo"] is None
    env.writes.mark()
    run_timer("defender_pull")
    env.writes.assert_none("owner at rest")


def test_tags_add_and_remove_both_ways_as_sets(env: Env) -> None:
    a = env.a
    env.incident(a, "1101", customTags=["keep", "drop-in-sentinel", "drop-in-defender"])
    pulled(env)
    env.remove_labels(a, "1101", "drop-in-sentinel")
    env.add_labels(a, "1101", "added-in-sentinel")
    tags = [t for t in env.defender(a, "1101")["customTags"] if t != "drop-in-defender"] + ["added-in-defender"]
    env.world.update_incident(a, "1101", customTags=tags)
    env.webhook(a, "1101")
    want = {"keep", "added-in-sentinel", "added-in-defender"}
    assert set(env.defender(a, "1101")["customTags"]) == want
    run_timer("defender_pull")
    assert labels(env.get(a, "1101")) == want | {"defender-sync", f"tenant:{CONTOSO}"}
    env.writes.mark()
    run_timer("defender_pull")
    env.webhook(a, "1101")
    env.writes.assert_none("tags at rest")


@pytest.mark.parametrize("policy,winner", [("latest", "sentinel"), ("defender", "defender"),
                                           ("sentinel", "sentinel")])
def test_conflict_policy(env: Env, policy: str, winner: str) -> None:
    a = env.a
    env.incident(a, "1201", customTags=["base"])
    pulled(env, SYNC_CONFLICT_POLICY=policy)
    env.world.update_incident(a, "1201", assignedTo="defender@contoso.com", status="resolved",
                              classification="truePositive", determination="malware", customTags=["base", "d"])
    env.analyst(a, "1201", owner="sentinel@mssp.example", status="Closed", classification="FalsePositive",
                classification_reason="InaccurateData")            # later than Defender's edit
    env.remove_labels(a, "1201", "base")
    env.webhook(a, "1201")
    d, resource = env.defender(a, "1201"), env.get(a, "1201")
    p = resource["properties"]
    if winner == "sentinel":
        assert (d["assignedTo"], d["classification"], d["determination"]) == (
            "sentinel@mssp.example", "falsePositive", "other")
        assert (owner_upn(resource), p["classification"]) == ("sentinel@mssp.example", "FalsePositive")
    else:
        assert (d["assignedTo"], d["classification"], d["determination"]) == (
            "defender@contoso.com", "truePositive", "malware")
        assert (owner_upn(resource), p["classification"]) == ("defender@contoso.com", "TruePositive")
        assert "determination:malware" in labels(resource)
    assert d["status"] == "resolved" and p["status"] == "Closed"
    assert set(d["customTags"]) == {"d"} and labels(resource) & {"base", "d"} == {"d"}, "tags merge as sets"
    env.writes.mark()
    run_timer("defender_pull")
    run_timer("sentinel_reconcile")
    env.writes.assert_none("after a conflict")


def test_conflict_tie_goes_to_defender(env: Env) -> None:
    a = env.a
    env.incident(a, "1301")
    pulled(env)
    env.analyst(a, "1301", owner="sentinel@mssp.example")
    modified = env.get(a, "1301")["properties"]["lastModifiedTimeUtc"]
    env.world.update_incident(a, "1301", assignedTo="defender@contoso.com", last_update=modified)
    env.webhook(a, "1301")
    assert env.defender(a, "1301")["assignedTo"] == "defender@contoso.com"
    assert owner_upn(env.get(a, "1301")) == "defender@contoso.com"


# ------------------------------------------------------------------------------------------------------- webhook doors


def _replayed_old_body(env: Env) -> dict[str, Any]:
    body = env.sentinel.trigger_body(env.name(env.a, "1401"))
    env.analyst(env.a, "1401", owner="later@mssp.example")
    env.webhook(env.a, "1401")
    env.writes.mark()
    return body


def _lying_body(env: Env) -> dict[str, Any]:
    body = env.sentinel.trigger_body(env.name(env.a, "1401"))
    props = body["object"]["properties"]
    props.update({"status": "Closed", "classification": "FalsePositive", "classificationReason": "InaccurateData",
                  "owner": {"userPrincipalName": "attacker@evil.example"},
                  "labels": [{"labelName": "pwned", "labelType": "User"}]})
    return body


def _other_workspace(env: Env) -> dict[str, Any]:
    body = env.sentinel.trigger_body(env.name(env.a, "1401"))
    body["object"]["id"] = body["object"]["id"].replace("/workspaces/sentinel-soc/", "/workspaces/other-ws/")
    return body


def _unknown_incident(env: Env) -> dict[str, Any]:
    native = env.sentinel.seed_incident(title="Native analytics rule incident")
    return env.sentinel.trigger_body(native["name"])


BAD_INPUTS: dict[str, tuple[Any, int, str | None]] = {
    # case: (body factory or raw bytes, status, error code or None when the answer is a result)
    "malformed-json": (b'{"object": {"id": ', 400, "malformed_json"),
    "wrong-content-type": ("text/plain", 415, "unsupported_media_type"),
    "empty-body": (b"", 400, "empty_body"),
    "over-the-limit": ("oversize", 413, "payload_too_large"),
    "missing-id": ({"object": {"name": "x", "properties": {}}}, 400, "missing_incident_id"),
    "wrong-types": ({"object": {"id": 42, "properties": []}}, 400, "missing_incident_id"),
    "not-an-object": (b"[1, 2]", 400, "invalid_request"),
    "properties-wrong-type": ("props-list", 400, "invalid_body"),
    "another-workspace": (_other_workspace, 403, "wrong_workspace"),
    "not-mirrored": (_unknown_incident, 200, None),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_webhook_rejects_bad_input_and_changes_nothing(env: Env, case: str) -> None:
    a = env.a
    env.incident(a, "1401", customTags=["t1"])
    pulled(env, WEBHOOK_MAX_BODY_BYTES="8192")
    env.analyst(a, "1401", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    env.writes.mark()
    defender_before = env.defender(a, "1401")
    sentinel_before = env.get(a, "1401")
    spec, want_status, want_code = BAD_INPUTS[case]
    content_type = "application/json"
    if isinstance(spec, bytes):
        raw = spec
    elif spec == "text/plain":
        raw, content_type = json.dumps(env.sentinel.trigger_body(env.name(a, "1401"))).encode(), "text/plain"
    elif spec == "oversize":
        body = env.sentinel.trigger_body(env.name(a, "1401"))
        body["object"]["properties"]["description"] = "x" * 9000
        raw = json.dumps(body).encode()
    elif spec == "props-list":
        body = env.sentinel.trigger_body(env.name(a, "1401"))
        body["object"]["properties"] = ["Closed"]
        raw = json.dumps(body).encode()
    elif callable(spec):
        raw = json.dumps(spec(env)).encode()
    else:
        raw = json.dumps(spec).encode()
    status, body = http("sentinel_webhook", raw=raw, content_type=content_type, route="sentinel/incidents")
    assert status == want_status, body
    if want_code is None:
        assert body["result"] == "ignored", body
    else:
        assert set(body) == {"error"} and body["error"]["code"] == want_code, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    env.writes.assert_none(case)
    assert env.defender(a, "1401") == defender_before
    assert env.get(a, "1401") == sentinel_before


def test_webhook_replayed_old_payload_changes_nothing(env: Env) -> None:
    a = env.a
    env.incident(a, "1401")
    pulled(env)
    body = _replayed_old_body(env)
    assert env.defender(a, "1401")["assignedTo"] == "later@mssp.example"
    status, answer = http("sentinel_webhook", body=body, route="sentinel/incidents")
    assert status == 200 and answer["result"] in ("stale", "unchanged"), answer
    env.writes.assert_none("replayed payload")
    assert env.defender(a, "1401")["assignedTo"] == "later@mssp.example"


def test_webhook_body_values_are_not_trusted(env: Env) -> None:
    a = env.a
    env.incident(a, "1401", customTags=["t1"])
    pulled(env)
    env.analyst(a, "1401", owner="real@mssp.example")
    status, answer = http("sentinel_webhook", body=_lying_body(env), route="sentinel/incidents")
    assert status == 200 and answer["result"] == "applied", answer
    d = env.defender(a, "1401")
    assert d["assignedTo"] == "real@mssp.example" and d["status"] == "active"
    assert d["customTags"] == ["t1"] and d["classification"] == "unknown"
    assert [w.body for w in env.writes.graph] == [{"assignedTo": "real@mssp.example"}]


def test_webhook_accepts_a_bare_incident_resource_and_markup_in_comments_is_copied_verbatim_once(env: Env) -> None:
    a = env.a
    env.incident(a, "1501")
    pulled(env)
    name = env.name(a, "1501")
    markup = '<img src=x onerror="alert(document.cookie)"> **bold** <a href="javascript:x">y</a> & ]]> {{7*7}}'
    env.sentinel.analyst_comment(name, markup)
    resource = env.sentinel.get(name)
    for _ in range(3):
        status, answer = http("sentinel_webhook", body={k: resource[k] for k in ("id", "name", "etag", "properties")},
                              route="sentinel/incidents")
        assert status == 200, answer
    texts = defender_comments(env.world, a, "1501")
    assert len(texts) == 1 and texts[0].endswith("\n" + markup), texts
    run_timer("defender_pull")
    assert len(env.sentinel.comments(name)) == 1, "never echoed back"


# ------------------------------------------------------------------------------------------------------- reconcile


def test_reconcile_catches_a_dropped_webhook_and_is_quiet_at_rest(env: Env) -> None:
    a, b = env.a, env.b
    env.incident(a, "1601")
    env.incident(b, "1602")
    pulled(env)
    env.analyst(a, "1601", status="Closed", classification="FalsePositive", classification_reason="IncorrectAlertLogic")
    run_timer("sentinel_reconcile")
    d = env.defender(a, "1601")
    assert (d["status"], d["classification"], d["determination"]) == ("resolved", "falsePositive", "other")
    assert env.get(a, "1601")["properties"]["classificationReason"] == "IncorrectAlertLogic", "analyst's reason kept"
    env.analyst(b, "1602", owner="x@mssp.example")
    status, summary = http("sync_run", body={"direction": "reconcile", "tenants": [b]})
    assert status == 200 and summary["direction"] == "reconcile"
    assert summary["tenants"][0]["pushed"] == 1
    assert env.defender(b, "1602")["assignedTo"] == "x@mssp.example"
    env.writes.mark()
    run_timer("sentinel_reconcile")
    http("sync_run", body={"direction": "reconcile"})
    run_timer("defender_pull")
    env.writes.assert_none("reconcile at rest")


@pytest.mark.parametrize("bumps", [False, True])
def test_sweep_catches_comment_and_label_only_edits(env: Env, bumps: bool) -> None:
    a = env.a
    env.incident(a, "1701")
    pulled(env)
    env.sentinel.comment_bumps_modified = bumps
    env.sentinel.label_bumps_modified = bumps
    name = env.name(a, "1701")
    env.sentinel.analyst_comment(name, "comment only edit")
    env.add_labels(a, "1701", "label-only")
    run_timer("sentinel_reconcile")
    assert [t.split("\n", 1)[1] for t in defender_comments(env.world, a, "1701")] == ["comment only edit"]
    assert "label-only" in env.defender(a, "1701")["customTags"]
    env.writes.mark()
    run_timer("sentinel_reconcile")
    run_timer("defender_pull")
    env.writes.assert_none("sweep at rest")


def test_an_analyst_edit_landing_between_the_apps_read_and_write_is_kept(env: Env) -> None:
    a = env.a
    env.incident(a, "1801", customTags=["t1"])
    pulled(env)
    name = env.name(a, "1801")
    fired: list[bool] = []

    def analyst_first(request: Any) -> bool:
        if request.method == "PUT" and request.path.lower().endswith(name) and not fired:
            fired.append(True)
            env.add_labels(a, "1801", "mid-write")   # the app's etag is now stale: its PUT gets a 409
        return False

    env.hub.faults.rule("sentinel", analyst_first, Fault("delay", seconds=0.0))
    env.world.update_incident(a, "1801", assignedTo="d@contoso.com")
    run_timer("defender_pull")
    env.hub.faults.clear()
    assert fired and [w.status for w in env.sentinel.rejected_writes()] == [409]
    resource = env.get(a, "1801")
    assert owner_upn(resource) == "d@contoso.com" and "mid-write" in labels(resource)
    assert set(env.defender(a, "1801")["customTags"]) == {"t1", "mid-write"}, "merged again after the 409"
    env.writes.mark()
    run_timer("defender_pull")
    run_timer("sentinel_reconcile")
    env.writes.assert_none("after a 409")


def test_queue_fanout_runs_reconcile_per_tenant(env: Env) -> None:
    a, b = env.a, env.b
    env.incident(a, "1901")
    env.incident(b, "1902")
    settings = pulled(env, SYNC_FANOUT="queue")
    assert env.sentinel.all_incidents() == [], "with SYNC_FANOUT=queue the timer only enqueues"
    queue = QueueClient.from_connection_string(settings["AzureWebJobsStorage"], "defender-tenant-work",
                                               message_decode_policy=TextBase64DecodePolicy())
    for message in queue.receive_messages(max_messages=32):
        run_queue(message.content)
    env.analyst(a, "1901", owner="q@mssp.example")
    env.analyst(b, "1902", status="Active")
    run_timer("sentinel_reconcile")
    messages_ = [json.loads(m.content) for m in queue.receive_messages(max_messages=32)]
    assert sorted((m["tenantId"], m["direction"]) for m in messages_) == sorted([(a, "reconcile"), (b, "reconcile")])
    for message in messages_:
        run_queue(json.dumps(message))
    assert env.defender(a, "1901")["assignedTo"] == "q@mssp.example"
    assert env.defender(b, "1902")["status"] == "inProgress"


def test_one_reconcile_run_finds_every_comment_only_edit_among_many_incidents(env: Env) -> None:
    """Comment-only edits move nothing the listing can see; a harness that stops at the first quiet round must
    still find every one of them after a single reconcile run, even past the first hundred links."""
    a = env.a
    for n in range(130):
        env.world.add_incident(a, {"id": str(5000 + n), "severity": "low", "alerts": [alert(f"a{n}")]})
    pulled(env)
    env.sentinel.comment_bumps_modified = False
    for n in range(130):
        env.sentinel.analyst_comment(env.name(a, str(5000 + n)), f"late note {n}")
    run_timer("sentinel_reconcile")
    missing = [n for n in range(130) if not any(c.endswith(f"\nlate note {n}")
                                                for c in defender_comments(env.world, a, str(5000 + n)))]
    assert not missing, f"{len(missing)} comment-only edits not found by one reconcile run: {missing[:10]}"
    env.writes.mark()
    run_timer("sentinel_reconcile")
    env.writes.assert_none("reconcile after the sweep")


def test_each_kind_of_change_costs_one_write_on_the_other_side(env: Env) -> None:
    """Writes per synced change, one change at a time: (Graph writes, Sentinel writes) each one causes."""
    a = env.a
    env.incident(a, "2001", customTags=["t"])
    pulled(env)
    name = env.name(a, "2001")

    def cost(change: Any, deliver: str) -> tuple[int, int]:
        env.writes.mark()
        change()
        if deliver == "pull":
            run_timer("defender_pull")
        else:
            env.webhook(a, "2001")
        cost = (len(env.writes.graph), env.writes.sentinel_count)
        env.writes.mark()
        run_timer("defender_pull")
        run_timer("sentinel_reconcile")
        env.writes.assert_none("after the change")
        return cost

    world = env.world
    measured = {
        "defender owner": cost(lambda: world.update_incident(a, "2001", assignedTo="o@contoso.com"), "pull"),
        "defender tag": cost(lambda: world.update_incident(a, "2001", customTags=["t", "u"]), "pull"),
        "defender status": cost(lambda: world.update_incident(a, "2001", status="inProgress"), "pull"),
        "defender comment": cost(lambda: world.update_incident(a, "2001", comments=[comment("d note")]), "pull"),
        "defender resolve": cost(lambda: world.update_incident(a, "2001", status="resolved",
                                                               classification="truePositive",
                                                               determination="phishing"), "pull"),
        "sentinel reopen": cost(lambda: env.analyst(a, "2001", status="Active"), "webhook"),
        "sentinel owner": cost(lambda: env.analyst(a, "2001", owner="s@mssp.example"), "webhook"),
        "sentinel tag": cost(lambda: env.add_labels(a, "2001", "v"), "webhook"),
        "sentinel comment": cost(lambda: env.sentinel.analyst_comment(name, "s note"), "webhook"),
        # A closure (reopen) in Sentinel also adds (removes) the app's determination label: one write on each side.
        "sentinel close": cost(lambda: env.analyst(a, "2001", status="Closed", classification="BenignPositive",
                                                   classification_reason="SuspiciousButExpected"), "webhook"),
    }
    expected = {k: ((0, 1) if k.startswith("defender") else (1, 0)) for k in measured}
    expected["sentinel close"] = expected["sentinel reopen"] = (1, 1)
    assert measured == expected
