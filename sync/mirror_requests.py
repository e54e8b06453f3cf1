"""Mirror requests of the ``defender-portal`` target: which Defender incidents wait for a mirror, in what order, and
the one place that hands request rows to the Logs Ingestion API, paced for the whole app.

A request's life: *waiting* (recorded by the pull's mirror hook) → *sent* (a row went to
``DefenderMirrorRequests_CL``; the intent is stored before the upload, so a crash in between cannot lead to a second
row before the 30-minute re-request) → *linked* (the mirror rule's incident was found and linked) and purged an hour
later. A sent request with no incident after 30 minutes is waiting again.

Pacing: every row handed to the API, retried calls included, takes one unit of the shared budget
``mirror-requests`` (:class:`~sync.shared_budget.SharedRateBudget`): at most ``SYNC_MIRROR_REQUESTS_PER_MINUTE`` in any
rolling 60 seconds across all instances. The rule turns at most 29 rows a run into their own alerts, so the cap
(≤ 30) keeps every rule run at or under that.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, TableServiceClient, UpdateMode

from .budget import Deadline
from .http import describe_error
from .shared_budget import SharedRateBudget
from .timeutil import format_time, parse_time

log = logging.getLogger(__name__)

TABLE = "syncMirrorRequests"
WAITING, SENT, LINKED = "waiting", "sent", "linked"
REREQUEST_AFTER = timedelta(minutes=30)
KEEP_LINKED = timedelta(minutes=60)
ROW_CHARS = 30_000          # one string property holds 32K UTF-16 units
SEVERITY_RANK = {"high": 0, "medium": 1, "low": 2}   # informational and unknown: 3


def _key(value: str) -> str:
    return "".join("_" if c in "/\\#?" or ord(c) < 32 or 127 <= ord(c) < 160 else c for c in value)


@dataclass
class MirrorRequest:
    """One Defender incident that needs a mirror (or had one requested), with what its request row says."""

    tenant_id: str
    incident_id: str
    state: str
    open: bool
    severity: str
    created: str
    row: dict[str, Any]
    request_id: str | None = None
    sent_at: str | None = None
    attempts: int = 0
    linked_at: str | None = None
    sentinel_name: str | None = None
    etag: str | None = field(default=None, compare=False)


def request_order(request: MirrorRequest) -> tuple[int, int, float]:
    """PRODUCT's order: open before resolved, then severity (high, medium, low, informational/unknown), then
    ``createdDateTime``, newest first."""
    try:
        created = -parse_time(request.created).timestamp()
    except ValueError:
        created = 0.0
    return (0 if request.open else 1, SEVERITY_RANK.get(request.severity.lower(), 3), created)


class MirrorRequestStore:
    """The ``syncMirrorRequests`` table: one entity per Defender incident (partition: tenant)."""

    def __init__(self, service: TableServiceClient) -> None:
        self._service = service
        self._table: TableClient | None = None

    @property
    def table(self) -> TableClient:
        if self._table is None:
            try:
                self._service.create_table(TABLE)
            except ResourceExistsError:
                pass
            self._table = self._service.get_table_client(TABLE)
        return self._table

    def get(self, tenant_id: str, incident_id: str) -> MirrorRequest | None:
        try:
            entity = self.table.get_entity(_key(tenant_id), _key(incident_id))
        except ResourceNotFoundError:
            return None
        return _from_entity(entity)

    def all(self) -> Iterator[MirrorRequest]:
        """Every request of every tenant (the table only holds open work and the last hour's links)."""
        for entity in self.table.list_entities():
            request = _from_entity(entity)
            if request is not None:
                yield request

    def record(self, request: MirrorRequest) -> bool:
        """Create or refresh a waiting request (its order fields and row follow the latest Defender version); a
        request already sent or linked keeps its state. False when another writer changed it first."""
        current = self.get(request.tenant_id, request.incident_id)
        if current is None:
            try:
                self.table.create_entity(_to_entity(request))
            except ResourceExistsError:
                return False
            return True
        if (current.open, current.severity, current.created, current.row) == (
                request.open, request.severity, request.created, request.row):
            return True  # nothing new: no write
        current.open, current.severity, current.created, current.row = (
            request.open, request.severity, request.created, request.row)
        return self.save(current)

    def save(self, request: MirrorRequest) -> bool:
        """Write with the ETag read; False when another instance wrote it in between."""
        try:
            if request.etag is None:
                meta = self.table.create_entity(_to_entity(request))
            else:
                meta = self.table.update_entity(_to_entity(request), mode=UpdateMode.REPLACE, etag=request.etag,
                                                match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
            return False
        request.etag = str(meta.get("etag")) if isinstance(meta, dict) else request.etag
        return True

    def delete(self, request: MirrorRequest) -> None:
        try:
            self.table.delete_entity(_key(request.tenant_id), _key(request.incident_id), etag=request.etag,
                                     match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceNotFoundError):
            pass


def _to_entity(request: MirrorRequest) -> dict[str, Any]:
    row = json.dumps(request.row, separators=(",", ":"), ensure_ascii=False)
    if len(row) > ROW_CHARS:
        raise ValueError(f"mirror request row of incident {request.incident_id} is {len(row)} characters")
    return {"PartitionKey": _key(request.tenant_id), "RowKey": _key(request.incident_id),
            "TenantId": request.tenant_id, "IncidentId": request.incident_id, "State": request.state,
            "Open": request.open, "Severity": request.severity, "Created": request.created, "Row": row,
            "RequestId": request.request_id or "", "SentAt": request.sent_at or "", "Attempts": request.attempts,
            "LinkedAt": request.linked_at or "", "SentinelName": request.sentinel_name or ""}


def _from_entity(entity: Any) -> MirrorRequest | None:
    try:
        row = json.loads(str(entity.get("Row") or "{}"))
        return MirrorRequest(
            tenant_id=str(entity["TenantId"]), incident_id=str(entity["IncidentId"]), state=str(entity["State"]),
            open=bool(entity.get("Open", True)), severity=str(entity.get("Severity") or ""),
            created=str(entity.get("Created") or ""), row=row if isinstance(row, dict) else {},
            request_id=str(entity.get("RequestId") or "") or None, sent_at=str(entity.get("SentAt") or "") or None,
            attempts=int(entity.get("Attempts") or 0), linked_at=str(entity.get("LinkedAt") or "") or None,
            sentinel_name=str(entity.get("SentinelName") or "") or None, etag=str(entity.metadata.get("etag")))
    except (KeyError, TypeError, ValueError):
        log.warning("unreadable mirror request entity; ignored", extra={"action": "mirror-request",
                                                                       "outcome": "unreadable"})
        return None


@dataclass
class RequestSummary:
    """What the defender-portal phases of a run did (the run summary's ``mirrorRequests``)."""

    sent: int = 0
    rerequested: int = 0
    failed: int = 0
    waiting: int = 0
    linked: int = 0
    duplicates: int = 0
    left_alone: int = 0
    rule: str = "unknown"
    problems: list[str] = field(default_factory=list)

    def merged(self, later: RequestSummary) -> RequestSummary:
        """This pass and a later one of the same run, as one."""
        return RequestSummary(self.sent + later.sent, self.rerequested + later.rerequested,
                              self.failed + later.failed, later.waiting, self.linked + later.linked,
                              self.duplicates + later.duplicates, self.left_alone + later.left_alone,
                              later.rule if later.rule != "unknown" else self.rule,
                              list(dict.fromkeys(self.problems + later.problems)))

    def to_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "rerequested": self.rerequested, "failed": self.failed, "waiting": self.waiting,
                "linked": self.linked, "duplicates": self.duplicates, "leftAlone": self.left_alone,
                "rule": self.rule, "problems": self.problems}


def due_for_rerequest(request: MirrorRequest, now: datetime) -> bool:
    """A sent request whose incident has not been linked within 30 minutes."""
    return request.state == SENT and _older_than(request.sent_at, now, REREQUEST_AFTER)


def expired_link(request: MirrorRequest, now: datetime) -> bool:
    """A linked request kept long enough to bound the link listing (an hour)."""
    return request.state == LINKED and _older_than(request.linked_at, now, KEEP_LINKED)


def _older_than(stamp: str | None, now: datetime, age: timedelta) -> bool:
    """Whether ``stamp`` lies ``age`` or more before ``now`` (a missing or unreadable stamp counts as old)."""
    try:
        return not stamp or now - parse_time(stamp) >= age
    except ValueError:
        return True


def link_window_start(requests: Iterable[MirrorRequest], now: datetime) -> datetime | None:
    """Where the link listing starts: the oldest request sent in the last 60 minutes (linked or not), less 10
    minutes; None when nothing was sent in the last hour (then there is nothing to link)."""
    sent: list[datetime] = []
    for r in requests:
        if r.sent_at and r.state in (SENT, LINKED):
            try:
                when = parse_time(r.sent_at)
            except ValueError:
                continue
            if now - when <= timedelta(minutes=60):
                sent.append(when)
    return min(sent) - timedelta(minutes=10) if sent else None


Uploader = Callable[[list[dict[str, Any]]], None]


def mark_sent(requests: list[MirrorRequest], now: datetime) -> list[MirrorRequest]:
    """New request IDs and send times (the intent, stored before the upload)."""
    for r in requests:
        r.request_id = str(uuid.uuid4())
        r.sent_at = format_time(now)
        r.state = SENT
        r.attempts += 1
    return requests


class RequestDispatcher:
    """Sends waiting requests in PRODUCT's order, never faster than the shared budget allows.

    ``upload(rows)`` hands one batch to the Logs Ingestion API in a single call without retries (a retry would hand
    the rows over again without taking budget for them); it raises when the call failed, and then the rows wait for
    a later pass (the units they took stay spent: the service may have stored them).
    """

    def __init__(self, store: MirrorRequestStore, budget: SharedRateBudget, upload: Uploader, *,
                 clock: Callable[[], datetime]) -> None:
        self.store = store
        self.budget = budget
        self.upload = upload
        self.clock = clock

    def dispatch(self, requests: list[MirrorRequest], deadline: Deadline, *, wait: bool,
                 between: Callable[[], None] | None = None,
                 summary: RequestSummary | None = None) -> RequestSummary:
        """Send ``requests`` (the waiting ones, any order) best first. ``wait``: sleep for budget while the
        deadline allows (``between`` runs before each sleep, e.g. to link what the rule made meanwhile); otherwise
        send only what fits now."""
        result = summary if summary is not None else RequestSummary()
        queue = sorted((r for r in requests if r.state == WAITING), key=request_order)
        while queue:
            free = self._free_units(len(queue))
            if free == 0:
                wait_for = self.budget.try_acquire(1)
                if wait_for == 0:
                    free = 1
                elif not wait or deadline.remaining() <= wait_for + 5.0:
                    break
                else:
                    if between is not None:
                        between()
                    self.budget.sleep(wait_for)
                    continue
            batch, queue = queue[:free], queue[free:]
            self._send(batch, result)
        result.waiting = len(queue)
        return result

    def _free_units(self, wanted: int) -> int:
        """Take as many units as are free now, up to ``wanted`` (0: none free)."""
        room = min(wanted, self.budget.per_minute - self.budget.used())
        while room > 0:
            if self.budget.try_acquire(room) == 0:
                return room
            room -= 1  # another instance took some meanwhile
        return 0

    def _send(self, batch: list[MirrorRequest], result: RequestSummary) -> None:
        now = self.clock()
        intended = [r for r in mark_sent(batch, now) if self.store.save(r)]  # the intent, before the upload
        if not intended:
            return
        rows = [request_row(r, now) for r in intended]
        try:
            self.upload(rows)
        except Exception as exc:  # the budget the rows took stays spent either way
            refused = definitely_refused(exc)
            result.failed += len(intended)
            result.problems.append(f"mirror request upload failed: {describe_error(exc)}")
            log.warning("mirror request upload failed", extra={
                "action": "mirror-request", "outcome": "refused" if refused else "unknown", "rows": len(intended),
                "error": describe_error(exc)})
            if refused:  # not stored: the requests wait for a later pass
                for r in intended:
                    r.state, r.sent_at = WAITING, None
                    self.store.save(r)
            # Otherwise the service may have stored them (a timeout, a dropped answer): they stay sent, and the
            # 30-minute re-request covers a row that was really lost, without risking a second incident now.
            return
        result.sent += len(intended)
        for r in intended:
            log.info("mirror requested", extra={"tenantId": r.tenant_id, "incidentId": r.incident_id,
                                                "action": "mirror-request", "outcome": "sent",
                                                "requestId": r.request_id, "attempt": r.attempts})


def definitely_refused(exc: BaseException) -> bool:
    """Whether an upload failure means the rows were not stored: an HTTP answer refusing them (4xx, throttling
    included). Anything else (a timeout, a dropped connection, a 5xx) may have stored them."""
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


def request_row(request: MirrorRequest, now: datetime) -> dict[str, Any]:
    """The row as sent: the stored columns with this request's ID and time."""
    assert request.request_id is not None
    return {**request.row, "TimeGenerated": format_time(now), "RequestId": request.request_id,
            "RecordId": request.request_id}
