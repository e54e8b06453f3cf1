"""Client of the Microsoft Sentinel incidents ARM API (``Microsoft.SecurityInsights``).

Knows ARM HTTP, ETags and paging; nothing about Defender. A PUT replaces the whole incident, so updates go through
:meth:`SentinelClient.update_incident`: GET, let the caller merge into the current properties, PUT with the etag
read, and on a 409 (someone wrote in between) read and merge again. Throttling (429 with ``Retry-After``) and 5xx
are retried by :class:`~sync.http.BearerSession`; writes additionally pass a per-minute write cap
(``SENTINEL_MAX_WRITES_PER_MINUTE``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests

from .budget import Deadline, Limiter
from .http import ApiError, BearerSession, CallStats
from .timeutil import format_time

log = logging.getLogger(__name__)

MAX_TOP = 1000
MAX_COMMENT_CHARS = 30_000      # UTF-16 code units (Sentinel is .NET: a character outside the BMP counts 2)
# Server-managed properties: ignored by ARM on PUT, stripped so the body carries only what the app means to set.
READ_ONLY_PROPERTIES = frozenset({
    "createdTimeUtc", "lastModifiedTimeUtc", "incidentNumber", "incidentUrl", "providerName", "providerIncidentId",
    "additionalData", "relatedAnalyticRuleIds",
    # present in trigger bodies / expanded reads, never writable through this resource
    "alerts", "bookmarks", "relatedEntities", "comments",
})
REQUIRED_PROPERTIES = ("title", "severity", "status")


class ConflictError(ApiError):
    """409: the incident changed since the etag was read (or a create raced another)."""


class SentinelResponseError(ApiError):
    """Sentinel answered 2xx with a body that is not the resource it should be."""


# NRT analytics rules (the defender-portal mirror rule) exist only in preview versions of the alertRules API.
ALERT_RULES_API_VERSION = "2025-10-01-preview"


class SentinelClient:
    """Incidents and comments of one Sentinel workspace.

    ``workspace_id`` is the workspace's full ARM resource ID (``/subscriptions/.../workspaces/<name>``);
    ``arm_endpoint`` e.g. ``https://management.azure.com``. ``session`` carries the ARM token and the overall request
    cap; ``write_limiter`` caps PUTs on top of it.
    """

    API_VERSION = "2025-09-01"

    def __init__(self, session: BearerSession, arm_endpoint: str, workspace_id: str, *,
                 write_limiter: Limiter | None = None) -> None:
        self._session = session
        self._arm = arm_endpoint.rstrip("/")
        self.workspace_id = "/" + workspace_id.strip("/")
        self._base = f"{self._arm}{quote(self.workspace_id)}/providers/Microsoft.SecurityInsights/incidents"
        self._write_limiter = write_limiter
        arm_parts = urlsplit(self._arm)
        self._arm_origin = (arm_parts.scheme.lower(), arm_parts.netloc.lower())

    @property
    def stats(self) -> CallStats:
        """The session's counters (requests, throttled, retries, writes; ``extra["sentinelConflicts"]``)."""
        return self._session.stats

    # ------------------------------------------------------------------------------------------------ URLs

    def incident_resource_id(self, name: str) -> str:
        """The incident's ARM resource ID (what ``id`` in a response or trigger body names, modulo case)."""
        return f"{self.workspace_id}/providers/Microsoft.SecurityInsights/incidents/{name}"

    def incident_url(self, name: str) -> str:
        """Absolute request URL of the incident, with ``api-version``."""
        return self._url(_segment(name, "incident name"))

    def _url(self, suffix: str = "", query: dict[str, str] | None = None) -> str:
        params = {"api-version": self.API_VERSION}
        params.update(query or {})
        return f"{self._base}{'/' + suffix if suffix else ''}?{urlencode(params, quote_via=quote, safe='$')}"

    # ------------------------------------------------------------------------------------------------ incidents

    def get_incident(self, name: str, *, deadline: Deadline) -> dict[str, Any] | None:
        """The incident resource (``id``, ``name``, ``etag``, ``properties``), or None when it does not exist."""
        try:
            response = self._session.request("GET", self.incident_url(name), deadline=deadline, ok=frozenset({200}))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return _incident(_json(response, "incident"), "GET incident")

    def put_incident(self, name: str, properties: dict[str, Any], *, etag: str | None,
                     deadline: Deadline) -> dict[str, Any]:
        """Replace the incident with ``properties`` (read-only ones stripped). ``etag``: the version read, so a
        concurrent write makes this fail with :class:`ConflictError`; None: last writer wins (and creates)."""
        body: dict[str, Any] = {"properties": clean_properties(properties)}
        missing = [k for k in REQUIRED_PROPERTIES if not body["properties"].get(k)]
        if missing:
            raise ValueError(f"incident {name}: PUT needs properties {', '.join(missing)}")
        if etag is not None:
            body["etag"] = etag
        if self._write_limiter is not None:
            self._write_limiter.acquire(deadline)
        try:
            response = self._session.request("PUT", self.incident_url(name), deadline=deadline, json=body,
                                             ok=frozenset({200, 201}))
        except ApiError as exc:
            if exc.status == 409:
                raise ConflictError(str(exc), exc.status, exc.code) from exc
            raise
        return _incident(_json(response, "incident"), "PUT incident")

    def update_incident(self, name: str, mutate: Callable[[dict[str, Any] | None], dict[str, Any] | None], *,
                        deadline: Deadline, max_conflicts: int = 5) -> dict[str, Any] | None:
        """GET, ``mutate(properties or None if absent)``, PUT with the etag read; on 409 read and mutate again.

        ``mutate`` gets a private copy of the current properties and returns the full properties to write, or None
        for "no write needed" (then the current resource, or None if absent, is returned). It may run several
        times, so it must be a pure function of its argument. Raises :class:`ConflictError` after
        ``max_conflicts`` conflicting retries.
        """
        conflicts = 0
        while True:
            current = self.get_incident(name, deadline=deadline)
            wanted = mutate(copy.deepcopy(current["properties"]) if current is not None else None)
            if wanted is None:
                return current
            try:
                # No etag on create: there is no version to match (a racing create of the same
                # deterministic name converges on last-writer-wins, as both wrote the same intent).
                return self.put_incident(name, wanted, etag=current["etag"] if current is not None else None,
                                         deadline=deadline)
            except ConflictError:
                conflicts += 1
                extra = self._session.stats.extra
                extra["sentinelConflicts"] = extra.get("sentinelConflicts", 0) + 1
                log.info("sentinel incident changed while writing; re-reading",
                         extra={"incidentId": name, "action": "sentinelPut", "outcome": "conflict"})
                if conflicts > max_conflicts:
                    raise

    def list_incidents(self, *, modified_since: datetime | None = None, provider_incident_id: str | None = None,
                       deadline: Deadline, top: int = 200) -> Iterator[dict[str, Any]]:
        """Incidents oldest-modified first, following ``nextLink``. ``modified_since`` is inclusive (``ge``), so
        an incident modified exactly at the cursor is seen again: callers dedupe by name + etag."""
        if not 1 <= top <= MAX_TOP:
            raise ValueError(f"top must be 1..{MAX_TOP}")
        clauses = []
        if modified_since is not None:
            if modified_since.tzinfo is None:
                raise ValueError("modified_since must be timezone-aware")
            clauses.append(f"properties/lastModifiedTimeUtc ge {format_time(modified_since)}")
        if provider_incident_id is not None:
            clauses.append(f"properties/providerIncidentId eq '{_odata_string(provider_incident_id)}'")
        query = {"$orderby": "properties/lastModifiedTimeUtc asc", "$top": str(top)}
        if clauses:
            query["$filter"] = " and ".join(clauses)
        for item in self._pages(self._url("", query), "incident list", deadline):
            yield _incident(item, "incident list")

    def list_incidents_created(self, since: datetime, *, deadline: Deadline,
                               top: int = 200) -> Iterator[dict[str, Any]]:
        """Incidents created at or after ``since``, oldest first (the defender-portal target's link listing)."""
        if since.tzinfo is None:
            raise ValueError("since must be timezone-aware")
        query = {"$filter": f"properties/createdTimeUtc ge {format_time(since)}",
                 "$orderby": "properties/createdTimeUtc asc", "$top": str(top)}
        for item in self._pages(self._url("", query), "incident list", deadline):
            yield _incident(item, "incident list")

    def list_incident_alerts(self, name: str, *, deadline: Deadline) -> list[dict[str, Any]]:
        """The incident's alerts (``POST .../incidents/{name}/alerts``: SecurityAlert entities with
        ``properties.alertLink``)."""
        response = self._session.request("POST", self._url(f"{_segment(name, 'incident name')}/alerts"),
                                         deadline=deadline, ok=frozenset({200}))
        value = _json(response, "incident alerts").get("value")
        if not isinstance(value, list):
            raise SentinelResponseError("Sentinel incident alerts: response has no 'value' array", 200)
        return [a for a in value if isinstance(a, dict)]

    def get_alert_rule(self, rule_id: str, *, deadline: Deadline) -> dict[str, Any] | None:
        """An analytics rule, or None when it does not exist. NRT rules exist only in preview API versions."""
        url = (f"{self._arm}{quote(self.workspace_id)}/providers/Microsoft.SecurityInsights/alertRules/"
               f"{_segment(rule_id, 'rule id')}?api-version={ALERT_RULES_API_VERSION}")
        try:
            response = self._session.request("GET", url, deadline=deadline, ok=frozenset({200}))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return _json(response, "alert rule")

    def rule_resource_id(self, rule_id: str) -> str:
        return f"{self.workspace_id}/providers/Microsoft.SecurityInsights/alertRules/{rule_id}"

    # ------------------------------------------------------------------------------------------------ comments

    def list_comments(self, name: str, *, deadline: Deadline) -> list[dict[str, Any]]:
        """Every comment of the incident (``name``, ``properties.message``, ``createdTimeUtc``, ``author``)."""
        url = self._url(f"{_segment(name, 'incident name')}/comments")
        return [_comment(item, "comment list") for item in self._pages(url, "comment list", deadline)]

    def put_comment(self, name: str, comment_id: str, message: str, *, deadline: Deadline) -> dict[str, Any]:
        """Create (or, with the same ``comment_id``, rewrite) a comment: a deterministic ID makes a retry
        idempotent. ``message`` must already fit Sentinel's limit (:data:`MAX_COMMENT_CHARS`)."""
        if not message:
            raise ValueError("comment message is empty")
        size = len(message.encode("utf-16-le")) // 2
        if size > MAX_COMMENT_CHARS:
            raise ValueError(f"comment message has {size} UTF-16 units; Sentinel takes {MAX_COMMENT_CHARS}")
        url = self._url(f"{_segment(name, 'incident name')}/comments/{_segment(comment_id, 'comment id')}")
        if self._write_limiter is not None:
            self._write_limiter.acquire(deadline)
        response = self._session.request("PUT", url, deadline=deadline, json={"properties": {"message": message}},
                                         ok=frozenset({200, 201}))
        return _comment(_json(response, "comment"), "PUT comment")

    # ------------------------------------------------------------------------------------------------ paging

    def _pages(self, url: str, what: str, deadline: Deadline) -> Iterator[dict[str, Any]]:
        seen: set[str] = set()
        next_url: str | None = url
        while next_url:
            seen.add(next_url)
            body = _json(self._session.request("GET", next_url, deadline=deadline, ok=frozenset({200})), what)
            value = body.get("value")
            if not isinstance(value, list):
                raise SentinelResponseError(f"Sentinel {what}: response has no 'value' array", 200)
            yield from value
            link = body.get("nextLink")
            if link is None or link == "":
                return
            if not isinstance(link, str):
                raise SentinelResponseError(f"Sentinel {what}: 'nextLink' is not a string", 200)
            parts = urlsplit(link)
            # The bearer token goes wherever nextLink points: only ever to the ARM endpoint itself.
            if (parts.scheme.lower(), parts.netloc.lower()) != self._arm_origin:
                raise SentinelResponseError(f"Sentinel {what}: nextLink points outside {self._arm}", 200)
            if link in seen:
                raise SentinelResponseError(f"Sentinel {what}: nextLink repeats a page already read", 200)
            next_url = link


