"""GraphSecurityClient: keyset paging correctness, degradation, throttling, boundary validation.

Most tests drive the client through the real BearerSession over ``FakeGraph``, a small scripted Graph that applies
the same semantics as the service (newest first by lastUpdateDateTime, offset ``$skip``/``@odata.nextLink``, exact
7-digit time comparisons) and can mutate its data between requests. End-to-end tests against the HTTPS emulator
are at the bottom and run when the emulator fixtures exist.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
import requests
from azure.core.credentials import AccessToken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync.budget import BudgetExhausted, Deadline
from sync.graph import (
    DEGRADED_ALERTS,
    DEGRADED_SMALLER,
    GraphResponseError,
    GraphSecurityClient,
    IncidentPage,
    KeysetPosition,
    graph_time,
)
from sync.http import ApiError, BearerSession, RetryPolicy

ENDPOINT = "https://graph.test"
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$")
_COND = re.compile(r"^(lastUpdateDateTime|createdDateTime) (ge|gt|le|lt|eq) (\S+)$")
_INCIDENT_ID = re.compile(r"^incidentId eq '((?:[^']|'')*)'$")


def stamp(i: int) -> str:
    """Timestamps that collide at microsecond precision: i//4 seconds plus i%4 ticks (100 ns) after 10:00."""
    return f"2024-05-06T10:00:{i // 4:02d}.{i % 4:07d}Z"


WINDOW_LOWER = datetime(2024, 5, 6, 10, 0, 1, tzinfo=UTC)       # stamp(4)
WINDOW_UPPER = datetime(2024, 5, 6, 10, 0, 20, tzinfo=UTC)      # stamp(80); stamp(81..83) are after it
MOVED = "2024-05-06T11:00:00.0000000Z"                           # where an update moves an incident (after upper)


def in_window(ts: str) -> bool:
    return graph_time(WINDOW_LOWER) <= ts <= graph_time(WINDOW_UPPER)


# ---------------------------------------------------------------------------------------------- the fake service
def make_response(status: int, body: Any = None, headers: dict[str, str] | None = None,
                  raw: bytes | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    response.headers.update(headers or {})
    return response


class FakeGraph:
    """An in-memory Graph security API with the list semantics that make naive paging lose records."""

    def __init__(self, incidents: list[dict[str, Any]] | None = None, *, tie_order: list[int] | None = None,
                 alerts_page: int = 2, server_cap: int | None = None) -> None:
        self.incidents: dict[str, dict[str, Any]] = {}
        self.rank: dict[str, int] = {}
        self.alerts_page = alerts_page
        self.server_cap = server_cap
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []
        self.list_requests = 0
        self.before_list: list[Callable[[FakeGraph, int], None]] = []
        self.fault: Callable[[str, str, dict[str, list[str]]], requests.Response | None] | None = None
        self.queued: list[requests.Response] = []
        for n, incident in enumerate(incidents or []):
            self.add(incident, rank=(tie_order[n] if tie_order else n))

    def add(self, incident: dict[str, Any], rank: int | None = None) -> None:
        self.incidents[incident["id"]] = incident
        self.rank[incident["id"]] = len(self.rank) if rank is None else rank

    def move(self, incident_id: str, ts: str = MOVED) -> None:
        """An update: the incident gets a new lastUpdateDateTime (later than any window upper bound)."""
        self.incidents[incident_id]["lastUpdateDateTime"] = ts

    # requests.Session surface used by BearerSession
    def request(self, method: str, url: str, json: Any = None, headers: dict[str, str] | None = None,
                timeout: float | None = None) -> requests.Response:
        self.calls.append((method, url, dict(headers or {}), json))
        assert (headers or {}).get("Prefer") == "include-unknown-enum-members"
        assert (headers or {}).get("Authorization") == "Bearer token"
        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == ENDPOINT
        query = parse_qs(parts.query, keep_blank_values=True)
        path = parts.path
        if path == "/v1.0/security/incidents" and method == "GET":
            self.list_requests += 1
            assert self.list_requests < 5000, "runaway walk: the client is not making progress"
            for hook in self.before_list:
                hook(self, self.list_requests)
        if self.queued:
            return self.queued.pop(0)
        if self.fault is not None:
            injected = self.fault(method, path, query)
            if injected is not None:
                return injected
        if path == "/v1.0/security/incidents" and method == "GET":
            return self._list(url, query)
        if path == "/v1.0/security/alerts_v2" and method == "GET":
            return self._alerts(url, query)
        match = re.fullmatch(r"/v1\.0/security/incidents/([^/]+)(/comments)?", path)
        if match:
            incident = self.incidents.get(match.group(1))
            if incident is None:
                return make_response(404, {"error": {"code": "NotFound", "message": "no such incident"}})
            if match.group(2) and method == "POST":
                incident.setdefault("comments", []).append(
                    {"comment": json["comment"], "createdByDisplayName": "app", "createdDateTime": MOVED})
                return make_response(200, {"value": incident["comments"]})
            if method == "PATCH":
                incident.update(json)
                self.move(incident["id"])
                return make_response(200, self._shape(incident, expand=False))
            if method == "GET":
                return make_response(200, self._shape(incident, expand=query.get("$expand") == ["alerts"]))
        return make_response(400, {"error": {"code": "BadRequest", "message": f"unsupported {method} {path}"}})

    @staticmethod
    def _shape(incident: dict[str, Any], *, expand: bool) -> dict[str, Any]:
        out = {k: v for k, v in incident.items() if k != "alerts"}
        if expand:
            out["alerts"] = incident.get("alerts", [])
        copied: dict[str, Any] = json.loads(json.dumps(out))
        return copied

    def _list(self, url: str, query: dict[str, list[str]]) -> requests.Response:
        conds = []
        for part in query.get("$filter", [""])[0].split(" and "):
            match = _COND.match(part)
            if not match or not _TIME.match(match.group(3)):
                return make_response(400, {"error": {"code": "BadRequest", "message": f"bad filter {part!r}"}})
            conds.append((match.group(1), match.group(2), match.group(3)))
        top = int(query.get("$top", ["50"])[0])
        skip = int(query.get("$skip", ["0"])[0])
        size = min(top, self.server_cap) if self.server_cap else top
        ops: dict[str, Callable[[str, str], bool]] = {
            "ge": lambda a, b: a >= b, "gt": lambda a, b: a > b, "le": lambda a, b: a <= b,
            "lt": lambda a, b: a < b, "eq": lambda a, b: a == b}
        matched = [i for i in self.incidents.values() if all(ops[op](i[prop], v) for prop, op, v in conds)]
        matched.sort(key=lambda i: self.rank[i["id"]])
        matched.sort(key=lambda i: i["lastUpdateDateTime"], reverse=True)  # stable: ties keep rank order
        page = matched[skip:skip + size]
        body: dict[str, Any] = {"value": [self._shape(i, expand=query.get("$expand") == ["alerts"]) for i in page]}
        if skip + len(page) < len(matched):
            body["@odata.nextLink"] = _with_skip(url, skip + len(page))
        return make_response(200, body)

    def _alerts(self, url: str, query: dict[str, list[str]]) -> requests.Response:
        match = _INCIDENT_ID.match(query.get("$filter", [""])[0])
        if not match:
            return make_response(400, {"error": {"code": "BadRequest", "message": "bad alerts filter"}})
        incident = self.incidents.get(match.group(1).replace("''", "'"))
        alerts = [dict(a) for a in (incident or {}).get("alerts", [])]
        skip = int(query.get("$skip", ["0"])[0])
        page = alerts[skip:skip + self.alerts_page]
        body: dict[str, Any] = {"value": page}
        if skip + len(page) < len(alerts):
            body["@odata.nextLink"] = _with_skip(url, skip + len(page))
        return make_response(200, body)


def _with_skip(url: str, skip: int) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, vs in parse_qs(parts.query).items() for v in vs if k != "$skip"] + [("$skip", str(skip))]
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query, quote_via=quote)}"


class FakeCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("token", 2_000_000_000)


def incident(n: int, ts: str, alerts: int = 1) -> dict[str, Any]:
    iid = str(n)
    return {"id": iid, "lastUpdateDateTime": ts, "createdDateTime": "2024-05-01T00:00:00.0000000Z",
            "status": "active", "displayName": f"incident {iid}",
            "alerts": [{"id": f"da{iid}_{k}", "incidentId": iid, "lastUpdateDateTime": ts,
                        "evidence": [{"@odata.type": "#microsoft.graph.security.ipEvidence", "ipAddress": "10.0.0.1"}]}
                       for k in range(alerts)]}


def make_client(graph: FakeGraph, *, page_size: int = 5, min_page_size: int = 2, attempts: int = 3,
                sleeps: list[float] | None = None) -> GraphSecurityClient:
    sink = sleeps if sleeps is not None else []
    session = BearerSession(FakeCredential(), f"{ENDPOINT}/.default", session=graph,  # type: ignore[arg-type]
                            policy=RetryPolicy(max_attempts=attempts, backoff_base=0.0), sleep=sink.append)
    return GraphSecurityClient(session, ENDPOINT, page_size=page_size, min_page_size=min_page_size)


def walk(client: GraphSecurityClient, resume: KeysetPosition | None = None,
         lower: datetime = WINDOW_LOWER, upper: datetime = WINDOW_UPPER) -> list[IncidentPage]:
    return list(client.iter_incident_pages(lower, upper, resume=resume, deadline=Deadline(60)))


def ids_of(pages: list[IncidentPage]) -> list[str]:
    return [i["id"] for p in pages for i in p.incidents]


def list_urls(graph: FakeGraph) -> list[str]:
    return [u for m, u, _, _ in graph.calls if m == "GET" and urlsplit(u).path.endswith("/incidents")]


def filters(graph: FakeGraph) -> list[str]:
    return [parse_qs(urlsplit(u).query)["$filter"][0] for u in list_urls(graph)]


