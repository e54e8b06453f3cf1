"""Two-way sync of one incident: the single place where both sides are read, merged and written.

The pull's mirror hook, the webhook, the reconcile listing and the sweep all call :meth:`IncidentSyncer.sync`, so
every path applies the same rules:

1. read the link (Sentinel name + the *base*: the synced values both sides last agreed on);
2. read Defender (Graph) and the mirror (Sentinel) as they are now, never trusting a caller's copy of Sentinel;
3. three-way merge per field (:mod:`sync.merge`); a value the app wrote and reads back equals the base, so it is
   not a change: no echo, and a quiet system makes no writes;
4. write the mirror (GET-merge-PUT with the ETag) and Defender (PATCH) only where they differ from the merged value;
5. copy new comments each way (deterministic IDs and origin markers: never twice, never back);
6. store the new base with the link's ETag, so two concurrent syncs of one incident cannot both commit a stale base.

Every sync holds the incident's lease (:func:`sync.leases.lease`, scope ``incident:<id>``) for its whole run, across
instances and triggers: two syncs of one incident never both decide to copy the same comment (Graph comments cannot
be deleted). The pull's mirror hook takes the leases of a page's updates together (same entities; see
:mod:`sync.mirror`) and passes ``leased_saves``: the sync then takes no lease of its own and its link write is
collected, written by the hook (``If-Match`` the ETag read) before it gives the leases back. A sync that finds the
lease held waits a little (the webhook longer) and then raises :class:`IncidentBusy`: the pull hook dead-letters the
incident (retried next run), the reconcile records it (and its sweep finds the change), the webhook answers 503 so
the Logic App retries. Before each comment is appended to
Defender its comments are read again, so a copy made meanwhile by any writer is not made twice.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .budget import Deadline
from .context import AppContext
from .graph import GraphSecurityClient
from .http import ApiError
from .leases import lease
from .mapping import (
    OwnerMap,
    SyncedFields,
    comment_guid,
    comment_key,
    defender_comment_parts,
    determination_respelled,
    from_defender,
    from_sentinel,
    in_progress_fallback,
    is_mirrored_comment,
    is_redirected,
    mirrored_comment_key,
    mirrored_comment_text,
    redirect_sentinel_comment,
    sentinel_closing_comment,
    to_defender_patch,
    to_sentinel_properties,
)
from .merge import MergeResult, merge
from .settings import TenantConfig
from .targets import MirrorTarget, TargetComment
from .telemetry import traced_incident_sync
from .timeutil import canonical_time, parse_time

log = logging.getLogger(__name__)

LINK_ACTIVE = "active"
LINK_BUILTIN = "builtin"          # the built-in connector mirrors it: hands off
LINK_DELETED = "deleted"          # the Sentinel incident was deleted: not recreated
LINK_GONE = "gone"                # the Defender incident is gone (404): link ended
INACTIVE_LINKS = frozenset({LINK_BUILTIN, LINK_DELETED, LINK_GONE})
MAX_LINK_RACES = 3
INCIDENT_LEASE_SECONDS = 60.0
BUSY_WAIT_SECONDS = {"webhook": 5.0}   # how long a sync waits for another sync of the incident (default below)
DEFAULT_BUSY_WAIT_SECONDS = 1.0
# Graph refused inProgress and the app wrote active instead: Defender's "active" then stands for the base's
# inProgress (kept on the link as "defenderHolds"), so it is not read as a change back to New.
FALLBACK_STATUS = {"active": "inProgress"}


class _LinkMarker:
    """Marker for a link the caller has not read."""


UNREAD_LINK: Any = _LinkMarker()   # not read: the sync reads it
NO_LINK: Any = _LinkMarker()       # not read, known absent: the pull never stored a version of the incident


@dataclass
class NewLink:
    """A new link a sync of the pull made, written with the page's others (``StateStore.create_links``)."""

    incident_id: str
    link: dict[str, Any]


@dataclass
class LinkSave:
    """A link a sync under the mirror page's lease wrote back: saved by the hook with the page's others, each
    ``If-Match`` the ``etag`` the sync read it at (``StateStore.replace_links``)."""

    incident_id: str
    link: dict[str, Any]
    etag: str


