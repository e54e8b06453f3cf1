"""Mirror requests (defender-portal target): PRODUCT's order, the pace across instances, the 30-minute re-request,
the link window, and the intent stored before the upload."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from azure.data.tables import TableServiceClient
from hypothesis import given
from hypothesis import strategies as st

from sync.budget import Deadline
from sync.mirror_requests import (
    LINKED,
    SENT,
    WAITING,
    MirrorRequest,
    MirrorRequestStore,
    RequestDispatcher,
    due_for_rerequest,
    link_window_start,
    request_order,
)
from sync.shared_budget import SharedRateBudget

NOW = datetime.now(UTC).replace(microsecond=0)


def req(incident_id: str, *, open_: bool = True, severity: str = "medium", created: datetime | None = None,
        state: str = WAITING, tenant: str = "t1", sent_at: datetime | None = None) -> MirrorRequest:
    return MirrorRequest(tenant_id=tenant, incident_id=incident_id, state=state, open=open_, severity=severity,
                         created=(created or NOW).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                         row={"DefenderTenantId": tenant, "IncidentId": incident_id},
                         sent_at=sent_at.strftime("%Y-%m-%dT%H:%M:%SZ") if sent_at else None)


def test_order_is_open_first_then_severity_then_newest() -> None:
    requests = [
        req("resolved-high", open_=False, severity="high"),
        req("open-low-new", severity="low", created=NOW),
        req("open-high-old", severity="high", created=NOW - timedelta(days=2)),
        req("open-info", severity="informational"),
        req("open-unknown-newer", severity="unknown", created=NOW + timedelta(minutes=1)),
        req("open-high-new", severity="high", created=NOW),
        req("open-medium", severity="medium"),
    ]
    ordered = [r.incident_id for r in sorted(requests, key=request_order)]
    assert ordered == ["open-high-new", "open-high-old", "open-medium", "open-low-new", "open-unknown-newer",
                       "open-info", "resolved-high"]


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["high", "medium", "low", "informational", "unknown"]),
                          st.integers(0, 10_000)), min_size=2, max_size=30))
def test_order_never_puts_resolved_before_open_nor_lower_severity_first(items: list[tuple[bool, str, int]]) -> None:
    rank = {"high": 0, "medium": 1, "low": 2, "informational": 3, "unknown": 3}
    requests = [req(str(i), open_=o, severity=s, created=NOW - timedelta(minutes=m))
                for i, (o, s, m) in enumerate(items)]
    ordered = sorted(requests, key=request_order)
    for a, b in pairwise(ordered):
        assert (not a.open, rank[a.severity]) <= (not b.open, rank[b.severity])
        if (a.open, rank[a.severity]) == (b.open, rank[b.severity]):
            assert a.created >= b.created, "newest first within a class"


def test_rerequest_after_thirty_minutes_only_for_sent_requests() -> None:
    assert due_for_rerequest(req("a", state=SENT, sent_at=NOW - timedelta(minutes=31)), NOW)
    assert not due_for_rerequest(req("a", state=SENT, sent_at=NOW - timedelta(minutes=29)), NOW)
    assert not due_for_rerequest(req("a", state=LINKED, sent_at=NOW - timedelta(minutes=90)), NOW)
    assert not due_for_rerequest(req("a", state=WAITING), NOW)


def test_link_window_is_the_oldest_request_of_the_last_hour_less_ten_minutes() -> None:
    requests = [req("a", state=SENT, sent_at=NOW - timedelta(minutes=50)),
                req("b", state=LINKED, sent_at=NOW - timedelta(minutes=20)),
                req("c", state=SENT, sent_at=NOW - timedelta(minutes=70)),   # older than an hour: not counted
                req("d", state=WAITING)]
    assert link_window_start(requests, NOW) == NOW - timedelta(minutes=60)
    assert link_window_start([req("d")], NOW) is None


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.t += seconds

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)


@pytest.fixture
def service(storage: str) -> TableServiceClient:
    return TableServiceClient.from_connection_string(storage)


def dispatcher(service: TableServiceClient, clock: Clock, uploads: list[tuple[float, list[dict[str, Any]]]],
               per_minute: int = 25, fail: bool = False) -> tuple[RequestDispatcher, MirrorRequestStore]:
    store = MirrorRequestStore(service)
    ledger = service.create_table_if_not_exists("syncLeases")
    budget = SharedRateBudget(ledger, "mirror-requests", per_minute, clock=clock, sleep=clock.sleep)

    def upload(rows: list[dict[str, Any]]) -> None:
        uploads.append((clock(), rows))
        if fail:
            raise ConnectionError("ingestion endpoint unreachable")

    return RequestDispatcher(store, budget, upload, clock=clock.now), store


def test_a_backlog_drains_at_the_pace_in_order(service: TableServiceClient) -> None:
    clock = Clock()
    uploads: list[tuple[float, list[dict[str, Any]]]] = []
    send, store = dispatcher(service, clock, uploads)
    backlog = [req(f"i{i:03d}", severity=["high", "medium", "low"][i % 3], created=NOW - timedelta(minutes=i))
               for i in range(120)]
    for r in backlog:
        assert store.record(r)
    result = send.dispatch(list(store.all()), Deadline(10**6, clock=clock), wait=True)
    assert result.sent == 120 and result.waiting == 0
    sent_ids = [row["IncidentId"] for _, rows in uploads for row in rows]
    assert sent_ids == [r.incident_id for r in sorted(backlog, key=request_order)]
    stamps = [t for t, rows in uploads for _ in rows]
    for i, start in enumerate(stamps):
        assert sum(1 for s in stamps[i:] if s - start < 60.0) <= 25, "never more than 25 rows in 60 seconds"
    minutes = (stamps[-1] - stamps[0]) / 60
    assert 3.9 <= minutes <= 5.0, f"120 rows at 25 a minute take about 4 minutes, not {minutes:.1f}"
    assert all(r.state == SENT and r.request_id for r in store.all())
    rows = [row for _, rows in uploads for row in rows]
    assert all(row["RecordId"] == row["RequestId"] for row in rows)
    assert len({row["RequestId"] for row in rows}) == 120


def test_without_waiting_only_what_fits_now_is_sent(service: TableServiceClient) -> None:
    clock = Clock()
    uploads: list[tuple[float, list[dict[str, Any]]]] = []
    send, store = dispatcher(service, clock, uploads, per_minute=10)
    for i in range(30):
        store.record(req(f"i{i}"))
    result = send.dispatch(list(store.all()), Deadline(10**6, clock=clock), wait=False)
    assert (result.sent, result.waiting) == (10, 20)
    assert sum(1 for r in store.all() if r.state == WAITING) == 20


class Refused(Exception):
    status_code = 400


def test_a_refused_upload_leaves_the_requests_waiting_and_counts_the_rows(service: TableServiceClient) -> None:
    clock = Clock()
    uploads: list[tuple[float, list[dict[str, Any]]]] = []
    send, store = dispatcher(service, clock, uploads, per_minute=5)

    def refuse(rows: list[dict[str, Any]]) -> None:
        uploads.append((clock(), rows))
        raise Refused("400 InvalidStream")

    send.upload = refuse
    for i in range(3):
        store.record(req(f"i{i}"))
    result = send.dispatch(list(store.all()), Deadline(10**6, clock=clock), wait=False)
    assert result.failed == 3 and result.sent == 0
    assert all(r.state == WAITING for r in store.all())
    assert send.budget.used() == 3, "rows handed to the API count against the pace even when the call failed"


def test_an_upload_that_may_have_landed_is_not_sent_again_at_once(service: TableServiceClient) -> None:
    """A dropped connection or a timeout may come after the service stored the rows: sending them again now could
    make a second incident, so they stay sent and only the 30-minute re-request sends them again."""
    clock = Clock()
    uploads: list[tuple[float, list[dict[str, Any]]]] = []
    send, store = dispatcher(service, clock, uploads, per_minute=5, fail=True)
    for i in range(3):
        store.record(req(f"i{i}"))
    result = send.dispatch(list(store.all()), Deadline(10**6, clock=clock), wait=False)
    assert result.failed == 3 and all(r.state == SENT for r in store.all())
    again = send.dispatch(list(store.all()), Deadline(10**6, clock=clock), wait=False)
    assert again.sent == 0 and len(uploads) == 1


def test_a_crash_after_the_intent_does_not_resend_before_thirty_minutes(service: TableServiceClient) -> None:
    """The intent (sent, with its request ID) is stored before the upload: if the process dies during the upload,
    the next pass does not send the row again (which could make a second incident) until 30 minutes pass."""
    clock = Clock()
    uploads: list[tuple[float, list[dict[str, Any]]]] = []
    send, store = dispatcher(service, clock, uploads)
    store.record(req("i1"))

    class Crash(BaseException):
        pass

    def crash(_rows: list[dict[str, Any]]) -> None:
        raise Crash

    send.upload = crash
    with pytest.raises(Crash):
        send.dispatch(list(store.all()), Deadline(100, clock=clock), wait=False)
    (stored,) = list(store.all())
    assert stored.state == SENT and stored.request_id
    again = send.dispatch(list(store.all()), Deadline(100, clock=clock), wait=False)
    assert again.sent == 0 and uploads == []
    clock.sleep(31 * 60)
    assert due_for_rerequest(next(iter(store.all())), clock.now())