# ---------------------------------------------------------------------------------------------- the property
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_walk_returns_every_incident_that_stays_in_the_window_exactly_once(data: st.DataObject) -> None:
    """Random tie-heavy data, page sizes, server page caps, expand failures, updates between any two requests,
    and a stop + JSON round trip + resume at a random page: every incident that was in the window and never
    updated is returned, nothing is returned twice, nothing from outside the window is returned, and every
    position handed out is a safe resume point."""
    n = data.draw(st.integers(0, 36), label="incidents")
    # A small palette of times makes large tie sets common (and, via stamp(), collisions below a microsecond).
    palette = data.draw(st.lists(st.integers(0, 90), min_size=1, max_size=data.draw(st.sampled_from([2, 4, 40]))),
                        label="palette")
    stamps = data.draw(st.lists(st.sampled_from(palette), min_size=n, max_size=n), label="stamps")
    order = data.draw(st.permutations(list(range(n))), label="tie order")
    page_size = data.draw(st.integers(1, 7), label="page size")
    min_page = data.draw(st.integers(1, page_size), label="min page")
    cap = data.draw(st.sampled_from([None, None, 2, 3]), label="server cap")
    expand_max = data.draw(st.sampled_from([None, None, None, 0, 1, 3]), label="expand works up to $top")
    moves = data.draw(st.lists(st.tuples(st.integers(1, 30), st.integers(0, max(n - 1, 0))), max_size=8 if n else 0),
                      label="updates (before list request k, incident)")
    stop_after = data.draw(st.none() | st.integers(0, 6), label="stop after page")

    graph = FakeGraph([incident(k, stamp(s), alerts=k % 3) for k, s in enumerate(stamps)], tie_order=order,
                      server_cap=cap)
    initially_in = {i["id"] for i in graph.incidents.values() if in_window(i["lastUpdateDateTime"])}
    moved: set[str] = set()

    def apply_moves(g: FakeGraph, k: int) -> None:
        for at, victim in moves:
            if at == k:
                g.move(str(victim))
                moved.add(str(victim))
    graph.before_list.append(apply_moves)
    if expand_max is not None:
        def expand_fault(method: str, path: str, q: dict[str, list[str]]) -> requests.Response | None:
            if path.endswith("/incidents") and q.get("$expand") and int(q["$top"][0]) > expand_max:
                return make_response(500, {"error": {"code": "InternalServerError", "message": "boom"}})
            return None
        graph.fault = expand_fault

    yielded: list[str] = []
    requests_reported = 0
    clients = [make_client(graph, page_size=page_size, min_page_size=min_page, attempts=2)]

    def check_page(page: IncidentPage) -> None:
        yielded.extend(i["id"] for i in page.incidents)
        done = set(yielded)
        pos = page.position
        assert set(pos.seen_ids) <= done
        for inc in graph.incidents.values():   # the position's promise holds *now*, for a resume from here
            if inc["id"] in initially_in and inc["id"] not in moved and inc["lastUpdateDateTime"] > pos.upper:
                assert inc["id"] in done, f"{inc['id']} newer than {pos.upper} but not yet returned"
        for inc in page.incidents:
            assert isinstance(inc["alerts"], list) and all(isinstance(a["evidence"], list) for a in inc["alerts"])
            assert len(inc["alerts"]) == int(inc["id"]) % 3

    pages = clients[0].iter_incident_pages(WINDOW_LOWER, WINDOW_UPPER, deadline=Deadline(60))
    last: KeysetPosition | None = None
    for count, page in enumerate(pages):
        check_page(page)
        requests_reported += page.requests
        last = page.position
        if stop_after is not None and count == stop_after:
            break
    else:
        last = None
    if last is not None:   # stopped early: resume from the JSON form of the last position with a fresh client
        resume = KeysetPosition.from_dict(json.loads(json.dumps(last.to_dict())))
        clients.append(make_client(graph, page_size=page_size, min_page_size=min_page, attempts=2))
        for page in clients[1].iter_incident_pages(WINDOW_LOWER, WINDOW_UPPER, resume=resume, deadline=Deadline(60)):
            check_page(page)
            requests_reported += page.requests

    assert len(yielded) == len(set(yielded)), "an incident was returned twice"
    assert set(yielded) <= initially_in, "returned an incident from outside the window"
    missing = (initially_in - moved) - set(yielded)
    assert not missing, f"lost incidents {sorted(missing)}"
    assert requests_reported == sum(c.stats.requests for c in clients)


# ---------------------------------------------------------------------------------------------- paging details
def test_naive_offset_paging_would_lose_an_incident_that_the_keyset_walk_returns() -> None:
    """The motivating case: 10 incidents, pages of 5, incident 1 (on page 1) updated before page 2 is read."""
    graph = FakeGraph([incident(k, stamp(60 - 4 * k)) for k in range(10)])
    graph.before_list.append(lambda g, k: g.move("1") if k == 2 else None)
    # Offset paging through nextLink, as Graph suggests:
    url = f"{ENDPOINT}/v1.0/security/incidents?" + urlencode(
        {"$filter": f"lastUpdateDateTime le {graph_time(WINDOW_UPPER)}", "$top": "5"}, quote_via=quote)
    naive: list[str] = []
    while url:
        body = graph.request("GET", url, headers={"Prefer": "include-unknown-enum-members",
                                                  "Authorization": "Bearer token"}).json()
        naive += [i["id"] for i in body["value"]]
        url = body.get("@odata.nextLink")
    assert "5" not in naive   # shifted from offset 5 to 4 while page 2 was requested: lost

    graph = FakeGraph([incident(k, stamp(60 - 4 * k)) for k in range(10)])
    graph.before_list.append(lambda g, k: g.move("1") if k == 2 else None)
    got = ids_of(walk(make_client(graph, page_size=5)))
    assert sorted(got, key=int) == [str(k) for k in range(10)]


def test_filters_use_seven_digit_times_and_reuse_graphs_strings() -> None:
    graph = FakeGraph([incident(1, "2024-05-06T10:00:10.1234567Z"), incident(2, "2024-05-06T10:00:09.7654321Z"),
                       incident(3, "2024-05-06T10:00:08.0000001Z")])
    pages = walk(make_client(graph, page_size=2))
    assert ids_of(pages) == ["1", "2", "3"]
    f = filters(graph)
    assert f[0] == "lastUpdateDateTime ge 2024-05-06T10:00:01.0000000Z and lastUpdateDateTime le " \
                   "2024-05-06T10:00:20.0000000Z"
    assert f[1].endswith("lastUpdateDateTime le 2024-05-06T10:00:09.7654321Z")
    assert all("$expand=alerts" in u and "$top=2" in u for u in list_urls(graph))
    assert pages[0].position == KeysetPosition("2024-05-06T10:00:09.7654321Z", ("2",))


def test_requests_per_incident_approach_one_over_page_size() -> None:
    graph = FakeGraph([incident(k, stamp(80 - k)) for k in range(70)])   # 70 distinct times, all in the window
    pages = walk(make_client(graph, page_size=10))
    assert len(set(ids_of(pages))) == 70
    total = sum(p.requests for p in pages)
    assert total == 8                          # 10 new + 9 new per page after the boundary re-read; last is short
    assert all(p.requests == 1 for p in pages) and pages[-1].position.upper == stamp(11)


