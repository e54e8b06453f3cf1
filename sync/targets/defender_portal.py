"""The ``defender-portal`` mirror target: mirrors that analysts see in the unified Defender portal.

In a workspace onboarded to the Defender portal, an incident created through the Sentinel API is never shown in the
incident queue. So this target never creates one: for a Defender incident without a mirror it records a *request*
(:mod:`sync.mirror_requests`); the request row goes to ``DefenderMirrorRequests_CL``; the mirror analytics rule (NRT,
one alert and one incident per row, excluded from correlation) creates the incident; the app finds it by the rule's
ID, reads its alerts once, and links it by the alert's ``alertLink`` (the Defender portal link, with ``tid``). From
then on the incident is kept current exactly as in ``sentinel-api`` mode: the reads, merge, writes and comments are
:class:`~sync.targets.sentinel_api.SentinelTarget`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..budget import BudgetExhausted, Deadline
from ..http import ApiError, describe_error
from ..leases import LeaseKeeper, lease
from ..mapping import DUPLICATE_LABEL, comment_guid, cut_text
from ..mirror_requests import (
    LINKED,
    WAITING,
    MirrorRequest,
    MirrorRequestStore,
    RequestDispatcher,
    RequestSummary,
    due_for_rerequest,
    expired_link,
    link_window_start,
)
from ..rows import mirror_request_row
from ..sentinel import SentinelClient
from ..settings import TenantConfig
from ..timeutil import format_time
from .sentinel_api import SentinelTarget

log = logging.getLogger(__name__)

REQUEST_DESCRIPTION_CHARS = 4_000   # the request row's description; the full one is written once linked
# What the mirror rule's incident holds when it is created: the first sync merges against it.
RULE_CREATED_BASE: dict[str, Any] = {"status": "active", "owner": None, "classification": None,
                                     "determination": None, "tags": []}
RULE_CHECK_SECONDS = 300.0
LINK_EVERY_SECONDS = 60.0
PHASE_LEASE_SECONDS = 60.0


def rule_name(resource_id: object) -> str:
    """The last path segment of an analytics rule resource ID, lower-case."""
    return str(resource_id or "").rstrip("/").rsplit("/", 1)[-1].lower()


def alert_link_source(url: object) -> tuple[str, str] | None:
    """(tenant ID lower-case, incident ID) from a Defender portal incident link such as
    ``https://security.microsoft.com/incidents/123?tid=<tenant>``; None when the link names no incident or tenant."""
    if not isinstance(url, str) or not url.strip():
        return None
    parts = urlsplit(url.strip())
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) < 2 or segments[-2].lower() != "incidents" or not segments[-1]:
        return None
    tids = [v for k, vs in parse_qs(parts.query).items() if k.lower() == "tid" for v in vs]
    if not tids or not tids[0].strip():
        return None
    return tids[0].strip().lower(), segments[-1]


class DefenderPortalTarget(SentinelTarget):
    """Mirrors created by the mirror rule from request rows, never through the API; updated like any mirror."""

    def __init__(self, client: SentinelClient, rule_id: str, requests: MirrorRequestStore,
                 clock: Callable[[], datetime]) -> None:
        super().__init__(client)
        self.rule_id = rule_id.lower()
        self.requests = requests
        self.clock = clock

    def is_own(self, resource: dict[str, Any]) -> bool:
        """Whether an incident was created by the mirror rule (the app's own, although its provider name is
        ``Microsoft XDR`` like the built-in connector's)."""
        rules = (resource.get("properties") or {}).get("relatedAnalyticRuleIds") or []
        return isinstance(rules, list) and any(rule_name(r) == self.rule_id for r in rules)

    def excluded_from_builtin(self, resource: dict[str, Any]) -> bool:
        return self.is_own(resource)

    def is_own_mirror(self, tenant_id: str, incident_id: str, *, deadline: Deadline,
                      defender: dict[str, Any] | None = None) -> bool:
        """In a unified-portal workspace every mirror the rule makes is also a Defender incident of the workspace's
        own tenant. When that tenant is synced too, such an incident must never be mirrored (a mirror of a mirror,
        then of that one, without end)."""
        return any(self.is_own(i) for i in self.provider_matches(tenant_id, incident_id, deadline=deadline,
                                                                  defender=defender))

    def request_mirror(self, tenant: TenantConfig, defender: dict[str, Any]) -> bool:
        """Record that this Defender incident waits for a mirror (refreshing the order fields and row of a waiting
        request with the latest version). Always True: the mirror rule makes the mirror, never the API."""
        now = self.clock()
        row = mirror_request_row(defender, tenant_id=tenant.tenant_id, tenant_name=tenant.name,
                                 request_id="pending", now=now)
        for key in ("TimeGenerated", "RequestId", "RecordId"):
            row.pop(key, None)
        if isinstance(row.get("Description"), str):
            row["Description"] = cut_text(row["Description"], REQUEST_DESCRIPTION_CHARS)
        request = MirrorRequest(
            tenant_id=tenant.tenant_id, incident_id=str(defender.get("id")), state=WAITING,
            open=str(defender.get("status") or "").lower() not in ("resolved", "redirected"),
            severity=str(defender.get("severity") or "unknown"),
            created=str(defender.get("createdDateTime") or ""), row=row)
        if not self.requests.record(request):
            raise ApiError(f"incident {request.incident_id}: its mirror request changed meanwhile; will retry")
        return True


