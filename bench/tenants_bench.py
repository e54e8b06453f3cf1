"""Many tenants: backfill, idle runs and freshness at a one-minute schedule (issue 9, goals 6 and 7).

``python -m bench.tenants_bench [--tenants 100] [--incidents 20] [--idle-runs 3] [--workers 4] [--lag-minutes 10]
[--changes 300] [--modes inline queue] [--no-lag]``

For each fan-out mode, on fresh services (Azurite and the HTTPS emulators, started in this process), with
``--tenants`` tenants of ``--incidents`` generated incidents each (mode ``data-only``):

1. **backfill**: the ``defender_pull`` timer function from ``function_app.py`` (loaded as the host does) runs until
   every tenant's last run succeeded. With ``SYNC_FANOUT=queue`` the timer only enqueues; ``--workers`` threads take
   the real messages from Azurite's queue and call the ``tenant_pull`` queue function with them, as the Functions
   host's queue trigger would (a tenant's message is deleted once its call returned).
   Figures: runs to complete, wall time, token requests per tenant per run, requests per incident.
2. **idle**: ``--idle-runs`` more runs with no change in Defender. Figures per idle tenant-run: Graph requests,
   Table Storage operations, token requests and CPU (the CPU clock of the threads that ran the app's functions; the
   emulators run on other threads).
3. **lag** (inline only): ``--changes`` incident updates at random times over ``--lag-minutes`` simulated minutes,
   the pull run every simulated minute. A tick applies the changes due by then to the Graph emulator and runs the
   pull; a run longer than a minute delays the next tick as the host's timer would. Lag = the tick's simulated time
   + (when the Logs Ingestion emulator stored the incident row - when the tick started, real seconds) - the change's
   simulated time. Figures: p50, p95, max.

Requests the app sends are counted by wrapping ``requests``' adapter (as :mod:`bench.pull_child`): Graph, Entra
(token requests), Table Storage, Queue, Logs Ingestion. Prints one line per figure and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.pull_bench import STRAY_ENV, say  # noqa: E402
from bench.pull_child import HttpCounter, service_map  # noqa: E402
from emulators.azurite import Azurite  # noqa: E402
from emulators.certs import ensure_tls  # noqa: E402
from emulators.generator import make_tenants  # noqa: E402
from emulators.hub import EmulatorHub, app_settings  # noqa: E402
from emulators.server import RequestLog  # noqa: E402

TICKS_PER_SECOND = 10_000_000
QUEUE = "defender-tenant-work"


@dataclass
class Meter:
    """Requests by service and app CPU between two points."""

    counter: HttpCounter
    cpu: float = 0.0

    def requests(self) -> dict[str, int]:
        """Requests by service; ``entra`` counts token requests (POSTs), ``entraOther`` metadata GETs."""
        out: dict[str, int] = {}
        for name, calls in self.counter.snapshot().items():
            if name == "entra":
                out["entra"] = calls["methods"].get("POST", 0)
                out["entraOther"] = calls["requests"] - out["entra"]
            else:
                out[name] = calls["requests"]
            if name == "table":
                out.update({f"table{m}": n for m, n in calls["methods"].items()})
        return out


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


_FUNCTIONS: dict[str, Any] = {}


def _functions() -> dict[str, Any]:
    """Function name -> user function, indexed once per process as the host does (a second index fails)."""
    if not _FUNCTIONS:
        import function_app

        _FUNCTIONS.update({str(f.get_function_name()): f.get_user_function()
                           for f in function_app.app.get_functions()})
    return _FUNCTIONS


class App:
    """The Function app in this process, driven through its registered functions."""

    def __init__(self, settings: dict[str, str], counter: HttpCounter, workers: int) -> None:
        for name in STRAY_ENV:
            os.environ.pop(name, None)
        os.environ.update(settings)
        sys.path.insert(0, str(REPO_ROOT))
        self.functions = _functions()
        self.settings = settings
        self.meter = Meter(counter)
        self.workers = workers
        self._cpu_lock = threading.Lock()

    def _timed(self, call: Callable[[], Any]) -> None:
        t0 = time.thread_time()
        try:
            call()
        finally:
            with self._cpu_lock:
                self.meter.cpu += time.thread_time() - t0

    def run(self) -> None:
        """One scheduled run: the timer, then (queue fan-out) every message it enqueued, by ``workers`` threads."""
        from azure.functions.timer import TimerRequest

        self._timed(lambda: self.functions["defender_pull"](TimerRequest(past_due=False)))
        if self.settings.get("SYNC_FANOUT") == "queue":
            self._drain()

    def _drain(self) -> None:
        import azure.functions as func
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy

        def worker() -> None:
            queue = QueueClient.from_connection_string(self.settings["AzureWebJobsStorage"], QUEUE,
                                                       message_decode_policy=TextBase64DecodePolicy())
            while True:
                batch = list(queue.receive_messages(max_messages=1, visibility_timeout=300))
                if not batch:
                    return
                message = batch[0]
                delivered = func.QueueMessage(id=message.id, body=str(message.content).encode("utf-8"))
                self._timed(functools.partial(self.functions["tenant_pull"], delivered))
                queue.delete_message(message)

        threads = [threading.Thread(target=worker, name=f"queue-worker-{i}") for i in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def status(self) -> dict[str, Any]:
        import azure.functions as func

        response = self.functions["sync_status"](func.HttpRequest(method="GET", url="https://app.local/api/sync/status",
                                                                  headers={}, params={}, route_params={}, body=b""))
        return dict(json.loads(response.get_body()))

    def done(self) -> bool:
        return all((t.get("lastRun") or {}).get("outcome") == "success" for t in self.status()["tenants"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def start_services(state_dir: Path) -> tuple[Azurite, EmulatorHub, str]:
    tls = ensure_tls(state_dir)
    os.environ["REQUESTS_CA_BUNDLE"] = str(tls.ca_pem)
    azurite = Azurite()
    hub = EmulatorHub(include_sentinel=False)
    hub.log = RequestLog(maxlen=500_000)
    connection = azurite.start()
    hub.start(state_dir)
    return azurite, hub, connection


def run_mode(args: argparse.Namespace, mode: str, counter: HttpCounter) -> dict[str, Any]:
    """Backfill, idle runs and (inline) the lag simulation on fresh services."""
    state_dir = Path(tempfile.mkdtemp(prefix=f"tenants-bench-{mode}-"))
    azurite, hub, connection = start_services(state_dir)
    try:
        specs = make_tenants(args.seed, args.tenants)
        for index, spec in enumerate(specs):
            hub.world.add_tenant(spec.tenant_id, spec.name, spec.domain)
            hub.world.generate(args.seed + index, spec.tenant_id, args.incidents, profile="realistic")
        settings = app_settings(
            hub, connection, [s.tenant_id for s in specs], credential="secret",
            SYNC_TENANTS=json.dumps({s.tenant_id: {"name": s.name, "mode": "data-only"} for s in specs}),
            SYNC_FANOUT=mode, SYNC_TIME_BUDGET_SECONDS="600", GRAPH_MAX_REQUESTS_PER_MINUTE="100000")
        counter.services = service_map(settings)
        app = App(settings, counter, args.workers)
        n_tenants, n_incidents = args.tenants, args.tenants * args.incidents
        say(f"== {mode}: {n_tenants} tenants x {args.incidents} incidents"
            + (f", {args.workers} queue workers" if mode == "queue" else ""))
        # 1. backfill
        before, cpu0, wall0 = app.meter.requests(), app.meter.cpu, time.perf_counter()
        runs = 0
        while runs < args.max_runs:
            app.run()
            runs += 1
            if app.done():
                break
        backfill_wall = time.perf_counter() - wall0
        spent = delta(app.meter.requests(), before)
        rows = hub.world.rows("DefenderIncidents_CL")
        complete = len({(r["DefenderTenantId"], r["IncidentId"]) for r in rows}) == n_incidents
        backfill = {"runs": runs, "complete": complete, "wallSeconds": round(backfill_wall, 2),
                    "cpuSeconds": round(app.meter.cpu - cpu0, 2), "requests": spent,
                    "tokenRequestsPerTenantPerRun": round(spent.get("entra", 0) / (n_tenants * runs), 3),
                    "graphPerIncident": round(spent.get("graph", 0) / n_incidents, 4),
                    "tablePerIncident": round(spent.get("table", 0) / n_incidents, 4),
                    "requestsPerIncident": round(sum(spent.get(k, 0) for k in ("graph", "table", "ingestion", "entra"))
                                                 / n_incidents, 4)}
        say(f"backfill: {'complete' if complete else 'INCOMPLETE'} in {runs} run(s), {backfill_wall:.1f} s wall, "
            f"{backfill['cpuSeconds']} s app CPU; requests {spent}; token requests per tenant per run "
            f"{backfill['tokenRequestsPerTenantPerRun']}; per incident: Graph {backfill['graphPerIncident']}, "
            f"Table {backfill['tablePerIncident']}, all {backfill['requestsPerIncident']}")
        # 2. idle runs
        before, cpu0, wall0 = app.meter.requests(), app.meter.cpu, time.perf_counter()
        for _ in range(args.idle_runs):
            app.run()
        idle_wall = time.perf_counter() - wall0
        spent = delta(app.meter.requests(), before)
        tenant_runs = n_tenants * args.idle_runs
        idle = {"runs": args.idle_runs, "wallSecondsPerRun": round(idle_wall / args.idle_runs, 2),
                "perTenantRun": {k: round(v / tenant_runs, 3) for k, v in spent.items()},
                "cpuMsPerTenantRun": round((app.meter.cpu - cpu0) * 1000 / tenant_runs, 2)}
        say(f"idle: per tenant-run {idle['perTenantRun']} requests, {idle['cpuMsPerTenantRun']} ms app CPU; "
            f"{idle['wallSecondsPerRun']} s wall per run of {n_tenants} tenants")
        result: dict[str, Any] = {"mode": mode, "tenants": n_tenants, "incidentsPerTenant": args.incidents,
                                  "workers": args.workers if mode == "queue" else None, "backfill": backfill,
                                  "idle": idle}
        if mode == "inline" and not args.no_lag:
            result["lag"] = lag(args, app, hub, [s.tenant_id for s in specs])
        return result
    finally:
        hub.stop()
        azurite.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def lag(args: argparse.Namespace, app: App, hub: EmulatorHub, tenants: list[str]) -> dict[str, Any]:
    """Changes at random simulated times, the pull every simulated minute; lag of each change's incident row."""
    rng = random.Random(args.seed)
    horizon = args.lag_minutes * 60.0
    changes = sorted((rng.uniform(0, horizon), rng.choice(tenants)) for _ in range(args.changes))
    ids = {t: hub.world.incident_ids(t) for t in tenants}
    waiting: dict[tuple[str, str, str], float] = {}   # (tenant, incident, lastUpdate) -> simulated change time
    lags: list[float] = []
    tick, applied, durations = 60.0, 0, []
    ingestion = hub.world.ingestion
    while tick <= horizon + 60.0:
        real0 = time.perf_counter()
        ticks0 = ingestion.clock_ticks()
        while applied < len(changes) and changes[applied][0] <= tick:
            at, tenant = changes[applied]
            incident_id = rng.choice(ids[tenant])
            updated = hub.world.update_incident(tenant, incident_id, assignedTo=f"analyst{applied}@contoso.com")
            waiting[(tenant, incident_id, _canonical(str(updated["lastUpdateDateTime"])))] = at
            applied += 1
        app.run()
        with ingestion.lock:
            rows = list(ingestion._rows.get("DefenderIncidents_CL", []))
            stamps = list(ingestion._ingested_at.get("DefenderIncidents_CL", []))
        for row, stamp in zip(rows, stamps, strict=True):
            if stamp <= ticks0:
                continue
            key = (str(row["DefenderTenantId"]), str(row["IncidentId"]), _canonical(str(row["LastUpdateDateTime"])))
            if key in waiting:
                lags.append(tick + (stamp - ticks0) / TICKS_PER_SECOND - waiting.pop(key))
        duration = time.perf_counter() - real0
        durations.append(duration)
        tick = max(tick + 60.0, 60.0 * -(-(tick + duration) // 60.0))
    # A change superseded by a later one of the same incident before a run saw it is never ingested as such.
    superseded = len(waiting)
    out = {"changes": len(changes), "measured": len(lags), "superseded": superseded,
           "p50Seconds": round(statistics.median(lags), 1) if lags else None,
           "p95Seconds": round(percentile(lags, 0.95), 1), "maxSeconds": round(max(lags), 1) if lags else None,
           "runSecondsP50": round(statistics.median(durations), 2), "runSecondsMax": round(max(durations), 2),
           "simulatedMinutes": args.lag_minutes}
    say(f"lag over {out['measured']} changes ({superseded} superseded before a run saw them), one-minute schedule: "
        f"p50 {out['p50Seconds']} s, p95 {out['p95Seconds']} s, max {out['maxSeconds']} s; run of {len(tenants)} "
        f"tenants took {out['runSecondsP50']} s (max {out['runSecondsMax']} s)")
    return out


def _canonical(value: str) -> str:
    from sync.timeutil import canonical_time

    return canonical_time(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tenants_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--incidents", type=int, default=20, help="incidents per tenant")
    parser.add_argument("--idle-runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="queue workers (SYNC_FANOUT=queue)")
    parser.add_argument("--modes", nargs="+", choices=("inline", "queue"), default=["inline", "queue"])
    parser.add_argument("--lag-minutes", type=int, default=10, help="simulated minutes of the lag run")
    parser.add_argument("--changes", type=int, default=300, help="incident changes over the lag run")
    parser.add_argument("--no-lag", action="store_true", help="skip the lag simulation")
    parser.add_argument("--max-runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    if args.tenants < 1 or args.incidents < 0 or args.workers < 1:
        parser.error("--tenants and --workers must be at least 1, --incidents at least 0")
    if not Azurite.available():
        say("Azurite is not installed (run `npm ci`) or node is missing")
        return 2
    counter = HttpCounter({})
    counter.install()
    results = [run_mode(args, mode, counter) for mode in args.modes]
    say(json.dumps({"benchmark": "tenants", "results": results}, separators=(",", ":")))
    return 0 if all(r["backfill"]["complete"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
