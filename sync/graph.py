"""Microsoft Graph security client: incidents (keyset paging over time), alerts, PATCH, comments.

It knows HTTP and paging and nothing of Sentinel, Log Analytics or Table Storage.

Why the main walk never follows ``@odata.nextLink``
---------------------------------------------------
Graph lists incidents newest first by ``lastUpdateDateTime`` and its ``nextLink`` pages by offset (``$skip``).
Paging a fixed window ``[lower, upper]`` by offset loses records: an incident updated mid-walk gets a new
``lastUpdateDateTime`` (> ``upper``), leaves the filtered set, and every record after it moves up one offset, so
the record at the next page boundary is never returned. Instead each page is its own query on a moving time
boundary (keyset, descending)::

    $filter=lastUpdateDateTime ge {lower} and lastUpdateDateTime le {B}   $top=n   $expand=alerts

A single response is a consistent snapshot, so after a page whose oldest timestamp is ``B'`` every record in
``(B', B]`` was in that page; the next query is ``le B'`` and skips the ids already seen at exactly ``B'``. Updates
between queries only remove records from the window, which cannot hide a record from a later snapshot.

Ties: when a full page shares one timestamp ``T`` the boundary cannot move. For ``T`` only, the client pages
``lastUpdateDateTime eq T`` by ``nextLink``/``$skip`` in *passes* and stops after a pass that provably saw every
record still at ``T`` (see :meth:`GraphSecurityClient._walk_ties`), then continues with ``lt T``.

Timestamps in filters are Graph's own strings (7 fractional digits) when they come from a record, so equality at
the boundary is exact; comparisons use :func:`sync.timeutil.canonical_time`, which keeps all 7 digits.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from . import jsonio
from .budget import Deadline
from .http import ApiError, BearerSession, CallStats
from .timeutil import canonical_time

log = logging.getLogger(__name__)

#: Without it Graph reads evolvable enum members (status ``awaitingAction``, newer sources) as ``unknownFutureValue``.
PREFER_HEADERS: Mapping[str, str] = {"Prefer": "include-unknown-enum-members"}

DEGRADED_SMALLER = "smaller-pages"
DEGRADED_ALERTS = "alerts-per-incident"
#: A page was not newest first: the rest of that window is read by offset passes (keyset paging needs the order).
DEGRADED_ORDER = "offset-window"
#: Offset passes over a tie group (or a degraded window) never settled: the union of every pass was taken.
DEGRADED_UNSETTLED = "unsettled-order"

#: Attempts for a downsized retry of a page that already failed through the full retry ladder.
DEGRADED_ATTEMPTS = 2
#: Offset passes over one tie set that show no shrinking before giving up. A pass that saw the set shrink is
#: progress (the set is finite), so only passes without it count; with a stable order among ties none happen.
MAX_STALE_PASSES = 4
MAX_PAGES_PER_PASS = 10_000


class GraphResponseError(ApiError):
    """Graph answered successfully but the body is not what the contract promises (names what was wrong)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, status, "invalidResponse")

    @property
    def transient(self) -> bool:
        """A malformed body is not retried by the HTTP layer; callers decide (usually: stop and report)."""
        return False


def graph_time(value: datetime) -> str:
    """Format a datetime the way Graph writes times: UTC, 7 fractional digits, ``Z``."""
    if value.tzinfo is None:
        raise ValueError("graph_time needs a timezone-aware datetime")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


@dataclass(frozen=True)
class KeysetPosition:
    """Resume point inside a time window (JSON-serialisable via :meth:`to_dict`/:meth:`from_dict`).

    Invariant: every incident of the window with ``lastUpdateDateTime`` newer than ``upper`` has been returned,
    and so have the incidents in ``seen_ids``, which all had ``lastUpdateDateTime == upper``.
    """

    upper: str
    seen_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"upper": self.upper, "seenIds": list(self.seen_ids)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeysetPosition:
        """Inverse of :meth:`to_dict`; raises ValueError on a malformed value."""
        if not isinstance(data, Mapping):
            raise ValueError(f"keyset position must be an object, got {type(data).__name__}")
        upper = data.get("upper")
        seen = data.get("seenIds", [])
        if not isinstance(upper, str):
            raise ValueError("keyset position needs a string 'upper'")
        canonical_time(upper)  # raises ValueError naming the value
        if not isinstance(seen, list | tuple) or not all(isinstance(i, str) for i in seen):
            raise ValueError("keyset position 'seenIds' must be a list of strings")
        return cls(upper, tuple(seen))


