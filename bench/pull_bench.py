"""Pull benchmark: N Defender incidents (with alerts and evidence) from the emulators into Log Analytics.

``python -m bench.pull_bench --incidents N [N2 ...] [--tenants T] [--page-size 50] [--no-mirror | --mirror]
[--profile]``

For each N, on a fresh set of services:

1. starts Azurite (:class:`emulators.azurite.Azurite`) and the HTTPS emulators (:class:`emulators.hub.EmulatorHub`,
   TLS trusted through ``REQUESTS_CA_BUNDLE``) in THIS process, and loads N generated incidents (profile ``bench``:
   alerts with evidence, ties, a few incidents with hundreds of alerts) spread over T tenants into the Graph
   emulator;
2. builds the Function app's settings (:func:`emulators.hub.app_settings`, secret credential; ``SYNC_TENANTS`` mode
   ``data-only`` by default, ``sync`` with ``--mirror``; a large time budget and Graph rate cap) and starts the app in
   a CHILD process (:mod:`bench.pull_child`), which calls the ``defender_pull`` timer function from
   ``function_app.py`` until the backlog is done. The child's CPU and peak RSS are therefore the app's alone
   (the child's own ``getrusage`` and ``VmHWM``, with ``os.wait4``'s rusage as a cross-check);
3. reads what landed from the emulators (rows per table, Graph requests from the request log) and checks it is
   complete (every incident, alert and evidence item) and free of duplicates;
4. measures the floor: the same rows built with :mod:`sync.rows`, then ``json.dumps`` + gzip exactly as
   azure-monitor-ingestion does before sending (one document per table per page), timed with the thread's CPU clock.

Prints human-readable lines and, last, one JSON line with every figure. Several sizes (``--incidents 2000 10000``)
add a comparison showing whether the app's peak RSS depends on N. Exit code 0 when every run was complete.

Figures:
- Graph requests per incident vs the minimum the page size allows (``ceil(n / page_size)`` list requests per
  tenant); the ratio is actual / minimum.
- App CPU seconds (user + sys inside the ``defender_pull`` calls) per 1,000 incidents vs the floor per 1,000.
- Peak RSS of the app process (its ``VmHWM``: ``ru_maxrss`` would include the parent's RSS at fork/exec time on
  Linux), its RSS once ``function_app`` was loaded, the growth between, and the pages that raised the peak.
- Wall time, the load time of the emulator, Table Storage / Logs Ingestion / Entra calls made by the app, and the
  CPU the emulators (this process) and Azurite used meanwhile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from emulators.azurite import Azurite  # noqa: E402
from emulators.certs import ensure_tls  # noqa: E402
from emulators.generator import TenantSpec, make_tenants  # noqa: E402
from emulators.hub import EmulatorHub, World, app_settings  # noqa: E402
from emulators.server import RequestLog  # noqa: E402

TABLES = ("DefenderIncidents_CL", "DefenderAlerts_CL", "DefenderEvidence_CL")
#: Environment variables that would steer azure-identity away from the configured credential (as tests/conftest.py).
STRAY_ENV = ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_CLIENT_CERTIFICATE_PATH",
             "AZURE_FEDERATED_TOKEN_FILE", "AZURE_USERNAME", "AZURE_PASSWORD", "MSI_ENDPOINT", "MSI_SECRET",
             "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "APPLICATIONINSIGHTS_CONNECTION_STRING", "SYNC_TENANTS")
MB = 1024 * 1024


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    """What one benchmark size runs with."""

    incidents: int
    tenants: int
    page_size: int
    mirror: bool
    seed: int
    lookback_days: float
    budget_seconds: int
    max_runs: int
    profile: bool
    profile_out: Path | None
    profile_clock: str
    keep_state: bool


def parse_args(argv: list[str] | None) -> tuple[list[int], argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.pull_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--incidents", type=int, nargs="+", default=[10_000],
                        help="incidents to pull (total over all tenants); several values run one after another")
    parser.add_argument("--tenants", type=int, default=1, help="customer tenants the incidents are spread over")
    parser.add_argument("--page-size", type=int, default=50, help="SYNC_GRAPH_PAGE_SIZE (1..50)")
    mirror = parser.add_mutually_exclusive_group()
    mirror.add_argument("--no-mirror", dest="mirror", action="store_false",
                        help="SYNC_TENANTS mode data-only: Log Analytics only (the default)")
    mirror.add_argument("--mirror", dest="mirror", action="store_true",
                        help="SYNC_TENANTS mode sync: also mirror every incident to the Sentinel emulator")
    parser.set_defaults(mirror=False)
    parser.add_argument("--seed", type=int, default=7, help="generator seed")
    parser.add_argument("--lookback-days", type=float, default=7.0,
                        help="SYNC_INITIAL_LOOKBACK_DAYS (the generator spreads incidents over the last 6 days)")
    parser.add_argument("--budget", type=int, default=3000, help="SYNC_TIME_BUDGET_SECONDS")
    parser.add_argument("--max-runs", type=int, default=5, help="defender_pull invocations at most per size")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the app's defender_pull calls and print the top costs (inflates CPU figures)")
    parser.add_argument("--profile-clock", choices=("cpu", "wall"), default="cpu",
                        help="with --profile: time functions by process CPU time (default) or by wall time")
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="with --profile: keep the pstats file here (default: a temporary file)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the final JSON to this file")
    parser.add_argument("--keep-state", action="store_true", help="keep the temporary state directories")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.incidents) or args.tenants < 1:
        parser.error("--incidents and --tenants must be at least 1")
    if not 1 <= args.page_size <= 50:
        parser.error("--page-size must be between 1 and 50 (Graph's maximum with $expand=alerts)")
    return args.incidents, args


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Loaded:
    """What was put into the Graph emulator."""

    tenants: list[TenantSpec]
    per_tenant: dict[str, int]
    seconds: float
    cpu_seconds: float


def load_incidents(world: World, options: Options) -> Loaded:
    """Create ``options.tenants`` tenants and spread ``options.incidents`` generated incidents over them."""
    specs = make_tenants(options.seed, options.tenants)
    base, extra = divmod(options.incidents, options.tenants)
    per_tenant: dict[str, int] = {}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for index, spec in enumerate(specs):
        count = base + (1 if index < extra else 0)
        world.add_tenant(spec.tenant_id, spec.name, spec.domain)
        if count:
            world.generate(options.seed + index, spec.tenant_id, count, profile="bench")
        per_tenant[spec.tenant_id] = count
    return Loaded(specs, per_tenant, time.perf_counter() - wall0, time.process_time() - cpu0)


@dataclass
class Floor:
    """The floor: the same rows as the app sends, JSON-serialised and gzipped the way the SDK does it."""

    incidents: int = 0
    alerts: int = 0
    evidence: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    json_bytes: int = 0
    gzip_bytes: int = 0
    serialise_cpu: float = 0.0    # json.dumps + gzip (the floor)
    build_cpu: float = 0.0        # sync.rows builders (pure transforms), for context

    def per_thousand(self, seconds: float) -> float:
        return seconds * 1000.0 / self.incidents if self.incidents else 0.0


def _sdk_gzip(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """What azure-monitor-ingestion does to a chunk before sending: ``json.dumps`` then a gzip stream."""
    body = bytes(json.dumps(rows), encoding="utf-8")
    compressor = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    data = compressor.compress(body) + compressor.flush()
    return len(body), len(data)


def measure_floor(world: World, tenants: list[TenantSpec], page_size: int) -> Floor:
    """Build every incident's rows page by page (newest first, like the app) and time ``json.dumps`` + gzip.

    Memory stays at one page of rows; the incidents are read from the emulator's store (what Graph serves).
    """
    from sync.rows import rows_for_incident

    floor = Floor(rows=dict.fromkeys(TABLES, 0))
    read_at = datetime.now(UTC)
    for spec in tenants:
        ids = world.incident_ids(spec.tenant_id)
        for start in range(0, len(ids), page_size):
            incidents = [world.graph.get_incident(spec.tenant_id, i) for i in ids[start:start + page_size]]
            page: dict[str, list[dict[str, Any]]] = {table: [] for table in TABLES}
            t0 = time.thread_time()
            for incident in incidents:
                if incident is None:
                    continue
                built = rows_for_incident(incident, tenant_id=spec.tenant_id, tenant_name=spec.name, read_at=read_at)
                for table in TABLES:
                    page[table].extend(built[table])
            t1 = time.thread_time()
            for table in TABLES:
                if page[table]:
                    raw, packed = _sdk_gzip(page[table])
                    floor.json_bytes += raw
                    floor.gzip_bytes += packed
            t2 = time.thread_time()
            floor.build_cpu += t1 - t0
            floor.serialise_cpu += t2 - t1
            floor.incidents += sum(1 for i in incidents if i is not None)
            for incident in incidents:
                alerts = (incident or {}).get("alerts") or []
                floor.alerts += len(alerts)
                floor.evidence += sum(len(a.get("evidence") or []) for a in alerts)
            for table in TABLES:
                floor.rows[table] += len(page[table])
    return floor


# ------------------------------------------------------------------------------------------------ emulator side


def graph_requests(hub: EmulatorHub) -> dict[str, int]:
    """Graph requests the emulator served, by kind (list pages, single incidents, alerts_v2, other)."""
    kinds: Counter[str] = Counter()
    for entry in hub.log.entries(service="graph"):
        path = entry.path.rstrip("/")
        if "/_control/" in path:
            continue
        if path.endswith("/security/incidents"):
            kinds["incidentsList"] += 1
        elif "/security/incidents/" in path and entry.method == "GET":
            kinds["incidentGet"] += 1
        elif "/security/alerts_v2" in path:
            kinds["alerts"] += 1
        else:
            kinds["other"] += 1
        if entry.status >= 400 or entry.status == 0:
            kinds["errors"] += 1
    kinds["total"] = sum(v for k, v in kinds.items() if k != "errors")
    return dict(kinds)


def landed(world: World) -> dict[str, Any]:
    """Rows per table in the Logs Ingestion emulator, distinct incidents, and duplicate RecordIds."""
    out: dict[str, Any] = {"rows": {}, "duplicateRecordIds": 0}
    for table in TABLES:
        rows = world.rows(table)
        out["rows"][table] = len(rows)
        out["duplicateRecordIds"] += len(rows) - len({r.get("RecordId") for r in rows})
        if table == "DefenderIncidents_CL":
            out["distinctIncidents"] = len({(r.get("DefenderTenantId"), r.get("IncidentId")) for r in rows})
    with world.lock:
        stats = world.ingestion.stats
        out["ingestionRequests"] = stats.requests
        out["ingestionRejected"] = stats.rejected
        out["ingestionBytesSent"] = stats.bytes_sent
        out["ingestionBytesUncompressed"] = stats.bytes_uncompressed
    out["violations"] = len(world.violations)
    return out


def _process_cpu(pid: int | None) -> float | None:
    """CPU seconds of a process and its children (Azurite), or None without psutil."""
    if pid is None:
        return None
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            total += sum(child.cpu_times()[:2])
        return float(total)
    except psutil.Error:
        return None


# ------------------------------------------------------------------------------------------------ one size


def child_env(settings: dict[str, str]) -> dict[str, str]:
    """The app process's environment: this one without stray credentials/settings, plus the app settings."""
    env = {k: v for k, v in os.environ.items() if k not in STRAY_ENV and k not in settings}
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run_app(settings: dict[str, str], state_dir: Path, options: Options) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run :mod:`bench.pull_child` with ``settings``; returns (its own report, its rusage as seen by os.wait4)."""
    result_path = state_dir / "app-result.json"
    command = [sys.executable, "-m", "bench.pull_child", "--result", str(result_path),
               "--max-runs", str(options.max_runs)]
    if options.profile:
        target = profile_path(state_dir, options)
        target.parent.mkdir(parents=True, exist_ok=True)
        command += ["--profile", str(target), "--profile-clock", options.profile_clock]
    wall0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=str(REPO_ROOT), env=child_env(settings))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rusage = {"wallSeconds": round(time.perf_counter() - wall0, 3), "exitCode": proc.returncode,
              "cpuUserSeconds": round(usage.ru_utime, 3), "cpuSysSeconds": round(usage.ru_stime, 3),
              "maxRssBytes": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)}
    if not result_path.exists():
        raise SystemExit(f"the app process exited with {proc.returncode} and wrote no result")
    return json.loads(result_path.read_text(encoding="utf-8")), rusage


def profile_path(state_dir: Path, options: Options) -> Path:
    if options.profile_out is not None:
        return options.profile_out.with_name(f"{options.profile_out.stem}-{options.incidents}"
                                             f"{options.profile_out.suffix or '.pstats'}")
    return state_dir / "app.pstats"


def top_costs(path: Path, limit: int = 25) -> dict[str, str]:
    """The profile's top functions by own time and by cumulative time, as printable text."""
    out: dict[str, str] = {}
    for key in ("tottime", "cumulative"):
        buffer = StringIO()
        stats = pstats.Stats(str(path), stream=buffer)
        stats.strip_dirs().sort_stats(key).print_stats(limit)
        text = buffer.getvalue()
        out[key] = text[text.find("   ncalls"):] if "   ncalls" in text else text
    return out