Syncer = Callable[[TenantConfig, str, Deadline], Any]


class MirrorLinker:
    """Finds the mirror rule's new incidents and links each to its Defender incident, once."""

    def __init__(self, target: DefenderPortalTarget, state: Any, tenants: Callable[[str], TenantConfig | None],
                 sync: Syncer) -> None:
        self.target = target
        self.client = target.client
        self.state = state
        self.tenants = tenants
        self.sync = sync
        self._settled: set[str] = set()   # incident names linked, closed as duplicates, or left alone
        self._lock = threading.Lock()

    def link(self, since: datetime, deadline: Deadline, result: RequestSummary) -> None:
        """Link every incident of the mirror rule created since ``since`` (oldest first: the earliest created
        incident of a source is the one kept)."""
        with self._lock:
            for incident in self.client.list_incidents_created(since, deadline=deadline):
                name = str(incident.get("name"))
                if name.lower() in self._settled or not self.target.is_own(incident):
                    continue
                found = self.state.find_link_by_sentinel_name(name)
                if found is not None:
                    self._settled.add(name.lower())
                    self._mark_linked(found[0], found[1], name)
                    continue
                if self.state.get_marker("mirror-rule-incident", name.lower()):
                    self._settled.add(name.lower())
                    continue
                self._link_one(incident, deadline, result)

    def _link_one(self, incident: dict[str, Any], deadline: Deadline, result: RequestSummary) -> None:
        name = str(incident.get("name"))
        alerts = self.client.list_incident_alerts(name, deadline=deadline)
        if not alerts:
            return  # its alert is not readable yet: looked at again on the next pass, never given up on
        sources = {s for s in (alert_link_source((a.get("properties") or {}).get("alertLink")) for a in alerts) if s}
        tenant = self.tenants(next(iter(sources))[0]) if len(sources) == 1 else None
        if tenant is None:
            # A summary alert (a rule run over 30 rows), a link to nothing the app requested, or an edited link.
            self._leave_alone(name, "its alert names no Defender incident the app mirrors" if len(sources) <= 1
                              else "its alerts name several Defender incidents", result)
            return
        incident_id = next(iter(sources))[1]
        existing = self.state.get_link(tenant.tenant_id, incident_id)
        if existing is not None and existing.get("sentinelName") and str(existing["sentinelName"]).lower() != \
                name.lower() and existing.get("state") == "active":
            self._close_duplicate(incident, existing, tenant, incident_id, deadline)
            result.duplicates += 1
            return
        # The base is what the rule created (New, no owner, no tags): an analyst's edit made before the link is a
        # Sentinel change and merges as one; a base of None would let Defender overwrite it.
        link = {"sentinelName": name, "state": "active", "base": RULE_CREATED_BASE, "origin": "mirror-rule",
                "createdTimeUtc": (incident.get("properties") or {}).get("createdTimeUtc")}
        if not self.state.save_link(tenant.tenant_id, incident_id, link, etag=None):
            return  # another instance linked it meanwhile; the next pass sees the result
        self._settled.add(name.lower())
        self._mark_linked(tenant.tenant_id, incident_id, name)
        result.linked += 1
        log.info("mirror linked", extra={"tenantId": tenant.tenant_id, "incidentId": incident_id,
                                         "action": "mirror-link", "outcome": "linked", "sentinelIncident": name})
        try:
            self.sync(tenant, incident_id, deadline)  # title, description, status, owner, labels, comments
        except BudgetExhausted:
            raise
        except Exception as exc:  # linked: the next pull version, the reconcile sweep or a re-run completes it
            log.warning("linked mirror could not be synced yet", extra={
                "tenantId": tenant.tenant_id, "incidentId": incident_id, "action": "mirror-link",
                "outcome": "sync-failed", "error": describe_error(exc)})

    def _mark_linked(self, tenant_id: str, incident_id: str, name: str) -> None:
        """The request of a linked incident is done (never re-requested); a lost ETag race is retried next pass."""
        request = self.target.requests.get(tenant_id, incident_id)
        if request is not None and request.state != LINKED:
            request.state, request.linked_at, request.sentinel_name = LINKED, format_time(self.target.clock()), name
            self.target.requests.save(request)

    def _leave_alone(self, name: str, reason: str, result: RequestSummary) -> None:
        result.left_alone += 1
        self._settled.add(name.lower())
        self.state.set_marker("mirror-rule-incident", name.lower(), {"outcome": "left-alone", "reason": reason})
        log.warning("mirror rule incident left alone: %s", reason, extra={
            "action": "mirror-link", "outcome": "left-alone", "sentinelIncident": name})

    def _close_duplicate(self, incident: dict[str, Any], kept_link: dict[str, Any], tenant: TenantConfig,
                         incident_id: str, deadline: Deadline) -> None:
        """A second incident for one source (a request sent or ingested twice): closed as Undetermined with the
        label ``duplicate`` and a comment naming the kept one."""
        name = str(incident.get("name"))
        kept_name = str(kept_link["sentinelName"])
        kept = self.client.get_incident(kept_name, deadline=deadline)
        number = ((kept or {}).get("properties") or {}).get("incidentNumber")
        text = (f"Duplicate mirror of Defender XDR incident {incident_id} (tenant {tenant.name}): the mirror is "
                f"incident {'#' + str(number) + ' ' if number is not None else ''}({kept_name}). Closed as "
                "Undetermined by the Defender sync app.")

        def close(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                return None
            labels = [x for x in current.get("labels") or [] if isinstance(x, dict)]
            if not any(x.get("labelName") == DUPLICATE_LABEL for x in labels):
                labels.append({"labelName": DUPLICATE_LABEL, "labelType": "User"})
            wanted = {**current, "status": "Closed", "classification": "Undetermined", "labels": labels,
                      "classificationComment": cut_text(text, 1000)}
            wanted.pop("classificationReason", None)
            return None if all(current.get(k) == wanted.get(k) for k in wanted) else wanted

        self.target.write(name, close, deadline=deadline)
        self.target.add_comment(name, comment_guid(f"duplicate|{name.lower()}"), text, deadline=deadline)
        self._settled.add(name.lower())
        self.state.set_marker("mirror-rule-incident", name.lower(), {"outcome": "duplicate", "kept": kept_name})
        log.warning("duplicate mirror closed", extra={"tenantId": tenant.tenant_id, "incidentId": incident_id,
                                                      "action": "mirror-link", "outcome": "duplicate-closed",
                                                      "sentinelIncident": name, "kept": kept_name})


class PortalMirrorPhase:
    """Re-request, link, then send what waits, in that order; one instance at a time (a shared lease).

    Runs around each pull run: before it without waiting (send what the cap allows now, link what the rule made),
    and after it waiting for the cap while the run's budget lasts, linking each minute meanwhile.
    """

    def __init__(self, target: DefenderPortalTarget, linker: MirrorLinker, dispatcher: RequestDispatcher,
                 state: Any, *, owner: str) -> None:
        self.target = target
        self.linker = linker
        self.dispatcher = dispatcher
        self.state = state
        self.owner = owner
        self._rule_checked_at: float | None = None
        self._rule_state = "unknown"

    def run(self, deadline: Deadline, *, wait: bool) -> RequestSummary:
        summary = RequestSummary()
        # One instance at a time, for as long as it paces (renewed in the background, released at the end).
        with lease(self.state, "~app", "mirror-requests", self.owner, PHASE_LEASE_SECONDS) as keeper:
            if keeper is None:
                summary.problems.append("another instance is sending mirror requests")
                return summary
            try:
                self._run(deadline, wait, summary, keeper)
            except BudgetExhausted:
                pass
            except Exception as exc:  # reported with the run; the next run starts the phase again
                summary.problems.append(describe_error(exc))
                log.warning("mirror request phase failed", exc_info=True, extra={"action": "mirror-request",
                                                                                "outcome": "error"})
        return summary

    def _run(self, deadline: Deadline, wait: bool, summary: RequestSummary, keeper: LeaseKeeper) -> None:
        # Link first: an incident the rule made is found before its request is judged lost.
        linked_ok = self._link(list(self.target.requests.all()), deadline, summary)
        now = self.target.clock()
        requests = list(self.target.requests.all())
        for r in requests:
            if due_for_rerequest(r, now) and linked_ok:
                link = self.state.get_link(r.tenant_id, r.incident_id)
                if link is not None and link.get("state") == "active" and link.get("sentinelName"):
                    self.linker._mark_linked(r.tenant_id, r.incident_id, str(link["sentinelName"]))
                    continue
                r.state = WAITING
                if self.target.requests.save(r):
                    summary.rerequested += 1
                    log.warning("no mirror 30 minutes after its request; requesting again", extra={
                        "tenantId": r.tenant_id, "incidentId": r.incident_id, "action": "mirror-request",
                        "outcome": "re-requested", "attempt": r.attempts})
            elif expired_link(r, now):
                self.target.requests.delete(r)
        summary.rule = self._check_rule(deadline)
        if summary.rule != "ok":
            summary.waiting = sum(1 for r in requests if r.state == WAITING)
            summary.problems.append(f"mirror rule {self.target.rule_id} is {summary.rule}: requests wait (no row "
                                    "is sent that no rule would turn into an incident)")
            return
        last_link = [self._now()]

        def between() -> None:
            keeper.check()  # the phase's lease was lost: stop sending
            if self._now() - last_link[0] >= LINK_EVERY_SECONDS:
                last_link[0] = self._now()
                self._link(list(self.target.requests.all()), deadline, summary)

        self.dispatcher.dispatch(requests, deadline, wait=wait, between=between, summary=summary)

    def _link(self, requests: list[MirrorRequest], deadline: Deadline, summary: RequestSummary) -> bool:
        """Link what the rule made; False when the listing failed (then no request is judged lost this pass)."""
        since = link_window_start(requests, self.target.clock())
        if since is None:
            return True  # nothing requested in the last hour: nothing to link, no listing
        try:
            self.linker.link(since, deadline, summary)
        except ApiError as exc:
            summary.problems.append(f"linking failed: {describe_error(exc)}")
            return False
        return True

    def _now(self) -> float:
        return self.target.clock().timestamp()

    def _check_rule(self, deadline: Deadline) -> str:
        """``ok``, ``missing`` or ``disabled``, read at most every five minutes (never in a tight loop)."""
        if self._rule_checked_at is not None and self._now() - self._rule_checked_at < RULE_CHECK_SECONDS:
            return self._rule_state
        rule = self.target.client.get_alert_rule(self.target.rule_id, deadline=deadline)
        if rule is None:
            state = "missing"
        elif not (rule.get("properties") or {}).get("enabled", False):
            state = "disabled"
        else:
            state = "ok"
        self._rule_checked_at, self._rule_state = self._now(), state
        try:
            self.state.set_marker("mirror-rule", "app", {"state": state, "checkedAt": format_time(
                self.target.clock())})
        except Exception:
            log.warning("could not record the mirror rule's state", exc_info=True,
                        extra={"action": "mirror-rule", "outcome": "unrecorded"})
        if state != "ok":
            log.error("the mirror analytics rule is %s: mirror requests wait until it is enabled", state,
                      extra={"action": "mirror-rule", "outcome": state})
        return state


def waiting_per_tenant(store: MirrorRequestStore) -> dict[str, int]:
    """Requests not yet linked, per tenant (for ``sync_status``)."""
    counts: dict[str, int] = {}
    for r in store.all():
        if r.state != LINKED:
            counts[r.tenant_id] = counts.get(r.tenant_id, 0) + 1
    return counts

