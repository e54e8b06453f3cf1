"""LogsSink: rows -> Log Analytics through the Logs Ingestion API (azure-monitor-ingestion).

Why we chunk and compress ourselves: the SDK's chunker sums ``len(json.dumps(record))`` per record and ignores the
array's brackets and ``", "`` separators, so a chunk it builds can serialise past the service's 1 MB call limit (413),
and it serialises every record twice. Here each row is serialised once (:func:`sync.jsonio.dumps` while it is built:
compact UTF-8, never longer than the SDK's ``json.dumps``); that one text gives the row's size, the chunks (whose
*exact* body is ``[`` + texts joined by ``", "`` + ``]``, kept under ``max_chunk_bytes``, default 900,000: a margin
under both readings of "1 MB", 1,000,000 and 1,048,576), and the body, gzipped once and handed to the SDK as a stream,
which it sends as it is (one request per chunk). The service counts the limit on the uncompressed body too, so a denser
gzip buys no fewer calls: level 1 (:data:`GZIP_LEVEL`) costs half the CPU of the SDK's level 6 for about 1.4x the bytes
on the wire. A body whose gzip would still exceed :data:`MAX_REQUEST_BYTES` (incompressible text near the cap) is split
before sending.

What the caller learns: :class:`UploadResult` lists exactly the rows that were *not* stored (``failed_rows``) with
the reasons, so the engine never advances a cursor past them. Failures are the exceptions the SDK raises for a
stream body (HTTP errors after azure-core's retries, network errors, timeouts).

Failure policy:
- 400 (schema) and 413 (size) concern the chunk's content: the chunk is split in halves and re-sent down to single
  rows, so one poisoned row does not cost its neighbours; the other chunks are still sent.
- Unless *every* row of a chunk (two rows or more) is refused on its own: that is not bad content but a DCR that no
  longer accepts this table (its stream declaration drifted from ``infra/tables``, a broken transform). It is
  reported as an outage (:attr:`UploadResult.refused_all`): no row of the upload counts as rejected content, the
  rest is not sent, and the caller keeps its cursor instead of dead-lettering every incident.
- Anything else (401/403 permissions, 404 wrong DCR/stream, 429/5xx after retries, network, timeouts) is about the
  service, not the rows: the remaining chunks are not sent (and are reported failed), which keeps an outage from
  costing ``chunks x retry time``.

Bounded time: the client is built with modest azure-core retries (``retry_total=3``, exponential backoff capped at
16 s, 10 s connect / 60 s read timeouts; override any of them through ``client_kwargs``) and a retry policy that
never sleeps longer than ``max_retry_wait`` seconds (a longer ``Retry-After`` ends the call instead) nor past the
call's own time limit. Each call gets ``timeout = min(call_timeout, deadline.remaining())`` (azure-core's overall
retry timeout) and no new call starts when the optional :class:`~sync.budget.Deadline` has less than
``min_call_seconds`` left. So an upload ends roughly by the deadline (at most one in-flight read past it).

Retries re-send a POST, which can duplicate rows when the first attempt was stored but its answer lost; rows carry a
deterministic ``RecordId`` for de-duplication in KQL. Nothing here logs tokens, headers or credentials.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from azure.core.credentials import TokenCredential
from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import RetryPolicy
from azure.monitor.ingestion import LogsIngestionClient, LogsUploadError

from .budget import Deadline
from .rows import STREAMS, Row, load_columns

log = logging.getLogger(__name__)

#: A row to send: (its index in the caller's list, the row, its JSON text as sent).
_Item = tuple[int, dict[str, Any], bytes]
#: Rows sent in one call, and the index of the chunk they were first built in.
_Chunk = tuple[list[_Item], int]

#: The service's per-call limit read as decimal MB (the SDK's chunker uses 1 MiB; we stay under the smaller).
MAX_REQUEST_BYTES = 1_000_000
_MIN_CHUNK_BYTES = 1_024
#: zlib level of the request bodies (see the module docstring for why not the SDK's 6).
GZIP_LEVEL = 1
#: Statuses caused by a chunk's content: bisect the chunk to isolate the bad rows.
_CONTENT_STATUSES = frozenset({400, 413})
_CLIENT_DEFAULTS: dict[str, Any] = {
    "retry_total": 3,
    "retry_backoff_factor": 1.0,
    "retry_backoff_max": 16,
    "connection_timeout": 10,
    "read_timeout": 60,
}
_BEARER = re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+")
_MAX_ERROR_CHARS = 1_000


class IngestionClient(Protocol):
    """What the sink needs of :class:`~azure.monitor.ingestion.LogsIngestionClient` (stubs implement this)."""

    def upload(self, rule_id: str, stream_name: str, logs: Any, *,
               on_error: Callable[[LogsUploadError], None] | None = None, **kwargs: Any) -> None: ...


@dataclass
class UploadResult:
    """Outcome of :meth:`LogsSink.upload`; ``ok`` when no row failed.

    ``rows``/``bytes``: rows the service accepted and the uncompressed JSON bytes of their requests.
    ``requests``: upload calls made (one POST each, not counting azure-core's retries of that POST).
    ``attempts``/``throttled``: HTTP responses seen including retries, and how many were 429 (real client only).
    ``failed_rows``: the rows NOT stored, in input order; ``errors``: one message per failure, no secrets.
    """

    rows: int = 0
    bytes: int = 0
    requests: int = 0
    failed_rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    attempts: int = 0
    throttled: int = 0
    #: Failed rows the service (400/413) or the pre-send checks rejected as bad content: resending cannot help.
    rejected_rows: list[dict[str, Any]] = field(default_factory=list)
    #: True when rows were left unsent because the run's time budget was spent (not a failure of the data).
    budget_spent: bool = False
    #: True when every row of a chunk was refused on its own: the DCR, not the data, is wrong (an outage).
    refused_all: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed_rows

    def merge(self, other: UploadResult) -> UploadResult:
        """Add ``other``'s counts and failures to this result (for several tables in one cycle); returns self."""
        self.rows += other.rows
        self.bytes += other.bytes
        self.requests += other.requests
        self.attempts += other.attempts
        self.throttled += other.throttled
        self.failed_rows.extend(other.failed_rows)
        self.rejected_rows.extend(other.rejected_rows)
        self.budget_spent = self.budget_spent or other.budget_spent
        self.refused_all = self.refused_all or other.refused_all
        self.errors.extend(other.errors)
        return self


class BoundedRetryPolicy(RetryPolicy[Any, Any]):
    """azure-core's RetryPolicy that never waits past the call's time limit.

    Stock azure-core sleeps any ``Retry-After`` in full and does not retry a POST after a connection error. This
    policy refuses a retry whose wait exceeds ``max_retry_wait`` or would end past the call's ``timeout``, and
    retries POST like the idempotent methods (duplicates are harmless: rows carry a RecordId).
    """

    def __init__(self, *, max_retry_wait: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_retry_wait = max_retry_wait
        self._method_whitelist = frozenset(self._method_whitelist | {"POST"})

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings = super().configure_retries(options)
        settings["deadline"] = time.monotonic() + float(settings["timeout"])
        return settings

    def increment(self, settings: dict[str, Any], response: Any = None, error: Exception | None = None) -> bool:
        if not super().increment(settings, response=response, error=error):
            return False
        wait: float | None = None
        if isinstance(response, PipelineResponse):
            wait = self.get_retry_after(response)
        if wait is None:
            wait = self.get_backoff_time(settings)
        return wait <= self.max_retry_wait and time.monotonic() + wait < settings["deadline"]


def _describe(error: BaseException) -> str:
    status = getattr(error, "status_code", None)
    text = f"{type(error).__name__}" + (f" (HTTP {status})" if status else "") + f": {error}"
    text = _BEARER.sub("Bearer [redacted]", text)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "…"


def _status_of(error: BaseException) -> int | None:
    status = getattr(error, "status_code", None)
    return status if isinstance(status, int) else None


def chunk_rows(sizes: Sequence[int], max_chunk_bytes: int) -> list[tuple[int, int]]:
    """Greedy in-order chunking by exact serialised size: ``(start, end)`` index ranges.

    ``sizes[i]`` is ``len(json.dumps(row_i))``; a chunk of n rows serialises to ``2 + sum(sizes) + 2 * (n - 1)``
    bytes (``[``, ``]`` and the ``", "`` separators of ``json.dumps``). Every size must be at most
    ``max_chunk_bytes - 2`` (callers filter larger rows out first).
    """
    ranges: list[tuple[int, int]] = []
    start, total = 0, 2
    for index, size in enumerate(sizes):
        if size + 2 > max_chunk_bytes:
            raise ValueError(f"row {index} ({size} bytes) cannot fit a {max_chunk_bytes}-byte chunk")
        added = size + (2 if index > start else 0)
        if index > start and total + added > max_chunk_bytes:
            ranges.append((start, index))
            start, total, added = index, 2, size
        total += added
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


class LogsSink:
    """Uploads rows of the tables in :data:`sync.rows.STREAMS` to one DCR."""

    def __init__(self, endpoint: str, dcr_immutable_id: str, credential: TokenCredential, *,
                 scope: str = "https://monitor.azure.com/.default", max_chunk_bytes: int = 900_000,
                 client: IngestionClient | LogsIngestionClient | None = None, call_timeout: float = 120.0,
                 max_retry_wait: float = 30.0, min_call_seconds: float = 5.0, **client_kwargs: Any) -> None:
        """``endpoint``: DCE or DCR logs-ingestion URL; ``scope``: token scope (sovereign clouds differ);
        ``max_chunk_bytes``: cap on one request's uncompressed JSON body, 1,024..1,000,000; ``client``: a
        ready client (tests); ``call_timeout``: seconds one upload call may take including retries;
        ``max_retry_wait``: longest single retry wait accepted; ``client_kwargs``: azure-core options
        (``retry_total``, ``connection_timeout``, ``read_timeout``, ``transport``, ``logging_enable``, ...)."""
        if not _MIN_CHUNK_BYTES <= max_chunk_bytes <= MAX_REQUEST_BYTES:
            raise ValueError(f"max_chunk_bytes must be between {_MIN_CHUNK_BYTES} and {MAX_REQUEST_BYTES}")
        if not dcr_immutable_id:
            raise ValueError("dcr_immutable_id is required")
        self.dcr_immutable_id = dcr_immutable_id
        self.max_chunk_bytes = max_chunk_bytes
        self.call_timeout = call_timeout
        self.min_call_seconds = min_call_seconds
        self._read_timeout = float(client_kwargs.get("read_timeout", _CLIENT_DEFAULTS["read_timeout"]))
        if client is None:
            options = {**_CLIENT_DEFAULTS, **client_kwargs}
            options.setdefault("retry_policy", BoundedRetryPolicy(max_retry_wait=max_retry_wait, **options))
            client = LogsIngestionClient(endpoint, credential, credential_scopes=[scope], **options)
        self._client: IngestionClient | LogsIngestionClient = client

    def close(self) -> None:
        """Close the underlying client's transport (when it has one)."""
        close = getattr(self._client, "close", None)
        if callable(close):
            close()

    def upload(self, table: str, rows: list[dict[str, Any]], *, deadline: Deadline | None = None) -> UploadResult:
        """Upload ``rows`` to ``table``'s stream; never raises for service or row problems.

        Rows whose keys are not columns of ``table``, that are not JSON-serialisable (NaN included) or that alone
        exceed a chunk are reported failed without being sent. ``deadline`` bounds the whole upload.
        """
        stream = STREAMS.get(table)
        if stream is None:
            raise ValueError(f"unknown table {table!r}; expected one of {sorted(STREAMS)}")
        columns = load_columns(table)
        result = UploadResult()
        failed: list[_Item] = []  # reported in input order
        sendable: list[_Item] = []
        for index, row in enumerate(rows):
            problem, text = self._check_row(row, columns)
            if problem is not None:
                failed.append((index, row, b""))
                result.rejected_rows.append(row)
                result.errors.append(f"{table}: row {index} not sent: {problem}")
                continue
            sendable.append((index, row, text))

        pending: deque[_Chunk] = deque()
        # Per chunk as first built: [rows, rows refused one by one]; all refused means the DCR is wrong.
        origins: list[list[int]] = []
        for start, end in chunk_rows([len(text) for _, _, text in sendable], self.max_chunk_bytes):
            pending.append((sendable[start:end], len(origins)))
            origins.append([end - start, 0])
        while pending:
            chunk, origin = pending.popleft()
            if deadline is not None and deadline.expired(deadline.reserve(self.min_call_seconds, 0.2)):
                pending.appendleft((chunk, origin))
                result.budget_spent = True
                self._give_up(result, table, failed, pending, "not sent: the run's time budget is spent")
                break
            body = b"[" + b", ".join(text for _, _, text in chunk) + b"]"
            packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            packed = packer.compress(body) + packer.flush()
            if len(packed) > MAX_REQUEST_BYTES and len(chunk) > 1:  # incompressible near the cap: halve unsent
                self._halve(pending, chunk, origin)
                continue
            error = self._send(stream, packed, result, deadline)
            if error is None:
                result.rows += len(chunk)
                result.bytes += len(body)
                continue
            status = _status_of(error)
            if status in _CONTENT_STATUSES and len(chunk) > 1:
                log.info("%s: HTTP %s for a chunk of %d rows; re-sending it in halves", table, status, len(chunk),
                         extra={"action": "logs_upload", "outcome": "split"})
                self._halve(pending, chunk, origin)
                continue
            message = f"{table}: {len(chunk)} rows not stored: {_describe(error)}"
            failed.extend(chunk)
            if status in _CONTENT_STATUSES:
                origins[origin][1] += len(chunk)
                size, refused = origins[origin]
                if refused < size or size < 2:
                    log.warning("%s", message, extra={"action": "logs_upload", "outcome": "failed"})
                    result.errors.append(message)
                    result.rejected_rows.extend(row for _, row, _ in chunk)
                    continue
                # Every row refused alone: not the rows' fault. Nothing of this upload counts as bad content.
                result.refused_all = True
                result.rejected_rows.clear()
                message = (f"{table}: the data collection rule refused each of the {size} rows of a chunk one by "
                           f"one: it no longer accepts this table's rows (its stream declaration drifted from "
                           f"infra/tables/{table}.json, or a broken transform); redeploy it. An outage, not bad "
                           f"rows: nothing is dead-lettered. Last answer: {_describe(error)}")
                result.errors.insert(0, message)  # the cause first: callers quote the start of the errors
            else:
                result.errors.append(message)
            log.warning("%s", message, extra={"action": "logs_upload", "outcome": "failed"})
            self._give_up(result, table, failed, pending, f"not sent after an earlier failure ({_describe(error)})")
            break
        failed.sort(key=lambda item: item[0])
        result.failed_rows = [row for _, row, _ in failed]
        return result

    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    def _halve(pending: deque[_Chunk], chunk: list[_Item], origin: int) -> None:
        """Queue both halves of ``chunk`` at the front, first half first (their texts are reused as they are)."""
        middle = len(chunk) // 2
        pending.appendleft((chunk[middle:], origin))
        pending.appendleft((chunk[:middle], origin))

    def _check_row(self, row: Any, columns: dict[str, str]) -> tuple[str | None, bytes]:
        """Why ``row`` cannot be sent (None when it can) and its one serialisation, as sent."""
        if type(row) is Row and row.wire is not None:
            text = row.wire  # built from the table's schema and serialised once by sync.rows
            if len(text) + 2 > self.max_chunk_bytes:
                return f"{len(text)} bytes serialised, over the {self.max_chunk_bytes}-byte request limit", b""
            return None, text
        if not isinstance(row, dict):
            return f"a row must be a dict, not {type(row).__name__}", b""
        unknown = [key for key in row if key not in columns]
        if unknown:
            return f"unknown columns {sorted(map(str, unknown))[:5]}", b""
        try:
            # allow_nan=False: NaN/Infinity would make the whole request invalid JSON. Otherwise the SDK's own
            # spelling (ASCII-escaped, so one character is one byte).
            text = json.dumps(row, allow_nan=False).encode("ascii")
        except (TypeError, ValueError) as exc:
            return f"not JSON-serialisable ({exc})", b""
        if len(text) + 2 > self.max_chunk_bytes:
            return f"{len(text)} bytes serialised, over the {self.max_chunk_bytes}-byte request limit", b""
        return None, text

    def _send(self, stream: str, packed: bytes, result: UploadResult, deadline: Deadline | None
              ) -> BaseException | None:
        """One upload call for one gzipped chunk; the error if the service did not store it."""

        def on_response(response: PipelineResponse[Any, Any]) -> None:
            # Called for every HTTP response of the call, azure-core's retries included.
            result.attempts += 1
            if response.http_response.status_code == 429:
                result.throttled += 1

        timeout = self.call_timeout if deadline is None else min(self.call_timeout, deadline.remaining())
        result.requests += 1
        try:
            # A stream is sent as it is, in one request (the SDK sees the gzip magic and sets Content-Encoding);
            # its failures raise. ``timeout`` is azure-core's overall limit for the call including retries (which
            # rewind the stream); ``read_timeout`` bounds each attempt.
            self._client.upload(self.dcr_immutable_id, stream, io.BytesIO(packed), timeout=timeout,
                                read_timeout=min(self._read_timeout, max(timeout, 1.0)),
                                raw_response_hook=on_response)
        except Exception as exc:  # HTTP errors, network errors, timeouts; a stub may raise anything
            return exc
        return None

    @staticmethod
    def _give_up(result: UploadResult, table: str, failed: list[_Item], pending: deque[_Chunk], reason: str) -> None:
        skipped = [item for rest, _ in pending for item in rest]
        pending.clear()
        if skipped:
            failed.extend(skipped)
            result.errors.append(f"{table}: {len(skipped)} rows {reason}")
            log.warning("%s: %d rows %s", table, len(skipped), reason,
                        extra={"action": "logs_upload", "outcome": "skipped"})
