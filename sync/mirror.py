"""Defender → Sentinel mirror, run from the pull cycle for every stored page of in-scope incident versions."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from .budget import BudgetExhausted, Deadline
from .context import AppContext
from .http import describe_error
from .incident_sync import (
    INCIDENT_LEASE_SECONDS,
    NO_LINK,
    UNREAD_LINK,
    IncidentBusy,
    IncidentSyncer,
    LinkSave,
    NewLink,
    SyncOutcome,
    needs_leased_sync,
)
from .leases import LeaseGroupKeeper, LeaseLost
from .models import TenantSummary
from .pull import HookIncident, IncidentHook
from .settings import TenantConfig
from .state import DeadLetter
from .timeutil import canonical_time, parse_time, utcnow

log = logging.getLogger(__name__)


def mirror_hook(ctx: AppContext) -> IncidentHook:
    """The pull's page hook: mirror the versions just stored. A failure is dead-lettered for its incident (and
    retried by the next version, the reconcile sweep, or a re-run) instead of stopping the tenant's pull. A version
    whose mirror failed is not tried again before its letter's backoff has passed (the overlap re-reads it every
    run); a newer version is tried at once.

    Table Storage per page: the links of incidents stored before come read with their versions (the pull's
    look-up; a link it did not read is read here, concurrently), and are also used by the leased sync of an update;
    an incident never stored before has no link, so none is read; the new links
    are written at the end in transactions (name-index rows first, then the links as inserts). A link that cannot
    be created that way is created on its own, and one that exists meanwhile is synced again against it.

    The page's updates (linked incidents with a version the link does not hold) are synced under their incident
    leases taken together (transactions of inserts; those of a refused transaction one by one, and an incident
    another worker holds goes the per-incident way: it waits a little, then is dead-lettered busy), renewed by one
    keeper. Their link writes are collected and written at the end in transactions of ``If-Match`` replaces, THEN
    the leases are given back in transactions of deletes. A link changed meanwhile is synced again, after that.
    An incident with a pending letter (a retry) goes the per-incident way."""
    syncer: IncidentSyncer | None = None
    # Mirror dead letters per tenant, read once: a success clears only a letter that exists (no blind deletes).
    pending: dict[str, dict[str, DeadLetter]] = {}

    def hook(tenant: TenantConfig, page: list[HookIncident], summary: TenantSummary, deadline: Deadline) -> None:
        nonlocal syncer
        if syncer is None:
            syncer = IncidentSyncer(ctx)
        if tenant.tenant_id not in pending:
            pending[tenant.tenant_id] = {d.key: d for d in ctx.state.dead_letters(tenant.tenant_id, pending_only=True)
                                         if d.kind == "mirror"}
        letters = pending[tenant.tenant_id]
        todo = [h for h in page if not _backing_off(letters.get(str(h.incident.get("id"))), h.incident)]
        links: dict[str, Any] = ctx.state.get_links(tenant.tenant_id, [str(h.incident.get("id")) for h in todo
                                                                       if not h.unlinked and not h.link_read])
        links.update({str(h.incident.get("id")): h.link for h in todo if h.link_read})
        run = _PageRun(ctx, syncer, tenant, summary, deadline, letters)
        try:
            run.take_leases([str(h.incident.get("id")) for h in todo if str(h.incident.get("id")) not in letters
                             and needs_leased_sync(links.get(str(h.incident.get("id"))), h.incident)])
            links.update(run.confirm_links(links))
            for item in todo:
                incident_id = str(item.incident.get("id"))
                run.attempt(item.incident, retry=incident_id in letters, link=links.get(incident_id, NO_LINK))
        except (BudgetExhausted, LeaseLost):
            run.save_links(settle=False)   # what was mirrored keeps its link; the page is read again next run
            run.write_links(settle=False)
            run.record()
            raise
        except BaseException:
            run.release_leases()  # a crash: the links stay as they were, the next run repairs from fresh reads
            raise
        run.save_links(settle=True)
        run.write_links(settle=True)
        run.record()

    return hook


class _PageRun:
    """One page of the hook: the syncs, the new links they made, and their outcomes."""

    def __init__(self, ctx: AppContext, syncer: IncidentSyncer, tenant: TenantConfig, summary: TenantSummary,
                 deadline: Deadline, letters: dict[str, DeadLetter]) -> None:
        self.ctx, self.syncer, self.tenant, self.summary = ctx, syncer, tenant, summary
        self.deadline, self.letters = deadline, letters
        self.new_links: list[NewLink] = []
        self.link_saves: list[LinkSave] = []
        self.outcomes: dict[str, SyncOutcome] = {}
        self.incidents: dict[str, dict[str, Any]] = {}
        self.keeper: LeaseGroupKeeper | None = None
        self.leased: set[str] = set()

    def take_leases(self, incident_ids: list[str]) -> None:
        """Take the incident leases of the page's updates together, renewed by one keeper; an incident another
        worker holds is left out (its sync goes the per-incident way)."""
        if not incident_ids:
            return
        owner = f"{self.ctx.instance_id}-{uuid.uuid4().hex[:8]}"
        taken = self.ctx.state.acquire_leases(self.tenant.tenant_id, [f"incident:{i}" for i in incident_ids],
                                              owner, INCIDENT_LEASE_SECONDS)
        held = {i: taken.get(f"incident:{i}") for i in incident_ids}
        leases = [held_lease for held_lease in held.values() if held_lease is not None]
        if leases:
            self.keeper = LeaseGroupKeeper(self.ctx.state, leases, INCIDENT_LEASE_SECONDS)
            self.leased = {i for i, held_lease in held.items() if held_lease is not None}

    def confirm_links(self, links: dict[str, Any]) -> dict[str, Any]:
        """The links of the page's leased updates as they are now. They were read before the page's rows were
        uploaded, and a webhook or the reconcile may have synced an incident since: a merge against the older
        link would take that sync's change for a new one and write it over newer edits. The lease now keeps other
        writers off, so one ``If-Match`` write of each link as read, in transactions, tells whether it is still
        current (and gives the ETag the page's link write needs); a link that changed is read again."""
        held = {i: links[i] for i in self.leased if isinstance(links.get(i), dict) and links[i].get("etag")}
        if not held:
            return {}
        state, tid = self.ctx.state, self.tenant.tenant_id
        etags = state.confirm_links(tid, {i: (link, str(link["etag"])) for i, link in held.items()})
        current: dict[str, Any] = {i: {**held[i], "etag": etag} for i, etag in etags.items() if etag is not None}
        changed = [i for i in held if i not in current]
        if changed:
            current.update(state.get_links(tid, changed))
        return current

    def release_leases(self) -> None:
        """Give the page's incident leases back (once; nothing when none are held)."""
        keeper, self.keeper, self.leased = self.keeper, None, set()
        if keeper is not None:
            keeper.release()

    def attempt(self, incident: dict[str, Any], *, retry: bool, link: Any = UNREAD_LINK,
                new_links: bool = True) -> None:
        """Sync one incident; a failure other than the run's end is dead-lettered."""
        incident_id = str(incident.get("id"))
        self.incidents[incident_id] = incident
        leased = incident_id in self.leased
        if leased and self.keeper is not None:
            self.keeper.check()  # the page's leases were lost: stop the page (its syncs are not safe any more)
        try:
            self.outcomes[incident_id] = self.syncer.sync(
                self.tenant, incident_id, deadline=self.deadline, trigger="pull", defender=incident, retry=retry,
                link=link, new_links=self.new_links if new_links else None,
                leased_saves=self.link_saves if leased else None)
        except (BudgetExhausted, LeaseLost):
            raise  # the run stops here; the page is read again next run
        except Exception as exc:  # any failure of one incident: never replay the page forever
            self.outcomes.pop(incident_id, None)
            self._dead_letter(incident_id, incident, exc)

    def write_links(self, *, settle: bool) -> None:
        """Write the page's new links in transactions; those not written so are created one by one, and one that
        exists already is synced again (``settle``; else left to the next run, which reads the page again)."""
        links, self.new_links = {n.incident_id: n.link for n in self.new_links}, []
        if not links:
            return
        try:
            unwritten = self.ctx.state.create_links(self.tenant.tenant_id, links)
        except Exception:
            if not settle:
                log.warning("the page's new links could not be written", exc_info=True,
                            extra={"tenantId": self.tenant.tenant_id, "action": "mirror", "outcome": "links-lost"})
                return
            raise
        if not settle:
            return
        for incident_id in unwritten:
            incident = self.incidents[incident_id]
            try:
                if self.ctx.state.save_link(self.tenant.tenant_id, incident_id, links[incident_id], etag=None):
                    continue
            except Exception as exc:
                self.outcomes.pop(incident_id, None)
                self._dead_letter(incident_id, incident, exc)
                continue
            # Linked meanwhile: sync again against that link (under the incident's lease, from fresh reads).
            self.attempt(incident, retry=True, new_links=False)

    def save_links(self, *, settle: bool) -> None:
        """Write the links the page's leased syncs collected (transactions of ``If-Match`` replaces; those not
        written so one by one), THEN give the leases back. A link changed meanwhile (a writer ignoring the lease,
        or a lease that lapsed) is synced again from fresh reads the per-incident way (``settle``; else left to
        the next run, which reads the page again)."""
        saves, self.link_saves = {s.incident_id: s for s in self.link_saves}, []
        stale: list[str] = []
        try:
            unwritten = self.ctx.state.replace_links(self.tenant.tenant_id,
                                                     {i: (s.link, s.etag) for i, s in saves.items()}) if saves else []
            for incident_id in unwritten:
                save = saves[incident_id]
                try:
                    if not self.ctx.state.save_link(self.tenant.tenant_id, incident_id, save.link, etag=save.etag):
                        stale.append(incident_id)
                except Exception as exc:
                    if settle:
                        self.outcomes.pop(incident_id, None)
                        self._dead_letter(incident_id, self.incidents[incident_id], exc)
                    else:
                        stale.append(incident_id)
        except Exception:
            if settle:
                raise
            log.warning("the page's link updates could not be written", exc_info=True,
                        extra={"tenantId": self.tenant.tenant_id, "action": "mirror", "outcome": "links-lost"})
            stale = list(saves)
        finally:
            self.release_leases()
        for incident_id in stale:
            self.outcomes.pop(incident_id, None)   # not mirrored until its link holds the sync
            if settle:
                self.attempt(self.incidents[incident_id], retry=True, new_links=False)

    def record(self) -> None:
        """Count the page's outcomes and clear the letters of the incidents now mirrored."""
        summary = self.summary
        for incident_id, outcome in self.outcomes.items():
            if incident_id in self.letters:
                self.ctx.state.resolve_dead_letter(self.tenant.tenant_id, "mirror", incident_id)
                self.letters.pop(incident_id, None)
            if outcome.result == "requested":
                summary.mirror_requested += 1
            if outcome.wrote_sentinel or outcome.result == "created":
                summary.mirrored += 1
            if outcome.wrote_defender:
                summary.pushed += 1
            if outcome.reason and outcome.result == "ignored" and outcome.reason not in summary.notes:
                summary.notes.append(outcome.reason)

    def _dead_letter(self, incident_id: str, incident: dict[str, Any], exc: Exception) -> None:
        letter = self.ctx.state.dead_letter(self.tenant.tenant_id, "mirror", incident_id, describe_error(exc),
                                            version=str(incident.get("lastUpdateDateTime")),
                                            backoff=not isinstance(exc, IncidentBusy))
        self.letters[incident_id] = letter
        self.summary.dead_lettered += 1
        log.warning("mirror failed", extra={"tenantId": self.tenant.tenant_id, "incidentId": incident_id,
                                            "action": "mirror", "outcome": "dead-lettered",
                                            "retryCount": letter.retry_count, "error": describe_error(exc)})


def _backing_off(letter: DeadLetter | None, incident: dict[str, Any]) -> bool:
    """Whether this very version already failed to mirror and its letter's next attempt is not due yet."""
    if letter is None or not letter.next_attempt_at or not letter.version:
        return False
    try:
        same = canonical_time(letter.version) == canonical_time(str(incident.get("lastUpdateDateTime")))
        return same and parse_time(letter.next_attempt_at) > utcnow()
    except ValueError:
        return False
