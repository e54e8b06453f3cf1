"""End to end, issue 8: concurrent syncs of one incident, the inProgress fallback, mirror retries, data-only tenants.

Driven through function_app.py (tests/harness.py) against the emulators and Azurite. Races are made reliable with a
delay fault on the Sentinel comment listing: every sync reads Defender, then waits there, then appends comments.
"""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest
from harness import http, run_timer
from test_twoway_e2e import Env, defender_comments, pulled

from emulators.base import Fault, match_request
from sync.context import get_context
from sync.state import DEAD_LETTERS, LETTERS_ROW, TENANTS
from sync.timeutil import format_time, utcnow

COMMENT_LIST_DELAY = 1.0


@pytest.fixture
def env(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(emulators, make_app_settings, monkeypatch)


def at_once(*calls: Any) -> list[Any]:
    """Run the calls in threads started together; returns their results (an exception is returned, not raised)."""
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(index: int, call: Any) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except Exception as exc:  # reported to the test through the results
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def slow_comment_listing(env: Env, times: int) -> None:
    """The next ``times`` comment listings of Sentinel answer after a delay: each sync then holds its Defender read
    while the other runs, the window in which both would decide to copy the same comment."""
    env.hub.faults.queue("sentinel", Fault("delay", seconds=COMMENT_LIST_DELAY), times=times,
                         when=match_request("GET", path=r"/comments$"))


def copies(env: Env, tenant: str, incident_id: str, text: str) -> int:
    return sum(1 for c in defender_comments(env.world, tenant, incident_id) if text in c)


def test_two_webhook_deliveries_at_once_copy_a_comment_once(env: Env) -> None:
    a = env.a
    env.incident(a, "2101")
    pulled(env)
    env.sentinel.analyst_comment(env.name(a, "2101"), "Isolating the host now", "analyst@mssp.example")
    env.analyst(a, "2101", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    slow_comment_listing(env, 2)
    first, second = at_once(lambda: env.webhook(a, "2101"), lambda: env.webhook(a, "2101"))
    assert copies(env, a, "2101", "Isolating the host now") == 1, defender_comments(env.world, a, "2101")
    answers = sorted([first, second], key=lambda r: r[1].get("result", "") if isinstance(r[1], dict) else "")
    assert all(status in (200, 503) for status, _ in answers), answers
    assert any(status == 200 and body["result"] == "applied" for status, body in answers), answers
    for status, body in answers:
        if status == 503:
            assert body["error"]["code"] == "incident_busy", body
    assert env.defender(a, "2101")["status"] == "resolved"
    env.writes.mark()
    http("sync_run", body={"direction": "reconcile"})
    run_timer("defender_pull")
    assert copies(env, a, "2101", "Isolating the host now") == 1


def mirrored_then_commented(env: Env, tenant: str, incident_id: str, text: str) -> None:
    """An incident mirrored, then an analyst's comment on its mirror and a new owner (a webhook's usual cause)."""
    env.incident(tenant, incident_id)
    pulled(env)
    env.sentinel.analyst_comment(env.name(tenant, incident_id), text, "analyst@mssp.example")
    env.analyst(tenant, incident_id, owner="lead@mssp.example")


def test_webhook_beside_the_reconcile_copies_a_comment_once(env: Env) -> None:
    a = env.a
    mirrored_then_commented(env, a, "2201", "Escalated to tier 2")
    slow_comment_listing(env, 2)
    webhook, reconcile = at_once(lambda: env.webhook(a, "2201"),
                                 lambda: http("sync_run", body={"direction": "reconcile", "tenants": [a]}))
    assert not isinstance(webhook, Exception) and not isinstance(reconcile, Exception), (webhook, reconcile)
    assert reconcile[0] == 200, reconcile
    assert copies(env, a, "2201", "Escalated to tier 2") == 1, defender_comments(env.world, a, "2201")
    # Whichever lost the race, a later reconcile converges without a second copy.
    http("sync_run", body={"direction": "reconcile"})
    assert env.defender(a, "2201")["assignedTo"] == "lead@mssp.example"
    assert copies(env, a, "2201", "Escalated to tier 2") == 1


def test_active_survives_graph_refusing_in_progress(env: Env) -> None:
    a = env.a
    env.world.graph.refuse_in_progress.add(a)
    env.incident(a, "2301")
    pulled(env)
    env.analyst(a, "2301", status="Active")
    status, body = env.webhook(a, "2301")
    assert status == 200 and body["result"] == "applied", body
    assert env.defender(a, "2301")["status"] == "active", "Graph refused inProgress: active was written"
    assert env.get(a, "2301")["properties"]["status"] == "Active"
    # A later Defender change (a tag) must not read Defender's fallback "active" as a change back to New.
    env.world.update_incident(a, "2301", customTags=["vip"])
    run_timer("defender_pull")
    resource = env.get(a, "2301")
    assert resource["properties"]["status"] == "Active", "the fallback must not reset Sentinel to New"
    assert "vip" in {lbl["labelName"] for lbl in resource["properties"]["labels"]}
    # At rest: no PATCH loop trying inProgress again.
    env.assert_quiet("at rest after the fallback")
    # A real reopen in Sentinel still reaches Defender, and ends the fallback.
    env.analyst(a, "2301", status="New")
    env.webhook(a, "2301")
    env.world.update_incident(a, "2301", customTags=["vip", "finance"])
    run_timer("defender_pull")
    assert env.get(a, "2301")["properties"]["status"] == "New"


def _time_travel_letters() -> None:
    """Make every waiting letter due now, as if its backoff had passed (the tenants' due-time rows too: the pull
    retries letters when those say so; an overlap re-read of a version already handed to the mirror does not)."""
    due = format_time(utcnow() - timedelta(minutes=1))
    table = get_context().state.table(DEAD_LETTERS)
    for entity in table.list_entities():
        entity["NextAttemptAt"] = due
        table.update_entity(entity)
    tenants = get_context().state.table(TENANTS)
    for entity in tenants.list_entities():
        if str(entity["RowKey"]).endswith(LETTERS_ROW):
            entity["DueAt"] = due
            tenants.update_entity(entity)


def _tenant_status(tenant: str) -> dict[str, Any]:
    status, body = http("sync_status", method="GET", route="sync/status")
    assert status == 200, body
    return next(t for t in body["tenants"] if t["tenantId"] == tenant)


def test_a_failing_mirror_is_retried_with_backoff_until_it_is_mirrored(env: Env) -> None:
    a = env.a
    env.incident(a, "2401")
    env.configure()
    name = env.name(a, "2401")
    env.hub.faults.rule("sentinel", match_request("PUT", path=name + "$"), Fault("status", 403))
    run_timer("defender_pull")
    assert env.sentinel.get(name) is None
    assert _tenant_status(a)["mirrorRetriesWaiting"] == 1
    # The next run retries once (most failures are one blip); after a second failure it backs off.
    def puts() -> int:
        return len([r for r in env.hub.log.entries() if r.method == "PUT" and r.path.endswith(name)])

    before = puts()
    run_timer("defender_pull")
    assert puts() == before + 1, "the first retry is due at the next run"
    run_timer("defender_pull")
    assert puts() == before + 1, "then it waits: a run right away does not try again"
    # Far more failures than the old limit (6): never given up.
    for _ in range(8):
        _time_travel_letters()
        run_timer("defender_pull")
    letters = list(get_context().state.dead_letters(a))
    assert [(d.kind, d.given_up) for d in letters] == [("mirror", False)]
    assert letters[0].retry_count >= 8 and letters[0].next_attempt_at is not None
    assert letters[0].next_attempt_at > format_time(utcnow() + timedelta(minutes=30)), "the wait grows"
    assert _tenant_status(a)["mirrorRetriesWaiting"] == 1
    env.hub.faults.clear()
    _time_travel_letters()
    run_timer("defender_pull")
    assert env.sentinel.get(name) is not None, "mirrored once Sentinel accepts it"
    assert _tenant_status(a)["mirrorRetriesWaiting"] == 0
    assert not list(get_context().state.dead_letters(a))


def test_a_link_without_its_sentinel_name_is_repaired_not_replayed(env: Env) -> None:
    a = env.a
    env.incident(a, "2501")
    pulled(env)
    state = get_context().state
    link = state.get_link(a, "2501")
    assert link is not None
    etag = link.pop("etag")
    del link["sentinelName"]
    assert state.save_link(a, "2501", link, etag=etag)
    env.world.update_incident(a, "2501", severity="low")
    status, body = http("sync_run", body={"direction": "pull", "tenants": [a]})
    assert status == 200 and body["tenants"][0]["outcome"] == "success", body
    assert env.get(a, "2501")["properties"]["severity"] == "Low"
    assert len(env.sentinel.all_incidents()) == 1


def test_a_data_only_tenant_with_old_links_is_never_written(env: Env) -> None:
    a = env.a
    env.incident(a, "2601")
    settings = pulled(env)
    env.reconfigure(settings, SYNC_TENANTS=json.dumps({a: {"name": "Contoso", "mode": "data-only"},
                                                       env.b: {"name": "Fabrikam"}}))
    env.analyst(a, "2601", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    env.sentinel.analyst_comment(env.name(a, "2601"), "closing", "analyst@mssp.example")
    env.writes.mark()
    status, body = env.webhook(a, "2601")
    assert status == 200 and body["result"] == "ignored" and "data-only" in body["reason"], body
    status, summary = http("sync_run", body={"direction": "reconcile", "tenants": [a]})
    assert status == 200 and summary["tenants"][0]["outcome"] == "skipped", summary
    env.world.update_incident(a, "2601", severity="low")
    run_timer("defender_pull")
    assert not env.writes.graph, [(w.kind, w.body) for w in env.writes.graph]
    assert env.defender(a, "2601")["status"] == "active"
    assert env.get(a, "2601")["properties"]["severity"] == "High", "the mirror is left as it was"
