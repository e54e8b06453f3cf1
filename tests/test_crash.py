"""Processes killed at random points and restarted: nothing is lost, and only the rows of the one page in flight at
the kill can be written twice (Log Analytics has no transactions; RecordId is deterministic so KQL dedupes)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_pull_e2e import expected_versions, ingested

ROOT = Path(__file__).resolve().parent.parent
RUNNER = """
import sys
sys.path.insert(0, {root!r})
from azure.functions.timer import TimerRequest
import function_app
functions = {{f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()}}
functions["defender_pull"](TimerRequest(past_due=False))
"""


def start_app(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", RUNNER.format(root=str(ROOT))], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("seed", [1])
def test_killed_pulls_resume_without_loss(seed: int, emulators: Any, make_app_settings: Any) -> None:
    world = emulators.world
    rng = random.Random(seed)
    tenants = [world.add_tenant(name="Crash A"), world.add_tenant(name="Crash B")]
    world.generate(100 + seed, tenants[0], 250)
    world.generate(200 + seed, tenants[1], 120)
    settings = make_app_settings(tenants, SYNC_GRAPH_PAGE_SIZE="10")
    env = {**os.environ, **settings}
    # Slow the Graph list a little so kills land mid-cycle, between any two steps.
    from emulators.base import Fault

    emulators.faults.rule("graph", lambda req: "security/incidents" in req.path, Fault("delay", seconds=0.05))
    kills = 0
    for _ in range(4):
        process = start_app(env)
        time.sleep(rng.uniform(0.8, 4.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=30)
        # Updates keep landing between crashes.
        incident_id = rng.choice(world.incident_ids(tenants[0]))
        world.update_incident(tenants[0], incident_id, assignedTo=f"analyst{rng.randint(1, 9)}@contoso.com")
    emulators.faults.clear()
    for _ in range(4):  # restarted runs finish the work (a killed run's lease expires within a minute)
        process = start_app(env)
        assert process.wait(timeout=240) == 0
        want, _alerts = expected_versions(world, tenants)
        got, _ = ingested(world)
        if want <= set(got):
            break
        time.sleep(20)
    want_incidents, want_alerts = expected_versions(world, tenants)
    got_incidents, got_alerts = ingested(world)
    assert want_incidents <= set(got_incidents), "an incident version was lost across the crashes"
    assert want_alerts <= set(got_alerts), "an alert version was lost across the crashes"
    duplicates = len(got_incidents) - len(set(got_incidents))
    # Only the page being stored when a kill struck can repeat: at most one page of 10 incidents per kill.
    assert duplicates <= 10 * kills, f"{duplicates} duplicate incident rows after {kills} kills"
