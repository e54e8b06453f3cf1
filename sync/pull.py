"""One tenant's pull cycle (Defender → Log Analytics, then the mirror hook), as resumable steps.

The cycle reads the window ``[cursor - overlap, now]`` (first run: ``now - lookback``) as one keyset walk, newest
first (see ``GraphSecurityClient``); after every page the rows are stored, the versions recorded, and the keyset
position checkpointed, so a crash or a spent budget resumes where it stopped (the unfinished window is finished
first next run). The cursor moves to the window's upper bound only when the whole window is done. A version already
ingested is never ingested again; an incident that cannot be ingested is dead-lettered instead of holding the cursor.

An idle tenant is cheap, so a one-minute schedule suits many tenants: one query reads its state, lease and when its
earliest dead letter is due; one Graph request finds nothing; one ``If-Match`` write records the run. The lease
(kept in the state entity) is taken only before the first page with incidents or a due dead letter.
"""

from __future__ import annotations

import copy
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .budget import BudgetExhausted, Deadline
from .context import AppContext
from .filters import passes_filters
from .graph import IncidentPage, KeysetPosition
from .http import ApiError, describe_error
from .leases import LeaseKeeper, LeaseLost
from .models import TenantSummary
from .rows import alert_row, evidence_rows, incident_row
from .settings import TenantConfig
from .state import PULL_LETTER_KINDS, DeadLetter, IncidentVersion, StaleWrite, TenantState, run_record
from .timeutil import canonical_time, format_time, parse_time, utcnow

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
STEP_RESERVE_SECONDS = 8.0  # room to store a fetched page (the sink starts no call with < 5 s left)
#: A step stores Graph pages (50 incidents at most with alerts expanded) in groups of this many incidents (three full
#: pages; fewer at a slice's end or when the budget is short), so its fixed costs (three Logs Ingestion calls, the
#: version transaction, the checkpoint) are paid once per group: about a sixth of the pull's CPU at one page a step.
STEP_INCIDENTS = 150
#: ... and at most this long reading them: the runner interleaves tenants a step at a time, so with small pages or a
#: slow Graph a big backlog's step must not take the time of the other tenants' turns (a short budget serves them all).
STEP_READ_SECONDS = 2.0
#: Versions kept in the tenant's state (``TenantState.recent``) so the overlap's re-reads need no Table read: a
#: one-minute schedule re-reads the last few minutes' updates every run. About 15 KB of the state entity.
RECENT_VERSIONS = 300
MIRRORED_MARK = "*"
DEAD_LETTER_RETRIES_PER_RUN = 20
# Graph's clock may lag ours: an update time this close to the run's start counts as "during the run".
MIN_CLOCK_MARGIN_SECONDS = 300.0
# Marks an alert of a partly stored version whose evidence rows are stored but whose alert row is not.
EVIDENCE_ONLY = "E:"
# Marks an alert of a partly stored version some of whose evidence rows are not stored:
# "P" + ("A" when its alert row is stored) + the missing evidence indexes, comma-separated + ":" + alert version.
PART_STORED = re.compile(r"^P(A?)([0-9,]*):(.+)$")


@dataclass(frozen=True)
class HookIncident:
    """An incident version handed to the mirror hook. ``unlinked``: the pull had stored no version of it before this
    step, so it has no link (only the hook makes one, after the version is stored): its link need not be read."""

    incident: dict[str, Any]
    previous: IncidentVersion | None = None   # the version stored before this step, as looked up
    unlinked: bool = False
    link: dict[str, Any] | None = None        # its link, read with the version when ``link_read`` (None: absent)
    link_read: bool = False


#: Stored versions and, for a mirrored tenant, links (incident ID -> link or None; absent: not known) of a page.
Lookup = tuple[dict[str, IncidentVersion], dict[str, dict[str, Any] | None]]


#: The mirror hook: called once per stored page (after its rows and versions are stored) with its in-scope incidents.
IncidentHook = Callable[[TenantConfig, list[HookIncident], TenantSummary, Deadline], None]


def due_letters(letters: Iterable[DeadLetter], kinds: Iterable[str], now: datetime) -> list[DeadLetter]:
    """The letters of ``kinds`` whose next attempt is due, the longest-waiting first (a letter without a next-attempt
    time, written by an older version, is due at once)."""
    wanted, due_at = set(kinds), canonical_time(format_time(now))
    due = [d for d in letters if d.kind in wanted and canonical_time(d.next_attempt_at or due_at) <= due_at]
    return sorted(due, key=lambda d: canonical_time(d.next_attempt_at or d.last_failed_at or due_at))


class IngestError(Exception):
    """Rows could not be stored; the page is not checkpointed and is read again next time."""


