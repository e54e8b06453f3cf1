"""Mirror and reconcile cost: the workspace index answers from one listing, the sweep leaves old closed links, and
the Table Storage and Sentinel requests per new mirror, per update and per quiet re-read stay as measured."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from conftest import apply_settings
from harness import run_timer

from emulators.http_spy import observe_requests
from sync.budget import Deadline
from sync.incident_sync import unchanged_since_sync
from sync.pushback import RECENTLY_CLOSED_DAYS, WorkspaceChanges, sweep_skips
from sync.state import LINK_SUFFIX, LINKS
from sync.targets.sentinel_api import WorkspaceIndex
from sync.timeutil import format_time, utcnow


class FakeClient:
    def __init__(self, incidents: list[dict[str, Any]]) -> None:
        self.incidents = incidents
        self.listings: list[str] = []

    def list_incidents_created(self, since: Any, *, deadline: Deadline, top: int = 200) -> list[dict[str, Any]]:
        self.listings.append(format_time(since))
        return self.incidents   # a service ignoring $filter: everything, kept just the same


def _incident(name: str, provider: str = "Azure Sentinel", source: str = "") -> dict[str, Any]:
    return {"name": name, "properties": {"providerName": provider, "providerIncidentId": source}}


def test_the_index_lists_once_per_refresh_and_reaches_back_in_day_steps() -> None:
    client = FakeClient([_incident("A"), _incident("b", "Microsoft XDR", "7")])
    clock = [0.0]
    index = WorkspaceIndex(client, clock=lambda: clock[0])  # type: ignore[arg-type]
    now, deadline = utcnow(), Deadline(60)
    for minutes in range(0, 600, 5):   # incidents newest first, each older than the last
        index.ensure(now - timedelta(minutes=minutes), deadline=deadline)
    assert len(client.listings) == 2, "one listing, then one reaching a day further back"
    assert index.exists("a") and not index.exists("c")
    assert [i["name"] for i in index.candidates("7")] == ["b"]
    clock[0] = 61.0
    index.ensure(now, deadline=deadline)
    assert len(client.listings) == 3, "topped up once the listing is a minute old"


def test_the_reconcile_listing_keeps_only_the_apps_mirrors_and_what_it_reads_of_them() -> None:
    """A first reconcile lists the whole workspace's look-back (every rule's incidents, descriptions and all); only
    the app's mirrors are kept, and of those the four fields the reconcile reads, so memory follows the mirrors."""
    now = utcnow()
    mine = {"name": "m1", "etag": "x", "properties": {
        "lastModifiedTimeUtc": format_time(now), "title": "t", "description": "d" * 10_000,
        "labels": [{"labelName": "defender-sync", "labelType": "User"}],
        "additionalData": {"commentsCount": 2, "alertsCount": 9}}}
    others = [{"name": f"o{i}", "properties": {"lastModifiedTimeUtc": format_time(now), "description": "d" * 10_000,
                                               "labels": [{"labelName": "phishing"}]}} for i in range(500)]
    sentinel = SimpleNamespace(list_incidents=lambda **_kwargs: iter([*others, mine]))
    changes = WorkspaceChanges(SimpleNamespace(sentinel=sentinel))  # type: ignore[arg-type]
    listed = changes.since(now - timedelta(days=7), Deadline(60))
    assert listed == [{"name": "m1", "properties": {
        "lastModifiedTimeUtc": format_time(now), "labels": [{"labelName": "defender-sync", "labelType": "User"}],
        "additionalData": {"commentsCount": 2}}}]
    assert unchanged_since_sync({"sentinelModified": format_time(now), "sentinelComments": 2,
                                 "sentinelLabels": ["defender-sync"]}, listed[0])


def test_the_sweep_leaves_links_closed_long_ago_and_reads_open_or_recent_ones() -> None:
    now = utcnow()
    old = format_time(now - timedelta(days=RECENTLY_CLOSED_DAYS + 1))
    recent = format_time(now - timedelta(days=1))
    closed = {"status": "resolved"}
    assert sweep_skips({"base": closed, "defenderVersion": old, "sentinelModified": old}, now)
    assert not sweep_skips({"base": closed, "defenderVersion": old, "sentinelModified": recent}, now)
    assert not sweep_skips({"base": {"status": "active"}, "defenderVersion": old, "sentinelModified": old}, now)
    assert not sweep_skips({"base": closed, "defenderVersion": old}, now), "unknown time: read it"


# --------------------------------------------------------------------------------- requests per mirrored incident

class TableRequests:
    """Table Storage and Sentinel requests the app makes, counted where every HTTP request goes (``requests``'
    adapter: azure-core's transport and the app's ARM session)."""

    def __init__(self, settings: dict[str, str]) -> None:
        connection = next(v for v in settings.values() if "TableEndpoint=" in v)
        table = dict(p.split("=", 1) for p in connection.split(";") if "=" in p)["TableEndpoint"]
        self.table, self.arm = urlsplit(table).netloc.lower(), urlsplit(settings["ARM_ENDPOINT"]).netloc.lower()
        self.calls: list[tuple[str, str, str]] = []   # (service, method, path)

    @contextmanager
    def counting(self) -> Iterator[None]:
        with observe_requests(self._record):
            yield

    def _record(self, request: Any) -> None:
        url = urlsplit(request.url)
        service = {self.table: "table", self.arm: "sentinel"}.get(url.netloc.lower(), "other")
        self.calls.append((service, str(request.method), unquote(url.path)))

    def run(self) -> dict[str, int]:
        """One pull; its requests by service, and ``links``: point reads and writes of links (beside the versions)
        and of the name index (the links table)."""
        self.calls.clear()
        run_timer("defender_pull")
        out = Counter(service for service, _, _ in self.calls)
        out["links"] = sum(1 for service, _, path in self.calls
                           if service == "table" and (f"/{LINKS}(P" in path or f"{LINK_SUFFIX}')" in path))
        return dict(out)


def test_table_and_sentinel_requests_per_mirrored_incident(emulators: Any, make_app_settings: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    world = emulators.world
    tenant = world.add_tenant(name="Cost")
    settings = make_app_settings([tenant], SYNC_TENANTS=json.dumps({tenant: {"name": "Cost", "mode": "sync"}}))
    apply_settings(monkeypatch, settings)
    counter = TableRequests(settings)
    n = 60
    with counter.counting():
        counter.run()   # tokens, tables, an empty window
        for i in range(n):
            world.add_incident(tenant, {"id": str(5000 + i), "displayName": f"Incident {i}", "severity": "high",
                                        "status": "active", "alerts": [{"title": "A", "severity": "high"}]})
        new = counter.run()
        for i in range(n):
            world.update_incident(tenant, str(5000 + i), {"status": "inProgress"})
        update = counter.run()
        quiet = counter.run()
    assert emulators.sentinel.writes(kind="incident") == 2 * n
    # New mirrors: no link read (never stored before), the links written in transactions with their name index.
    assert new["links"] == 0, new
    assert new["table"] <= 0.2 * n, new
    assert new["sentinel"] <= 1.05 * n, new
    # Updates: one read each, the pull's look-up of the version, which brings the link (the merge base) with it;
    # the page's incident leases (taken, renewed, given back) and its link writes go in transactions.
    assert update["links"] == 0, update
    assert update["table"] <= n + 15, update
    assert update["sentinel"] <= 2 * n, update
    # Nothing changed: the overlap re-reads the versions only (already mirrored: the hook is not run).
    assert quiet["links"] == 0 and quiet.get("sentinel", 0) == 0, quiet
    assert quiet["table"] <= n + 3, quiet