def run_size(options: Options) -> dict[str, Any]:
    """One benchmark size on fresh services; returns every figure."""
    state_dir = Path(tempfile.mkdtemp(prefix=f"pull-bench-{options.incidents}-"))
    tls = ensure_tls(state_dir)
    os.environ["REQUESTS_CA_BUNDLE"] = str(tls.ca_pem)
    azurite = Azurite()
    hub = EmulatorHub(include_sentinel=True)
    hub.log = RequestLog(maxlen=2_000_000)   # the default ring of 20,000 would drop requests of a 100k run
    say(f"== {options.incidents:,} incidents over {options.tenants} tenant(s), page size {options.page_size}, "
        f"mirror {'on (mode sync)' if options.mirror else 'off (mode data-only)'}")
    try:
        connection = azurite.start()
        hub.start(state_dir)
        loaded = load_incidents(hub.world, options)
        say(f"loaded {options.incidents:,} incidents into the Graph emulator in {loaded.seconds:.1f} s "
            f"({loaded.cpu_seconds:.1f} s CPU)")
        mode = "sync" if options.mirror else "data-only"
        settings = app_settings(
            hub, connection, [s.tenant_id for s in loaded.tenants], credential="secret",
            SYNC_TENANTS=json.dumps({s.tenant_id: {"name": s.name, "mode": mode} for s in loaded.tenants}),
            SYNC_TIME_BUDGET_SECONDS=str(options.budget_seconds),
            SYNC_INITIAL_LOOKBACK_DAYS=f"{options.lookback_days:g}",
            SYNC_GRAPH_PAGE_SIZE=str(options.page_size),
            GRAPH_MAX_REQUESTS_PER_MINUTE="100000",
            SENTINEL_MAX_WRITES_PER_MINUTE="100000",
        )
        emulator_cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        azurite_cpu0 = _process_cpu(azurite.process.pid if azurite.process else None)
        app, rusage = run_app(settings, state_dir, options)
        emulator_cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - emulator_cpu0
        azurite_cpu1 = _process_cpu(azurite.process.pid if azurite.process else None)
        azurite_cpu = (azurite_cpu1 - azurite_cpu0) if azurite_cpu0 is not None and azurite_cpu1 is not None \
            else None
        graph = graph_requests(hub)
        result_rows = landed(hub.world)
        say("measuring the floor (json.dumps + gzip of the same rows) ...")
        floor = measure_floor(hub.world, loaded.tenants, options.page_size)
        profile = profile_path(state_dir, options) if options.profile else None
    finally:
        hub.stop()
        azurite.stop()
        keep = options.keep_state or (options.profile and options.profile_out is None)  # the pstats live there
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
    return figures(options, loaded, app, rusage, graph, result_rows, floor, emulator_cpu, azurite_cpu, profile,
                   state_dir if keep else None)


