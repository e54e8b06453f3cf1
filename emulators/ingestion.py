"""Emulated Azure Monitor Logs Ingestion API (a DCR with the project's custom streams).

``POST /dataCollectionRules/{immutableId}/streams/{stream}?api-version=2023-01-01``

- Bearer token for ``https://monitor.azure.com`` (401 otherwise); when :attr:`IngestionState.authorized` is set, the
  token's ``oid`` must be in it (403 ``OperationFailed``, the missing "Monitoring Metrics Publisher" role).
- Only the configured DCR immutable ID (404 otherwise) and the streams ``Custom-DefenderIncidents``,
  ``Custom-DefenderAlerts``, ``Custom-DefenderEvidence``, ``Custom-DefenderMirrorRequests`` (-> the table of the
  same name with ``_CL``; 400 ``InvalidStream`` otherwise). ``api-version`` must be 2023-01-01 or
  2021-11-01-preview. Each row's ingestion time on the World's clock is kept for the rule model
  (:meth:`IngestionState.rows_ingested_between`).
- ``Content-Encoding: gzip`` is decompressed. 413 when the body as sent OR uncompressed exceeds 1,048,576 bytes.
- The body must be a JSON array of objects; every key must be a column of ``infra/tables/<Table>.json`` and every
  value must fit the column type (``string``; ``int`` 32-bit and ``long`` 64-bit integers; ``real`` numbers;
  ``boolean``; ``datetime`` ISO-8601 strings; ``dynamic`` any JSON; ``null`` always). 400 ``InvalidPayload`` with
  the row index, column and reason otherwise; nothing from a rejected request is stored.
- A string value over 65,536 UTF-8 bytes (or a dynamic value whose JSON is) is accepted but recorded in
  :attr:`IngestionState.violations` and stored cut, as the real service truncates: the app must cut first, so tests
  assert ``violations == []``.
- ``TimeGenerated`` missing, older than 48 hours or more than 24 hours ahead is set to the ingestion time (as Log
  Analytics does). 204 on success; rows are stored per table; requests, bytes and rows are counted.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .base import EmuRequest, EmuResponse
from .tokens import TokenError, TokenIssuer

INGESTION_AUDIENCE = "https://monitor.azure.com"
API_VERSIONS = ("2023-01-01", "2021-11-01-preview")
MAX_BODY_BYTES = 1_048_576
MAX_FIELD_BYTES = 65_536
DEFAULT_STREAMS = {
    "Custom-DefenderIncidents": "DefenderIncidents_CL",
    "Custom-DefenderAlerts": "DefenderAlerts_CL",
    "Custom-DefenderEvidence": "DefenderEvidence_CL",
    "Custom-DefenderMirrorRequests": "DefenderMirrorRequests_CL",
}
TABLES_DIR = Path(__file__).resolve().parent.parent / "infra" / "tables"
_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})?)?$",
                          re.IGNORECASE)
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def load_table_schemas(tables_dir: Path = TABLES_DIR, tables: list[str] | None = None) -> dict[str, dict[str, str]]:
    """``{table: {column: type}}`` from ``infra/tables/<Table>.json`` (``{"columns": [{"name", "type"}]}``)."""
    schemas: dict[str, dict[str, str]] = {}
    for name in tables or sorted(set(DEFAULT_STREAMS.values())):
        data = json.loads((tables_dir / f"{name}.json").read_text(encoding="utf-8"))
        schemas[name] = {c["name"]: c["type"].lower() for c in data["columns"]}
    return schemas


@dataclass
class Violation:
    """A value the real service would have truncated (over 64 KB)."""

    table: str
    column: str
    size: int
    record_id: str | None
    row_index: int


@dataclass
class IngestionStats:
    requests: int = 0              # every POST that reached the DCR route (accepted or not)
    accepted: int = 0              # 204s
    rejected: int = 0              # 4xx answers
    bytes_sent: int = 0            # body bytes as received (compressed if gzip)
    bytes_uncompressed: int = 0
    rows: dict[str, int] = field(default_factory=dict)


class IngestionState:
    """The DCR's configuration and what was ingested. Thread-safe."""

    def __init__(self, dcr_immutable_id: str, lock: threading.RLock | None = None,
                 streams: dict[str, str] | None = None, tables_dir: Path = TABLES_DIR,
                 clock_ticks: Callable[[], int] | None = None) -> None:
        self.lock = lock or threading.RLock()
        # Ingestion time of each stored row (100 ns ticks on the World's clock): what a rule's run window reads.
        self.clock_ticks = clock_ticks or (lambda: int(datetime.now(UTC).timestamp() * 10_000_000))
        self._ingested_at: dict[str, list[int]] = {}
        self.dcr_immutable_id = dcr_immutable_id
        self.streams = dict(streams or DEFAULT_STREAMS)
        self.tables_dir = tables_dir
        self.schemas = load_table_schemas(tables_dir, sorted(set(self.streams.values())))
        self.authorized: set[str] | None = None      # principal object IDs allowed to ingest; None = any
        self._rows: dict[str, list[dict[str, Any]]] = {t: [] for t in self.schemas}
        self.violations: list[Violation] = []
        self.stats = IngestionStats()

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Rows stored for ``table`` (e.g. ``"DefenderIncidents_CL"``), in arrival order (copies of the list)."""
        with self.lock:
            return list(self._rows.get(table, []))

    def rows_ingested_between(self, table: str, after: int, until: int) -> list[dict[str, Any]]:
        """Rows of ``table`` ingested in ``(after, until]`` (ticks), in arrival order."""
        with self.lock:
            stamps = self._ingested_at.get(table, [])
            return [row for row, at in zip(self._rows.get(table, []), stamps, strict=True) if after < at <= until]

    def all_rows(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            return {t: list(r) for t, r in self._rows.items()}

    def reset(self) -> None:
        """Forget rows, violations and counters (the configuration stays)."""
        with self.lock:
            self._rows = {t: [] for t in self.schemas}
            self._ingested_at = {}
            self.violations.clear()
            self.stats = IngestionStats()
            self.authorized = None

    def reload_schemas(self) -> None:
        """Re-read ``infra/tables`` (after a test edits a schema)."""
        with self.lock:
            self.schemas = load_table_schemas(self.tables_dir, sorted(set(self.streams.values())))
            for table in self.schemas:
                self._rows.setdefault(table, [])


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class IngestionService:
    """HTTP face of :class:`IngestionState`."""

    name = "ingestion"

    def __init__(self, state: IngestionState, issuer: TokenIssuer, audience: str = INGESTION_AUDIENCE) -> None:
        self.state = state
        self.issuer = issuer
        self.audience = audience

    def handle(self, request: EmuRequest) -> EmuResponse:
        """Serve one upload (see the module docstring)."""
        parts = [p for p in request.path.split("/") if p]
        if len(parts) != 4 or parts[0].lower() != "datacollectionrules" or parts[2].lower() != "streams":
            return _error(404, "NotFound", f"No route for {request.method} {request.path}.")
        if request.method != "POST":
            return _error(405, "MethodNotAllowed", "Only POST is supported.")
        with self.state.lock:
            self.state.stats.requests += 1
            self.state.stats.bytes_sent += len(request.body)
        try:
            self._upload(request, parts[1], parts[3])
        except _Reject as rej:
            with self.state.lock:
                self.state.stats.rejected += 1
            return _error(rej.status, rej.code, rej.message)
        with self.state.lock:
            self.state.stats.accepted += 1
        return EmuResponse(204, None)

    def _upload(self, request: EmuRequest, dcr: str, stream: str) -> None:
        try:
            claims = self.issuer.verify_bearer(request.headers, self.audience)
        except TokenError as exc:
            raise _Reject(401, "InvalidToken", f"The authentication token is not valid: {exc}") from exc
        authorized = self.state.authorized
        if authorized is not None and str(claims.get("oid")) not in authorized:
            raise _Reject(403, "OperationFailed", "The authentication token provided does not have access to ingest "
                          f"data for the data collection rule with immutable Id '{dcr}'.")
        version = request.q("api-version")
        if version not in API_VERSIONS:
            raise _Reject(400, "InvalidApiVersion", f"api-version '{version}' is not supported; use 2023-01-01.")
        if dcr != self.state.dcr_immutable_id:
            raise _Reject(404, "NotFound", f"Data collection rule with immutable Id '{dcr}' not found.")
        table = self.state.streams.get(stream)
        if table is None:
            raise _Reject(400, "InvalidStream", f"Stream '{stream}' is not declared in data collection rule "
                          f"'{dcr}' (declared: {', '.join(sorted(self.state.streams))}).")
        if len(request.body) > MAX_BODY_BYTES:
            raise _Reject(413, "ContentLengthLimitExceeded", f"The request body is {len(request.body)} bytes; the "
                          f"limit is {MAX_BODY_BYTES} bytes (compressed and uncompressed).")
        raw = self._decompress(request)
        with self.state.lock:
            self.state.stats.bytes_uncompressed += len(raw)
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Reject(400, "InvalidPayload", f"The request body is not valid UTF-8 JSON: {exc}") from exc
        if not isinstance(payload, list):
            raise _Reject(400, "InvalidPayload", "The request body must be a JSON array of objects.")
        with self.state.lock:
            schema = dict(self.state.schemas[table])
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        violations: list[Violation] = []
        for index, row in enumerate(payload):
            if not isinstance(row, dict):
                raise _Reject(400, "InvalidPayload", f"Item {index} is not a JSON object.")
            stored: dict[str, Any] = {}
            for column, value in row.items():
                kind = schema.get(column)
                if kind is None:
                    raise _Reject(400, "InvalidPayload", f"Item {index}: '{column}' is not a column of {table} "
                                  f"(stream {stream}); columns: {', '.join(schema)}.")
                problem = _type_problem(kind, value)
                if problem:
                    raise _Reject(400, "InvalidPayload", f"Item {index}: column '{column}' ({kind}) {problem}.")
                size = _field_size(kind, value)
                if size > MAX_FIELD_BYTES:
                    record_id = row.get("RecordId")
                    violations.append(Violation(table, column, size, str(record_id) if record_id else None, index))
                    value = _truncate(kind, value)
                stored[column] = value
            stored["TimeGenerated"] = _time_generated(stored.get("TimeGenerated"), now)
            rows.append(stored)
        with self.state.lock:
            self.state._rows.setdefault(table, []).extend(rows)
            stamps = self.state._ingested_at.setdefault(table, [])
            stamps.extend([self.state.clock_ticks()] * (len(self.state._rows[table]) - len(stamps)))
            self.state.violations.extend(violations)
            self.state.stats.rows[table] = self.state.stats.rows.get(table, 0) + len(rows)

    @staticmethod
    def _decompress(request: EmuRequest) -> bytes:
        encoding = (request.headers.get("content-encoding") or "").strip().lower()
        if not encoding or encoding == "identity":
            return request.body
        if encoding != "gzip":
            raise _Reject(415, "UnsupportedContentEncoding", f"Content-Encoding '{encoding}' is not supported.")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(request.body, MAX_BODY_BYTES + 1)
        except zlib.error as exc:
            raise _Reject(400, "InvalidPayload", f"The gzip body could not be decompressed: {exc}") from exc
        if len(raw) > MAX_BODY_BYTES or inflater.unconsumed_tail:
            raise _Reject(413, "ContentLengthLimitExceeded", f"The uncompressed request body exceeds "
                          f"{MAX_BODY_BYTES} bytes (the limit applies to compressed and uncompressed data).")
        return raw


def _type_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` does not fit a column of type ``kind`` (``None`` when it does)."""
    if value is None or kind == "dynamic":
        return None
    if kind == "string":
        return None if isinstance(value, str) else f"expects a string, got {type(value).__name__}"
    if kind == "boolean":
        return None if isinstance(value, bool) else f"expects true/false, got {type(value).__name__}"
    if kind in ("int", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expects an integer, got {type(value).__name__}"
        low, high = _INT32 if kind == "int" else _INT64
        return None if low <= value <= high else f"value {value} is out of range"
    if kind == "real":
        return None if isinstance(value, int | float) and not isinstance(value, bool) else \
            f"expects a number, got {type(value).__name__}"
    if kind == "datetime":
        if not isinstance(value, str) or not _DATETIME_RE.match(value.strip()):
            return f"expects an ISO-8601 time string, got {value!r:.60}"
        return None
    if kind == "guid":
        return None if isinstance(value, str) else "expects a GUID string"
    return f"has unsupported column type '{kind}'"


def _field_size(kind: str, value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    if kind == "dynamic" and value is not None:
        return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return 0


def _truncate(kind: str, value: Any) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")[:MAX_FIELD_BYTES].decode("utf-8", "ignore")


def _time_generated(value: Any, now: datetime) -> str:
    if isinstance(value, str):
        try:
            text = value.strip().replace("z", "Z")
            text = text[:-1] + "+00:00" if text.endswith("Z") else text
            text = re.sub(r"\.(\d+)", lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            if now - timedelta(hours=48) <= moment <= now + timedelta(hours=24):
                return value
        except ValueError:
            pass
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(status: int, code: str, message: str) -> EmuResponse:
    return EmuResponse(status, {"error": {"code": code, "message": message}})
