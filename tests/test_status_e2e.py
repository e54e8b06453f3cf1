"""End to end, issue 10 item 2: ``sync_status`` shows the reconcile's health, the mirrors waiting and the dead
letters by kind, next to the keys it always had."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import apply_settings
from harness import http, run_timer

from emulators.base import Fault, match_request


def test_status_shows_reconcile_health_mirrors_waiting_and_dead_letters_by_kind(
        emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = emulators.world
    tenant = world.add_tenant(name="Contoso")
    world.generate(21, tenant, 3)
    apply_settings(monkeypatch, make_app_settings([tenant]))
    status, before = http("sync_status", "GET")
    assert status == 200
    [fresh] = before["tenants"]
    assert fresh["reconcile"] == {"lastRun": None, "cursor": None, "healthy": True}
    assert fresh["mirrorsWaiting"] == 0 and fresh["deadLettersByKind"] == {}

    # Sentinel refuses every incident PUT: the rows land, the mirrors wait as dead letters of kind "mirror".
    emulators.faults.rule("sentinel", match_request("PUT", r"/incidents/[^/]+$"), Fault("status", status=400))
    run_timer("defender_pull")
    emulators.faults.clear()
    status, ran = http("sync_run", "POST", {"direction": "reconcile"})
    assert status == 200, ran

    status, body = http("sync_status", "GET")
    assert status == 200
    [row] = body["tenants"]
    for key in ("tenantId", "name", "cursor", "lagSeconds", "lastRun", "deadLetters"):   # the contract's keys
        assert key in row
    assert row["deadLettersByKind"] == {"mirror": 3}
    assert row["deadLetters"] == 3 and row["mirrorsWaiting"] == 3
    assert row["reconcile"]["lastRun"]["outcome"] == "success"
    assert row["reconcile"]["lastRun"]["finishedAt"] and row["reconcile"]["healthy"] is True
