"""LogsSink: rows -> Log Analytics through the Logs Ingestion API (azure-monitor-ingestion).

Why we chunk ourselves: the SDK's chunker sums ``len(json.dumps(record))`` per record and ignores the array's
brackets and ``", "`` separators, so a chunk it builds can serialise past the service's 1 MB call limit (413). We
build chunks whose *exact* serialised size (``json.dumps(chunk)``, what the SDK sends before gzip) stays under
``max_chunk_bytes`` (default 900,000: a margin under both readings of "1 MB", 1,000,000 and 1,048,576) and hand the
SDK one chunk per call, which it then sends as one request (its own split never triggers below 1 MiB).

What the caller learns: :class:`UploadResult` lists exactly the rows that were *not* stored (``failed_rows``) with
the reasons, so the engine never advances a cursor past them. Failures come from the SDK's ``on_error`` callback
(``LogsUploadError.failed_logs`` / ``.error``) or from an exception escaping the call.

Failure policy:
- 400 (schema) and 413 (size) concern the chunk's content: the chunk is split in halves and re-sent down to single
  rows, so one poisoned row does not cost its neighbours; the other chunks are still sent.
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

import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from azure.core.credentials import TokenCredential
from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import RetryPolicy
from azure.monitor.ingestion import LogsIngestionClient, LogsUploadError

from .budget import Deadline
from .rows import STREAMS, load_columns

log = logging.getLogger(__name__)

#: The service's per-call limit read as decimal MB (the SDK's chunker uses 1 MiB; we stay under the smaller).
MAX_REQUEST_BYTES = 1_000_000
_MIN_CHUNK_BYTES = 1_024
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
        failed: list[tuple[int, dict[str, Any]]] = []  # (input index, row): reported in input order
        sendable: list[tuple[int, dict[str, Any]]] = []
        sizes: list[int] = []
        for index, row in enumerate(rows):
            problem, size = self._check_row(row, columns)
            if problem is not None:
                failed.append((index, row))
                result.rejected_rows.append(row)
                result.errors.append(f"{table}: row {index} not sent: {problem}")
                continue
            sendable.append((index, row))
            sizes.append(size)

        pending: deque[tuple[list[tuple[int, dict[str, Any]]], int]] = deque()
        for start, end in chunk_rows(sizes, self.max_chunk_bytes):
            pending.append((sendable[start:end], 2 + sum(sizes[start:end]) + 2 * (end - start - 1)))
        while pending:
            chunk, chunk_bytes = pending.popleft()
            if deadline is not None and deadline.expired(deadline.reserve(self.min_call_seconds, 0.2)):
                pending.appendleft((chunk, chunk_bytes))
                result.budget_spent = True
                self._give_up(result, table, failed, pending, "not sent: the run's time budget is spent")
                break
            error = self._send(stream, [row for _, row in chunk], result, deadline)
            if error is None:
                result.rows += len(chunk)
                result.bytes += chunk_bytes
                continue
            status = _status_of(error)
            if status in _CONTENT_STATUSES and len(chunk) > 1:
                log.info("%s: HTTP %s for a chunk of %d rows; re-sending it in halves", table, status, len(chunk),
                         extra={"action": "logs_upload", "outcome": "split"})
                middle = len(chunk) // 2
                for half in (chunk[middle:], chunk[:middle]):  # appendleft reversed: the first half goes first
                    pending.appendleft((half, len(json.dumps([row for _, row in half]))))
                continue
            message = f"{table}: {len(chunk)} rows not stored: {_describe(error)}"
            log.warning("%s", message, extra={"action": "logs_upload", "outcome": "failed"})
            failed.extend(chunk)
            result.errors.append(message)
            if status in _CONTENT_STATUSES:
                result.rejected_rows.extend(row for _, row in chunk)
            else:
                self._give_up(result, table, failed, pending, f"not sent after an earlier failure ({_describe(error)})")
                break
        failed.sort(key=lambda item: item[0])
        result.failed_rows = [row for _, row in failed]
        return result

    # ----------------------------------------------------------------------------------------------------------

    def _check_row(self, row: Any, columns: dict[str, str]) -> tuple[str | None, int]:
        if not isinstance(row, dict):
            return f"a row must be a dict, not {type(row).__name__}", 0
        unknown = [key for key in row if key not in columns]
        if unknown:
            return f"unknown columns {sorted(map(str, unknown))[:5]}", 0
        try:
            # allow_nan=False: NaN/Infinity would make the whole request invalid JSON. Same text as the SDK's
            # json.dumps otherwise, so the size is exact.
            size = len(json.dumps(row, allow_nan=False))
        except (TypeError, ValueError) as exc:
            return f"not JSON-serialisable ({exc})", 0
        if size + 2 > self.max_chunk_bytes:
            return f"{size} bytes serialised, over the {self.max_chunk_bytes}-byte request limit", 0
        return None, size

    def _send(self, stream: str, chunk: list[MutableMapping[str, Any]], result: UploadResult,
              deadline: Deadline | None) -> BaseException | None:
        """One upload call for one chunk; the error if the service did not store it."""
        errors: list[BaseException] = []

        def on_error(failure: LogsUploadError) -> None:
            errors.append(failure.error)

        def on_response(response: PipelineResponse[Any, Any]) -> None:
            # Called for every HTTP response of the call, azure-core's retries included.
            result.attempts += 1
            if response.http_response.status_code == 429:
                result.throttled += 1

        timeout = self.call_timeout if deadline is None else min(self.call_timeout, deadline.remaining())
        result.requests += 1
        try:
            # One chunk per call, under 1 MiB of records: the SDK sends it as exactly one request. ``timeout`` is
            # azure-core's overall limit for the call including retries; ``read_timeout`` bounds each attempt.
            self._client.upload(self.dcr_immutable_id, stream, chunk, on_error=on_error, timeout=timeout,
                                read_timeout=min(self._read_timeout, max(timeout, 1.0)),
                                raw_response_hook=on_response)
        except Exception as exc:  # the SDK raises outside on_error for argument errors; a stub may raise anything
            return exc
        return errors[0] if errors else None

    @staticmethod
    def _give_up(result: UploadResult, table: str, failed: list[tuple[int, dict[str, Any]]],
                 pending: deque[tuple[list[tuple[int, dict[str, Any]]], int]], reason: str) -> None:
        skipped = [item for rest, _ in pending for item in rest]
        pending.clear()
        if skipped:
            failed.extend(skipped)
            result.errors.append(f"{table}: {len(skipped)} rows {reason}")
            log.warning("%s: %d rows %s", table, len(skipped), reason,
                        extra={"action": "logs_upload", "outcome": "skipped"})
