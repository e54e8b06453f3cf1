"""Emulated Microsoft Graph security API (v1.0): incidents, alerts_v2, incident PATCH and comments.

Data is per tenant and chosen by the caller token's ``tid`` (tenants are isolated). The token must be for this
server's base URL (``GRAPH_ENDPOINT``) and carry a ``SecurityIncident.*`` role (``SecurityAlert.*`` for alerts_v2;
``SecurityIncident.ReadWrite.All`` for PATCH/comments), else 401/403.

``GET /v1.0/security/incidents``
    * ``$filter``: clauses joined by ``and`` (no ``or``, ``not``, parentheses, functions -> 400):
      ``lastUpdateDateTime``/``createdDateTime`` with ``eq ne gt ge lt le`` and an UNQUOTED ISO-8601 time with ``Z``
      or an offset (``lastUpdateDateTime ge 2026-11-20T10:00:00.1234567Z``; a quoted time is a type error, 400);
      ``status``/``severity``/``classification``/``determination``/``assignedTo`` with ``eq``/``ne`` and a quoted
      string (enum values are checked). Anything else -> 400 in Graph's error shape.
    * ``$top``: default 50; maximum **50 with** ``$expand=alerts``, **1000 without** (larger -> 400). The real
      maximum is undocumented; these are the pessimistic readings.
    * ``$skip`` (offset), ``$count=true`` (``@odata.count``), ``$expand=alerts`` (alerts with ``evidence``).
      ``$orderby`` and ``$select`` are accepted and IGNORED (not documented for this API: clients must not rely on
      them). Other ``$`` options -> 400.
    * Order: NEWEST FIRST by ``lastUpdateDateTime``; ties by incident ID descending (numeric IDs compare as
      numbers). Fault switches (also ``POST /_control/graph/settings``): :attr:`GraphState.unstable_ties` orders each
      tie group differently on every request, :attr:`GraphState.unordered_pages` serves each page oldest first.
    * ``@odata.nextLink``: the same query with ``$skip`` increased by ``$top``. Offset-based, exactly like real Graph:
      an incident updated between two page requests moves to the front and shifts every later offset, so a client
      paging newest-first can skip an incident.
``GET /v1.0/security/incidents/{id}`` (``$expand=alerts``): 404 ``NotFound`` when unknown in the caller's tenant.
``PATCH /v1.0/security/incidents/{id}``: only ``assignedTo``, ``resolvingComment``, ``classification``,
    ``determination``, ``status``
    (``active``/``inProgress``/``resolved``; ``redirected``/``awaitingAction``/``unknownFutureValue`` -> 400) and
    ``customTags`` (replaces the collection). camelCase enum values only (``TruePositive`` -> 400). With
    :attr:`GraphState.strict_determination` (default on) the resulting classification/determination pair must be
    valid (see :data:`VALID_DETERMINATIONS`; ``unknown`` determination is valid with any classification).
    Determinations are spelled as Graph v1.0's metadata (``compromisedAccount``, ``notMalicious``,
    ``notEnoughDataToValidate``, ``confirmedActivity``); the other spelling Microsoft's pages show
    (``compromisedUser``, ``clean``, ``insufficientData``, ``confirmedUserActivity``) -> 400, like Graph. With
    :attr:`GraphState.legacy_determinations` on, exactly the reverse (a service that takes only the other set). Bumps
    ``lastUpdateDateTime`` (also for a PATCH that changes nothing, unless :attr:`GraphState.bump_on_noop_patch` is
    off) and sets ``lastModifiedBy`` to the caller app's display name (defaults to its client ID). Resolving an
    incident also resolves its alerts (:attr:`GraphState.cascade_resolve`), which bumps their
    ``lastUpdateDateTime``. Answers 200 with the incident. For a tenant in :attr:`GraphState.refuse_in_progress`,
    status ``inProgress`` is refused (400), as Graph may (it is not among the documented PATCH values).
``POST /v1.0/security/incidents/{id}/comments``: body ``{"@odata.type": "microsoft.graph.security.alertComment",
    "comment": "..."}``; appends a comment (``createdByDisplayName`` = caller app), bumps ``lastUpdateDateTime``,
    answers 200 ``{"value": [every comment]}``.
``GET /v1.0/security/alerts_v2`` (``$filter=incidentId eq '123'``, ``lastUpdateDateTime``/``createdDateTime``
    comparisons, ``status``/``severity``/``serviceSource`` eq; ``$top`` default 50, max 2000; ``$skip``; nextLink;
    newest first) and ``GET /v1.0/security/alerts_v2/{id}``.

``Prefer: include-unknown-enum-members`` is honoured: without it, evolvable enum members (incident status
``awaitingAction``, newer ``serviceSource``/``detectionSource`` values) read as ``unknownFutureValue``.
Times are served with 7 fractional digits. Incidents are stored compactly (zlib-compressed JSON) so a World can hold
100,000 of them.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from .base import EmuError, EmuRequest, EmuResponse
from .tokens import TokenError, TokenIssuer

TICKS_PER_SECOND = 10_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

INCIDENT_STATUSES = ("active", "resolved", "inProgress", "redirected", "unknownFutureValue", "awaitingAction")
PATCH_STATUSES = ("active", "inProgress", "resolved")
ALERT_STATUSES = ("unknown", "new", "inProgress", "resolved", "unknownFutureValue")
SEVERITIES = ("unknown", "informational", "low", "medium", "high", "unknownFutureValue")
CLASSIFICATIONS = ("unknown", "falsePositive", "truePositive", "informationalExpectedActivity", "unknownFutureValue")
DETERMINATIONS = ("unknown", "apt", "malware", "securityPersonnel", "securityTesting", "unwantedSoftware", "other",
                  "multiStagedAttack", "compromisedAccount", "phishing", "maliciousUserActivity", "notMalicious",
                  "notEnoughDataToValidate", "confirmedActivity", "lineOfBusinessApplication", "unknownFutureValue")
VALID_DETERMINATIONS: dict[str, frozenset[str]] = {
    "truePositive": frozenset({"multiStagedAttack", "maliciousUserActivity", "compromisedAccount", "malware",
                               "phishing", "unwantedSoftware", "other", "apt", "securityPersonnel", "unknown"}),
    "informationalExpectedActivity": frozenset({"securityTesting", "lineOfBusinessApplication",
                                                "confirmedActivity", "other", "unknown"}),
    "falsePositive": frozenset({"notMalicious", "notEnoughDataToValidate", "other", "unknown"}),
    "unknown": frozenset({"unknown"}),
}
#: Graph metadata spelling -> the other spelling on some Microsoft pages (refused by Graph v1.0's PATCH).
_LEGACY_SPELLING = {"compromisedAccount": "compromisedUser", "notMalicious": "clean",
                    "notEnoughDataToValidate": "insufficientData", "confirmedActivity": "confirmedUserActivity"}
_METADATA_SPELLING = {v: k for k, v in _LEGACY_SPELLING.items()}
SERVICE_SOURCES = ("unknown", "microsoftDefenderForEndpoint", "microsoftDefenderForIdentity",
                   "microsoftDefenderForCloudApps", "microsoftDefenderForOffice365", "microsoft365Defender",
                   "azureAdIdentityProtection", "microsoftAppGovernance", "dataLossPrevention", "unknownFutureValue",
                   "microsoftDefenderForCloud", "microsoftSentinel", "microsoftInsiderRiskManagement",
                   "microsoftThreatIntelligence", "microsoftSecurityForAI")
DETECTION_SOURCES = ("unknown", "microsoftDefenderForEndpoint", "antivirus", "smartScreen", "customTi",
                     "microsoftDefenderForOffice365", "automatedInvestigation", "microsoftThreatExperts",
                     "customDetection", "microsoftDefenderForIdentity", "cloudAppSecurity", "microsoft365Defender",
                     "azureAdIdentityProtection", "manual", "microsoftDataLossPrevention", "appGovernancePolicy",
                     "appGovernanceDetection", "unknownFutureValue", "microsoftDefenderForCloud",
                     "microsoftDefenderForIoT", "microsoftDefenderForServers", "microsoftDefenderForStorage",
                     "microsoftDefenderForDNS", "microsoftDefenderForDatabases", "microsoftDefenderForContainers",
                     "microsoftDefenderForNetwork", "microsoftDefenderForAppService", "microsoftDefenderForKeyVault",
                     "microsoftDefenderForResourceManager", "microsoftDefenderForApiManagement", "nrtAlerts",
                     "scheduledAlerts", "microsoftDefenderThreatIntelligenceAnalytics", "builtInMl",
                     "microsoftInsiderRiskManagement", "microsoftThreatIntelligence",
                     "microsoftDefenderForAIServices", "securityCopilot", "microsoftSentinel")


def _evolvable(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(values[values.index("unknownFutureValue") + 1:])


EVOLVABLE_INCIDENT_STATUS = _evolvable(INCIDENT_STATUSES)
EVOLVABLE_SERVICE_SOURCE = _evolvable(SERVICE_SOURCES)
EVOLVABLE_DETECTION_SOURCE = _evolvable(DETECTION_SOURCES)

UPDATABLE = ("assignedTo", "classification", "determination", "status", "customTags", "resolvingComment")
READ_ONLY = ("id", "tenantId", "displayName", "description", "summary", "createdDateTime", "lastUpdateDateTime",
             "severity", "systemTags", "comments", "incidentWebUrl", "redirectIncidentId", "lastModifiedBy",
             "priorityScore", "alerts")
INCIDENT_PAGE_DEFAULT = 50
INCIDENT_MAX_TOP_EXPANDED = 50
INCIDENT_MAX_TOP = 1000
ALERT_PAGE_DEFAULT = 50
ALERT_MAX_TOP = 2000
READ_ROLES = ("SecurityIncident.Read.All", "SecurityIncident.ReadWrite.All")
WRITE_ROLES = ("SecurityIncident.ReadWrite.All",)
ALERT_ROLES = ("SecurityAlert.Read.All", "SecurityAlert.ReadWrite.All")

_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?)(?:\.(\d{1,12}))?(Z|[+-]\d{2}:\d{2})$",
                      re.IGNORECASE)
_CLAUSE_RE = re.compile(r"\s*(?P<field>[A-Za-z_][A-Za-z0-9_/]*)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+"
                        r"(?P<value>'(?:[^']|'')*'|[^\s()']+)\s*", re.IGNORECASE)
_AND_RE = re.compile(r"and(?=\s)", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------- time


_CANONICAL_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z\Z")
_EPOCH_ORDINAL = _EPOCH.date().toordinal()
_DAY_PREFIX: dict[int, str] = {}


def parse_ticks(text: str) -> int:
    """ISO-8601 time WITH ``Z`` or an offset (up to 12 fractional digits, cut to 7) -> 100 ns ticks since epoch.

    Raises ``ValueError``.
    """
    if not isinstance(text, str):
        raise ValueError(f"not an ISO-8601 time: {text!r}")
    if len(text) == 28 and _CANONICAL_RE.match(text):
        days = date.fromisoformat(text[:10]).toordinal() - _EPOCH_ORDINAL
        seconds = days * 86400 + int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
        return seconds * TICKS_PER_SECOND + int(text[20:27])
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"not an ISO-8601 time with a zone: {text!r}")
    base, frac, zone = m.group(1), m.group(2) or "", m.group(3)
    if len(base) == 16:
        base += ":00"
    zone = "+00:00" if zone.upper() == "Z" else zone
    moment = datetime.fromisoformat(base + zone)
    whole = (moment - _EPOCH) // timedelta(seconds=1)
    return whole * TICKS_PER_SECOND + int((frac + "0000000")[:7])


def format_ticks(ticks: int) -> str:
    """100 ns ticks -> ``YYYY-MM-DDTHH:MM:SS.fffffffZ`` (7 fractional digits, like Graph)."""
    seconds, frac = divmod(int(ticks), TICKS_PER_SECOND)
    day, second_of_day = divmod(seconds, 86400)
    prefix = _DAY_PREFIX.get(day)
    if prefix is None:
        prefix = _DAY_PREFIX[day] = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    return f"{prefix}{hour:02d}:{minute:02d}:{second:02d}.{frac:07d}Z"


def normalize_time(text: str | None) -> str | None:
    """Re-format an ISO time with 7 fractional digits (``None`` stays ``None``)."""
    if text is None or (len(text) == 28 and _CANONICAL_RE.match(text)):
        return text
    return format_ticks(parse_ticks(text))


def to_ticks(value: datetime) -> int:
    """Aware ``datetime`` -> ticks."""
    delta = value.astimezone(UTC) - _EPOCH
    return (delta.days * 86400 + delta.seconds) * TICKS_PER_SECOND + delta.microseconds * 10


class ServerClock:
    """Strictly increasing server time in 100 ns ticks; explicit timestamps seen are :meth:`observe`-d so later
    bumps are always newer than anything stored. ``offset`` (seconds) shifts it for tests."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._last = 0
        self._offset = 0
        self._lock = threading.Lock()

    def now_ticks(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, self._clock_ns() // 100 + self._offset)
            return self._last

    def now(self) -> str:
        """A fresh timestamp string, strictly later than every earlier one."""
        return format_ticks(self.now_ticks())

    def observe(self, ticks: int) -> None:
        with self._lock:
            self._last = max(self._last, ticks)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        with self._lock:
            self._offset += int(seconds * TICKS_PER_SECOND)

    def reset(self) -> None:
        """Back to real time (no offset): for a reset World, whose stored times are gone with it."""
        with self._lock:
            self._offset = 0
            self._last = 0


# ----------------------------------------------------------------------------------------------------- storage


class _Stored:
    __slots__ = ("blob", "created", "id", "key")

    def __init__(self, incident_id: str, key: tuple[int, int, str], created: int, blob: bytes) -> None:
        self.id = incident_id
        self.key = key
        self.created = created
        self.blob = blob


class _TenantStore:
    __slots__ = ("alert_owner", "incidents", "next_id", "order")

    def __init__(self) -> None:
        self.incidents: dict[str, _Stored] = {}
        self.order: list[tuple[int, int, str]] = []
        self.alert_owner: dict[str, str] = {}
        self.next_id = 1


@dataclass
class PageInfo:
    """What a page hook sees: the page just served."""

    tenant_id: str
    resource: str                 # "incidents" or "alerts_v2"
    number: int                   # 1-based, counted from the hook's registration
    skip: int
    top: int
    ids: list[str]
    next_link: str | None


@dataclass
class _Hook:
    callback: Callable[[PageInfo], Any]
    after: int
    tenant_id: str | None
    resource: str
    once: bool
    seen: int = 0
    done: bool = False


@dataclass
class GraphWrite:
    """One PATCH or comment the API accepted (for tests' write counts)."""

    tenant_id: str
    incident_id: str
    kind: str                     # "patch" or "comment"
    body: dict[str, Any]
    caller: str
    at: str


def _id_key(incident_id: str) -> int:
    return int(incident_id) if incident_id.isdigit() else -1


_ZDICT: list[bytes] = []


def _zdict() -> bytes:
    """A fixed zlib preset dictionary (generated incidents' JSON): small documents compress ~40% better."""
    if not _ZDICT:
        from .generator import generate_incidents

        sample = list(generate_incidents(20240601, "00000000-0000-0000-0000-000000000000", 12, profile="small",
                                         start=datetime(2026, 1, 1, tzinfo=UTC),
                                         end=datetime(2026, 1, 2, tzinfo=UTC)))
        _ZDICT.append(_dumps({"value": sample})[-32768:])
    return _ZDICT[0]


_CODECS: dict[str, Any] = {}


def _packer() -> Any:
    """A compressor primed with :func:`_zdict` (copied per document: priming is the expensive part)."""
    if "pack" not in _CODECS:
        _CODECS["pack"] = zlib.compressobj(1, zdict=_zdict())
    return _CODECS["pack"]


def _unpacker() -> Any:
    if "unpack" not in _CODECS:
        _CODECS["unpack"] = zlib.decompressobj(zdict=_zdict())
    return _CODECS["unpack"]


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class GraphState:
    """All tenants' incidents and alerts, with the Python API tests and the generator use. Thread-safe.

    Incident dicts use Graph's JSON shape (see the module docstring); ``alerts`` is a list of alert dicts, each with
    ``evidence``. Every method returns fresh copies, never the stored objects.
    """

    def __init__(self, lock: threading.RLock | None = None, clock: ServerClock | None = None,
                 compress: bool = True) -> None:
        self.lock = lock or threading.RLock()
        self.clock = clock or ServerClock()
        self.compress = compress
        self.strict_determination = True
        self.legacy_determinations = False
        self.bump_on_noop_patch = True
        self.cascade_resolve = True
        self.unstable_ties = False   # order each tie group differently on every list request (fault switch)
        self.unordered_pages = False  # serve list pages oldest first instead of newest first (fault switch)
        self._list_calls = 0
        # Tenants whose PATCH refuses status inProgress (400), as Graph may: it is not a documented PATCH value.
        self.refuse_in_progress: set[str] = set()
        self.tenants: dict[str, _TenantStore] = {}
        self.writes: list[GraphWrite] = []
        self._hooks: list[_Hook] = []

    # -- encoding ----------------------------------------------------------------------------------------------

    def _encode(self, doc: dict[str, Any]) -> bytes:
        raw = _dumps(doc)
        if not self.compress:
            return raw
        packer = _packer().copy()
        return bytes(packer.compress(raw) + packer.flush())

    @staticmethod
    def _decode(blob: bytes) -> dict[str, Any]:
        if blob[:1] == b"{":
            return json.loads(blob)  # type: ignore[no-any-return]
        unpacker = _unpacker().copy()
        return json.loads(unpacker.decompress(blob) + unpacker.flush())  # type: ignore[no-any-return]

    def _store(self, tenant_id: str) -> _TenantStore:
        store = self.tenants.get(tenant_id)
        if store is None:
            store = self.tenants[tenant_id] = _TenantStore()
        return store

    def _put(self, tenant_id: str, doc: dict[str, Any]) -> None:
        store = self._store(tenant_id)
        incident_id = doc["id"]
        old = store.incidents.get(incident_id)
        if old is not None:
            index = bisect.bisect_left(store.order, old.key)
            if index < len(store.order) and store.order[index] == old.key:
                del store.order[index]
        updated = parse_ticks(doc["lastUpdateDateTime"])
        self.clock.observe(updated)
        key = (updated, _id_key(incident_id), incident_id)
        bisect.insort(store.order, key)
        store.incidents[incident_id] = _Stored(incident_id, key, parse_ticks(doc["createdDateTime"]),
                                               self._encode(doc))
        for alert in doc.get("alerts") or []:
            store.alert_owner[alert["id"]] = incident_id
        if incident_id.isdigit():
            store.next_id = max(store.next_id, int(incident_id) + 1)

    def _get(self, tenant_id: str, incident_id: str) -> dict[str, Any] | None:
        store = self.tenants.get(tenant_id)
        stored = store.incidents.get(incident_id) if store else None
        return self._decode(stored.blob) if stored else None

    def _require(self, tenant_id: str, incident_id: str) -> dict[str, Any]:
        doc = self._get(tenant_id, incident_id)
        if doc is None:
            raise KeyError(f"no incident {incident_id!r} in tenant {tenant_id!r}")
        return doc

    # -- world API -----------------------------------------------------------------------------------------------

    def ensure_tenant(self, tenant_id: str) -> None:
        """Make ``tenant_id`` exist (with no incidents)."""
        with self.lock:
            self._store(tenant_id)

    def add_incident(self, tenant_id: str, incident: dict[str, Any]) -> dict[str, Any]:
        """Store an incident (upsert by ``id``; a missing ``id`` gets the tenant's next number). Missing fields get
        Graph's defaults, ``lastUpdateDateTime`` defaults to the server clock, times are normalized to 7 digits.
        Returns the stored incident (with alerts)."""
        with self.lock:
            doc = self._normalize_incident(tenant_id, dict(incident))
            self._put(tenant_id, doc)
            return self._require(tenant_id, doc["id"])

    def add_incidents(self, tenant_id: str, incidents: Iterable[dict[str, Any]]) -> int:
        """Store many incidents (e.g. from :mod:`emulators.generator`); returns how many."""
        count = 0
        for incident in incidents:
            with self.lock:
                self._put(tenant_id, self._normalize_incident(tenant_id, dict(incident)))
            count += 1
        return count

    def get_incident(self, tenant_id: str, incident_id: str, expand_alerts: bool = True) -> dict[str, Any] | None:
        """The stored incident (raw values: ``awaitingAction`` is not masked), or ``None``."""
        with self.lock:
            doc = self._get(tenant_id, incident_id)
        if doc is not None and not expand_alerts:
            doc.pop("alerts", None)
        return doc

    def incident_ids(self, tenant_id: str) -> list[str]:
        """IDs newest first (the API's order)."""
        with self.lock:
            store = self.tenants.get(tenant_id)
            return [key[2] for key in reversed(store.order)] if store else []

    def incident_count(self, tenant_id: str | None = None) -> int:
        with self.lock:
            stores = [self.tenants.get(tenant_id)] if tenant_id else list(self.tenants.values())
            return sum(len(s.incidents) for s in stores if s)

    def update_incident(self, tenant_id: str, incident_id: str, changes: dict[str, Any] | None = None, *,
                        last_update: str | None = None, **fields: Any) -> dict[str, Any]:
        """Change incident fields as Defender would (no validation). ``lastUpdateDateTime`` becomes ``last_update``
        (or ``changes["lastUpdateDateTime"]``) when given, allowing ties and late-visible (older) timestamps;
        otherwise the strictly increasing server clock. Alerts change through :meth:`add_alert`/:meth:`update_alert`.
        Returns the incident."""
        merged = dict(changes or {})
        merged.update(fields)
        if "alerts" in merged:
            raise ValueError("change alerts with add_alert/update_alert/redirect_incident")
        stamp = merged.pop("lastUpdateDateTime", None) or last_update
        with self.lock:
            doc = self._require(tenant_id, incident_id)
            doc.update(merged)
            for key in ("createdDateTime",):
                if doc.get(key):
                    doc[key] = normalize_time(doc[key])
            doc["lastUpdateDateTime"] = normalize_time(stamp) if stamp else self.clock.now()
            self._put(tenant_id, doc)
            return self._require(tenant_id, incident_id)

    def add_alert(self, tenant_id: str, incident_id: str, alert: dict[str, Any], *,
                  last_update: str | None = None) -> dict[str, Any]:
        """Attach an alert to an incident; bumps the incident's ``lastUpdateDateTime``. Returns the alert."""
        with self.lock:
            doc = self._require(tenant_id, incident_id)
            stamp = normalize_time(last_update) or self.clock.now()
            normalized = self._normalize_alert(tenant_id, doc, dict(alert), stamp)
            doc.setdefault("alerts", []).append(normalized)
            doc["lastUpdateDateTime"] = stamp
            self._put(tenant_id, doc)
            return normalized

    def update_alert(self, tenant_id: str, alert_id: str, changes: dict[str, Any] | None = None, *,
                     last_update: str | None = None, bump_incident: bool = True, **fields: Any) -> dict[str, Any]:
        """Change an alert; its ``lastUpdateDateTime`` (and, with ``bump_incident``, its incident's) moves to
        ``last_update`` or the server clock. Returns the alert."""
        merged = dict(changes or {})
        merged.update(fields)
        with self.lock:
            store = self.tenants.get(tenant_id)
            owner = store.alert_owner.get(alert_id) if store else None
            if owner is None:
                raise KeyError(f"no alert {alert_id!r} in tenant {tenant_id!r}")
            doc = self._require(tenant_id, owner)
            stamp = normalize_time(last_update) if last_update else self.clock.now()
            found: dict[str, Any] | None = None
            for alert in doc.get("alerts") or []:
                if alert["id"] == alert_id:
                    alert.update(merged)
                    alert["lastUpdateDateTime"] = stamp
                    found = alert
            if found is None:
                raise KeyError(f"no alert {alert_id!r}")
            if bump_incident:
                doc["lastUpdateDateTime"] = stamp
            self._put(tenant_id, doc)
            return found

    def redirect_incident(self, tenant_id: str, from_id: str, to_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Merge ``from_id`` into ``to_id`` as Defender does: the alerts move (their ``incidentId`` and
        ``lastUpdateDateTime`` change), ``from_id`` becomes ``status=redirected`` with ``redirectIncidentId=to_id``;
        both incidents are bumped. Returns ``(from, to)``."""
        with self.lock:
            loser = self._require(tenant_id, from_id)
            winner = self._require(tenant_id, to_id)
            stamp = self.clock.now()
            moved = loser.get("alerts") or []
            for alert in moved:
                alert["incidentId"] = to_id
                alert["lastUpdateDateTime"] = stamp
                alert["incidentWebUrl"] = winner.get("incidentWebUrl")
            winner.setdefault("alerts", []).extend(moved)
            loser["alerts"] = []
            loser["status"] = "redirected"
            loser["redirectIncidentId"] = to_id
            loser["lastUpdateDateTime"] = stamp
            winner["lastUpdateDateTime"] = self.clock.now()
            self._put(tenant_id, loser)
            self._put(tenant_id, winner)
            return self._require(tenant_id, from_id), self._require(tenant_id, to_id)

    def delete_incident(self, tenant_id: str, incident_id: str) -> bool:
        """Remove an incident (later reads are 404). Returns whether it existed."""
        with self.lock:
            store = self.tenants.get(tenant_id)
            stored = store.incidents.pop(incident_id, None) if store else None
            if store is None or stored is None:
                return False
            index = bisect.bisect_left(store.order, stored.key)
            if index < len(store.order) and store.order[index] == stored.key:
                del store.order[index]
            for alert_id in [a for a, owner in store.alert_owner.items() if owner == incident_id]:
                del store.alert_owner[alert_id]
            return True

    def after_page(self, n: int, callback: Callable[[PageInfo], Any], *, tenant_id: str | None = None,
                   resource: str = "incidents", once: bool = True) -> None:
        """Run ``callback(page_info)`` right after the ``n``-th list page (counted from now; of ``tenant_id`` and
        ``resource`` if given) is computed and before it is sent, so the client's NEXT page sees the change. With
        ``once=False`` it runs after every page from the ``n``-th on. Use it to reproduce the offset shift::

            world.graph.after_page(1, lambda page: world.update_incident(tid, page.ids[-1], severity="high"))
        """
        with self.lock:
            self._hooks.append(_Hook(callback, n, tenant_id, resource, once))

    def clear_hooks(self) -> None:
        with self.lock:
            self._hooks.clear()

    def reset(self) -> None:
        """Forget every tenant, incident, hook and recorded write (settings go back to defaults)."""
        with self.lock:
            self.tenants.clear()
            self.writes.clear()
            self._hooks.clear()
            self.strict_determination = True
            self.legacy_determinations = False
            self.bump_on_noop_patch = True
            self.cascade_resolve = True
            self.unstable_ties = self.unordered_pages = False
            self.refuse_in_progress.clear()

    # -- normalization -----------------------------------------------------------------------------------------

    def _normalize_incident(self, tenant_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        store = self._store(tenant_id)
        incident_id = str(doc.get("id") or store.next_id)
        doc["id"] = incident_id
        doc["tenantId"] = tenant_id
        stamp = normalize_time(doc.get("lastUpdateDateTime")) or self.clock.now()
        doc["lastUpdateDateTime"] = stamp
        doc["createdDateTime"] = normalize_time(doc.get("createdDateTime")) or stamp
        defaults: dict[str, Any] = {
            "displayName": f"Incident {incident_id}", "description": None, "summary": None, "status": "active",
            "severity": "medium", "classification": "unknown", "determination": "unknown", "assignedTo": None,
            "customTags": [], "systemTags": [], "comments": [],
            "incidentWebUrl": f"https://security.microsoft.com/incidents/{incident_id}?tid={tenant_id}",
            "redirectIncidentId": None, "resolvingComment": None, "lastModifiedBy": None, "priorityScore": None,
        }
        for key, value in defaults.items():
            doc.setdefault(key, value)
        alerts = doc.get("alerts") or []
        doc["alerts"] = [self._normalize_alert(tenant_id, doc, dict(a), doc["lastUpdateDateTime"]) for a in alerts]
        return doc

    @staticmethod
    def _normalize_alert(tenant_id: str, incident: dict[str, Any], alert: dict[str, Any],
                         stamp: str) -> dict[str, Any]:
        alert_id = str(alert.get("id") or f"da{uuid.uuid4().int % 10**18:018d}_{uuid.uuid4().int % 10**9}")
        alert["id"] = alert_id
        alert["incidentId"] = incident["id"]
        alert["tenantId"] = tenant_id
        alert["lastUpdateDateTime"] = normalize_time(alert.get("lastUpdateDateTime")) or stamp
        alert["createdDateTime"] = normalize_time(alert.get("createdDateTime")) or alert["lastUpdateDateTime"]
        for key in ("resolvedDateTime", "firstActivityDateTime", "lastActivityDateTime"):
            if alert.get(key):
                alert[key] = normalize_time(alert[key])
        defaults: dict[str, Any] = {
            "providerAlertId": alert_id, "status": "new", "severity": "medium", "classification": None,
            "determination": None, "serviceSource": "microsoftDefenderForEndpoint", "detectionSource": "antivirus",
            "detectorId": None, "title": f"Alert {alert_id}", "description": None, "recommendedActions": None,
            "category": None, "assignedTo": None,
            "alertWebUrl": f"https://security.microsoft.com/alerts/{alert_id}?tid={tenant_id}",
            "incidentWebUrl": incident.get("incidentWebUrl"), "actorDisplayName": None, "threatDisplayName": None,
            "threatFamilyName": None, "mitreTechniques": [], "resolvedDateTime": None,
            "firstActivityDateTime": None, "lastActivityDateTime": None, "comments": [], "evidence": [],
            "systemTags": [], "additionalData": {}, "alertPolicyId": None, "customDetails": {},
            "investigationState": "unknown", "productName": None,
        }
        for key, value in defaults.items():
            alert.setdefault(key, value)
        return alert

    # -- queries used by the service ---------------------------------------------------------------------------

    def _shuffled_ties(self, keys: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
        """Newest first, each group of equal ``lastUpdateDateTime`` in a new order on every call."""
        self._list_calls += 1
        rng = random.Random(self._list_calls)
        out: list[tuple[int, int, str]] = []
        for _, group in itertools.groupby(keys, key=lambda k: k[0]):
            members = list(group)
            rng.shuffle(members)
            out.extend(members)
        return out

    def _select(self, tenant_id: str, clauses: list[_Clause], skip: int, top: int,
                count: bool) -> tuple[list[dict[str, Any]], int | None, bool]:
        """(docs of the page, total if counted, more pages?) newest first."""
        store = self.tenants.get(tenant_id)
        if store is None:
            return [], (0 if count else None), False
        lo_t, hi_t = -1, 1 << 62
        others: list[_Clause] = []
        for clause in clauses:
            if clause.field == "lastUpdateDateTime" and clause.op != "ne":
                t = int(clause.value)
                if clause.op in ("ge", "eq"):
                    lo_t = max(lo_t, t)
                if clause.op == "gt":
                    lo_t = max(lo_t, t + 1)
                if clause.op in ("le", "eq"):
                    hi_t = min(hi_t, t)
                if clause.op == "lt":
                    hi_t = min(hi_t, t - 1)
            else:
                others.append(clause)
        lo = bisect.bisect_left(store.order, (lo_t,))
        hi = bisect.bisect_left(store.order, (hi_t + 1,))
        if hi <= lo:
            return [], (0 if count else None), False
        if not others:
            total = hi - lo
            first = hi - 1 - skip
            last = max(lo, first - top + 1)
            if self.unstable_ties:
                keys = self._shuffled_ties([store.order[i] for i in range(hi - 1, lo - 1, -1)])[skip:skip + top]
            else:
                keys = [store.order[i] for i in range(first, last - 1, -1)] if first >= lo and top > 0 else []
            docs = [self._decode(store.incidents[k[2]].blob) for k in keys]
            if self.unordered_pages:
                docs.reverse()
            return docs, (total if count else None), top > 0 and skip + top < total
        matched: list[dict[str, Any]] = []
        total = 0
        for i in range(hi - 1, lo - 1, -1):
            stored = store.incidents[store.order[i][2]]
            doc: dict[str, Any] | None = None
            ok = True
            for clause in others:
                if clause.field == "createdDateTime":
                    ok = _compare(stored.created, clause.op, int(clause.value))
                elif clause.field == "lastUpdateDateTime":
                    ok = stored.key[0] != int(clause.value)
                else:
                    doc = doc or self._decode(stored.blob)
                    ok = _compare(doc.get(clause.field), clause.op, clause.value)
                if not ok:
                    break
            if not ok:
                continue
            if skip <= total < skip + top:
                matched.append(doc or self._decode(stored.blob))
            total += 1
            if not count and total > skip + top:
                break
        return matched, (total if count else None), top > 0 and total > skip + top

    def _alerts(self, tenant_id: str, incident_id: str | None) -> list[dict[str, Any]]:
        store = self.tenants.get(tenant_id)
        if store is None:
            return []
        ids = [incident_id] if incident_id is not None else list(store.incidents)
        alerts: list[dict[str, Any]] = []
        for iid in ids:
            stored = store.incidents.get(iid)
            if stored is not None:
                alerts.extend(self._decode(stored.blob).get("alerts") or [])
        return alerts

    def _fire_hooks(self, tenant_id: str, resource: str, skip: int, top: int, ids: list[str],
                    next_link: str | None) -> list[tuple[_Hook, PageInfo]]:
        due: list[tuple[_Hook, PageInfo]] = []
        with self.lock:
            for hook in self._hooks:
                if hook.done or hook.resource != resource or hook.tenant_id not in (None, tenant_id):
                    continue
                hook.seen += 1
                if hook.seen == hook.after or (not hook.once and hook.seen > hook.after):
                    hook.done = hook.once
                    due.append((hook, PageInfo(tenant_id, resource, hook.seen, skip, top, list(ids), next_link)))
            self._hooks = [h for h in self._hooks if not h.done]
        return due


@dataclass
class _Clause:
    field: str
    op: str
    value: Any


class _GraphError(EmuError):
    """An error answer of this service."""


def _compare(left: Any, op: str, right: Any) -> bool:
    if op == "eq":
        return bool(left == right)
    if op == "ne":
        return bool(left != right)
    if left is None:
        return False
    return bool({"gt": left > right, "ge": left >= right, "lt": left < right, "le": left <= right}[op])


def parse_filter(text: str | None, datetime_fields: tuple[str, ...],
                 string_fields: dict[str, tuple[str, ...] | None]) -> list[_Clause]:
    """Parse ``$filter`` (see the module docstring). ``string_fields`` maps a field to its enum values (``None`` =
    free text). Raises ``_GraphError`` 400 on anything unsupported."""
    if text is None or not text.strip():
        return []
    clauses: list[_Clause] = []
    pos = 0
    while True:
        m = _CLAUSE_RE.match(text, pos)
        if not m:
            raise _GraphError(400, "BadRequest", f"Invalid filter clause: unsupported or malformed $filter {text!r}. "
                              "Supported: <time field> ge|gt|le|lt|eq|ne <ISO time> and <field> eq '<value>', "
                              "joined by 'and'.")
        name, op, raw = m.group("field"), m.group("op").lower(), m.group("value")
        if name in datetime_fields:
            if raw.startswith("'"):
                raise _GraphError(400, "BadRequest", "A binary operator with incompatible types was detected. "
                                  f"Found operand types 'Edm.DateTimeOffset' and 'Edm.String' for operator kind "
                                  f"'{op}' (write the time without quotes).")
            try:
                value: Any = parse_ticks(raw)
            except ValueError as exc:
                raise _GraphError(400, "BadRequest", f"The DateTimeOffset text '{raw}' should be in format "
                                  "'yyyy-mm-ddThh:mm:ss('.'s+)?(zzzzzz)?' and each field value is within valid "
                                  "range.") from exc
        elif name in string_fields:
            if op not in ("eq", "ne"):
                raise _GraphError(400, "BadRequest", f"Operator '{op}' is not supported for '{name}'.")
            if not raw.startswith("'"):
                raise _GraphError(400, "BadRequest", f"The value for '{name}' must be a quoted string.")
            value = raw[1:-1].replace("''", "'")
            allowed = string_fields[name]
            if allowed is not None and value not in allowed:
                raise _GraphError(400, "BadRequest", f"The string '{value}' is not a valid enumeration type "
                                  f"constant for '{name}'.")
        else:
            raise _GraphError(400, "BadRequest", f"Invalid filter clause: property '{name}' is not supported in "
                              "$filter.")
        clauses.append(_Clause(name, op, value))
        pos = m.end()
        if pos >= len(text):
            return clauses
        a = _AND_RE.match(text, pos)
        if not a:
            raise _GraphError(400, "BadRequest", f"Invalid filter clause: only 'and' can join clauses in {text!r}.")
        pos = a.end()


# ----------------------------------------------------------------------------------------------------- service


class GraphService:
    """The HTTP face of :class:`GraphState` (see the module docstring)."""

    name = "graph"

    def __init__(self, state: GraphState, issuer: TokenIssuer, base_url: str = "") -> None:
        self.state = state
        self.issuer = issuer
        self.base_url = base_url

    def fault_body(self, status: int) -> dict[str, Any]:
        code = {429: "TooManyRequests", 503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(status, "UnknownError")
        return _error_body(code, f"Injected fault: HTTP {status}.")

    def handle(self, request: EmuRequest) -> EmuResponse:
        """Route one Graph request."""
        base = (request.base_url or self.base_url).rstrip("/")
        try:
            claims = self._authenticate(request, base)
            parts = [p for p in request.path.split("/") if p]
            if parts[:2] != ["v1.0", "security"] or len(parts) < 3:
                raise _GraphError(404, "BadRequest", f"Resource not found for the segment '{request.path}'.")
            rest = parts[2:]
            prefer = "include-unknown-enum-members" in request.headers.get("prefer", "").lower()
            headers = {"Preference-Applied": "include-unknown-enum-members"} if prefer else {}
            response = self._route(request, claims, rest, base, prefer)
            response.headers.update(headers)
            response.headers.setdefault("Content-Type",
                                        "application/json;odata.metadata=minimal;odata.streaming=true;"
                                        "IEEE754Compatible=false;charset=utf-8")
            return response
        except _GraphError as err:
            return EmuResponse(err.status, _error_body(err.code, err.message, request.headers), err.headers)

    def _authenticate(self, request: EmuRequest, base: str) -> dict[str, Any]:
        try:
            return self.issuer.verify_bearer(request.headers, base)
        except TokenError as exc:
            message = {"missing": "Access token is empty.", "expired": "Lifetime validation failed, the token is "
                       "expired.", "audience": f"Access token validation failure. Invalid audience. {exc}"}.get(
                exc.code, f"Access token validation failure. {exc}")
            raise _GraphError(401, "InvalidAuthenticationToken", message, {
                "WWW-Authenticate": 'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/'
                                    'oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000"'}) from exc

    @staticmethod
    def _require_role(claims: dict[str, Any], roles: tuple[str, ...]) -> None:
        held = claims.get("roles") or []
        if not any(r in held for r in roles):
            raise _GraphError(403, "Forbidden", f"Missing role permissions on the request. API requires one of "
                              f"'{', '.join(roles)}'. Roles on the request '{', '.join(held)}'.")

    def _route(self, request: EmuRequest, claims: dict[str, Any], rest: list[str], base: str,
               prefer: bool) -> EmuResponse:
        tenant = str(claims.get("tid", ""))
        method = request.method
        if rest[0] == "incidents":
            if len(rest) == 1 and method == "GET":
                self._require_role(claims, READ_ROLES)
                return self._list_incidents(request, tenant, base, prefer)
            if len(rest) == 2 and method == "GET":
                self._require_role(claims, READ_ROLES)
                return self._get_incident(request, tenant, rest[1], base, prefer)
            if len(rest) == 2 and method == "PATCH":
                self._require_role(claims, WRITE_ROLES)
                return self._patch_incident(request, claims, tenant, rest[1], base, prefer)
            if len(rest) == 3 and rest[2] == "comments" and method == "POST":
                self._require_role(claims, WRITE_ROLES)
                return self._post_comment(request, claims, tenant, rest[1], base)
        if rest[0] == "alerts_v2":
            if len(rest) == 1 and method == "GET":
                self._require_role(claims, ALERT_ROLES)
                return self._list_alerts(request, tenant, base, prefer)
            if len(rest) == 2 and method == "GET":
                self._require_role(claims, ALERT_ROLES)
                return self._get_alert(tenant, rest[1], base, prefer)
        if len(rest) <= 3 and rest[0] in ("incidents", "alerts_v2"):
            raise _GraphError(405, "Request_BadRequest", f"The method {method} is not allowed on this resource.")
        raise _GraphError(404, "BadRequest", f"Resource not found for the segment '{'/'.join(rest)}'.")

    # -- incidents -------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_options(request: EmuRequest, allowed: tuple[str, ...]) -> None:
        for key in request.query:
            if key.startswith("$") and key.lower() not in allowed:
                raise _GraphError(400, "BadRequest", f"Query option '{key}' is not supported by this API.")

    @staticmethod
    def _int_option(request: EmuRequest, name: str, default: int, maximum: int | None) -> int:
        raw = request.q(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError as exc:
            raise _GraphError(400, "BadRequest", f"Invalid value '{raw}' for query option {name}.") from exc
        if value < 0:
            raise _GraphError(400, "BadRequest", f"Invalid value '{raw}' for query option {name}.")
        if maximum is not None and value > maximum:
            raise _GraphError(400, "BadRequest", f"Invalid page size specified: '{value}'. Must be between 1 and "
                              f"{maximum} inclusive for this request.")
        return value

    @staticmethod
    def _expand(request: EmuRequest) -> bool:
        raw = request.q("$expand")
        if raw is None:
            return False
        if raw.strip().lower() != "alerts":
            raise _GraphError(400, "BadRequest", f"Could not find a property named '{raw}' to expand "
                              "(only 'alerts' can be expanded).")
        return True

    def _list_incidents(self, request: EmuRequest, tenant: str, base: str, prefer: bool) -> EmuResponse:
        self._check_options(request, ("$filter", "$top", "$skip", "$expand", "$count", "$orderby", "$select"))
        expand = self._expand(request)
        top = self._int_option(request, "$top", INCIDENT_PAGE_DEFAULT,
                               INCIDENT_MAX_TOP_EXPANDED if expand else INCIDENT_MAX_TOP)
        skip = self._int_option(request, "$skip", 0, None)
        count = (request.q("$count") or "").lower() == "true"
        clauses = parse_filter(request.q("$filter"), ("lastUpdateDateTime", "createdDateTime"), {
            "status": INCIDENT_STATUSES, "severity": SEVERITIES, "classification": CLASSIFICATIONS,
            "determination": DETERMINATIONS, "assignedTo": None})
        with self.state.lock:
            docs, total, more = self.state._select(tenant, clauses, skip, top, count)
        body: dict[str, Any] = {"@odata.context": f"{base}/v1.0/$metadata#security/incidents"
                                                  + ("(alerts())" if expand else "")}
        if total is not None:
            body["@odata.count"] = total
        body["value"] = [_render_incident(d, expand, prefer) for d in docs]
        next_link = _next_link(base, request, skip + top) if more else None
        if next_link:
            body["@odata.nextLink"] = next_link
        self._run_hooks(tenant, "incidents", skip, top, [d["id"] for d in docs], next_link)
        return EmuResponse(200, body)

    def _run_hooks(self, tenant: str, resource: str, skip: int, top: int, ids: list[str],
                   next_link: str | None) -> None:
        for hook, info in self.state._fire_hooks(tenant, resource, skip, top, ids, next_link):
            hook.callback(info)

    def _get_incident(self, request: EmuRequest, tenant: str, incident_id: str, base: str,
                      prefer: bool) -> EmuResponse:
        self._check_options(request, ("$expand", "$select"))
        expand = self._expand(request)
        with self.state.lock:
            doc = self.state._get(tenant, incident_id)
        if doc is None:
            raise _GraphError(404, "NotFound", f"Incident with id '{incident_id}' was not found.")
        body = {"@odata.context": f"{base}/v1.0/$metadata#security/incidents"
                                  + ("(alerts())" if expand else "") + "/$entity"}
        body.update(_render_incident(doc, expand, prefer))
        return EmuResponse(200, body)

    def _patch_incident(self, request: EmuRequest, claims: dict[str, Any], tenant: str, incident_id: str,
                        base: str, prefer: bool) -> EmuResponse:
        patch = _json_object(request)
        changes: dict[str, Any] = {}
        for key, value in patch.items():
            if key == "@odata.type":
                continue
            if key in READ_ONLY:
                raise _GraphError(400, "BadRequest", f"Property '{key}' is read-only and cannot be updated "
                                  f"(updatable: {', '.join(UPDATABLE)}).")
            if key not in UPDATABLE:
                raise _GraphError(400, "BadRequest", f"The property '{key}' does not exist on type "
                                  "'microsoft.graph.security.incident'. Make sure to only use property names that "
                                  "are defined by the type.")
            changes[key] = _validate_field(key, value, legacy=self.state.legacy_determinations)
        if changes.get("status") == "inProgress" and tenant in self.state.refuse_in_progress:
            raise _GraphError(400, "BadRequest", "Invalid value 'inProgress' for property 'status'. Allowed values: "
                              "active, resolved.")
        caller = _caller(claims)
        with self.state.lock:
            doc = self.state._get(tenant, incident_id)
            if doc is None:
                raise _GraphError(404, "NotFound", f"Incident with id '{incident_id}' was not found.")
            if self.state.strict_determination and ("classification" in changes or "determination" in changes):
                cls = changes.get("classification", doc.get("classification")) or "unknown"
                det = changes.get("determination", doc.get("determination")) or "unknown"
                det = _METADATA_SPELLING.get(det, det)
                allowed = VALID_DETERMINATIONS.get(cls, frozenset())
                if det not in allowed:
                    raise _GraphError(400, "BadRequest", f"Determination '{det}' is not valid for classification "
                                      f"'{cls}'. Valid: {', '.join(sorted(allowed))}.")
            changed = {k: v for k, v in changes.items() if doc.get(k) != v}
            if changed or self.state.bump_on_noop_patch:
                stamp = self.state.clock.now()
                was_resolved = doc.get("status") == "resolved"
                doc.update(changes)
                doc["lastUpdateDateTime"] = stamp
                doc["lastModifiedBy"] = caller
                if self.state.cascade_resolve and doc.get("status") == "resolved" and not was_resolved:
                    for alert in doc.get("alerts") or []:
                        if alert.get("status") != "resolved":
                            alert["status"] = "resolved"
                            alert["resolvedDateTime"] = stamp
                            alert["lastUpdateDateTime"] = stamp
                            if doc.get("classification") not in (None, "unknown"):
                                alert["classification"] = doc.get("classification")
                                alert["determination"] = doc.get("determination")
                self.state._put(tenant, doc)
            self.state.writes.append(GraphWrite(tenant, incident_id, "patch", dict(patch), caller,
                                                doc["lastUpdateDateTime"]))
        body = {"@odata.context": f"{base}/v1.0/$metadata#security/incidents/$entity"}
        body.update(_render_incident(doc, False, prefer))
        return EmuResponse(200, body)

    def _post_comment(self, request: EmuRequest, claims: dict[str, Any], tenant: str, incident_id: str,
                      base: str) -> EmuResponse:
        body = _json_object(request)
        for key in body:
            if key not in ("@odata.type", "comment"):
                raise _GraphError(400, "BadRequest", f"The property '{key}' does not exist on type "
                                  "'microsoft.graph.security.alertComment'.")
        odata_type = body.get("@odata.type")
        if odata_type is not None and str(odata_type).lstrip("#") != "microsoft.graph.security.alertComment":
            raise _GraphError(400, "BadRequest", f"Unexpected @odata.type '{odata_type}'.")
        text = body.get("comment")
        if not isinstance(text, str) or not text.strip():
            raise _GraphError(400, "BadRequest", "The 'comment' property is required and must be a non-empty "
                              "string.")
        caller = _caller(claims)
        with self.state.lock:
            doc = self.state._get(tenant, incident_id)
            if doc is None:
                raise _GraphError(404, "NotFound", f"Incident with id '{incident_id}' was not found.")
            stamp = self.state.clock.now()
            doc.setdefault("comments", []).append({"@odata.type": "#microsoft.graph.security.alertComment",
                                                   "comment": text, "createdByDisplayName": caller,
                                                   "createdDateTime": stamp})
            doc["lastUpdateDateTime"] = stamp
            self.state._put(tenant, doc)
            self.state.writes.append(GraphWrite(tenant, incident_id, "comment", dict(body), caller, stamp))
            comments = list(doc["comments"])
        return EmuResponse(200, {"@odata.context": f"{base}/v1.0/$metadata#Collection("
                                                   "microsoft.graph.security.alertComment)", "value": comments})

    # -- alerts ------------------------------------------------------------------------------------------------------

    def _list_alerts(self, request: EmuRequest, tenant: str, base: str, prefer: bool) -> EmuResponse:
        self._check_options(request, ("$filter", "$top", "$skip", "$count", "$select"))
        top = self._int_option(request, "$top", ALERT_PAGE_DEFAULT, ALERT_MAX_TOP)
        skip = self._int_option(request, "$skip", 0, None)
        count = (request.q("$count") or "").lower() == "true"
        clauses = parse_filter(request.q("$filter"), ("lastUpdateDateTime", "createdDateTime"), {
            "incidentId": None, "status": ALERT_STATUSES, "severity": SEVERITIES, "serviceSource": SERVICE_SOURCES})
        incident_id: str | None = None
        for clause in clauses:
            if clause.field == "incidentId" and clause.op == "eq":
                incident_id = str(clause.value)
        with self.state.lock:
            alerts = self.state._alerts(tenant, incident_id)
        selected: list[tuple[int, str, dict[str, Any]]] = []
        for alert in alerts:
            if all(_alert_matches(alert, c) for c in clauses):
                selected.append((parse_ticks(alert["lastUpdateDateTime"]), alert["id"], alert))
        selected.sort(key=lambda item: (item[0], item[1]), reverse=True)
        page = [a for _, _, a in selected[skip:skip + top]]
        more = top > 0 and skip + top < len(selected)
        body: dict[str, Any] = {"@odata.context": f"{base}/v1.0/$metadata#security/alerts_v2"}
        if count:
            body["@odata.count"] = len(selected)
        body["value"] = [_render_alert(a, prefer) for a in page]
        next_link = _next_link(base, request, skip + top) if more else None
        if next_link:
            body["@odata.nextLink"] = next_link
        self._run_hooks(tenant, "alerts_v2", skip, top, [a["id"] for a in page], next_link)
        return EmuResponse(200, body)

    def _get_alert(self, tenant: str, alert_id: str, base: str, prefer: bool) -> EmuResponse:
        with self.state.lock:
            store = self.state.tenants.get(tenant)
            owner = store.alert_owner.get(alert_id) if store else None
            alerts = self.state._alerts(tenant, owner) if owner else []
        alert = next((a for a in alerts if a["id"] == alert_id), None)
        if alert is None:
            raise _GraphError(404, "NotFound", f"Alert with id '{alert_id}' was not found.")
        body = {"@odata.context": f"{base}/v1.0/$metadata#security/alerts_v2/$entity"}
        body.update(_render_alert(alert, prefer))
        return EmuResponse(200, body)


# ----------------------------------------------------------------------------------------------------- helpers


def _alert_matches(alert: dict[str, Any], clause: _Clause) -> bool:
    if clause.field in ("lastUpdateDateTime", "createdDateTime"):
        raw = alert.get(clause.field)
        return raw is not None and _compare(parse_ticks(raw), clause.op, int(clause.value))
    return _compare(alert.get(clause.field), clause.op, clause.value)


def _caller(claims: dict[str, Any]) -> str:
    return str(claims.get("app_displayname") or claims.get("appid") or claims.get("oid") or "unknown")


def _json_object(request: EmuRequest) -> dict[str, Any]:
    try:
        body = request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise _GraphError(400, "BadRequest", "The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise _GraphError(400, "BadRequest", "The request body must be a JSON object.")
    return body


def _validate_field(key: str, value: Any, *, legacy: bool = False) -> Any:
    if key in ("assignedTo", "resolvingComment"):
        if value is not None and not isinstance(value, str):
            raise _GraphError(400, "BadRequest", f"'{key}' must be a string or null.")
        return value
    if key == "customTags":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _GraphError(400, "BadRequest", "'customTags' must be an array of strings.")
        return list(value)
    determinations = tuple(_LEGACY_SPELLING.get(d, d) for d in DETERMINATIONS[:-1]) if legacy else DETERMINATIONS[:-1]
    allowed = {"status": PATCH_STATUSES, "classification": CLASSIFICATIONS[:-1],
               "determination": determinations}[key]
    if not isinstance(value, str) or value not in allowed:
        raise _GraphError(400, "BadRequest", f"Invalid value '{value}' for property '{key}'. Allowed values: "
                          f"{', '.join(allowed)}.")
    return value


def _render_incident(doc: dict[str, Any], expand: bool, prefer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"@odata.type": "#microsoft.graph.security.incident"}
    for key, value in doc.items():
        if key != "alerts":
            out[key] = value
    if not prefer and out.get("status") in EVOLVABLE_INCIDENT_STATUS:
        out["status"] = "unknownFutureValue"
    if expand:
        out["alerts"] = [_render_alert(a, prefer) for a in doc.get("alerts") or []]
    return out


def _render_alert(alert: dict[str, Any], prefer: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"@odata.type": "#microsoft.graph.security.alert"}
    out.update(alert)
    if not prefer:
        if out.get("serviceSource") in EVOLVABLE_SERVICE_SOURCE:
            out["serviceSource"] = "unknownFutureValue"
        if out.get("detectionSource") in EVOLVABLE_DETECTION_SOURCE:
            out["detectionSource"] = "unknownFutureValue"
    return out


def _next_link(base: str, request: EmuRequest, skip: int) -> str:
    split = urlsplit(request.raw_target or request.path)
    pairs = [(k, v) for k, v in parse_qsl(split.query, keep_blank_values=True) if k != "$skip"]
    pairs.append(("$skip", str(skip)))
    query = urlencode(pairs, quote_via=quote, safe="$',:()")
    return f"{base}{split.path}?{query}"


def _error_body(code: str, message: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    inner: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                             "request-id": str(uuid.uuid4())}
    if headers and headers.get("client-request-id"):
        inner["client-request-id"] = headers["client-request-id"]
    return {"error": {"code": code, "message": message, "innerError": inner}}


def expand_alerts_page_over(threshold: int) -> Callable[[EmuRequest], bool]:
    """Fault predicate for the big-tenant failure (Elastic #18144): list requests with ``$expand=alerts`` and
    ``$top`` above ``threshold``. Use with ``faults.rule("graph", expand_alerts_page_over(10), Fault("status",
    500))`` so only smaller pages succeed."""

    def predicate(request: EmuRequest) -> bool:
        parts = [p for p in request.path.split("/") if p]
        if request.method != "GET" or parts[-1:] != ["incidents"]:
            return False
        if (request.q("$expand") or "").lower() != "alerts":
            return False
        try:
            top = int(request.q("$top") or INCIDENT_PAGE_DEFAULT)
        except ValueError:
            return False
        return top > threshold

    return predicate


__all__ = [
    "CLASSIFICATIONS", "DETERMINATIONS", "INCIDENT_STATUSES", "SEVERITIES", "VALID_DETERMINATIONS", "GraphService",
    "GraphState", "GraphWrite", "PageInfo", "ServerClock", "expand_alerts_page_over", "format_ticks",
    "normalize_time", "parse_ticks", "to_ticks",
]