def needs_leased_sync(link: Any, defender: dict[str, Any] | None) -> bool:
    """Whether a pull's sync of a linked incident needs the incident's lease: the link (as read) is not known to
    hold this Defender version already (an update, an inactive link, or alerts that could not be read)."""
    if not isinstance(link, dict):
        return False
    return not (defender is not None and "_alertsError" not in defender and link.get("state") not in INACTIVE_LINKS
                and link.get("defenderVersion", "") >= canonical_time(str(defender.get("lastUpdateDateTime"))))


class IncidentBusy(ApiError):
    """Another worker is syncing this incident right now; try again later (nothing was read or written)."""


@dataclass
class SyncOutcome:
    """What one sync did. ``result``: applied | unchanged | ignored | created | requested (defender-portal)."""

    tenant_id: str
    incident_id: str
    result: str
    reason: str | None = None
    sentinel_name: str | None = None
    sentinel_etag: str | None = None
    defender_changes: dict[str, Any] = field(default_factory=dict)
    sentinel_changes: dict[str, Any] = field(default_factory=dict)
    comments_to_defender: int = 0
    comments_to_sentinel: int = 0
    conflicts: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)

    @property
    def wrote_defender(self) -> bool:
        return bool(self.defender_changes) or self.comments_to_defender > 0

    @property
    def wrote_sentinel(self) -> bool:
        return bool(self.sentinel_changes) or self.comments_to_sentinel > 0

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "reason": self.reason, "tenantId": self.tenant_id,
                "incidentId": self.incident_id, "sentinelIncident": self.sentinel_name,
                "changes": {"defender": _jsonable(self.defender_changes),
                            "sentinel": _jsonable(self.sentinel_changes)},
                "comments": {"toDefender": self.comments_to_defender, "toSentinel": self.comments_to_sentinel},
                "conflicts": list(self.conflicts), "problems": self.problems}


def _jsonable(changes: dict[str, Any]) -> dict[str, Any]:
    return {k: sorted(v) if isinstance(v, frozenset | set) else v for k, v in changes.items()}


def fields_to_dict(fields: SyncedFields) -> dict[str, Any]:
    data = asdict(fields)
    data["tags"] = sorted(fields.tags)
    return data


def fields_from_dict(data: Any) -> SyncedFields | None:
    """The stored base, or None when absent or unreadable (then Defender wins, as on a first sync)."""
    if not isinstance(data, dict):
        return None
    try:
        return SyncedFields(status=data["status"], owner=data.get("owner"), classification=data.get("classification"),
                            determination=data.get("determination"), tags=frozenset(data.get("tags") or []))
    except (KeyError, TypeError, ValueError):
        return None


