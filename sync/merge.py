"""Pure three-way merge of the synced fields against the stored base (the last value both sides agreed on).

Per field, comparing each side with ``base``:

* changed on neither side: the base value (echo suppression: a value the app wrote and now reads back *is* the base,
  so a quiet system produces no change at all);
* changed on one side: that side's value;
* changed on both to the same value: that value, no conflict;
* changed on both to different values: a conflict, decided by the policy (``defender``, ``sentinel``, or ``latest``:
  the side whose modification time is newer; a tie or an unknown time goes to Defender).

Field groups:

* ``owner``: a plain value.
* ``tags``: a set, merged element-wise: ``(base | addsD | addsS) - removesD - removesS``, so adds and removes made on
  both sides all survive and the result does not depend on which side is which. "One side adds X while the other
  removes X" cannot happen against one base: X was either in the base (it can only be removed) or not (it can only
  be added). A tag removed on one side and re-added on the other since the base is therefore simply absent on one
  side and present on the other; that is an add if it was absent from the base and a remove if it was present.
* ``status`` + ``classification`` + ``determination``: ONE closure group, merged as a unit. Classification and
  determination only exist while resolved, so merging them separately could apply one side's classification to the
  other side's status (e.g. Sentinel reclassifies a closed incident while Defender reopens it). A group changed on
  one side takes that side's whole group; changed on both sides to different values, the policy picks one side's whole
  group, and the fields in which the two sides differ are reported as conflicts.

No base (first sync, or a lost link): Defender wins every field. A caller that wants Sentinel's values to win instead
passes ``base=defender`` (then every difference counts as a Sentinel change).

``defender_writable=False`` (tenant modes ``pull-only``/``data-only``, or a redirected Defender incident): Defender
wins every field and nothing is written to Defender; Sentinel edits are put back on the next Sentinel write.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any, Literal

from sync.mapping import SyncedFields

Policy = Literal["latest", "defender", "sentinel"]
POLICIES: frozenset[str] = frozenset({"latest", "defender", "sentinel"})

CLOSURE_GROUP = ("status", "classification", "determination")
FIELD_NAMES = tuple(f.name for f in fields(SyncedFields))


@dataclass(frozen=True)
class MergeResult:
    """Outcome of a three-way merge.

    ``defender_changes`` / ``sentinel_changes`` map canonical field names to the merged value for every field where
    that side differs from ``merged`` (so applying them with ``dataclasses.replace`` yields ``merged``); empty means
    "write nothing". A reopen lists ``classification``/``determination`` as ``None``: in canonical terms an open
    incident has none, while ``sync.mapping.to_defender_patch`` leaves Defender's own classification alone.
    """

    merged: SyncedFields
    defender_changes: dict[str, Any]
    sentinel_changes: dict[str, Any]
    conflicts: tuple[str, ...]

    @property
    def changed(self) -> bool:
        """Whether either side needs a write."""
        return bool(self.defender_changes or self.sentinel_changes)


def _winner(policy: str, defender_time: datetime | None, sentinel_time: datetime | None) -> Literal["d", "s"]:
    if policy == "defender":
        return "d"
    if policy == "sentinel":
        return "s"
    # latest: strictly newer Sentinel wins; ties and unknown times go to Defender.
    if defender_time is not None and sentinel_time is not None and sentinel_time > defender_time:
        return "s"
    return "d"


def _closure(value: SyncedFields) -> tuple[str, str | None, str | None]:
    return value.status, value.classification, value.determination


def _diff(side: SyncedFields, merged: SyncedFields) -> dict[str, Any]:
    return {name: getattr(merged, name) for name in FIELD_NAMES if getattr(side, name) != getattr(merged, name)}


def merge(base: SyncedFields | None, defender: SyncedFields, sentinel: SyncedFields, *, policy: str,
          defender_time: datetime | None, sentinel_time: datetime | None,
          defender_writable: bool = True) -> MergeResult:
    """Three-way merge of the Defender and Sentinel values against ``base`` (see the module docstring for the rules).

    ``defender_time``/``sentinel_time`` are the sides' last modification times (Graph ``lastUpdateDateTime``, ARM
    ``lastModifiedTimeUtc``), used by the ``latest`` policy only. Raises ``ValueError`` for an unknown policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"conflict policy must be one of {sorted(POLICIES)}, got {policy!r}")

    if base is None or not defender_writable:
        merged = defender
        return MergeResult(merged, {}, _diff(sentinel, merged), ())

    winner = _winner(policy, defender_time, sentinel_time)
    conflicts: list[str] = []

    # Closure group: one unit.
    b, d, s = _closure(base), _closure(defender), _closure(sentinel)
    if d == s or s == b:
        closure = d
    elif d == b:
        closure = s
    else:
        closure = d if winner == "d" else s
        conflicts.extend(name for name, dv, sv in zip(CLOSURE_GROUP, d, s, strict=True) if dv != sv)

    # Owner: one value.
    if defender.owner == sentinel.owner or sentinel.owner == base.owner:
        owner = defender.owner
    elif defender.owner == base.owner:
        owner = sentinel.owner
    else:
        owner = defender.owner if winner == "d" else sentinel.owner
        conflicts.append("owner")

    # Tags: element-wise set merge (symmetric in the two sides).
    tags = ((base.tags | (defender.tags - base.tags) | (sentinel.tags - base.tags))
            - (base.tags - defender.tags) - (base.tags - sentinel.tags))

    status, classification, determination = closure
    merged = replace(base, status=status, classification=classification, determination=determination, owner=owner,
                     tags=frozenset(tags))
    return MergeResult(merged, _diff(defender, merged), _diff(sentinel, merged), tuple(conflicts))
