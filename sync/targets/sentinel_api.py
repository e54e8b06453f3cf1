"""The ``sentinel-api`` mirror target: each mirror is created and kept current through the Sentinel incidents REST
API (GET, merge, PUT with the ETag). Right for workspaces still managed in the Azure portal; in a workspace onboarded
to the unified Defender portal such incidents are not shown in the incident queue (use ``defender-portal``).
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

from ..budget import Deadline
from ..sentinel import ConflictError, SentinelClient
from ..settings import TenantConfig
from ..timeutil import parse_time, utcnow
from . import UNREAD, Mutate, TargetComment

# Fixed namespace: the Sentinel incident name of a Defender incident never changes across versions or deployments.
_NAMESPACE = uuid.UUID("9d3c8a0e-6a4f-4f7e-b3f1-2d7e5c9a1b40")
BUILTIN_PROVIDERS = frozenset({"microsoft xdr", "microsoft 365 defender", "microsoft defender xdr"})
INDEX_REFRESH_SECONDS = 60.0          # a listing this old is topped up (incidents created since) before it answers
INDEX_MARGIN = timedelta(hours=1)     # clock skew between Defender's createdDateTime and Sentinel's createdTimeUtc
INDEX_EXTEND = timedelta(days=1)      # reaching further back extends by at least this (pages come newest first)
# The index reaches back at most this far: an older Defender incident (updated long after its creation) is answered
# by a filtered listing instead, so one old incident never lists the whole workspace history.
INDEX_HORIZON = timedelta(days=8)


class WorkspaceIndex:
    """What the workspace holds, from one listing of the incidents created since a time, kept for the process and
    topped up (only what was created since) when older than :data:`INDEX_REFRESH_SECONDS`: so the built-in-connector
    check and "does this name exist yet" cost one listing per run, not a request per incident.

    A Sentinel incident is never created before its Defender incident, so an index covering the time since a
    Defender incident's ``createdDateTime`` (less :data:`INDEX_MARGIN`) holds its mirror if it has one. Nothing here
    relies on ``$filter``: a server that ignores it returns more, which is kept just the same.
    """

    def __init__(self, client: SentinelClient, *, clock: Callable[[], float] = time.monotonic,
                 refresh_seconds: float = INDEX_REFRESH_SECONDS) -> None:
        self.client = client
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.covered_from: datetime | None = None   # every incident created at or after this is known
        self._listed_at: datetime | None = None      # wall time the last listing started
        self._refreshed = 0.0
        self.names: set[str] = set()
        self.by_source: dict[str, dict[str, dict[str, Any]]] = {}  # providerIncidentId -> name -> incident
        self.listings = 0
        self._lock = threading.Lock()

    def covers(self, created: datetime) -> bool:
        """Whether a Defender incident created then is within the index's horizon."""
        return created >= utcnow() - INDEX_HORIZON

    def ensure(self, since: datetime, *, deadline: Deadline) -> None:
        """Make the index cover every incident created at or after ``since`` and be no older than the refresh."""
        with self._lock:
            since = since - INDEX_MARGIN
            if self.covered_from is None or since < self.covered_from:
                if self.covered_from is not None:
                    since = min(since, self.covered_from - INDEX_EXTEND)
                self._list(since, deadline)
                self.covered_from = since
            elif self.clock() - self._refreshed >= self.refresh_seconds:
                assert self._listed_at is not None
                self._list(self._listed_at - INDEX_MARGIN, deadline)

    def _list(self, since: datetime, deadline: Deadline) -> None:
        started, begun = utcnow(), self.clock()
        for incident in self.client.list_incidents_created(since, deadline=deadline, top=1000):
            self.add(incident)
        self.listings += 1
        if self._listed_at is None or started > self._listed_at:
            self._listed_at = started
        self._refreshed = begun

    def add(self, incident: dict[str, Any]) -> None:
        """Record an incident (listed, or created by this process): its name, and for a Defender provider the few
        properties the checks read (not the whole incident: a unified-portal workspace's every incident has one)."""
        name = str(incident.get("name", "")).lower()
        self.names.add(name)
        props = incident.get("properties") or {}
        if str(props.get("providerName", "")).lower() in BUILTIN_PROVIDERS:
            compact = {"name": incident.get("name"), "properties": {
                "providerName": props.get("providerName"), "providerIncidentId": props.get("providerIncidentId"),
                "relatedAnalyticRuleIds": props.get("relatedAnalyticRuleIds"),
                "additionalData": {"providerIncidentUrl": (props.get("additionalData") or {}).get(
                    "providerIncidentUrl")}}}
            self.by_source.setdefault(str(props.get("providerIncidentId", "")), {})[name] = compact

    def exists(self, name: str) -> bool:
        return name.lower() in self.names

    def candidates(self, incident_id: str) -> list[dict[str, Any]]:
        """Incidents with a Defender provider and this ``providerIncidentId``."""
        return list(self.by_source.get(incident_id, {}).values())


def defender_created(defender: dict[str, Any] | None) -> datetime | None:
    """The Defender incident's ``createdDateTime``, or None when absent or unreadable."""
    value = (defender or {}).get("createdDateTime")
    try:
        return parse_time(str(value)) if value else None
    except ValueError:
        return None


