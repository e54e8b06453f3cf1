"""A one-minute schedule is affordable: an idle tenant costs one Graph request and at most two Table Storage
operations per run, a first run over the look-back spends one request (not one per day), and the lease kept in the
tenant's state still lets only one instance work a tenant."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import apply_settings
from harness import run_timer
from requests.adapters import HTTPAdapter

from sync.budget import Deadline
from sync.context import get_context
from sync.pull import TenantPull


@pytest.fixture
def table_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Table Storage requests the app sends, by HTTP method (the table endpoint's host:port)."""
    calls: Counter[str] = Counter()
    original = HTTPAdapter.send

    def send(adapter: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if urlsplit(str(request.url)).path.startswith("/devstoreaccount1/sync"):  # the state tables
            calls[str(request.method)] += 1
        return original(adapter, request, *args, **kwargs)

    monkeypatch.setattr(HTTPAdapter, "send", send)
    yield calls


def graph_lists(emulators: Any) -> int:
    return len([e for e in emulators.log.entries(service="graph") if e.path.rstrip("/").endswith("security/incidents")])


def assert_idle_runs(emulators: Any, table_calls: Counter[str], runs: int = 2) -> None:
    """Each of ``runs`` pulls with nothing new costs one Graph request and at most two Table operations."""
    for _ in range(runs):
        lists0 = graph_lists(emulators)
        table_calls.clear()
        run_timer("defender_pull")
        assert graph_lists(emulators) - lists0 == 1
        assert sum(table_calls.values()) <= 2, f"an idle run's Table operations: {dict(table_calls)}"


def test_an_idle_run_costs_one_graph_request_and_two_table_operations(
        emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch, table_calls: Counter[str]) -> None:
    world = emulators.world
    tenant = world.add_tenant(name="Quiet")
    world.generate(5, tenant, 8)
    apply_settings(monkeypatch, make_app_settings([tenant], SYNC_OVERLAP_SECONDS="0"))
    lists0 = graph_lists(emulators)
    run_timer("defender_pull")
    assert len(world.rows("DefenderIncidents_CL")) == 8
    assert graph_lists(emulators) - lists0 == 1, "a first run over the 7-day look-back reads 8 incidents at once"
    assert_idle_runs(emulators, table_calls)
    status = get_context().state.get_tenant(tenant)
    assert status.last_run and status.last_run["outcome"] == "success" and status.lease_owner is None


def test_an_idle_run_re_reading_the_overlap_still_costs_two_table_operations(
        emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch, table_calls: Counter[str]) -> None:
    """The overlap re-reads the last minutes' updates every run (mirrored ones here): the versions the last steps
    stored are kept in the tenant's state, so re-reading them needs no Table read. A newer version is still seen."""
    world = emulators.world
    tenant = world.add_tenant(name="Recent")
    world.generate(7, tenant, 8)
    apply_settings(monkeypatch, make_app_settings([tenant]))  # mirrored, default overlap
    run_timer("defender_pull")
    changed = world.incident_ids(tenant)[:3]
    for incident_id in changed:
        world.update_incident(tenant, incident_id, {"severity": "high"})
    run_timer("defender_pull")
    assert len(world.rows("DefenderIncidents_CL")) == 11
    assert_idle_runs(emulators, table_calls)
    assert len(world.rows("DefenderIncidents_CL")) == 11, "nothing stored twice"
    world.update_incident(tenant, changed[0], {"severity": "low"})
    run_timer("defender_pull")
    assert len(world.rows("DefenderIncidents_CL")) == 12, "a newer version of a remembered incident is stored"


def test_the_lease_in_the_tenant_state_keeps_a_second_instance_out(
        emulators: Any, one_tenant: Any) -> None:
    world, tenant = one_tenant("Busy", 6, 400, SYNC_GRAPH_PAGE_SIZE="50")  # three steps of 150 at most
    ctx = get_context()
    ctx.state.ensure_tables()
    config = ctx.settings.tenants[0]
    first, late = (TenantPull(ctx, config, deadline=Deadline(120)) for _ in range(2))
    assert first.start() and late.start(), "both read the state before either took the lease"
    assert first.step() and first.step(), "the first takes the lease with its first page of incidents"
    assert ctx.state.get_tenant(tenant).lease_owner == first.owner
    assert not late.step(), "the state changed since it read it: it does not ingest"
    assert late.finish("success").outcome == "skipped"
    third = TenantPull(ctx, config, deadline=Deadline(120))
    assert not third.start() and third.summary.outcome == "skipped", "a held lease keeps new runs out"
    while first.step():
        pass
    assert first.finish("success").outcome == "success"
    assert ctx.state.get_tenant(tenant).lease_owner is None, "the last write gave the lease back"
    assert len(world.rows("DefenderIncidents_CL")) == 400, "every incident once"


def test_a_dead_letter_marks_its_tenant_due_and_an_idle_run_skips_the_letters(
        emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = emulators.world.add_tenant(name="Letters")
    apply_settings(monkeypatch, make_app_settings([tenant]))
    run_timer("defender_pull")
    store = get_context().state
    state = store.get_tenant(tenant)
    assert state.letters_tracked and state.letters_due_at is None, "no letter pending: idle runs skip the query"
    store.dead_letter(tenant, "incident", "42", "alerts could not be read")
    assert store.get_tenant(tenant).letters_due_at is not None, "the next run looks at its letters"
    run_timer("defender_pull")
    assert not list(store.dead_letters(tenant)), "retried: the incident is gone, so the letter is resolved"
    run_timer("defender_pull")
    assert store.get_tenant(tenant).letters_due_at is None, "none pending any more: idle runs skip the query again"


def test_a_page_never_uses_the_versions_read_for_the_page_before() -> None:
    """Page 1 held only known versions (their look-up kept for it); page 2 needs writes for another reason (an
    incident whose alerts could not be read) before any look-up: it must not reuse page 1's versions, or its
    incidents would look new and their rows would be ingested twice."""
    from types import SimpleNamespace

    from sync.pull import TenantPull
    from sync.state import IncidentVersion, TenantState

    stamp = "2025-01-01T00:00:00.0000000Z"
    known = {i: IncidentVersion(i, stamp) for i in ("1", "2", "3")}
    store = SimpleNamespace(get_versions=lambda _tid, ids: {i: known[i] for i in ids if i in known})
    pull = TenantPull.__new__(TenantPull)
    pull.ctx = SimpleNamespace(state=store)  # type: ignore[assignment]
    pull.tenant = SimpleNamespace(tenant_id="t", mirrors=False)  # type: ignore[assignment]
    pull.hook = None
    pull._prefetched = None
    pull._state = TenantState("t")  # nothing remembered: the versions are looked up
    pull._may_be_known = lambda _incident: True  # type: ignore[method-assign]

    def incident(i: str) -> dict[str, str]:
        return {"id": i, "lastUpdateDateTime": stamp, "createdDateTime": "2024-12-01T00:00:00Z"}

    assert pull._needs_writes([incident("1")]) is False
    assert pull._needs_writes([incident("2"), {**incident("3"), "_alertsError": "boom"}]) is True
    assert pull._prefetched is None, "page 2 would have been processed with page 1's versions"
