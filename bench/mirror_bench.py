"""Mirror and reconcile cost on the emulators: ``python -m bench.mirror_bench [--incidents N] [--closed C]
[--changes K]``.

In this process: Azurite, the HTTPS emulators (with Sentinel) and the Function app (``function_app.py`` through
``app.get_functions()``, as the host calls it), two tenants in mode ``sync``, mirror target ``sentinel-api``.
Every HTTP request the app makes is counted by service (``requests.adapters.HTTPAdapter.send``: the app's ARM and
Graph sessions and azure-core's transport for Table Storage all go through it).

1. **New mirrors**: N Defender incidents (one alert, no comment), one ``defender_pull``: Sentinel and Table
   requests per new mirror, and mirrors per second (the pull's wall time, ingestion included, over N).
2. **Updates**: every incident's status changed in Defender, one ``defender_pull``: requests per updated incident.
3. **Quiet re-run**: nothing changed in Defender, one ``defender_pull`` (its overlap re-reads the N incidents): Table
   and Sentinel requests per re-read incident.
3. **Reconcile**: C closed links (closed 30 days ago, mirrors unchanged since) spread over the two tenants, plus the
   N open mirrors of step 1 of which K are edited by an analyst in Sentinel (no webhook delivered); one reconcile
   run (``sync_run`` direction reconcile, every tenant): ARM reads and ARM requests.

Prints one line per figure and, last, one JSON line with all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.pull_bench import STRAY_ENV  # noqa: E402
from emulators.azurite import Azurite  # noqa: E402
from emulators.certs import ensure_tls  # noqa: E402
from emulators.http_spy import observe_requests  # noqa: E402
from emulators.hub import EmulatorHub, app_settings  # noqa: E402

BATCH = 100


class Counts:
    """HTTP requests by (service, method), counted at the ``requests`` adapter."""

    def __init__(self, services: dict[str, str]) -> None:
        self.services = services   # netloc -> service name
        self.counter: Counter[tuple[str, str]] = Counter()

    @contextmanager
    def installed(self) -> Iterator[None]:
        with observe_requests(self._count):
            yield

    def _count(self, request: Any) -> None:
        self.counter[(self.services.get(urlsplit(request.url).netloc.lower(), "other"), str(request.method))] += 1

    def measure(self, action: Callable[[], Any]) -> tuple[dict[str, int], float]:
        """Run ``action``; (requests per service and service:method, wall seconds)."""
        self.counter.clear()
        started = time.perf_counter()
        action()
        wall = time.perf_counter() - started
        out: dict[str, int] = {}
        for (service, method), n in self.counter.items():
            out[service] = out.get(service, 0) + n
            out[f"{service}:{method}"] = n
        return out, wall


def _incident(incident_id: str) -> dict[str, Any]:
    return {"id": incident_id, "displayName": f"Incident {incident_id}", "severity": "high", "status": "active",
            "description": "Suspicious PowerShell",
            "alerts": [{"title": f"Alert of {incident_id}", "severity": "high", "status": "new",
                        "serviceSource": "microsoftDefenderForEndpoint"}]}


def seed_closed_links(hub: EmulatorHub, store: Any, tenants: list[str], closed: int) -> None:
    """``closed`` mirrors closed 30 days ago and unchanged since: Sentinel incidents and links as the app leaves
    them (written straight into the emulator and the state tables, in batches)."""
    from sync.state import INCIDENTS, LINKS, _link_entity, _name_index_entity

    sentinel = hub.sentinel
    ws = sentinel._workspace(None)
    old_ticks = sentinel._clock_ns() // 100 - int(timedelta(days=30).total_seconds() * 10_000_000)
    links: dict[str, list[dict[str, Any]]] = {}
    index: list[dict[str, Any]] = []
    for n in range(closed):
        tenant = tenants[n % len(tenants)]
        incident_id = str(900_000 + n)
        name = sentinel_name(tenant, incident_id)
        sentinel.seed_incident(name, title=f"Closed {incident_id}", status="Closed", classification="FalsePositive",
                               classification_reason="InaccurateData", labels=["Defender XDR"])
        inc = ws.incidents[name.lower()]
        inc.modified = inc.created = old_ticks
        resource = sentinel.get(name)
        props = resource["properties"]
        link = {"sentinelName": name, "state": "active", "base": {
            "status": "resolved", "owner": None, "classification": "falsePositive", "determination": "other",
            "tags": []}, "defenderVersion": "2020-01-01T00:00:00.0000000Z",
            "sentinelModified": props["lastModifiedTimeUtc"], "redirected": False,
            "sentinelComments": props["additionalData"]["commentsCount"],
            "sentinelLabels": sorted(x["labelName"] for x in props.get("labels") or []), "defenderComments": 0}
        entity = _link_entity(tenant, incident_id, link)
        links.setdefault(tenant, []).append(entity)
        index.append(_name_index_entity(tenant, incident_id, entity))
    for table, rows in [*((store.table(INCIDENTS), rows) for rows in links.values()), (store.table(LINKS), index)]:
        for i in range(0, len(rows), BATCH):
            table.submit_transaction([("upsert", e) for e in rows[i:i + BATCH]])


def run(options: argparse.Namespace) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="mirror-bench-"))
    tls = ensure_tls(state_dir)
    os.environ["REQUESTS_CA_BUNDLE"] = str(tls.ca_pem)
    for name in STRAY_ENV:
        os.environ.pop(name, None)
    azurite = Azurite()
    hub = EmulatorHub(include_sentinel=True)
    try:
        connection = azurite.start()
        hub.start(state_dir)
        tenants = [hub.world.add_tenant(name=f"Bench {i}") for i in range(2)]
        settings = app_settings(
            hub, connection, tenants, credential="secret",
            SYNC_TENANTS=json.dumps({t: {"name": f"Bench {i}", "mode": "sync"} for i, t in enumerate(tenants)}),
            SYNC_TIME_BUDGET_SECONDS="3000", GRAPH_MAX_REQUESTS_PER_MINUTE="100000",
            SENTINEL_MAX_WRITES_PER_MINUTE="100000")
        os.environ.update(settings)
        from tests.harness import http, run_timer

        parts = {k.split("=", 1)[0]: k.split("=", 1)[1] for k in connection.split(";") if "=" in k}
        services = {urlsplit(settings["ARM_ENDPOINT"]).netloc.lower(): "sentinel",
                    urlsplit(settings["GRAPH_ENDPOINT"]).netloc.lower(): "graph",
                    urlsplit(settings["LOGS_INGESTION_ENDPOINT"]).netloc.lower(): "ingestion",
                    urlsplit(parts["TableEndpoint"]).netloc.lower(): "table",
                    urlsplit(settings["AZURE_AUTHORITY_HOST"]).netloc.lower(): "entra"}
        counts = Counts(services)
        n = options.incidents
        with counts.installed():
            run_timer("defender_pull")   # warm-up run over nothing: tokens, tables, rotation
            for i in range(n):
                hub.world.add_incident(tenants[i % 2], _incident(str(1000 + i)))
            new, new_wall = counts.measure(lambda: run_timer("defender_pull"))
            mirrored = sum(1 for i in range(n)
                           if hub.sentinel.get(sentinel_name(tenants[i % 2], str(1000 + i))) is not None)
            for i in range(n):
                hub.world.update_incident(tenants[i % 2], str(1000 + i), {"status": "inProgress"})
            upd, upd_wall = counts.measure(lambda: run_timer("defender_pull"))
            quiet, quiet_wall = counts.measure(lambda: run_timer("defender_pull"))
            from sync.context import get_context
            seed_closed_links(hub, get_context().state, tenants, options.closed)
            http("sync_run", body={"direction": "reconcile"})   # settle: cursor and sweep position at rest
            for i in range(options.changes):
                hub.sentinel.analyst_update(sentinel_name(tenants[i % 2], str(1000 + i)),
                                                  severity="Low")
            rec, rec_wall = counts.measure(lambda: http("sync_run", body={"direction": "reconcile"}))
    finally:
        hub.stop()
        azurite.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    arm_reads = rec.get("sentinel:GET", 0) + rec.get("sentinel:POST", 0)
    return {
        "incidents": n, "mirrored": mirrored,
        "newMirror": {"sentinelPerMirror": round(new.get("sentinel", 0) / n, 2),
                      "sentinelWritesPerMirror": round(new.get("sentinel:PUT", 0) / n, 2),
                      "tablePerMirror": round(new.get("table", 0) / n, 2),
                      "mirrorsPerSecond": round(n / new_wall, 1), "requests": new},
        "update": {"sentinelPerUpdate": round(upd.get("sentinel", 0) / n, 2),
                   "tablePerUpdate": round(upd.get("table", 0) / n, 2),
                   "updatesPerSecond": round(n / upd_wall, 1), "requests": upd},
        "quietRerun": {"sentinelPerIncident": round(quiet.get("sentinel", 0) / n, 2),
                       "tablePerIncident": round(quiet.get("table", 0) / n, 2),
                       "seconds": round(quiet_wall, 2), "requests": quiet},
        "reconcile": {"closedLinks": options.closed, "openLinks": n, "changes": options.changes,
                      "armReads": arm_reads, "armRequests": rec.get("sentinel", 0),
                      "tableRequests": rec.get("table", 0), "seconds": round(rec_wall, 2), "requests": rec},
    }


def sentinel_name(tenant: str, incident_id: str) -> str:
    from sync.targets.sentinel_api import SentinelTarget

    return SentinelTarget.name_for(None, tenant, incident_id)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=200)
    parser.add_argument("--closed", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=10)
    options = parser.parse_args(argv)
    r = run(options)
    m, u, q, c = r["newMirror"], r["update"], r["quietRerun"], r["reconcile"]
    print(f"new mirror: {m['sentinelPerMirror']} Sentinel requests ({m['sentinelWritesPerMirror']} PUT), "
          f"{m['tablePerMirror']} Table requests per mirror; {m['mirrorsPerSecond']} mirrors/s "
          f"({r['mirrored']}/{r['incidents']} mirrored)")
    print(f"update:     {u['sentinelPerUpdate']} Sentinel requests, {u['tablePerUpdate']} Table requests per "
          f"updated incident; {u['updatesPerSecond']} updates/s")
    print(f"quiet rerun: {q['sentinelPerIncident']} Sentinel requests, {q['tablePerIncident']} Table requests per "
          f"re-read incident; {q['seconds']} s")
    print(f"reconcile:  {c['armReads']} ARM reads ({c['armRequests']} ARM requests, {c['tableRequests']} Table) "
          f"with {c['closedLinks']:,} closed links, {c['openLinks']} open, {c['changes']} changes; "
          f"{c['seconds']} s")
    print(json.dumps(r))
    return 0 if r["mirrored"] == r["incidents"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