class IncidentSyncer:
    """Syncs single incidents between Defender and the mirror target."""

    def __init__(self, ctx: AppContext, target: MirrorTarget | None = None) -> None:
        self.ctx = ctx
        self.target: MirrorTarget = target or ctx.target
        self.owner_map = OwnerMap(ctx.settings.owner_map)

    @traced_incident_sync  # sync.incident span: tenantId, incidentId, trigger, result
    def sync(self, tenant: TenantConfig, incident_id: str, *, deadline: Deadline, trigger: str,
             defender: dict[str, Any] | None = None, retry: bool = False, link: Any = UNREAD_LINK,
             new_links: list[NewLink] | None = None, leased_saves: list[LinkSave] | None = None) -> SyncOutcome:
        """Bring one incident's two sides together (see the module docstring), holding the incident's lease.
        Raises :class:`IncidentBusy` when another worker holds it, ApiError on I/O failure. ``retry``: an earlier
        attempt for this incident failed (it may have created the mirror before it failed).

        The pull's page-level hook passes what it knows: ``link`` as it read it (None: absent; :data:`NO_LINK`:
        known absent, not read), used for the cases that need no lease (a version merged already, a new mirror)
        and under the page's lease once the hook has confirmed it current; under the incident's own lease it is
        read again (another worker may have synced the incident since it was read);
        ``new_links`` collects the links a sync without the lease would create, for the hook to write in
        transactions (their creates still fail if a link exists). ``leased_saves``: the caller holds the incident's
        lease already (the hook's page lease) and collects the link writes (with the ETag read) there, to write
        them with the page's others before it gives the lease back."""
        if not tenant.mirrors:
            # A data-only tenant is never written in Sentinel nor Defender, whatever links an older mode left.
            ignored = SyncOutcome(tenant.tenant_id, incident_id, "ignored",
                                  reason="the tenant is data-only: its incidents are not mirrored")
            self._log(ignored, trigger)
            return ignored
        if trigger == "pull":
            outcome, link = self._pull_without_lease(tenant, incident_id, deadline=deadline, defender=defender,
                                                     retry=retry, link=link, new_links=new_links)
            if outcome is not None:
                self._log(outcome, trigger)
                return outcome
        if leased_saves is not None:
            return self._sync_leased(tenant, incident_id, link, deadline=deadline, trigger=trigger,
                                     defender=defender, link_saves=leased_saves)
        owner = f"{self.ctx.instance_id}-{uuid.uuid4().hex[:8]}"
        wait = BUSY_WAIT_SECONDS.get(trigger, DEFAULT_BUSY_WAIT_SECONDS)
        with lease(self.ctx.state, tenant.tenant_id, f"incident:{incident_id}", owner, INCIDENT_LEASE_SECONDS,
                   wait_seconds=min(wait, max(0.0, deadline.remaining() - 10.0))) as held:
            if held is None:
                log.info("incident is being synced by another worker", extra={
                    "tenantId": tenant.tenant_id, "incidentId": incident_id, "action": f"sync-{trigger}",
                    "outcome": "busy"})
                raise IncidentBusy(f"incident {incident_id} is being synced by another worker; will retry later")
            # A link read before the lease (the pull's) is read again under it: another worker may have synced
            # the incident meanwhile, and a merge against the older base would redo that sync over newer edits.
            return self._sync_leased(tenant, incident_id, UNREAD_LINK, deadline=deadline, trigger=trigger,
                                     defender=defender, link_saves=None)

    def _sync_leased(self, tenant: TenantConfig, incident_id: str, link: Any, *, deadline: Deadline, trigger: str,
                     defender: dict[str, Any] | None, link_saves: list[LinkSave] | None) -> SyncOutcome:
        """The sync under the incident's lease: again from fresh reads while another writer changes the link."""
        for _ in range(MAX_LINK_RACES):
            if not isinstance(link, dict):  # a link known absent is read again under the lease
                link = self.ctx.state.get_link(tenant.tenant_id, incident_id)
            outcome = self._sync_once(tenant, incident_id, link, deadline=deadline, trigger=trigger,
                                      defender=defender, link_saves=link_saves)
            if outcome is not None:
                self._log(outcome, trigger)
                return outcome
            defender, link = None, UNREAD_LINK  # another worker synced it meanwhile: start again from fresh reads
        raise ApiError(f"incident {incident_id}: the link kept changing under concurrent syncs; will retry later")

    def _pull_without_lease(self, tenant: TenantConfig, incident_id: str, *, deadline: Deadline,
                            defender: dict[str, Any] | None, retry: bool, link: Any, new_links: list[NewLink] | None
                            ) -> tuple[SyncOutcome | None, Any]:
        """The pull's cheap cases, without the incident's lease: a version already merged (one link read), and a
        brand-new mirror. No link means no webhook, reconcile or sweep can reach the incident (they all find it
        through its link) and the pull holds the tenant's lease, so nothing else syncs it meanwhile. (None, the
        link as read): it needs the leased sync (a linked incident with a new version, or a link written
        meanwhile).

        ``link`` :data:`NO_LINK`: the pull never stored a version of the incident, and only its hook, after storing
        one, makes a link. Read anyway when the mirror may exist already (a wrong assumption must not merge without
        the base); a link made meanwhile makes the create fail and the leased sync take over."""
        if link is UNREAD_LINK or (link is NO_LINK and (
                retry or defender is None or "_alertsError" in defender
                or self.target.may_exist(self.target.name_for(tenant.tenant_id, incident_id), defender,
                                         deadline=deadline))):
            link = self.ctx.state.get_link(tenant.tenant_id, incident_id)
        if isinstance(link, dict):
            if not needs_leased_sync(link, defender):
                return SyncOutcome(tenant.tenant_id, incident_id, "unchanged"), link
            return None, dict(link)
        return self._sync_once(tenant, incident_id, None, deadline=deadline, trigger="pull", defender=defender,
                               blind_create=not retry, new_links=new_links), UNREAD_LINK

    def _log(self, outcome: SyncOutcome, trigger: str) -> None:
        log.info("incident %s", outcome.result, extra={
            "tenantId": outcome.tenant_id, "incidentId": outcome.incident_id, "action": f"sync-{trigger}",
            "outcome": outcome.result, "reason": outcome.reason,
            "defenderFields": sorted(outcome.defender_changes), "sentinelFields": sorted(outcome.sentinel_changes),
            "commentsToDefender": outcome.comments_to_defender, "commentsToSentinel": outcome.comments_to_sentinel})

    def _sync_once(self, tenant: TenantConfig, incident_id: str, link: dict[str, Any] | None, *,
                   deadline: Deadline, trigger: str, defender: dict[str, Any] | None,
                   blind_create: bool = False, new_links: list[NewLink] | None = None,
                   link_saves: list[LinkSave] | None = None) -> SyncOutcome | None:
        """One attempt from the ``link`` just read; None when the link changed meanwhile (start again).
        ``blind_create``: no earlier attempt can have created the mirror, so unless the workspace listing shows it,
        it is created without reading it first. ``new_links``: a new link is added there instead of written;
        ``link_saves``: so is the write of an existing link."""
        state = self.ctx.state
        tid = tenant.tenant_id
        link_etag = link.pop("etag", None) if link else None
        outcome = SyncOutcome(tid, incident_id, "unchanged")
        if link and link.get("state") in INACTIVE_LINKS:
            outcome.result, outcome.reason = "ignored", str(link.get("state"))
            outcome.sentinel_name = link.get("sentinelName")
            return outcome
        graph = self.ctx.graph(tid)
        if defender is None or "_alertsError" in defender:
            defender = graph.get_incident(incident_id, deadline=deadline, expand_alerts=True)
        if defender is None:
            if link is None:
                outcome.result, outcome.reason = "ignored", "defender incident not found"
                return outcome
            link["state"] = LINK_GONE
            outcome.result, outcome.reason = "ignored", "defender incident is gone (404); link ended"
            return outcome if self._save_link(tid, incident_id, link, link_etag, link_saves) else None
        version = canonical_time(str(defender.get("lastUpdateDateTime")))
        if (trigger == "pull" and link is not None and link.get("defenderVersion", "") >= version):
            return outcome  # this Defender version was already merged: nothing to read or write
        name = self.target.name_for(tid, incident_id)
        if link is not None and link.get("sentinelName"):
            name = str(link["sentinelName"])
        elif link is not None:
            # A link without its Sentinel name (written by an old or interrupted version): the app's own name is the
            # only one it can have had (a built-in connector's link always stores the name).
            outcome.problems.append("the stored link had no Sentinel incident name; the app's own name was used")
            log.warning("link without a Sentinel incident name; using the app's name", extra={
                "tenantId": tid, "incidentId": incident_id, "action": "link", "outcome": "repaired"})
        outcome.sentinel_name = name
        if link is None:
            if self.target.is_own_mirror(tid, incident_id, deadline=deadline, defender=defender):
                # The workspace's own tenant is synced too, and this Defender incident is one of the app's mirrors.
                if state.note_once("own-mirrors", tid):
                    log.warning("this tenant's Defender incidents include the app's own mirrors (the workspace's own "
                                "tenant is synced); those are never mirrored again", extra={
                                    "tenantId": tid, "action": "mirror", "outcome": "own-mirror"})
                outcome.result, outcome.reason = "ignored", "the app's own mirror (made by the mirror rule)"
                outcome.sentinel_name = None
                return outcome
            builtin = self.target.find_builtin(tid, incident_id, deadline=deadline, defender=defender)
            if builtin is not None:
                if state.note_once("builtin-connector", tid):
                    log.warning("the built-in Defender XDR connector already mirrors this tenant's incidents; the "
                                "app leaves those incidents to it", extra={"tenantId": tid, "action": "mirror",
                                                                           "outcome": "builtin-connector"})
                outcome.result, outcome.reason = "ignored", "mirrored by the built-in Defender XDR connector"
                builtin_link = {"sentinelName": str(builtin.get("name", "")), "state": LINK_BUILTIN}
                return outcome if self._create_link(tid, incident_id, builtin_link, new_links) else None
            if self.target.request_mirror(tenant, defender):
                # defender-portal: the mirror rule makes the mirror; it is linked, then synced, when it appears.
                outcome.result, outcome.reason = "requested", "mirror requested from the mirror analytics rule"
                outcome.sentinel_name = None
                return outcome
        base = fields_from_dict(link.get("base")) if link else None
        writable = tenant.writes_defender and not is_redirected(defender)
        merged_box: dict[str, Any] = {}
        holds: dict[str, Any] = dict(link.get("defenderHolds") or {}) if link else {}
        defender = _as_synced(defender, holds, base)
        current_defender: dict[str, Any] = defender

        def merge_with(current: dict[str, Any]) -> tuple[MergeResult, list[str]]:
            sentinel_fields, problems = from_sentinel(current, owner_map=self.owner_map, base=base,
                                                      defender=current_defender)
            return merge(base, from_defender(current_defender), sentinel_fields,
                         policy=self.ctx.settings.conflict_policy,
                         defender_time=_time(current_defender.get("lastUpdateDateTime")),
                         sentinel_time=_time(current.get("lastModifiedTimeUtc")), defender_writable=writable), problems

        def mutate(current: dict[str, Any] | None) -> dict[str, Any] | None:
            merged_box.clear()
            if current is None:
                if link is not None:
                    merged_box["deleted"] = True
                    return None  # deleted in Sentinel: never recreated
                result = MergeResult(from_defender(current_defender), {}, {}, ())
                merged_box["created"] = True
            else:
                result, merged_box["problems"] = merge_with(current)
            merged_box["result"] = result
            desired = to_sentinel_properties(current_defender, result.merged, current, owner_map=self.owner_map,
                                             tenant_name=tenant.name,
                                             surviving_sentinel_url=self._surviving_url(tid, current_defender))
            if current is not None and _same_incident(desired, current):
                return None
            merged_box["sentinelWrite"] = True
            return desired

        # Read the mirror and write Defender FIRST, then the mirror from what Defender answered: Defender reacts to a
        # write (resolving an incident resolves its alerts, which the description lists), and writing the mirror
        # from the pre-write read would leave it stale, costing a second Sentinel write on the next sync.
        if link is None and blind_create and not self.target.may_exist(name, defender, deadline=deadline):
            current_resource = None  # a new mirror: created by the PUT below, nothing to read first
        else:
            current_resource = self.target.read(name, deadline=deadline)
        defender_changes: dict[str, Any] = {}
        first_merged: SyncedFields | None = None
        closing = sentinel_closing_comment((current_resource or {}).get("properties") or {})
        if current_resource is not None and writable:
            first, _problems = merge_with(current_resource.get("properties") or {})
            first_merged = first.merged
            patch = to_defender_patch(first.merged, defender, closing_comment=closing)
            if patch:
                defender = current_defender = _as_synced(
                    self._patch_defender(tid, incident_id, patch, defender, deadline, holds), holds, first.merged)
                defender_changes.update(patch)
        resource = self.target.write(name, mutate, deadline=deadline, current=current_resource)
        if merged_box.get("deleted"):
            outcome.result, outcome.reason = "ignored", "the Sentinel incident was deleted; not recreated"
            log.warning("mirrored Sentinel incident was deleted; it is not recreated",
                        extra={"tenantId": tid, "incidentId": incident_id, "action": "mirror", "outcome": "deleted"})
            assert link is not None
            link["state"] = LINK_DELETED
            return outcome if self._save_link(tid, incident_id, link, link_etag, link_saves) else None
        result: MergeResult = merged_box["result"]
        outcome.problems.extend(merged_box.get("problems", []))
        outcome.conflicts = result.conflicts
        if merged_box.get("sentinelWrite"):
            outcome.sentinel_changes = dict(result.sentinel_changes) or {"defenderOwnedFields": True}
        if merged_box.get("created"):
            outcome.result = "created"
        if writable and result.merged != first_merged:
            # The mirror changed between the read and the write (409, merged again): Defender follows the final merge.
            patch = to_defender_patch(result.merged, defender, closing_comment=closing)
            if patch:
                defender = _as_synced(self._patch_defender(tid, incident_id, patch, defender, deadline, holds),
                                      holds, result.merged)
                defender_changes.update(patch)
        outcome.defender_changes = defender_changes
        defender_comment_count = _count(defender.get("comments"))
        if link is not None and _comments_unchanged(link, current_resource, defender):
            # Neither side has a comment it had not at the last sync: nothing to copy, no comment list read.
            sentinel_comments = int(link["sentinelComments"])
        else:
            # A mirror created just now has no comments yet: nothing to list.
            known: list[TargetComment] | None = [] if merged_box.get("created") else None
            outcome.comments_to_sentinel, outcome.comments_to_defender, sentinel_comments = self._sync_comments(
                tid, incident_id, name, defender, writable, deadline, known)
        if outcome.result != "created" and (outcome.wrote_defender or outcome.wrote_sentinel):
            outcome.result = "applied"
        sentinel_modified = (resource or {}).get("properties", {}).get("lastModifiedTimeUtc")
        outcome.sentinel_etag = (resource or {}).get("etag")
        new_link: dict[str, Any] = {"sentinelName": name, "state": LINK_ACTIVE, "base": fields_to_dict(result.merged),
                    "defenderVersion": max(version, canonical_time(str(defender.get("lastUpdateDateTime")))),
                    "sentinelModified": sentinel_modified, "redirected": is_redirected(defender),
                    # What the mirror looked like when both sides agreed: the reconcile sweep re-syncs an incident
                    # only when this differs (a comment- or label-only edit need not move lastModifiedTimeUtc).
                    "sentinelComments": sentinel_comments, "sentinelLabels": label_names(resource),
                    "defenderComments": defender_comment_count + outcome.comments_to_defender}
        if holds:
            new_link["defenderHolds"] = holds
        saved = (self._create_link(tid, incident_id, new_link, new_links) if link_etag is None
                 else self._save_link(tid, incident_id, new_link, link_etag, link_saves))
        return outcome if saved else None

    def _create_link(self, tenant_id: str, incident_id: str, link: dict[str, Any],
                     new_links: list[NewLink] | None) -> bool:
        """Create a new link now, or collect it for the caller to write with others (then True)."""
        if new_links is None:
            return self.ctx.state.save_link(tenant_id, incident_id, link, etag=None)
        new_links.append(NewLink(incident_id, link))
        return True

    def _save_link(self, tenant_id: str, incident_id: str, link: dict[str, Any], etag: str | None,
                   link_saves: list[LinkSave] | None) -> bool:
        """Write a link read at ``etag`` now (False: changed meanwhile), or collect it for the caller (then True)."""
        if link_saves is None or etag is None:
            return self.ctx.state.save_link(tenant_id, incident_id, link, etag=etag)
        link_saves.append(LinkSave(incident_id, link, etag))
        return True

    def _surviving_url(self, tenant_id: str, defender: dict[str, Any]) -> str | None:
        target = defender.get("redirectIncidentId")
        if not is_redirected(defender) or target in (None, ""):
            return None
        link = self.ctx.state.get_link(tenant_id, str(target))
        return self.target.url(str(link["sentinelName"])) if link and link.get("sentinelName") else None

    def _patch_defender(self, tenant_id: str, incident_id: str, patch: dict[str, Any], before: dict[str, Any],
                        deadline: Deadline, holds: dict[str, Any]) -> dict[str, Any]:
        """PATCH Defender and return the incident as it is now, with its alerts (read again: the PATCH answer has
        none, and a resolve also resolves the alerts). ``holds`` is updated with the status Defender really holds
        when it differs from the one asked for (Graph refused ``inProgress``: ``active`` was written)."""
        graph = self.ctx.graph(tenant_id)
        if "status" in patch:
            holds.pop("status", None)
        try:
            patched = _update_respelling(graph, tenant_id, incident_id, patch, deadline)
        except ApiError as exc:
            # PRODUCT: if Graph refuses inProgress, write active instead.
            if not (exc.status == 400 and patch.get("status") == "inProgress"):
                raise
            log.info("Graph refused status inProgress; writing active", extra={
                "tenantId": tenant_id, "incidentId": incident_id, "action": "patch", "outcome": "fallback"})
            fallback = in_progress_fallback(patch)
            patched = graph.update_incident(incident_id, fallback, deadline=deadline)
            holds["status"] = fallback["status"]
        fresh = graph.get_incident(incident_id, deadline=deadline, expand_alerts=True)
        if fresh is None or "_alertsError" in fresh:
            return {**patched, "alerts": before.get("alerts") or []}
        return fresh

    def _sync_comments(self, tenant_id: str, incident_id: str, name: str, defender: dict[str, Any],
                       writable: bool, deadline: Deadline,
                       known: list[TargetComment] | None = None) -> tuple[int, int, int]:
        """Copy comments each way once: Sentinel IDs derive from the source comment, Defender copies carry the
        source key in their marker, and copies (marked) are never copied back. Returns the copies made each way
        and how many comments the mirror has now. ``known``: the mirror's comments when already known (else
        listed)."""
        to_sentinel = to_defender = 0
        existing = known if known is not None else self.target.comments(name, deadline=deadline)
        existing_ids = {c.comment_id.lower() for c in existing}
        raw_comments = defender.get("comments")
        defender_comments = [defender_comment_parts(c) for c in raw_comments if isinstance(c, dict)] \
            if isinstance(raw_comments, list) else []
        redirect = redirect_sentinel_comment(defender, surviving_sentinel_url=self._surviving_url(tenant_id, defender))
        if redirect is not None and redirect[0].lower() not in existing_ids:
            self.target.add_comment(name, redirect[0], redirect[1], deadline=deadline)
            to_sentinel += 1
        for c in defender_comments:
            if not c.text.strip() or is_mirrored_comment(c.text) is not None:
                continue
            comment_id = comment_guid(comment_key("defender", c.author, c.created, c.text))
            if comment_id.lower() in existing_ids:
                continue
            self.target.add_comment(name, comment_id,
                                    mirrored_comment_text("defender", c.author, c.created, c.text),
                                    deadline=deadline)
            existing_ids.add(comment_id.lower())
            to_sentinel += 1
        if not writable:
            return to_sentinel, to_defender, len(existing) + to_sentinel
        copied = {mirrored_comment_key(c.text) for c in defender_comments} - {None}
        graph = self.ctx.graph(tenant_id)
        for sc in existing:
            if not sc.text.strip() or is_mirrored_comment(sc.text) is not None:
                continue
            key = comment_key("sentinel", sc.author, sc.created, sc.text)
            if key in copied:
                continue
            # Read Defender's comments again right before appending: a copy another writer made since this sync
            # read Defender must not be made twice (Graph comments cannot be deleted).
            fresh = graph.get_incident(incident_id, deadline=deadline, expand_alerts=False)
            copied |= _mirrored_keys((fresh or {}).get("comments"))
            if key in copied:
                continue
            now = graph.add_comment(incident_id, mirrored_comment_text("sentinel", sc.author, sc.created, sc.text),
                                    deadline=deadline)
            copied |= _mirrored_keys(now) | {key}
            to_defender += 1
        return to_sentinel, to_defender, len(existing) + to_sentinel