def figures(options: Options, loaded: Loaded, app: dict[str, Any], rusage: dict[str, Any], graph: dict[str, int],
            result_rows: dict[str, Any], floor: Floor, emulator_cpu: float, azurite_cpu: float | None,
            profile: Path | None, state_dir: Path | None) -> dict[str, Any]:
    """Assemble the figures of one size (the JSON shape printed at the end)."""
    n = options.incidents
    minimum = sum(math.ceil(count / options.page_size) for count in loaded.per_tenant.values() if count)
    list_requests = graph.get("incidentsList", 0)
    app_cpu = app["pullCpuUserSeconds"] + app["pullCpuSysSeconds"]
    http = app["http"]
    rows = result_rows["rows"]
    complete = (result_rows.get("distinctIncidents") == floor.incidents == n
                and rows["DefenderAlerts_CL"] == floor.alerts and rows["DefenderEvidence_CL"] == floor.evidence
                and result_rows["duplicateRecordIds"] == 0 and app["done"])
    # The child's own high-water mark (VmHWM, per address space). ru_maxrss is only a fallback: Linux carries the
    # parent's RSS at fork/exec time into the child's ru_maxrss, so with a large emulator process it over-reports.
    peak = app.get("peakRssBytes") or rusage["maxRssBytes"]
    samples = app.get("rssSamples") or []
    trajectory = {}
    for quarter in (0.25, 0.5, 0.75, 1.0):
        if samples:
            trajectory[f"{int(quarter * 100)}%"] = samples[min(len(samples) - 1, int(quarter * (len(samples) - 1)))][1]
    return {
        "incidents": n,
        "tenants": options.tenants,
        "pageSize": options.page_size,
        "mirror": options.mirror,
        "profiled": options.profile,
        "complete": complete,
        "ingested": {"incidents": result_rows.get("distinctIncidents"), "incidentRows": rows["DefenderIncidents_CL"],
                     "alerts": rows["DefenderAlerts_CL"], "evidence": rows["DefenderEvidence_CL"],
                     "duplicateRecordIds": result_rows["duplicateRecordIds"], "violations": result_rows["violations"]},
        "expected": {"incidents": floor.incidents, "alerts": floor.alerts, "evidence": floor.evidence},
        "graph": {**graph, "minimumListRequests": minimum,
                  "requestsPerIncident": round(graph.get("total", 0) / n, 5),
                  "minimumPerIncident": round(minimum / n, 5),
                  "ratioToMinimum": round(graph.get("total", 0) / minimum, 4) if minimum else None,
                  "listRatioToMinimum": round(list_requests / minimum, 4) if minimum else None,
                  "appSideRequests": http.get("graph", {}).get("requests")},
        "cpu": {"appPullSeconds": round(app_cpu, 3),
                "appPullPer1k": round(app_cpu * 1000 / n, 3),
                "appProcessSeconds": round(rusage["cpuUserSeconds"] + rusage["cpuSysSeconds"], 3),
                "appStartupSeconds": app["readyCpuSeconds"],
                "floorSeconds": round(floor.serialise_cpu, 3),
                "floorPer1k": round(floor.per_thousand(floor.serialise_cpu), 3),
                "ratioToFloor": round(app_cpu / floor.serialise_cpu, 2) if floor.serialise_cpu else None,
                "rowBuildSeconds": round(floor.build_cpu, 3),
                "rowBuildPer1k": round(floor.per_thousand(floor.build_cpu), 3),
                "ratioToFloorPlusRowBuild": round(app_cpu / (floor.serialise_cpu + floor.build_cpu), 2)
                if floor.serialise_cpu + floor.build_cpu else None,
                "emulatorsSeconds": round(emulator_cpu, 3),
                "azuriteSeconds": round(azurite_cpu, 3) if azurite_cpu is not None else None},
        "memory": {"appPeakRssBytes": peak, "appReadyRssBytes": app["readyRssBytes"],
                   "appGrowthBytes": peak - (app["readyRssBytes"] or 0) if peak else None,
                   "peakSource": "VmHWM" if app.get("peakRssBytes") else "ru_maxrss",
                   "rusageMaxRssBytes": rusage["maxRssBytes"],
                   "rssTrajectory": trajectory,
                   "rssSampleMax": max((rss for _, rss in samples), default=None),
                   "pages": app.get("pages")},
        "wall": {"loadSeconds": round(loaded.seconds, 3), "appProcessSeconds": rusage["wallSeconds"],
                 "pullSeconds": app["pullWallSeconds"], "appImportSeconds": app["importSeconds"],
                 "defenderPullRuns": len(app["runs"])},
        "appHttp": http,
        "tableStorageCalls": http.get("table", {}).get("requests"),
        "ingestion": {"requests": result_rows["ingestionRequests"], "rejected": result_rows["ingestionRejected"],
                      "bytesSent": result_rows["ingestionBytesSent"],
                      "bytesUncompressed": result_rows["ingestionBytesUncompressed"],
                      "floorJsonBytes": floor.json_bytes, "floorGzipBytes": floor.gzip_bytes},
        "runs": app["runs"],
        "tenantOutcomes": app["tenants"],
        "profileFile": str(profile) if profile else None,
        "profileClock": options.profile_clock if profile else None,
        "stateDir": str(state_dir) if state_dir else None,
    }