def test_short_last_page_ends_the_walk_without_an_extra_request() -> None:
    graph = FakeGraph([incident(k, stamp(70 - k)) for k in range(7)])
    pages = walk(make_client(graph, page_size=5))
    assert len(list_urls(graph)) == 2 and len(pages) == 2 and [len(p.incidents) for p in pages] == [5, 2]


def test_empty_window_yields_one_empty_page() -> None:
    graph = FakeGraph([incident(1, stamp(2)), incident(2, stamp(83))])   # before lower, after upper
    pages = walk(make_client(graph))
    assert [(p.incidents, p.requests) for p in pages] == [([], 1)]


def test_tie_storm_with_update_during_tie_passes_loses_nothing() -> None:
    """12 incidents at one time (pages of 3): the walk pages `eq T` by offset and re-checks with a second pass;
    an incident updated during the first pass shifts offsets, which the second pass catches."""
    t = stamp(40)
    graph = FakeGraph([incident(k, t) for k in range(12)] + [incident(20, stamp(30)), incident(21, stamp(50))])
    graph.before_list.append(lambda g, k: g.move("4") if k == 3 else None)
    pages = walk(make_client(graph, page_size=3))
    got = ids_of(pages)
    assert len(got) == len(set(got))
    assert set(got) >= {str(k) for k in range(12) if k != 4} | {"20", "21"}
    f = filters(graph)
    assert any(x == f"lastUpdateDateTime eq {t}" for x in f)
    assert f[-1].endswith(f"lastUpdateDateTime lt {t}")
    assert sum(p.requests for p in pages) == graph.list_requests


def test_a_page_not_newest_first_degrades_to_offset_passes_and_reports() -> None:
    graph = FakeGraph([incident(k, stamp(10 + k)) for k in range(12)])
    graph.queued.append(make_response(200, {"value": [incident(1, stamp(11)), incident(2, stamp(12))]}))
    pages = walk(make_client(graph, page_size=3))
    got = ids_of(pages)
    assert sorted(got, key=int) == [str(k) for k in range(12)], "every incident once, none lost to the bad order"
    warnings = [w for p in pages for w in p.warnings]
    assert len(warnings) == 1 and "not newest first" in warnings[0]
    assert all(p.may_repeat for p in pages if p.incidents)


def test_a_tie_group_that_never_settles_is_taken_as_read_and_reported_instead_of_stalling() -> None:
    t = stamp(40)
    graph = FakeGraph([incident(k, t) for k in range(12)] + [incident(20, stamp(30)), incident(21, stamp(50))])
    rng = random.Random(7)
    # Graph orders the tie group differently on every request: offset passes never see the same set twice.
    graph.before_list.append(lambda g, k: g.rank.update(zip(map(str, range(12)), rng.sample(range(12), 12),
                                                            strict=True)))
    pages = walk(make_client(graph, page_size=3))
    got = ids_of(pages)
    assert len(got) == len(set(got)) and {"20", "21"} <= set(got), "the walk moved on past the tie group"
    warnings = [w for p in pages for w in p.warnings]
    assert len(warnings) == 1 and "did not settle" in warnings[0]
    assert graph.list_requests < 100


def test_tie_mode_follows_nextlink_and_refuses_foreign_links() -> None:
    t = stamp(40)
    graph = FakeGraph([incident(k, t) for k in range(6)])
    original = graph._list

    def evil(url: str, q: dict[str, list[str]]) -> requests.Response:
        response = original(url, q)
        body = response.json()
        if "@odata.nextLink" in body:
            body["@odata.nextLink"] = body["@odata.nextLink"].replace(ENDPOINT, "https://evil.example")
        return make_response(200, body)
    graph._list = evil  # type: ignore[method-assign,assignment]
    with pytest.raises(GraphResponseError, match=r"outside https://graph\.test"):
        walk(make_client(graph, page_size=2))


def test_resume_with_many_seen_ids_goes_straight_to_tie_mode() -> None:
    t = stamp(40)
    graph = FakeGraph([incident(k, t) for k in range(8)] + [incident(9, stamp(20))])
    pos = KeysetPosition(t, tuple(str(k) for k in range(5)))
    pages = walk(make_client(graph, page_size=4), resume=pos)
    assert sorted(ids_of(pages)) == ["5", "6", "7", "9"]
    assert filters(graph)[0] == f"lastUpdateDateTime eq {t}"


def test_resume_position_round_trips_and_rejects_garbage() -> None:
    pos = KeysetPosition("2024-05-06T10:00:09.7654321Z", ("a", "b"))
    assert KeysetPosition.from_dict(json.loads(json.dumps(pos.to_dict()))) == pos
    bads: list[Any] = [{}, {"upper": "yesterday"}, {"upper": stamp(1), "seenIds": [1]}, {"upper": 5}, []]
    for bad in bads:
        with pytest.raises(ValueError):
            KeysetPosition.from_dict(bad)
    client = make_client(FakeGraph())
    with pytest.raises(ValueError, match="after the window"):
        walk(client, resume=KeysetPosition(stamp(81)))


def test_page_requests_add_up_to_session_requests_including_retries() -> None:
    graph = FakeGraph([incident(k, stamp(70 - k)) for k in range(12)])
    graph.queued.append(make_response(503, {"error": {"code": "ServiceUnavailable", "message": "busy"}}))
    client = make_client(graph, page_size=5)
    pages = walk(client)
    assert pages[0].requests == 2 and sum(p.requests for p in pages) == client.stats.requests


