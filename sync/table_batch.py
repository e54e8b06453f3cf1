"""Table Storage transactions (``$batch``) of upserts, inserts, and If-Match replaces and deletes, written directly.

azure-data-tables builds a transaction's ``multipart/mixed`` body with the email package and parses the answer
the same way, starting thread pools for both: about 15 ms of CPU per 50 entities, as much as the rest of a page's
pull. A changeset of upserts (``PUT`` = insert or replace) is a fixed template per operation, so this module writes
that body itself, sends it through the :class:`~azure.data.tables.TableClient`'s own pipeline (its
authentication, retries, headers and transport) and reads the status line of each part of the answer.

Entity values are strings, booleans and integers (the state store writes nothing else): strings and booleans
need no type annotation, integers outside Int32 are sent as ``Edm.Int64``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.data.tables import TableClient

_INT32 = (-(2**31), 2**31 - 1)
_METHODS = {"upsert": "PUT", "insert": "POST", "replace": "PUT", "delete": "DELETE"}
_PART_STATUS = re.compile(rb"^HTTP/1\.1 (\d{3})", re.MULTILINE)
_ETAG = re.compile(rb"^ETag:\s*(.+?)\r?$", re.MULTILINE | re.IGNORECASE)
_ERROR_CODE = re.compile(rb'"code"\s*:\s*"([^"]*)"')
_ERROR_TEXT = re.compile(rb'"value"\s*:\s*"((?:[^"\\]|\\.)*)"')


def entity_json(entity: Mapping[str, Any]) -> str:
    """The entity's JSON body as the service reads it (ASCII; ``Edm.Int64`` annotated). Raises ``TypeError`` for a
    value that is not a string, boolean or integer, naming the property."""
    body: dict[str, Any] = {}
    for name, value in entity.items():
        kind = type(value)
        if kind is str or kind is bool or (kind is int and _INT32[0] <= value <= _INT32[1]):
            body[name] = value
        elif kind is int:
            body[name] = str(value)
            body[f"{name}@odata.type"] = "Edm.Int64"
        else:
            raise TypeError(f"entity property {name!r} is a {kind.__name__}; only str, bool and int are written here")
    return json.dumps(body)


def _key(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"PartitionKey and RowKey must be strings, not {type(value).__name__}")
    return quote(value.replace("'", "''"), safe="")


def operation_overhead(table_url: str, entity: Mapping[str, Any]) -> int:
    """Bytes one upsert adds to a transaction body besides its JSON (boundary, request line, headers)."""
    return 400 + len(table_url) + len(_key(entity.get("PartitionKey"))) + len(_key(entity.get("RowKey")))


def upsert_body(table_url: str, version: str, entities: Sequence[tuple[Mapping[str, Any], str]], *,
                insert: bool = False) -> tuple[str, bytes]:
    """(batch boundary, body) of one transaction replacing-or-inserting ``entities`` (each with its JSON text);
    ``insert``: creating them instead (the transaction then fails if any of them exists)."""
    kind = "insert" if insert else "upsert"
    return batch_body(table_url, version, [Operation(kind, entity, text) for entity, text in entities])


@dataclass(frozen=True)
class Operation:
    """One operation of a transaction. ``kind``: ``upsert`` (insert or replace), ``insert`` (refused if the entity
    exists), ``replace`` (refused unless the entity is at ``etag``) or ``delete`` (likewise; ``text`` unused)."""

    kind: str
    entity: Mapping[str, Any]
    text: str = ""
    etag: str | None = None


def batch_body(table_url: str, version: str, operations: Sequence[Operation]) -> tuple[str, bytes]:
    """(batch boundary, body) of one transaction (one changeset) of ``operations``."""
    batch, changeset = f"batch_{uuid.uuid4()}", f"changeset_{uuid.uuid4()}"
    parts = [f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"]
    for index, op in enumerate(operations):
        if op.kind not in _METHODS:
            raise ValueError(f"unknown transaction operation {op.kind!r}; one of {sorted(_METHODS)}")
        if op.kind in ("replace", "delete") and not op.etag:
            raise ValueError(f"a {op.kind} operation needs the ETag the entity was read at")
        address = table_url if op.kind == "insert" else (
            f"{table_url}(PartitionKey='{_key(op.entity.get('PartitionKey'))}',"
            f"RowKey='{_key(op.entity.get('RowKey'))}')")
        headers = f"{_METHODS[op.kind]} {address} HTTP/1.1\r\n"
        if op.kind == "insert":
            headers += "Prefer: return-no-content\r\n"
        if op.etag:
            headers += f"If-Match: {op.etag}\r\n"
        text = "" if op.kind == "delete" else op.text
        parts.append(
            f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
            f"Content-ID: {index}\r\n\r\n{headers}"
            f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\nx-ms-version: {version}\r\n"
            f"DataServiceVersion: 3.0\r\nAccept: application/json\r\n\r\n{text}\r\n")
    parts.append(f"--{changeset}--\r\n\r\n--{batch}--\r\n")
    return batch, "".join(parts).encode("ascii")


def check_answer(status: int, body: bytes, operations: int) -> str | None:
    """Why the service refused the transaction (None when every operation succeeded): ``status`` and ``body`` of
    the ``$batch`` answer. A refused changeset answers 202 with one part, the failed operation's."""
    if status != 202:
        return f"HTTP {status}"
    statuses = [int(s) for s in _PART_STATUS.findall(body)]
    failed = [s for s in statuses if not 200 <= s < 300]
    if not failed and len(statuses) == operations:
        return None
    code, text = _ERROR_CODE.search(body), _ERROR_TEXT.search(body)
    detail = ": ".join(m.group(1).decode("utf-8", "replace") for m in (code, text) if m is not None)
    if not failed:
        return f"{len(statuses)} answers for {operations} operations"
    return f"HTTP {failed[0]}" + (f" {detail}" if detail else "")


