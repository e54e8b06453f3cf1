"""Per-tenant filters from ``SYNC_TENANTS`` (pure). Evaluated on every incident version, so an incident whose
severity is raised later starts syncing from that version on."""

from __future__ import annotations

from typing import Any

from .settings import SEVERITY_ORDER, TenantConfig


def severity_rank(value: object) -> int:
    """Position of a Graph severity in :data:`SEVERITY_ORDER`; unknown values rank lowest."""
    text = value.lower() if isinstance(value, str) else "unknown"
    return SEVERITY_ORDER.index(text) if text in SEVERITY_ORDER else 0


def passes_filters(tenant: TenantConfig, incident: dict[str, Any]) -> bool:
    """True when this incident version is in the tenant's mirror scope (the tables receive every incident).

    ``minSeverity`` compares the incident's severity. ``serviceSources`` keeps an incident when any of its alerts
    comes from a listed source; an incident without alerts (a merged, ``redirected`` one) is kept so that its
    mirror can still be closed.
    """
    if tenant.min_severity is not None and severity_rank(incident.get("severity")) < severity_rank(
            tenant.min_severity):
        return False
    if tenant.service_sources is not None:
        alerts = incident.get("alerts")
        if not isinstance(alerts, list) or not alerts:
            return True
        wanted = {s.lower() for s in tenant.service_sources}
        return any(isinstance(a, dict) and str(a.get("serviceSource", "")).lower() in wanted for a in alerts)
    return True
