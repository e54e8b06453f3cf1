"""The ``defender-portal`` mirror target on the emulators: latency, costs per mirror, and a 1,500-incident backlog.

``python -m bench.portal_bench [--backlog 1500] [--tenants 3] [--skip-latency] [--skip-costs] [--skip-backlog]``

Everything runs in THIS process: Azurite, the HTTPS emulators (unified-portal world, mirror rule put), and the app,
whose ``defender_pull`` timer function is called through ``function_app.py`` as the Functions host calls it. No step
sleeps: time is simulated (:class:`SimTime`):

- the app's defender-portal clock and sleep (``ctx.clock`` / ``ctx.sleep``: request times, the shared pace, the
  30-minute re-request) move by simulated seconds;
- the mirror rule runs at 30 s past every simulated minute (``world.portal.advance(minutes=1)``, which also moves the
  emulators' clock a minute, so incident creation times follow the simulated time). A real rule's phase against the
  pull timer is arbitrary; 30 s is its mean;
- the pull timer fires every ``S`` simulated minutes (``DEFENDER_PULL_SCHEDULE``); a run's "wait for the pace" ends
  when the next run is due (``ctx.sleep`` raises ``BudgetExhausted`` there, which the request phase treats as the end
  of its budget), as the Functions host does not start a timer run while the previous one runs.

Defender incidents are stamped with the real time (the pull reads up to the real now), so simulated minutes never
hide an incident from the pull. ``SENTINEL_MAX_WRITES_PER_MINUTE`` and ``GRAPH_MAX_REQUESTS_PER_MINUTE`` are raised
(those caps run on the real clock, and an hour of simulated linking takes a few real minutes); the mirror request
pace, the figure measured here, runs on the simulated clock at its default of 25 a minute.

Requests are counted by service with :class:`bench.pull_child.HttpCounter` (every call through ``requests``:
Graph, Sentinel ARM, azure-data-tables, azure-monitor-ingestion, Entra); Sentinel writes from the Sentinel
emulator's write log. Prints figures; asserts only sanity (no summary alert, nothing created through the API).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from azure.functions.timer import TimerRequest  # noqa: E402

from bench.pull_child import HttpCounter, service_map  # noqa: E402
from emulators.azurite import Azurite  # noqa: E402
from emulators.certs import ensure_tls  # noqa: E402
from emulators.hub import EmulatorHub, app_settings  # noqa: E402
from emulators.server import RequestLog  # noqa: E402
from sync.budget import BudgetExhausted  # noqa: E402
from sync.timeutil import format_time, parse_time  # noqa: E402

RULE_ID = "5b1e2c3d-0000-4000-8000-00000000be7c"
RULE_PHASE_SECONDS = 30.0
REQUESTS_TABLE = "DefenderMirrorRequests_CL"


def say(text: str = "") -> None:
    print(text, flush=True)


class SimTime:
    """Simulated seconds since the start: the app's clock, its sleep, and the mirror rule's minute."""

    def __init__(self, hub: EmulatorHub) -> None:
        self.hub = hub
        self.start = datetime.now(UTC)
        self.t = 0.0
        self.next_rule = RULE_PHASE_SECONDS
        self.run_end: float | None = None
        self.rule_runs: list[tuple[float, Any]] = []
        self._lock = threading.RLock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.start + timedelta(seconds=self.t)

    def advance_to(self, target: float) -> None:
        """Move to ``target`` seconds, running the rule at each of its minutes passed."""
        with self._lock:
            while self.next_rule <= target:
                self.t = self.next_rule
                self.rule_runs.extend((self.t, run) for run in self.hub.world.portal.advance(minutes=1))
                self.next_rule += 60.0
            self.t = max(self.t, target)

    def sleep(self, seconds: float) -> None:
        """The app's sleep: simulated; the run's budget ends where the next timer run is due."""
        with self._lock:
            if self.run_end is not None and self.t + seconds > self.run_end:
                self.advance_to(self.run_end)
                raise BudgetExhausted("the next timer run is due")
            self.advance_to(self.t + seconds)


class Bench:
    """One set of services (Azurite + emulators) for every scenario; each scenario starts from empty state."""

    def __init__(self) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="portal-bench-"))
        os.environ["REQUESTS_CA_BUNDLE"] = str(ensure_tls(self.state_dir).ca_pem)
        self.azurite = Azurite()
        self.hub = EmulatorHub(include_sentinel=True)
        self.hub.log = RequestLog(maxlen=500_000)
        self.connection = ""
        self.counter: HttpCounter | None = None
        self.functions: dict[str, Any] = {}
        self.sim: SimTime | None = None
        self.tenants: list[str] = []

    def __enter__(self) -> Bench:
        self.connection = self.azurite.start()
        self.hub.start(self.state_dir)
        return self

    def __exit__(self, *exc: object) -> None:
        self.hub.stop()
        self.azurite.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- setup ---------------------------------------------------------------------------------------------------

    def fresh(self, tenants: int, **overrides: str) -> SimTime:
        """Empty emulators and tables, a unified-portal world with the mirror rule, the app in defender-portal."""
        from azure.data.tables import TableServiceClient

        self.hub.reset()
        service = TableServiceClient.from_connection_string(self.connection)
        for table in list(service.list_tables()):
            service.delete_table(table.name)
        world = self.hub.world
        names = ("Contoso", "Fabrikam", "Woodgrove", "Northwind", "Tailspin")
        self.tenants = [world.add_tenant(name=names[i % len(names)]) for i in range(tenants)]
        world.portal.enable()
        world.portal.put_rule(RULE_ID)
        spec = {t: {"name": names[i % len(names)]} for i, t in enumerate(self.tenants)}
        settings = app_settings(self.hub, self.connection, self.tenants, SYNC_TENANTS=json.dumps(spec),
                                SYNC_MIRROR_TARGET="defender-portal", SYNC_MIRROR_RULE_ID=RULE_ID,
                                SENTINEL_MAX_WRITES_PER_MINUTE="100000", GRAPH_MAX_REQUESTS_PER_MINUTE="100000",
                                **overrides)
        os.environ.update({k: v for k, v in settings.items() if v is not None})
        if self.counter is None:
            self.counter = HttpCounter(service_map(settings))
            self.counter.install()
        self.counter.services = service_map(settings)
        if not self.functions:
            import function_app

            self.functions = {str(f.get_function_name()): f.get_user_function()
                              for f in function_app.app.get_functions()}
        from sync.context import get_context

        sim = SimTime(self.hub)
        ctx = get_context()
        ctx.clock, ctx.sleep = sim, sim.sleep
        self.sim = sim
        return sim

    def incident(self, tenant: str, incident_id: str, severity: str = "high", **fields: Any) -> None:
        """A new Defender incident, stamped with the real time (the pull reads up to the real now)."""
        stamp = format_time(datetime.now(UTC))
        self.hub.world.add_incident(tenant, {
            "id": incident_id, "displayName": f"Incident {incident_id} on WS-{incident_id}", "severity": severity,
            "status": "active", "description": "Suspicious PowerShell", "createdDateTime": stamp,
            "lastUpdateDateTime": stamp, **fields,
            "alerts": [{"title": f"Alert of {incident_id}", "severity": severity, "status": "new",
                        "serviceSource": "microsoftDefenderForEndpoint"}]})

    def pull(self, run_end: float | None) -> None:
        """One ``defender_pull`` timer run at the current simulated time; it may wait (simulated) until ``run_end``."""
        assert self.sim is not None
        self.sim.run_end = run_end
        try:
            self.functions["defender_pull"](TimerRequest(past_due=False))
        finally:
            self.sim.run_end = None

    # -- inspection ----------------------------------------------------------------------------------------------

    def link(self, tenant: str, incident_id: str) -> str | None:
        from sync.context import get_context

        link = get_context().state.get_link(tenant, incident_id)
        return str(link["sentinelName"]) if link and link.get("state") == "active" else None

    def calls(self) -> dict[str, int]:
        assert self.counter is not None
        return {name: int(c["requests"]) for name, c in self.counter.snapshot().items()}

    @property
    def sentinel(self) -> Any:
        assert self.hub.sentinel is not None
        return self.hub.sentinel

    def api_creations(self) -> int:
        return sum(1 for w in self.sentinel.write_log if w.kind == "incident" and w.status == 201)

    def request_rows(self) -> list[dict[str, Any]]:
        return list(self.hub.world.rows(REQUESTS_TABLE))


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
            if after.get(k, 0) - before.get(k, 0)}


# ---------------------------------------------------------------------------------------------------- (a) latency


def latency(bench: Bench, schedule_minutes: int, samples: int = 8) -> dict[str, Any]:
    """New incidents created at evenly spread moments of the pull period; when each mirror is visible (made by the
    rule) and when it is linked (synced by the app)."""
    sim = bench.fresh(3)
    period = schedule_minutes * 60.0
    created: dict[tuple[str, str], float] = {}
    linked: dict[tuple[str, str], float] = {}
    made_at: dict[str, float] = {}
    plan = sorted(((i + 0.5) * period / samples + period * (i % 2), i) for i in range(samples))  # two periods
    pending = list(plan)
    t = 0.0
    bench.pull(None)                         # the first run (empty): the cursor starts
    while t < period * 6:
        t_next = t + period
        while pending and pending[0][0] < t_next:
            at, i = pending.pop(0)
            sim.advance_to(at)
            key = (bench.tenants[i % len(bench.tenants)], str(100 + i))
            bench.incident(*key)
            created[key] = at
        sim.advance_to(t_next)
        t = t_next
        bench.pull(t + period)
        for at, run in sim.rule_runs:
            for name in run.incidents:
                made_at.setdefault(name.lower(), at)
        for key in created:
            name = bench.link(*key)
            if name and key not in linked:
                linked[key] = t
                made_at.setdefault(name.lower(), t)
    visible = [made_at[str(bench.link(*k)).lower()] - created[k] for k in created if k in linked]
    link_times = [linked[k] - created[k] for k in created if k in linked]
    return {"scheduleMinutes": schedule_minutes, "incidents": len(created), "linked": len(linked),
            "visibleSeconds": _spread(visible), "linkedSeconds": _spread(link_times)}


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": round(min(values)), "mean": round(sum(values) / len(values)), "max": round(max(values))}


# ---------------------------------------------------------------------------------------------------- (b) costs


def costs(bench: Bench, count: int = 20) -> dict[str, Any]:
    """Requests per new mirror (first seen -> requested -> made by the rule -> linked and synced) and per updated
    mirror (one Defender change reaching a linked mirror), net of a quiet run's own calls."""
    sim = bench.fresh(3)
    bench.pull(None)
    sim.advance_to(60)
    c0 = bench.calls()
    bench.pull(None)                          # a quiet run
    quiet = diff(bench.calls(), c0)
    keys = [(bench.tenants[i % len(bench.tenants)], str(200 + i)) for i in range(count)]
    for key in keys:
        bench.incident(*key)
    bench.sentinel.reset_write_log()
    c1 = bench.calls()
    sim.advance_to(120)
    bench.pull(None)                          # sees them, sends the request rows
    sim.advance_to(180)                       # the rule makes the incidents
    bench.pull(None)                          # links and syncs them
    new = diff(bench.calls(), c1)
    new_writes = bench.sentinel.writes(kind="incident"), bench.sentinel.writes(kind="comment")
    assert all(bench.link(*k) for k in keys), "every new incident is linked"
    for tenant, incident_id in keys:
        bench.hub.world.update_incident(tenant, incident_id, severity="low",
                                        last_update=format_time(datetime.now(UTC)))
    bench.sentinel.reset_write_log()
    c2 = bench.calls()
    sim.advance_to(240)
    bench.pull(None)
    updated = diff(bench.calls(), c2)
    upd_writes = bench.sentinel.writes(kind="incident"), bench.sentinel.writes(kind="comment")

    def per(total: dict[str, int], runs: int) -> dict[str, float]:
        return {k: round((v - runs * quiet.get(k, 0)) / count, 2) for k, v in total.items()}

    return {"mirrors": count, "quietRun": quiet, "newMirrorRuns": new, "perNewMirror": per(new, 2),
            "sentinelWritesPerNewMirror": {"incident": new_writes[0] / count, "comment": new_writes[1] / count},
            "updatedRun": updated, "perUpdatedMirror": per(updated, 1),
            "sentinelWritesPerUpdatedMirror": {"incident": upd_writes[0] / count, "comment": upd_writes[1] / count},
            "apiCreations": bench.api_creations()}


