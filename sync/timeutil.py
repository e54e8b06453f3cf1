"""UTC time parsing and formatting for Graph/ARM timestamps (up to 7 fractional digits)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_FRACTION = re.compile(r"\.(\d+)")


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
    parsed = parse_time(value)
    match = _FRACTION.search(value)
    digits = (match.group(1) if match else "") + "0000000"
    return parsed.strftime("%Y-%m-%dT%H:%M:%S.") + digits[:7] + "Z"
