"""sync.logs_sink: exact-size chunking, failure reporting, bisection of bad chunks, bounded retries.

Unit tests use a stub client (an object with ``upload``); the ``real_client`` tests drive the real
azure-monitor-ingestion ``LogsIngestionClient`` against a tiny in-process HTTPS endpoint defined here, so they do
not depend on the shared emulators (``test_logs_sink_emulator`` below uses those when they exist).
"""

from __future__ import annotations

import datetime as dt
import gzip
import ipaddress
import json
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.monitor.ingestion import LogsUploadError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sync.budget import Deadline
from sync.logs_sink import MAX_REQUEST_BYTES, LogsSink, UploadResult, chunk_rows

TABLE = "DefenderIncidents_CL"
STREAM = "Custom-DefenderIncidents"
SDK_LIMIT = 1_048_576


NOW = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # recent: Log Analytics keeps TimeGenerated


def make_row(i: int, pad: int = 0, unit: str = "x") -> dict[str, Any]:
    return {"TimeGenerated": NOW, "RecordId": f"r{i}", "DefenderTenantId": "t",
            "TenantName": "n", "IncidentId": str(i), "Description": unit * pad}


def wire(value: Any) -> int:
    return len(json.dumps(value).encode("utf-8"))


class Credential:
    """A TokenCredential that records the scopes asked for."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("secret-token-value", int(time.time()) + 3600)


@dataclass
class StubClient:
    """Records each upload call; ``fail(chunk) -> Exception | None`` decides failures (reported via on_error)."""

    fail: Callable[[list[dict[str, Any]]], Exception | None] = lambda chunk: None
    raise_instead: bool = False
    calls: list[list[dict[str, Any]]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def upload(self, rule_id: str, stream_name: str, logs: Any, *, on_error: Any = None, **kwargs: Any) -> None:
        assert rule_id == "dcr-123" and stream_name == STREAM
        body = logs.read()
        assert body[:2] == b"\x1f\x8b" and len(body) <= MAX_REQUEST_BYTES  # gzipped once, sent as it is
        chunk = json.loads(gzip.decompress(body))
        self.calls.append(chunk)
        self.kwargs.append(kwargs)
        error = self.fail(chunk)
        if error is None:
            return
        if self.raise_instead or on_error is None:
            raise error
        on_error(LogsUploadError(error=error, failed_logs=chunk))


def http_error(status: int, message: str = "boom") -> HttpResponseError:
    error = HttpResponseError(message=message)
    error.status_code = status
    return error


def sink_with(client: Any, **kwargs: Any) -> LogsSink:
    return LogsSink("https://unused.example", "dcr-123", Credential(), client=client, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Chunking


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rnd=st.randoms(use_true_random=True), unit=st.sampled_from(["x", "é", "\x01", '"']),
       max_chunk=st.one_of(st.sampled_from([4_096, 65_536, 300_000, 900_000, MAX_REQUEST_BYTES]),
                           st.integers(1_024, MAX_REQUEST_BYTES)))
def test_property_chunks_fit_exactly_and_preserve_rows(rnd: random.Random, unit: str, max_chunk: int) -> None:
    # Row sizes drawn uniformly relative to the chunk size (hypothesis' own integers cluster near 0), so most
    # examples need several chunks and some rows are too big for any chunk.
    count = rnd.randint(1, 40)
    pads = [rnd.randint(0, max_chunk * 11 // 10) if rnd.random() < 0.05 else rnd.randint(0, max_chunk // 3)
            for _ in range(count)]
    rows = [make_row(i, pad // (6 if unit != "x" else 1), unit) for i, pad in enumerate(pads)]
    client = StubClient()
    result = sink_with(client, max_chunk_bytes=max_chunk).upload(TABLE, rows)
    too_big = [r for r in rows if wire(r) + 2 > max_chunk]
    assert result.failed_rows == too_big
    sent = [r for chunk in client.calls for r in chunk]
    assert sent == [r for r in rows if r not in too_big]  # order kept, nothing lost, nothing duplicated
    for chunk in client.calls:
        size = wire(chunk)  # exactly what the SDK serialises before gzip
        assert size <= max_chunk <= SDK_LIMIT
        # The SDK's own chunker (sum of record sizes) must see one chunk, so it never re-splits ours.
        assert sum(wire(r) for r in chunk) <= SDK_LIMIT
    for before, after in zip(client.calls, client.calls[1:], strict=False):  # greedy: the next row did not fit
        assert wire([*before, after[0]]) > max_chunk
    event(f"chunks: {min(len(client.calls), 5)}{'+' if len(client.calls) >= 5 else ''}")
    event("some rows too big" if too_big else "all rows fit")
    assert result.requests == len(client.calls)
    assert result.rows == len(sent) and result.bytes == sum(wire(c) for c in client.calls)
    assert result.ok == (not too_big)


def test_chunk_rows_arithmetic() -> None:
    rows = [make_row(i, 100) for i in range(10)]
    sizes = [wire(r) for r in rows]
    for limit in (wire(rows[:1]), wire(rows[:3]), wire(rows[:3]) + 1, wire(rows) - 1, wire(rows)):
        ranges = chunk_rows(sizes, limit)
        assert [i for a, b in ranges for i in range(a, b)] == list(range(10))
        assert all(wire(rows[a:b]) <= limit for a, b in ranges)
    assert chunk_rows(sizes, wire(rows)) == [(0, 10)]
    assert chunk_rows([], 1000) == []
    with pytest.raises(ValueError):
        chunk_rows([999], 1000)


def test_the_sdk_chunker_would_overflow_where_ours_does_not() -> None:
    # Why we chunk ourselves: the SDK sums record sizes and ignores "[", "]" and the ", " separators.
    from azure.monitor.ingestion._helpers import _split_chunks

    rows = [make_row(i, 1) for i in range(12_000)]
    sdk_first = next(iter(_split_chunks(list[Any](rows))))
    assert wire(sdk_first) > SDK_LIMIT  # the SDK would send an over-limit body
    client = StubClient()
    sink_with(client, max_chunk_bytes=MAX_REQUEST_BYTES).upload(TABLE, rows)
    assert all(wire(chunk) <= MAX_REQUEST_BYTES for chunk in client.calls)
    assert [r for c in client.calls for r in c] == rows


# ---------------------------------------------------------------------------------------------------------------
# Failures


def test_on_error_failures_are_reported_and_later_chunks_not_sent() -> None:
    rows = [make_row(i, 50_000) for i in range(10)]
    calls = {"n": 0}

    def fail(chunk: list[dict[str, Any]]) -> Exception | None:
        calls["n"] += 1
        return http_error(500, "Internal Server Error") if calls["n"] == 2 else None

    client = StubClient(fail=fail)
    result = sink_with(client, max_chunk_bytes=200_000).upload(TABLE, rows)
    first, second = client.calls
    assert len(client.calls) == 2  # stopped after the service failure
    assert result.rows == len(first) and result.requests == 2
    assert result.failed_rows == rows[len(first):]  # the failed chunk and everything after, in order
    assert not result.ok
    assert any("HTTP 500" in e and f"{len(second)} rows not stored" in e for e in result.errors)
    assert any("not sent after an earlier failure" in e for e in result.errors)


def test_raised_exceptions_count_as_failures() -> None:
    client = StubClient(fail=lambda chunk: ServiceRequestError("connection refused"), raise_instead=True)
    rows = [make_row(i) for i in range(3)]
    result = sink_with(client).upload(TABLE, rows)
    assert result.failed_rows == rows and result.rows == 0
    assert "ServiceRequestError" in result.errors[0]


@pytest.mark.parametrize("status", [400, 413])
def test_content_errors_bisect_down_to_the_bad_rows(status: int) -> None:
    rows = [make_row(i, 10) for i in range(37)]
    poison = {5, 22, 23}

    def fail(chunk: list[dict[str, Any]]) -> Exception | None:
        bad = any(int(r["IncidentId"]) in poison for r in chunk)
        return http_error(status, "The request body is invalid") if bad else None

    client = StubClient(fail=fail)
    result = sink_with(client).upload(TABLE, rows)
    assert [int(r["IncidentId"]) for r in result.failed_rows] == sorted(poison)
    assert result.rows == len(rows) - len(poison)
    stored = [r for chunk, in_error in ((c, fail(c)) for c in client.calls) if in_error is None for r in chunk]
    assert stored == [r for r in rows if int(r["IncidentId"]) not in poison]  # every good row exactly once, in order
    assert len(result.errors) == len(poison)


def test_every_row_refused_alone_is_an_outage_not_bad_content() -> None:
    """A DCR that refuses each row of a chunk (drifted stream, broken transform): no row is "rejected content" (the
    caller would dead-letter them all), the upload reports an outage, and later chunks are not sent."""
    rows = [make_row(i, 100) for i in range(12)]
    client = StubClient(fail=lambda chunk: http_error(400, "InvalidPayload: column 'TenantName' is not a column"))
    result = sink_with(client, max_chunk_bytes=1_100).upload(TABLE, rows)
    assert result.refused_all and result.rejected_rows == []
    assert result.failed_rows == rows and result.rows == 0
    first = {r["IncidentId"] for r in client.calls[0]}
    assert all({r["IncidentId"] for r in call} <= first for call in client.calls), "a later chunk was sent"
    assert "data collection rule" in result.errors[0]


def test_one_good_row_keeps_the_refusals_bad_content() -> None:
    rows = [make_row(i, 10) for i in range(6)]
    client = StubClient(fail=lambda chunk: http_error(400) if any(r["IncidentId"] != "3" for r in chunk) else None)
    result = sink_with(client).upload(TABLE, rows)
    assert not result.refused_all and result.rows == 1
    assert result.rejected_rows == result.failed_rows == [r for r in rows if r["IncidentId"] != "3"]


def test_rows_that_cannot_be_sent_are_failed_without_a_request() -> None:
    client = StubClient()
    good = make_row(1)
    bad = [{**make_row(2), "Title": "reserved"}, {**make_row(3), "Description": float("nan")},
           {**make_row(4), "Description": object()}, make_row(5, 5_000), "not a dict"]
    result = sink_with(client, max_chunk_bytes=4_096).upload(TABLE, [bad[0], good, *bad[1:]])  # type: ignore[list-item]
    assert client.calls == [[good]]
    assert result.failed_rows == [bad[0], *bad[1:]]
    assert result.rows == 1 and len(result.errors) == len(bad)
    assert "unknown columns ['Title']" in result.errors[0]
    assert "not JSON-serialisable" in result.errors[1]
    assert "request limit" in result.errors[3]


def test_spent_deadline_sends_nothing() -> None:
    client = StubClient()
    rows = [make_row(i) for i in range(3)]
    result = sink_with(client).upload(TABLE, rows, deadline=Deadline(0))
    assert client.calls == [] and result.failed_rows == rows
    assert "time budget" in result.errors[0]


def test_deadline_bounds_each_call() -> None:
    client = StubClient()
    sink_with(client, call_timeout=120).upload(TABLE, [make_row(1)], deadline=Deadline(30))
    (kwargs,) = client.kwargs
    assert 25 < kwargs["timeout"] <= 30 and kwargs["read_timeout"] <= 30


def test_errors_never_carry_tokens() -> None:
    client = StubClient(fail=lambda chunk: http_error(401, "rejected Authorization: Bearer eyJ0eXAi.abc.def"))
    result = sink_with(client).upload(TABLE, [make_row(1)])
    assert "eyJ0eXAi" not in " ".join(result.errors) and "Bearer [redacted]" in result.errors[0]


def test_validation_and_merge() -> None:
    with pytest.raises(ValueError):
        sink_with(StubClient(), max_chunk_bytes=1_048_576)
    with pytest.raises(ValueError):
        sink_with(StubClient(), max_chunk_bytes=100)
    with pytest.raises(ValueError, match="unknown table"):
        sink_with(StubClient()).upload("Other_CL", [])
    total = UploadResult(rows=1, bytes=10, requests=1)
    total.merge(UploadResult(rows=2, bytes=5, requests=1, failed_rows=[{"a": 1}], errors=["x"], attempts=3))
    assert (total.rows, total.bytes, total.requests, total.attempts, total.ok) == (3, 15, 2, 3, False)
    assert sink_with(StubClient()).upload(TABLE, []) == UploadResult()


# ---------------------------------------------------------------------------------------------------------------
# Real LogsIngestionClient against an in-process HTTPS endpoint


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class FakeIngestion:
    url: str
    ca: Path
    script: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)  # next responses; then 204
    always: tuple[int, dict[str, str]] | None = None
    posts: list[dict[str, Any]] = field(default_factory=list)
    stored: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeIngestion]:
    cert, key = _self_signed(tmp_path)
    state = FakeIngestion(url="", ca=cert)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            raw = gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body
            with lock:
                state.posts.append({"path": self.path, "gzip": len(body), "raw": len(raw),
                                    "auth": self.headers.get("Authorization", ""), "body": raw})
                status, headers = state.script.popleft() if state.script else (state.always or (204, {}))
                if status == 204 and (len(body) > 1_048_576 or len(raw) > 1_048_576):
                    status, headers = 413, {}
                if status == 204:
                    state.stored.extend(json.loads(raw))
            payload = b"" if status == 204 else json.dumps({"error": {"code": "Fault", "message": "x"}}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def real_sink(fake: FakeIngestion, credential: Credential | None = None, **kwargs: Any) -> LogsSink:
    options: dict[str, Any] = {"connection_verify": str(fake.ca), "retry_backoff_factor": 0.01}
    options.update(kwargs)
    return LogsSink(fake.url, "dcr-123", credential or Credential(), **options)


def test_real_client_one_gzip_post_per_chunk(fake: FakeIngestion) -> None:
    credential = Credential()
    rows = [make_row(i, 40_000 + i) for i in range(60)]  # ~2.4 MB: several chunks
    sink = real_sink(fake, credential, scope="https://monitor.azure.us/.default")
    result = sink.upload(TABLE, rows)
    assert result.ok and result.rows == 60
    assert fake.stored == rows
    assert len(fake.posts) == result.requests == result.attempts >= 3
    for post in fake.posts:
        assert post["path"] == f"/dataCollectionRules/dcr-123/streams/{STREAM}?api-version=2023-01-01"
        assert post["raw"] <= 900_000 and post["gzip"] < post["raw"]
        assert post["auth"] == "Bearer secret-token-value"
    assert result.bytes == sum(p["raw"] for p in fake.posts)
    assert credential.scopes and all(s == ("https://monitor.azure.us/.default",) for s in credential.scopes)


def test_real_client_retries_transient_errors_and_counts_attempts(fake: FakeIngestion) -> None:
    fake.script.extend([(503, {}), (500, {}), (429, {"Retry-After": "0"})])
    result = real_sink(fake).upload(TABLE, [make_row(1), make_row(2)])
    assert result.ok and fake.stored == [make_row(1), make_row(2)]
    assert result.requests == 1 and result.attempts == 4 and result.throttled == 1


def test_real_client_persistent_500_reports_the_failed_rows(fake: FakeIngestion) -> None:
    fake.always = (500, {})
    rows = [make_row(i, 300_000) for i in range(6)]
    result = real_sink(fake, retry_total=2).upload(TABLE, rows)
    assert result.failed_rows == rows and result.rows == 0 and fake.stored == []
    assert result.requests == 1 and len(fake.posts) == 3  # first chunk tried 1 + 2 retries; the rest not sent
    assert "HTTP 500" in result.errors[0]


def test_real_client_long_retry_after_fails_fast_instead_of_sleeping(fake: FakeIngestion) -> None:
    fake.always = (429, {"Retry-After": "3600"})
    started = time.monotonic()
    result = real_sink(fake, max_retry_wait=5).upload(TABLE, [make_row(1)])
    assert time.monotonic() - started < 10
    assert result.failed_rows == [make_row(1)] and "HTTP 429" in result.errors[0]
    assert len(fake.posts) == 1 and result.throttled == 1


def test_real_client_schema_400_isolates_the_bad_row(fake: FakeIngestion) -> None:
    fake.script.extend([(400, {})])  # the first request (both rows) is rejected, the halves pass
    rows = [make_row(1), make_row(2)]
    result = real_sink(fake).upload(TABLE, rows)
    assert result.ok and fake.stored == rows and result.requests == 3


# ---------------------------------------------------------------------------------------------------------------
# End to end: rows.py -> LogsSink -> real LogsIngestionClient -> the shared Logs Ingestion emulator
# (HTTPS, managed-identity token, gzip, 1 MiB limit, schema validation against infra/tables).


def emulator_sink(hub: Any, **kwargs: Any) -> LogsSink:
    from azure.identity import ManagedIdentityCredential

    from emulators.ingestion import INGESTION_AUDIENCE

    options: dict[str, Any] = {"retry_backoff_factor": 0.01}
    options.update(kwargs)
    return LogsSink(hub.endpoints.ingestion, hub.endpoints.dcr_immutable_id, ManagedIdentityCredential(),
                    scope=f"{INGESTION_AUDIENCE}/.default", **options)


def generated_rows(count: int = 40, seed: int = 11) -> dict[str, list[dict[str, Any]]]:
    from dataclasses import replace

    from emulators.generator import PROFILES, generate_incidents
    from sync.rows import rows_for_incident

    read_at = dt.datetime.now(dt.UTC)
    tables: dict[str, list[dict[str, Any]]] = {}
    # The realistic profile, with a big incident and values over 64 KB made frequent enough to appear in 40.
    profile = replace(PROFILES["realistic"], huge_rate=0.15, big_rate=0.05)
    for incident in generate_incidents(seed, "7f1c6d1e-0000-4000-8000-0000000000aa", count, profile=profile):
        for table, rows in rows_for_incident(incident, tenant_id="7f1c6d1e-0000-4000-8000-0000000000aa",
                                             tenant_name="Fabrikam", read_at=read_at).items():
            tables.setdefault(table, []).extend(rows)
    return tables


def test_emulator_end_to_end_generated_incidents(emulators: Any, managed_identity_env: dict[str, str]) -> None:
    tables = generated_rows()
    sink = emulator_sink(emulators)
    total = UploadResult()
    for table, rows in tables.items():
        total.merge(result := sink.upload(table, rows))
        assert result.ok, result.errors
        assert emulators.world.rows(table) == rows  # every row stored, in order, values unchanged
    stats = emulators.world.ingestion.stats
    assert stats.rejected == 0 and stats.accepted == total.requests == total.attempts
    assert emulators.world.violations == []  # nothing over the 64 KB field limit reached the service
    assert stats.bytes_uncompressed == total.bytes and stats.bytes_sent < stats.bytes_uncompressed  # gzip
    assert total.requests > 3  # the evidence table alone needs several requests
    truncated = [r for rows in tables.values() for r in rows if "TruncatedFields" in r]
    assert truncated, "the realistic profile includes values over 64 KB"


def test_emulator_persistent_500_reports_failed_rows(emulators: Any, managed_identity_env: dict[str, str]) -> None:
    from emulators.base import Fault, match_request

    rows = [make_row(i, 50_000) for i in range(40)]  # several requests' worth
    emulators.faults.rule("ingestion", match_request(method="POST", path="^/dataCollectionRules/"),
                          Fault("status", 500))
    result = emulator_sink(emulators, retry_total=2).upload(TABLE, rows)
    assert result.failed_rows == rows and result.rows == 0
    assert result.requests == 1 and result.attempts == 3  # one call, 2 retries, the rest not sent
    assert "HTTP 500" in result.errors[0] and any("earlier failure" in e for e in result.errors)
    assert emulators.world.rows(TABLE) == []
    # The next run re-sends exactly the failed rows once the service is back.
    emulators.faults.clear()
    again = emulator_sink(emulators).upload(TABLE, result.failed_rows)
    assert again.ok and emulators.world.rows(TABLE) == rows


def test_emulator_transient_faults_are_retried(emulators: Any, managed_identity_env: dict[str, str]) -> None:
    from emulators.base import Fault

    emulators.faults.queue("ingestion", Fault("status", 503), times=2)
    emulators.faults.queue("ingestion", Fault("status", 429, retry_after="1"))
    result = emulator_sink(emulators).upload(TABLE, [make_row(1), make_row(2)])
    assert result.ok and result.requests == 1 and result.attempts == 4 and result.throttled == 1
    assert emulators.world.rows(TABLE) == [make_row(1), make_row(2)]


def test_emulator_schema_rejection_isolates_the_bad_row(emulators: Any, managed_identity_env: dict[str, str]) -> None:
    rows = [make_row(i) for i in range(20)]
    rows[13]["AlertCount"] = "2"  # wrong type: the service answers 400 for the whole request
    result = emulator_sink(emulators).upload(TABLE, rows)
    assert result.failed_rows == [rows[13]]
    assert "InvalidPayload" in result.errors[0] and "AlertCount" in result.errors[0]
    assert emulators.world.rows(TABLE) == rows[:13] + rows[14:]
