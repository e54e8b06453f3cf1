"""Sentinel → Defender: the webhook (a trigger only) and the reconcile cycle (a lost webhook only delays a change).

Neither path trusts what Sentinel sent: both only learn *which* incident changed and then re-read both sides through
:class:`~sync.incident_sync.IncidentSyncer`, so a forged, stale or replayed body cannot push a value into Defender.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta
from typing import Any

from .budget import BudgetExhausted, Deadline
from .context import AppContext
from .http import ApiError, describe_error
from .incident_sync import LINK_ACTIVE, IncidentBusy, IncidentSyncer, SyncOutcome, unchanged_since_sync
from .leases import LeaseKeeper, lease
from .mapping import SOURCE_LABEL
from .models import RequestError, TenantSummary
from .settings import TenantConfig
from .timeutil import format_time, parse_time, utcnow

log = logging.getLogger(__name__)

_INCIDENT_ID = re.compile(
    r"^(?P<workspace>/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.OperationalInsights/"
    r"workspaces/[^/]+)/providers/Microsoft\.SecurityInsights/incidents/(?P<name>[^/?#\s]+)$", re.IGNORECASE)
LEASE_SECONDS = 60.0
LISTED_PER_STEP = 20
LIST_PAGE = 1000              # incidents per page of the modified-since listing (the API's largest)
SWEEP_PER_RUN = 100           # full syncs (Graph + Sentinel reads) the sweep may start per run and tenant
SWEEP_CHECKS_PER_RUN = 2000   # cheap checks (one Sentinel GET each) per run and tenant
SWEEP_PER_STEP = 25
SWEEP_VISITS_PER_STEP = 2000  # links looked at per step (most left unread: closed long ago)
RECENTLY_CLOSED_DAYS = 7      # the sweep reads a closed incident's mirror only this long after its last sync
CLOSED_STATUSES = frozenset({"resolved"})


class WorkspaceChanges:
    """The workspace's incidents modified since a time, listed ONCE per reconcile run and shared by every tenant's
    cycle (each takes the incidents its links name): the reconcile's ARM reads grow with the changes, not with the
    tenants. A cycle asking for an earlier time than listed so far lists again from there (tenants' cursors are
    normally the same: the previous run's start). The Sentinel name -> link look-up is shared too."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._from: datetime | None = None
        self._items: list[dict[str, Any]] = []
        self.listed_at = utcnow()
        self.listings = 0
        self._links: dict[str, tuple[str, str, dict[str, Any]] | None] = {}
        self._failed: BaseException | None = None

    def since(self, lower: datetime, deadline: Deadline) -> list[dict[str, Any]]:
        """The incidents modified at or after ``lower``, oldest first. A listing that failed is not tried again by
        the other tenants of the same run (each would spend the budget on it): they fail the same way at once."""
        if self._failed is not None:
            raise self._failed
        if self._from is None or lower < self._from:
            started = utcnow()
            try:
                # Only the app's mirrors, and of each only what the reconcile reads: a first listing covers the
                # look-back of the whole workspace (every analytics rule's incidents), which kept whole would
                # hold hundreds of MB in a large one.
                self._items = [_compact(i) for i in self.ctx.sentinel.list_incidents(
                    modified_since=lower, deadline=deadline, top=LIST_PAGE) if _is_app_mirror(i)]
            except (ApiError, BudgetExhausted) as exc:
                self._failed = exc
                raise
            self._from, self.listed_at = lower, started
            self.listings += 1
        return [i for i in self._items if _modified_since(i, lower)]

    def link(self, name: str) -> tuple[str, str, dict[str, Any]] | None:
        """(tenant ID, incident ID, link) of the app's mirror ``name``, read once per run."""
        key = name.lower()
        if key not in self._links:
            self._links[key] = self.ctx.state.find_link_by_sentinel_name(name)
        return self._links[key]


def _is_app_mirror(incident: dict[str, Any]) -> bool:
    """Whether a listed incident carries the app's label (only those can be linked mirrors the reconcile syncs)."""
    labels = (incident.get("properties") or {}).get("labels") or []
    return any(isinstance(x, dict) and x.get("labelName") == SOURCE_LABEL for x in labels)


def _compact(incident: dict[str, Any]) -> dict[str, Any]:
    """The fields of a listed mirror the reconcile reads (name, modification time, labels, comment count)."""
    props = incident.get("properties") or {}
    return {"name": incident.get("name"), "properties": {
        "lastModifiedTimeUtc": props.get("lastModifiedTimeUtc"), "labels": props.get("labels"),
        "additionalData": {"commentsCount": (props.get("additionalData") or {}).get("commentsCount")}}}


def _modified_since(incident: dict[str, Any], lower: datetime) -> bool:
    """Whether the incident was modified at or after ``lower`` (an unreadable time counts as modified)."""
    try:
        return parse_time(str((incident.get("properties") or {}).get("lastModifiedTimeUtc"))) >= lower
    except ValueError:
        return True


def sweep_skips(link: dict[str, Any], now: datetime) -> bool:
    """Whether the sweep leaves this link alone without reading its mirror: closed at its last sync, and that sync
    (Defender's version or the mirror's modification) older than :data:`RECENTLY_CLOSED_DAYS`. A reopen or any
    edit that moves ``lastModifiedTimeUtc`` is still caught by the modified-since listing and the webhook."""
    base = link.get("base")
    if not isinstance(base, dict) or base.get("status") not in CLOSED_STATUSES:
        return False
    times = []
    for key in ("defenderVersion", "sentinelModified"):
        try:
            times.append(parse_time(str(link.get(key))))
        except ValueError:
            return False  # unknown: read it
    return max(times) < now - timedelta(days=RECENTLY_CLOSED_DAYS)


def incident_reference(body: dict[str, Any], workspace_id: str) -> tuple[str, str | None]:
    """(incident name, etag as sent) from a Logic App trigger body or a bare incident resource.

    Only the identity is taken from the body. Raises :class:`RequestError` 400 for a malformed body and 403 for an
    incident of another workspace.
    """
    obj = body.get("object", body)
    if not isinstance(obj, dict):
        raise RequestError(400, "invalid_body", '"object" must be the incident resource (a JSON object)')
    resource_id = obj.get("id")
    if not isinstance(resource_id, str) or not resource_id.strip():
        raise RequestError(400, "missing_incident_id", 'the body has no incident resource ID: expected "object.id" '
                           '(Logic App trigger body) or "id" (incident resource)')
    match = _INCIDENT_ID.match(resource_id.strip())
    if match is None:
        raise RequestError(400, "invalid_incident_id", "the incident ID must be a Sentinel incident ARM resource ID "
                           "(.../workspaces/<ws>/providers/Microsoft.SecurityInsights/incidents/<name>)")
    if match.group("workspace").lower() != workspace_id.lower():
        raise RequestError(403, "wrong_workspace", "the incident belongs to another workspace than "
                           "SENTINEL_WORKSPACE_ID; this webhook only serves its own workspace")
    name = match.group("name")
    declared = obj.get("name")
    if declared is not None and (not isinstance(declared, str) or declared.lower() != name.lower()):
        raise RequestError(400, "inconsistent_incident", '"name" does not match the incident resource ID')
    etag = obj.get("etag")
    if etag is not None and not isinstance(etag, str):
        raise RequestError(400, "invalid_body", '"etag" must be a string')
    properties = obj.get("properties")
    if properties is not None and not isinstance(properties, dict):
        raise RequestError(400, "invalid_body", '"properties" must be an object')
    return name, etag


def handle_webhook(ctx: AppContext, body: dict[str, Any], deadline: Deadline) -> dict[str, Any]:
    """Resolve the incident the body names and sync it. Returns the JSON answer (HTTP 200)."""
    name, etag = incident_reference(body, ctx.settings.sentinel_workspace_id)
    found = ctx.state.find_link_by_sentinel_name(name)
    if found is None:
        return {"result": "ignored", "reason": "this app does not mirror that incident", "sentinelIncident": name}
    tenant_id, incident_id, _link = found
    tenant = ctx.settings.tenant(tenant_id)
    if tenant is None:
        return {"result": "ignored", "reason": "the incident's tenant is no longer configured",
                "sentinelIncident": name}
    try:
        outcome = IncidentSyncer(ctx).sync(tenant, incident_id, deadline=deadline, trigger="webhook")
    except IncidentBusy as exc:
        # 503: the Logic App retries (its default policy retries 5xx), and the reconcile catches it regardless. The
        # running sync may have read Sentinel before this change, so answering "done" would be wrong.
        raise RequestError(503, "incident_busy", f"{exc}; retry in a few seconds") from exc
    answer = outcome.to_dict()
    if outcome.result == "unchanged" and etag and outcome.sentinel_etag and etag != outcome.sentinel_etag:
        answer["result"] = "stale"
        answer["reason"] = "the body is older than the incident in Sentinel; the current state is already in sync"
    return answer


class ReconcileCycle:
    """One tenant's Sentinel → Defender catch-up: incidents modified since the cursor, then a slow sweep of the
    tenant's mirrored incidents (comment- and label-only edits may not move ``lastModifiedTimeUtc``)."""

    def __init__(self, ctx: AppContext, tenant: TenantConfig, *, deadline: Deadline,
                 since: datetime | None = None, changes: WorkspaceChanges | None = None) -> None:
        self.ctx = ctx
        self.changes = changes or WorkspaceChanges(ctx)
        self.tenant = tenant
        self.deadline = deadline
        self.since = since
        self.summary = TenantSummary(tenant_id=tenant.tenant_id)
        self.owner = f"{ctx.instance_id}-{uuid.uuid4().hex[:8]}"
        self._lease: LeaseKeeper | None = None
        self._held = ExitStack()     # holds the lease from a successful start to finish
        self._marker: dict[str, Any] = {}
        self._listing: Iterator[dict[str, Any]] | None = None
        self._listing_started = utcnow()
        self._now = utcnow()
        self._swept = 0
        self._checked = 0
        self._syncer = IncidentSyncer(ctx)
        self._sweep: Iterator[tuple[str, dict[str, Any]]] | None = None

    def start(self) -> bool:
        store = self.ctx.state
        if not self.tenant.mirrors:
            self.summary.outcome = "skipped"
            self.summary.error = "a data-only tenant is never mirrored; nothing to reconcile"
            return False
        with ExitStack() as stack:  # a failure below gives the lease back at once
            keeper = stack.enter_context(lease(store, self.tenant.tenant_id, "reconcile", self.owner, LEASE_SECONDS))
            if keeper is None:
                self.summary.outcome = "skipped"
                self.summary.error = "another instance holds this tenant's reconcile lease; skipped"
                return False
            self._prepare()
            self._lease = keeper
            self._held = stack.pop_all()
        return True

    def _prepare(self) -> None:
        """Read the reconcile marker and open the modified-since listing."""
        self._marker = self.ctx.state.get_marker("reconcile", self.tenant.tenant_id)
        cursor = self._marker.get("cursor")
        self.summary.cursor_before = self.summary.cursor_after = cursor
        if self.since is not None:
            lower = self.since
        elif cursor:
            lower = parse_time(cursor) - timedelta(seconds=self.ctx.settings.overlap_seconds)
        else:
            lower = self._listing_started - timedelta(days=self.ctx.settings.initial_lookback_days)
        self._listing = iter(self.changes.since(lower, self.deadline))
        self._listing_started = self.changes.listed_at

    def step(self) -> bool:
        self.deadline.check(self.deadline.reserve(3.0))
        self._keep_lease()
        if self._listing is not None:
            for _ in range(LISTED_PER_STEP):
                incident = next(self._listing, None)
                if incident is None:
                    self._listing = None
                    if self.since is None:
                        self._marker["cursor"] = format_time(self._listing_started)
                        self.summary.cursor_after = self._marker["cursor"]
                    self._save_marker()
                    break
                self._reconcile_listed(incident)
            return True
        return self._sweep_step()

    def finish(self, outcome: str | None = None, error: str | None = None) -> TenantSummary:
        if outcome is not None:
            self.summary.outcome = outcome
        if error is not None:
            self.summary.error = error
        if self._lease is not None:
            try:
                if not self._lease.lost:
                    self._marker["lastRun"] = {"finishedAt": format_time(utcnow()), "outcome": self.summary.outcome}
                    self._save_marker()
            finally:
                self._held.close()
                self._lease = None
        log.info("reconcile %s", self.summary.outcome, extra={
            "tenantId": self.tenant.tenant_id, "action": "reconcile", "outcome": self.summary.outcome,
            "pushed": self.summary.pushed, "mirrored": self.summary.mirrored, "swept": self._swept})
        return self.summary

    # ------------------------------------------------------------------ internals
    def _keep_lease(self) -> None:
        assert self._lease is not None
        self._lease.check()

    def _save_marker(self) -> None:
        self.ctx.state.set_marker("reconcile", self.tenant.tenant_id, self._marker)

    def _reconcile_listed(self, incident: dict[str, Any]) -> None:
        """Sync a listed mirror (the listing holds only incidents with the app's label) if it changed since."""
        found = self.changes.link(str(incident.get("name", "")))
        if found is None or found[0] != self.tenant.tenant_id:
            return
        _tenant, incident_id, link = found
        if link.get("state") != LINK_ACTIVE or unchanged_since_sync(link, incident):
            return  # unchanged since the app last synced it (its own write included): no echo
        self._sync(incident_id, "reconcile")

    def _sweep_step(self) -> bool:
        """Walk the tenant's active links (resumably): one Sentinel GET tells whether the mirror is as the app left
        it; only a mirror that changed (or cannot tell) gets a full sync."""
        if self._swept >= SWEEP_PER_RUN or self._checked >= SWEEP_CHECKS_PER_RUN or self.since is not None:
            return False
        if self._sweep is None:
            after = str(self._marker.get("sweepAfter") or "")
            self._sweep = self.ctx.state.iter_links(self.tenant.tenant_id, after)
        checked, visited = 0, 0
        # A step reads up to SWEEP_PER_STEP mirrors; links it leaves unread (closed long ago) are cheap and do not
        # count, so the position is saved once per step, not once per 25 closed links.
        while checked < SWEEP_PER_STEP and visited < SWEEP_VISITS_PER_STEP:
            visited += 1
            item = next(self._sweep, None)
            if item is None:
                self._marker["sweepAfter"] = ""  # wrap around next run
                self._save_marker()
                return False
            incident_id, link = item
            self._marker["sweepAfter"] = incident_id
            if link.get("state") == LINK_ACTIVE and not link.get("redirected") and not sweep_skips(link, self._now):
                self._checked += 1
                checked += 1
                if self._mirror_unchanged(incident_id, link):
                    continue
                self._swept += 1
                self._sync(incident_id, "sweep")
        self._save_marker()
        return self._swept < SWEEP_PER_RUN and self._checked < SWEEP_CHECKS_PER_RUN

    def _mirror_unchanged(self, incident_id: str, link: dict[str, Any]) -> bool:
        try:
            resource = self._syncer.target.read(str(link.get("sentinelName", "")), deadline=self.deadline)
        except BudgetExhausted:
            raise
        except ApiError as exc:
            log.info("sweep could not read the mirror; syncing it instead", extra={
                "tenantId": self.tenant.tenant_id, "incidentId": incident_id, "action": "sweep",
                "outcome": "read-error", "error": describe_error(exc)})
            return False
        return resource is not None and unchanged_since_sync(link, resource)

    def _sync(self, incident_id: str, trigger: str) -> SyncOutcome | None:
        try:
            outcome = self._syncer.sync(self.tenant, incident_id, deadline=self.deadline, trigger=trigger)
        except BudgetExhausted:
            raise
        except (ApiError, ValueError) as exc:
            self.ctx.state.dead_letter(self.tenant.tenant_id, "pushback", incident_id, describe_error(exc))
            self.summary.dead_lettered += 1
            log.warning("reconcile failed for an incident", extra={
                "tenantId": self.tenant.tenant_id, "incidentId": incident_id, "action": trigger,
                "outcome": "error", "error": describe_error(exc)})
            return None
        self.ctx.state.resolve_dead_letter(self.tenant.tenant_id, "pushback", incident_id)
        self.summary.incidents += 1
        if outcome.wrote_defender:
            self.summary.pushed += 1
        if outcome.wrote_sentinel:
            self.summary.mirrored += 1
        return outcome