class SentinelTarget:
    """Mirror incidents created and updated through the Sentinel incidents REST API."""

    def __init__(self, client: SentinelClient) -> None:
        self.client = client
        self.index = WorkspaceIndex(client)

    def request_mirror(self, tenant: TenantConfig, defender: dict[str, Any]) -> bool:
        """False: this target creates the mirror itself, on the first write."""
        return False

    def excluded_from_builtin(self, resource: dict[str, Any]) -> bool:
        """Whether an incident that looks like the built-in connector's is in fact the app's own (none here)."""
        return False

    def name_for(self, tenant_id: str, incident_id: str) -> str:
        """Deterministic incident name (GUID) from tenant + incident ID: a retry can never create a second one."""
        return str(uuid.uuid5(_NAMESPACE, f"{tenant_id.lower()}:{incident_id}"))

    def url(self, name: str) -> str:
        return self.client.incident_resource_id(name)

    def read(self, name: str, *, deadline: Deadline) -> dict[str, Any] | None:
        return self.client.get_incident(name, deadline=deadline)

    def write(self, name: str, mutate: Mutate, *, deadline: Deadline,
              current: dict[str, Any] | None = UNREAD) -> dict[str, Any] | None:
        """GET, merge, PUT with the ETag; a 409 re-reads and re-merges.

        ``current``: the resource the caller just read (``None``: it did not exist), used for the first attempt
        instead of a second GET; its etag still guards the PUT, so a write in between is a 409 and a fresh merge.
        """
        if current is not UNREAD:
            wanted = mutate(copy.deepcopy(current["properties"]) if current is not None else None)
            if wanted is None:
                return current
            try:
                written = self.client.put_incident(name, wanted, etag=current["etag"] if current is not None
                                                   else None, deadline=deadline)
                self.index.add(written)
                return written
            except ConflictError:
                pass  # changed since it was read: read, merge and write again
        return self.client.update_incident(name, mutate, deadline=deadline)

    def may_exist(self, name: str, defender: dict[str, Any], *, deadline: Deadline) -> bool:
        """Whether the mirror ``name`` of this Defender incident may already exist (then it is read before it is
        written); False only when the run's workspace listing, which covers the incident's creation, lacks it."""
        created = defender_created(defender)
        if created is None or not self.index.covers(created):
            return True
        self.index.ensure(created, deadline=deadline)
        return self.index.exists(name)

    def find_builtin(self, tenant_id: str, incident_id: str, *, deadline: Deadline,
                     defender: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The built-in connector's incident for this Defender incident, if that connector mirrors it.

        Matched on the exact ``providerIncidentId`` and a Defender provider name. Incident IDs are only unique per
        tenant and the connector serves the workspace's own tenant only: a provider URL naming another tenant is not
        a match, and one without ``tid`` belongs to the workspace's tenant (an MSSP's own incidents never hide a
        customer's incidents with the same IDs).
        """
        return next((i for i in self.provider_matches(tenant_id, incident_id, deadline=deadline, defender=defender)
                     if not self.excluded_from_builtin(i)), None)

    def provider_matches(self, tenant_id: str, incident_id: str, *, deadline: Deadline,
                         defender: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Incidents with a Defender provider name for exactly this tenant's incident ``incident_id``. Answered from
        the run's workspace listing (:class:`WorkspaceIndex`) when the Defender incident is recent enough for it,
        else by a listing filtered on ``providerIncidentId`` (checked again here: a server may ignore ``$filter``)."""
        created = defender_created(defender)
        if created is not None and self.index.covers(created):
            self.index.ensure(created, deadline=deadline)
            listed = self.index.candidates(incident_id)
        else:
            listed = list(self.client.list_incidents(provider_incident_id=incident_id, deadline=deadline, top=50))
        home: str | None = None
        matches: list[dict[str, Any]] = []
        for incident in listed:
            props = incident.get("properties") or {}
            if str(props.get("providerName", "")).lower() not in BUILTIN_PROVIDERS:
                continue
            if str(props.get("providerIncidentId", "")) != incident_id:
                continue
            url = (props.get("additionalData") or {}).get("providerIncidentUrl") or ""
            tids = parse_qs(urlparse(str(url)).query).get("tid") if url else None
            if tids:
                owner = tids[0]
            else:
                home = home or self.client.home_tenant_id()
                owner = home or ""
            if owner.lower() == tenant_id.lower():
                matches.append(incident)
        return matches

    def is_own_mirror(self, tenant_id: str, incident_id: str, *, deadline: Deadline,
                      defender: dict[str, Any] | None = None) -> bool:
        """Whether this Defender incident is itself one of the app's mirrors (never, for API-created mirrors)."""
        return False

    def comments(self, name: str, *, deadline: Deadline) -> list[TargetComment]:
        out: list[TargetComment] = []
        for c in self.client.list_comments(name, deadline=deadline):
            props = c.get("properties") or {}
            author = props.get("author") or {}
            out.append(TargetComment(
                comment_id=str(c.get("name", "")),
                author=str(author.get("name") or author.get("userPrincipalName") or author.get("email") or ""),
                created=str(props.get("createdTimeUtc") or ""),
                text=str(props.get("message") or "")))
        return out

    def add_comment(self, name: str, comment_id: str, text: str, *, deadline: Deadline) -> None:
        self.client.put_comment(name, comment_id, text, deadline=deadline)
