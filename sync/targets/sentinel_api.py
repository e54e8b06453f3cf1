"""The ``sentinel-api`` mirror target: each mirror is created and kept current through the Sentinel incidents REST
API (GET, merge, PUT with the ETag). Right for workspaces still managed in the Azure portal; in a workspace onboarded
to the unified Defender portal such incidents are not shown in the incident queue (use ``defender-portal``).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any
from urllib.parse import parse_qs, urlparse

from ..budget import Deadline
from ..sentinel import ConflictError, SentinelClient
from ..settings import TenantConfig
from . import UNREAD, Mutate, TargetComment

# Fixed namespace: the Sentinel incident name of a Defender incident never changes across versions or deployments.
_NAMESPACE = uuid.UUID("9d3c8a0e-6a4f-4f7e-b3f1-2d7e5c9a1b40")
BUILTIN_PROVIDERS = frozenset({"microsoft xdr", "microsoft 365 defender", "microsoft defender xdr"})


class SentinelTarget:
    """Mirror incidents created and updated through the Sentinel incidents REST API."""

    def __init__(self, client: SentinelClient) -> None:
        self.client = client

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
                return self.client.put_incident(name, wanted, etag=current["etag"] if current is not None else None,
                                                deadline=deadline)
            except ConflictError:
                pass  # changed since it was read: read, merge and write again
        return self.client.update_incident(name, mutate, deadline=deadline)

    def find_builtin(self, tenant_id: str, incident_id: str, *, deadline: Deadline) -> dict[str, Any] | None:
        """The built-in connector's incident for this Defender incident, if that connector mirrors it.

        Matched on the exact ``providerIncidentId`` (checked here too: a lenient server may ignore ``$filter``) and a
        Defender provider name. Incident IDs are only unique per tenant and the connector serves the workspace's own
        tenant only: a provider URL naming another tenant is not a match, and one without ``tid`` belongs to the
        workspace's tenant (an MSSP's own incidents never hide a customer's incidents with the same IDs).
        """
        home: str | None = None
        for incident in self.client.list_incidents(provider_incident_id=incident_id, deadline=deadline, top=50):
            props = incident.get("properties") or {}
            if str(props.get("providerName", "")).lower() not in BUILTIN_PROVIDERS or self.excluded_from_builtin(
                    incident):
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
                return incident
        return None

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
