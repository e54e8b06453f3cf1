"""The app side of :mod:`bench.pull_bench`: runs ``defender_pull`` in a process of its own.

``python -m bench.pull_child --result FILE [--profile FILE] [--max-runs K]``, with the Function app's settings in
the environment (the parent builds them with :func:`emulators.hub.app_settings`). It loads ``function_app.py`` the
way the Functions host does (``app.get_functions()``), calls the ``defender_pull`` timer function until
``sync_status`` reports every tenant's last run as ``success`` (the backlog is done), and writes what it measured of
itself to ``FILE`` as JSON: CPU (user + sys) spent inside the ``defender_pull`` calls, RSS samples, and every HTTP
request it made, grouped by service (Graph, Logs Ingestion, Table Storage, Entra...) with the wall time spent
waiting on each.

Only the standard library is imported before ``function_app``, so the process's memory and CPU are the app's. The
HTTP counter wraps ``requests.adapters.HTTPAdapter.send``, which both the app's own Graph session and azure-core's
default transport (azure-data-tables, azure-monitor-ingestion, azure-identity) go through; it adds a dictionary
update per request. :class:`PageMeter` wraps ``TenantPull._process`` (one call per page) to record which pages
raise the peak RSS, and how big the largest page was (incidents, alerts, evidence).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Settings naming an endpoint the app calls -> the service name used in the counts.
ENDPOINT_SETTINGS = (("GRAPH_ENDPOINT", "graph"), ("LOGS_INGESTION_ENDPOINT", "ingestion"),
                     ("AZURE_AUTHORITY_HOST", "entra"), ("IDENTITY_ENDPOINT", "entra"), ("ARM_ENDPOINT", "sentinel"))
#: Keys of the ``AzureWebJobsStorage`` connection string -> service name.
STORAGE_KEYS = (("TableEndpoint", "table"), ("QueueEndpoint", "queue"), ("BlobEndpoint", "blob"))
RSS_SAMPLE_SECONDS = 0.25


def _netloc(url: str) -> str:
    return urlsplit(url.strip()).netloc.lower()


def service_map(env: Mapping[str, str]) -> dict[str, str]:
    """``host:port`` -> service name, from the app settings in ``env``."""
    services: dict[str, str] = {}
    for setting, name in ENDPOINT_SETTINGS:
        if env.get(setting):
            services.setdefault(_netloc(env[setting]), name)
    for part in env.get("AzureWebJobsStorage", "").split(";"):
        key, _, value = part.partition("=")
        for storage_key, name in STORAGE_KEYS:
            if key.strip() == storage_key and value:
                services.setdefault(_netloc(value), name)
    return services


@dataclass
class ServiceCalls:
    """Requests to one service: how many, by HTTP method, and the wall seconds spent in them."""

    requests: int = 0
    seconds: float = 0.0
    methods: dict[str, int] = field(default_factory=dict)
    method_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "seconds": round(self.seconds, 3), "methods": dict(self.methods),
                "methodSeconds": {k: round(v, 3) for k, v in self.method_seconds.items()}}


class HttpCounter:
    """Counts every HTTP request the process sends through ``requests`` (see the module docstring)."""

    def __init__(self, services: Mapping[str, str]) -> None:
        self.services = dict(services)
        self.calls: dict[str, ServiceCalls] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        """Wrap ``HTTPAdapter.send`` (once per process)."""
        from requests.adapters import HTTPAdapter

        original: Callable[..., Any] = HTTPAdapter.send
        counter = self

        def send(adapter: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(adapter, request, *args, **kwargs)
            finally:
                counter.record(str(request.url), str(request.method), time.perf_counter() - started)

        HTTPAdapter.send = send  # type: ignore[method-assign,assignment]

    def record(self, url: str, method: str, seconds: float) -> None:
        name = self.services.get(_netloc(url), "other")
        with self._lock:
            calls = self.calls.setdefault(name, ServiceCalls())
            calls.requests += 1
            calls.seconds += seconds
            calls.methods[method] = calls.methods.get(method, 0) + 1
            calls.method_seconds[method] = calls.method_seconds.get(method, 0.0) + seconds

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: calls.to_json() for name, calls in sorted(self.calls.items())}


def rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, peak RSS) of this process from ``/proc/self/status``; (None, None) where it does not exist."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None, None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS"), values.get("VmHWM")


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds on a daemon thread (the memory trajectory)."""

    def __init__(self, interval: float = RSS_SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, _ = rss_bytes()
            if rss is not None:
                self.samples.append((time.perf_counter() - self._t0, rss))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


@dataclass
class PageRecord:
    """One page the engine processed: what was in it and the process's peak RSS before and after."""

    number: int
    incidents: int
    alerts: int
    evidence: int
    peak_before: int
    peak_after: int

    def to_json(self) -> dict[str, Any]:
        return {"page": self.number, "incidents": self.incidents, "alerts": self.alerts, "evidence": self.evidence,
                "peakRssBefore": self.peak_before, "peakRssAfter": self.peak_after}


class PageMeter:
    """Wraps ``sync.pull.TenantPull._process`` (one call per Graph page) to see which pages raise the peak RSS.

    The peak RSS is read after each page; the rise since the previous page is charged to this page.

    Keeps O(1) state: the page count, the largest page, and the pages that raised the peak the most.
    """

    KEEP = 5

    def __init__(self) -> None:
        self.pages = 0
        self.last_peak = 0
        self.largest: PageRecord | None = None
        self.raisers: list[PageRecord] = []

    def install(self) -> None:
        from sync.pull import TenantPull

        original: Callable[..., Any] = TenantPull._process
        meter = self

        def _process(pull: Any, page: Any) -> Any:
            items = list(page)
            alerts = evidence = 0
            for incident in items:
                for alert in (incident.get("alerts") or []) if isinstance(incident, dict) else []:
                    alerts += 1
                    evidence += len(alert.get("evidence") or []) if isinstance(alert, dict) else 0
            try:
                return original(pull, items)
            finally:
                meter.record(len(items), alerts, evidence, rss_bytes()[1] or 0)

        TenantPull._process = _process  # type: ignore[method-assign,assignment]

    def record(self, incidents: int, alerts: int, evidence: int, after: int) -> None:
        """One page done; ``after`` is the peak RSS now. The rise since the previous page covers reading this page
        from Graph (in ``step``, before ``_process``) as well as processing it."""
        self.pages += 1
        before = self.last_peak or after
        self.last_peak = after
        page = PageRecord(self.pages, incidents, alerts, evidence, before, after)
        if self.largest is None or alerts + evidence > self.largest.alerts + self.largest.evidence:
            self.largest = page
        if after > before:
            self.raisers.append(page)
            self.raisers.sort(key=lambda p: p.peak_after - p.peak_before, reverse=True)
            del self.raisers[self.KEEP:]

    def to_json(self) -> dict[str, Any]:
        return {"pages": self.pages, "largestPage": self.largest.to_json() if self.largest else None,
                "peakRaisers": [p.to_json() for p in sorted(self.raisers, key=lambda p: p.number)]}


def cpu_seconds() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _tenant_outcomes(status_function: Callable[[Any], Any]) -> list[dict[str, Any]]:
    """Each tenant's cursor and last-run outcome, through the ``sync_status`` HTTP function."""
    import azure.functions as func

    request = func.HttpRequest(method="GET", url="https://bench.local/api/sync/status", headers={}, params={},
                               route_params={}, body=b"")
    response = status_function(request)
    body = json.loads(response.get_body())
    return [{"tenantId": t["tenantId"], "cursor": t.get("cursor"),
             "outcome": (t.get("lastRun") or {}).get("outcome"), "deadLetters": t.get("deadLetters")}
            for t in body.get("tenants", [])]


def run(max_runs: int, profile_path: Path | None, profile_clock: str = "cpu") -> dict[str, Any]:
    """Load the app, pull until the backlog is done, return the measurements."""
    process_t0 = time.perf_counter()
    counter = HttpCounter(service_map(os.environ))
    counter.install()

    from azure.functions.timer import TimerRequest

    import function_app

    functions = {f.get_function_name(): f.get_user_function() for f in function_app.app.get_functions()}
    meter = PageMeter()
    meter.install()
    pull, status_function = functions["defender_pull"], functions["sync_status"]
    ready_cpu = cpu_seconds()
    ready_rss, ready_hwm = rss_bytes()
    import_seconds = time.perf_counter() - process_t0

    sampler = RssSampler().start()
    profiler: cProfile.Profile | None = None
    if profile_path is not None:
        # The CPU clock shows what to optimise for CPU; the wall clock also shows where the pull waits.
        profiler = cProfile.Profile(time.process_time) if profile_clock == "cpu" else cProfile.Profile()
    runs: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    pull_user = pull_sys = pull_wall = 0.0
    for number in range(1, max_runs + 1):
        user0, sys0 = cpu_seconds()
        wall0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        try:
            pull(TimerRequest(past_due=False))
        finally:
            if profiler is not None:
                profiler.disable()
        wall = time.perf_counter() - wall0
        user1, sys1 = cpu_seconds()
        pull_user += user1 - user0
        pull_sys += sys1 - sys0
        pull_wall += wall
        outcomes = _tenant_outcomes(status_function)
        rss, hwm = rss_bytes()
        runs.append({"run": number, "wallSeconds": round(wall, 3), "cpuSeconds": round(user1 - user0 + sys1 - sys0, 3),
                     "rssBytes": rss, "peakRssBytes": hwm, "outcomes": sorted({o["outcome"] or "none"
                                                                               for o in outcomes})})
        print(f"[app] defender_pull run {number}: {wall:.1f} s wall, {user1 - user0 + sys1 - sys0:.1f} s CPU, "
              f"outcomes {runs[-1]['outcomes']}", file=sys.stderr, flush=True)
        if outcomes and all(o["outcome"] == "success" for o in outcomes):
            break
    samples = sampler.stop()
    if profiler is not None and profile_path is not None:
        profiler.dump_stats(str(profile_path))
    final_user, final_sys = cpu_seconds()
    _, peak = rss_bytes()
    return {
        "importSeconds": round(import_seconds, 3),
        "readyCpuSeconds": round(sum(ready_cpu), 3),
        "readyRssBytes": ready_rss,
        "readyPeakRssBytes": ready_hwm,
        "pullCpuUserSeconds": round(pull_user, 3),
        "pullCpuSysSeconds": round(pull_sys, 3),
        "pullWallSeconds": round(pull_wall, 3),
        "processCpuSeconds": round(final_user + final_sys, 3),
        "peakRssBytes": peak,
        "maxRusageKb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "runs": runs,
        "done": bool(outcomes) and all(o["outcome"] == "success" for o in outcomes),
        "tenants": outcomes,
        "http": counter.snapshot(),
        "pages": meter.to_json(),
        "rssSamples": [(round(t, 2), rss) for t, rss in samples],
        "profiled": profiler is not None,
        "profileClock": profile_clock if profiler is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; writes the result file and returns 0 when the backlog was done."""
    parser = argparse.ArgumentParser(prog="python -m bench.pull_child", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", required=True, type=Path, help="where to write the JSON measurements")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the defender_pull calls into this file")
    parser.add_argument("--profile-clock", choices=("cpu", "wall"), default="cpu",
                        help="cProfile timer: process CPU time (default) or wall time")
    parser.add_argument("--max-runs", type=int, default=5, help="defender_pull invocations at most")
    args = parser.parse_args(argv)
    result = run(args.max_runs, args.profile, args.profile_clock)
    tmp = args.result.with_suffix(".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, args.result)
    return 0 if result["done"] else 3


if __name__ == "__main__":
    sys.exit(main())
