"""A rate budget shared by every instance of the app, kept in Table Storage.

A per-process limiter multiplies with the instances of a queue fan-out; this one does not. One entity per budget
holds the grants of the last minute (``[[epoch seconds, units], ...]``); taking units reads it, drops what left the
window, and writes it back with ``If-Match``, so two instances can never both spend the last unit.

A unit is taken before the call it pays for is made, and that call takes a moment: every grant counts against the
window for ``60 + hold_seconds``, and a unit must be spent within ``hold_seconds`` of its grant. So whenever a unit
is spent, at most ``per_minute`` units were spent in the 60 seconds before it, whatever the instances did. Reading
and writing the ledger for every unit would double the Table Storage traffic of a Sentinel write, so an instance may
take a small block at once and spend it locally within ``hold_seconds`` (units left over are dropped).
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from .budget import BudgetExhausted, Deadline

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
PARTITION = "budget"
MAX_RACES = 20


@dataclass
class Grant:
    """Units taken from the shared ledger at ``at`` (epoch seconds)."""

    at: float
    units: int


class SharedRateBudget:
    """At most ``per_minute`` units in any rolling 60 seconds, across every process sharing ``table``.

    ``block``: units taken from the ledger at once and spent locally within ``hold_seconds`` (1: every unit is its
    own ledger write, exact to the unit, for costly or visible actions such as mirror requests). ``hold_seconds``:
    how long after its grant a unit may be spent (the time the paid call may take to start).
    """

    def __init__(self, table: TableClient, name: str, per_minute: int, *, block: int = 1,
                 hold_seconds: float = 5.0, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.table = table
        self.name = name
        self.per_minute = per_minute
        self.block = max(1, min(block, per_minute))
        self.hold_seconds = hold_seconds
        self._clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._local: list[Grant] = []
        self.ledger_operations = 0

    @property
    def span(self) -> float:
        """How long a grant counts against the window."""
        return WINDOW_SECONDS + self.hold_seconds

    def acquire(self, deadline: Deadline | None = None, units: int = 1) -> None:
        """Block until ``units`` are granted; :class:`BudgetExhausted` if the wait would pass ``deadline``."""
        if units > self.per_minute:
            raise ValueError(f"{units} units can never fit a budget of {self.per_minute} a minute")
        while True:
            wait = self.try_acquire(units)
            if wait <= 0:
                return
            if deadline is not None and deadline.remaining() < wait:
                raise BudgetExhausted(f"the shared {self.name} budget frees up in {wait:.1f}s, past the run's budget")
            self.sleep(wait)

    def try_acquire(self, units: int = 1) -> float:
        """Take ``units`` now if the budget allows: 0. Otherwise nothing is taken and the answer is the number of
        seconds after which they may fit (an estimate: other instances may take them first)."""
        with self._lock:
            now = self._clock()
            self._local = [g for g in self._local if now - g.at < self.hold_seconds and g.units > 0]
            if units <= sum(g.units for g in self._local):
                self._spend_local(units)
                return 0.0
            wanted = max(units, self.block) if self.block > 1 else units
            wait = self._take(wanted, now)
            if wait > 0 and wanted > units:
                wait = self._take(units, now)
                wanted = units
            if wait > 0:
                return wait
            self._local.append(Grant(now, wanted))
            self._spend_local(units)
            return 0.0

    def _spend_local(self, units: int) -> None:
        for grant in self._local:
            spend = min(units, grant.units)
            grant.units -= spend
            units -= spend
            if units == 0:
                break

    def used(self) -> int:
        """Units counted against the window now (every instance's)."""
        grants, _etag = self._read()
        now = self._clock()
        return sum(g.units for g in grants if now - g.at < self.span)

    def _read(self) -> tuple[list[Grant], str | None]:
        self.ledger_operations += 1
        try:
            entity = self.table.get_entity(PARTITION, self.name)
        except ResourceNotFoundError:
            return [], None
        try:
            raw = json.loads(str(entity.get("Grants") or "[]"))
            grants = [Grant(float(at), int(n)) for at, n in raw]
        except (ValueError, TypeError):
            log.warning("shared budget ledger unreadable; starting it again", extra={
                "action": "rate-budget", "outcome": "ledger-reset", "budget": self.name})
            grants = []
        return grants, str(entity.metadata.get("etag"))

    def _take(self, units: int, now: float) -> float:
        """One ledger transaction: 0 when ``units`` were recorded, else seconds until they may fit."""
        for _ in range(MAX_RACES):
            grants, etag = self._read()
            live = sorted((g for g in grants if now - g.at < self.span), key=lambda g: g.at)
            used = sum(g.units for g in live)
            if used + units > self.per_minute:
                # Wait until enough of the oldest grants leave the window.
                excess = used + units - self.per_minute
                for grant in live:
                    excess -= grant.units
                    if excess <= 0:
                        return max(0.01, grant.at + self.span - now)
                return self.span
            live.append(Grant(now, units))
            entity = {"PartitionKey": PARTITION, "RowKey": self.name,
                      # Rounded up to the millisecond: a grant never looks older than it is.
                      "Grants": json.dumps([[math.ceil(g.at * 1000) / 1000, g.units] for g in live],
                                           separators=(",", ":"))}
            self.ledger_operations += 1
            try:
                if etag is None:
                    self.table.create_entity(entity)
                else:
                    self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=etag,
                                             match_condition=MatchConditions.IfNotModified)
                return 0.0
            except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                # Another instance wrote the ledger in between: read it again.
                time.sleep(random.uniform(0, 0.05))  # noqa: S311 - jitter, not security
        return 1.0