# ---------------------------------------------------------------------------------------------------- (c) backlog


def backlog(bench: Bench, incidents: int, tenants: int, schedule_minutes: int = 5) -> dict[str, Any]:
    """``incidents`` new Defender incidents at once over ``tenants`` tenants, default pace (25 a minute)."""
    sim = bench.fresh(tenants)
    severities = ("high", "medium", "low", "informational")
    for n in range(incidents):
        bench.incident(bench.tenants[n % tenants], str(1000 + n), severity=severities[n % 4])
    keys = [(bench.tenants[n % tenants], str(1000 + n)) for n in range(incidents)]
    period = schedule_minutes * 60.0
    real0 = time.perf_counter()
    bench.pull(period)                                     # the first run: the whole pull, then requests at pace
    tables_real = None
    rows = Counter(r["DefenderTenantId"] for r in bench.hub.world.rows("DefenderIncidents_CL"))
    if sum(rows.values()) >= incidents:
        tables_real = time.perf_counter() - real0          # upper bound: the run also waited for the pace
    runs = 1
    all_linked_at = None
    while all_linked_at is None and runs < 200:
        t = runs * period
        sim.advance_to(t)
        bench.pull(t + period)
        runs += 1
        if len(bench.request_rows()) >= incidents and all(bench.link(*k) for k in keys):
            all_linked_at = t
    sent = bench.request_rows()
    times = sorted(parse_time(r["TimeGenerated"]).timestamp() for r in sent)
    def rolling(seconds: float) -> int:
        return max((sum(1 for u in times[i:] if u - s < seconds) for i, s in enumerate(times)), default=0)

    first = times[0] - sim.start.timestamp() if times else 0.0
    last = times[-1] - sim.start.timestamp() if times else 0.0
    rule_rows = [run.rows for _at, run in sim.rule_runs]
    return {"incidents": incidents, "tenants": tenants, "scheduleMinutes": schedule_minutes,
            "requestRows": len(sent), "distinctIncidentsRequested": len({(r["DefenderTenantId"], r["IncidentId"])
                                                                         for r in sent}),
            "firstRowMinute": round(first / 60, 1), "lastRowMinute": round(last / 60, 1),
            "allLinkedMinute": None if all_linked_at is None else round(all_linked_at / 60, 1),
            # strict, and with 1 ms of slack (the shared ledger stores grant times to the millisecond)
            "maxRowsInAnyRolling60s": rolling(60.0), "maxRowsInAnyRolling59_999s": rolling(59.999),
            "rowsPerSimulatedMinute": max(Counter(int((u - sim.start.timestamp()) // 60) for u in times).values(),
                                          default=0),
            "maxRowsPerRuleRun": max(rule_rows, default=0),
            "ruleRunsOver30": sum(1 for r in rule_rows if r > 30),
            "summaryAlerts": sum(1 for _at, run in sim.rule_runs if run.summary),
            "apiCreations": bench.api_creations(), "timerRuns": runs,
            "tablesCompleteAfterFirstRunRealSeconds": None if tables_real is None else round(tables_real, 1),
            "incidentRowsAfterFirstRun": sum(rows.values()), "realSeconds": round(time.perf_counter() - real0, 1)}


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=1500)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-costs", action="store_true")
    parser.add_argument("--skip-backlog", action="store_true")
    args = parser.parse_args(argv)
    if not Azurite.available():
        say("Azurite is not installed (run `npm ci`) or node is missing")
        return 2
    import logging

    logging.disable(logging.WARNING)   # the app's per-incident logs would drown the figures
    results: dict[str, Any] = {}
    with Bench() as bench:
        if not args.skip_latency:
            for schedule in (1, 5):
                r = latency(bench, schedule)
                results[f"latency{schedule}min"] = r
                say(f"(a) pull every {schedule} min: {r['linked']}/{r['incidents']} linked; new Defender incident "
                    f"-> mirror visible (made by the rule) {r['visibleSeconds']} s; -> linked and synced "
                    f"{r['linkedSeconds']} s")
        if not args.skip_costs:
            r = costs(bench)
            results["costs"] = r
            say(f"(b) quiet run: {r['quietRun']}")
            say(f"    per new mirror (net of 2 quiet runs): {r['perNewMirror']}; Sentinel writes "
                f"{r['sentinelWritesPerNewMirror']}")
            say(f"    per updated mirror (net of 1 quiet run): {r['perUpdatedMirror']}; Sentinel writes "
                f"{r['sentinelWritesPerUpdatedMirror']}; created through the API: {r['apiCreations']}")
        if not args.skip_backlog:
            r = backlog(bench, args.backlog, args.tenants)
            results["backlog"] = r
            say(f"(c) backlog {r['incidents']:,} over {r['tenants']} tenants, pull every {r['scheduleMinutes']} min, "
                f"25 requests/min: rows {r['requestRows']} ({r['distinctIncidentsRequested']} incidents), first at "
                f"minute {r['firstRowMinute']}, last at minute {r['lastRowMinute']}, all linked at minute "
                f"{r['allLinkedMinute']}")
            say(f"    max rows in any rolling 60 s: {r['maxRowsInAnyRolling60s']} (in 59.999 s: "
                f"{r['maxRowsInAnyRolling59_999s']}; per simulated minute: {r['rowsPerSimulatedMinute']}); "
                f"max rows per rule run: "
                f"{r['maxRowsPerRuleRun']}; rule runs over 30: {r['ruleRunsOver30']}; summary alerts: "
                f"{r['summaryAlerts']}; created through the API: {r['apiCreations']}")
            say(f"    incident rows in the table after the first run: {r['incidentRowsAfterFirstRun']:,} "
                f"(first run took {r['tablesCompleteAfterFirstRunRealSeconds']} s real, including its paced "
                f"requests); {r['timerRuns']} timer runs, {r['realSeconds']} s real in all")
            assert r["ruleRunsOver30"] == 0 and r["apiCreations"] == 0
    say(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
