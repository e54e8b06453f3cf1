"""Azure Table Storage limits, by the service's own formulas (pure).

Entity size (what the service counts against 1 MiB): ``4 + len(PartitionKey)*2 + len(RowKey)*2`` plus, per property,
``8 + len(name)*2 + value``, where a value is: string ``2*UTF-16 units + 4``, Int32 4, Int64/Double/DateTime 8,
Boolean 1, Guid 16, Binary ``len + 4``. A string property holds at most 64 KiB, an entity at most 252 custom
properties; a transaction at most 100 operations in one partition and a 4 MiB request body. Azurite enforces none of
this, so the app sizes its own writes here and the tests check every write against the same functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

MAX_ENTITY_BYTES = 1024 * 1024
MAX_PROPERTY_BYTES = 64 * 1024
MAX_PROPERTIES = 252
MAX_BATCH_OPS = 100
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: Per-operation multipart framing of a transaction body (boundaries, request line, headers), generously.
BATCH_OP_OVERHEAD = 1024
SYSTEM_PROPERTIES = frozenset({"PartitionKey", "RowKey", "Timestamp"})

_FIXED = {"Edm.Int32": 4, "Edm.Int64": 8, "Edm.Double": 8, "Edm.DateTime": 8, "Edm.Boolean": 1, "Edm.Guid": 16}

T = TypeVar("T")


class TableLimitError(ValueError):
    """A write the service would refuse (``code``: the service's error code, e.g. ``EntityTooLarge``)."""

    def __init__(self, message: str, code: str = "EntityTooLarge") -> None:
        super().__init__(message)
        self.code = code


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (what the service stores: a character outside the BMP counts two)."""
    return len(text.encode("utf-16-le")) // 2


def string_bytes(text: str) -> int:
    """Size of a string value: 2 bytes per UTF-16 unit + 4."""
    return utf16_len(text) * 2 + 4


def value_bytes(value: Any, edm_type: str | None = None) -> int:
    """Size of one property value; ``edm_type`` (``Edm.Int64`` ...) overrides the Python type."""
    if edm_type == "Edm.Binary" or isinstance(value, bytes | bytearray):
        return len(value) + 4 if isinstance(value, bytes | bytearray) else len(str(value)) * 3 // 4 + 4
    if edm_type in _FIXED:
        return _FIXED[edm_type]
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 4 if -(2 ** 31) <= value < 2 ** 31 else 8
    if isinstance(value, float | datetime):
        return 8
    if isinstance(value, UUID):
        return 16
    return string_bytes("" if value is None else str(value))


def property_bytes(name: str, value: Any, edm_type: str | None = None) -> int:
    """Size of one property: 8 + name + value."""
    return 8 + utf16_len(name) * 2 + value_bytes(value, edm_type)


def entity_size(entity: Mapping[str, Any], edm_types: Mapping[str, str] | None = None) -> int:
    """The service's size of an entity (keys included; ``Timestamp`` and OData annotations are not properties)."""
    types = edm_types or {}
    size = 4 + utf16_len(str(entity.get("PartitionKey", ""))) * 2 + utf16_len(str(entity.get("RowKey", ""))) * 2
    for name, value in entity.items():
        if name in SYSTEM_PROPERTIES or "@" in name or value is None:
            continue
        size += property_bytes(name, value, types.get(name))
    return size


def check_entity(entity: Mapping[str, Any], edm_types: Mapping[str, str] | None = None) -> int:
    """The entity's size; raises :class:`TableLimitError` naming the limit it breaks, as the service would."""
    types = edm_types or {}
    where = f"entity {entity.get('PartitionKey')!r}/{entity.get('RowKey')!r}"
    custom = [n for n, v in entity.items() if n not in SYSTEM_PROPERTIES and "@" not in n and v is not None]
    if len(custom) > MAX_PROPERTIES:
        raise TableLimitError(f"{where} has {len(custom)} properties; at most {MAX_PROPERTIES}", "TooManyProperties")
    for name in custom:
        value = entity[name]
        if types.get(name, "Edm.String") == "Edm.String" and isinstance(value, str) \
                and string_bytes(value) - 4 > MAX_PROPERTY_BYTES:
            raise TableLimitError(f"{where}: property {name} holds {string_bytes(value) - 4} bytes; at most "
                                  f"{MAX_PROPERTY_BYTES}", "PropertyValueTooLarge")
    size = entity_size(entity, types)
    if size > MAX_ENTITY_BYTES:
        raise TableLimitError(f"{where} is {size} bytes by the service's formula; at most {MAX_ENTITY_BYTES}")
    return size


def wire_bytes(entity: Mapping[str, Any]) -> int:
    """A generous estimate of one operation's share of a transaction body (JSON as UTF-8 plus framing)."""
    body = json.dumps({k: (v if isinstance(v, str | int | float | bool | type(None)) else str(v))
                       for k, v in entity.items()}, ensure_ascii=False)
    # Every non-string value may carry an "@odata.type" annotation.
    return len(body.encode("utf-8")) + 40 * len(entity) + BATCH_OP_OVERHEAD


def split_batches(groups: Iterable[list[T]], wire: Callable[[T], int]) -> list[list[T]]:
    """Transactions of at most :data:`MAX_BATCH_OPS` operations and :data:`MAX_BATCH_BYTES` of body.

    ``groups`` are operations that belong together (one incident's rows): a group is never split across
    transactions unless it alone breaks a limit, then it is cut in order (callers put the row that makes the others
    reachable last).
    """
    batches: list[list[T]] = []
    current: list[T] = []
    current_bytes = 0
    for group in groups:
        group_bytes = sum(wire(op) for op in group)
        if current and (len(current) + len(group) > MAX_BATCH_OPS or current_bytes + group_bytes > MAX_BATCH_BYTES):
            batches.append(current)
            current, current_bytes = [], 0
        for op in group:
            size = wire(op)
            if current and (len(current) + 1 > MAX_BATCH_OPS or current_bytes + size > MAX_BATCH_BYTES):
                batches.append(current)
                current, current_bytes = [], 0
            current.append(op)
            current_bytes += size
    if current:
        batches.append(current)
    return batches
