"""Table Storage transactions of upserts or inserts (``$batch``), written directly.

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
from typing import Any
from urllib.parse import quote

from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest
from azure.data.tables import TableClient

_INT32 = (-(2**31), 2**31 - 1)
_PART_STATUS = re.compile(rb"^HTTP/1\.1 (\d{3})", re.MULTILINE)
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
    batch, changeset = f"batch_{uuid.uuid4()}", f"changeset_{uuid.uuid4()}"
    parts = [f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"]
    for index, (entity, text) in enumerate(entities):
        target = (f"POST {table_url} HTTP/1.1\r\nPrefer: return-no-content\r\n" if insert else
                  f"PUT {table_url}(PartitionKey='{_key(entity.get('PartitionKey'))}',"
                  f"RowKey='{_key(entity.get('RowKey'))}') HTTP/1.1\r\n")
        parts.append(
            f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
            f"Content-ID: {index}\r\n\r\n{target}"
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
    if not entities:
        return
    base = f"{table.scheme}://{table._primary_hostname}"  # the host (and account path) the SDK uses
    version = str(table.api_version)
    boundary, body = upsert_body(f"{base}/{quote(table.table_name)}", version, entities, insert=insert)
    request = HttpRequest("POST", f"{base}/$batch", headers={
        "x-ms-version": version, "DataServiceVersion": "3.0", "MaxDataServiceVersion": "3.0;NetFx",
        "Content-Type": f"multipart/mixed; boundary={boundary}", "Accept": "application/json"}, content=body)
    # stream=True: the pipeline would otherwise try to decode a multipart answer as JSON (as the SDK does).
    response = table._client.send_request(request, stream=True)  # its pipeline: auth, retries
    problem = check_answer(response.status_code, response.read(), len(entities))
    if problem is not None:
        raise HttpResponseError(message=f"Table transaction on {table.table_name} refused: {problem}",
                                response=response)


__all__ = ["check_answer", "entity_json", "operation_overhead", "submit_upserts", "upsert_body"]