@dataclass
class _Slice:
    lower: str
    upper: str
    resume: KeysetPosition | None = None
    resumed: bool = False   # a slice a previous run started: its first page may already be stored


class TenantPull:
    """Drive with :meth:`start`, then :meth:`step` until it returns False, then :meth:`finish`."""

    def __init__(self, ctx: AppContext, tenant: TenantConfig, *, deadline: Deadline, since: datetime | None = None,
                 hook: IncidentHook | None = None, now: datetime | None = None) -> None:
        self.ctx = ctx
        self.tenant = tenant
        self.deadline = deadline
        self.since = since
        self.hook = hook
        self.started = utcnow()
        self.upper = now or self.started
        self.owner = f"{ctx.instance_id}-{uuid.uuid4().hex[:8]}"
        self.summary = TenantSummary(tenant_id=tenant.tenant_id)
        self._lease: LeaseKeeper | None = None   # taken once there is work (see _take_lease)
        self._busy = False                       # another instance holds the tenant: skipped, nothing written
        self._state: TenantState | None = None
        self._confirmed: TenantState | None = None  # the progress known good: what the last write records
        self._prefetched: Lookup | None = None   # the versions (and links) _needs_writes read for this page
        self._deferred: Exception | None = None  # a failure reading on after a page: raised by the next step
        self._slice_read = False  # reading on found the slice's end: the step that stores its last pages completes it
        self._slices: list[_Slice] = []
        self._current: _Slice | None = None
        self._pages: Iterator[IncidentPage] | None = None
        self._retried = since is not None  # a one-off re-read leaves dead letters to the regular runs
        self._after_resume = False
        self._known_through: str | None = None
        self._known_before_run: tuple[str | None] | None = None  # read_through as this run found it, once known
        self._graph = ctx.graph(tenant.tenant_id)
        self._stats_base = (self._graph_stats().requests, self._graph_stats().throttled)

    def _graph_stats(self) -> Any:
        return self._graph.session.stats

    def _log(self, action: str, outcome: str, **fields: Any) -> None:
        log.info("%s %s", action, outcome, extra={"tenantId": self.tenant.tenant_id, "action": action,
                                                   "outcome": outcome, **fields})

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> bool:
        """Read the tenant's state (one query) and plan the window. False when another instance holds its lease.

        The lease is taken only once there is work (:meth:`_take_lease`), with the write that is also the run's
        first checkpoint: a tenant with nothing new costs this read, one Graph request and the last write.
        """
        state = self.ctx.state.get_tenant(self.tenant.tenant_id)
        if _held_by_another(state, self.owner):
            self._skip()
            return False
        self._state = state
        self.summary.cursor_before = state.cursor
        self.summary.cursor_after = state.cursor
        self._slices = self._plan(state)
        if not self._slices and state.cursor is None and self.since is None:
            state.cursor = format_time(self.upper)  # a zero lookback: start from now instead of never starting
            self.summary.cursor_after = state.cursor
        self._confirm(state)
        return True

    def _skip(self) -> None:
        self._busy = True
        self.summary.outcome = "skipped"
        self.summary.error = "another instance holds this tenant's lease; skipped"
        self._log("pull", "skipped-leased")

    def _plan(self, state: TenantState) -> list[_Slice]:
        """The slice a previous run left unfinished (if any), then one window up to now: the keyset walk pages
        through it, and its position is checkpointed after every page, so a large backlog stays resumable without
        spending a request per day of an empty look-back."""
        s = self.ctx.settings
        upper = self.upper
        slices: list[_Slice] = []
        if self.since is not None:
            lower = self.since
        else:
            if state.slice_lower and state.slice_upper:
                resume = KeysetPosition.from_dict(state.position) if state.position else None
                slices.append(_Slice(state.slice_lower, state.slice_upper, resume, resumed=True))
                lower = parse_time(state.slice_upper) - timedelta(seconds=s.overlap_seconds)
            elif state.cursor:
                lower = parse_time(state.cursor) - timedelta(seconds=s.overlap_seconds)
            else:
                lower = upper - timedelta(days=s.initial_lookback_days)
        if lower < upper:
            slices.append(_Slice(format_time(lower), format_time(upper)))
        return slices

    def step(self) -> bool:
        """Process one page. Returns True while work remains."""
        assert self._state is not None
        if self._busy:
            return False
        self.deadline.check(self.deadline.reserve(STEP_RESERVE_SECONDS))
        if self._lease is not None:
            self._keep_lease()
        if not self._retried:
            self._retried = True
            if self._letters_due(self._state):
                if not self._take_lease():
                    return False
                self._retry_dead_letters()
                return True
        if self._pages is None:
            if not self._slices:
                return False
            self._current = self._slices.pop(0)
            # The page after a resumed position may have been stored by the run that stopped before checkpointing.
            self._start_slice(self._current)
            self._pages = self._graph.iter_incident_pages(
                parse_time(self._current.lower), parse_time(self._current.upper), resume=self._current.resume,
                deadline=self.deadline)
        if self._deferred is not None:
            error, self._deferred = self._deferred, None
            raise error
        try:
            page = next(self._pages)
        except StopIteration:
            self._complete_slice()
            return bool(self._slices)
        self.summary.pages += 1
        page = self._read_on(page)
        for warning in page.warnings:
            self._note(warning)  # Graph's order failed us; the walk degraded instead of stalling
        if page.may_repeat:
            self._after_resume = True  # a degraded read may return incidents already stored: look them up
        if self._lease is None and not self._needs_writes(page.incidents):
            self.summary.skipped += len(page.incidents)  # all read before (the overlap): nothing to store
            self._after_resume = False
        else:
            if not self._take_lease():
                return False
            self._process(page.incidents)
            if not self._slice_read:
                self._checkpoint(page.position)
        if self._slice_read:  # the slice ended while reading on: done in this step, not one more turn
            self._complete_slice()
            return bool(self._slices)
        return True

    def _read_on(self, page: IncidentPage) -> IncidentPage:
        """``page`` joined by the slice's next pages up to :data:`STEP_INCIDENTS` incidents or
        :data:`STEP_READ_SECONDS` of reading on, resuming after the last. A failure reading on is kept for the next
        step, so the pages read are still stored (as one page a step did)."""
        assert self._pages is not None
        pages = [page]
        read_until = self.deadline.remaining() - STEP_READ_SECONDS
        while (sum(len(p.incidents) for p in pages) < STEP_INCIDENTS and self.deadline.remaining() > read_until
               and not self.deadline.expired(2 * self.deadline.reserve(STEP_RESERVE_SECONDS))):
            try:
                pages.append(next(self._pages))
            except StopIteration:
                self._slice_read = True
                break
            except Exception as exc:  # ApiError, BudgetExhausted, ...: what the next step's read would have raised
                self._deferred = exc
                break
            self.summary.pages += 1
        if len(pages) == 1:
            return page
        last = pages[-1]
        return IncidentPage([i for p in pages for i in p.incidents], last.position, sum(p.requests for p in pages),
                            next((p.degraded for p in reversed(pages) if p.degraded), None),
                            [w for p in pages for w in p.warnings], any(p.may_repeat for p in pages))

    def _needs_writes(self, incidents: list[dict[str, Any]]) -> bool:
        """Whether a page holds anything to store or mirror (then the lease is needed); the versions read to tell
        are kept for :meth:`_process`. A page of incidents re-read in the overlap, stored and mirrored by a step
        that completed, costs their look-ups only."""
        self._prefetched = None  # never another page's versions
        if not incidents:
            return False
        if any(not isinstance(i, dict) or "_alertsError" in i or not self._may_be_known(i) for i in incidents):
            return True
        hooked = self._hooked()
        if hooked and self._may_repeat() and any(passes_filters(self.tenant, i) for i in incidents):
            return True
        if self._all_recent(incidents):
            return False
        self._prefetched = self._look_up([str(i.get("id")) for i in incidents])
        versions = self._prefetched[0]
        return not all(self._nothing_to_do(i, versions.get(str(i.get("id"))), hooked) for i in incidents)

    def _look_up(self, incident_ids: list[str]) -> Lookup:
        """The stored versions of these incidents; with their links in the same reads when the tenant mirrors (the
        hook needs the link of every update: the merge base)."""
        if self._hooked():
            return self.ctx.state.get_versions_and_links(self.tenant.tenant_id, incident_ids)
        return self.ctx.state.get_versions(self.tenant.tenant_id, incident_ids), {}

    def _nothing_to_do(self, incident: dict[str, Any], stored: IncidentVersion | None, hooked: bool) -> bool:
        """Whether this version is stored in full and, when the tenant mirrors it now, was handed to the hook."""
        return _already_ingested(incident, stored) and not (hooked and _to_mirror(self.tenant, incident, stored))

    def _hooked(self) -> bool:
        """Whether stored versions are handed to the mirror hook."""
        return self.hook is not None and self.tenant.mirrors

    def _may_repeat(self) -> bool:
        """Whether this step may re-read versions a step that did not complete stored (a resumed slice, a degraded
        read, a one-off re-read): their hook may not have run, so they are handed to it again. A resumed slice is
        one throughout: the step that stopped may have joined more pages than the first step now reads."""
        return self.since is not None or self._after_resume or (self._current is not None and self._current.resumed)

    def finish(self, outcome: str | None = None, error: str | None = None) -> TenantSummary:
        """Record the run with the cursor and give the lease back, in one ``If-Match`` write; return the summary."""
        stats = self._graph_stats()
        self.summary.requests = stats.requests - self._stats_base[0]
        self.summary.throttled = stats.throttled - self._stats_base[1]
        if outcome is not None and not self._busy:
            self.summary.outcome = outcome
        if error is not None and not self._busy:
            self.summary.error = error
        if self._state is not None and not self._busy:
            try:
                if self._lease is None or not self._lease.lost:  # the new owner's progress is not ours to overwrite
                    self._record_run()
            finally:
                if self._lease is not None:
                    self._lease.release()
                    self._lease = None
        self._log("pull", self.summary.outcome, incidents=self.summary.incidents, alerts=self.summary.alerts,
                  evidence=self.summary.evidence, pages=self.summary.pages, throttled=self.summary.throttled,
                  deadLettered=self.summary.dead_lettered, cursor=self.summary.cursor_after)
        return self.summary

    # ------------------------------------------------------------------ internals
    def _record_run(self) -> None:
        """The run's last write: the progress last confirmed (never what a failed step left in memory), the run
        record, and the lease given back."""
        assert self._confirmed is not None
        final = copy.deepcopy(self._confirmed)
        final.last_run = run_record(self.started, utcnow(), self.summary.outcome,
                                    {k: v for k, v in self.summary.to_dict().items() if k != "notes"})
        final.lease_owner = final.lease_expires_at = None
        if self._lease is None:
            try:  # If-Match on the state as this run read it
                self.ctx.state.save_tenant(final)
            except StaleWrite:
                self._note("another instance served this tenant meanwhile; this run's record was not kept")
                return
        else:
            with self._lease.guard:
                final.etag = self._lease.lease.etag
                try:
                    self.ctx.state.save_tenant(final)
                except StaleWrite as exc:
                    raise LeaseLost(str(exc)) from exc
                self._lease.lease.etag = final.etag  # a renewal racing the release must not read as a lost lease
                self._lease.lease.released = True
        self.summary.cursor_after = final.cursor

    def _take_lease(self) -> bool:
        """Take the tenant's lease before the first write that matters (a stored page, a retried letter), with one
        write of the state as read, which also records what :meth:`_start_slice` prepared. False (the run is then
        skipped) when another instance took the tenant since this run read its state."""
        if self._lease is not None:
            return True
        assert self._state is not None
        taken = self.ctx.state.take_tenant_lease(self._state, self.owner, LEASE_SECONDS)
        if taken is None:
            self._skip()
            return False
        self._lease = LeaseKeeper(self.ctx.state, taken, LEASE_SECONDS)
        self._confirm(self._state)
        return True

    def _letters_due(self, state: TenantState) -> bool:
        """Whether the dead-letter table must be read this run: a pending letter is due, or the tenant's state
        predates the due-time row (then the read records it)."""
        if not state.letters_tracked:
            return True
        if state.letters_due_at is None:
            return False
        try:
            return parse_time(state.letters_due_at) <= utcnow()
        except ValueError:
            return True

    def _persist(self, state: TenantState) -> None:
        """Store progress now when the lease is held; before that (nothing stored yet) keep it for the last write."""
        if self._lease is not None:
            self._save(state)
        else:
            self._confirm(state)

    def _confirm(self, state: TenantState) -> None:
        self._confirmed = copy.deepcopy(state)

    def _save(self, state: TenantState) -> None:
        """Store progress (renewing the lease with it), but never once the lease is lost: another instance owns the
        tenant's state now."""
        self._keep_lease()
        assert self._lease is not None
        with self._lease.guard:
            held = self._lease.lease
            expires = utcnow() + timedelta(seconds=LEASE_SECONDS)
            state.etag, state.lease_owner, state.lease_expires_at = held.etag, self.owner, format_time(expires)
            try:
                self.ctx.state.save_tenant(state)
            except StaleWrite as exc:
                raise LeaseLost(str(exc)) from exc
            assert state.etag is not None
            held.etag, held.expires_at = state.etag, expires
        self._confirm(state)

    def _keep_lease(self) -> None:
        assert self._lease is not None
        self._lease.check()

    def _complete_slice(self) -> None:
        """The whole slice is done: the cursor may move to its upper bound."""
        assert self._state is not None and self._current is not None
        state = self._state
        done = self._current.upper
        # A one-off re-read ("since") may move the cursor forward only when it started at or before the cursor:
        # otherwise the time between the cursor and "since" was never read.
        contiguous = self.since is None or (state.cursor is not None
                                            and self.since <= parse_time(state.cursor))
        if contiguous and (state.cursor is None or canonical_time(done) > canonical_time(state.cursor)):
            state.cursor = done
        if self.since is None:
            state.slice_lower = state.slice_upper = state.slice_known_through = None
            state.position = None
        self._persist(state)
        self.summary.cursor_after = state.cursor
        self._pages = None
        self._current = None
        self._slice_read = False

    def _checkpoint(self, position: KeysetPosition | None) -> None:
        assert self._state is not None and self._current is not None
        if self.since is not None:
            return  # a one-off re-read never moves the stored progress
        state = self._state
        state.slice_lower, state.slice_upper = self._current.lower, self._current.upper
        state.position = position.to_dict() if position is not None else None
        if self._lease is not None:  # before the lease nothing was stored: the lease's write records it
            self._save(state)

    def _retry_dead_letters(self) -> None:
        """Retry incidents whose alerts could not be read or whose rows were refused, and failed mirrors, before new
        work, the longest-waiting first. Every attempt either resolves the letter or counts it (moving it behind the
        others), so no letter holds the tenant back: ingest letters are given up in the end, mirror letters are
        retried with backoff until the incident is mirrored or gone."""
        store = self.ctx.state
        tid = self.tenant.tenant_id
        pending = [d for d in store.dead_letters(tid, pending_only=True) if d.kind in PULL_LETTER_KINDS]
        letters = due_letters(pending, PULL_LETTER_KINDS, utcnow())[:DEAD_LETTER_RETRIES_PER_RUN]
        assert self._state is not None
        if not letters:  # nothing to try: record when the next one is due, so idle runs skip this read until then
            store.set_letters_due(self._state, min((canonical_time(d.next_attempt_at or d.last_failed_at)
                                                    for d in pending), default=None))
        # After attempts the row stays as due as it was (or as a failed attempt made it): the next run reads again.
        self._state.letters_tracked = True
        assert self._confirmed is not None
        self._confirmed.letters_tracked = True
        for letter in letters:
            self.deadline.check(self.deadline.reserve(STEP_RESERVE_SECONDS))
            try:
                incident = self._graph.get_incident(letter.key, deadline=self.deadline, expand_alerts=True)
            except ApiError as exc:
                store.dead_letter(tid, letter.kind, letter.key, describe_error(exc), version=letter.version)
                continue
            # Filters decide the mirror only: an incident letter outside them is still ingested.
            out_of_scope = letter.kind == "mirror" and (
                self.hook is None or not self.tenant.mirrors or not passes_filters(self.tenant, incident or {}))
            if incident is None or out_of_scope:
                store.resolve_dead_letter(tid, letter.kind, letter.key)  # gone, or no longer to be synced
                continue
            if letter.kind == "mirror":
                assert self.hook is not None
                self.hook(self.tenant, [HookIncident(incident)], self.summary, self.deadline)
                continue
            self._after_resume = True  # an older version of it may be stored: look it up
            stored = letter.key in self._process([incident])
            if stored or (letter.kind == "incident" and "_alertsError" not in incident):
                # Stored now, or its alerts were read and its rows refused: an "ingest" letter carries it on.
                store.resolve_dead_letter(tid, letter.kind, letter.key)

    def _process(self, page: Iterable[dict[str, Any]]) -> set[str]:
        """Ingest (and mirror) a page of incidents; returns the IDs now stored or already stored before."""
        tenant = self.tenant
        store = self.ctx.state
        incidents = [i for i in page if isinstance(i, dict)]
        ids_seen: set[str] = set()
        versions, links = self._prefetched if self._prefetched is not None else self._look_up(
            [str(i.get("id")) for i in incidents if self._may_be_known(i)])
        self._prefetched = None
        hooked, repeat = self._hooked(), self._may_repeat()
        self._after_resume = False
        read_at = utcnow()
        rows: dict[str, list[dict[str, Any]]] = {"DefenderIncidents_CL": [], "DefenderAlerts_CL": [],
                                                 "DefenderEvidence_CL": []}
        pending: dict[str, IncidentVersion] = {}
        in_scope: list[HookIncident] = []
        for incident in incidents:
            incident_id = str(incident.get("id"))
            if "_alertsError" in incident:
                self._dead_letter("incident", incident_id, str(incident["_alertsError"]),
                                  incident.get("lastUpdateDateTime"))
                continue
            # The tables receive every incident; the filters decide only what is mirrored.
            previous = versions.get(incident_id)
            in_filters = passes_filters(tenant, incident)
            if not in_filters:
                self.summary.filtered += 1
            to_mirror = hooked and in_filters
            try:
                built = self._rows_for(incident, previous, read_at)
            except ValueError as exc:
                self._dead_letter("incident", incident_id, f"unusable incident: {exc}",
                                  incident.get("lastUpdateDateTime"))
                continue
            if to_mirror and (built is not None or repeat or previous is None or not previous.mirrored):
                # Not when its stored version was handed to the hook by a step that completed (the hook ran, or
                # left a mirror dead letter that the letters' retry takes up).
                in_scope.append(HookIncident(incident, previous, unlinked=previous is None,
                                             link=links.get(incident_id), link_read=incident_id in links))
            if built is None:
                self.summary.skipped += 1
                ids_seen.add(incident_id)
                continue
            version, incident_rows, alert_rows, ev_rows = built
            version.mirrored = to_mirror
            rows["DefenderIncidents_CL"].extend(incident_rows)
            rows["DefenderAlerts_CL"].extend(alert_rows)
            rows["DefenderEvidence_CL"].extend(ev_rows)
            pending[incident_id] = version
        failed, rejected, budget_spent, lost = self._upload(rows)
        missing: dict[str, list[int]] = {}  # alert ID -> indexes of its evidence rows not stored
        for row in rows["DefenderEvidence_CL"]:
            if ("evidence-row", str(row.get("RecordId"))) in lost:
                missing.setdefault(str(row.get("AlertId")), []).append(int(row.get("EvidenceIndex") or 0))
        stored: list[IncidentVersion] = []
        partial: list[IncidentVersion] = []
        for incident_id, version in pending.items():
            if incident_id not in failed:
                stored.append(version)
                continue
            # Part of it was stored: remember exactly which rows, so a retry sends only the rest (no duplicates).
            kept = {a: _stored_part(a, v, lost, missing) for a, v in version.alerts.items()}
            partial.append(IncidentVersion(incident_id, version.last_update, kept, partial=True,
                                           incident_row_stored=("incident", incident_id) not in lost))
        if stored or partial:
            for incident_id in store.save_versions(tenant.tenant_id, stored + partial):
                self._note(f"incident {incident_id}: too many alerts to remember their versions; unchanged alerts "
                           "are written again with its next version")
        self.summary.incidents += len(stored) + sum(1 for v in partial if v.incident_row_stored)
        self.summary.alerts += sum(1 for r in rows["DefenderAlerts_CL"] if ("alert", r.get("AlertId")) not in lost)
        self.summary.evidence += len(rows["DefenderEvidence_CL"]) - sum(map(len, missing.values()))
        if budget_spent:
            raise BudgetExhausted("time budget spent while storing rows; the page is read again next run")
        transient = {k: v for k, v in failed.items() if k not in rejected}
        for incident_id in rejected:
            # The service rejected this incident's rows as content: park it and move on, never freeze the cursor.
            self._dead_letter("ingest", incident_id, failed[incident_id],
                              pending[incident_id].last_update if incident_id in pending else None)
        if transient:
            raise IngestError(f"{len(transient)} incident(s) could not be stored in Log Analytics "
                              f"({next(iter(transient.values()))}); the page is read again next run")
        hook_page = [h for h in in_scope if str(h.incident.get("id")) not in failed]
        if self.hook is not None and hook_page:
            self.hook(tenant, hook_page, self.summary, self.deadline)
        self._remember(stored)
        return {v.incident_id for v in stored} | ids_seen

    def _remember(self, stored: list[IncidentVersion]) -> None:
        """Keep the versions this step stored in full (and handed to the hook) in the tenant's state, written with
        the step's checkpoint: the next runs' overlap re-reads them, and :meth:`_all_recent` answers those."""
        assert self._state is not None
        recent = self._state.recent
        for v in stored:
            recent[v.incident_id] = v.last_update + (MIRRORED_MARK if v.mirrored else "")
        if len(recent) > RECENT_VERSIONS:
            kept = sorted(recent.items(), key=lambda item: item[1].rstrip(MIRRORED_MARK))[-RECENT_VERSIONS:]
            self._state.recent = dict(kept)

    def _all_recent(self, incidents: list[dict[str, Any]]) -> bool:
        """Whether every incident of the page is a version a completed step stored in full (and handed to the hook
        when the tenant mirrors it now): nothing to store or mirror, known without reading the versions."""
        assert self._state is not None
        recent, hooked = self._state.recent, self._hooked()
        for incident in incidents:
            incident_id = str(incident.get("id"))
            entry = recent.get(incident_id)
            if entry is None:
                return False
            remembered = IncidentVersion(incident_id, entry.rstrip(MIRRORED_MARK),
                                         mirrored=entry.endswith(MIRRORED_MARK))
            if not self._nothing_to_do(incident, remembered, hooked):
                return False
        return True

    def _start_slice(self, current: _Slice) -> None:
        """Record that a slice is being read before its first page is stored (with the lease's write when this run
        has not taken it yet), so a crash inside it is recognised and the next run knows which incidents it may
        already have seen."""
        assert self._state is not None
        state = self._state
        self._after_resume = current.resumed
        if self._known_before_run is None:
            self._known_before_run = (state.read_through,)
        if current.resumed:
            self._known_through = state.slice_known_through
            return
        self._known_through = state.read_through
        if state.read_through is None or canonical_time(current.upper) > canonical_time(state.read_through):
            state.read_through = current.upper
        if self.since is None:
            state.slice_known_through = self._known_through
            self._checkpoint(None)
            return
        if state.slice_lower and (state.slice_known_through is None
                                  or canonical_time(current.upper) > canonical_time(state.slice_known_through)):
            # A regular slice is paused: what this re-read stores must count as known when it resumes.
            state.slice_known_through = current.upper
        if self._lease is not None:  # else the lease's write records it, before any page is stored
            self._save(state)

    def _may_be_known(self, incident: dict[str, Any]) -> bool:
        """Whether the state may hold a version of this incident, so it must be looked up.

        Every version the app ever read came from a window that ended at or before ``read_through`` as it was when
        this slice started, or from the one page after a resumed position: an incident created after that was never
        read (all times here are Graph's own clock). Within this run, a slice read before this one could only have
        seen this incident at its current version on the boundary they share (an update time at this slice's
        lower bound), or at an older version if it was updated after this run began; anything else created after
        ``read_through`` as the run found it was never read. A backfill is thus spared a Table read per incident,
        while the steady-state updates of older incidents are still looked up.
        """
        if self.since is not None or self._after_resume:
            return True
        if self._known_through is None:
            return False
        try:
            created = canonical_time(str(incident.get("createdDateTime")))
            if created > canonical_time(self._known_through):
                return False
            assert self._current is not None
            before_run = self._known_before_run[0] if self._known_before_run is not None else None
            if self._current.resumed or (before_run is not None and created <= canonical_time(before_run)):
                return True  # earlier runs may have read it
            updated = canonical_time(str(incident.get("lastUpdateDateTime")))
            margin = timedelta(seconds=max(self.ctx.settings.overlap_seconds, MIN_CLOCK_MARGIN_SECONDS))
            return (updated <= canonical_time(self._current.lower)
                    or updated >= canonical_time(format_time(self.started - margin)))
        except ValueError:
            return True

    def _rows_for(self, incident: dict[str, Any], previous: IncidentVersion | None, read_at: datetime
                  ) -> tuple[IncidentVersion, list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]] | None:
        """Rows for what is new in this version, or None when this version was already ingested."""
        incident_id = str(incident.get("id"))
        version = canonical_time(str(incident.get("lastUpdateDateTime")))
        if _already_ingested(incident, previous):
            return None
        t = self.tenant
        resumed = previous is not None and previous.last_update == version  # a partly stored version
        incident_rows = [] if resumed and previous is not None and previous.incident_row_stored else [
            incident_row(incident, tenant_id=t.tenant_id, tenant_name=t.name, read_at=read_at)]
        alert_versions = dict(previous.alerts) if previous is not None else {}
        new_alerts: list[dict[str, Any]] = []
        new_evidence: list[dict[str, Any]] = []
        for alert in incident.get("alerts") or []:
            if not isinstance(alert, dict) or not alert.get("id"):
                continue
            alert_id = str(alert["id"])
            raw_time = alert.get("lastUpdateDateTime") or alert.get("createdDateTime")
            alert_version = canonical_time(str(raw_time)) if raw_time else version
            stored_as = alert_versions.get(alert_id, "")
            part = PART_STORED.match(stored_as)
            if part is not None and part.group(3) == alert_version:  # send only the rows still missing
                if not part.group(1):
                    new_alerts.append(alert_row(alert, incident_id=incident_id, tenant_id=t.tenant_id,
                                                tenant_name=t.name, read_at=read_at))
                missing = {int(i) for i in part.group(2).split(",") if i}
                new_evidence.extend(r for r in evidence_rows(alert, incident_id=incident_id, tenant_id=t.tenant_id,
                                                             tenant_name=t.name, read_at=read_at)
                                    if r.get("EvidenceIndex") in missing)
                alert_versions[alert_id] = alert_version
                continue
            if part is not None:
                stored_as = ""  # a part of an older version: this one is new
            evidence_stored = stored_as == EVIDENCE_ONLY + alert_version  # the alert row is still to send
            if not evidence_stored and stored_as >= alert_version and not stored_as.startswith(EVIDENCE_ONLY):
                continue
            new_alerts.append(alert_row(alert, incident_id=incident_id, tenant_id=t.tenant_id, tenant_name=t.name,
                                        read_at=read_at))
            if not evidence_stored:
                new_evidence.extend(evidence_rows(alert, incident_id=incident_id, tenant_id=t.tenant_id,
                                                  tenant_name=t.name, read_at=read_at))
            alert_versions[alert_id] = alert_version
        return IncidentVersion(incident_id, version, alert_versions), incident_rows, new_alerts, new_evidence

    def _upload(self, rows: dict[str, list[dict[str, Any]]]
                ) -> tuple[dict[str, str], set[str], bool, set[tuple[str, str]]]:
        """Send the rows, evidence first and incidents last, stopping at the first table that fails for a reason
        other than its content: an incident row is then only stored once all its alert and evidence rows are.

        Returns ({incident ID: error} for every incident with a row not stored, the incidents whose rows were
        rejected as content, whether the budget ran out, and the ("incident", ID) / ("alert", ID) rows not stored).
        """
        failed: dict[str, str] = {}
        rejected: set[str] = set()
        lost: set[tuple[str, str]] = set()
        budget_spent = False
        error = "not sent: an earlier table of this page failed"
        for table in ("DefenderEvidence_CL", "DefenderAlerts_CL", "DefenderIncidents_CL"):
            table_rows = rows[table]
            if not table_rows:
                continue
            if failed.keys() - rejected or budget_spent:
                result_failed, result_rejected = table_rows, []  # not sent after an earlier outage
            else:
                result = self.ctx.sink.upload(table, table_rows, deadline=self.deadline)
                result_failed, result_rejected = result.failed_rows, result.rejected_rows
                budget_spent = budget_spent or result.budget_spent
                error = "; ".join(result.errors)[:500] or "upload failed"
            for row in result_failed:
                failed.setdefault(str(row.get("IncidentId")), error)
                kind = {"DefenderIncidents_CL": "incident", "DefenderAlerts_CL": "alert"}.get(table, "evidence")
                lost.add((kind, str(row.get("IncidentId" if kind == "incident" else "AlertId"))))
                if kind == "evidence":
                    lost.add(("evidence-row", str(row.get("RecordId"))))
            rejected.update(str(row.get("IncidentId")) for row in result_rejected)
        # An incident whose alert rows failed keeps its incident row back too (it is sent with the retry).
        for incident_id in failed:
            for row in rows["DefenderIncidents_CL"]:
                if str(row.get("IncidentId")) == incident_id:
                    lost.add(("incident", incident_id))
        return failed, rejected, budget_spent, lost

    def _note(self, text: str) -> None:
        """Say a degradation once in the run's summary (and the log), without failing the run."""
        if text not in self.summary.notes:
            self.summary.notes.append(text)
            self._log("degraded", "noted", note=text)

    def _dead_letter(self, kind: str, key: str, error: str, version: object) -> None:
        self.ctx.state.dead_letter(self.tenant.tenant_id, kind, key, error,
                                   version=str(version) if version else None)
        self.summary.dead_lettered += 1
        self._log("dead-letter", kind, incidentId=key, error=error[:300])


