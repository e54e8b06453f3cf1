"""Mirror and reconcile cost: the workspace index answers from one listing, the sweep leaves old closed links."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sync.budget import Deadline
from sync.pushback import RECENTLY_CLOSED_DAYS, sweep_skips
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


def test_the_sweep_leaves_links_closed_long_ago_and_reads_open_or_recent_ones() -> None:
    now = utcnow()
    old = format_time(now - timedelta(days=RECENTLY_CLOSED_DAYS + 1))
    recent = format_time(now - timedelta(days=1))
    closed = {"status": "resolved"}
    assert sweep_skips({"base": closed, "defenderVersion": old, "sentinelModified": old}, now)
    assert not sweep_skips({"base": closed, "defenderVersion": old, "sentinelModified": recent}, now)
    assert not sweep_skips({"base": {"status": "active"}, "defenderVersion": old, "sentinelModified": old}, now)
    assert not sweep_skips({"base": closed, "defenderVersion": old}, now), "unknown time: read it"
