"""Test-only guard: Table Storage's limits on every write the SDK sends, because Azurite enforces none of them.

Installed for the whole suite by ``conftest.py`` (autouse): it wraps azure-core's requests transport, measures each
entity and each ``$batch`` with the service's formulas (:mod:`sync.table_limits`) and answers as the service would
(400 ``EntityTooLarge``/``PropertyValueTooLarge``/``TooManyProperties``, 400 ``InvalidInput`` for more than 100
operations, 413 ``RequestBodyTooLarge`` over 4 MiB) without forwarding the request. Every refusal is also recorded
in :attr:`TableGuard.violations`, which the fixture asserts empty at the end of each test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import requests
from azure.core.pipeline.transport import RequestsTransport, RequestsTransportResponse

from sync.table_limits import MAX_BATCH_BYTES, MAX_BATCH_OPS, TableLimitError, check_entity

_KEYS = re.compile(r"\(PartitionKey='(?P<pk>(?:[^']|'')*)',RowKey='(?P<rk>(?:[^']|'')*)'\)")
_REQUEST_LINE = re.compile(r"^(POST|PUT|PATCH|MERGE|DELETE|GET) (\S+) HTTP/1\.1\r?$", re.MULTILINE)


def _entity(body: str, url: str) -> dict[str, Any] | None:
    """The entity a JSON request body carries (keys from the URL when the body has none)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    match = _KEYS.search(unquote(url))
    if match:
        data.setdefault("PartitionKey", match["pk"].replace("''", "'"))
        data.setdefault("RowKey", match["rk"].replace("''", "'"))
    return data


def check_write(method: str, url: str, body: bytes) -> tuple[int, str, str] | None:
    """(status, code, message) the service would answer for this Table write, or None when it is within limits."""
    if method.upper() not in ("POST", "PUT", "PATCH", "MERGE") or not body:
        return None
    entities: list[dict[str, Any] | None]
    if url.split("?", 1)[0].endswith("/$batch"):
        if len(body) > MAX_BATCH_BYTES:
            return 413, "RequestBodyTooLarge", f"the transaction body is {len(body)} bytes; at most {MAX_BATCH_BYTES}"
        text = body.decode("utf-8")
        ops = _REQUEST_LINE.findall(text)
        if len(ops) > MAX_BATCH_OPS:
            return 400, "InvalidInput", f"the transaction has {len(ops)} operations; at most {MAX_BATCH_OPS}"
        entities = []
        for part in re.split(r"--changeset_[^\r\n]*", text):
            line = _REQUEST_LINE.search(part)
            if line and "\r\n\r\n" in part[line.end():]:
                entities.append(_entity(part[line.end():].split("\r\n\r\n", 1)[1].strip(), line.group(2)))
    else:
        entities = [_entity(body.decode("utf-8", "replace"), url)]
    for entity in entities:
        if entity is None:
            continue
        types = {k.split("@", 1)[0]: str(v) for k, v in entity.items() if k.endswith("@odata.type")}
        try:
            check_entity(entity, types)
        except TableLimitError as exc:
            return 400, exc.code, str(exc)
    return None


class TableGuard:
    """Wraps ``RequestsTransport.send``; only requests with Table service headers are checked."""

    def __init__(self) -> None:
        self.violations: list[str] = []
        self.enabled = True

    def wrap(self, send: Callable[..., Any]) -> Callable[..., Any]:
        guard = self

        def guarded_send(transport: RequestsTransport, request: Any, **kwargs: Any) -> Any:
            if guard.enabled and "DataServiceVersion" in request.headers:
                body = request.data if isinstance(request.data, bytes) else (
                    request.data.encode("utf-8") if isinstance(request.data, str) else b"")
                refusal = check_write(request.method, request.url, body)
                if refusal is not None:
                    status, code, message = refusal
                    guard.violations.append(f"{code}: {message}")
                    return _response(request, status, code, message)
            return send(transport, request, **kwargs)

        return guarded_send


def _response(request: Any, status: int, code: str, message: str) -> RequestsTransportResponse:
    raw = requests.Response()
    raw.status_code = status
    raw.reason = "Request Entity Too Large" if status == 413 else "Bad Request"
    raw.headers["Content-Type"] = "application/json;odata=minimalmetadata"
    raw.headers["x-ms-error-code"] = code
    raw._content = json.dumps({"odata.error": {"code": code, "message": {"lang": "en-US", "value": message}}}
                              ).encode()
    raw.url = request.url
    return RequestsTransportResponse(request, raw)