def _stored_part(alert_id: str, alert_version: str, lost: set[tuple[str, str]], missing: dict[str, list[int]]
                 ) -> str:
    """What a partly stored version records for one alert (see :data:`EVIDENCE_ONLY`, :data:`PART_STORED`)."""
    alert_stored = ("alert", alert_id) not in lost
    if alert_id not in missing:
        return alert_version if alert_stored else EVIDENCE_ONLY + alert_version
    return f"P{'A' if alert_stored else ''}{','.join(map(str, sorted(missing[alert_id])))}:{alert_version}"


def _already_ingested(incident: dict[str, Any], previous: IncidentVersion | None) -> bool:
    """Whether this version of the incident (or a later one) was stored in full already."""
    if previous is None:
        return False
    try:
        version = canonical_time(str(incident.get("lastUpdateDateTime")))
    except ValueError:
        return False
    return previous.last_update > version or (previous.last_update == version and not previous.partial)


def _to_mirror(tenant: TenantConfig, incident: dict[str, Any], stored: IncidentVersion | None) -> bool:
    """Whether an in-scope incident still has to be handed to the hook although this version is stored: the step
    that stored it did not hand it over (data-only then, or outside the filters then, or an older app)."""
    return passes_filters(tenant, incident) and not (stored is not None and stored.mirrored)


def _held_by_another(state: TenantState, owner: str) -> bool:
    """Whether the tenant's lease (kept in its state) is held by another owner and not yet expired."""
    if not state.lease_owner or state.lease_owner == owner or not state.lease_expires_at:
        return False
    try:
        return parse_time(state.lease_expires_at) > utcnow()
    except ValueError:
        return False


__all__ = ["ApiError", "BudgetExhausted", "HookIncident", "IncidentHook", "IngestError", "LeaseLost", "TenantPull"]
