"""End to end: the pull's page-level mirror hook keeps its Table Storage savings safe.

An incident the pull never stored has no link (not read); the page's new links are written in transactions; an
overlap re-read of a version already handed to the hook skips it. Each test covers what happens when one of those
assumptions meets a state it did not expect: a link that exists anyway, a crash before the links are written, a
mode or filter change that makes re-read incidents mirror-worthy.
"""

from __future__ import annotations

from typing import Any

import pytest
from harness import run_timer
from test_twoway_e2e import Env, comment, messages

import sync.context
import sync.state
from sync.context import get_context
from sync.state import INCIDENTS, _key


@pytest.fixture
def env(emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(emulators, make_app_settings, monkeypatch)


def _links(tenant: str) -> dict[str, dict[str, Any]]:
    return dict(get_context().state.iter_links(tenant))


def _mirrors(env: Env) -> list[str]:
    """Names of every Sentinel incident in the workspace."""
    return [str(i["name"]) for i in env.sentinel.all_incidents()]


def test_a_link_that_exists_for_a_never_stored_incident_is_merged_not_duplicated(env: Env) -> None:
    a = env.a
    env.incident(a, "3101", comments=[comment("first look")])
    env.configure()
    name = env.name(a, "3101")
    # A link the pull's versions do not know of (its version state was lost; or an older app wrote it), naming a
    # mirror that is not in the workspace: the pull creates the mirror blind, its link create conflicts, and the
    # leased sync merges against the link as stored.
    get_context().state.save_link(a, "3101", {"sentinelName": name, "state": "active", "base": {
        "status": "active", "owner": None, "classification": None, "determination": None, "tags": []},
        "defenderVersion": "2000-01-01T00:00:00.0000000Z", "sentinelComments": 0, "defenderComments": 0},
        etag=None)
    run_timer("defender_pull")
    assert [n.lower() for n in _mirrors(env)] == [name.lower()], "one mirror"
    link = _links(a)["3101"]
    assert link["sentinelName"] == name and link["state"] == "active", "the link as it was, not replaced"
    assert link["defenderVersion"] > "2000", "and merged with this version"
    assert len(messages(env.sentinel, name)) == 1, "the comment copied once"
    run_timer("defender_pull")
    assert len(messages(env.sentinel, name)) == 1 and len(_mirrors(env)) == 1


def test_a_crash_before_the_links_are_written_is_repaired_by_the_next_run(env: Env,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    a = env.a
    ids = [str(3200 + i) for i in range(12)]
    for incident_id in ids:
        env.incident(a, incident_id, comments=[comment(f"note on {incident_id}")])
    env.configure()
    real = sync.state.submit

    def crash(table: Any, operations: Any) -> Any:
        if any(op.kind == "insert" for op in operations):
            raise RuntimeError("process killed before the links' transaction")
        return real(table, operations)

    monkeypatch.setattr(sync.state, "submit", crash)
    run_timer("defender_pull")
    assert len(_mirrors(env)) == len(ids) and not _links(a), "mirrored, no link written"
    stored = get_context().state.get_versions(a, ids)
    assert all(v.mirrored for v in stored.values()) and len(stored) == len(ids), "versions stored before the hook"
    monkeypatch.setattr(sync.state, "submit", real)
    run_timer("defender_pull")  # the page was not checkpointed: read again, and its hook runs again
    assert len(_mirrors(env)) == len(ids), "exactly one mirror per incident"
    links = _links(a)
    assert sorted(links) == ids, "every link present"
    for incident_id in ids:
        assert links[incident_id]["sentinelName"] == env.name(a, incident_id)
        assert len(messages(env.sentinel, env.name(a, incident_id))) == 1, "no comment copied twice"


@pytest.mark.parametrize("before, after", [
    ({"mode": "data-only"}, {"mode": "sync"}),
    ({"minSeverity": "high"}, {"minSeverity": "medium"}),
])
def test_re_read_incidents_are_mirrored_once_a_change_brings_them_in_scope(env: Env, before: dict[str, Any],
                                                                         after: dict[str, Any]) -> None:
    a = env.a
    env.incident(a, "3301", severity="medium")
    env.configure({a: before})
    run_timer("defender_pull")
    assert not _mirrors(env)
    version = get_context().state.get_versions(a, ["3301"])["3301"]
    assert not version.mirrored
    env.configure({a: after})
    run_timer("defender_pull")  # nothing changed in Defender: the overlap re-reads the stored version
    assert [n.lower() for n in _mirrors(env)] == [env.name(a, "3301").lower()]
    assert "3301" in _links(a)


def test_an_older_version_entity_without_the_mark_is_handed_to_the_hook(env: Env) -> None:
    a = env.a
    env.incident(a, "3401")
    env.configure()
    run_timer("defender_pull")
    table = get_context().state.table(INCIDENTS)
    entity = table.get_entity(_key(a), "3401")
    del entity["Mirrored"]   # as an older app stored it
    table.update_entity(entity, mode=sync.state.UpdateMode.REPLACE)
    tenants = get_context().state.table(sync.state.TENANTS)
    progress = tenants.get_entity("tenant", _key(a))
    for name in [k for k in progress if k.startswith("Recent")]:
        del progress[name]  # nor did it remember recent versions in the tenant's state
    tenants.update_entity(progress, mode=sync.state.UpdateMode.REPLACE)
    table.delete_entity(_key(a), "3401" + sync.state.LINK_SUFFIX)
    run_timer("defender_pull")
    assert "3401" in _links(a), "hooked again: linked"
    assert len(_mirrors(env)) == 1


def _as_an_earlier_version_stored_them(tenant: str) -> None:
    """Move the tenant's links back where versions before this one kept them (the links table, keyed by incident)."""
    state = get_context().state
    for incident_id, _ in list(state.iter_links(tenant)):
        entity = state.table(INCIDENTS).get_entity(_key(tenant), _key(incident_id) + sync.state.LINK_SUFFIX)
        old = {k: v for k, v in entity.items() if k != "IsLink"}
        state.table(sync.state.LINKS).create_entity({**old, "RowKey": _key(incident_id)})
        state.table(INCIDENTS).delete_entity(_key(tenant), _key(incident_id) + sync.state.LINK_SUFFIX)
    pk, rk = sync.state._marker_key(sync.state.LINKS_MOVED, "all")
    state.table(sync.state.TENANTS).delete_entity(pk, rk)   # nor did it say every link is moved


def test_links_an_earlier_version_kept_in_the_links_table_are_moved_and_kept(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    a = env.a
    env.incident(a, "3501", comments=[comment("first look")])
    env.incident(a, "3502")
    env.configure()
    run_timer("defender_pull")
    _as_an_earlier_version_stored_them(a)
    monkeypatch.setattr(sync.context, "_context", None)   # the upgraded app starts: a new process
    # A webhook before the first pull (which moves them all) finds its link where it was, and moves it.
    env.analyst(a, "3502", status="Closed", classification="TruePositive", classification_reason="SuspiciousActivity")
    status, body = env.webhook(a, "3502")
    assert status == 200 and body["result"] == "applied", body
    assert env.defender(a, "3502")["status"] == "resolved"
    # The pull merges a Defender update against the earlier link: no second mirror, no second comment.
    env.world.update_incident(a, "3501", severity="low")
    run_timer("defender_pull")
    assert env.get(a, "3501")["properties"]["severity"] == "Low"
    assert len(_mirrors(env)) == 2 and len(messages(env.sentinel, env.name(a, "3501"))) == 1
    assert set(_links(a)) == {"3501", "3502"}
    legacy = get_context().state.table(sync.state.LINKS)
    assert not [e for e in legacy.list_entities() if e["PartitionKey"] != sync.state.NAME_INDEX], "all moved"
    run_timer("defender_pull")
    assert len(_mirrors(env)) == 2 and len(messages(env.sentinel, env.name(a, "3501"))) == 1
