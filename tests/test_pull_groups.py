"""A step stores several Graph pages at once (its fixed costs, three Logs Ingestion calls, the version transaction
and the checkpoint, are paid once per group), and a failure reading on loses nothing: the pages read are stored and
the failure ends the next step, as it did when each step read one page."""

from __future__ import annotations

from typing import Any

import pytest

from emulators.base import EmuRequest, Fault
from sync import jsonio
from sync.budget import Deadline
from sync.context import get_context
from sync.http import ApiError
from sync.logs_sink import chunk_rows
from sync.pull import STEP_INCIDENTS, TenantPull
from sync.rows import STREAMS


def ingestion_posts(emulators: Any) -> int:
    """Uploads the service accepted (a retry after a slow answer on a loaded machine is not another upload)."""
    return len([e for e in emulators.log.entries(service="ingestion", method="POST") if e.status < 300])


def step_until_stored(pull: TenantPull, emulators: Any) -> bool:
    """Run steps (the first may retry dead letters) until one uploads rows; returns that step's answer."""
    posts = ingestion_posts(emulators)
    while True:
        more = pull.step()
        if ingestion_posts(emulators) > posts or not more:
            return more


def test_one_step_stores_several_graph_pages_with_one_upload_per_table(
        emulators: Any, one_tenant: Any) -> None:
    world, _tenant = one_tenant("Grouped", 11, 35, SYNC_GRAPH_PAGE_SIZE="10")
    ctx = get_context()
    ctx.state.ensure_tables()
    pull = TenantPull(ctx, ctx.settings.tenants[0], deadline=Deadline(120))
    assert pull.start()
    before = len(emulators.log.entries(service="ingestion", method="POST"))
    step_until_stored(pull, emulators)
    uploads = emulators.log.entries(service="ingestion", method="POST")[before:]
    assert STEP_INCIDENTS >= 35 and len(world.rows("DefenderIncidents_CL")) == 35, "four pages in one step"
    # One upload per table for the whole group, split only where its rows exceed one request (the sink's chunks);
    # a step per page made three per page, twelve here.
    for table, stream in STREAMS.items():
        if table == "DefenderMirrorRequests_CL":
            continue
        posted = [e for e in uploads if e.status < 300 and e.path.endswith(stream)]
        sizes = [len(jsonio.dumps(row) or b"") for row in world.rows(table)]
        assert 1 <= len(posted) <= len(chunk_rows(sizes, 900_000)), f"{table}: {len(posted)} uploads"
    assert pull.summary.pages >= 4, "four pages or more (a page boundary may be read twice), in one step"
    while pull.step():
        pass
    assert pull.finish("success").outcome == "success"
    assert len(world.rows("DefenderIncidents_CL")) == 35


def test_a_failure_reading_on_stores_the_pages_read_and_ends_the_next_step(
        emulators: Any, one_tenant: Any) -> None:
    world, _tenant = one_tenant("Flaky", 12, 25, SYNC_GRAPH_PAGE_SIZE="10")
    lists = {"n": 0}

    def second_list(request: EmuRequest) -> bool:
        if not request.path.rstrip("/").endswith("security/incidents"):
            return False
        lists["n"] += 1
        return lists["n"] == 2

    emulators.faults.queue("graph", Fault("status", 403), when=second_list)
    ctx = get_context()
    ctx.state.ensure_tables()
    config = ctx.settings.tenants[0]
    pull = TenantPull(ctx, config, deadline=Deadline(120))
    assert pull.start()
    assert step_until_stored(pull, emulators), "the first page is stored although reading on failed"
    assert len(world.rows("DefenderIncidents_CL")) == 10
    with pytest.raises(ApiError):
        pull.step()
    pull.finish("failed")
    again = TenantPull(ctx, config, deadline=Deadline(120))
    assert again.start()
    while again.step():
        pass
    assert again.finish("success").outcome == "success"
    ids = [r["IncidentId"] for r in world.rows("DefenderIncidents_CL")]
    assert len(ids) == len(set(ids)) == 25, "resumed after the stored page: every incident once"


def test_a_slice_after_one_finished_by_reading_on_is_read_to_its_end(
        emulators: Any, one_tenant: Any) -> None:
    """A run first finishes a paused slice (its end found while reading on, in the step that stores its last
    pages) and then reads a new window of several steps: every page of that window is stored before the cursor
    moves. Ending the second slice with the first one's end would move the cursor past pages never read."""
    world, tenant = one_tenant("Two slices", 13, 300, SYNC_GRAPH_PAGE_SIZE="50")
    ctx = get_context()
    ctx.state.ensure_tables()
    paused = TenantPull(ctx, ctx.settings.tenants[0], deadline=Deadline(120))
    assert paused.start() and step_until_stored(paused, emulators), "one step of the backlog, then a pause"
    assert paused.finish("partial").outcome == "partial"
    for incident_id in world.incident_ids(tenant):  # more than one step's worth in the new window
        world.update_incident(tenant, incident_id, {"severity": "high"})
    pull = TenantPull(ctx, ctx.settings.tenants[0], deadline=Deadline(120))
    assert pull.start()
    while pull.step():
        pass
    assert pull.finish("success").outcome == "success"
    stored = {(r["IncidentId"], r["LastUpdateDateTime"]) for r in world.rows("DefenderIncidents_CL")}
    current = {(i, world.get_incident(tenant, i)["lastUpdateDateTime"]) for i in world.incident_ids(tenant)}
    assert not current - stored, f"{len(current - stored)} current versions never stored"
