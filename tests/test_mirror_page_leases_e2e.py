"""End to end, issue 9: the mirror hook syncs a page's updates under their incident leases taken together and
writes their links in transactions, as safe against the webhook, other workers and crashes as one lease per sync.

Driven through function_app.py (tests/harness.py) against the emulators and Azurite.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from harness import run_timer
from test_concurrency_e2e import copies, mirrored_then_commented, slow_comment_listing
from test_twoway_e2e import Env, comment, messages, pulled

import sync.state
from sync.context import get_context
from sync.state import INCIDENTS, LEASES, StateStore
from sync.timeutil import canonical_time


@pytest.fixture
def env(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(emulators, make_app_settings, monkeypatch)


def _lease_row(tenant: str, incident_id: str) -> dict[str, Any] | None:
    try:
        return dict(get_context().state.table(LEASES).get_entity("lease", f"incident:{incident_id}|{tenant}"))
    except ResourceNotFoundError:
        return None


def _incident_leases() -> list[str]:
    return [str(e["RowKey"]) for e in get_context().state.table(LEASES).list_entities()
            if str(e["RowKey"]).startswith("incident:")]


def _current(tenant: str, versions: dict[str, str]) -> None:
    """Every link holds the Defender version of the update at least (a comment the sync appended to Defender
    makes a newer one)."""
    for incident_id, version in versions.items():
        link = get_context().state.get_link(tenant, incident_id)
        assert link is not None, incident_id
        assert link["defenderVersion"] >= version, (incident_id, link["defenderVersion"], version)


def _as_stored(link: dict[str, Any] | None) -> dict[str, Any]:
    """A link as read, without the ETag it was read at."""
    return {k: v for k, v in (link or {}).items() if k != "etag"}


def _updated(env: Env, tenant: str, ids: list[str]) -> dict[str, str]:
    """Update the incidents in Defender; their new versions."""
    return {i: canonical_time(str(env.world.update_incident(tenant, i, severity="low")["lastUpdateDateTime"]))
            for i in ids}


def _mirrored_then_updated(env: Env, tenant: str, ids: list[str]) -> dict[str, str]:
    """Incidents with a Defender comment, mirrored; an analyst's reply on each mirror; then each updated in
    Defender. Their new versions."""
    for incident_id in ids:
        env.incident(tenant, incident_id, comments=[comment(f"note on {incident_id}")])
    pulled(env)
    for incident_id in ids:
        env.sentinel.analyst_comment(env.name(tenant, incident_id), f"reply on {incident_id}", "analyst@mssp.example")
    return _updated(env, tenant, ids)


def test_a_webhook_during_the_pulls_page_lease_waits_and_the_comment_is_copied_once(env: Env) -> None:
    a = env.a
    mirrored_then_commented(env, a, "2701", "Contained on WS-01")
    versions = _updated(env, a, ["2701"])
    slow_comment_listing(env, 2)   # the pull's sync holds the page lease across a slow comment listing
    pull = threading.Thread(target=run_timer, args=("defender_pull",))
    pull.start()
    give_up = time.monotonic() + 20
    while _lease_row(a, "2701") is None and time.monotonic() < give_up:
        time.sleep(0.02)
    assert _lease_row(a, "2701") is not None, "the pull took the incident's lease"
    status, body = env.webhook(a, "2701")
    pull.join(timeout=60)
    assert status in (200, 503), body
    if status == 503:
        assert body["error"]["code"] == "incident_busy", body
    else:
        assert body["result"] in ("applied", "unchanged", "stale"), body   # stale: the pull synced it first
    assert copies(env, a, "2701", "Contained on WS-01") == 1
    assert env.defender(a, "2701")["assignedTo"] == "lead@mssp.example"
    assert env.get(a, "2701")["properties"]["severity"] == "Low"
    run_timer("defender_pull")
    env.webhook(a, "2701")
    assert copies(env, a, "2701", "Contained on WS-01") == 1
    _current(a, versions)
    assert not _incident_leases(), "every lease given back"


def test_a_page_with_one_incident_held_by_another_worker_syncs_the_others_and_letters_that_one(env: Env) -> None:
    a = env.a
    ids = [str(2801 + i) for i in range(4)]
    for incident_id in ids:
        env.incident(a, incident_id)
    pulled(env)
    versions = _updated(env, a, ids)
    state = get_context().state
    held = state.acquire_lease(a, "incident:2803", "another-worker", 60)
    assert held is not None
    run_timer("defender_pull")
    others = [i for i in ids if i != "2803"]
    for incident_id in others:
        assert env.get(a, incident_id)["properties"]["severity"] == "Low", incident_id
    _current(a, {i: versions[i] for i in others})
    assert env.get(a, "2803")["properties"]["severity"] == "High", "never synced under another worker's lease"
    letters = [(d.kind, d.key) for d in state.dead_letters(a, pending_only=True)]
    assert letters == [("mirror", "2803")]
    assert "being synced by another worker" in next(iter(state.dead_letters(a))).error
    assert _lease_row(a, "2803") is not None and _lease_row(a, "2803")["Owner"] == "another-worker"  # type: ignore[index]
    assert sorted(_incident_leases()) == [f"incident:2803|{a}"], "the page gave its own leases back"
    state.release_lease(held)
    run_timer("defender_pull")   # a busy letter is due at the next run
    assert env.get(a, "2803")["properties"]["severity"] == "Low"
    _current(a, versions)
    assert not list(state.dead_letters(a, pending_only=True))


def test_a_link_changed_before_the_pages_link_write_is_synced_again_and_ends_current(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    a = env.a
    ids = [str(2901 + i) for i in range(5)]
    versions = _mirrored_then_updated(env, a, ids)
    real = StateStore.replace_links
    stale: list[str] = []

    def replace_after_a_writer(store: StateStore, tenant_id: str, links: dict[str, Any]) -> list[str]:
        if not stale:   # a writer ignoring the lease rewrites one link just before the page's write
            stale.append("2903")
            link = store.get_link(tenant_id, "2903")
            assert link is not None
            assert store.save_link(tenant_id, "2903", link, etag=link.pop("etag"))
        return real(store, tenant_id, links)

    monkeypatch.setattr(StateStore, "replace_links", replace_after_a_writer)
    run_timer("defender_pull")
    assert stale == ["2903"], "the page's link write ran"
    _current(a, versions)
    for incident_id in ids:
        assert env.get(a, incident_id)["properties"]["severity"] == "Low"
        assert copies(env, a, incident_id, f"reply on {incident_id}") == 1, incident_id
        assert len(messages(env.sentinel, env.name(a, incident_id))) == 2, "each comment copied once"
    assert not list(get_context().state.dead_letters(a, pending_only=True))
    assert not _incident_leases()


def test_a_crash_before_the_pages_link_write_is_repaired_by_the_next_run(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    a = env.a
    ids = [str(3001 + i) for i in range(6)]
    versions = _mirrored_then_updated(env, a, ids)
    before = {i: get_context().state.get_link(a, i) for i in ids}
    real = sync.state.submit

    def crash(table: Any, operations: Any) -> Any:
        # The page's link write, not its confirmation of the links as read (which writes them back unchanged).
        if table.table_name == INCIDENTS and any(
                op.kind == "replace" and sync.state._join_json("Link", op.entity, {}) != _as_stored(before[
                    str(op.entity["IncidentId"])]) for op in operations):
            raise RuntimeError("process killed before the page's link write")
        return real(table, operations)

    monkeypatch.setattr(sync.state, "submit", crash)
    run_timer("defender_pull")
    for incident_id in ids:
        assert env.get(a, incident_id)["properties"]["severity"] == "Low", "the Sentinel writes were made"
        link = get_context().state.get_link(a, incident_id)
        assert link is not None and link["defenderVersion"] == before[incident_id]["defenderVersion"], (  # type: ignore[index]
            "the crash came before the links were written")
    assert not _incident_leases(), "the crashed page gave its leases back"
    monkeypatch.setattr(sync.state, "submit", real)
    run_timer("defender_pull")
    _current(a, versions)
    assert len(env.sentinel.all_incidents()) == len(ids), "one mirror each"
    for incident_id in ids:
        assert copies(env, a, incident_id, f"reply on {incident_id}") == 1, incident_id
        assert len(messages(env.sentinel, env.name(a, incident_id))) == 2, "each comment copied once"


def test_a_webhook_sync_during_the_pages_upload_is_not_undone_by_the_page(env: Env) -> None:
    """The pull reads an update's link with its version, before the page's rows are uploaded; the hook syncs it
    after. A webhook that syncs an analyst's edit in between, followed by a Defender user's own change to the same
    field, must not make the page merge against the link as it was before the webhook: that would see the
    analyst's edit as new and write it over the Defender user's change."""
    from emulators.http_spy import observe_requests

    a = env.a
    env.incident(a, "3601")
    pulled(env)
    env.world.update_incident(a, "3601", severity="medium")   # the page's update (version T0)
    injected: list[str] = []

    def meanwhile(request: Any) -> None:
        if injected or "dataCollectionRules" not in str(request.url):
            return
        injected.append("upload")   # the page's first upload: its versions and links are looked up already
        env.analyst(a, "3601", owner="analyst@mssp.example")
        status, body = env.webhook(a, "3601")
        assert status == 200 and body["result"] == "applied", body
        env.world.update_incident(a, "3601", assignedTo="tier2@contoso.example")   # then a Defender user

    with observe_requests(meanwhile):
        run_timer("defender_pull")
    assert injected, "the page uploaded rows"
    assert env.defender(a, "3601")["assignedTo"] == "tier2@contoso.example", "the Defender user's change stands"
    run_timer("defender_pull")
    assert env.defender(a, "3601")["assignedTo"] == "tier2@contoso.example"
    owner = env.get(a, "3601")["properties"]["owner"]
    assert (owner.get("userPrincipalName") or owner.get("email")) == "tier2@contoso.example", owner