# ------------------------------------------------------------------------------------------------ report


def say(text: str = "") -> None:
    print(text, flush=True)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MB:.1f} MB"


def report(r: dict[str, Any]) -> None:
    """Human-readable lines for one size."""
    g, c, m, w, i = r["graph"], r["cpu"], r["memory"], r["wall"], r["ingested"]
    n = r["incidents"]
    say(f"complete: {'yes' if r['complete'] else 'NO'} (expected {r['expected']['incidents']:,} incidents, "
        f"{r['expected']['alerts']:,} alerts, {r['expected']['evidence']:,} evidence)")
    say(f"ingested: {i['incidents']:,} incidents, {i['alerts']:,} alerts, {i['evidence']:,} evidence rows "
        f"({i['duplicateRecordIds']} duplicate RecordIds, {i['violations']} field-size violations)")
    say(f"graph requests: {g['total']:,} ({g.get('incidentsList', 0):,} incident list pages, "
        f"{g.get('incidentGet', 0)} single incidents, {g.get('alerts', 0)} alerts_v2, {g.get('errors', 0)} errors); "
        f"minimum at page size {r['pageSize']}: {g['minimumListRequests']:,}")
    say(f"graph requests per incident: {g['requestsPerIncident']:.4f} vs minimum {g['minimumPerIncident']:.4f} "
        f"(ratio {g['ratioToMinimum']})")
    processed = (m.get("pages") or {}).get("pages") or 0
    if processed:
        say(f"  {processed:,} pages reached the engine, {n / processed:.1f} new incidents each: every keyset query "
            "(le the oldest time seen) returns the boundary incident(s) again, and every daily slice ends with a "
            "partial page")
    say(f"app CPU: {c['appPullSeconds']:.2f} s in defender_pull = {c['appPullPer1k']:.3f} s per 1,000 incidents; "
        f"floor (json.dumps + gzip of the same rows) {c['floorPer1k']:.3f} s per 1,000 -> {c['ratioToFloor']}x "
        "the floor")
    say(f"  context: building the rows (sync.rows) costs {c['rowBuildPer1k']:.3f} s per 1,000; app vs floor + row "
        f"building: {c['ratioToFloorPlusRowBuild']}x; app process total {c['appProcessSeconds']:.2f} s "
        f"(start-up {c['appStartupSeconds']:.2f} s)")
    say(f"  meanwhile the emulators used {c['emulatorsSeconds']:.1f} s CPU and Azurite "
        f"{'n/a' if c['azuriteSeconds'] is None else format(c['azuriteSeconds'], '.1f')} s")
    say(f"app peak RSS: {_mb(m['appPeakRssBytes'])} (after loading function_app: {_mb(m['appReadyRssBytes'])}; "
        f"growth {_mb(m['appGrowthBytes'])}); RSS at 25/50/75/100% of the pull: "
        + ", ".join(_mb(v) for v in m["rssTrajectory"].values()))
    pages = m.get("pages") or {}
    largest = pages.get("largestPage")
    if largest:
        say(f"  largest page: #{largest['page']} of {pages['pages']}, {largest['incidents']} incidents with "
            f"{largest['alerts']} alerts and {largest['evidence']} evidence; pages that raised the peak most: "
            + "; ".join(f"#{p['page']} ({p['alerts']} alerts, {p['evidence']} evidence: "
                        f"{_mb(p['peakRssBefore'])} -> {_mb(p['peakRssAfter'])})" for p in pages["peakRaisers"]))
    say(f"wall: pull {w['pullSeconds']:.1f} s in {w['defenderPullRuns']} defender_pull run(s); app process "
        f"{w['appProcessSeconds']:.1f} s; emulator load {w['loadSeconds']:.1f} s; "
        f"{n / w['pullSeconds'] if w['pullSeconds'] else 0:,.0f} incidents/s")
    http = r["appHttp"]
    parts = []
    for name, calls in http.items():
        seconds = calls.get("methodSeconds", {})
        methods = ", ".join(f"{k} {v} in {seconds.get(k, 0.0):.1f} s" for k, v in sorted(calls["methods"].items()))
        parts.append(f"{name} {calls['requests']:,} ({methods})")
    say("app HTTP calls: " + "; ".join(parts))
    pages = g.get("incidentsList", 0) or 1
    table = http.get("table", {})
    say(f"table storage: {table.get('requests', 0):,} calls = {table.get('requests', 0) / pages:.1f} per Graph page, "
        f"{table.get('seconds', 0.0):.1f} s of the pull's wall time")
    ing = r["ingestion"]
    say(f"logs ingestion: {ing['requests']:,} requests, {ing['bytesSent'] / MB:.1f} MB gzip "
        f"({ing['bytesUncompressed'] / MB:.1f} MB JSON)")
    if r.get("profileFile"):
        costs = top_costs(Path(r["profileFile"]))
        say(f"profile of the app's defender_pull calls ({r['profileFile']}, {r['profileClock']} clock; the CPU "
            "figures above include cProfile's overhead)")
        say("-- by own time --")
        say(costs["tottime"].rstrip())
        say("-- by cumulative time --")
        say(costs["cumulative"].rstrip())
    say()


