"""The unified Defender portal world: analytics rules, the mirror rule's NRT runs, and invisible API incidents.

Models what PRODUCT.md "Mirror targets" relies on (``../shared/reference/unified-portal.md`` gives the sources):

- **Unified-portal mode** (:meth:`PortalWorld.enable`): every incident's ``providerName`` reads ``Microsoft XDR``,
  and an incident created through the API (a PUT of a new name) is *invisible*: it exists in the API but never shows
  in the Defender portal's queue. Visibility is not part of the ARM resource; tests read it here.
- **Analytics rules**: ``GET|PUT {ws}/providers/Microsoft.SecurityInsights/alertRules/{ruleId}`` (kinds ``Scheduled``
  and ``NRT``; ``NRT`` only with a preview api-version such as ``2025-10-01-preview``, as the REST API knows it), see
  :class:`AlertRuleStore`.
- **NRT runs** over ``DefenderMirrorRequests_CL``: an enabled NRT rule whose query names that table runs once a
  minute over the rows ingested since its previous run (ingestion time on the World's clock). One alert per row
  (``alertDetailsOverride``, ``customDetails`` and the entity columns of the rule are applied); a run over more than
  30 rows makes alerts for the first 29 and one summary alert for the rest, without ``alertLink``. Each alert becomes
  its own incident (no grouping, so nothing is ever reopened): ``providerName`` ``Microsoft XDR``,
  ``relatedAnalyticRuleIds`` = [the rule's full resource ID], title/severity/description from the alert,
  ``createdTimeUtc`` = the run time. A row ingested twice yields two incidents.
- The incident's alerts: ``POST {incident}/alerts`` (served by ``emulators.sentinel``) returns
  ``{"value": [SecurityAlert entities]}``; custom details sit in ``properties.additionalData["Custom Details"]`` as a
  JSON *string* of ``{name: [value]}`` (arrays, as SecurityAlert's ExtendedProperties print them).

Control API (tests hold ``hub.world.portal``; every call is also ``POST /_control/sentinel/portal`` with
``{"op": <name>, "args": {...}}`` for a hub running as a process):

- ``enable(on=True)`` / ``enabled``: unified-portal mode.
- ``put_rule(rule_id, kind="NRT", enabled=True, properties=None)``: create or replace a rule without the API
  (default properties: :func:`mirror_rule_properties`, the rule the infra deploys).
- ``set_rule_enabled(rule_id, enabled)``; ``rule(rule_id)`` -> the rule as the API returns it.
- ``advance(minutes=1)``: move the World's clock one minute at a time and run the rules after each minute; returns
  the :class:`RuleRun` list. ``run_rules()``: one run now, without moving the clock. Nothing ever sleeps.
- ``runs``: every run so far (rule, rows, alerts, summary flag, incident names).
- ``is_visible(incident_name)``; ``invisible_incidents()``; ``alerts(incident_name)``; ``entities(incident_name)``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from .base import EmuError

if TYPE_CHECKING:
    from .ingestion import IngestionState

PROVIDER = "Microsoft.SecurityInsights"
PREVIEW_API_VERSION = "2025-10-01-preview"
RULE_KINDS = ("Scheduled", "NRT")
REQUESTS_TABLE = "DefenderMirrorRequests_CL"
#: An NRT run with one alert per result makes at most this many alerts; the last one summarises the rest.
MAX_ALERTS_PER_RUN = 30
TICKS_PER_MINUTE = 60 * 10_000_000
SEVERITIES = ("High", "Medium", "Low", "Informational")
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
#: Entity columns of a mirror request -> (entity kind, identifier) the rule maps (first values of each list).
ENTITY_COLUMNS = {"Accounts": ("Account", "FullName"), "Hosts": ("Host", "FullName"), "IPs": ("IP", "Address")}


def mirror_rule_properties(display_name: str = "Defender sync: mirror Defender XDR incidents") -> dict[str, Any]:
    """The properties of the mirror rule as ``infra/modules/mirror-rule.bicep`` deploys it (tests/test_infra.py
    checks the two agree on what the model reads)."""
    return {
        "displayName": display_name,
        "description": "#DONT_CORR# One incident per mirror request row of the Defender sync app.",
        "enabled": True,
        "severity": "Medium",
        "query": REQUESTS_TABLE,
        "suppressionDuration": "PT5H",
        "suppressionEnabled": False,
        "eventGroupingSettings": {"aggregationKind": "AlertPerResult"},
        "incidentConfiguration": {"createIncident": True, "groupingConfiguration": {
            "enabled": False, "reopenClosedIncident": False, "lookbackDuration": "PT5M",
            "matchingMethod": "AllEntities"}},
        "alertDetailsOverride": {
            "alertDisplayNameFormat": "{{IncidentTitle}}",
            "alertDescriptionFormat": "{{Description}}",
            "alertSeverityColumnName": "Severity",
            "alertDynamicProperties": [{"alertProperty": "AlertLink", "value": "IncidentWebUrl"}],
        },
        "customDetails": {"SourceKey": "SourceKey", "DefenderTenantId": "DefenderTenantId", "IncidentId": "IncidentId"},
    }


# ---------------------------------------------------------------------------------------------------- rules


@dataclass
class AlertRule:
    """One analytics rule of one workspace."""

    workspace_id: str
    name: str
    kind: str
    properties: dict[str, Any]
    etag: str
    enabled_since: int                      # ticks when last enabled: a new rule does not see older rows

    @property
    def resource_id(self) -> str:
        return f"{self.workspace_id}/providers/{PROVIDER}/alertRules/{self.name}"

    def render(self) -> dict[str, Any]:
        return {"id": self.resource_id, "name": self.name, "etag": self.etag, "type": f"{PROVIDER}/alertRules",
                "kind": self.kind, "properties": copy.deepcopy(self.properties)}


def _bad(message: str) -> EmuError:
    return EmuError(400, "BadRequest", message)


def _validate_rule(kind: Any, props: Any) -> dict[str, Any]:
    """``props`` when they make a valid rule of ``kind``; EmuError 400 naming the problem otherwise."""
    if kind not in RULE_KINDS:
        raise _bad(f"kind '{kind}' is not supported by the emulator; expected one of {', '.join(RULE_KINDS)}.")
    if not isinstance(props, dict):
        raise _bad("The request body must be an object with 'properties'.")
    for key, kinds in (("displayName", str), ("query", str), ("enabled", bool), ("severity", str)):
        if not isinstance(props.get(key), kinds):
            raise _bad(f"properties.{key} is required ({kinds.__name__}).")
    if props["severity"] not in SEVERITIES:
        raise _bad(f"properties.severity '{props['severity']}' is not valid; expected one of {', '.join(SEVERITIES)}.")
    aggregation = (props.get("eventGroupingSettings") or {}).get("aggregationKind", "SingleAlert")
    if aggregation not in ("SingleAlert", "AlertPerResult"):
        raise _bad(f"properties.eventGroupingSettings.aggregationKind '{aggregation}' is not valid.")
    return props


class AlertRuleStore:
    """``Microsoft.SecurityInsights/alertRules`` of every workspace, keyed case-insensitively. Thread-safe."""

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._rules: dict[tuple[str, str], AlertRule] = {}

    def handle(self, workspace_id: str, rule_name: str, method: str, api_version: str | None, body: Any,
               now: int) -> tuple[int, dict[str, Any]]:
        """Serve ``GET``/``PUT`` of one rule: (status, body). Raises :class:`EmuError` for a bad request."""
        key = (workspace_id.lower(), rule_name.lower())
        with self._lock:
            if method == "GET":
                rule = self._rules.get(key)
                if rule is None:
                    raise EmuError(404, "NotFound", f"Alert rule '{rule_name}' not found.")
                return 200, rule.render()
            if method != "PUT":
                raise EmuError(405, "MethodNotAllowed", f"{method} is not allowed on an alert rule.")
            if not isinstance(body, dict):
                raise _bad("The request body must be a JSON object.")
            kind, props = body.get("kind"), body.get("properties")
            if kind == "NRT" and not (api_version or "").endswith("-preview"):
                # Every GA version up to 2025-09-01 knows only Fusion, MicrosoftSecurityIncidentCreation, Scheduled.
                raise _bad(f"The rule kind 'NRT' is not supported in api-version '{api_version}'; use a preview "
                           f"version such as {PREVIEW_API_VERSION}.")
            valid = _validate_rule(kind, props)
            created = key not in self._rules
            self.put(workspace_id, rule_name, str(kind), valid, now)
            return (201 if created else 200), self._rules[key].render()

    def put(self, workspace_id: str, rule_name: str, kind: str, properties: dict[str, Any], now: int) -> AlertRule:
        """Create or replace a rule (validated); re-enabling restarts its run window at ``now``."""
        _validate_rule(kind, properties)
        key = (workspace_id.lower(), rule_name.lower())
        with self._lock:
            old = self._rules.get(key)
            since = old.enabled_since if old is not None and old.properties.get("enabled") else now
            rule = AlertRule(workspace_id, rule_name, kind, copy.deepcopy(properties), f'"{uuid.uuid4()}"', since)
            self._rules[key] = rule
            return rule

    def get(self, workspace_id: str, rule_name: str) -> AlertRule | None:
        with self._lock:
            return self._rules.get((workspace_id.lower(), rule_name.lower()))

    def all(self) -> list[AlertRule]:
        with self._lock:
            return list(self._rules.values())


# ---------------------------------------------------------------------------------------------------- NRT runs


class RuleIncidentSink(Protocol):
    """What the NRT model needs from the Sentinel emulator."""

    alert_rules: AlertRuleStore
    unified_portal: bool
    portal: Any

    def create_rule_incident(self, workspace_id: str, rule_id: str, alert: dict[str, Any],
                             entities: list[dict[str, Any]]) -> str: ...

    def incident_visibility(self) -> dict[str, bool]: ...

    def incident_alerts(self, name: str) -> list[dict[str, Any]]: ...

    def incident_entities(self, name: str) -> list[dict[str, Any]]: ...

    def now_ticks(self) -> int: ...


@dataclass
class RuleRun:
    """One run of one NRT rule."""

    rule_id: str
    at: int                                 # ticks
    rows: int
    alerts: int
    summary: bool
    incidents: list[str] = field(default_factory=list)


class PortalWorld:
    """The unified-portal side of the World: mode switch, rule runs on a test-driven clock (see the module doc)."""

    def __init__(self, lock: threading.RLock, ingestion: IngestionState,
                 advance_clock: Callable[[float], None]) -> None:
        self._lock = lock
        self._ingestion = ingestion
        self._advance_clock = advance_clock
        self._sentinel: RuleIncidentSink | None = None
        self._enabled = False
        self._last_run: dict[str, int] = {}
        self.runs: list[RuleRun] = []

    def bind(self, sentinel: RuleIncidentSink) -> None:
        """Attach the Sentinel emulator (done by the hub when it builds the service)."""
        with self._lock:
            self._sentinel = sentinel
            sentinel.unified_portal = self._enabled
            sentinel.portal = self

    def reset(self) -> None:
        with self._lock:
            self._enabled = False
            self._last_run.clear()
            self.runs = []
            if self._sentinel is not None:
                self._sentinel.unified_portal = False

    @property
    def sentinel(self) -> RuleIncidentSink:
        if self._sentinel is None:
            raise RuntimeError("the portal world has no Sentinel emulator (start the hub with include_sentinel)")
        return self._sentinel

    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self, on: bool = True) -> bool:
        """Switch unified-portal mode on (or off)."""
        with self._lock:
            self._enabled = bool(on)
            self.sentinel.unified_portal = self._enabled
            return self._enabled

    # -- rules ---------------------------------------------------------------------------------------------------

    def put_rule(self, rule_id: str, *, kind: str = "NRT", enabled: bool = True,
                 properties: Mapping[str, Any] | None = None, workspace: str | None = None) -> dict[str, Any]:
        """Create or replace a rule directly (default: the mirror rule as the infra deploys it)."""
        props = dict(properties or mirror_rule_properties())
        props["enabled"] = enabled
        rule = self.sentinel.alert_rules.put(self._workspace(workspace), rule_id, kind, props,
                                             self.sentinel.now_ticks())
        return rule.render()

    def set_rule_enabled(self, rule_id: str, enabled: bool, *, workspace: str | None = None) -> dict[str, Any]:
        """Enable or disable a rule (as an analyst does in the portal)."""
        rule = self._rule(rule_id, workspace)
        props = dict(rule.properties, enabled=bool(enabled))
        return self.put_rule(rule_id, kind=rule.kind, enabled=bool(enabled), properties=props,
                             workspace=rule.workspace_id)

    def rule(self, rule_id: str, *, workspace: str | None = None) -> dict[str, Any]:
        return self._rule(rule_id, workspace).render()

    def _rule(self, rule_id: str, workspace: str | None) -> AlertRule:
        rule = self.sentinel.alert_rules.get(self._workspace(workspace), rule_id)
        if rule is None:
            raise KeyError(f"no alert rule {rule_id!r}")
        return rule

    def _workspace(self, workspace: str | None) -> str:
        if workspace:
            return workspace
        workspace_id = getattr(self.sentinel, "default_workspace_id", None)
        if not callable(workspace_id):
            raise ValueError("name the workspace")
        return str(workspace_id())

    # -- clock and runs ------------------------------------------------------------------------------------------

    def advance(self, minutes: int = 1) -> list[RuleRun]:
        """Move the World's clock ``minutes`` minutes, one at a time, running the rules after each minute."""
        if minutes < 0:
            raise ValueError("minutes must be >= 0")
        runs: list[RuleRun] = []
        for _ in range(int(minutes)):
            self._advance_clock(60.0)
            runs.extend(self.run_rules())
        return runs

    def run_rules(self) -> list[RuleRun]:
        """Run every enabled NRT rule over ``DefenderMirrorRequests_CL`` once, now, over the rows ingested since
        its previous run (or since it was enabled)."""
        with self._lock:
            sentinel = self.sentinel
            now = sentinel.now_ticks()
            runs: list[RuleRun] = []
            for rule in sentinel.alert_rules.all():
                if rule.kind != "NRT" or not rule.properties.get("enabled") \
                        or REQUESTS_TABLE.lower() not in str(rule.properties.get("query", "")).lower():
                    continue
                since = max(self._last_run.get(rule.resource_id.lower(), 0), rule.enabled_since)
                self._last_run[rule.resource_id.lower()] = now
                rows = self._ingestion.rows_ingested_between(REQUESTS_TABLE, since, now)
                runs.append(self._run(sentinel, rule, rows, now))
            self.runs.extend(runs)
            return runs

    def _run(self, sentinel: RuleIncidentSink, rule: AlertRule, rows: list[dict[str, Any]], now: int) -> RuleRun:
        per_result = (rule.properties.get("eventGroupingSettings") or {}).get("aggregationKind") == "AlertPerResult"
        if not rows:
            return RuleRun(rule.name, now, 0, 0, False)
        alerts: list[tuple[dict[str, Any], list[dict[str, Any]]]]
        summary = False
        if not per_result:
            alerts = [(_summary_alert(rule, len(rows)), [])]
        elif len(rows) <= MAX_ALERTS_PER_RUN:
            alerts = [(_row_alert(rule, row), _row_entities(row)) for row in rows]
        else:
            head = rows[:MAX_ALERTS_PER_RUN - 1]
            alerts = [(_row_alert(rule, row), _row_entities(row)) for row in head]
            alerts.append((_summary_alert(rule, len(rows) - len(head)), []))
            summary = True
        run = RuleRun(rule.name, now, len(rows), len(alerts), summary)
        creates = (rule.properties.get("incidentConfiguration") or {}).get("createIncident", False)
        if creates:
            for alert, entities in alerts:
                run.incidents.append(sentinel.create_rule_incident(rule.workspace_id, rule.resource_id, alert,
                                                                   entities))
        return run

    # -- inspection ----------------------------------------------------------------------------------------------

    def is_visible(self, incident_name: str) -> bool:
        """Whether the incident shows in the Defender portal's queue (API-created ones never do in portal mode)."""
        visibility = self.sentinel.incident_visibility()
        if incident_name.lower() not in visibility:
            raise KeyError(f"no incident {incident_name!r}")
        return visibility[incident_name.lower()]

    def invisible_incidents(self) -> list[str]:
        return sorted(name for name, visible in self.sentinel.incident_visibility().items() if not visible)

    def alerts(self, incident_name: str) -> list[dict[str, Any]]:
        return self.sentinel.incident_alerts(incident_name)

    def entities(self, incident_name: str) -> list[dict[str, Any]]:
        return self.sentinel.incident_entities(incident_name)

    def control(self, op: str, args: Mapping[str, Any]) -> Any:
        """Run a control operation by name (JSON in, JSON out) for ``/_control/sentinel/portal``."""
        ops: dict[str, Callable[..., Any]] = {
            "enable": self.enable, "put_rule": self.put_rule, "set_rule_enabled": self.set_rule_enabled,
            "rule": self.rule, "is_visible": self.is_visible, "invisible_incidents": self.invisible_incidents,
            "alerts": self.alerts, "entities": self.entities,
            "advance": lambda **kw: [r.__dict__ for r in self.advance(**kw)],
            "run_rules": lambda: [r.__dict__ for r in self.run_rules()],
            "runs": lambda: [r.__dict__ for r in self.runs],
        }
        fn = ops.get(op)
        if fn is None:
            raise KeyError(f"unknown portal operation {op!r}; known: {', '.join(sorted(ops))}")
        return fn(**dict(args))