def _count(value: object) -> int:
    return len(value) if isinstance(value, list) else 0


def _comments_unchanged(link: dict[str, Any], mirror: dict[str, Any] | None, defender: dict[str, Any]) -> bool:
    """Whether neither side has gained a comment since the link's last sync: the mirror's ``commentsCount`` and
    Defender's comment count are as stored (Graph comments cannot be deleted; a redirect adds a comment). Unknown
    counts count as changed."""
    count = (((mirror or {}).get("properties") or {}).get("additionalData") or {}).get("commentsCount")
    stored, defender_stored = link.get("sentinelComments"), link.get("defenderComments")
    if not isinstance(count, int) or isinstance(count, bool) or count != stored or defender_stored is None:
        return False
    return not is_redirected(defender) and _count(defender.get("comments")) == defender_stored


def _mirrored_keys(comments: object) -> set[str]:
    """The source keys of the copies among Defender comments (either key shape)."""
    if not isinstance(comments, list):
        return set()
    keys = {mirrored_comment_key(defender_comment_parts(c).text) for c in comments if isinstance(c, dict)}
    return {k for k in keys if k is not None}


def _as_synced(defender: dict[str, Any], holds: dict[str, Any], base: SyncedFields | None) -> dict[str, Any]:
    """Defender as the merge must see it: a status the app wrote as a fallback, and still there, reads as what it
    stands for (the base's value), so it is neither a Defender change nor written again. Any other status ends it."""
    held = holds.get("status")
    if held is None:
        return defender
    if defender.get("status") != held or base is None or base.status != FALLBACK_STATUS.get(held):
        holds.pop("status", None)
        return defender
    return {**defender, "status": base.status}


