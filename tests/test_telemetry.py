"""Telemetry: the spans and metrics of a pull cycle and of a webhook, and no secret in any of them.

OpenTelemetry's global providers can be set once per process, so this module installs SDK providers with in-memory
exporters once (module scope) and leaves them in place (their exporter is stopped afterwards); the engine's proxies
in ``sync.telemetry`` delegate to them. The redaction processors are deliberately NOT installed here: the app's
own attributes must be clean by construction. The Application Insights path (``configure_telemetry`` with a
connection string, plus the redaction) runs in a subprocess, so its global providers never touch this process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import apply_settings
from harness import http
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.logging.handler import LoggingHandler
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from emulators.base import Fault
from sync import telemetry
from sync.targets.sentinel_api import SentinelTarget
from sync.telemetry import REDACTED, RedactingLogRecordProcessor, RedactingSpanProcessor, Redactor, sensitive_key

ROOT = Path(__file__).resolve().parent.parent
LogExporter: Any = cast(Any, InMemoryLogRecordExporter)  # the SDK's constructor is untyped
TABLES = ("DefenderIncidents_CL", "DefenderAlerts_CL", "DefenderEvidence_CL")


class Otel:
    """The in-memory exporters behind the global providers."""

    def __init__(self, spans: InMemorySpanExporter, reader: InMemoryMetricReader,
                 logs: InMemoryLogRecordExporter) -> None:
        self.span_exporter = spans
        self.reader = reader
        self.log_exporter = logs

    def reset(self) -> None:
        """Forget what earlier tests emitted (spans, logs, pending metric deltas and lag reports)."""
        self.span_exporter.clear()
        self.log_exporter.clear()
        self.reader.get_metrics_data()

    def spans(self) -> list[ReadableSpan]:
        return list(self.span_exporter.get_finished_spans())

    def logs(self) -> list[Any]:
        return list(self.log_exporter.get_finished_logs())

    def points(self) -> dict[str, list[tuple[dict[str, Any], float]]]:
        """Metric name -> [(attributes, value)] of the app's meter since the last collection (counters as deltas)."""
        out: dict[str, list[tuple[dict[str, Any], float]]] = defaultdict(list)
        data = self.reader.get_metrics_data()
        for resource in (data.resource_metrics if data else []):
            for scope in resource.scope_metrics:
                if scope.scope.name != telemetry.SCOPE:
                    continue
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        value = float(getattr(point, "value", 0.0))
                        out[metric.name].append((dict(point.attributes or {}), value))
        return out


@pytest.fixture(scope="module")
def otel() -> Iterator[Otel]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    trace.set_tracer_provider(tracer_provider)
    installed = trace.get_tracer_provider()
    if not isinstance(installed, TracerProvider):
        pytest.skip("a non-SDK TracerProvider is already installed in this process")
    installed.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader(preferred_temporality={Counter: AggregationTemporality.DELTA})
    meter_provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    if metrics.get_meter_provider() is not meter_provider:
        pytest.skip("another MeterProvider is already installed in this process; its readers cannot be extended")
    # Logs as configure_azure_monitor(logger_name="sync") takes them: a handler on the "sync" logger.
    logs = LogExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    handler = LoggingHandler(logger_provider=logger_provider)
    app_logger = logging.getLogger("sync")
    previous_level = app_logger.level
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    try:
        yield Otel(spans, reader, logs)
    finally:
        app_logger.removeHandler(handler)
        app_logger.setLevel(previous_level)
        spans.shutdown()  # later tests' spans are dropped, not kept in memory
        logger_provider.shutdown()


# ------------------------------------------------------------------------------------------------------- helpers