# ---------------------------------------------------------------------------------------------------- alerts


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _format(template: Any, row: Mapping[str, Any]) -> str | None:
    """``{{Column}}`` placeholders replaced by the row's values (the rule's alertDetailsOverride formats)."""
    if not isinstance(template, str) or not template:
        return None
    return _TEMPLATE.sub(lambda m: _text(row.get(m.group(1))), template)


def _row_alert(rule: AlertRule, row: Mapping[str, Any]) -> dict[str, Any]:
    """The alert one result row makes under the rule's overrides (name, description, severity, dynamic properties,
    custom details)."""
    props = rule.properties
    override = props.get("alertDetailsOverride") or {}
    severity = row.get(str(override.get("alertSeverityColumnName") or ""))
    link = None
    for mapping in override.get("alertDynamicProperties") or []:
        if isinstance(mapping, dict) and mapping.get("alertProperty") == "AlertLink":
            link = row.get(str(mapping.get("value")))
    details = {name: [_text(row.get(column))] for name, column in (props.get("customDetails") or {}).items()
               if row.get(column) is not None}
    return {
        "name": _format(override.get("alertDisplayNameFormat"), row) or props["displayName"],
        "description": _format(override.get("alertDescriptionFormat"), row) or props.get("description") or "",
        "severity": severity if severity in SEVERITIES else props["severity"],
        "alertLink": link if isinstance(link, str) and link else None,
        "customDetails": details,
    }


def _summary_alert(rule: AlertRule, count: int) -> dict[str, Any]:
    """The one alert standing for the results past the per-run limit (no row's link, name or details)."""
    return {"name": rule.properties["displayName"],
            "description": f"This alert summarises {count} further results of the rule's run.",
            "severity": rule.properties["severity"], "alertLink": None, "customDetails": {}}


def _row_entities(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    for column, (kind, identifier) in ENTITY_COLUMNS.items():
        values = row.get(column)
        for value in values if isinstance(values, list) else []:
            if isinstance(value, str) and value:
                entities.append({"kind": kind, "properties": {identifier: value}})
    return entities


class AppClock:
    """A simulated clock for the app's defender-portal target (``ctx.clock`` and ``ctx.sleep``: request times, the
    shared pace, the 30-minute re-request), so tests, the demo and the bench move time instead of waiting for it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += timedelta(seconds=seconds)
