"""The shared rate budget holds across instances: at most N units in any rolling 60 seconds, whoever spends them."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from azure.data.tables import TableServiceClient

from sync.budget import BudgetExhausted, Deadline
from sync.shared_budget import SharedRateBudget


class Clock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


@pytest.fixture
def table(storage: str) -> Any:
    service = TableServiceClient.from_connection_string(storage)
    return service.create_table_if_not_exists("syncLeases")


def spent_in_any_window(stamps: list[float], window: float = 60.0) -> int:
    stamps = sorted(stamps)
    best = 0
    for i, start in enumerate(stamps):
        best = max(best, sum(1 for s in stamps[i:] if s - start < window))
    return best


def test_two_instances_share_one_cap(table: Any) -> None:
    clock = Clock()
    a = SharedRateBudget(table, "mirror-requests", 5, clock=clock)
    b = SharedRateBudget(table, "mirror-requests", 5, clock=clock)
    assert a.try_acquire() == 0.0
    clock.advance(10)
    assert [a.try_acquire() for _ in range(2)] == [0.0] * 2
    assert [b.try_acquire() for _ in range(2)] == [0.0] * 2
    wait = b.try_acquire()
    assert 54.0 < wait <= 55.0, "the sixth unit waits until the first leaves the window (60 s + 5 s to spend it)"
    assert a.try_acquire() > 0 and a.used() == 5
    clock.advance(wait)
    assert a.try_acquire() == 0.0, "one unit left the window: one fits"
    assert b.try_acquire() > 0


def test_units_wider_than_the_cap_are_refused(table: Any) -> None:
    budget = SharedRateBudget(table, "x", 3, clock=Clock())
    with pytest.raises(ValueError, match="never fit"):
        budget.acquire(units=4)


def test_acquire_stops_at_the_deadline_instead_of_sleeping_past_it(table: Any) -> None:
    clock = Clock()
    slept: list[float] = []
    budget = SharedRateBudget(table, "x", 2, clock=clock, sleep=slept.append)
    budget.acquire(units=2)
    with pytest.raises(BudgetExhausted):
        budget.acquire(Deadline(10))
    assert slept == []


def test_blocks_are_dropped_after_their_hold_time(table: Any) -> None:
    clock = Clock()
    a = SharedRateBudget(table, "writes", 10, block=5, hold_seconds=5, clock=clock)
    b = SharedRateBudget(table, "writes", 10, block=5, hold_seconds=5, clock=clock)
    assert a.try_acquire() == 0.0           # takes a block of 5, spends 1
    ops = a.ledger_operations
    assert all(a.try_acquire() == 0.0 for _ in range(4))
    assert a.ledger_operations == ops, "spending a held block costs no Table Storage operation"
    clock.advance(6)                          # nothing held by a any more
    assert b.try_acquire() == 0.0           # b takes the other block of 5
    assert all(b.try_acquire() == 0.0 for _ in range(4))
    assert a.try_acquire() > 0, "the window still counts a's whole block, spent or not"


def test_concurrent_instances_never_exceed_the_cap(table: Any) -> None:
    """Eight threads, each its own instance, with a clock they all see: every spend is stamped, and no 60-second
    window holds more than the cap."""
    clock = Clock()
    spent: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        budget = SharedRateBudget(table, "sentinel-writes", 12, block=3, hold_seconds=5, clock=clock,
                                  sleep=lambda _s: None)
        for _ in range(40):
            if budget.try_acquire() == 0.0:
                with lock:
                    spent.append(clock())
            clock.advance(0.25)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spent, "some units were granted"
    assert spent_in_any_window(spent) <= 12


def test_sentinel_write_cap_is_shared_by_every_instance(make_app_settings: Any) -> None:
    """Two processes' contexts (a queue fan-out) draw Sentinel writes from one ledger, not one cap each."""
    from sync.context import AppContext
    from sync.settings import load_settings

    settings = load_settings(make_app_settings(["00000000-0000-0000-0000-0000000000a1"],
                                               SENTINEL_MAX_WRITES_PER_MINUTE="4"))
    first, second = AppContext(settings), AppContext(settings)
    first_cap, second_cap = first.sentinel._write_limiter, second.sentinel._write_limiter
    assert isinstance(first_cap, SharedRateBudget) and isinstance(second_cap, SharedRateBudget)
    for _ in range(2):
        first_cap.acquire(Deadline(5))
        second_cap.acquire(Deadline(5))
    with pytest.raises(BudgetExhausted):
        second_cap.acquire(Deadline(5))
    assert first_cap.used() == 4