def strings(value: Any) -> Iterator[str]:
    """Every string inside an attribute value (and the keys of mappings)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield str(key)
            yield from strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings(item)
    elif value is not None and not isinstance(value, bool | int | float):
        yield str(value)


def everything_emitted(otel: Otel, points: Mapping[str, list[tuple[dict[str, Any], float]]]) -> list[str]:
    """Span names/attributes/events/status, metric point attributes, log bodies and attributes, as strings."""
    texts: list[str] = []
    for span in otel.spans():
        texts.append(span.name)
        texts.extend(strings(dict(span.attributes or {})))
        for event in span.events:
            texts.append(event.name)
            texts.extend(strings(dict(event.attributes or {})))
        if span.status.description:
            texts.append(span.status.description)
    for name, values in points.items():
        texts.append(name)
        for attributes, _value in values:
            texts.extend(strings(attributes))
    for record in otel.logs():
        log_record = record.log_record
        texts.extend(strings(log_record.body))
        texts.extend(strings(dict(log_record.attributes or {})))
    return texts


def forbidden_values(settings: Mapping[str, str]) -> dict[str, str]:
    """What must never be emitted: the client secret, any JWT, the storage key, the MSI header, Authorization."""
    account_key = next(part.split("=", 1)[1] for part in settings["AzureWebJobsStorage"].split(";")
                       if part.startswith("AccountKey="))
    return {"client secret": settings["DEFENDER_CLIENT_SECRET"], "bearer token (JWT)": "eyJ",
            "storage account key": account_key, "managed identity header": settings["IDENTITY_HEADER"],
            "Authorization": "authorization", "bearer scheme": "bearer "}


def assert_no_secret(texts: list[str], settings: Mapping[str, str]) -> None:
    assert texts, "nothing was emitted"
    for what, value in forbidden_values(settings).items():
        leaks = [t for t in texts if value.lower() in t.lower()]
        assert not leaks, f"the {what} reached telemetry: {leaks[:3]}"


def total(points: Mapping[str, list[tuple[dict[str, Any], float]]], name: str, **where: str) -> float:
    return sum(value for attributes, value in points.get(name, [])
               if all(attributes.get(k) == v for k, v in where.items()))


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


# ------------------------------------------------------------------------------------------------------- pull


def test_a_pull_cycle_emits_cycle_tenant_and_incident_spans_and_its_metrics_without_secrets(
        otel: Otel, emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = emulators.world
    tenants = [world.add_tenant(name="Contoso"), world.add_tenant(name="Fabrikam")]
    world.generate(31, tenants[0], 40)
    world.generate(32, tenants[1], 25)
    settings = make_app_settings(tenants)
    apply_settings(monkeypatch, settings)
    # One Graph 429 (counted as throttled), and one incident whose mirror is refused by Sentinel (dead-lettered).
    emulators.faults.queue("graph", Fault("status", 429, retry_after="0"), times=1)
    broken_id = world.incident_ids(tenants[1])[0]
    broken = SentinelTarget(None).name_for(tenants[1], broken_id)  # type: ignore[arg-type]
    emulators.faults.rule("sentinel", lambda r: r.method == "PUT" and r.path.lower().endswith(f"/incidents/{broken}"),
                          Fault("status", 400))
    otel.reset()

    status, summary = http("sync_run", body={})

    assert status == 200, summary
    per_tenant = {t["tenantId"]: t for t in summary["tenants"]}
    assert set(per_tenant) == set(tenants) and all(t["outcome"] == "success" for t in summary["tenants"]), summary
    spans = otel.spans()
    points = otel.points()

    # Spans: sync.cycle > sync.tenant (one per tenant) > sync.incident (one per mirrored incident version).
    (cycle,) = by_name(spans, "sync.cycle")
    assert cycle.parent is None
    assert attrs(cycle).items() >= {"direction": "pull", "tenants": 2, "outcome": "complete",
                                                    "budgetExhausted": False}.items()
    tenant_spans = {attrs(s)["tenantId"]: s for s in by_name(spans, "sync.tenant")}
    assert set(tenant_spans) == set(tenants)
    for tid, span in tenant_spans.items():
        assert span.parent is not None and span.parent.span_id == cycle.context.span_id
        attributes = attrs(span)
        assert attributes["direction"] == "pull" and attributes["outcome"] == "success"
        assert attributes["incidents"] == per_tenant[tid]["incidents"] > 0
        assert attributes["pages"] == per_tenant[tid]["pages"] >= 1
        assert 0 <= attributes["lagSeconds"] < 600
    incident_spans = by_name(spans, "sync.incident")
    assert len(incident_spans) == sum(len(world.incident_ids(t)) for t in tenants)
    for span in incident_spans:
        attributes = attrs(span)
        tenant_span = tenant_spans[attributes["tenantId"]]
        assert span.parent is not None and span.parent.span_id == tenant_span.context.span_id, \
            "an incident span must be a child of its own tenant's span (tenants are interleaved)"
        assert attributes["incidentId"] in world.incident_ids(attributes["tenantId"])
        assert attributes["trigger"] == "pull"
        assert attributes["result"] in ("created", "applied", "unchanged", "ignored", "error")
    failed = [s for s in incident_spans if attrs(s)["incidentId"] == broken_id and attrs(s)["tenantId"] == tenants[1]]
    assert len(failed) == 1 and attrs(failed[0])["result"] == "error"
    assert failed[0].status.status_code is StatusCode.ERROR and attrs(failed[0])["error.type"] == "ApiError"
    assert not any(s.events for s in spans), "exceptions (free text) are never recorded on spans"

    # Metrics, per tenant, equal the cycle's summary and what landed in the emulators.
    for tid in tenants:
        t = per_tenant[tid]
        where = {"tenantId": tid, "direction": "pull"}
        assert total(points, "sync.incidents", **where) == t["incidents"] == len(world.incident_ids(tid))
        assert total(points, "sync.alerts", **where) == t["alerts"] > 0
        for table in TABLES:
            landed = sum(1 for r in world.rows(table) if r["DefenderTenantId"] == tid)
            assert total(points, "sync.rows", table=table, **where) == landed, table
        assert total(points, "sync.writes", side="sentinel", **where) == t["mirrored"] > 0
        assert total(points, "sync.writes", side="defender", **where) == t["pushed"]
        assert total(points, "sync.pages", **where) == t["pages"]
        assert total(points, "sync.throttled", **where) == t["throttled"]
        assert total(points, "sync.dead_letters", **where) == t["deadLettered"]
        assert total(points, "sync.cycles", outcome="success", **where) == 1
        lags = [v for a, v in points["sync.lag_seconds"] if a.get("tenantId") == tid]
        assert len(lags) == 1 and 0 <= lags[0] < 600, lags
    assert sum(total(points, "sync.throttled", tenantId=tid) for tid in tenants) == 1
    assert total(points, "sync.dead_letters", tenantId=tenants[1]) == 1
    assert total(points, "sync.writes", side="sentinel", direction="pull") == len(emulators.sentinel.all_incidents())
    # The gauge reports each pull once: a later collection does not repeat a stale lag.
    assert not [a for a, _ in otel.points().get("sync.lag_seconds", []) if a.get("tenantId") in tenants]

    # Attributes carry IDs, counts and names only: no secret, and no incident content either.
    texts = everything_emitted(otel, points)
    assert any(dict(r.log_record.attributes or {}).get("tenantId") in tenants for r in otel.logs()), \
        "structured logs captured"
    assert_no_secret(texts, settings)
    titles = {world.get_incident(tid, iid)["displayName"] for tid in tenants for iid in world.incident_ids(tid)}
    span_and_metric_texts = everything_emitted(Otel(otel.span_exporter, otel.reader, LogExporter()),
                                               points)
    assert not titles & set(span_and_metric_texts)


# ------------------------------------------------------------------------------------------------------- webhook


def test_a_webhook_emits_its_span_counter_and_writes_without_secrets(
        otel: Otel, emulators: Any, make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    world = emulators.world
    tenant = world.add_tenant(name="Contoso")
    world.add_incident(tenant, {
        "id": "801", "displayName": "Ransomware on WS-01", "severity": "high", "status": "active",
        "classification": "truePositive", "determination": "malware",
        "alerts": [{"title": "Ransomware detected", "severity": "high", "status": "new",
                    "serviceSource": "microsoftDefenderForEndpoint", "firstActivityDateTime": "2026-11-20T08:00:00Z",
                    "lastActivityDateTime": "2026-11-20T09:00:00Z"}]})
    settings = make_app_settings([tenant])
    apply_settings(monkeypatch, settings)
    status, _ = http("sync_run", body={})
    assert status == 200
    name = SentinelTarget(None).name_for(tenant, "801")  # type: ignore[arg-type]
    emulators.sentinel.analyst_update(name, status="Closed", classification="TruePositive",
                                      classification_reason="SuspiciousActivity")
    otel.reset()

    status, body = http("sentinel_webhook", body=emulators.sentinel.trigger_body(name), route="sentinel/incidents")
    assert status == 200 and body["result"] == "applied", body
    rejected_status, rejected = http("sentinel_webhook", body={"object": {"id": "/subscriptions/x/not-an-incident"}},
                                     route="sentinel/incidents")
    assert rejected_status == 400 and rejected["error"]["code"] == "invalid_incident_id"

    spans = otel.spans()
    points = otel.points()
    webhook_spans = by_name(spans, "sync.webhook")
    assert len(webhook_spans) == 2
    applied = next(s for s in webhook_spans if attrs(s)["result"] == "applied")
    assert attrs(applied).items() >= {"tenantId": tenant, "incidentId": "801",
                                                      "http.response.status_code": 200}.items()
    (incident,) = by_name(spans, "sync.incident")
    assert incident.parent is not None and incident.parent.span_id == applied.context.span_id
    assert attrs(incident).items() >= {"tenantId": tenant, "incidentId": "801",
                                                       "trigger": "webhook", "result": "applied"}.items()
    assert any(attrs(s)["result"] == "invalid_incident_id" for s in webhook_spans)

    assert total(points, "sync.webhook", result="applied", tenantId=tenant) == 1
    assert total(points, "sync.webhook", result="invalid_incident_id") == 1
    assert total(points, "sync.writes", side="defender", direction="webhook", tenantId=tenant) == 1
    assert world.get_incident(tenant, "801")["status"] == "resolved"

    texts = everything_emitted(otel, points)
    assert_no_secret(texts, settings)
    assert "Ransomware on WS-01" not in texts


# ------------------------------------------------------------------------------------------------------- no-op


def test_without_a_connection_string_configure_telemetry_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)
    assert telemetry.configure_telemetry() is False
    assert telemetry.is_configured() is False


# ------------------------------------------------------------------------------------------------------- redaction


def test_sensitive_keys_are_recognised_and_the_apps_own_keys_are_not() -> None:
    for key in ("Authorization", "http.request.header.authorization", "client_secret", "clientSecret", "token",
                "access_token", "sig", "AccountKey", "x-identity-header", "connectionString", "api-key", "password",
                "http.request.header.cookie", "SharedAccessSignature", "privateKey"):
        assert sensitive_key(key), key
    for key in ("tenantId", "incidentId", "direction", "trigger", "result", "outcome", "table", "side", "tenants",
                "assignedTo", "designation", "lagSeconds", "deadLettered", "error.type", "http.url", "url.full",
                "http.response.status_code", "action", "reason", "cursor", "pages", "throttled"):
        assert not sensitive_key(key), key


def test_the_redactor_masks_credentials_by_key_pattern_and_known_value() -> None:
    r = Redactor(["Zq8~known.secret.value"])
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJ0aWQiOiJ4In0.c2lnbmF0dXJl"
    assert r.text(f"Authorization: Bearer {jwt}") == f"Authorization: Bearer {REDACTED}"
    assert "eyJ" not in r.text(f"token was {jwt} ok")
    assert r.text("https://acct.blob.core.windows.net/c/b?sv=2024&sig=abc%2Fdef&se=x") == \
        f"https://acct.blob.core.windows.net/c/b?sv=2024&sig={REDACTED}&se=x"
    assert r.text("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc/def==;EndpointSuffix=x") == \
        f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={REDACTED};EndpointSuffix=x"
    assert r.text("client_id=1&client_secret=s3cr3t&scope=x") == f"client_id=1&client_secret={REDACTED}&scope=x"
    assert r.text("oops Zq8~known.secret.value leaked") == f"oops {REDACTED} leaked"
    pem = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"
    assert "MIIE" not in r.text(f"cert {pem} end")
    # Ordinary values stay as they are (no copy made).
    clean = {"tenantId": "t", "incidentId": "42", "http.url": "https://graph/v1.0/security/incidents?$top=50",
             "count": 3, "fields": ("status", "owner")}
    assert r.attributes(clean) is None
    assert r.attributes({"authorization": "Bearer x", "ok": "fine"}) == {"authorization": REDACTED, "ok": "fine"}


def test_the_redacting_processors_mask_spans_and_log_records_before_export() -> None:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(RedactingSpanProcessor(Redactor(["Zq8~known.secret.value"])))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("call", attributes={"http.request.header.authorization": ["Bearer eyJabc.def"],
                                                          "note": "Zq8~known.secret.value", "tenantId": "t"}) as span:
        span.add_event("exception", {"exception.message": "GET https://x/?sig=SIGVALUE failed"})
    (finished,) = exporter.get_finished_spans()
    assert dict(finished.attributes or {}) == {"http.request.header.authorization": REDACTED, "note": REDACTED,
                                               "tenantId": "t"}
    assert finished.events[0].attributes == {"exception.message": f"GET https://x/?sig={REDACTED} failed"}

    logs = LogExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(RedactingLogRecordProcessor(Redactor()))
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    logger = logging.getLogger("sync.test_redaction")
    handler = LoggingHandler(logger_provider=logger_provider)
    logger.addHandler(handler)
    try:
        logger.warning("token Bearer %s", "eyJabc.def.ghi", extra={"clientSecret": "x" * 12, "tenantId": "t"})
    finally:
        logger.removeHandler(handler)
    (record,) = logs.get_finished_logs()
    assert record.log_record.body == f"token Bearer {REDACTED}"
    attributes = dict(record.log_record.attributes or {})
    assert attributes["clientSecret"] == REDACTED and attributes["tenantId"] == "t"


# ------------------------------------------------------------------------------------------------------- Azure Monitor

_CHILD = textwrap.dedent("""
    import json, logging, os, socket, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    # No network: any connection or name lookup beyond the loopback is refused and recorded.
    attempts = []
    LOCAL = ("127.0.0.1", "::1", "localhost")
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def _host(address):
        return str(address[0]) if isinstance(address, tuple) else str(address)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in LOCAL:
            attempts.append(_host(address))
            raise OSError("network is disabled in this test")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _host(address) not in LOCAL:
            attempts.append(_host(address))
            return 111
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and str(host) not in LOCAL:
            attempts.append(str(host))
            raise socket.gaierror("network is disabled in this test")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    sys.path.insert(0, os.getcwd())
    started = time.monotonic()
    import function_app  # configure_telemetry() runs when the app is imported, as in the Functions host
    configure_seconds = time.monotonic() - started

    import requests
    from opentelemetry import _logs, metrics, trace
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from sync import telemetry
    from sync.models import CycleSummary, TenantSummary

    tracer_provider = trace.get_tracer_provider()
    out = {"configured": telemetry.is_configured(), "configureSeconds": configure_seconds,
           "tracerProvider": type(tracer_provider).__name__,
           "meterProvider": type(metrics.get_meter_provider()).__name__,
           "processors": [type(p).__name__ for p in tracer_provider._active_span_processor._span_processors],
           "requestsInstrumented": RequestsInstrumentor().is_instrumented_by_opentelemetry,
           "urllib3Instrumented": URLLib3Instrumentor().is_instrumented_by_opentelemetry,
           "handlers": [type(h).__name__ for h in logging.getLogger("sync").handlers],
           "rootHandlers": [type(h).__name__ for h in logging.getLogger().handlers]}
    # What the Azure exporters receive, seen from processors registered after theirs.
    spans = InMemorySpanExporter()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logs = InMemoryLogRecordExporter()
    _logs.get_logger_provider().add_log_record_processor(SimpleLogRecordProcessor(logs))

    secret = os.environ["DEFENDER_CLIENT_SECRET"]
    jwt = os.environ["PROBE_JWT"]
    started = time.monotonic()
    with telemetry.tracer.start_as_current_span("probe", attributes={
            "token": "abc123", "note": "secret " + secret + " and Bearer " + jwt, "tenantId": "t1"}):
        requests.get("http://127.0.0.1:%d/x?sig=SASSIG123&keep=1" % server.server_port,
                     headers={"Authorization": "Bearer " + jwt}, timeout=5)
        logging.getLogger("sync.probe").warning("calling with Bearer %s", jwt, extra={
            "clientSecret": secret, "detail": "AccountKey=" + os.environ["PROBE_ACCOUNT_KEY"] + ";x", "n": 1})
    telemetry.record_cycle(CycleSummary("pull", "2026-01-01T00:00:00Z", tenants=[
        TenantSummary("t1", cursor_after="2026-01-01T00:00:00Z", incidents=3)]))
    out["emitSeconds"] = time.monotonic() - started
    started = time.monotonic()
    out["tracesFlushed"] = tracer_provider.force_flush(5000)
    out["metricsFlushed"] = metrics.get_meter_provider().force_flush(5000)
    out["flushSeconds"] = time.monotonic() - started
    out["spans"] = [{"name": s.name, "attributes": {k: v if isinstance(v, (str, int, float, bool)) else list(v)
                                                    for k, v in s.attributes.items()}}
                    for s in spans.get_finished_spans()]
    out["logs"] = [{"body": str(r.log_record.body),
                    "attributes": {k: str(v) for k, v in dict(r.log_record.attributes).items()}}
                   for r in logs.get_finished_logs()]
    out["attempts"] = sorted(set(attempts))
    print("RESULT " + json.dumps(out))
    sys.stdout.flush()
