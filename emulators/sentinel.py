"""Emulator of the Microsoft Sentinel incidents ARM API (``Microsoft.SecurityInsights``, api-version 2025-09-01).

Written from ``../shared/reference/azure-apis.md`` section 4 (REST spec facts, enums, the playbook trigger payload) and
section 5 (what the built-in Defender XDR connector's incidents look like). Served over HTTPS by the emulator server;
the service itself only maps :class:`EmuRequest` to :class:`EmuResponse`, so tests can also call :meth:`handle`
directly.

Routes (under a workspace resource ID, compared case-insensitively; unknown workspace -> 404):

- ``GET|PUT|DELETE {ws}/providers/Microsoft.SecurityInsights/incidents/{id}``
- ``GET {ws}/providers/Microsoft.SecurityInsights/incidents`` with ``$filter`` (clauses joined by ``and``:
  ``properties/lastModifiedTimeUtc|createdTimeUtc  eq|ne|gt|ge|lt|le  <ISO time>``,
  ``properties/providerIncidentId|providerName|status|severity|title  eq|ne  '<text>'``,
  ``properties/incidentNumber  eq|ne|gt|ge|lt|le  <int>``), ``$orderby`` (``properties/lastModifiedTimeUtc``,
  ``properties/createdTimeUtc``, ``properties/incidentNumber``, ``name``; ``asc`` default, or ``desc``), ``$top``
  (1..1000, default :attr:`SentinelService.default_page_size`), ``$skipToken`` and an absolute ``nextLink``.
- ``GET {ws}/.../incidents/{id}/comments`` (paged the same way, oldest first), ``GET|PUT .../comments/{commentId}``.
- ``POST {ws}/.../incidents/{id}/alerts`` (the incident's SecurityAlert entities) and
  ``GET|PUT {ws}/.../alertRules/{ruleId}`` (also with ``2025-10-01-preview``): the unified-portal world of
  ``emulators/portal.py``, which also documents the portal mode (``unified_portal``) and the NRT rule runs.

Emulator choices where the reference is silent (each one the *pessimistic* reading for the app):

- Times have 7 fractional digits (100 ns ticks, as real Sentinel prints them) from a strictly increasing clock, so a
  client that truncates to microseconds sees ``gt <cursor>`` return the same incident again.
- ``$skipToken`` is an offset by default (``paging="offset"``): an incident modified while a client pages moves,
  shifting the pages. ``paging="keyset"`` gives stable continuation instead.
- Every successful incident PUT bumps ``etag`` and ``lastModifiedTimeUtc``, even when nothing changed.
- A comment does not move the incident's ``lastModifiedTimeUtc``/``etag`` (``comment_bumps_modified=False``); an
  analyst's label-only edit does (``label_bumps_modified=True``). Both are switchable so the app's reconcile sweep is
  tested against either reading.
- While an incident is not ``Closed`` it carries no classification: a PUT or analyst edit that leaves it open drops
  ``classification``/``classificationReason``/``classificationComment``.
- A PUT carrying an etag for an incident that does not exist is a 409 (the precondition cannot hold).
- ``ignore_provider_filter`` (off by default, switchable through ``config``): a lenient service that ignores a
  ``$filter`` clause on ``providerIncidentId`` and lists every incident, so an app must compare the ID itself.
- Incidents created through the API get ``providerName`` "Azure Sentinel" and ``providerIncidentId`` = their
  ``incidentNumber`` (as native incidents do), so an app must not read every ``providerIncidentId`` as a Defender ID.

Errors use ARM's shape ``{"error": {"code", "message"}}``. Writes and rejected writes are counted per incident for
the tests' "writes per synced change" figure. Fault injection: ``emulators/server.py`` already applies the shared
:class:`FaultPlan` to every service (using :meth:`SentinelService.fault_body` for the error body), so behind that
server construct the service with ``faults=None``; pass a plan only when calling :meth:`handle` directly.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from .arm_rbac import PERMISSIONS_API_VERSION, ArmPermissions, authorization_failed
from .base import EmuError, EmuRequest, EmuResponse, FaultPlan
from .portal import PREVIEW_API_VERSION, AlertRuleStore

API_VERSION = "2025-09-01"
# NRT analytics rules exist only in preview versions of the REST API; alertRules accept both.
WORKSPACE_API_VERSIONS = ("2022-10-01", "2023-09-01", "2025-02-01", "2025-07-01", "2026-03-01")
PROVIDER = "Microsoft.SecurityInsights"
NATIVE_PROVIDER_NAME = "Azure Sentinel"
XDR_PROVIDER_NAME = "Microsoft XDR"
MAX_TOP = 1000
MAX_COMMENT_CHARS = 30_000      # counted in UTF-16 code units, as .NET strings are (an emoji counts 2)

STATUSES = ("New", "Active", "Closed")
SEVERITIES = ("High", "Medium", "Low", "Informational")
CLASSIFICATIONS = ("Undetermined", "TruePositive", "BenignPositive", "FalsePositive")
REASONS_BY_CLASSIFICATION: dict[str, tuple[str, ...]] = {
    "Undetermined": (),
    "TruePositive": ("SuspiciousActivity",),
    "BenignPositive": ("SuspiciousButExpected",),
    "FalsePositive": ("IncorrectAlertLogic", "InaccurateData"),
}
OWNER_TYPES = ("Unknown", "User", "Group")
LABEL_TYPES = ("User", "AutoAssigned")

# Properties a client may set; everything else in a PUT body (read-only or unknown) is ignored, as ARM does.
WRITABLE = ("title", "description", "severity", "status", "classification", "classificationReason",
            "classificationComment", "owner", "labels", "firstActivityTimeUtc", "lastActivityTimeUtc")
CLASSIFICATION_FIELDS = ("classification", "classificationReason", "classificationComment")

_WS_RE = re.compile(
    r"^(?P<ws>/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
    r"microsoft\.operationalinsights/workspaces/(?P<wsname>[^/]+))"
    r"/providers/microsoft\.securityinsights/(?P<rest>.*?)/?$",
    re.IGNORECASE,
)
_WS_EXTRA_RE = re.compile(    # the workspace itself, and the caller's permissions on it
    r"^(?P<ws>/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/"
    r"microsoft\.operationalinsights/workspaces/(?P<wsname>[^/]+))"
    r"(?P<perm>/providers/microsoft\.authorization/permissions)?/?$",
    re.IGNORECASE,
)
_ALERT_RULE_RE = re.compile(r"^alertrules/(?P<rule>[^/]+)$", re.IGNORECASE)
_INCIDENT_RE = re.compile(
    r"^incidents(?:/(?P<inc>[^/]+)(?:/(?P<sub>[^/]+)(?:/(?P<cid>[^/]+))?)?)?$", re.IGNORECASE)
_CLAUSE_RE = re.compile(
    r"\s*(?P<field>[A-Za-z][A-Za-z/]*)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+"
    r"(?P<value>'(?:[^']|'')*'|datetime'[^']*'|[^\s()']+)\s*",
    re.IGNORECASE,
)
_AND_RE = re.compile(r"and\b", re.IGNORECASE)
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_TIME_RE = re.compile(
    r"^(?P<base>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9}))?(?P<tz>Z|[+-]\d{2}:\d{2})?$",
    re.IGNORECASE)

TICKS_PER_SECOND = 10_000_000


# ---------------------------------------------------------------------------------------------------------- time


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (how Sentinel's .NET back end measures strings)."""
    return len(text.encode("utf-16-le")) // 2


def format_ticks(ticks: int) -> str:
    """100 ns ticks since the Unix epoch -> ``YYYY-MM-DDTHH:MM:SS.fffffffZ`` (7 digits, as Sentinel prints)."""
    seconds, frac = divmod(ticks, TICKS_PER_SECOND)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:07d}Z"


