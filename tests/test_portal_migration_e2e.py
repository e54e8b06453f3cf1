"""End to end, issue 7: an existing ``sentinel-api`` deployment switches to ``defender-portal``.

The deployment first runs with ``sentinel-api`` (its mirrors created through the incidents API). Then the workspace is
onboarded to the Defender portal, the mirror rule is deployed and the app settings switch to ``defender-portal``:

- the existing mirrors stay linked and keep syncing both ways (a Defender change reaches them, a closure made on them
  in Sentinel reaches Defender), and no request row is ever sent for them;
- only a Defender incident first seen after the switch goes through a request row and the mirror rule;
- nothing is created through the API after the switch.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import apply_settings
from harness import http, run_timer
from test_portal_e2e import RULE_ID, Portal

from sync.context import get_context


@pytest.fixture
def portal(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Portal:
    world = Portal(emulators, make_app_settings, monkeypatch)
    world.world.portal.enable(False)        # the workspace is still managed in the Azure portal
    return world


def run_as_sentinel_api(portal: Portal) -> None:
    """Apply the settings of a deployment made before the switch (the app's default target)."""
    settings = portal.make_app_settings(portal.tenants, SYNC_TIME_BUDGET_SECONDS="30")
    assert "SYNC_MIRROR_TARGET" not in settings, "sentinel-api is the app's default"
    apply_settings(portal.monkeypatch, settings)


def api_creations(portal: Portal) -> int:
    """Incidents created through the incidents API (a PUT answered 201)."""
    return sum(1 for w in portal.sentinel.write_log if w.kind == "incident" and w.status == 201)


def test_existing_mirrors_stay_linked_and_only_new_incidents_go_through_the_rule(portal: Portal) -> None:
    a, b, _c = portal.tenants
    portal.incident(a, "1", severity="medium")
    portal.incident(b, "2")
    run_as_sentinel_api(portal)
    run_timer("defender_pull")
    old = {(a, "1"): portal.linked(a, "1")["name"], (b, "2"): portal.linked(b, "2")["name"]}
    assert api_creations(portal) == 2, "before the switch the app creates its mirrors through the API"

    # The switch: the workspace is onboarded, the infra deploys the mirror rule, the two app settings change.
    portal.world.portal.enable()
    portal.sentinel.reset_write_log()
    portal.configure()
    portal.world.update_incident(a, "1", severity="high", assignedTo="kai@contoso.com")   # a Defender change
    portal.incident(a, "3")                                                           # first seen after the switch

    status, body = http("sync_run", body={})
    assert status == 200 and body["mirrorRequests"]["sent"] == 1, body.get("mirrorRequests")
    assert [(r["DefenderTenantId"], r["IncidentId"]) for r in portal.request_rows()] == [(a, "3")], \
        "no request row for an incident that already has its mirror"
    a1 = portal.linked(a, "1")
    assert a1["name"] == old[(a, "1")], "the existing mirror stays linked"
    assert a1["properties"]["severity"] == "High", "a Defender change reaches the existing mirror"
    assert (a1["properties"].get("owner") or {}).get("userPrincipalName") == "kai@contoso.com"

    portal.minute()                                      # the rule makes the new incident's mirror
    run_timer("defender_pull")
    a3 = portal.linked(a, "3")
    assert a3["name"] not in old.values()
    assert portal.world.portal.is_visible(a3["name"]), "the new mirror is shown in the Defender portal"
    assert any(r.lower().endswith(RULE_ID) for r in a3["properties"]["relatedAnalyticRuleIds"])
    assert portal.linked(b, "2")["name"] == old[(b, "2")]
    assert set(portal.mirrors()) == {(a, "3")}, "only the new incident went through the rule"
    assert api_creations(portal) == 0, "nothing is created through the API after the switch"

    # Push back still works on an old mirror: an analyst closes it, the webhook brings it to Defender.
    portal.sentinel.analyst_update(old[(b, "2")], status="Closed", classification="FalsePositive",
                                   classificationReason="InaccurateData")
    status, answer = http("sentinel_webhook", body=portal.sentinel.trigger_body(old[(b, "2")]),
                          route="sentinel/incidents")
    assert status == 200 and answer["result"] == "applied", answer
    defender = portal.world.get_incident(b, "2")
    assert (defender["status"], defender["classification"]) == ("resolved", "falsePositive")

    # Quiet afterwards: no request, no write; sync_status shows nothing waiting and the rule as found.
    rows = len(portal.request_rows())
    portal.sentinel.reset_write_log()
    portal.minute()
    run_timer("defender_pull")
    assert len(portal.request_rows()) == rows and portal.sentinel.writes() == 0
    _status, health = http("sync_status", "GET")
    assert all(t["mirrorRequestsWaiting"] == 0 for t in health["tenants"])
    assert health["mirrorRule"]["state"] == "ok", health.get("mirrorRule")
    assert get_context().settings.mirror_target == "defender-portal"
