"""Emulated Azure RBAC for the Sentinel workspace: effective permissions per principal, enforced on every call.

ARM answers ``GET {scope}/providers/Microsoft.Authorization/permissions?api-version=2022-04-01`` with the caller's
effective permissions at that scope (``actions``/``notActions``/``dataActions``/``notDataActions``, with ``*``
wildcards), and refuses any operation the caller's roles do not allow with 403 ``AuthorizationFailed``. A principal
the tests did not configure holds Microsoft Sentinel Responder on the workspace (what the infra assigns), so the
existing world keeps working; :meth:`ArmPermissions.assign` replaces one principal's permissions.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

PERMISSIONS_API_VERSION = "2022-04-01"

# The subset of Microsoft Sentinel Responder's (and Log Analytics Reader's) actions the emulated APIs check.
RESPONDER_ACTIONS = (
    "Microsoft.SecurityInsights/*/read",
    "Microsoft.SecurityInsights/incidents/*",
    "Microsoft.SecurityInsights/automationRules/*",
    "Microsoft.OperationalInsights/workspaces/read",
    "Microsoft.OperationalInsights/workspaces/*/read",
    "Microsoft.OperationalInsights/workspaces/analytics/query/action",
    "Microsoft.Authorization/*/read",
    "Microsoft.Resources/subscriptions/resourceGroups/read",
)
READER_ACTIONS = (
    "Microsoft.SecurityInsights/*/read",
    "Microsoft.OperationalInsights/workspaces/read",
    "Microsoft.OperationalInsights/workspaces/*/read",
    "Microsoft.Authorization/*/read",
)


def _pattern(wildcard: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(p) for p in wildcard.split("*")) + "$", re.IGNORECASE)


@dataclass
class Permission:
    """One entry of the permissions list (one role assignment's role definition)."""

    actions: list[str] = field(default_factory=list)
    not_actions: list[str] = field(default_factory=list)
    data_actions: list[str] = field(default_factory=list)
    not_data_actions: list[str] = field(default_factory=list)

    def allows(self, action: str) -> bool:
        return (any(_pattern(a).match(action) for a in self.actions)
                and not any(_pattern(a).match(action) for a in self.not_actions))

    def to_json(self) -> dict[str, Any]:
        return {"actions": list(self.actions), "notActions": list(self.not_actions),
                "dataActions": list(self.data_actions), "notDataActions": list(self.not_data_actions)}


class ArmPermissions:
    """Effective permissions per principal object ID (``oid`` of the token). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_principal: dict[str, list[Permission]] = {}
        self.checks: list[tuple[str, str, bool]] = []    # (principal, action, allowed), for tests

    def assign(self, principal_id: str, actions: list[str] | tuple[str, ...], not_actions: list[str] | tuple[str, ...]
               = (), data_actions: list[str] | tuple[str, ...] = ()) -> None:
        """Replace the principal's permissions with one entry (``actions=[]``: no access at all)."""
        with self._lock:
            self._by_principal[principal_id.lower()] = [Permission(list(actions), list(not_actions),
                                                                   list(data_actions))]

    def of(self, principal_id: str) -> list[Permission]:
        with self._lock:
            return list(self._by_principal.get(principal_id.lower(), [Permission(list(RESPONDER_ACTIONS))]))

    def allows(self, principal_id: str, action: str) -> bool:
        allowed = any(p.allows(action) for p in self.of(principal_id))
        with self._lock:
            self.checks.append((principal_id, action, allowed))
        return allowed

    def list_body(self, principal_id: str) -> dict[str, Any]:
        """The ``permissions`` API answer for the caller."""
        return {"value": [p.to_json() for p in self.of(principal_id)]}


def authorization_failed(principal_id: str, action: str, scope: str) -> dict[str, Any]:
    """ARM's 403 body for an action the caller may not perform."""
    return {"error": {"code": "AuthorizationFailed", "message": (
        f"The client '{principal_id}' with object id '{principal_id}' does not have authorization to perform action "
        f"'{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, please refresh "
        "your credentials.")}}
