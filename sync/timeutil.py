"""UTC time parsing and formatting for Graph/ARM timestamps (up to 7 fractional digits)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import lru_cache

_FRACTION = re.compile(r"\.(\d+)")
# Graph's usual spelling: UTC with "Z", seconds and an optional fraction (the year from 1000, where strftime and
# ISO-8601 agree).
_ZULU = re.compile(r"[1-9]\d{3}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.(\d+))?Z")


def zulu_parts(value: object) -> tuple[str, str] | None:
    """(``YYYY-MM-DDTHH:MM:SS``, fractional digits as written) of a valid time in Graph's usual UTC ``Z`` form,
    else None (the caller then takes the general path). The fast path of every time normalisation."""
    return _zulu_parts(value) if type(value) is str else None


@lru_cache(maxsize=4096)
def _zulu_parts(value: str) -> tuple[str, str] | None:
    # Cached: a version's times are read several times (RecordIds, columns, the engine's comparisons).
    match = _ZULU.fullmatch(value)
    if match is None:
        return None
    try:
        datetime.fromisoformat(value[:19])  # the calendar check (month 13, February 30, hour 24)
    except ValueError:
        return None
    return value[:19], match.group(1) or ""


def parse_time(value: str) -> datetime:
    """Parse an ISO-8601 time; naive values are taken as UTC. Fractions beyond microseconds are cut.

    Raises ValueError with the offending value when it is not a time.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"not an ISO-8601 time: {value!r}")
    text = value.strip().replace("z", "Z")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"not an ISO-8601 time: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_time(value: datetime) -> str:
    """Format as ISO-8601 UTC with microseconds and a ``Z`` suffix (sorts lexically in time order)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_time(value: str) -> str:
    """A comparable form of a Graph timestamp that keeps all 7 fractional digits: ``YYYY-MM-DDTHH:MM:SS.fffffffZ``.

    Two versions of an incident may differ only in the 7th digit, so comparisons use this, not ``datetime``.
    """
    zulu = zulu_parts(value)
    if zulu is not None:
        return f"{zulu[0]}.{(zulu[1] + '0000000')[:7]}Z"
    parsed = parse_time(value)
    match = _FRACTION.search(value)
    digits = (match.group(1) if match else "") + "0000000"
    return parsed.strftime("%Y-%m-%dT%H:%M:%S.") + digits[:7] + "Z"