def compare(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Peak RSS across sizes: does it follow N or stay flat?"""
    if len(results) < 2:
        return None
    ordered = sorted(results, key=lambda r: r["incidents"])
    small, large = ordered[0], ordered[-1]
    diff = large["memory"]["appPeakRssBytes"] - small["memory"]["appPeakRssBytes"]
    extra = large["incidents"] - small["incidents"]
    per_1k = diff * 1000 / extra if extra else 0.0
    largest = [((r["memory"].get("pages") or {}).get("largestPage") or {}) for r in ordered]
    out = {"sizes": [r["incidents"] for r in ordered],
           "peakRssBytes": [r["memory"]["appPeakRssBytes"] for r in ordered],
           "differenceBytes": diff, "differencePer1kIncidentsBytes": round(per_1k),
           "largestPageItems": [p.get("alerts", 0) + p.get("evidence", 0) for p in largest],
           "cpuPer1k": [r["cpu"]["appPullPer1k"] for r in ordered],
           "graphRatio": [r["graph"]["ratioToMinimum"] for r in ordered]}
    say(f"== peak RSS vs N: {small['incidents']:,} -> {_mb(small['memory']['appPeakRssBytes'])}; "
        f"{large['incidents']:,} -> {_mb(large['memory']['appPeakRssBytes'])}; difference {_mb(diff)} for "
        f"{extra:,} more incidents ({per_1k / 1024:.1f} KB per 1,000)")
    say("   largest page (alerts + evidence) per size: "
        + ", ".join(f"{r['incidents']:,}: {n:,}" for r, n in zip(ordered, out["largestPageItems"], strict=True))
        + " (the peak follows the biggest page, which grows only with the odds of meeting an incident with "
          "hundreds of alerts; see the pages that raised it above)")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when every size was pulled completely."""
    sizes, args = parse_args(argv)
    if not Azurite.available():
        say("Azurite is not installed (run `npm ci`) or node is missing")
        return 2
    results = []
    for n in sizes:
        options = Options(n, args.tenants, args.page_size, args.mirror, args.seed, args.lookback_days, args.budget,
                          args.max_runs, args.profile, args.profile_out, args.profile_clock, args.keep_state)
        result = run_size(options)
        report(result)
        results.append(result)
    comparison = compare(results)
    document = {"benchmark": "pull", "results": results, "rssComparison": comparison}
    line = json.dumps(document, separators=(",", ":"))
    if args.json_out:
        args.json_out.write_text(line + "\n", encoding="utf-8")
    say(line)
    return 0 if all(r["complete"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