def submit_upserts(table: TableClient, entities: Sequence[tuple[Mapping[str, Any], str]], *,
                   insert: bool = False) -> None:
    """One transaction upserting (insert or replace) ``entities`` (entity, :func:`entity_json` text) in one
    partition; raises :class:`~azure.core.exceptions.HttpResponseError` when the service refuses any of them (then
    none is written). ``insert``: create them instead, so the transaction is refused if any of them exists. The
    caller keeps the service's limits (100 operations, 4 MiB)."""
    kind = "insert" if insert else "upsert"
    submit(table, [Operation(kind, entity, text) for entity, text in entities])


def submit(table: TableClient, operations: Sequence[Operation]) -> list[str | None]:
    """One transaction of ``operations`` in one partition; returns each operation's new ETag (None for a delete,
    or when the answer names none). Raises :class:`~azure.core.exceptions.HttpResponseError` when the service
    refuses any of them (then none is done): ``status_code`` 412 or 404 when an ``If-Match`` found the entity
    changed or gone, 409 when an insert found it existing. The caller keeps the service's limits."""
    if not operations:
        return []
    base = f"{table.scheme}://{table._primary_hostname}"  # the host (and account path) the SDK uses
    version = str(table.api_version)
    boundary, body = batch_body(f"{base}/{quote(table.table_name)}", version, operations)
    request = HttpRequest("POST", f"{base}/$batch", headers={
        "x-ms-version": version, "DataServiceVersion": "3.0", "MaxDataServiceVersion": "3.0;NetFx",
        "Content-Type": f"multipart/mixed; boundary={boundary}", "Accept": "application/json"}, content=body)
    # stream=True: the pipeline would otherwise try to decode a multipart answer as JSON (as the SDK does).
    response = table._client.send_request(request, stream=True)  # its pipeline: auth, retries
    answer = response.read()
    problem = check_answer(response.status_code, answer, len(operations))
    if problem is not None:
        error = HttpResponseError(message=f"Table transaction on {table.table_name} refused: {problem}",
                                  response=response)
        failed = _PART_STATUS.search(answer) if response.status_code == 202 else None
        if failed is not None:
            error.status_code = int(failed.group(1))  # the refused operation's status, not the envelope's 202
        raise error
    etags = part_etags(answer)
    return [None if op.kind == "delete" else (etags[i] if i < len(etags) else None)
            for i, op in enumerate(operations)]


def part_etags(body: bytes) -> list[str | None]:
    """The ``ETag`` header of each part of a transaction's answer, in order (None where a part has none)."""
    starts = [m.start() for m in _PART_STATUS.finditer(body)]
    out: list[str | None] = []
    for n, start in enumerate(starts):
        part = body[start:starts[n + 1] if n + 1 < len(starts) else len(body)]
        found = _ETAG.search(part)
        out.append(found.group(1).decode("ascii", "replace").strip() if found else None)
    return out


__all__ = ["Operation", "batch_body", "check_answer", "entity_json", "operation_overhead", "part_etags", "submit",
           "submit_upserts", "upsert_body"]