def parse_ticks(text: str) -> int:
    """ISO-8601 (naive = UTC, up to 9 fractional digits) -> 100 ns ticks. Raises ValueError."""
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"not an ISO-8601 time: {text!r}")
    tz = m.group("tz") or "Z"
    base = datetime.fromisoformat(m.group("base") + ("+00:00" if tz.upper() == "Z" else tz))
    frac = ((m.group("frac") or "") + "0000000")[:7]
    return int(base.timestamp()) * TICKS_PER_SECOND + int(frac)


# ---------------------------------------------------------------------------------------------------------- model


class _Reject(EmuError):
    """An ARM error response raised from deep inside request handling."""


@dataclass
class _Comment:
    name: str
    message: str
    created: int
    modified: int
    etag: str
    author: dict[str, Any]


@dataclass
class _Incident:
    name: str
    props: dict[str, Any]                      # the writable properties, normalised
    created: int
    modified: int
    number: int
    etag: str
    provider_name: str
    provider_incident_id: str
    additional: dict[str, Any]
    related_rule_ids: list[str]
    created_by: tuple[str, str]                # (who, type) for systemData
    modified_by: tuple[str, str]
    comments: dict[str, _Comment] = field(default_factory=dict)   # keyed by lower-cased comment name
    history: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)     # SecurityAlert entities (rule incidents)
    entities: list[dict[str, Any]] = field(default_factory=list)
    visible: bool = True                       # shown in the Defender portal's queue (not an ARM property)


