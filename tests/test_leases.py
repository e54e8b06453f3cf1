"""Issue 8: the lease helper, a lost lease noticed, and tenant state written only over what was read (Azurite)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import apply_settings

from sync.budget import Deadline
from sync.context import get_context
from sync.leases import LeaseGroupKeeper, LeaseKeeper, LeaseLost, lease
from sync.pull import due_letters
from sync.pushback import ReconcileCycle
from sync.state import LEASES, DeadLetter, Lease, StaleWrite, StateStore
from sync.timeutil import format_time, utcnow


@pytest.fixture
def store(storage: str) -> StateStore:
    from azure.data.tables import TableServiceClient

    s = StateStore(TableServiceClient.from_connection_string(storage))
    s.ensure_tables()
    return s


class FailingRenewals(StateStore):
    """A store whose lease renewals fail with a storage error (an outage after the lease was taken)."""

    def renew_lease(self, lease: Lease, seconds: float) -> bool:
        raise OSError("storage unreachable")


def test_a_lease_whose_renewals_keep_failing_counts_as_lost_once_it_expired(store: StateStore) -> None:
    taken = store.acquire_lease("t1", "pull", "me", 0.6)
    assert taken is not None
    keeper = LeaseKeeper(FailingRenewals(store._service), taken, 0.6)
    try:
        assert not keeper.lost
        time.sleep(0.9)
        assert keeper.lost, "the expiry passed without a renewal: another instance may hold it now"
        with pytest.raises(LeaseLost):
            keeper.check()
    finally:
        keeper.release()


def test_the_lease_helper_gives_the_lease_back_whatever_ends_the_block(store: StateStore) -> None:
    with pytest.raises(RuntimeError), lease(store, "t1", "reconcile", "me", 30) as held:
        assert held is not None
        with lease(store, "t1", "reconcile", "other", 30) as busy:
            assert busy is None, "held by another owner"
        raise RuntimeError("a storage error while starting")
    assert not [t for t in threading.enumerate() if t.name.startswith("lease-reconcile") and t.is_alive()]
    with lease(store, "t1", "reconcile", "other", 30) as again:
        assert again is not None, "given back at once"


def test_a_waiting_taker_gets_the_lease_when_it_is_given_back(store: StateStore) -> None:
    done = threading.Event()

    def hold_briefly() -> None:
        with lease(store, "t1", "incident:1", "first", 30):
            done.set()
            time.sleep(0.6)

    worker = threading.Thread(target=hold_briefly)
    worker.start()
    done.wait(5)
    with lease(store, "t1", "incident:1", "second", 30, wait_seconds=5) as held:
        assert held is not None
    worker.join()


def test_tenant_state_is_written_only_over_the_version_read(store: StateStore) -> None:
    first = store.get_tenant("t1")
    first.cursor = format_time(utcnow())
    store.save_tenant(first)
    old_owner, new_owner = store.get_tenant("t1"), store.get_tenant("t1")
    new_owner.cursor = "2099-01-01T00:00:00Z"
    store.save_tenant(new_owner)
    store.save_tenant(new_owner)   # its own ETag follows each write
    old_owner.cursor = first.cursor
    with pytest.raises(StaleWrite):
        store.save_tenant(old_owner)
    assert store.get_tenant("t1").cursor == "2099-01-01T00:00:00Z", "the new owner's progress is kept"
    fresh = store.get_tenant("t2")
    racing = store.get_tenant("t2")
    store.save_tenant(fresh)
    with pytest.raises(StaleWrite):
        store.save_tenant(racing)   # both saw no state: only the first creates it


def test_a_storage_error_at_reconcile_start_leaves_no_lease_behind(
        emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant_id = emulators.world.add_tenant(name="Contoso")
    apply_settings(monkeypatch, make_app_settings([tenant_id]))
    ctx = get_context()
    ctx.state.ensure_tables()
    tenant = ctx.settings.tenants[0]

    def broken_marker(kind: str, tid: str) -> dict[str, Any]:
        raise OSError("the table service answered 503")

    monkeypatch.setattr(ctx.state, "get_marker", broken_marker)
    with pytest.raises(OSError):
        ReconcileCycle(ctx, tenant, deadline=Deadline(60)).start()
    monkeypatch.undo()
    apply_settings(monkeypatch, make_app_settings([tenant_id]))
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("lease-reconcile") and t.is_alive()], \
        "no keeper renews a lease nobody holds"
    assert not list(ctx.state.table(LEASES).list_entities()), "the lease was given back"
    again = ReconcileCycle(ctx, tenant, deadline=Deadline(60))
    assert again.start(), "the next run for the tenant is not skipped"
    again.finish("success")


def letter(key: str, next_attempt: str | None, kind: str = "mirror") -> DeadLetter:
    return DeadLetter("t1", kind, key, "boom", 1, "2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z",
                      next_attempt_at=next_attempt)


def test_due_letters_come_longest_waiting_first_and_skip_those_backing_off() -> None:
    now = utcnow()
    past = format_time(now.replace(microsecond=0))
    letters = [letter("late", format_time(now.replace(year=now.year + 1))),
               letter("recent", past), letter("legacy", None), letter("ingest", None, kind="ingest"),
               letter("oldest", format_time(now.replace(year=now.year - 1)))]
    due = due_letters(letters, ("mirror",), now)
    assert [d.key for d in due] == ["legacy", "oldest", "recent"]


def test_a_pages_leases_are_taken_renewed_and_given_back_together(store: StateStore) -> None:
    held = store.acquire_lease("t9", "incident:2", "another", 60)
    expired = store.acquire_lease("t9", "incident:3", "gone", 0.01)
    assert held is not None and expired is not None
    time.sleep(0.05)
    taken = store.acquire_leases("t9", [f"incident:{n}" for n in range(1, 5)], "page", 1.5)
    assert taken["incident:2"] is None, "another owner's lease is left to it"
    assert all(taken[f"incident:{n}"] is not None for n in (1, 3, 4)), "an expired one is taken over"
    leases = [lease_ for lease_ in taken.values() if lease_ is not None]
    first = {lease_.scope: lease_.expires_at for lease_ in leases}
    keeper = LeaseGroupKeeper(store, leases, 1.5)
    time.sleep(1.2)   # past the first expiry margin: renewed meanwhile
    assert not keeper.lost and all(lease_.expires_at > first[lease_.scope] for lease_ in leases)
    keeper.release()
    rows = {str(e["RowKey"]) for e in store.table(LEASES).list_entities() if str(e["RowKey"]).endswith("|t9")}
    assert rows == {"incident:2|t9"}, "the page's leases are given back, the other owner's kept"


def test_a_page_lease_taken_by_another_owner_counts_the_group_lost(store: StateStore) -> None:
    taken = store.acquire_leases("t10", ["incident:1", "incident:2"], "page", 0.9)
    leases = [lease_ for lease_ in taken.values() if lease_ is not None]
    keeper = LeaseGroupKeeper(store, leases, 0.9)
    table = store.table(LEASES)
    stolen = dict(table.get_entity("lease", "incident:2|t10"))
    table.upsert_entity({**stolen, "Owner": "thief"})   # another owner took it over meanwhile
    time.sleep(0.6)
    assert keeper.lost
    with pytest.raises(LeaseLost):
        keeper.check()
    keeper.release()
    assert table.get_entity("lease", "incident:2|t10")["Owner"] == "thief", "never given back over the thief"