# ---------------------------------------------------------------------------------------------- degradation
def _expand_fails_above(limit: int) -> Callable[[str, str, dict[str, list[str]]], requests.Response | None]:
    def fault(method: str, path: str, q: dict[str, list[str]]) -> requests.Response | None:
        if path.endswith("/incidents") and q.get("$expand") and int(q["$top"][0]) > limit:
            return make_response(500, {"error": {"code": "InternalServerError", "message": "expand too big"}})
        return None
    return fault


def test_persistent_500_on_big_expand_pages_shrinks_the_page() -> None:
    graph = FakeGraph([incident(k, stamp(80 - k), alerts=2) for k in range(30)])
    graph.fault = _expand_fails_above(12)
    client = make_client(graph, page_size=50, min_page_size=5, attempts=3)
    pages = walk(client)
    assert sorted(ids_of(pages), key=int) == [str(k) for k in range(30)]
    assert {p.degraded for p in pages} == {DEGRADED_SMALLER}
    tops = [parse_qs(urlsplit(u).query)["$top"][0] for u in list_urls(graph)]
    assert tops[:3 + 2 + 1] == ["50"] * 3 + ["25"] * 2 + ["12"]    # full retries, then 2 per downsized try
    assert set(tops[6:]) == {"12"}                                   # sticky for the rest of the walk
    assert all(len(i["alerts"]) == 2 for p in pages for i in p.incidents)
    assert client.stats.extra["degraded:smaller-pages"] == 2


def test_expand_failing_at_every_size_falls_back_to_alerts_per_incident() -> None:
    graph = FakeGraph([incident(k, stamp(80 - k), alerts=3) for k in range(9)], alerts_page=2)
    graph.fault = _expand_fails_above(0)
    client = make_client(graph, page_size=8, min_page_size=2, attempts=2)
    pages = walk(client)
    assert sorted(ids_of(pages), key=int) == [str(k) for k in range(9)]
    assert {p.degraded for p in pages} == {DEGRADED_ALERTS}
    for inc in (i for p in pages for i in p.incidents):
        assert [a["id"] for a in inc["alerts"]] == [f"da{inc['id']}_{k}" for k in range(3)]
    alert_calls = [u for _, u, _, _ in graph.calls if "/alerts_v2" in u]
    assert "%24filter=incidentId%20eq%20%270%27" in alert_calls[0] or "incidentId%20eq%20'0'" in alert_calls[0]
    tops = [parse_qs(urlsplit(u).query)["$top"][0] for u in list_urls(graph)]
    assert tops[:7] == ["8", "8", "4", "4", "2", "2", "8"]
    assert all("$expand" not in u for u in list_urls(graph)[6:])


def test_an_incident_whose_alerts_cannot_be_read_is_marked_not_blocking() -> None:
    graph = FakeGraph([incident(k, stamp(80 - k)) for k in range(6)])

    def fault(method: str, path: str, q: dict[str, list[str]]) -> requests.Response | None:
        if path.endswith("/incidents") and q.get("$expand"):
            return make_response(500, {"error": {"code": "InternalServerError", "message": "expand"}})
        if path.endswith("/alerts_v2") and "'3'" in q["$filter"][0]:
            return make_response(500, {"error": {"code": "InternalServerError", "message": "alerts of 3"}})
        return None
    graph.fault = fault
    pages = walk(make_client(graph, page_size=4, min_page_size=4, attempts=2))
    incidents = {i["id"]: i for p in pages for i in p.incidents}
    assert sorted(incidents, key=int) == [str(k) for k in range(6)]
    assert "alerts" not in incidents["3"] and "alerts of 3" in incidents["3"]["_alertsError"]
    assert all(isinstance(incidents[k]["alerts"], list) for k in incidents if k != "3")


def test_malformed_expanded_alerts_mark_only_that_incident() -> None:
    good, bad, no_evidence = incident(1, stamp(50)), incident(2, stamp(49)), incident(3, stamp(48))
    bad["alerts"] = ["not an alert"]
    del no_evidence["alerts"][0]["evidence"]
    pages = walk(make_client(FakeGraph([good, bad, no_evidence])))
    incidents = {i["id"]: i for p in pages for i in p.incidents}
    assert "_alertsError" in incidents["2"] and "alert 0 is a str" in incidents["2"]["_alertsError"]
    assert incidents["3"]["alerts"][0]["evidence"] == [] and len(incidents["1"]["alerts"][0]["evidence"]) == 1


def test_a_truncated_expansion_is_completed_from_alerts_v2() -> None:
    graph = FakeGraph([incident(1, stamp(50), alerts=5), incident(2, stamp(49), alerts=2)])
    original = graph._list

    def truncating(url: str, q: dict[str, list[str]]) -> requests.Response:
        body = original(url, q).json()
        for inc in body["value"]:
            if inc["id"] == "1":
                inc["alerts"] = inc["alerts"][:2]
                inc["alerts@odata.nextLink"] = f"{ENDPOINT}/v1.0/security/incidents/1/alerts?$skip=2"
        return make_response(200, body)
    graph._list = truncating  # type: ignore[method-assign,assignment]
    incidents = {i["id"]: i for p in walk(make_client(graph)) for i in p.incidents}
    assert len(incidents["1"]["alerts"]) == 5 and "alerts@odata.nextLink" not in incidents["1"]
    assert len(incidents["2"]["alerts"]) == 2
    assert sum("/alerts_v2" in u for _, u, _, _ in graph.calls) == 2 * 3   # 3 pages of 2, read twice (re-check)


def test_non_server_errors_do_not_degrade() -> None:
    graph = FakeGraph([incident(1, stamp(50))])
    graph.fault = lambda m, p, q: make_response(403, {"error": {"code": "Forbidden", "message": "no role"}})
    with pytest.raises(ApiError) as err:
        walk(make_client(graph))
    assert err.value.status == 403 and len(graph.calls) == 1


