"""Leases in Table Storage, held through one helper so a renewing keeper can never outlive its holder.

Leases in the leases table go through :func:`lease`: the tenant's reconcile cycle (held from ``start`` to ``finish``
by moving the context onto an :class:`contextlib.ExitStack` once ``start`` succeeded) and the per-incident lease every
sync of one incident holds (:mod:`sync.incident_sync`); the mirror hook holds the incident leases of a page's updates
together (:class:`LeaseGroupKeeper`: taken, renewed and given back in transactions). The pull's lease lives in the
tenant's state entity instead (:meth:`sync.state.StateStore.take_tenant_lease`), so taking it is the run's first
checkpoint and giving it back is part of its last write; :class:`LeaseKeeper` renews it all the same. Leaving
the ``with`` block, by success or by an exception, stops the keeper and gives the lease back.

A lease is *lost* when a renewal finds another owner, or when its expiry passes without a successful renewal (storage
errors): another instance may take it from then on, so the holder must stop writing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from .state import Lease, StateStore
from .timeutil import utcnow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25         # how often a waiting taker tries again
EXPIRY_MARGIN_SECONDS = 2.0  # count a lease lost this long before its expiry: clocks of instances differ a little


class LeaseLost(Exception):
    """Another instance may own what this lease guarded; the holder stops without writing progress."""


class LeaseKeeper:
    """Renews a held lease from a background thread while its holder works, however long one step takes.

    A killed process stops renewing, so its lease lapses within one lease period. :attr:`lost` turns True when a
    renewal finds another owner, or when the expiry passed without a successful renewal (renewals failing with
    errors): from then on another instance may hold it.
    """

    def __init__(self, store: StateStore, lease: Lease, seconds: float) -> None:
        self.lease = lease
        self._lost = False
        self._store = store
        self._seconds = seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.scope}-{lease.tenant_id[:8]}",
                                        daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        """Whether the lease can no longer be counted on (taken by another owner, or expired unrenewed)."""
        margin = min(EXPIRY_MARGIN_SECONDS, self._seconds / 10)
        return self._lost or (utcnow() - self._expires_at()).total_seconds() >= -margin

    def _expires_at(self) -> datetime:
        return self.lease.expires_at

    def _renew(self) -> bool:
        return self._store.renew_lease(self.lease, self._seconds)

    def _give_back(self) -> None:
        self._store.release_lease(self.lease)

    @property
    def guard(self) -> threading.Lock:
        """Held around each renewal: a holder that writes the lease's entity itself (the pull's lease lives in the
        tenant's state) takes it too, so the two never race on the entity's ETag."""
        return self._lock

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the lease is lost."""
        if self.lost:
            raise LeaseLost(f"the {self.lease.scope} lease of tenant {self.lease.tenant_id} was lost")

    def _run(self) -> None:
        while not self._stop.wait(self._seconds / 3):
            try:
                with self._lock:
                    renewed = self._renew()
            except Exception:  # a transient storage error: try again next beat; the lease outlives two misses
                if self.lost:
                    self._mark_lost("expired")
                    return
                log.warning("lease renewal failed; retrying", extra={"tenantId": self.lease.tenant_id,
                                                                     "action": "lease", "outcome": "retry"})
                continue
            if not renewed:
                self._mark_lost("taken")
                return

    def _mark_lost(self, how: str) -> None:
        self._lost = True
        log.warning("lease lost (%s)", how, extra={"tenantId": self.lease.tenant_id, "action": "lease",
                                                   "outcome": "lost", "scope": self.lease.scope})

    def release(self) -> None:
        """Stop renewing and give the lease back (only if still ours)."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            if self._lost:
                return
            try:
                self._give_back()
            except Exception:  # it lapses at its expiry instead; never mask what ended the holder's work
                log.warning("lease could not be given back; it lapses", extra={
                    "tenantId": self.lease.tenant_id, "action": "lease", "outcome": "release-failed"})


class LeaseGroupKeeper(LeaseKeeper):
    """Several leases of the leases table (a mirror page's incident leases) renewed together from one thread: one
    transaction of ``If-Match`` replaces per beat, given back in transactions of deletes. A refused renewal counts
    them all lost; the earliest expiry is the group's."""

    def __init__(self, store: StateStore, leases: list[Lease], seconds: float) -> None:
        if not leases:
            raise ValueError("a lease group needs at least one lease")
        self.leases = leases
        super().__init__(store, leases[0], seconds)

    def _expires_at(self) -> datetime:
        return min(held.expires_at for held in self.leases)

    def _renew(self) -> bool:
        return self._store.renew_leases(self.leases, self._seconds)

    def _give_back(self) -> None:
        self._store.release_leases(self.leases)


@contextmanager
def lease(store: StateStore, tenant_id: str, scope: str, owner: str, seconds: float, *,
          wait_seconds: float = 0.0) -> Iterator[LeaseKeeper | None]:
    """Hold ``scope``'s lease of the tenant for the ``with`` block, renewed in the background; yields None when
    another owner holds it (after trying again for up to ``wait_seconds``). The keeper is always stopped and the
    lease given back when the block ends, whatever ends it."""
    give_up_at = time.monotonic() + wait_seconds
    taken = store.acquire_lease(tenant_id, scope, owner, seconds)
    while taken is None and time.monotonic() + POLL_SECONDS <= give_up_at:
        time.sleep(POLL_SECONDS)
        taken = store.acquire_lease(tenant_id, scope, owner, seconds)
    if taken is None:
        yield None
        return
    keeper = LeaseKeeper(store, taken, seconds)
    try:
        yield keeper
    finally:
        keeper.release()