@dataclass
class _Workspace:
    resource_id: str                           # as configured (canonical casing)
    subscription: str
    resource_group: str
    name: str
    incidents: dict[str, _Incident] = field(default_factory=dict)      # keyed by lower-cased incident name
    deleted: dict[str, dict[str, Any]] = field(default_factory=dict)
    next_number: int = 1

    @property
    def guid(self) -> str:
        """The workspace's customer ID (a GUID); derived deterministically from the resource ID."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, self.resource_id.lower()))


@dataclass
class WriteRecord:
    """One PUT the service received through the API (successful or rejected)."""

    workspace: str
    incident: str
    kind: str                                  # "incident" | "comment"
    status: int
    at: int                                    # server ticks


def _new_etag() -> str:
    return f'"{uuid.uuid4()}"'


def _bare_etag(value: str) -> str:
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> EmuResponse:
    hdrs = {"Content-Type": "application/json; charset=utf-8", "x-ms-request-id": str(uuid.uuid4())}
    hdrs.update(headers or {})
    return EmuResponse(status, {"error": {"code": code, "message": message}}, hdrs)


def _ok(status: int, body: Any, headers: dict[str, str] | None = None) -> EmuResponse:
    hdrs = {"Content-Type": "application/json; charset=utf-8", "x-ms-request-id": str(uuid.uuid4())}
    hdrs.update(headers or {})
    return EmuResponse(status, body, hdrs)


# ---------------------------------------------------------------------------------------------------------- service


class SentinelService:
    """In-memory Sentinel incidents API for one or more workspaces, plus an "analyst" API for tests and the demo.

    ``verifier(headers)`` checks the bearer token for the ARM audience and returns its claims, raising on a bad token
    (mapped to 401); ``None`` skips authentication. ``workspace_ids`` lists the workspaces that exist (others are
    404); ``None`` accepts any workspace and creates it on first use. ``faults``: consulted on every API request;
    leave it None behind ``emulators/server.py``, which applies the shared plan itself. ``clock_ns`` returns
    nanoseconds since the epoch (injectable; the service keeps its own clock strictly increasing).
    """

    name = "sentinel"

    def __init__(self, verifier: Callable[[dict[str, str]], dict[str, Any]] | None,
                 workspace_ids: list[str] | None = None, *, faults: FaultPlan | None = None,
                 comment_bumps_modified: bool = False, label_bumps_modified: bool = True,
                 api_versions: Iterable[str] = (API_VERSION,), paging: str = "offset",
                 default_page_size: int = 50, clock_ns: Callable[[], int] = time.time_ns,
                 base_url: str | None = None) -> None:
        if paging not in ("offset", "keyset"):
            raise ValueError("paging must be 'offset' or 'keyset'")
        self.verifier = verifier
        self.faults = faults
        self.comment_bumps_modified = comment_bumps_modified
        self.label_bumps_modified = label_bumps_modified
        self.api_versions = tuple(api_versions)
        self.paging = paging
        self.default_page_size = default_page_size
        self.ignore_provider_filter = False  # a lenient service: $filter on providerIncidentId returns everything
        self.base_url = base_url            # scheme://host[:port] for nextLink; None -> the request's own
        self._clock_ns = clock_ns
        self._last_tick = 0
        self._lock = threading.RLock()
        self._open_any = workspace_ids is None
        self._workspaces: dict[str, _Workspace] = {}
        for ws in workspace_ids or []:
            self.add_workspace(ws)
        self.write_log: list[WriteRecord] = []
        self.requests: int = 0
        # Unified-portal world (emulators/portal.py): the mode switch, the analytics rules, the PortalWorld.
        self.unified_portal = False
        self.alert_rules = AlertRuleStore(self._lock)
        self.portal: Any = None
        self.permissions = ArmPermissions()      # RBAC on the workspace, per principal (default: Sentinel Responder)

    # ------------------------------------------------------------------------------------------- workspaces & clock

    def add_workspace(self, workspace_id: str) -> None:
        """Make a workspace (full ARM resource ID) exist."""
        m = _WS_RE.match(workspace_id.rstrip("/") + "/providers/Microsoft.SecurityInsights/x")
        if not m:
            raise ValueError(f"not a Log Analytics workspace resource ID: {workspace_id!r}")
        with self._lock:
            key = m.group("ws").lower()
            if key not in self._workspaces:
                self._workspaces[key] = _Workspace(m.group("ws"), m.group("sub"), m.group("rg"), m.group("wsname"))

    def _workspace(self, workspace: str | None) -> _Workspace:
        with self._lock:
            if workspace is None:
                if len(self._workspaces) != 1:
                    raise ValueError(f"name the workspace: the service holds {len(self._workspaces)}")
                return next(iter(self._workspaces.values()))
            key = workspace.rstrip("/").lower()
            if key not in self._workspaces:
                if not self._open_any:
                    raise KeyError(f"unknown workspace {workspace!r}")
                self.add_workspace(workspace)
            return self._workspaces[key]

    def workspace_guid(self, workspace: str | None = None) -> str:
        """The workspace's customer ID (the ``workspaceId`` GUID a trigger body carries)."""
        return self._workspace(workspace).guid

    def _tick(self) -> int:
        """Strictly increasing server time in 100 ns ticks."""
        with self._lock:
            self._last_tick = max(self._last_tick + 1, self._clock_ns() // 100)
            return self._last_tick

    # ------------------------------------------------------------------------------------------- rendering

    def _resource_id(self, ws: _Workspace, inc_name: str, *, type_segment: str = "incidents") -> str:
        return f"{ws.resource_id}/providers/{PROVIDER}/{type_segment}/{inc_name}"

    def _render(self, ws: _Workspace, inc: _Incident) -> dict[str, Any]:
        rid = self._resource_id(ws, inc.name)
        props: dict[str, Any] = {}
        for key in WRITABLE:
            value = inc.props.get(key)
            if key == "owner":
                props["owner"] = copy.deepcopy(value) if value else _empty_owner()
            elif key == "labels":
                props["labels"] = copy.deepcopy(value or [])
            elif value is not None:
                props[key] = value
        additional = copy.deepcopy(inc.additional)
        additional["commentsCount"] = len(inc.comments)
        props.update({
            "lastModifiedTimeUtc": format_ticks(inc.modified),
            "createdTimeUtc": format_ticks(inc.created),
            "incidentNumber": inc.number,
            "additionalData": additional,
            "relatedAnalyticRuleIds": list(inc.related_rule_ids),
            "incidentUrl": f"https://portal.azure.com/#asset/Microsoft_Azure_Security_Insights/Incident{rid}",
            "providerName": XDR_PROVIDER_NAME if self.unified_portal else inc.provider_name,
            "providerIncidentId": inc.provider_incident_id,
        })
        return {
            "id": rid,
            "name": inc.name,
            "etag": inc.etag,
            "type": f"{PROVIDER}/Incidents",
            "systemData": {
                "createdBy": inc.created_by[0], "createdByType": inc.created_by[1],
                "createdAt": format_ticks(inc.created),
                "lastModifiedBy": inc.modified_by[0], "lastModifiedByType": inc.modified_by[1],
                "lastModifiedAt": format_ticks(inc.modified),
            },
            "properties": props,
        }

    def _render_comment(self, ws: _Workspace, inc: _Incident, c: _Comment) -> dict[str, Any]:
        return {
            "id": f"{self._resource_id(ws, inc.name)}/comments/{c.name}",
            "name": c.name,
            "etag": c.etag,
            "type": f"{PROVIDER}/Incidents/Comments",
            "properties": {
                "message": c.message,
                "createdTimeUtc": format_ticks(c.created),
                "lastModifiedTimeUtc": format_ticks(c.modified),
                "author": copy.deepcopy(c.author),
            },
        }

    # ------------------------------------------------------------------------------------------- HTTP entry point

    def handle(self, request: EmuRequest) -> EmuResponse:
        """Serve one ARM request (or a ``/_control/`` call); never raises for a bad request."""
        if request.path.startswith("/_control/"):
            return self._handle_control(request)
        with self._lock:
            self.requests += 1
        if self.faults is not None:
            fault = self.faults.next_fault(self.name, request)
            if fault is not None:
                if fault.kind == "delay":
                    time.sleep(fault.seconds)
                elif fault.kind == "status":
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                    return EmuResponse(fault.status, self.fault_body(fault.status), headers)
                elif fault.kind == "drop":
                    raise ConnectionAbortedError("injected fault: drop the connection")
        try:
            claims = self._authenticate(request)
            extra = self._route_workspace(request, claims)
            if extra is not None:
                return extra
            self._check_api_version(request)
            return self._route(request, claims)
        except _Reject as rej:
            return _error(rej.status, rej.code, rej.message, rej.headers)

    def fault_body(self, status: int) -> dict[str, Any]:
        """ARM's error body for an injected failure (the server calls this for the faults it applies)."""
        code = {429: "TooManyRequests", 503: "ServiceUnavailable", 502: "BadGateway",
                504: "GatewayTimeout"}.get(status, "InternalServerError")
        message = ("The request was throttled. Please retry after the time in the Retry-After header."
                   if status == 429 else f"Injected fault: HTTP {status}.")
        return {"error": {"code": code, "message": message}}

    def _authenticate(self, request: EmuRequest) -> dict[str, Any]:
        if self.verifier is None:
            return {}
        try:
            return self.verifier(request.headers)
        except Exception as exc:  # any verifier failure (TokenError, a malformed header) is a 401
            # ARM's codes; TokenError.code (emulators/tokens.py) tells a missing header from an expired token.
            kind = getattr(exc, "code", None)
            code, message = {
                "missing": ("AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing."),
                "expired": ("ExpiredAuthenticationToken", f"The access token has expired: {exc}"),
            }.get(kind or "", ("InvalidAuthenticationToken", f"The access token is invalid: {exc}"))
            raise _Reject(401, code, message,
                          {"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/", '
                                               'error="invalid_token"'}) from exc

    def _authorize(self, claims: dict[str, Any], action: str, scope: str) -> None:
        """403 AuthorizationFailed unless the caller's role assignments allow ``action`` (strict, as ARM is)."""
        principal = str(claims.get("oid") or "")
        if self.verifier is not None and not self.permissions.allows(principal, action):
            body = authorization_failed(principal, action, scope)["error"]
            raise _Reject(403, body["code"], body["message"])

    def _route_workspace(self, request: EmuRequest, claims: dict[str, Any]) -> EmuResponse | None:
        """The workspace GET and the caller's permissions on it; None for the incidents and alertRules APIs."""
        extra = _WS_EXTRA_RE.match(request.path)
        if extra is None:
            return None
        with self._lock:
            ws = self._workspaces.get(extra.group("ws").lower())
        if ws is None:
            raise _Reject(404, "ResourceNotFound",
                          f"The Resource 'Microsoft.OperationalInsights/workspaces/{extra.group('wsname')}' under "
                          f"resource group '{extra.group('rg')}' was not found.")
        version = request.q("api-version")
        method = request.method.upper()
        if extra.group("perm"):
            self._require_version(version, (PERMISSIONS_API_VERSION,), "Microsoft.Authorization/permissions")
            if method != "GET":
                raise _Reject(405, "MethodNotAllowed", f"{method} is not allowed on permissions.")
            return _ok(200, self.permissions.list_body(str(claims.get("oid") or "")))
        self._require_version(version, WORKSPACE_API_VERSIONS, "Microsoft.OperationalInsights/workspaces")
        if method != "GET":
            raise _Reject(405, "MethodNotAllowed", f"{method} on the workspace is not emulated.")
        self._authorize(claims, "Microsoft.OperationalInsights/workspaces/read", ws.resource_id)
        return _ok(200, {"id": ws.resource_id, "name": ws.name, "type": "Microsoft.OperationalInsights/workspaces",
                         "location": "westeurope", "properties": {"customerId": ws.guid,
                                                                  "provisioningState": "Succeeded",
                                                                  "retentionInDays": 90}})

    @staticmethod
    def _require_version(version: str | None, allowed: tuple[str, ...], resource_type: str) -> None:
        if version not in allowed:
            raise _Reject(400, "NoRegisteredProviderFound" if version else "MissingApiVersionParameter",
                          f"No registered resource provider found for API version '{version}' and type "
                          f"'{resource_type}'. The supported api-versions are '{', '.join(allowed)}'.")

    def _check_api_version(self, request: EmuRequest) -> None:
        version = request.q("api-version")
        if not version:
            raise _Reject(400, "MissingApiVersionParameter",
                          "The api-version query parameter (?api-version=) is required for all requests.")
        # NRT analytics rules exist only in preview versions of the REST API.
        rules = "/alertrules/" in request.path.lower()
        if version not in self.api_versions and not (rules and version == PREVIEW_API_VERSION):
            raise _Reject(400, "NoRegisteredProviderFound",
                          f"No registered resource provider found for API version '{version}' and type "
                          f"'{PROVIDER}/incidents'. The supported api-versions are "
                          f"'{', '.join(self.api_versions)}'.")

    def _route(self, request: EmuRequest, claims: dict[str, Any]) -> EmuResponse:
        m = _WS_RE.match(request.path)
        inc_m = _INCIDENT_RE.match(m.group("rest")) if m else None
        rule_m = _ALERT_RULE_RE.match(m.group("rest")) if m else None
        if not m or not (inc_m or rule_m):
            raise _Reject(404, "NotFound", f"No route for '{request.path}' in the Sentinel emulator.")
        with self._lock:
            key = m.group("ws").lower()
            if key not in self._workspaces:
                if not self._open_any:
                    raise _Reject(404, "ResourceNotFound",
                                  f"The Resource 'Microsoft.OperationalInsights/workspaces/{m.group('wsname')}' "
                                  f"under resource group '{m.group('rg')}' was not found.")
                self.add_workspace(m.group("ws"))
            ws = self._workspaces[key]
            if rule_m:
                verb = "read" if request.method.upper() == "GET" else "write"
                self._authorize(claims, f"{PROVIDER}/alertRules/{verb}", ws.resource_id)
                try:
                    status, body = self.alert_rules.handle(ws.resource_id, rule_m.group("rule"), request.method.upper(),
                                                           request.q("api-version"), _json_or_none(request),
                                                           self._tick())
                except EmuError as err:
                    raise _Reject(err.status, err.code, err.message) from None
                return _ok(status, body)
            assert inc_m is not None
            inc_name, sub, cid = inc_m.group("inc"), inc_m.group("sub"), inc_m.group("cid")
            method = request.method.upper()
            verb = {"GET": "read", "PUT": "write", "DELETE": "delete"}.get(method)
            if verb is not None:
                target = "incidents/comments" if sub is not None and sub.lower() == "comments" else "incidents"
                self._authorize(claims, f"{PROVIDER}/{target}/{verb}", ws.resource_id)
            if inc_name is None:
                if method == "GET":
                    return self._list_incidents(ws, request)
                raise _Reject(405, "MethodNotAllowed", f"{method} is not allowed on the incidents collection.")
            if sub is None:
                if method == "GET":
                    return _ok(200, self._render(ws, self._require(ws, inc_name)))
                if method == "PUT":
                    return self._put_incident(ws, inc_name, request, claims)
                if method == "DELETE":
                    return self._delete_incident(ws, inc_name, claims)
                raise _Reject(405, "MethodNotAllowed", f"{method} is not allowed on an incident.")
            if sub.lower() == "alerts" and cid is None:
                if method == "POST":
                    return _ok(200, {"value": copy.deepcopy(self._require(ws, inc_name).alerts)})
                raise _Reject(405, "MethodNotAllowed", f"{method} is not allowed on an incident's alerts.")
            if sub.lower() != "comments":
                raise _Reject(404, "NotFound", f"Incident sub-resource '{sub}' is not emulated.")
            inc = self._require(ws, inc_name)
            if cid is None:
                if method == "GET":
                    return self._list_comments(ws, inc, request)
                raise _Reject(405, "MethodNotAllowed", f"{method} is not allowed on the comments collection.")
            if method == "GET":
                c = inc.comments.get(cid.lower())
                if c is None:
                    raise _Reject(404, "NotFound", f"Comment '{cid}' of incident '{inc.name}' not found.")
                return _ok(200, self._render_comment(ws, inc, c))
            if method == "PUT":
                return self._put_comment(ws, inc, cid, request, claims)
            raise _Reject(405, "MethodNotAllowed", f"{method} is not allowed on a comment.")

    def _require(self, ws: _Workspace, inc_name: str) -> _Incident:
        inc = ws.incidents.get(inc_name.lower())
        if inc is None:
            raise _Reject(404, "NotFound", f"Incident '{inc_name}' not found.")
        return inc

    # ------------------------------------------------------------------------------------------- incidents

    def _put_incident(self, ws: _Workspace, inc_name: str, request: EmuRequest,
                      claims: dict[str, Any]) -> EmuResponse:
        existing = ws.incidents.get(inc_name.lower())
        try:
            body = request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            self._log_write(ws, inc_name, "incident", 400)
            raise _Reject(400, "InvalidRequestContent", f"The request content was invalid: {exc}") from exc
        try:
            if not isinstance(body, dict) or not isinstance(body.get("properties"), dict):
                raise _Reject(400, "BadRequest", "The request body must be an object with 'properties'.")
            expected = request.headers.get("if-match") or body.get("etag")
            if expected is not None and not isinstance(expected, str):
                raise _Reject(400, "BadRequest", "'etag' must be a string.")
            # Sentinel's optimistic concurrency: the etag must be the current one (409, not ARM's usual 412).
            if expected and (existing is None or (expected.strip() != "*"
                                                  and _bare_etag(expected) != _bare_etag(existing.etag))):
                raise _Reject(409, "Conflict",
                              f"New version of resource '{self._resource_id(ws, inc_name)}' exists. "
                              "Data was not saved.")
            props = _validate_properties(body["properties"], existing.props if existing else None)
        except _Reject as rej:
            self._log_write(ws, inc_name, "incident", rej.status)
            raise
        who = _caller(claims)
        now = self._tick()
        if existing is None:
            inc = self._create(ws, inc_name, props, now, who, NATIVE_PROVIDER_NAME, None)
            # The unified portal never shows an incident created through the API.
            inc.visible = not self.unified_portal
            status = 201
        else:
            inc = existing
            changed = [k for k in WRITABLE if inc.props.get(k) != props.get(k)]
            inc.props = props
            self._bump(inc, now, who, "put", changed)
            status = 200
        self._log_write(ws, inc.name, "incident", status)
        rendered = self._render(ws, inc)
        return _ok(status, rendered, {"ETag": inc.etag})

    def _create(self, ws: _Workspace, inc_name: str, props: dict[str, Any], now: int, who: tuple[str, str],
                provider_name: str, provider_incident_id: str | None,
                additional: dict[str, Any] | None = None) -> _Incident:
        number = ws.next_number
        ws.next_number += 1
        base_additional: dict[str, Any] = {"alertsCount": 0, "bookmarksCount": 0, "commentsCount": 0,
                                           "alertProductNames": [], "tactics": [], "techniques": []}
        base_additional.update(additional or {})
        inc = _Incident(name=inc_name, props=props, created=now, modified=now, number=number, etag=_new_etag(),
                        provider_name=provider_name,
                        provider_incident_id=provider_incident_id if provider_incident_id else str(number),
                        additional=base_additional, related_rule_ids=[], created_by=who, modified_by=who)
        inc.history.append({"at": now, "by": who[0], "byType": who[1], "kind": "create",
                            "changed": sorted(k for k, v in props.items() if v is not None)})
        ws.incidents[inc_name.lower()] = inc
        return inc

    def _bump(self, inc: _Incident, now: int, who: tuple[str, str], kind: str, changed: list[str]) -> None:
        inc.modified = now
        inc.etag = _new_etag()
        inc.modified_by = who
        inc.history.append({"at": now, "by": who[0], "byType": who[1], "kind": kind, "changed": changed})

    def _delete_incident(self, ws: _Workspace, inc_name: str, claims: dict[str, Any]) -> EmuResponse:
        inc = ws.incidents.pop(inc_name.lower(), None)
        if inc is None:
            return _ok(204, None)
        who = _caller(claims)
        ws.deleted[inc_name.lower()] = {"name": inc.name, "deletedAt": format_ticks(self._tick()),
                                        "deletedBy": who[0], "resource": self._render(ws, inc)}
        return _ok(200, None)

    def _list_incidents(self, ws: _Workspace, request: EmuRequest) -> EmuResponse:
        predicates = _parse_filter(request.q("$filter"), frozenset(
            {"properties/providerincidentid"} if self.ignore_provider_filter else ()))
        sort_key, descending = _parse_orderby(request.q("$orderby"), default=("properties/createdtimeutc", True))
        items = [inc for inc in ws.incidents.values() if all(p(inc) for p in predicates)]
        keyfn = _INCIDENT_SORT_KEYS[sort_key]
        items.sort(key=lambda i: (keyfn(i), i.name.lower()), reverse=descending)
        page, next_token = self._page(items, request, lambda i: (keyfn(i), i.name.lower()), descending)
        body: dict[str, Any] = {"value": [self._render(ws, i) for i in page]}
        if next_token is not None:
            body["nextLink"] = self._next_link(request, next_token)
        return _ok(200, body)

    def _list_comments(self, ws: _Workspace, inc: _Incident, request: EmuRequest) -> EmuResponse:
        if request.q("$filter"):
            raise _Reject(400, "BadRequest", "$filter on comments is not supported by the emulator.")
        _, descending = _parse_orderby(request.q("$orderby"), default=("properties/createdtimeutc", False),
                                       allowed=("properties/createdtimeutc",))
        items = sorted(inc.comments.values(), key=lambda c: (c.created, c.name.lower()), reverse=descending)
        page, next_token = self._page(items, request, lambda c: (c.created, c.name.lower()), descending)
        body: dict[str, Any] = {"value": [self._render_comment(ws, inc, c) for c in page]}
        if next_token is not None:
            body["nextLink"] = self._next_link(request, next_token)
        return _ok(200, body)

    def _page(self, items: list[Any], request: EmuRequest, keyfn: Callable[[Any], Any],
              descending: bool) -> tuple[list[Any], str | None]:
        top_raw = request.q("$top")
        try:
            top = int(top_raw) if top_raw is not None else self.default_page_size
        except ValueError:
            raise _Reject(400, "BadRequest", f"Invalid $top value '{top_raw}'.") from None
        if not 1 <= top <= MAX_TOP:
            raise _Reject(400, "BadRequest", f"$top must be between 1 and {MAX_TOP}; got {top}.")
        start = 0
        token = request.q("$skipToken")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode("ascii") + b"==="))
            except (ValueError, UnicodeError) as exc:
                raise _Reject(400, "BadRequest", "Invalid $skipToken.") from exc
            if not isinstance(state, dict):
                raise _Reject(400, "BadRequest", "Invalid $skipToken.")
            if "o" in state and isinstance(state["o"], int):
                start = state["o"]
            elif "k" in state and isinstance(state["k"], list):
                after = tuple(state["k"])
                start = next((i for i, it in enumerate(items)
                              if (keyfn(it) < after if descending else keyfn(it) > after)), len(items))
            else:
                raise _Reject(400, "BadRequest", "Invalid $skipToken.")
        page = items[start:start + top]
        if start + top >= len(items):
            return page, None
        state_out: dict[str, Any] = ({"o": start + top} if self.paging == "offset"
                                     else {"k": list(keyfn(page[-1]))})
        raw = base64.urlsafe_b64encode(json.dumps(state_out).encode()).decode().rstrip("=")
        return page, raw

    def _next_link(self, request: EmuRequest, token: str) -> str:
        base = (self.base_url or getattr(request, "base_url", "")
                or f"https://{request.headers.get('host', 'management.azure.com')}")
        query = {k: v[0] for k, v in request.query.items() if k != "$skipToken" and v}
        query["$skipToken"] = token
        return f"{base.rstrip('/')}{quote(request.path)}?{urlencode(query, quote_via=quote, safe='$')}"

    # ------------------------------------------------------------------------------------------- comments

    def _put_comment(self, ws: _Workspace, inc: _Incident, cid: str, request: EmuRequest,
                     claims: dict[str, Any]) -> EmuResponse:
        try:
            try:
                body = request.json()
            except (ValueError, UnicodeDecodeError) as exc:
                raise _Reject(400, "InvalidRequestContent", f"The request content was invalid: {exc}") from exc
            props = body.get("properties") if isinstance(body, dict) else None
            message = props.get("message") if isinstance(props, dict) else None
            if not isinstance(message, str) or not message:
                raise _Reject(400, "BadRequest", "properties.message is required.")
            if utf16_len(message) > MAX_COMMENT_CHARS:
                raise _Reject(400, "BadRequest", f"properties.message is {utf16_len(message)} characters; "
                                                 f"the limit is {MAX_COMMENT_CHARS}.")
        except _Reject as rej:
            self._log_write(ws, inc.name, "comment", rej.status)
            raise
        who = _caller(claims)
        author = {"objectId": claims.get("oid"), "email": None, "name": who[0], "userPrincipalName": None}
        status = self._upsert_comment(inc, cid, message, author, who)
        self._log_write(ws, inc.name, "comment", status)
        return _ok(status, self._render_comment(ws, inc, inc.comments[cid.lower()]))

    def _upsert_comment(self, inc: _Incident, cid: str, message: str, author: dict[str, Any],
                        who: tuple[str, str]) -> int:
        now = self._tick()
        existing = inc.comments.get(cid.lower())
        if existing is None:
            inc.comments[cid.lower()] = _Comment(cid, message, now, now, _new_etag(), author)
            status = 201
        else:
            existing.message = message
            existing.modified = now
            existing.etag = _new_etag()
            status = 200
        if self.comment_bumps_modified:
            self._bump(inc, now, who, "comment", ["comments"])
        else:
            inc.history.append({"at": now, "by": who[0], "byType": who[1], "kind": "comment", "changed": []})
        return status

    def _log_write(self, ws: _Workspace, inc_name: str, kind: str, status: int) -> None:
        self.write_log.append(WriteRecord(ws.resource_id, inc_name, kind, status, self._tick()))

    # ------------------------------------------------------------------------------------------- analyst / test API

    def seed_incident(self, name: str | None = None, *, workspace: str | None = None,
                      provider_name: str = NATIVE_PROVIDER_NAME, provider_incident_id: str | None = None,
                      provider_incident_url: str | None = None, created_by: str = "Microsoft Sentinel",
                      **properties: Any) -> dict[str, Any]:
        """Create an incident directly (not counted as an API write). Properties as in a PUT body
        (``title``/``severity``/``status`` default to a placeholder, ``Medium``, ``New``)."""
        props_in = {"title": "Seeded incident", "severity": "Medium", "status": "New"}
        props_in.update(_snake_to_props(properties))
        with self._lock:
            ws = self._workspace(workspace)
            inc_name = name or str(uuid.uuid4())
            if inc_name.lower() in ws.incidents:
                raise ValueError(f"incident {inc_name!r} exists")
            try:
                props = _validate_properties(props_in, None)
            except _Reject as rej:
                raise ValueError(rej.message) from None
            additional = {"providerIncidentUrl": provider_incident_url} if provider_incident_url else None
            inc = self._create(ws, inc_name, props, self._tick(), (created_by, "Application"), provider_name,
                               provider_incident_id, additional)
            return self._render(ws, inc)

    def seed_xdr_incident(self, provider_incident_id: str, *, name: str | None = None,
                          workspace: str | None = None, provider_name: str = XDR_PROVIDER_NAME,
                          tenant_id: str | None = None, **properties: Any) -> dict[str, Any]:
        """Seed an incident as the BUILT-IN Defender XDR connector creates it (``providerName`` "Microsoft XDR" or
        the older "Microsoft 365 Defender", ``providerIncidentId`` = the Defender incident ID, portal link). The
        connector serves the workspace's own tenant: its link names no tenant unless ``tenant_id`` adds ``?tid=``."""
        properties.setdefault("title", f"Defender incident {provider_incident_id}")
        return self.seed_incident(
            name, workspace=workspace, provider_name=provider_name, provider_incident_id=str(provider_incident_id),
            provider_incident_url=f"https://security.microsoft.com/incidents/{provider_incident_id}"
                                  + (f"?tid={tenant_id}" if tenant_id else ""),
            created_by="Microsoft Defender XDR", **properties)

    def analyst_update(self, incident_name: str, *, updated_by: str = "analyst@contoso.com",
                       workspace: str | None = None, **changes: Any) -> dict[str, Any]:
        """Play an analyst editing the incident in the portal: apply ``changes`` (property names, camelCase or
        snake_case: status, severity, title, description, owner (UPN string, owner dict or None), classification,
        classification_reason, classification_comment, labels (names or label dicts)), bump etag and
        ``lastModifiedTimeUtc`` (a label-only edit only when ``label_bumps_modified``), record ``updated_by`` as a
        User. Closing needs a classification (and a valid reason), as in the portal: ValueError otherwise."""
        with self._lock:
            ws = self._workspace(workspace)
            inc = ws.incidents.get(incident_name.lower())
            if inc is None:
                raise KeyError(f"no incident {incident_name!r}")
            merged = copy.deepcopy(inc.props)
            merged.update(_snake_to_props(changes))     # reopening clears the closure (in validation)
            try:
                props = _validate_properties(merged, inc.props)
            except _Reject as rej:
                raise ValueError(rej.message) from None
            changed = [k for k in WRITABLE if inc.props.get(k) != props.get(k)]
            inc.props = props
            now = self._tick()
            who = (updated_by, "User")
            if changed == ["labels"] and not self.label_bumps_modified:
                inc.history.append({"at": now, "by": who[0], "byType": who[1], "kind": "analyst",
                                    "changed": changed})
            else:
                self._bump(inc, now, who, "analyst", changed)
            return self._render(ws, inc)

    def analyst_comment(self, incident_name: str, text: str, author: str = "analyst@contoso.com", *,
                        workspace: str | None = None) -> dict[str, Any]:
        """Play an analyst adding a comment (new random comment ID). Moves the incident's ``lastModifiedTimeUtc``
        only when ``comment_bumps_modified``."""
        if not text or utf16_len(text) > MAX_COMMENT_CHARS:
            raise ValueError(f"comment must have 1..{MAX_COMMENT_CHARS} characters")
        with self._lock:
            ws = self._workspace(workspace)
            inc = ws.incidents.get(incident_name.lower())
            if inc is None:
                raise KeyError(f"no incident {incident_name!r}")
            cid = str(uuid.uuid4())
            author_obj = {"objectId": str(uuid.uuid5(uuid.NAMESPACE_URL, "user:" + author.lower())),
                          "email": author, "name": author, "userPrincipalName": author}
            self._upsert_comment(inc, cid, text, author_obj, (author, "User"))
            return self._render_comment(ws, inc, inc.comments[cid])

    def analyst_delete(self, incident_name: str, *, deleted_by: str = "analyst@contoso.com",
                       workspace: str | None = None) -> None:
        """Play an analyst deleting the incident (recorded; later GETs are 404)."""
        with self._lock:
            ws = self._workspace(workspace)
            if incident_name.lower() not in ws.incidents:
                raise KeyError(f"no incident {incident_name!r}")
            self._delete_incident(ws, incident_name, {"upn": deleted_by})

    def get(self, name: str, *, workspace: str | None = None) -> dict[str, Any] | None:
        """The incident as the API would return it, or None."""
        with self._lock:
            ws = self._workspace(workspace)
            inc = ws.incidents.get(name.lower())
            return self._render(ws, inc) if inc else None

    def all_incidents(self, *, workspace: str | None = None) -> list[dict[str, Any]]:
        """Every live incident, by incident number."""
        with self._lock:
            ws = self._workspace(workspace)
            return [self._render(ws, i) for i in sorted(ws.incidents.values(), key=lambda i: i.number)]

    def comments(self, name: str, *, workspace: str | None = None) -> list[dict[str, Any]]:
        """The incident's comments, oldest first (as the API renders them)."""
        with self._lock:
            ws = self._workspace(workspace)
            inc = ws.incidents.get(name.lower())
            if inc is None:
                raise KeyError(f"no incident {name!r}")
            return [self._render_comment(ws, inc, c) for c in sorted(inc.comments.values(), key=lambda c: c.created)]

    def history(self, name: str, *, workspace: str | None = None) -> list[dict[str, Any]]:
        """Who changed the incident when (``by``, ``byType`` "User"/"Application", ``kind``, ``changed`` fields)."""
        with self._lock:
            inc = self._workspace(workspace).incidents.get(name.lower())
            if inc is None:
                raise KeyError(f"no incident {name!r}")
            return copy.deepcopy(inc.history)

    def deleted(self, *, workspace: str | None = None) -> dict[str, dict[str, Any]]:
        """Deleted incidents by lower-cased name: ``{name, deletedAt, deletedBy, resource}``."""
        with self._lock:
            return copy.deepcopy(self._workspace(workspace).deleted)

    def writes(self, name: str | None = None, *, kind: str | None = None) -> int:
        """Successful API PUTs (incident and comment; ``kind`` narrows), for one incident or all."""
        with self._lock:
            return sum(1 for w in self.write_log if w.status in (200, 201)
                       and (name is None or w.incident.lower() == name.lower())
                       and (kind is None or w.kind == kind))

    def write_counts(self) -> dict[str, int]:
        """Successful API PUTs per incident name."""
        counts: dict[str, int] = {}
        with self._lock:
            for w in self.write_log:
                if w.status in (200, 201):
                    counts[w.incident] = counts.get(w.incident, 0) + 1
        return counts

    def rejected_writes(self) -> list[WriteRecord]:
        """PUTs the service refused (400, 409)."""
        with self._lock:
            return [w for w in self.write_log if w.status not in (200, 201)]

    def reset_write_log(self) -> None:
        """Forget the counted writes (e.g. before measuring a quiet cycle)."""
        with self._lock:
            self.write_log.clear()

    def trigger_body(self, incident_name: str, *, event_type: str = "Update",
                     workspace: str | None = None) -> dict[str, Any]:
        """The body a Logic App "Microsoft Sentinel incident" trigger produces (forwarded as ``@triggerBody()``),
        per azure-apis.md 4.1: a snapshot of the incident now, with empty alerts/bookmarks/entities."""
        with self._lock:
            ws = self._workspace(workspace)
            inc = ws.incidents.get(incident_name.lower())
            if inc is None:
                raise KeyError(f"no incident {incident_name!r}")
            resource = self._render(ws, inc)
            props = resource["properties"]
            props.update({"alerts": [], "bookmarks": [], "relatedEntities": [],
                          "comments": [self._render_comment(ws, inc, c) for c in inc.comments.values()]})
            return {
                "eventUniqueId": str(uuid.uuid4()),
                "objectSchemaType": "Incident",
                "objectEventType": event_type,
                "workspaceInfo": {"SubscriptionId": ws.subscription, "ResourceGroupName": ws.resource_group,
                                  "WorkspaceName": ws.name},
                "workspaceId": ws.guid,
                "object": {
                    # The trigger spells the segment "Incidents" (REST responses use "incidents").
                    "id": self._resource_id(ws, inc.name, type_segment="Incidents"),
                    "name": inc.name,
                    "etag": inc.etag,
                    "type": f"{PROVIDER}/Incidents",
                    "properties": props,
                },
            }

    # ------------------------------------------------------------------------------------------- unified portal

    def now_ticks(self) -> int:
        """The service's clock (100 ns ticks), for the rule model."""
        return self._tick()

    def default_workspace_id(self) -> str:
        """The resource ID of the only workspace (ValueError when there are several)."""
        return self._workspace(None).resource_id

    def create_rule_incident(self, workspace_id: str, rule_id: str, alert: dict[str, Any],
                             entities: list[dict[str, Any]]) -> str:
        """Create the incident of one analytics-rule alert (no grouping): title, severity and description from the
        alert, ``relatedAnalyticRuleIds`` = [rule_id], the alert as a SecurityAlert entity. Returns its name."""
        with self._lock:
            ws = self._workspace(workspace_id)
            now = self._tick()
            props = _validate_properties({"title": alert["name"], "severity": alert["severity"], "status": "New",
                                          "description": alert["description"]}, None)
            inc = self._create(ws, str(uuid.uuid4()), props, now, ("Microsoft Sentinel", "Application"),
                               XDR_PROVIDER_NAME, None, {"alertsCount": 1, "alertProductNames": ["Azure Sentinel"]})
            inc.additional["providerIncidentUrl"] = f"https://security.microsoft.com/incidents/{inc.number}"
            inc.related_rule_ids = [rule_id]
            inc.alerts = [self._render_alert(ws, alert, now, rule_id)]
            inc.entities = copy.deepcopy(entities)
            return inc.name

    def _render_alert(self, ws: _Workspace, alert: dict[str, Any], now: int, rule_id: str) -> dict[str, Any]:
        alert_id = str(uuid.uuid4())
        stamp = format_ticks(now)
        additional: dict[str, Any] = {"Analytic Rule Ids": json.dumps([rule_id.rsplit("/", 1)[-1]]),
                                      "ProcessedBySentinel": "True", "AlertMessageEnqueueTime": stamp}
        if alert["customDetails"]:
            additional["Custom Details"] = json.dumps(alert["customDetails"])
        props: dict[str, Any] = {
            "systemAlertId": alert_id, "providerAlertId": alert_id, "alertDisplayName": alert["name"],
            "friendlyName": alert["name"], "alertType": f"{ws.guid}_{rule_id.rsplit('/', 1)[-1]}",
            "description": alert["description"], "severity": alert["severity"], "status": "New",
            "confidenceLevel": "Unknown", "vendorName": "Microsoft", "productName": "Azure Sentinel",
            "productComponentName": "Scheduled Alerts", "tactics": [], "timeGenerated": stamp,
            "startTimeUtc": stamp, "endTimeUtc": stamp, "processingEndTime": stamp,
            "resourceIdentifiers": [{"type": "LogAnalytics", "workspaceId": ws.guid,
                                     "subscriptionId": ws.subscription, "resourceGroup": ws.resource_group}],
            "additionalData": additional,
        }
        if alert.get("alertLink"):
            props["alertLink"] = alert["alertLink"]
        return {"id": f"{ws.resource_id}/providers/{PROVIDER}/Entities/{alert_id}", "name": alert_id,
                "type": f"{PROVIDER}/Entities", "kind": "SecurityAlert", "properties": props}

    def incident_visibility(self, *, workspace: str | None = None) -> dict[str, bool]:
        """Lower-cased incident name -> shown in the Defender portal's queue."""
        with self._lock:
            return {key: inc.visible for key, inc in self._workspace(workspace).incidents.items()}

    def incident_alerts(self, name: str, *, workspace: str | None = None) -> list[dict[str, Any]]:
        """The incident's alerts as ``POST .../alerts`` returns them."""
        with self._lock:
            return copy.deepcopy(self._require_named(workspace, name).alerts)

    def incident_entities(self, name: str, *, workspace: str | None = None) -> list[dict[str, Any]]:
        """The entities the rule mapped for the incident (``{"kind", "properties"}``)."""
        with self._lock:
            return copy.deepcopy(self._require_named(workspace, name).entities)

    def _require_named(self, workspace: str | None, name: str) -> _Incident:
        inc = self._workspace(workspace).incidents.get(name.lower())
        if inc is None:
            raise KeyError(f"no incident {name!r}")
        return inc

    def _portal_control(self, op: str, args: dict[str, Any] | None = None) -> Any:
        if self.portal is None:
            raise KeyError("no portal world is bound to this Sentinel emulator")
        return self.portal.control(op, args or {})

    # ------------------------------------------------------------------------------------------- control API

    def control(self, op: str, args: dict[str, Any]) -> Any:
        """Run an analyst/test operation by name with JSON arguments (for ``/_control/`` over HTTP, used by the
        demo and crash tests running the emulators as a process)."""
        ops: dict[str, Callable[..., Any]] = {
            "seed_incident": self.seed_incident, "seed_xdr_incident": self.seed_xdr_incident,
            "analyst_update": self.analyst_update, "analyst_comment": self.analyst_comment,
            "analyst_delete": self.analyst_delete, "get": self.get, "all_incidents": self.all_incidents,
            "comments": self.comments, "history": self.history, "deleted": self.deleted,
            "trigger_body": self.trigger_body, "write_counts": self.write_counts, "writes": self.writes,
            "reset_write_log": self.reset_write_log, "add_workspace": self.add_workspace,
            "config": self._config, "portal": self._portal_control,
            "assign_permissions": self.permissions.assign,
        }
        fn = ops.get(op)
        if fn is None:
            raise KeyError(f"unknown control operation {op!r}; known: {', '.join(sorted(ops))}")
        return fn(**args)

    def _config(self, **settings: Any) -> dict[str, Any]:
        for key in ("comment_bumps_modified", "label_bumps_modified", "paging", "default_page_size",
                    "ignore_provider_filter"):
            if key in settings:
                setattr(self, key, settings[key])
        return {"comment_bumps_modified": self.comment_bumps_modified,
                "label_bumps_modified": self.label_bumps_modified, "paging": self.paging,
                "default_page_size": self.default_page_size, "ignore_provider_filter": self.ignore_provider_filter}

    def _handle_control(self, request: EmuRequest) -> EmuResponse:
        # /_control/[sentinel/]<op>, POST with a JSON object of keyword arguments (GET: no arguments).
        parts = [p for p in request.path.split("/") if p][1:]
        if parts and parts[0] == self.name:
            parts = parts[1:]
        if len(parts) != 1:
            return _error(404, "NotFound", "use /_control/sentinel/<operation>")
        try:
            args = request.json() if request.body else {}
            if not isinstance(args, dict):
                return _error(400, "BadRequest", "control body must be a JSON object")
            return _ok(200, {"result": self.control(parts[0], args)})
        except KeyError as exc:
            return _error(404, "NotFound", str(exc))
        except (ValueError, TypeError) as exc:
            return _error(400, "BadRequest", str(exc))