# ---------------------------------------------------------------------------------------------- throttling/budget
def test_429_retry_after_is_honoured_and_counted() -> None:
    graph = FakeGraph([incident(1, stamp(50))])
    graph.queued.append(make_response(429, {"error": {"code": "TooManyRequests", "message": "slow down"}},
                                      headers={"Retry-After": "7"}))
    sleeps: list[float] = []
    client = make_client(graph, sleeps=sleeps)
    pages = walk(client)
    assert sleeps == [7.0] and ids_of(pages) == ["1"]
    assert client.stats.throttled == 1 and client.stats.requests == 2 and pages[0].requests == 2


def test_retry_after_beyond_the_budget_stops_cleanly() -> None:
    graph = FakeGraph([incident(k, stamp(80 - k)) for k in range(8)])
    client = make_client(graph, page_size=4)
    it = client.iter_incident_pages(WINDOW_LOWER, WINDOW_UPPER, deadline=Deadline(30))
    first = next(it)
    graph.queued.append(make_response(429, {}, headers={"Retry-After": "3600"}))
    with pytest.raises(BudgetExhausted):
        next(it)
    rest = walk(make_client(graph, page_size=4), resume=first.position)
    assert sorted(ids_of([first, *rest]), key=int) == [str(k) for k in range(8)]


# ---------------------------------------------------------------------------------------------- boundary validation
@pytest.mark.parametrize(("body", "message"), [
    ({"values": []}, "'value' must be a list, found missing"),
    ({"value": {"id": "1"}}, "'value' must be a list, found a dict"),
    ({"value": [{"lastUpdateDateTime": stamp(50)}]}, "no string 'id'"),
    ({"value": [{"id": 7, "lastUpdateDateTime": stamp(50)}]}, "no string 'id'"),
    ({"value": [{"id": "1", "lastUpdateDateTime": "soon"}]}, "no parseable lastUpdateDateTime"),
    ({"value": [{"id": "1"}]}, "no parseable lastUpdateDateTime"),
    ({"value": ["1"]}, "not an object"),
    ({"value": [{"id": "1", "lastUpdateDateTime": stamp(83)}]}, "outside the filter"),
    ([1, 2], "not an object"),
    ({"value": [], "@odata.nextLink": 5}, "not a URL"),
])
def test_malformed_list_responses_raise_a_clear_error(body: Any, message: str) -> None:
    graph = FakeGraph()
    graph.queued.append(make_response(200, body))
    with pytest.raises(GraphResponseError, match=message) as err:
        walk(make_client(graph))
    assert not err.value.transient and err.value.code == "invalidResponse"


def test_non_json_body_raises_a_clear_error() -> None:
    graph = FakeGraph()
    graph.queued.append(make_response(200, raw=b"<html>proxy error</html>"))
    with pytest.raises(GraphResponseError, match="not JSON"):
        walk(make_client(graph))


def test_constructor_validates_its_arguments() -> None:
    session = make_client(FakeGraph()).session
    for kwargs in ({"page_size": 0}, {"min_page_size": 0}):
        with pytest.raises(ValueError):
            GraphSecurityClient(session, ENDPOINT, **kwargs)
    assert GraphSecurityClient(session, ENDPOINT, page_size=3).min_page_size == 3   # SYNC_GRAPH_PAGE_SIZE=3
    with pytest.raises(ValueError):
        GraphSecurityClient(session, "graph.microsoft.com")
    client = GraphSecurityClient(session, ENDPOINT + "/")
    assert client.endpoint == ENDPOINT


# ---------------------------------------------------------------------------------------------- single incidents
def test_get_incident_expands_alerts_and_returns_none_on_404() -> None:
    graph = FakeGraph([incident(1, stamp(50), alerts=2)])
    client = make_client(graph)
    got = client.get_incident("1", deadline=Deadline(10))
    assert got is not None and [a["id"] for a in got["alerts"]] == ["da1_0", "da1_1"]
    assert graph.calls[-1][1] == f"{ENDPOINT}/v1.0/security/incidents/1?$expand=alerts"
    bare = client.get_incident("1", deadline=Deadline(10), expand_alerts=False)
    assert bare is not None and "alerts" not in bare
    assert client.get_incident("404", deadline=Deadline(10)) is None
    with pytest.raises(ValueError):
        client.get_incident("", deadline=Deadline(10))


def test_get_incident_falls_back_to_alerts_v2_when_expand_fails() -> None:
    graph = FakeGraph([incident(1, stamp(50), alerts=3)])
    graph.fault = lambda m, p, q: (make_response(502, {}) if q.get("$expand") else None)
    got = make_client(graph, attempts=2).get_incident("1", deadline=Deadline(10))
    assert got is not None and len(got["alerts"]) == 3


def test_get_incident_validates_the_record() -> None:
    graph = FakeGraph()
    graph.queued.append(make_response(200, {"id": "1", "lastUpdateDateTime": None}))
    with pytest.raises(GraphResponseError, match="incident 1 has no parseable lastUpdateDateTime"):
        make_client(graph).get_incident("1", deadline=Deadline(10))


def test_list_alerts_follows_every_page_and_escapes_the_id() -> None:
    odd = incident(0, stamp(50), alerts=5)
    odd["id"] = "it's"
    graph = FakeGraph([odd], alerts_page=2)
    alerts = make_client(graph).list_alerts("it's", deadline=Deadline(10))
    assert len(alerts) == 5
    first = graph.calls[0][1]
    assert parse_qs(urlsplit(first).query)["$filter"] == ["incidentId eq 'it''s'"]
    assert len(graph.calls) == 6   # two passes of three pages: a multi-page result is re-checked once