# ---------------------------------------------------------------------------------------------------- helpers


def clean_properties(properties: dict[str, Any]) -> dict[str, Any]:
    """The writable part of incident properties: read-only keys and None values dropped, copied."""
    return {k: copy.deepcopy(v) for k, v in properties.items() if k not in READ_ONLY_PROPERTIES and v is not None}


def _segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or any(c in value for c in "/?#\\"):
        raise ValueError(f"invalid {what}: {value!r}")
    return quote(value, safe="")


def _odata_string(value: str) -> str:
    return value.replace("'", "''")


def _json(response: requests.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise SentinelResponseError(f"Sentinel {what}: response is not JSON", response.status_code) from None
    if not isinstance(body, dict):
        raise SentinelResponseError(f"Sentinel {what}: response is not a JSON object", response.status_code)
    return body


def _incident(item: Any, what: str) -> dict[str, Any]:
    """Check that ``item`` is an incident resource with the fields the app relies on."""
    if not isinstance(item, dict):
        raise SentinelResponseError(f"Sentinel {what}: an incident is not a JSON object", 200)
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise SentinelResponseError(f"Sentinel {what}: incident without 'name'", 200)
    props = item.get("properties")
    if not isinstance(props, dict):
        raise SentinelResponseError(f"Sentinel {what}: incident {name} has no 'properties' object", 200)
    missing = [k for k in (*REQUIRED_PROPERTIES, "lastModifiedTimeUtc") if not isinstance(props.get(k), str)]
    if missing:
        raise SentinelResponseError(
            f"Sentinel {what}: incident {name} lacks properties.{', properties.'.join(missing)}", 200)
    etag = item.get("etag")
    if etag is not None and not isinstance(etag, str):
        raise SentinelResponseError(f"Sentinel {what}: incident {name} has a non-string 'etag'", 200)
    return item


def _comment(item: Any, what: str) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise SentinelResponseError(f"Sentinel {what}: comment without 'name'", 200)
    props = item.get("properties")
    if not isinstance(props, dict) or not isinstance(props.get("message"), str):
        raise SentinelResponseError(f"Sentinel {what}: comment {item['name']} lacks properties.message", 200)
    return item
