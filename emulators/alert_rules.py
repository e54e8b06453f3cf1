"""A minimal store of Sentinel analytics rules (``Microsoft.SecurityInsights/alertRules``) for the Sentinel emulator.

``GET|PUT {workspace}/providers/Microsoft.SecurityInsights/alertRules/{ruleId}``: a rule is kept as sent (``kind``
and ``properties``, of which ``enabled`` is checked to be a boolean), with ARM's envelope (``id``, ``name``, ``type``,
``etag``). Enough for the preflight's "the mirror rule exists and is enabled"; the rule's behaviour (runs, alerts,
incidents) is not modelled here.
"""

from __future__ import annotations

import copy
import threading
import uuid
from typing import Any

ALERT_RULE_KINDS = ("Scheduled", "NRT", "Fusion", "MicrosoftSecurityIncidentCreation")


class AlertRuleError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class AlertRuleStore:
    """Rules keyed by (workspace resource ID lower-cased, rule name lower-cased). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, workspace_id: str, rule_id: str) -> dict[str, Any]:
        with self._lock:
            rule = self._rules.get((workspace_id.lower(), rule_id.lower()))
        if rule is None:
            raise AlertRuleError(404, "NotFound", f"Alert rule '{rule_id}' not found.")
        return copy.deepcopy(rule)

    def find(self, workspace_id: str, rule_id: str) -> dict[str, Any] | None:
        try:
            return self.get(workspace_id, rule_id)
        except AlertRuleError:
            return None

    def put(self, workspace_id: str, rule_id: str, body: Any) -> tuple[int, dict[str, Any]]:
        """Create or replace a rule; (201 or 200, the stored rule)."""
        if not isinstance(body, dict) or not isinstance(body.get("properties"), dict):
            raise AlertRuleError(400, "BadRequest", "The request body must be an object with 'kind' and 'properties'.")
        kind = body.get("kind")
        if kind not in ALERT_RULE_KINDS:
            raise AlertRuleError(400, "BadRequest", f"'kind' must be one of {', '.join(ALERT_RULE_KINDS)}; got "
                                                    f"{kind!r}.")
        props = copy.deepcopy(body["properties"])
        if not isinstance(props.get("enabled"), bool):
            raise AlertRuleError(400, "BadRequest", "'properties.enabled' is required and must be a boolean.")
        key = (workspace_id.lower(), rule_id.lower())
        rule = {"id": f"{workspace_id}/providers/Microsoft.SecurityInsights/alertRules/{rule_id}", "name": rule_id,
                "type": "Microsoft.SecurityInsights/alertRules", "kind": kind, "etag": f'"{uuid.uuid4()}"',
                "properties": props}
        with self._lock:
            created = key not in self._rules
            self._rules[key] = rule
        return (201 if created else 200), copy.deepcopy(rule)

    def set_enabled(self, workspace_id: str, rule_id: str, enabled: bool) -> None:
        """An analyst switches the rule on or off in the portal."""
        with self._lock:
            rule = self._rules.get((workspace_id.lower(), rule_id.lower()))
            if rule is None:
                raise KeyError(f"no alert rule {rule_id!r}")
            rule["properties"]["enabled"] = bool(enabled)
            rule["etag"] = f'"{uuid.uuid4()}"'