def test_update_incident_patches_and_returns_the_incident() -> None:
    graph = FakeGraph([incident(1, stamp(50))])
    client = make_client(graph)
    got = client.update_incident("1", {"status": "resolved", "classification": "truePositive"},
                                 deadline=Deadline(10))
    method, url, headers, body = graph.calls[-1]
    assert (method, url) == ("PATCH", f"{ENDPOINT}/v1.0/security/incidents/1")
    assert body == {"status": "resolved", "classification": "truePositive"}
    assert headers["Prefer"] == "include-unknown-enum-members"
    assert got["status"] == "resolved" and got["lastUpdateDateTime"] == MOVED
    assert client.stats.writes == 1
    with pytest.raises(ValueError):
        client.update_incident("1", {}, deadline=Deadline(10))


def test_update_incident_tolerates_a_bare_204() -> None:
    graph = FakeGraph([incident(1, stamp(50))])
    graph.queued.append(make_response(204))
    got = make_client(graph).update_incident("1", {"assignedTo": "a@b.c"}, deadline=Deadline(10))
    assert got["id"] == "1" and graph.calls[-1][0] == "GET"


@pytest.mark.parametrize("shape", [
    {"comment": "c", "createdByDisplayName": "x@y", "createdDateTime": "2024-05-06T10:00:00.1234567Z"},
    {"comment": "c", "createdBy": "x@y", "createdTime": "2021-09-30T12:07:37.2756993Z"},
])
def test_add_comment_posts_and_passes_both_comment_shapes_through(shape: dict[str, str]) -> None:
    graph = FakeGraph()
    graph.queued.append(make_response(200, {"value": [shape]}))
    got = make_client(graph).add_comment("42", "hello", deadline=Deadline(10))
    assert got == [shape]
    method, url, _, body = graph.calls[-1]
    assert (method, url) == ("POST", f"{ENDPOINT}/v1.0/security/incidents/42/comments")
    assert body == {"@odata.type": "microsoft.graph.security.alertComment", "comment": "hello"}


def test_add_comment_validates_the_response() -> None:
    graph = FakeGraph()
    graph.queued.append(make_response(200, {"value": "nope"}))
    with pytest.raises(GraphResponseError, match="comments of incident 42"):
        make_client(graph).add_comment("42", "hello", deadline=Deadline(10))


def test_graph_time_formats_seven_digits() -> None:
    assert graph_time(datetime(2024, 5, 6, 10, 0, 1, 123456, tzinfo=UTC)) == "2024-05-06T10:00:01.1234560Z"
    assert graph_time(datetime(2024, 5, 6, 12, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))) \
        == "2024-05-06T12:00:00.0000000Z"
    with pytest.raises(ValueError):
        graph_time(datetime(2024, 5, 6))


def test_random_sanity_many_walks_with_shuffled_ties() -> None:
    """A quick seeded soak on top of the property test: bigger data, page size 50, updates sprinkled in."""
    rng = random.Random(7)
    for _ in range(20):
        n = rng.randint(50, 300)
        graph = FakeGraph([incident(k, stamp(rng.randint(0, 90)), alerts=0) for k in range(n)],
                          tie_order=rng.sample(range(n), n))
        initially = {i["id"] for i in graph.incidents.values() if in_window(i["lastUpdateDateTime"])}
        victims = {str(rng.randrange(n)) for _ in range(10)}
        moved: set[str] = set()

        def hook(g: FakeGraph, k: int, victims: set[str] = victims, moved: set[str] = moved) -> None:
            if victims and rng.random() < 0.5:
                v = victims.pop()
                g.move(v)
                moved.add(v)
        graph.before_list.append(hook)
        got = ids_of(walk(make_client(graph, page_size=rng.choice([5, 10, 50]))))
        assert len(got) == len(set(got)) and (initially - moved) <= set(got) <= initially


# ---------------------------------------------------------------------------------------------- end to end (HTTPS)
# The real thing: azure-identity's ClientSecretCredential against the Entra emulator, BearerSession over HTTPS to the
# Graph emulator (offset nextLink, ties by ID, faults), with updates landing between the client's pages.

def _emulated_client(hub: Any, *, page_size: int = 50, min_page_size: int = 5,
                     sleeps: list[float] | None = None) -> tuple[str, GraphSecurityClient]:
    import secrets as _secrets

    from azure.identity import ClientSecretCredential

    world = hub.world
    tenant = world.add_tenant(name="Contoso")
    secret = _secrets.token_urlsafe(24)
    app = world.register_app(secret=secret, tenants=[tenant], display_name="defender-sentinel-sync")
    credential = ClientSecretCredential(tenant, app.client_id, secret, authority=hub.endpoints.authority_host,
                                        disable_instance_discovery=True)
    session = BearerSession(credential, f"{hub.endpoints.graph}/.default",
                            policy=RetryPolicy(max_attempts=3, backoff_base=0.0),
                            sleep=(sleeps if sleeps is not None else []).append)
    return tenant, GraphSecurityClient(session, hub.endpoints.graph, page_size=page_size, min_page_size=min_page_size)


def _e2e_walk(client: GraphSecurityClient, lower: datetime, upper: datetime) -> list[IncidentPage]:
    return list(client.iter_incident_pages(lower, upper, deadline=Deadline(60)))


def _window_now() -> tuple[datetime, datetime]:
    upper = datetime.now(UTC)
    return upper - timedelta(days=7), upper