""")


def test_configure_telemetry_sets_up_azure_monitor_with_redaction_and_no_network(tmp_path: Path) -> None:
    secret = "Zq8~VeryS3cretClientValue.0123456789"
    account_key = "c3RvcmFnZWtleXN0b3JhZ2VrZXlzdG9yYWdla2V5"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJ0aWQiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl"
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "SYSTEMROOT")}
    env.update({
        "TMPDIR": str(tmp_path),  # the exporter's offline retry storage
        "FUNCTIONS_WORKER_RUNTIME": "python",  # as on the Functions host (no Azure VM metadata probe)
        "OTEL_TRACES_SAMPLER": "always_on",  # deterministic for the test (the default is rate-limited)
        "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST": ".*",  # worst case: every header captured
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                                                 "IngestionEndpoint=https://127.0.0.1:9/;"
                                                 "LiveEndpoint=https://127.0.0.1:9/",
        "DEFENDER_TENANT_IDS": "11111111-1111-1111-1111-111111111111",
        "DEFENDER_CLIENT_ID": "22222222-2222-2222-2222-222222222222",
        "DEFENDER_CLIENT_SECRET": secret,
        "LOGS_INGESTION_ENDPOINT": "https://127.0.0.1:9",
        "LOGS_DCR_IMMUTABLE_ID": "dcr-00000000000000000000000000000000",
        "SENTINEL_WORKSPACE_ID": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.OperationalInsights/"
                                 "workspaces/ws",
        "AzureWebJobsStorage": f"DefaultEndpointsProtocol=http;AccountName=dev;AccountKey={account_key};"
                               "TableEndpoint=http://127.0.0.1:9/dev;QueueEndpoint=http://127.0.0.1:9/dev;",
        "DEFENDER_PULL_SCHEDULE": "0 */5 * * * *", "SENTINEL_RECONCILE_SCHEDULE": "0 */15 * * * *",
        "PROBE_JWT": jwt, "PROBE_ACCOUNT_KEY": account_key,
    })
    done = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))

    assert out["configured"] is True
    assert out["tracerProvider"] == "TracerProvider" and out["meterProvider"] == "MeterProvider"
    processors = out["processors"]
    assert processors.index("RedactingSpanProcessor") < processors.index("BatchSpanProcessor")
    assert out["requestsInstrumented"] is True and out["urllib3Instrumented"] is False
    assert "LoggingHandler" in out["handlers"] and "LoggingHandler" not in out["rootHandlers"], \
        "only the app's 'sync' logger is exported, never the root logger (azure.core HTTP logging)"
    assert out["attempts"] == [], f"telemetry set-up tried to reach the network: {out['attempts']}"
    assert out["configureSeconds"] < 15 and out["emitSeconds"] < 5 and out["flushSeconds"] < 15, out

    spans = {s["name"]: s["attributes"] for s in out["spans"]}
    assert spans["probe"] == {"token": REDACTED, "note": f"secret {REDACTED} and Bearer {REDACTED}", "tenantId": "t1"}
    http_span = spans["GET"]
    assert http_span["http.request.header.authorization"] == REDACTED
    assert "SASSIG123" not in json.dumps(http_span) and "keep=1" in json.dumps(http_span)
    (log_record,) = [r for r in out["logs"] if r["body"].startswith("calling with")]
    assert log_record["body"] == f"calling with Bearer {REDACTED}"
    assert log_record["attributes"]["clientSecret"] == REDACTED
    assert log_record["attributes"]["detail"] == f"AccountKey={REDACTED};x"
    exported = json.dumps({"spans": out["spans"], "logs": out["logs"]})
    for value in (secret, account_key, jwt, "eyJ", "SASSIG123"):
        assert value not in exported, value