# ---------------------------------------------------------------------------------------------------------- helpers


def _json_or_none(request: EmuRequest) -> Any:
    if not request.body:
        return None
    try:
        return request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Reject(400, "InvalidRequestContent", f"The request content was invalid: {exc}") from exc


def _caller(claims: dict[str, Any]) -> tuple[str, str]:
    """(who, type) for systemData: an app token has ``appid``/``azp``; a user token a ``upn``."""
    if claims.get("upn"):
        return str(claims["upn"]), "User"
    who = claims.get("appid") or claims.get("azp") or claims.get("oid") or "unknown-application"
    return str(who), "Application"


_SNAKE = {"classification_reason": "classificationReason", "classification_comment": "classificationComment",
          "first_activity_time_utc": "firstActivityTimeUtc", "last_activity_time_utc": "lastActivityTimeUtc"}


def _snake_to_props(changes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in changes.items():
        key = _SNAKE.get(key, key)
        if key not in WRITABLE:
            raise ValueError(f"unknown incident property {key!r}")
        if key == "owner" and isinstance(value, str):
            value = {"userPrincipalName": value}
        if key == "labels" and isinstance(value, list):
            value = [{"labelName": v} if isinstance(v, str) else v for v in value]
        out[key] = value
    return out


def _empty_owner() -> dict[str, Any]:
    return {"objectId": None, "email": None, "assignedTo": None, "userPrincipalName": None, "ownerType": None}


def _bad(message: str) -> _Reject:
    return _Reject(400, "BadRequest", message)


def _validate_properties(raw: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a PUT's properties and return the normalised writable set (read-only/unknown keys dropped)."""
    props: dict[str, Any] = {}
    title = raw.get("title")
    if not isinstance(title, str) or not title.strip():
        raise _bad("properties.title is required.")
    props["title"] = title
    for key, allowed in (("severity", SEVERITIES), ("status", STATUSES)):
        value = raw.get(key)
        if value is None:
            raise _bad(f"properties.{key} is required.")
        if value not in allowed:
            raise _bad(f"properties.{key} '{value}' is not valid; expected one of {', '.join(allowed)}.")
        props[key] = value
    for key in ("description", "classificationComment"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise _bad(f"properties.{key} must be a string.")
        props[key] = value
    for key in ("firstActivityTimeUtc", "lastActivityTimeUtc"):
        value = raw.get(key)
        if value is not None and not _is_time(value):
            raise _bad(f"properties.{key} must be an ISO-8601 time.")
        props[key] = value
    classification, reason = raw.get("classification"), raw.get("classificationReason")
    if classification is not None and classification not in CLASSIFICATIONS:
        raise _bad(f"properties.classification '{classification}' is not valid; expected one of "
                   f"{', '.join(CLASSIFICATIONS)}.")
    all_reasons = {r for rs in REASONS_BY_CLASSIFICATION.values() for r in rs}
    if reason is not None and reason not in all_reasons:
        raise _bad(f"properties.classificationReason '{reason}' is not valid.")
    if props["status"] == "Closed":
        if classification is None:
            raise _bad("properties.classification is required when status is Closed.")
        valid = REASONS_BY_CLASSIFICATION[classification]
        if valid and reason is None:
            raise _bad(f"properties.classificationReason is required for classification {classification}.")
        if reason is not None and reason not in valid:
            raise _bad(f"properties.classificationReason '{reason}' is not valid for classification "
                       f"{classification}" + (f"; expected {' or '.join(valid)}." if valid else "."))
        props["classification"], props["classificationReason"] = classification, reason
    else:
        # An open incident has no closure: what the body carries is dropped (see the module docstring).
        props["classification"] = props["classificationReason"] = props["classificationComment"] = None
    props["owner"] = _normalise_owner(raw.get("owner"))
    props["labels"] = _normalise_labels(raw.get("labels"), (existing or {}).get("labels") or [])
    return props


def _is_time(value: Any) -> bool:
    try:
        parse_ticks(value)
    except (ValueError, AttributeError):
        return False
    return True


def _normalise_owner(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("properties.owner must be an object.")
    fields = ("objectId", "email", "assignedTo", "userPrincipalName", "ownerType")
    for key in fields:
        if value.get(key) is not None and not isinstance(value[key], str):
            raise _bad(f"properties.owner.{key} must be a string.")
    object_id, upn, email = value.get("objectId"), value.get("userPrincipalName"), value.get("email")
    if object_id is not None and not _UUID_RE.match(object_id):
        raise _bad("properties.owner.objectId must be a GUID.")
    owner_type = value.get("ownerType") or "User"
    if owner_type not in OWNER_TYPES:
        raise _bad(f"properties.owner.ownerType '{owner_type}' is not valid.")
    if not (object_id or upn or email or value.get("assignedTo")):
        return None                                 # all empty: unassigned
    upn = upn or email
    # Real Sentinel resolves the owner in Entra; the emulator derives a stable object ID from the UPN.
    return {
        "objectId": object_id or (str(uuid.uuid5(uuid.NAMESPACE_URL, "user:" + upn.lower())) if upn else None),
        "email": email or upn,
        "assignedTo": value.get("assignedTo") or upn,
        "userPrincipalName": upn,
        "ownerType": owner_type,
    }


def _normalise_labels(value: Any, existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("properties.labels must be an array.")
    auto = {lbl["labelName"] for lbl in existing if lbl.get("labelType") == "AutoAssigned"}
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in value:
        name = item.get("labelName") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise _bad("properties.labels[].labelName is required.")
        if name in seen:
            continue
        seen.add(name)
        # labelType is read-only: new labels are User labels, AutoAssigned ones keep their type.
        out.append({"labelName": name, "labelType": "AutoAssigned" if name in auto else "User"})
    return out


# $filter / $orderby ------------------------------------------------------------------------------------------------

_TIME_FIELDS: dict[str, Callable[[_Incident], int]] = {
    "properties/lastmodifiedtimeutc": lambda i: i.modified,
    "properties/createdtimeutc": lambda i: i.created,
}
_TEXT_FIELDS: dict[str, Callable[[_Incident], str | None]] = {
    "properties/providerincidentid": lambda i: i.provider_incident_id,
    "properties/providername": lambda i: i.provider_name,
    "properties/status": lambda i: i.props.get("status"),
    "properties/severity": lambda i: i.props.get("severity"),
    "properties/title": lambda i: i.props.get("title"),
    "name": lambda i: i.name,
}
_INCIDENT_SORT_KEYS: dict[str, Callable[[_Incident], Any]] = {
    "properties/lastmodifiedtimeutc": lambda i: i.modified,
    "properties/createdtimeutc": lambda i: i.created,
    "properties/incidentnumber": lambda i: i.number,
    "name": lambda i: i.name.lower(),
}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
}


def _parse_filter(text: str | None, ignore: frozenset[str] = frozenset()) -> list[Callable[[_Incident], bool]]:
    """OData subset: comparisons joined by ``and``; anything else is a 400 naming the unsupported part. Clauses on
    the fields in ``ignore`` are parsed and then dropped (a lenient service)."""
    if not text or not text.strip():
        return []
    predicates: list[Callable[[_Incident], bool]] = []
    pos = 0
    while True:
        m = _CLAUSE_RE.match(text, pos)
        if not m:
            raise _bad(f"Invalid $filter: cannot parse at '{text[pos:pos + 40]}'.")
        predicate = _clause(m.group("field").lower(), m.group("op").lower(), m.group("value"))
        if m.group("field").lower() not in ignore:
            predicates.append(predicate)
        pos = m.end()
        if pos >= len(text):
            return predicates
        a = _AND_RE.match(text, pos)
        if not a:
            raise _bad(f"Invalid $filter: only 'and' joins are supported, at '{text[pos:pos + 40]}'.")
        pos = a.end()


def _clause(fld: str, op: str, raw: str) -> Callable[[_Incident], bool]:
    cmp = _OPS[op]
    if fld in _TIME_FIELDS:
        literal = raw[len("datetime'"):-1] if raw.lower().startswith("datetime'") else raw.strip("'")
        try:
            ticks = parse_ticks(literal)
        except ValueError:
            raise _bad(f"Invalid $filter: '{raw}' is not a date-time for {fld}.") from None
        getter_t = _TIME_FIELDS[fld]
        return lambda i: cmp(getter_t(i), ticks)
    if fld in _TEXT_FIELDS:
        if not (raw.startswith("'") and raw.endswith("'")) or op not in ("eq", "ne"):
            raise _bad(f"Invalid $filter: {fld} takes eq/ne with a quoted string.")
        value = raw[1:-1].replace("''", "'")
        getter_s = _TEXT_FIELDS[fld]
        return lambda i: cmp(getter_s(i), value)
    if fld == "properties/incidentnumber":
        try:
            number = int(raw)
        except ValueError:
            raise _bad(f"Invalid $filter: '{raw}' is not an integer.") from None
        return lambda i: cmp(i.number, number)
    raise _bad(f"Invalid $filter: property '{fld}' is not supported.")


def _parse_orderby(text: str | None, *, default: tuple[str, bool],
                   allowed: Iterable[str] = tuple(_INCIDENT_SORT_KEYS)) -> tuple[str, bool]:
    if not text or not text.strip():
        return default
    parts = text.split()
    fld = parts[0].lower()
    direction = parts[1].lower() if len(parts) > 1 else "asc"
    if fld not in tuple(allowed) or direction not in ("asc", "desc") or len(parts) > 2:
        raise _bad(f"Invalid $orderby '{text}'.")
    return fld, direction == "desc"