def test_e2e_walk_with_updates_between_pages_loses_nothing(emulators: Any) -> None:
    """A generated tenant (ties of 2-5 included), pages of 4, and after every page the emulator updates the page's
    last incident: the exact move that makes offset paging skip its neighbour."""
    tenant, client = _emulated_client(emulators, page_size=4, min_page_size=2)
    world = emulators.world
    world.generate(11, tenant, 160, profile="small")
    lower, upper = _window_now()
    initially = set(world.incident_ids(tenant))
    moved: set[str] = set()

    def bump(page: Any) -> None:
        if page.ids:
            moved.add(page.ids[-1])
            world.update_incident(tenant, page.ids[-1], severity="high")
    world.after_page(1, bump, tenant_id=tenant, once=False)
    pages = _e2e_walk(client, lower, upper)
    world.graph.clear_hooks()
    got = ids_of(pages)
    assert len(got) == len(set(got))
    assert initially - moved <= set(got) <= initially
    assert len(moved) > 20
    for inc in (i for p in pages for i in p.incidents if i["id"] not in moved):
        stored = world.get_incident(tenant, inc["id"])
        assert [a["id"] for a in inc["alerts"]] == [a["id"] for a in stored["alerts"]]
        assert inc["lastUpdateDateTime"] == stored["lastUpdateDateTime"]
    assert sum(p.requests for p in pages) == client.stats.requests


def test_e2e_tie_storm_with_updates_during_the_tie_passes(emulators: Any) -> None:
    tenant, client = _emulated_client(emulators, page_size=5, min_page_size=5)
    world = emulators.world
    lower, upper = _window_now()
    tie = graph_time(upper - timedelta(hours=1))
    for k in range(1, 41):
        world.add_incident(tenant, {"id": str(k), "lastUpdateDateTime": tie if k <= 33 else
                                    graph_time(upper - timedelta(hours=k))})
    moved: set[str] = set()

    def bump(page: Any) -> None:   # move an already-returned tie incident: later offsets shift down
        if page.number in (3, 5, 7) and page.ids:
            moved.add(page.ids[0])
            world.update_incident(tenant, page.ids[0])
    world.after_page(1, bump, tenant_id=tenant, once=False)
    pages = _e2e_walk(client, lower, upper)
    world.graph.clear_hooks()
    got = ids_of(pages)
    assert len(got) == len(set(got)) and {str(k) for k in range(1, 41)} - moved <= set(got)
    assert len(moved) == 3
    served = [e.query.get("$filter", [""])[0] for e in emulators.log.entries(service="graph", method="GET")]
    assert f"lastUpdateDateTime eq {tie}" in served          # the tie set was read by offset passes
    assert served[-1].endswith(f"lastUpdateDateTime lt {tie}") or tie not in served[-1]


def test_e2e_expand_failure_degrades_to_smaller_pages_then_alerts_v2(emulators: Any) -> None:
    from emulators.base import Fault
    from emulators.graph import expand_alerts_page_over

    tenant, client = _emulated_client(emulators, page_size=50, min_page_size=5)
    world = emulators.world
    world.generate(5, tenant, 40, profile="small")
    lower, upper = _window_now()
    emulators.faults.rule("graph", expand_alerts_page_over(12), Fault("status", 500))
    pages = _e2e_walk(client, lower, upper)
    assert {p.degraded for p in pages} == {DEGRADED_SMALLER}
    assert sorted(ids_of(pages)) == sorted(world.incident_ids(tenant))

    emulators.faults.clear()
    emulators.faults.rule("graph", expand_alerts_page_over(0), Fault("status", 500))
    pages = _e2e_walk(client, lower, upper)
    assert {p.degraded for p in pages} == {DEGRADED_ALERTS}
    incidents = {i["id"]: i for p in pages for i in p.incidents}
    assert sorted(incidents) == sorted(world.incident_ids(tenant))
    for iid, inc in incidents.items():
        stored = world.get_incident(tenant, iid)
        assert sorted(a["id"] for a in inc["alerts"]) == sorted(a["id"] for a in stored["alerts"])
        assert all(isinstance(a["evidence"], list) for a in inc["alerts"])


def test_e2e_429_retry_after_is_honoured(emulators: Any) -> None:
    from emulators.base import Fault

    sleeps: list[float] = []
    tenant, client = _emulated_client(emulators, sleeps=sleeps)
    emulators.world.add_incident(tenant, {"id": "7"})
    lower, upper = _window_now()
    client.session._credential.get_token(f"{emulators.endpoints.graph}/.default")   # token first: fault hits Graph
    emulators.faults.queue("graph", Fault("status", 429, retry_after="2"))
    pages = _e2e_walk(client, lower, upper)
    assert ids_of(pages) == ["7"] and sleeps == [2.0]
    assert client.stats.throttled == 1 and pages[0].requests == 2


def test_e2e_single_incident_operations(emulators: Any) -> None:
    tenant, client = _emulated_client(emulators)
    world = emulators.world
    world.add_incident(tenant, {"id": "42", "status": "awaitingAction",
                                "alerts": [{"id": f"da42_{k}", "evidence": []} for k in range(60)]})
    got = client.get_incident("42", deadline=Deadline(30))
    assert got is not None and got["status"] == "awaitingAction"    # Prefer: include-unknown-enum-members sent
    assert len(got["alerts"]) == 60
    assert client.get_incident("404", deadline=Deadline(30)) is None
    alerts = client.list_alerts("42", deadline=Deadline(30))       # 2 pages of the default 50, re-checked
    assert sorted(a["id"] for a in alerts) == sorted(f"da42_{k}" for k in range(60))
    updated = client.update_incident("42", {"status": "resolved", "classification": "truePositive",
                                            "determination": "malware"}, deadline=Deadline(30))
    assert updated["status"] == "resolved" and updated["determination"] == "malware"
    assert updated["lastModifiedBy"] == "defender-sentinel-sync"
    comments = client.add_comment("42", "closed by the SOC", deadline=Deadline(30))
    assert comments[-1]["comment"] == "closed by the SOC" and "createdByDisplayName" in comments[-1]
    with pytest.raises(ApiError) as err:
        client.update_incident("42", {"severity": "high"}, deadline=Deadline(30))   # read-only in v1.0
    assert err.value.status == 400