@dataclass
class IncidentPage:
    """One step of a walk: the incidents to process and where to resume after processing them."""

    incidents: list[dict[str, Any]]
    position: KeysetPosition
    requests: int
    degraded: str | None = None
    #: What the walk gave up on the way (for the run's summary); non-empty pages may repeat incidents already read.
    warnings: list[str] = field(default_factory=list)
    may_repeat: bool = False


@dataclass
class _WalkMode:
    """Per-walk list settings; degradation is sticky for the rest of the walk (a failed size will fail again)."""

    top: int
    expand: bool
    page_size: int
    min_page_size: int
    degraded: str | None = None

    def degrade(self) -> bool:
        """Step down one level; False when nothing is left to try."""
        if self.expand and self.top > self.min_page_size:
            self.top = max(self.min_page_size, self.top // 2)
            self.degraded = DEGRADED_SMALLER
            return True
        if self.expand:
            # Without $expand the list is cheap again; alerts come from alerts_v2, one request per incident.
            self.expand = False
            self.top = self.page_size
            self.degraded = DEGRADED_ALERTS
            return True
        return False


@dataclass
class _ListPage:
    records: list[dict[str, Any]]
    keys: list[str]                    # canonical_time of each record's lastUpdateDateTime
    next_link: str | None
    top: int
    restarted: bool                    # a nextLink page failed and this is page 0 of the query at a smaller size

    @property
    def full(self) -> bool:
        """More may follow: as many records as asked for, or the server says so."""
        return len(self.records) >= self.top or self.next_link is not None


@dataclass
class _Pending:
    """Requests of pages that had nothing new to report, carried to the next reported page."""

    requests: int = 0
    mark: int = field(default=0, repr=False)   # session request count when the pending span started
    warnings: list[str] = field(default_factory=list)


class GraphSecurityClient:
    """Client for ``{endpoint}/v1.0/security``. One instance per tenant (its session holds that tenant's token)."""

    def __init__(self, session: BearerSession, endpoint: str, *, page_size: int = 50, min_page_size: int = 5) -> None:
        parts = urlsplit(endpoint.strip())
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise ValueError(f"GRAPH_ENDPOINT must be an absolute http(s) URL, got {endpoint!r}")
        if page_size < 1 or min_page_size < 1:
            raise ValueError(f"page sizes must be at least 1, got {page_size} and {min_page_size}")
        self.session = session
        self.endpoint = endpoint.strip().rstrip("/")
        self.page_size = page_size
        self.min_page_size = min(min_page_size, page_size)   # a small configured page needs no shrinking floor
        self._base = f"{self.endpoint}/v1.0/security"
        self._origin = (parts.scheme.lower(), parts.netloc.lower())

    @property
    def stats(self) -> CallStats:
        """The session's counters (requests, throttled, retries, writes) and the client's ``extra`` counts."""
        return self.session.stats

    # ------------------------------------------------------------------ incidents: the walk
    def iter_incident_pages(self, lower: datetime, upper: datetime, *, resume: KeysetPosition | None = None,
                            deadline: Deadline) -> Iterator[IncidentPage]:
        """Every incident with ``lower <= lastUpdateDateTime <= upper``, newest first, in pages.

        Guarantee: each incident whose ``lastUpdateDateTime`` stays inside the window during the walk is yielded
        exactly once (also across a stop and ``resume=page.position``); an incident updated during the walk leaves
        the window (its new time is after ``upper``) and may or may not appear. The iterator ends after the last
        page; :class:`~sync.budget.BudgetExhausted` or :class:`~sync.http.ApiError` may end it early, in which case
        the position of the last page yielded is the place to resume.
        """
        if lower > upper:
            raise ValueError("lower must not be after upper")
        lower_s = graph_time(lower)
        upper_key = canonical_time(graph_time(upper))
        if resume is None:
            bound, seen = graph_time(upper), set[str]()
        else:
            if canonical_time(resume.upper) > upper_key:
                raise ValueError(f"resume position {resume.upper} lies after the window's upper bound")
            bound, seen = resume.upper, set(resume.seen_ids)
        bound_key = canonical_time(bound)
        bound_done = False        # True once every record at `bound` was read: then query `lt bound`
        tie_next = False          # the last page was full and all at `bound`: the keyset cannot move
        mode = _WalkMode(self.page_size, True, self.page_size, self.min_page_size)
        pending = _Pending(mark=self.stats.requests)
        while True:
            if not bound_done and (tie_next or len(seen) >= mode.top):
                yield from self._walk_ties(bound, seen, mode, pending, deadline)
                bound_done, tie_next = True, False
                continue
            op = "lt" if bound_done else "le"
            filt = f"lastUpdateDateTime ge {lower_s} and lastUpdateDateTime {op} {bound}"
            page = self._list_page(mode, filt, deadline)
            if not self._check_keyset_page(page, lower_s, op, bound):
                # Keyset paging is unsafe without the order; offset passes over the rest of the window are not.
                self._warn(pending, DEGRADED_ORDER, f"Graph returned incidents not newest first in [{lower_s}, "
                           f"{op} {bound}]; that window was read by offset passes")
                fixed = functools.partial(KeysetPosition, bound, tuple(sorted(seen)))
                yield from self._walk_offset(filt, None, set(seen) if not bound_done else set(), fixed, mode,
                                             pending, deadline)
                return
            if not page.records:
                yield self._emit([], KeysetPosition(bound, tuple(sorted(seen))), pending, mode)
                return
            new = [r for k, r in zip(page.keys, page.records, strict=True)
                   if not (k == bound_key and r["id"] in seen)]
            self._complete_alerts(new, mode, deadline)
            oldest_key = page.keys[-1]
            if oldest_key == bound_key and not bound_done:
                seen.update(r["id"] for r in page.records)
            else:
                # Keep Graph's own string for the new boundary so `eq`/`le` match it exactly.
                at_oldest = [r for k, r in zip(page.keys, page.records, strict=True) if k == oldest_key]
                bound, bound_key = at_oldest[-1]["lastUpdateDateTime"], oldest_key
                seen = {r["id"] for r in at_oldest}
                bound_done = False
            position = KeysetPosition(bound, tuple(sorted(seen)))
            if not page.full:
                yield self._emit(new, position, pending, mode)
                return
            tie_next = page.keys[0] == page.keys[-1]
            if new:
                yield self._emit(new, position, pending, mode)

    def _walk_ties(self, ts: str, seen: set[str], mode: _WalkMode, pending: _Pending,
                   deadline: Deadline) -> Iterator[IncidentPage]:
        """Read every incident at exactly ``ts`` not in ``seen`` (updated in place), by offset passes.

        Offset paging over ``eq ts`` is only unsafe because records leave the set (an update moves them past
        ``upper``); none can join it, as ``ts`` is in the past. Let ``c`` be the number of records a complete
        pass returned and ``S(t)`` the set at time ``t``. A pass's last page is partial, so at that moment
        ``|S| <= c`` (the page at offset ``s`` returned ``|S| - s`` records, or none with ``|S| <= s``). If the
        next pass B returns ``c_B`` distinct records, they were all in ``S(start_B)``, so
        ``c_B <= |S(start_B)| <= |S(end_A)| <= c_A``. Hence ``c_B == c_A`` with no duplicate forces
        ``B == S(start_B)``: B saw every record still at ``ts`` when it started. A single-request pass is a
        snapshot and needs no second pass. No order among ties is assumed.

        When the passes never settle (a service that orders ties differently on every request), the union of every
        pass is taken after :data:`MAX_STALE_PASSES` and the walk moves on, reported, instead of stalling for ever.
        """
        key = canonical_time(ts)
        yield from self._walk_offset(f"lastUpdateDateTime eq {ts}", key, seen,
                                     lambda: KeysetPosition(ts, tuple(sorted(seen))), mode, pending, deadline)

    def _walk_offset(self, filt: str, key: str | None, seen: set[str], position: Callable[[], KeysetPosition],
                     mode: _WalkMode, pending: _Pending, deadline: Deadline) -> Iterator[IncidentPage]:
        """Every record of ``filt`` not in ``seen`` by offset passes (see :meth:`_walk_ties`); ``key``: the one
        timestamp every record must have (a tie group), or None for a degraded window whose pages may repeat
        incidents already read (its position cannot move until the window is done)."""
        previous: int | None = None
        stale = 0
        while True:
            count, pages, ids, duplicate = 0, 0, set[str](), False
            link: str | None = None
            while True:
                page = self._list_page(mode, filt, deadline, next_link=link)
                if page.restarted:
                    count, pages, ids, duplicate = 0, 0, set(), False
                pages += 1
                if pages > MAX_PAGES_PER_PASS:
                    raise GraphResponseError(f"{filt}: more than {MAX_PAGES_PER_PASS} pages in one pass")
                for k, record in zip(page.keys, page.records, strict=True):
                    if key is not None and k != key:
                        raise GraphResponseError(
                            f"incident {record['id']}: lastUpdateDateTime {record['lastUpdateDateTime']} does not "
                            f"match the filter '{filt}'", 200)
                    duplicate = duplicate or record["id"] in ids
                    ids.add(record["id"])
                count += len(page.records)
                new = [r for r in page.records if r["id"] not in seen]
                seen.update(r["id"] for r in new)
                self._complete_alerts(new, mode, deadline)
                if new:
                    emitted = self._emit(new, position(), pending, mode)
                    emitted.may_repeat = key is None
                    yield emitted
                if not page.full:
                    break
                nxt = page.next_link or self._incidents_url(filt, mode.top, mode.expand, skip=count)
                if nxt == link:
                    raise GraphResponseError(f"{filt}: @odata.nextLink does not advance", 200)
                link = nxt
            if (pages == 1 or count == previous) and not duplicate:
                return
            if previous is not None and count >= previous:
                stale += 1
                if stale >= MAX_STALE_PASSES:
                    self._warn(pending, DEGRADED_UNSETTLED, f"{filt}: {stale} offset passes did not settle (the "
                               f"order among equal timestamps is not stable); moved on with the {len(seen)} "
                               "incidents read, others are read when they next change")
                    return
            previous = count

    def _warn(self, pending: _Pending, kind: str, text: str) -> None:
        log.warning(text, extra={"action": "graph-degrade", "outcome": kind})
        self.stats.extra[f"degraded:{kind}"] = self.stats.extra.get(f"degraded:{kind}", 0) + 1
        pending.warnings.append(text)

    def _list_page(self, mode: _WalkMode, filt: str, deadline: Deadline, next_link: str | None = None) -> _ListPage:
        """One incidents list request, degrading ($top halved, then no $expand) on persistent server errors."""
        url = next_link or self._incidents_url(filt, mode.top, mode.expand)
        attempts: int | None = None
        restarted = False
        while True:
            try:
                data = self._get_json(url, deadline, attempts=attempts)
                break
            except GraphResponseError:
                raise
            except ApiError as exc:
                if not _degradable(exc) or not mode.degrade():
                    raise
                log.warning("incidents page failed; degrading", extra={
                    "action": "graph-degrade", "outcome": mode.degraded, "status": exc.status, "top": mode.top})
                self.stats.extra[f"degraded:{mode.degraded}"] = self.stats.extra.get(f"degraded:{mode.degraded}",
                                                                                     0) + 1
                # The first downsized tries are short: the size was the suspect. The last resort gets full retries.
                attempts = DEGRADED_ATTEMPTS if mode.expand else None
                restarted = restarted or next_link is not None
                url = self._incidents_url(filt, mode.top, mode.expand)
        records = _value_list(data, "incidents list")
        keys = [_check_incident(r, f"incidents list item {n}") for n, r in enumerate(records)]
        link = self._next_link(data)
        return _ListPage(records, keys, link, mode.top, restarted)

    @staticmethod
    def _check_keyset_page(page: _ListPage, lower_s: str, op: str, bound: str) -> bool:
        """Records outside the filter fail loudly; False when the page is not newest first (keyset unsafe)."""
        lo, hi = canonical_time(lower_s), canonical_time(bound)
        for key, record in zip(page.keys, page.records, strict=True):
            if key < lo or key > hi or (op == "lt" and key == hi):
                raise GraphResponseError(
                    f"incident {record['id']}: lastUpdateDateTime {record['lastUpdateDateTime']} is outside the "
                    f"filter [{lower_s}, {op} {bound}]", 200)
        return all(page.keys[n] <= page.keys[n - 1] for n in range(1, len(page.keys)))

    def _complete_alerts(self, incidents: list[dict[str, Any]], mode: _WalkMode, deadline: Deadline) -> None:
        """Make ``alerts`` (with ``evidence``) a list on each incident, or mark it with ``_alertsError``."""
        for incident in incidents:
            self._ensure_alerts(incident, deadline, fetch=not mode.expand)

    def _ensure_alerts(self, incident: dict[str, Any], deadline: Deadline, *, fetch: bool) -> None:
        alerts = incident.get("alerts")
        try:
            if fetch or not isinstance(alerts, list) or "alerts@odata.nextLink" in incident:
                # Not expanded (degraded), $expand left them out, or cut the expansion short (an annotated
                # nextLink): read alerts_v2 rather than assume the list is complete.
                alerts = self.list_alerts(str(incident["id"]), deadline=deadline)
                incident.pop("alerts@odata.nextLink", None)
            else:
                _normalise_alerts(alerts, f"incident {incident['id']}")
        except ApiError as exc:
            # One incident must not freeze the walk: hand it back marked, for the engine to dead-letter.
            incident.pop("alerts", None)
            incident["_alertsError"] = str(exc)[:500]
            log.warning("alerts of an incident could not be read", extra={
                "incidentId": incident["id"], "action": "graph-alerts", "outcome": "error"})
            return
        incident["alerts"] = alerts

    def _emit(self, incidents: list[dict[str, Any]], position: KeysetPosition, pending: _Pending,
              mode: _WalkMode) -> IncidentPage:
        now = self.stats.requests
        page = IncidentPage(incidents, position, pending.requests + now - pending.mark, mode.degraded,
                            pending.warnings)
        pending.requests, pending.mark, pending.warnings = 0, now, []
        return page

    # ------------------------------------------------------------------ single incidents, alerts, writes
    def get_incident(self, incident_id: str, *, deadline: Deadline,
                     expand_alerts: bool = True) -> dict[str, Any] | None:
        """One incident, or None when Graph answers 404. With ``expand_alerts`` it carries ``alerts`` (each with
        ``evidence``), or ``_alertsError`` when they could not be read; without, it is returned as Graph sent it."""
        url = self._incident_url(incident_id)
        try:
            try:
                data = self._get_json(url + ("?$expand=alerts" if expand_alerts else ""), deadline)
                fetch = False
            except GraphResponseError:
                raise
            except ApiError as exc:
                if not (expand_alerts and _degradable(exc)):
                    raise
                # Same failure mode as big list pages: read the incident bare and its alerts from alerts_v2.
                data = self._get_json(url, deadline)
                fetch = True
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        _check_incident(data, f"incident {incident_id}")
        if expand_alerts:
            self._ensure_alerts(data, deadline, fetch=fetch)
        return data

    def list_alerts(self, incident_id: str, *, deadline: Deadline) -> list[dict[str, Any]]:
        """All alerts_v2 of one incident (every page), each with an ``evidence`` list."""
        _check_id(incident_id)
        filt = "incidentId eq '" + incident_id.replace("'", "''") + "'"
        first = f"{self._base}/alerts_v2?" + urlencode({"$filter": filt}, quote_via=quote, safe="$,'")
        # Alerts of one incident almost always fit one page (a snapshot). When they do not, offset pages can shift
        # if an alert changes mid-read, so re-read until a pass returns the same count with no duplicates.
        previous: int | None = None
        for _ in range(MAX_STALE_PASSES):
            records: list[dict[str, Any]] = []
            ids: set[str] = set()
            duplicate = False
            link: str | None = first
            pages = 0
            while link is not None:
                pages += 1
                if pages > MAX_PAGES_PER_PASS:
                    raise GraphResponseError(f"alerts of incident {incident_id}: too many pages")
                data = self._get_json(link, deadline)
                page = _value_list(data, f"alerts of incident {incident_id}")
                for alert in page:
                    alert_id = alert.get("id") if isinstance(alert, dict) else None
                    if isinstance(alert_id, str):
                        duplicate = duplicate or alert_id in ids
                        ids.add(alert_id)
                records.extend(page)
                nxt = self._next_link(data)
                if nxt == link:
                    raise GraphResponseError(f"alerts of incident {incident_id}: @odata.nextLink does not advance")
                link = nxt
            if (pages == 1 or len(records) == previous) and not duplicate:
                return _normalise_alerts(records, f"alerts of incident {incident_id}")
            previous = len(records) if not duplicate else None
        raise GraphResponseError(f"alerts of incident {incident_id} did not stabilise after {MAX_STALE_PASSES} passes")

    def update_incident(self, incident_id: str, changes: dict[str, Any], *, deadline: Deadline) -> dict[str, Any]:
        """PATCH the given fields (camelCase Graph names) and return the incident as Graph now has it."""
        if not isinstance(changes, dict) or not changes:
            raise ValueError("update_incident needs a non-empty dict of changes")
        url = self._incident_url(incident_id)
        response = self.session.request("PATCH", url, deadline=deadline, json=changes, headers=PREFER_HEADERS,
                                        ok=frozenset({200, 204}))
        if response.status_code == 204 or not response.content:
            # Graph documents 200 with the incident; tolerate a bare 204 by reading it back.
            incident = self.get_incident(incident_id, deadline=deadline, expand_alerts=False)
            if incident is None:
                raise ApiError(f"incident {incident_id} vanished after PATCH", 404, "NotFound")
            return incident
        data = _json_body(response, f"PATCH incident {incident_id}")
        _check_incident(data, f"PATCH incident {incident_id}")
        return data

    def add_comment(self, incident_id: str, text: str, *, deadline: Deadline) -> list[dict[str, Any]]:
        """POST a comment; returns the incident's whole comment list as Graph sends it (either key shape).

        Note: like any POST, a retry after a dropped connection may duplicate the comment; callers that must not
        duplicate should compare with the returned list (or the incident's comments) before posting again.
        """
        if not isinstance(text, str) or not text:
            raise ValueError("add_comment needs a non-empty comment text")
        url = self._incident_url(incident_id) + "/comments"
        body = {"@odata.type": "microsoft.graph.security.alertComment", "comment": text}
        # Not idempotent: a retry after an ambiguous failure could post the comment twice. The next sync re-reads the
        # incident's comments (whose origin markers identify copies) before posting again.
        response = self.session.request("POST", url, deadline=deadline, json=body, headers=PREFER_HEADERS,
                                        ok=frozenset({200, 201}), idempotent=False)
        data = _json_body(response, f"comments of incident {incident_id}")
        comments = _value_list(data, f"comments of incident {incident_id}")
        for n, comment in enumerate(comments):
            if not isinstance(comment, dict):
                raise GraphResponseError(f"comments of incident {incident_id}: item {n} is not an object",
                                         response.status_code)
        return comments

    # ------------------------------------------------------------------ plumbing
    def _incident_url(self, incident_id: str) -> str:
        _check_id(incident_id)
        return f"{self._base}/incidents/{quote(incident_id, safe='')}"

    def _incidents_url(self, filt: str, top: int, expand: bool, skip: int = 0) -> str:
        params: list[tuple[str, str]] = [("$filter", filt), ("$top", str(top))]
        if expand:
            params.append(("$expand", "alerts"))
        if skip:
            params.append(("$skip", str(skip)))
        return f"{self._base}/incidents?" + urlencode(params, quote_via=quote, safe="$,'")

    def _get_json(self, url: str, deadline: Deadline, *, attempts: int | None = None) -> dict[str, Any]:
        response = self.session.request("GET", url, deadline=deadline, headers=PREFER_HEADERS,
                                        ok=frozenset({200}), attempts=attempts)
        return _json_body(response, f"GET {url.split('?', 1)[0]}")

    def _next_link(self, data: dict[str, Any]) -> str | None:
        link = data.get("@odata.nextLink")
        if link is None:
            return None
        if not isinstance(link, str) or not link:
            raise GraphResponseError(f"@odata.nextLink is not a URL: {link!r}", 200)
        parts = urlsplit(link)
        # The session attaches this tenant's bearer token: never follow a link to another origin.
        if (parts.scheme.lower(), parts.netloc.lower()) != self._origin:
            raise GraphResponseError(f"@odata.nextLink points outside {self.endpoint}: {parts.scheme}://"
                                     f"{parts.netloc}", 200)
        return link


def _degradable(exc: ApiError) -> bool:
    """Server-side failures that a smaller or lighter request may avoid (5xx, or timeouts outliving retries)."""
    return exc.status is None or exc.status >= 500


def _check_id(incident_id: str) -> None:
    if not isinstance(incident_id, str) or not incident_id.strip():
        raise ValueError(f"incident id must be a non-empty string, got {incident_id!r}")


def _json_body(response: Any, what: str) -> dict[str, Any]:
    try:
        data = jsonio.loads(response.content)
    except ValueError as exc:
        raise GraphResponseError(f"{what}: response body is not JSON", response.status_code) from exc
    if not isinstance(data, dict):
        raise GraphResponseError(f"{what}: response body is a {type(data).__name__}, not an object",
                                 response.status_code)
    return data


def _value_list(data: dict[str, Any], what: str) -> list[Any]:
    value = data.get("value")
    if not isinstance(value, list):
        found = "missing" if "value" not in data else f"a {type(value).__name__}"
        raise GraphResponseError(f"{what}: 'value' must be a list, found {found}", 200)
    return value


def _check_incident(record: Any, what: str) -> str:
    """Validate what the walk relies on; return the canonical ``lastUpdateDateTime``."""
    if not isinstance(record, dict):
        raise GraphResponseError(f"{what}: incident is a {type(record).__name__}, not an object", 200)
    incident_id = record.get("id")
    if not isinstance(incident_id, str) or not incident_id:
        raise GraphResponseError(f"{what}: incident has no string 'id' (got {incident_id!r})", 200)
    stamp = record.get("lastUpdateDateTime")
    try:
        if not isinstance(stamp, str):
            raise ValueError("not a string")
        return canonical_time(stamp)
    except ValueError as exc:
        raise GraphResponseError(
            f"{what}: incident {incident_id} has no parseable lastUpdateDateTime (got {stamp!r})", 200) from exc


def _normalise_alerts(alerts: list[Any], what: str) -> list[dict[str, Any]]:
    """Each alert must be an object; ``evidence`` becomes a list when Graph left it out or null."""
    for n, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise GraphResponseError(f"{what}: alert {n} is a {type(alert).__name__}, not an object", 200)
        evidence = alert.get("evidence")
        if evidence is None:
            alert["evidence"] = []
        elif not isinstance(evidence, list):
            raise GraphResponseError(f"{what}: alert {alert.get('id')!r} has 'evidence' of type "
                                     f"{type(evidence).__name__}, not a list", 200)
    return alerts


__all__ = ["DEGRADED_ALERTS", "DEGRADED_ORDER", "DEGRADED_SMALLER", "DEGRADED_UNSETTLED", "PREFER_HEADERS",
           "GraphResponseError", "GraphSecurityClient", "IncidentPage", "KeysetPosition", "graph_time"]