def label_names(resource: dict[str, Any] | None) -> list[str]:
    """The sorted label names of a Sentinel incident resource."""
    labels = ((resource or {}).get("properties") or {}).get("labels")
    if not isinstance(labels, list):
        return []
    return sorted(str(x.get("labelName")) for x in labels if isinstance(x, dict))


def unchanged_since_sync(link: dict[str, Any], resource: dict[str, Any]) -> bool:
    """Whether the mirror is exactly as the app left it at the link's last sync: same ``lastModifiedTimeUtc``,
    comment count and labels. Comment- and label-only edits may not move ``lastModifiedTimeUtc``; the comment count
    (``additionalData.commentsCount``) and the labels show them. Unknown values count as changed."""
    props = resource.get("properties") or {}
    modified, stored = props.get("lastModifiedTimeUtc"), link.get("sentinelModified")
    if not modified or not stored or canonical_time(str(modified)) != canonical_time(str(stored)):
        return False
    count = (props.get("additionalData") or {}).get("commentsCount")
    if not isinstance(count, int) or isinstance(count, bool) or count != link.get("sentinelComments"):
        return False
    return label_names(resource) == link.get("sentinelLabels")


def _update_respelling(graph: GraphSecurityClient, tenant_id: str, incident_id: str, patch: dict[str, Any],
                       deadline: Deadline) -> dict[str, Any]:
    """PATCH; when Graph refuses the determination's spelling (400), once more with the other spelling Microsoft's
    pages use (``compromisedAccount``/``compromisedUser``, ...)."""
    try:
        return graph.update_incident(incident_id, patch, deadline=deadline)
    except ApiError as exc:
        respelled = determination_respelled(patch) if exc.status == 400 else None
        if respelled is None:
            raise
        log.info("Graph refused determination %s; retrying as %s", patch.get("determination"),
                 respelled["determination"], extra={"tenantId": tenant_id, "incidentId": incident_id,
                                                    "action": "patch", "outcome": "respelled"})
        return graph.update_incident(incident_id, respelled, deadline=deadline)


def _time(value: object) -> Any:
    try:
        return parse_time(str(value)) if value else None
    except ValueError:
        return None


def _same_incident(desired: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a PUT of ``desired`` would change anything the app owns (labels compared as sets)."""
    keys = set(desired) | {"title", "description", "severity", "status", "classification", "classificationReason",
                           "classificationComment", "owner", "labels"}
    for key in keys:
        a, b = desired.get(key), current.get(key)
        if key == "labels":
            if _label_set(a) != _label_set(b):
                return False
        elif key == "owner":
            if _owner_id(a) != _owner_id(b):
                return False
        elif a != b and not (a in (None, "", [], {}) and b in (None, "", [], {})):
            return False
    return True


def _label_set(labels: object) -> set[tuple[str, str]]:
    if not isinstance(labels, list):
        return set()
    return {(str(x.get("labelName")), str(x.get("labelType", "User"))) for x in labels if isinstance(x, dict)}


def _owner_id(owner: object) -> str | None:
    if not isinstance(owner, dict):
        return None
    value = owner.get("userPrincipalName") or owner.get("email") or owner.get("objectId")
    return str(value).lower() if value else None
