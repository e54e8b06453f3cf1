"""Pure transforms: Graph incident / alert / evidence JSON -> Log Analytics row dicts.

The columns of each table are defined once, in ``infra/tables/<Table>_CL.json`` (the DCR ``streamDeclarations``
shape). The builders below produce *raw* values per column and one finisher coerces every value to its column's
declared type, so a row's names and types follow the schema files by construction (and a test proves that every
declared column is filled from a realistic object, so schema and code cannot drift apart).

Row conventions
- ``TimeGenerated`` is when the app read that version (``read_at``), not an event time: Log Analytics replaces
  timestamps older than two days, so Graph's own times live in their own ``...DateTime`` columns.
- Null or missing values are *omitted* (the Logs Ingestion API stores an absent column as null; omitting keeps the
  body small, which matters for evidence rows with many empty join-key columns).
- ``datetime`` columns keep Graph's original ISO string (up to 7 fractional digits; extra digits are cut), converted
  to UTC with a ``Z`` suffix. An unparseable time becomes null rather than failing the whole row.
- ``int``/``long`` columns get Python ints in range (never bools); numeric strings are accepted, junk becomes null.
- ``dynamic`` columns get JSON values (non-finite floats become strings, non-string keys become strings, nesting
  deeper than :data:`MAX_DYNAMIC_DEPTH` is replaced by a marker and flagged).
- Size: a string whose UTF-8 form, or a dynamic value whose JSON text, exceeds :data:`FIELD_MAX_BYTES` (a margin
  under the service's 64 KB per-field limit) is cut on a character boundary and ends with :data:`TRUNCATION_MARKER`;
  a cut dynamic value becomes a *string* holding the cut JSON text (never invalid JSON in a dynamic column). The row
  as the SDK serialises it is then kept under :data:`ROW_MAX_BYTES` by cutting its largest content fields, so every
  row fits one Logs Ingestion request. Every cut column is listed in the row's ``TruncatedFields`` (absent when
  nothing was cut).
- ``RecordId`` is deterministic per version (uuid5), so re-sent rows can be de-duplicated in KQL with
  ``summarize arg_max(TimeGenerated, *) by RecordId``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import cache, lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import jsonio
from .mapping import sentinel_description, sentinel_severity
from .timeutil import parse_time, zulu_parts

STREAMS: dict[str, str] = {
    "DefenderIncidents_CL": "Custom-DefenderIncidents",
    "DefenderAlerts_CL": "Custom-DefenderAlerts",
    "DefenderEvidence_CL": "Custom-DefenderEvidence",
    "DefenderMirrorRequests_CL": "Custom-DefenderMirrorRequests",
}
#: The change-log tables every pull fills (the mirror request table is written only by the ``defender-portal`` target).
CHANGE_LOG_TABLES = ("DefenderIncidents_CL", "DefenderAlerts_CL", "DefenderEvidence_CL")
#: Entity values kept per entity column of a mirror request (the rule maps the first few; the cap keeps the list a
#: list: a dynamic value cut for size would become a string the rule cannot index).
MAX_REQUEST_ENTITIES = 50

#: Per-field cap in UTF-8 bytes: a safe margin under the service's 64 KB (65,536 bytes) field limit.
FIELD_MAX_BYTES = 60_000
#: Cap on one row as the SDK serialises it (``json.dumps(row)``, ASCII-escaped), well under a 1 MB request.
ROW_MAX_BYTES = 512_000
#: Appended to every cut value.
TRUNCATION_MARKER = "…[truncated]"
#: Dynamic values nested deeper than this are replaced by a marker (Python's JSON encoder would otherwise recurse
#: without bound on hostile input).
MAX_DYNAMIC_DEPTH = 64
DEPTH_MARKER = "…[truncated: nested too deep]"

#: Names Log Analytics reserves (compared case-insensitively): never columns.
RESERVED_COLUMNS = frozenset({"tenantid", "title", "id", "type", "_resourceid", "_subscriptionid", "uniqueid"})
#: Column types the DCR ``streamDeclarations`` accept.
COLUMN_TYPES = frozenset({"string", "int", "long", "real", "boolean", "datetime", "dynamic"})
#: Columns every table must declare (the product contract; ``TruncatedFields`` is how cuts are flagged).
REQUIRED_COLUMNS = ("TimeGenerated", "RecordId", "DefenderTenantId", "TenantName", "IncidentId", "TruncatedFields")

_TABLES_DIR = Path(__file__).resolve().parent.parent / "infra" / "tables"
_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,44}$")
# Fixed forever: changing it would change every RecordId and break de-duplication across versions of the app.
_RECORD_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:defender-sentinel-sync:log-analytics:record")
_RECORD_NAMESPACE_BYTES = _RECORD_NAMESPACE.bytes
_GRAPH_TYPE_PREFIX = "microsoft.graph.security."
_FRACTION = re.compile(r"\.(\d+)")
_INTEGER = re.compile(r"^[+-]?\d{1,20}$")
_INT_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
# Never cut by the row budget: identity and bookkeeping columns (each is already under the per-field cap).
_ROW_CUT_EXEMPT = frozenset({"RecordId", "DefenderTenantId", "TenantName", "IncidentId", "AlertId", "TruncatedFields"})


# --------------------------------------------------------------------------------------------------------------
# Schema


@cache
def _columns(table: str) -> dict[str, str]:
    if table not in STREAMS:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(STREAMS)}")
    path = _TABLES_DIR / f"{table}.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        # In Azure this means the deployment package lacks infra/tables (see .funcignore).
        raise ValueError(f"cannot read the column definitions of {table} from {path}: {exc}; "
                         "infra/tables/*.json must be deployed with the app") from exc
    entries = document.get("columns") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an object with a 'columns' list")
    columns: dict[str, str] = {}
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        ctype = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _COLUMN_NAME.match(name):
            raise ValueError(f"{path}: invalid column name {name!r}")
        if name.lower() in RESERVED_COLUMNS:
            raise ValueError(f"{path}: column name {name!r} is reserved by Log Analytics")
        if name in columns:
            raise ValueError(f"{path}: duplicate column {name!r}")
        if ctype not in COLUMN_TYPES:
            raise ValueError(f"{path}: column {name!r} has unsupported type {ctype!r}")
        columns[name] = ctype
    for name in REQUIRED_COLUMNS:
        if name not in columns:
            raise ValueError(f"{path}: required column {name!r} is missing")
    if columns["TimeGenerated"] != "datetime" or columns["TruncatedFields"] != "dynamic":
        raise ValueError(f"{path}: TimeGenerated must be datetime and TruncatedFields dynamic")
    return columns


def load_columns(table: str) -> dict[str, str]:
    """Column name -> type for ``table``, read (once, cached) from ``infra/tables/<table>.json``.

    Validates the file: known table, names Log Analytics accepts and does not reserve, supported types, and the
    columns every table must have. Raises ``ValueError`` naming the problem. Returns a copy, safe to mutate.
    """
    return dict(_columns(table))


def record_id(*parts: str) -> str:
    """Deterministic row id: uuid5 over a fixed namespace of the JSON-encoded parts.

    JSON encoding (not a plain join) keeps ``("a|b", "c")`` and ``("a", "b|c")`` apart. Computed as
    :func:`uuid.uuid5` does (SHA-1 of namespace + name, version and variant bits set), without its objects: one per
    row.
    """
    return _record_id(hashlib.sha1(_RECORD_NAMESPACE_BYTES + _json_list([str(part) for part in parts]),
                                   usedforsecurity=False))


def _record_ids(parts: list[str], last: list[str]) -> list[str]:
    """``record_id(*parts, item)`` for each ``item`` of ``last``: the shared prefix is hashed once."""
    prefix = _json_list(parts)[:-1] if parts else b"["
    base = hashlib.sha1(_RECORD_NAMESPACE_BYTES + prefix, usedforsecurity=False)
    ids = []
    for item in last:
        digest = base.copy()
        digest.update((b", " if parts else b"") + _json_list([item])[1:])
        ids.append(_record_id(digest))
    return ids


def _json_list(parts: list[str]) -> bytes:
    """``json.dumps(parts).encode()``; written directly when no part needs an escape (printable ASCII without
    quotes or backslashes: ``json.dumps`` writes those characters as they are)."""
    for part in parts:
        if not (part.isascii() and part.isprintable()) or '"' in part or "\\" in part:
            return json.dumps(parts).encode()
    return ('["' + '", "'.join(parts) + '"]').encode() if parts else b"[]"


def _record_id(sha1: Any) -> str:
    digest = bytearray(sha1.digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --------------------------------------------------------------------------------------------------------------
# Value coercion


def _clean_str(text: str) -> str:
    """Replace lone surrogates (possible after ``json.loads`` of ``"\\ud800"``) so the text encodes as UTF-8."""
    if text.isascii():  # the usual case, checked without encoding
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _sanitize(value: Any, depth: int = 0) -> tuple[Any, bool]:
    """A JSON-safe deep copy of ``value`` and whether anything was cut for depth."""
    kind = type(value)  # exact types first (what json.loads produces): the ABC checks are slow
    if kind is str:
        return _clean_str(value), False
    if value is None or kind is bool or kind is int:
        return value, False
    if kind is float or (kind is not dict and kind is not list and isinstance(value, float)):
        # NaN/Infinity are not JSON (the service would reject the whole request): keep them as text.
        return (value if math.isfinite(value) else str(value)), False
    if kind is dict or kind is list or isinstance(value, Mapping | list | tuple | set | frozenset):
        if depth >= MAX_DYNAMIC_DEPTH:
            return DEPTH_MARKER, True
        cut = False
        if kind is dict or (kind is not list and isinstance(value, Mapping)):
            out: dict[str, Any] = {}
            for key, item in value.items():
                clean, item_cut = _sanitize(item, depth + 1)
                out[_clean_str(key if isinstance(key, str) else str(key))] = clean
                cut = cut or item_cut
            return out, cut
        items: list[Any] = []
        for item in value:
            clean, item_cut = _sanitize(item, depth + 1)
            items.append(clean)
            cut = cut or item_cut
        return items, cut
    if isinstance(value, bool | int):  # subclasses (IntEnum)
        return value, False
    if isinstance(value, str):
        return _clean_str(value), False
    if isinstance(value, datetime):
        return _format_datetime(value), False
    return _clean_str(str(value)), False


def _encodes(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates), i.e. :func:`_clean_str` would return it as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is JSON-safe as it is, so :func:`_sanitize` would return an equal copy: only the exact
    types ``json.loads`` produces, string keys, finite floats, text that encodes, nesting within
    :data:`MAX_DYNAMIC_DEPTH`. Checking costs a fraction of copying; evidence objects are nearly always plain."""
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DYNAMIC_DEPTH:
            return False
        # The member check is written out here and for lists below on purpose: a shared helper made this hot
        # check (every dynamic value of every row) twice as slow (measured: 0.43 s vs 0.95 s for 200,000 calls).
        for key, item in value.items():
            if type(key) is not str or not (key.isascii() or _encodes(key)):
                return False
            item_kind = type(item)
            if item_kind is str:
                if not (item.isascii() or _encodes(item)):
                    return False
            elif not (item is None or item_kind is int or item_kind is bool or _plain(item, depth + 1)):
                return False
        return True
    if kind is list:
        if depth >= MAX_DYNAMIC_DEPTH:
            return False
        for item in value:
            item_kind = type(item)
            if item_kind is str:
                if not (item.isascii() or _encodes(item)):
                    return False
            elif not (item is None or item_kind is int or item_kind is bool or _plain(item, depth + 1)):
                return False
        return True
    if kind is str:
        return value.isascii() or _encodes(value)
    if kind is float:
        return math.isfinite(value)
    return value is None or kind is int or kind is bool


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _to_str(value: Any) -> str | None:
    """Text for a string column; tolerant of wrong types (numbers, bools, objects become their JSON text)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return _format_datetime(value)
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        return _compact_json(_sanitize(value)[0])
    return _clean_str(str(value))


def _to_int(value: Any, bounds: tuple[int, int]) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INTEGER.match(value.strip()):
        number = int(value.strip())
    if number is None or not bounds[0] <= number <= bounds[1]:
        return None
    return number


def _to_real(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _format_datetime(value: datetime) -> str:
    """ISO-8601 UTC with ``Z`` and 7 fractional digits (Kusto's 100 ns tick); naive values are taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return f"{_iso_seconds(value)}.{value.microsecond:06d}0Z"


def _iso_seconds(value: datetime) -> str:
    # Not strftime: glibc writes year 999 as "999", which is not ISO-8601.
    return (f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
            f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}")


def _split_time(value: Any) -> tuple[datetime, str] | None:
    """(UTC datetime to the second, original fractional digits up to 7) or None when not a time."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        try:
            utc = aware.astimezone(UTC)
        except (OverflowError, ValueError):
            return None
        return utc.replace(microsecond=0), f"{utc.microsecond:06d}0"
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = parse_time(value)
    except (ValueError, OverflowError):
        return None
    match = _FRACTION.search(value)
    return parsed.replace(microsecond=0), (match.group(1)[:7] if match else "")


def normalize_time(value: Any) -> str | None:
    """Graph's time string kept as-is when it already is UTC with ``Z`` (fraction cut to 7 digits), else converted
    to UTC ``Z`` form keeping the original fractional digits; None when ``value`` is not a time."""
    zulu = zulu_parts(value)
    if zulu is not None:  # Graph's usual form: kept as it is
        return value if len(zulu[1]) <= 7 else f"{zulu[0]}.{zulu[1][:7]}Z"
    if isinstance(value, datetime):
        return _datetime_text(value)
    split = _split_time(value)
    if split is None:
        return None
    whole, fraction = split
    return _iso_seconds(whole) + (f".{fraction}" if fraction else "") + "Z"


@lru_cache(maxsize=16)
def _datetime_text(value: datetime) -> str | None:
    """:func:`normalize_time` of a datetime; cached: every row of a page carries the same ``read_at``."""
    split = _split_time(value)
    if split is None:
        return None
    whole, fraction = split
    return _iso_seconds(whole) + (f".{fraction}" if fraction else "") + "Z"


def canonical_time(value: Any) -> str | None:
    """One spelling per instant (UTC, exactly 7 fractional digits, ``Z``): used inside RecordIds so that
    ``...35.5533333Z`` and ``...35.5533333+00:00`` name the same version."""
    zulu = zulu_parts(value)
    if zulu is not None:
        return f"{zulu[0]}.{(zulu[1] + '0000000')[:7]}Z"
    split = _split_time(value)
    if split is None:
        return None
    whole, fraction = split
    return _iso_seconds(whole) + "." + (fraction + "0000000")[:7] + "Z"


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _strip_marker(text: str) -> str:
    return text[: -len(TRUNCATION_MARKER)] if text.endswith(TRUNCATION_MARKER) else text


def _cut_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes *including* the marker, on a character boundary."""
    budget = limit - _utf8_len(TRUNCATION_MARKER)
    # errors="ignore" drops a multi-byte character split by the byte cut (never a broken one).
    return text.encode("utf-8")[:budget].decode("utf-8", "ignore") + TRUNCATION_MARKER


def _dynamic_size(value: Any) -> int:
    # Default separators (with spaces) and raw UTF-8: never smaller than what Log Analytics stores.
    return _utf8_len(json.dumps(value, ensure_ascii=False))


def _coerce(ctype: str, value: Any, *, sized: bool = True) -> tuple[Any, bool]:
    """Value for a column of type ``ctype`` and whether it was cut. None means "omit". ``sized=False`` leaves a
    dynamic value's size to the caller (:func:`_finish` knows it from the whole row's text)."""
    if value is None:
        return None, False
    if ctype == "string":
        text = _to_str(value)
        if text is not None and len(text) * 4 > FIELD_MAX_BYTES and _utf8_len(text) > FIELD_MAX_BYTES:
            return _cut_utf8(text, FIELD_MAX_BYTES), True
        return text, False
    if ctype == "datetime":
        return normalize_time(value), False
    if ctype in _INT_RANGES:
        return _to_int(value, _INT_RANGES[ctype]), False
    if ctype == "real":
        return _to_real(value), False
    if ctype == "boolean":
        return _to_bool(value), False
    # dynamic
    clean, cut = _sanitize(value)
    if clean is None or not sized:
        return clean, cut
    return _fit_dynamic(clean, cut)


def _fit_dynamic(clean: Any, cut: bool) -> tuple[Any, bool]:
    """A sanitised dynamic value, cut to :data:`FIELD_MAX_BYTES` when its JSON is larger."""
    if _dynamic_size(clean) > FIELD_MAX_BYTES:
        # A cut dynamic value becomes a string of (cut) JSON text: never invalid JSON inside a dynamic column.
        text = clean if isinstance(clean, str) else _compact_json(clean)
        return _cut_utf8(text, FIELD_MAX_BYTES), True
    return clean, cut


def _wire_len(value: Any) -> int:
    """Bytes of ``value`` as the SDK serialises it (``json.dumps`` defaults: ASCII-escaped, ``", "`` separators)."""
    return len(json.dumps(value))


def _cut_to_wire(value: Any, target: int) -> str:
    """Text of ``value`` cut so that ``json.dumps`` of the result (marker included) is at most ``target`` bytes."""
    text = _strip_marker(value) if isinstance(value, str) else _compact_json(value)
    low, high = 0, len(text)
    while low < high:  # largest prefix that fits; the escaped length grows monotonically with the prefix
        mid = (low + high + 1) // 2
        if _wire_len(text[:mid] + TRUNCATION_MARKER) <= target:
            low = mid
        else:
            high = mid - 1
    return text[:low] + TRUNCATION_MARKER


def _flag(row: dict[str, Any], columns: Mapping[str, str], truncated: set[str]) -> None:
    if truncated:
        row["TruncatedFields"] = [name for name in columns if name in truncated]


def _fit_row(row: dict[str, Any], columns: Mapping[str, str], truncated: set[str]) -> None:
    """Cut the largest content fields until the serialised row (``TruncatedFields`` included) is at most
    :data:`ROW_MAX_BYTES`."""
    _flag(row, columns, truncated)
    size = _wire_len(row)
    while size > ROW_MAX_BYTES:
        candidates = [
            (_wire_len(value), name)
            for name, value in row.items()
            if columns[name] in ("string", "dynamic") and name not in _ROW_CUT_EXEMPT
        ]
        field_size, name = max(candidates)
        floor = _wire_len(TRUNCATION_MARKER)
        if field_size <= floor:  # cannot happen with today's schemas; never loop forever
            raise ValueError(f"row cannot be cut under {ROW_MAX_BYTES} bytes")
        # Leave room for this column's name joining TruncatedFields.
        target = max(field_size - (size - ROW_MAX_BYTES) - len(name) - 4, field_size // 2, floor)
        row[name] = _cut_to_wire(row[name], target)
        truncated.add(name)
        _flag(row, columns, truncated)
        size = _wire_len(row)


class Row(dict[str, Any]):
    """A built row (a plain dict to every reader) carrying ``wire``: its JSON text exactly as the Logs sink sends
    it (compact UTF-8, keys in schema order, :func:`sync.jsonio.dumps`), made once while building, so that sizing,
    chunking and the request body reuse it instead of serialising the row again. Any change to the row drops
    ``wire`` (the sink then serialises the row itself); ``dict(row)`` is a plain dict."""

    __slots__ = ("wire",)

    def __init__(self, values: Mapping[str, Any] | None = None, wire: bytes | None = None) -> None:
        super().__init__(values or {})
        self.wire = wire


def _drops_wire(name: str) -> Callable[..., Any]:
    method = getattr(dict, name)

    def changed(self: Row, *args: Any, **kwargs: Any) -> Any:
        self.wire = None
        return method(self, *args, **kwargs)

    changed.__name__ = name
    return changed


for _name in ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update"):
    setattr(Row, _name, _drops_wire(_name))


def _wire(row: Mapping[str, Any]) -> bytes | None:
    """``row`` as the sink sends it, or None when it is not JSON (the sink then reports it). Never longer than
    ``json.dumps(row)``, by which rows are sized (compact, and UTF-8 is never longer than ``\\u`` escapes)."""
    return jsonio.dumps(row)


_SLOW = object()  # a fast converter's "not the usual case": take :func:`_coerce`


def _fast_string(value: Any) -> Any:
    # ASCII: one byte per character, so at most FIELD_MAX_BYTES characters cannot need a cut.
    return value if type(value) is str and value.isascii() and len(value) <= FIELD_MAX_BYTES else _SLOW


def _fast_datetime(value: Any) -> Any:
    zulu = zulu_parts(value)
    if zulu is not None and len(zulu[1]) <= 7:
        return value
    return _datetime_text(value) if type(value) is datetime else _SLOW


def _fast_int(bounds: tuple[int, int]) -> Callable[[Any], Any]:
    low, high = bounds
    return lambda value: value if type(value) is int and low <= value <= high else _SLOW


def _fast_dynamic(value: Any) -> Any:
    # Sized by the caller (the whole row's text), as ``_coerce(..., sized=False)``.
    return value if _plain(value) else _SLOW


_FAST: dict[str, Callable[[Any], Any]] = {
    "string": _fast_string,
    "datetime": _fast_datetime,
    "int": _fast_int(_INT_RANGES["int"]),
    "long": _fast_int(_INT_RANGES["long"]),
    "real": lambda value: value if type(value) is float and math.isfinite(value) else _SLOW,
    "boolean": lambda value: value if type(value) is bool else _SLOW,
    "dynamic": _fast_dynamic,
}


@cache
def _converters(table: str) -> tuple[tuple[str, str, Callable[[Any], Any]], ...]:
    """(column, type, fast converter) per column of ``table`` in schema order, resolved once per table. A fast
    converter returns the value :func:`_coerce` would for the usual case (exact types, ASCII text, Graph's time
    form, plain JSON objects, returned without a copy) and :data:`_SLOW` for anything else."""
    return tuple((name, ctype, _FAST[ctype]) for name, ctype in _columns(table).items())


@lru_cache(maxsize=64)
def _plan(table: str, keys: tuple[str, ...]) -> tuple[bool, tuple[tuple[str, str, Callable[[Any], Any]], ...]]:
    """The converters of the columns a builder fills (``keys``: its raw dict's keys, the same for every row it
    builds), in schema order, and whether ``keys`` already come in that order (then the raw values are read in
    order, without a look-up per column). Raises ``KeyError`` for a key that is no column: a builder/schema
    mismatch is a bug, failing loudly (the tests catch it)."""
    columns = _columns(table)
    unknown = set(keys) - set(columns)
    if unknown:
        raise KeyError(f"{table} has no column {sorted(unknown)[0]!r}")
    given = set(keys)
    plan = tuple(entry for entry in _converters(table) if entry[0] in given)
    return tuple(entry[0] for entry in plan) == keys, plan


def _finish(table: str, raw: Mapping[str, Any]) -> Row:
    """Coerce raw values to the table's declared types, cut oversized values and order keys like the schema.

    Serialised once: when the row's text is at most :data:`FIELD_MAX_BYTES`, no field can be over its limit (a
    field's UTF-8 size never exceeds its ASCII-escaped text, part of the row's) nor the row over
    :data:`ROW_MAX_BYTES`, so that text is the answer; larger rows take the field-by-field checks and cuts.
    """
    columns = _columns(table)
    values: dict[str, Any] = {}
    truncated: set[str] = set()
    in_order, plan = _plan(table, tuple(raw))
    pairs = zip(plan, raw.values(), strict=True) if in_order else ((entry, raw[entry[0]]) for entry in plan)
    for (name, ctype, fast), value in pairs:  # schema order: the row comes out ordered
        if value is None:
            continue
        # _fast_string written out: the most frequent converter, one call per text field saved.
        if fast is _fast_string and type(value) is str and value.isascii() and len(value) <= FIELD_MAX_BYTES:
            values[name] = value
            continue
        coerced = fast(value)
        if coerced is _SLOW:
            coerced, cut = _coerce(ctype, value, sized=False)
            if cut:
                truncated.add(name)
            if coerced is None:
                continue
        values[name] = coerced
    ordered = values
    wire = None if truncated else _wire(ordered)
    if wire is not None and len(wire) <= FIELD_MAX_BYTES:
        return Row(ordered, wire)
    for name, value in values.items():
        if columns[name] == "dynamic":
            values[name], cut = _fit_dynamic(value, name in truncated)
            if cut:
                truncated.add(name)
    _fit_row(values, columns, truncated)
    ordered = {name: values[name] for name in columns if name in values}
    return Row(ordered, _wire(ordered))


# --------------------------------------------------------------------------------------------------------------
# Field helpers


_NO_OBJECT: Mapping[str, Any] = MappingProxyType({})


def _obj(value: Any) -> Mapping[str, Any]:
    # Exact types first: most lookups find a dict or nothing, and the Mapping ABC check is slow.
    if type(value) is dict:
        return value
    return value if value is not None and isinstance(value, Mapping) else _NO_OBJECT


def _as_list(value: Any) -> list[Any] | None:
    """A list for list-typed dynamic columns: a lone value (e.g. a string instead of a list) is wrapped."""
    if value is None:
        return None
    if isinstance(value, list | tuple | set | frozenset):
        return list(value)
    return [value]


def _first(*values: Any) -> Any:
    """The first value that is not None and not an empty string."""
    for value in values:
        if value is not None and value != "":
            return value
    return None


def _required_text(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        raise ValueError(f"{what} has no usable {key!r} (got {type(value).__name__})")
    return _clean_str(str(value).strip())


def _tenant_key(tenant_id: str) -> str:
    # Tenant GUIDs compare case-insensitively; the RecordId must not change with the spelling in the settings.
    return str(tenant_id).strip().lower()


def _normalise_comments(value: Any) -> list[Any] | None:
    """Comments as ``{comment, createdByDisplayName, createdDateTime, ...}``.

    The Graph docs' examples use the legacy keys ``createdBy``/``createdTime``; the typed model uses
    ``createdByDisplayName``/``createdDateTime``. Both are read; the typed names are written.
    """
    items = _as_list(value)
    if items is None:
        return None
    out: list[Any] = []
    for item in items:
        if not isinstance(item, Mapping):
            out.append({"comment": item})
            continue
        comment = dict(item)
        for legacy, typed in (("createdBy", "createdByDisplayName"), ("createdTime", "createdDateTime")):
            if legacy in comment:
                legacy_value = comment.pop(legacy)
                if comment.get(typed) is None:
                    comment[typed] = legacy_value
        created = normalize_time(comment.get("createdDateTime"))
        if created is not None:
            comment["createdDateTime"] = created
        out.append(comment)
    return out


def _evidence_items(alert: Mapping[str, Any]) -> list[Any]:
    """The alert's evidence list; a lone object is one item, anything else none."""
    evidence = alert.get("evidence")
    if isinstance(evidence, list | tuple):
        return list(evidence)
    if isinstance(evidence, Mapping):
        return [evidence]
    return []


def _check_read_at(read_at: datetime) -> datetime:
    if not isinstance(read_at, datetime):
        raise TypeError(f"read_at must be a datetime, not {type(read_at).__name__}")
    return read_at if read_at.tzinfo is not None else read_at.replace(tzinfo=UTC)


# --------------------------------------------------------------------------------------------------------------
# Builders


def incident_row(incident: Mapping[str, Any], *, tenant_id: str, tenant_name: str, read_at: datetime) -> dict[str, Any]:
    """The ``DefenderIncidents_CL`` row of one incident version.

    ``RecordId`` = uuid5(tenant, incident id, lastUpdateDateTime). ``AlertIds``/``AlertCount`` come from the
    expanded ``alerts`` (omitted when the incident was read without ``$expand=alerts``). Raises ``ValueError``
    naming the field when ``id`` or ``lastUpdateDateTime`` is missing or unusable; tolerates anything else.
    """
    if not isinstance(incident, Mapping):
        raise ValueError(f"incident must be a JSON object, not {type(incident).__name__}")
    read_at = _check_read_at(read_at)
    incident_id = _required_text(incident, "id", "incident")
    last_update = canonical_time(incident.get("lastUpdateDateTime"))
    if last_update is None:
        raise ValueError(f"incident {incident_id} has no valid 'lastUpdateDateTime' "
                         f"(got {incident.get('lastUpdateDateTime')!r:.80})")
    alerts = incident.get("alerts")
    alert_list = alerts if isinstance(alerts, list) else None
    alert_ids = None
    if alert_list is not None:
        alert_ids = [_to_str(a.get("id")) for a in alert_list if isinstance(a, Mapping) and a.get("id") is not None]
    raw: dict[str, Any] = {
        "TimeGenerated": read_at,
        "RecordId": record_id(_tenant_key(tenant_id), incident_id, last_update),
        "DefenderTenantId": tenant_id,
        "TenantName": tenant_name,
        "IncidentId": incident_id,
        "LastUpdateDateTime": incident.get("lastUpdateDateTime"),
        "CreatedDateTime": incident.get("createdDateTime"),
        "IncidentName": incident.get("displayName"),
        "Description": incident.get("description"),
        "Summary": incident.get("summary"),
        "Status": incident.get("status"),
        "Severity": incident.get("severity"),
        "Classification": incident.get("classification"),
        "Determination": incident.get("determination"),
        "AssignedTo": incident.get("assignedTo"),
        "IncidentWebUrl": incident.get("incidentWebUrl"),
        "RedirectIncidentId": incident.get("redirectIncidentId"),
        "ResolvingComment": incident.get("resolvingComment"),
        "LastModifiedBy": incident.get("lastModifiedBy"),
        "PriorityScore": incident.get("priorityScore"),
        "CustomTags": _as_list(incident.get("customTags")),
        "SystemTags": _as_list(incident.get("systemTags")),
        "Comments": _normalise_comments(incident.get("comments")),
        "AlertIds": alert_ids,
        "AlertCount": len(alert_list) if alert_list is not None else None,
    }
    return _finish("DefenderIncidents_CL", raw)


def _alert_identity(alert: Mapping[str, Any], incident_id: str) -> tuple[str, str, str]:
    """(alert id, incident id, the alert version's canonical lastUpdateDateTime or its raw text, or "")."""
    if not isinstance(alert, Mapping):
        raise ValueError(f"alert must be a JSON object, not {type(alert).__name__}")
    alert_id = _required_text(alert, "id", "alert")
    incident = _first(incident_id, alert.get("incidentId"))
    if incident is None or (isinstance(incident, str) and not incident.strip()):
        raise ValueError(f"alert {alert_id}: no incident id given and the alert has no 'incidentId'")
    raw_update = alert.get("lastUpdateDateTime")
    version = canonical_time(raw_update) or (_to_str(raw_update) or "")
    return alert_id, _clean_str(str(incident)), version


def alert_row(alert: Mapping[str, Any], *, incident_id: str, tenant_id: str, tenant_name: str,
              read_at: datetime) -> dict[str, Any]:
    """The ``DefenderAlerts_CL`` row of one alert version (``evidence`` goes to :func:`evidence_rows`).

    ``RecordId`` = uuid5(tenant, alert id, alert lastUpdateDateTime). ``incident_id`` falls back to the alert's
    own ``incidentId``. Raises ``ValueError`` naming the field when the alert has no ``id``.
    """
    alert_id, incident, version = _alert_identity(alert, incident_id)
    read_at = _check_read_at(read_at)
    raw: dict[str, Any] = {
        "TimeGenerated": read_at,
        "RecordId": record_id(_tenant_key(tenant_id), alert_id, version),
        "DefenderTenantId": tenant_id,
        "TenantName": tenant_name,
        "IncidentId": incident,
        "AlertId": alert_id,
        "LastUpdateDateTime": alert.get("lastUpdateDateTime"),
        "CreatedDateTime": alert.get("createdDateTime"),
        "ResolvedDateTime": alert.get("resolvedDateTime"),
        "FirstActivityDateTime": alert.get("firstActivityDateTime"),
        "LastActivityDateTime": alert.get("lastActivityDateTime"),
        "ProviderAlertId": alert.get("providerAlertId"),
        "AlertTitle": alert.get("title"),
        "Description": alert.get("description"),
        "RecommendedActions": alert.get("recommendedActions"),
        "Status": alert.get("status"),
        "Severity": alert.get("severity"),
        "Classification": alert.get("classification"),
        "Determination": alert.get("determination"),
        "Category": alert.get("category"),
        "Categories": _as_list(alert.get("categories")),
        "ServiceSource": alert.get("serviceSource"),
        "DetectionSource": alert.get("detectionSource"),
        "DetectorId": alert.get("detectorId"),
        "ProductName": alert.get("productName"),
        "AssignedTo": alert.get("assignedTo"),
        "AlertWebUrl": alert.get("alertWebUrl"),
        "IncidentWebUrl": alert.get("incidentWebUrl"),
        "ActorDisplayName": alert.get("actorDisplayName"),
        "ThreatDisplayName": alert.get("threatDisplayName"),
        "ThreatFamilyName": alert.get("threatFamilyName"),
        "InvestigationState": alert.get("investigationState"),
        "AlertPolicyId": alert.get("alertPolicyId"),
        "MitreTechniques": _as_list(alert.get("mitreTechniques")),
        "Comments": _normalise_comments(alert.get("comments")),
        "SystemTags": _as_list(alert.get("systemTags")),
        "AdditionalData": alert.get("additionalData"),
        "CustomDetails": alert.get("customDetails"),
        "EvidenceCount": len(_evidence_items(alert)),
    }
    return _finish("DefenderAlerts_CL", raw)


def evidence_type(evidence: Any) -> str | None:
    """``@odata.type`` without ``#microsoft.graph.security.`` (``"#microsoft.graph.security.ipEvidence"`` ->
    ``"ipEvidence"``); None when absent."""
    odata_type = _obj(evidence).get("@odata.type")
    return _type_name(odata_type) if isinstance(odata_type, str) else None


@lru_cache(maxsize=256)
def _type_name(odata_type: str) -> str | None:
    if not odata_type.strip():
        return None
    name = odata_type.strip().lstrip("#")
    return name[len(_GRAPH_TYPE_PREFIX):] if name.startswith(_GRAPH_TYPE_PREFIX) else name


def _account_of(evidence: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``userAccount`` of userEvidence/processEvidence/mailboxEvidence, or of the ``account`` (a userEvidence)
    of hostLogonSessionEvidence/cloudLogonSessionEvidence."""
    account = _obj(evidence.get("account"))
    for candidate in (evidence.get("userAccount"), account.get("userAccount"), account):
        found = _obj(candidate)  # exact dict first: most candidates are None, and the Mapping ABC check is slow
        if found:
            return found
    return {}


def _ip_of(value: Any) -> Any:
    """An ``ipAddress`` that is a string, or an ipEvidence object (nicEvidence, ioTDeviceEvidence, dnsEvidence)."""
    if type(value) is dict:
        return value.get("ipAddress")
    if value is None or type(value) is str:  # before the slow Mapping ABC check
        return value
    return value.get("ipAddress") if isinstance(value, Mapping) else value


_NAME_IS_NOT_A_RESOURCE = frozenset({"malwareEvidence", "gitHubUserEvidence"})


def _first_item(value: Any) -> Any:
    """The first item of a list (``None`` for an empty list or a non-list)."""
    return value[0] if isinstance(value, list) and value else None


def _hash_of(evidence: Mapping[str, Any], files: Mapping[str, Any], algorithm: str) -> Any:
    """A hash from ``fileDetails``/``imageFile``, a fileHashEvidence ``{algorithm, value}`` or blobEvidence
    ``fileHashes`` (a list of ``{algorithm, value}``)."""
    found = files.get(algorithm)
    listed = evidence.get("fileHashes")
    if (found is not None and found != "") or ("algorithm" not in evidence and not isinstance(listed, list)):
        return found if found != "" else None  # the usual case, without building the candidates
    candidates = [evidence, *[h for h in listed if isinstance(h, Mapping)]] if isinstance(listed, list) else [evidence]
    by_algorithm = (c.get("value") for c in candidates
                    if isinstance(c.get("algorithm"), str) and c["algorithm"].lower() == algorithm)
    return _first(files.get(algorithm), *by_algorithm)


def _cloud_resource_id(resource: Mapping[str, Any]) -> Any:
    """The ID of a cloud resource evidence: Azure ``resourceId``, AWS ``amazonResourceId``, Google
    ``fullResourceName`` (kubernetesClusterEvidence ``cloudResource`` may be any of the three)."""
    return _first(resource.get("resourceId"), resource.get("amazonResourceId"), resource.get("fullResourceName"))


def _registry_key(evidence: Mapping[str, Any]) -> Any:
    """``HIVE\\key`` (the full path, as Defender's advanced hunting spells it) from registryHive + registryKey."""
    key, hive = evidence.get("registryKey"), evidence.get("registryHive")
    if isinstance(key, str) and isinstance(hive, str) and hive and not key.upper().startswith(hive.upper()):
        return f"{hive}\\{key}"
    return key


def flatten_evidence(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """Join keys analysts use, read by Graph property name rather than by evidence type (the type list grows).

    ``tests/test_real_payloads.py`` lists every evidence type of Graph v1.0 with the key columns it fills.

    - DeviceId: ``mdeDeviceId`` (deviceEvidence, fileEvidence, processEvidence, registryValueEvidence, ...), the
      ``host`` (a deviceEvidence) of hostLogonSessionEvidence, ioTDeviceEvidence ``deviceId``.
    - DeviceName: deviceEvidence ``deviceDnsName`` (FQDN), else ``hostName``; the same on ``host``; else
      ``deviceName`` (cloudLogonSessionEvidence, ioTDeviceEvidence).
    - Account*: from userAccount ``{accountName, domainName, userPrincipalName, userSid, azureAdUserId}`` of
      userEvidence, processEvidence, mailboxEvidence, or ``account.userAccount`` of the logon-session evidence;
      AccountUpn falls back to ``upn`` (mailboxEvidence, mailboxConfigurationEvidence) and AccountObjectId to
      ``externalDirectoryObjectId`` (mailboxConfigurationEvidence). Other security principals use the same
      columns: securityGroupEvidence ``sid`` / ``securityGroupId`` (else ``activeDirectoryObjectGuid``),
      servicePrincipalEvidence ``servicePrincipalObjectId``, gitHubUserEvidence ``login``.
    - IpAddress: ipEvidence ``ipAddress``; ``ipAddress.ipAddress`` (nicEvidence, ioTDeviceEvidence); the remote
      end ``destinationAddress.ipAddress`` of networkConnectionEvidence; deviceEvidence ``lastIpAddress``;
      ``senderIp`` of analyzedMessageEvidence/submissionMailEvidence, ``senderIP`` of teamsMessageEvidence;
      dnsEvidence: the first resolved address (``ipAddresses``), else ``hostIpAddress``; kubernetesPodEvidence
      ``podIp``, kubernetesServiceEvidence ``clusterIP``.
    - Url: ``url`` (urlEvidence, blobEvidence, blobContainerEvidence); GitHub evidence ``webUrl``/``baseUrl``.
    - File*: ``fileDetails`` (fileEvidence) or ``imageFile`` (processEvidence) ``{fileName, filePath, sha1, sha256,
      md5}``; fileHashEvidence ``{algorithm, value}`` and blobEvidence ``fileHashes`` fill Sha1/Sha256/Md5.
    - ProcessId / ProcessCommandLine: processEvidence ``processId`` / ``processCommandLine``.
    - MailboxAddress: mailboxEvidence ``primaryAddress``, mailboxConfigurationEvidence ``mailboxPrimaryAddress``,
      analyzedMessageEvidence ``recipientEmailAddress``, submissionMailEvidence ``recipient``.
    - NetworkMessageId: ``networkMessageId`` (analyzedMessageEvidence, submissionMailEvidence), teamsMessageEvidence
      ``messageId``; NetworkMessageIds: mailClusterEvidence ``networkMessageIds`` (the whole list).
    - SenderAddress: analyzedMessageEvidence ``p1Sender.emailAddress``, submissionMailEvidence ``sender``,
      teamsMessageEvidence ``senderFromAddress``.
    - DomainName: dnsEvidence ``domainName``, activeDirectoryDomainEvidence ``activeDirectoryDomainName``.
    - AppId / AppName: ``appId`` of oauthApplicationEvidence, servicePrincipalEvidence, cloudApplicationEvidence
      (a number there) with ``displayName`` / ``servicePrincipalName``.
    - ResourceId / ResourceName: cloud resources (azureResourceEvidence, amazonResourceEvidence,
      googleCloudResourceEvidence; the ``storageResource`` of blobContainerEvidence/sasTokenEvidence, the
      ``cloudResource`` of kubernetesClusterEvidence, the ``ioTHub`` of ioTDeviceEvidence, a VM's
      ``vmMetadata.resourceId``), containers (``containerId``, ``imageId``, ``registry``), Kubernetes objects and
      blobs (``name``), aiAgentEvidence ``agentId``/``agentName``, GitHub ``repoId``/``orgId``.
    - RegistryKey (``HIVE\\key``) / RegistryValueName: registryKeyEvidence, registryValueEvidence.
    - SessionId: logon-session evidence ``sessionId``; RequestId: cloudLogonRequestEvidence ``requestId``.
    - MalwareName: malwareEvidence ``name``.
    """
    return _flatten(evidence, evidence_type(evidence))


def _flatten(evidence: Mapping[str, Any], kind: str | None) -> dict[str, Any]:
    """:func:`flatten_evidence` of an item whose :func:`evidence_type` is ``kind`` (the row builder knows it)."""
    host = _obj(evidence.get("host"))
    account = _account_of(evidence)
    files = _obj(evidence.get("fileDetails")) or _obj(evidence.get("imageFile"))
    cloud = (_obj(evidence.get("storageResource")) or _obj(evidence.get("cloudResource"))
             or _obj(evidence.get("ioTHub")) or _obj(evidence.get("vmMetadata")))
    sender = _obj(evidence.get("p1Sender"))
    # ``name`` means a malware's name, a person's name (gitHubUserEvidence) or a resource's name (the rest).
    name = evidence.get("name") if kind not in _NAME_IS_NOT_A_RESOURCE else None
    return {
        "DeviceId": _first(evidence.get("mdeDeviceId"), host.get("mdeDeviceId"), evidence.get("deviceId")),
        "DeviceName": _first(evidence.get("deviceDnsName"), evidence.get("hostName"), host.get("deviceDnsName"),
                             host.get("hostName"), evidence.get("deviceName")),
        "AccountName": _first(account.get("accountName"),
                              evidence.get("login") if kind == "gitHubUserEvidence" else None),
        "AccountDomain": account.get("domainName"),
        "AccountUpn": _first(account.get("userPrincipalName"), evidence.get("upn")),
        "AccountSid": _first(account.get("userSid"), evidence.get("sid")),
        "AccountObjectId": _first(account.get("azureAdUserId"), evidence.get("externalDirectoryObjectId"),
                                  evidence.get("securityGroupId"), evidence.get("activeDirectoryObjectGuid"),
                                  evidence.get("servicePrincipalObjectId")),
        "IpAddress": _first(_ip_of(evidence.get("ipAddress")), _ip_of(evidence.get("destinationAddress")),
                            evidence.get("lastIpAddress"), evidence.get("senderIp"), evidence.get("senderIP"),
                            _ip_of(_first_item(evidence.get("ipAddresses"))), _ip_of(evidence.get("hostIpAddress")),
                            _ip_of(evidence.get("podIp")), _ip_of(evidence.get("clusterIP"))),
        "Url": _first(evidence.get("url"), evidence.get("webUrl"), evidence.get("baseUrl")),
        "FileName": files.get("fileName"),
        "FilePath": files.get("filePath"),
        "Sha1": _hash_of(evidence, files, "sha1"),
        "Sha256": _hash_of(evidence, files, "sha256"),
        "Md5": _hash_of(evidence, files, "md5"),
        "ProcessId": evidence.get("processId"),
        "ProcessCommandLine": evidence.get("processCommandLine"),
        "MailboxAddress": _first(evidence.get("primaryAddress"), evidence.get("mailboxPrimaryAddress"),
                                 evidence.get("recipientEmailAddress"), evidence.get("recipient")),
        "NetworkMessageId": _first(evidence.get("networkMessageId"), evidence.get("messageId")),
        "NetworkMessageIds": _as_list(evidence.get("networkMessageIds")),
        "SenderAddress": _first(sender.get("emailAddress"), evidence.get("sender"),
                                evidence.get("senderFromAddress")),
        "DomainName": _first(evidence.get("domainName"), evidence.get("activeDirectoryDomainName")),
        "AppId": evidence.get("appId"),
        "AppName": _first(evidence.get("displayName"), evidence.get("servicePrincipalName"))
        if evidence.get("appId") is not None else None,
        "ResourceId": _first(_cloud_resource_id(evidence), _cloud_resource_id(cloud), evidence.get("containerId"),
                             evidence.get("imageId"), evidence.get("agentId"), evidence.get("repoId"),
                             evidence.get("orgId")),
        "ResourceName": _first(evidence.get("resourceName"), evidence.get("agentName"),
                               evidence.get("registry") if isinstance(evidence.get("registry"), str) else None,
                               name),
        "RegistryKey": _registry_key(evidence),
        "RegistryValueName": evidence.get("registryValueName"),
        "SessionId": evidence.get("sessionId"),
        "RequestId": evidence.get("requestId"),
        "MalwareName": evidence.get("name") if kind == "malwareEvidence" else None,
    }


def evidence_rows(alert: Mapping[str, Any], *, incident_id: str, tenant_id: str, tenant_name: str,
                  read_at: datetime) -> list[dict[str, Any]]:
    """One ``DefenderEvidence_CL`` row per item of ``alert["evidence"]``.

    Each row keeps the whole item in ``Evidence`` (dynamic) plus the flattened join keys of
    :func:`flatten_evidence`. ``RecordId`` = uuid5(tenant, alert id, alert lastUpdateDateTime, item index).
    A non-object item still gets a row (its value in ``Evidence``); a non-list ``evidence`` yields no rows
    (a lone object is one item). Raises ``ValueError`` when the alert has no ``id``.
    """
    alert_id, incident, version = _alert_identity(alert, incident_id)
    read_at = _check_read_at(read_at)
    tenant = _tenant_key(tenant_id)
    rows: list[dict[str, Any]] = []
    items = _evidence_items(alert)
    record_ids = _record_ids([tenant, alert_id, version], [str(index) for index in range(len(items))])
    for index, item in enumerate(items):
        evidence = _obj(item)
        kind = evidence_type(evidence)
        raw: dict[str, Any] = {
            "TimeGenerated": read_at,
            "RecordId": record_ids[index],
            "DefenderTenantId": tenant_id,
            "TenantName": tenant_name,
            "IncidentId": incident,
            "AlertId": alert_id,
            "AlertLastUpdateDateTime": alert.get("lastUpdateDateTime"),
            "EvidenceIndex": index,
            "EvidenceType": kind,
            "CreatedDateTime": evidence.get("createdDateTime"),
            "Verdict": evidence.get("verdict"),
            "RemediationStatus": evidence.get("remediationStatus"),
            "Roles": _as_list(evidence.get("roles")),
            "Tags": _as_list(evidence.get("tags")),
            **_flatten(evidence, kind),
            "Evidence": item,
        }
        rows.append(_finish("DefenderEvidence_CL", raw))
    return rows


def rows_for_incident(incident: Mapping[str, Any], *, tenant_id: str, tenant_name: str,
                      read_at: datetime) -> dict[str, list[dict[str, Any]]]:
    """Convenience: table -> rows for an incident read with ``$expand=alerts`` (incident, alerts, evidence).

    Raises ``ValueError`` like the builders (incident without id/lastUpdateDateTime, alert without id).
    """
    rows: dict[str, list[dict[str, Any]]] = {table: [] for table in CHANGE_LOG_TABLES}
    row = incident_row(incident, tenant_id=tenant_id, tenant_name=tenant_name, read_at=read_at)
    rows["DefenderIncidents_CL"].append(row)
    incident_id = str(row["IncidentId"])
    alerts = incident.get("alerts")
    for alert in alerts if isinstance(alerts, list) else []:
        kwargs: dict[str, Any] = {"incident_id": incident_id, "tenant_id": tenant_id, "tenant_name": tenant_name,
                                  "read_at": read_at}
        rows["DefenderAlerts_CL"].append(alert_row(alert, **kwargs))
        rows["DefenderEvidence_CL"].extend(evidence_rows(alert, **kwargs))
    return rows


def source_key(tenant_id: str, incident_id: str) -> str:
    """``<tenant id lower-case>/<incident id>``: names one Defender incident across tenants (the rule's custom
    detail ``SourceKey``)."""
    return f"{_tenant_key(tenant_id)}/{str(incident_id).strip()}"


def _with_tenant(url: Any, tenant_id: str) -> str | None:
    """The Defender portal link with ``tid=<tenant>`` (added when Graph's link lacks it), so the link opens the
    customer's tenant from the MSSP's portal."""
    if not isinstance(url, str) or not url.strip():
        return None
    parts = urlsplit(url.strip())
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key.lower() == "tid" for key, _ in query):
        return parts.geturl()
    return urlunsplit(parts._replace(query=urlencode([*query, ("tid", _tenant_key(tenant_id))])))


def _add_unique(values: list[str], seen: set[str], value: Any) -> None:
    if isinstance(value, str) and value.strip() and value.strip().lower() not in seen \
            and len(values) < MAX_REQUEST_ENTITIES:
        seen.add(value.strip().lower())
        values.append(value.strip())


def request_entities(incident: Mapping[str, Any]) -> dict[str, list[str]]:
    """``Accounts`` (UPN, else ``domain\\name``, else the account name), ``Hosts`` (device DNS name or host name)
    and ``IPs`` of the evidence of the incident's alerts, in first-seen order, de-duplicated case-insensitively,
    at most :data:`MAX_REQUEST_ENTITIES` each."""
    found: dict[str, list[str]] = {"Accounts": [], "Hosts": [], "IPs": []}
    seen: dict[str, set[str]] = {name: set() for name in found}
    alerts = incident.get("alerts")
    for alert in alerts if isinstance(alerts, list) else []:
        for item in _evidence_items(_obj(alert)):
            flat = flatten_evidence(_obj(item))
            name, domain = flat["AccountName"], flat["AccountDomain"]
            account = _first(flat["AccountUpn"], f"{domain}\\{name}" if domain and name else None, name)
            _add_unique(found["Accounts"], seen["Accounts"], account)
            _add_unique(found["Hosts"], seen["Hosts"], flat["DeviceName"])
            _add_unique(found["IPs"], seen["IPs"], flat["IpAddress"])
    return found


def mirror_request_row(incident: Mapping[str, Any], *, tenant_id: str, tenant_name: str, request_id: str,
                       now: datetime) -> dict[str, Any]:
    """The ``DefenderMirrorRequests_CL`` row asking the mirror rule for one incident (``defender-portal`` target).

    ``RecordId`` = ``RequestId`` (a new GUID per request, chosen by the caller so a retried upload keeps it).
    ``Severity`` in Sentinel's spelling, ``Description`` as the mirror's description (portal link, Defender's
    description, alert list), ``IncidentWebUrl`` with ``tid``, entity columns from the alerts' evidence (the incident
    read with ``$expand=alerts``). Values over 64 KB are cut and flagged like every row. Raises ``ValueError``
    naming the field when the incident has no ``id`` or ``request_id`` is empty.
    """
    if not isinstance(incident, Mapping):
        raise ValueError(f"incident must be a JSON object, not {type(incident).__name__}")
    incident_id = _required_text(incident, "id", "incident")
    if not isinstance(request_id, str) or not request_id.strip():
        raise ValueError("request_id must be a non-empty string (a new GUID per request)")
    now = _check_read_at(now)
    raw: dict[str, Any] = {
        "TimeGenerated": now,
        "RecordId": request_id.strip(),
        "RequestId": request_id.strip(),
        "DefenderTenantId": tenant_id,
        "TenantName": tenant_name,
        "IncidentId": incident_id,
        "SourceKey": source_key(tenant_id, incident_id),
        "IncidentTitle": incident.get("displayName") or f"Defender XDR incident {incident_id}",
        "Severity": sentinel_severity(incident.get("severity")),
        "Description": sentinel_description(incident),
        "IncidentWebUrl": _with_tenant(incident.get("incidentWebUrl"), tenant_id),
        **request_entities(incident),
    }
    return _finish("DefenderMirrorRequests_CL", raw)


__all__ = [
    "CHANGE_LOG_TABLES", "FIELD_MAX_BYTES", "ROW_MAX_BYTES", "STREAMS", "TRUNCATION_MARKER", "Row", "alert_row",
    "canonical_time", "evidence_rows", "evidence_type", "flatten_evidence", "incident_row", "load_columns",
    "mirror_request_row", "normalize_time", "record_id", "request_entities", "rows_for_incident", "source_key",
]
