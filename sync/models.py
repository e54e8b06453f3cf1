"""Records that cross module boundaries: cycle summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class RequestError(Exception):
    """A rejected request: HTTP status, machine-readable code, and a message that says how to fix it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class TenantSummary:
    """One tenant's share of a cycle, in the JSON shape PRODUCT.md fixes (plus a few extra keys)."""

    tenant_id: str
    cursor_before: str | None = None
    cursor_after: str | None = None
    incidents: int = 0
    alerts: int = 0
    evidence: int = 0
    pages: int = 0
    throttled: int = 0
    mirrored: int = 0
    pushed: int = 0
    dead_lettered: int = 0
    requests: int = 0
    skipped: int = 0
    filtered: int = 0
    mirror_requested: int = 0
    outcome: str = "success"
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenantId": self.tenant_id, "incidents": self.incidents, "alerts": self.alerts,
            "evidence": self.evidence, "pages": self.pages, "throttled": self.throttled, "mirrored": self.mirrored,
            "pushed": self.pushed, "deadLettered": self.dead_lettered, "cursorBefore": self.cursor_before,
            "cursorAfter": self.cursor_after, "error": self.error, "outcome": self.outcome,
            "requests": self.requests, "skipped": self.skipped, "filtered": self.filtered, "notes": self.notes,
            "mirrorRequested": self.mirror_requested,
        }


@dataclass
class CycleSummary:
    """A whole run: what ``sync_run`` returns and what every cycle logs."""

    direction: str
    started_at: str
    finished_at: str | None = None
    budget_exhausted: bool = False
    tenants: list[TenantSummary] = field(default_factory=list)
    #: defender-portal: what the request/link phases did (sent, re-requested, linked, duplicates, waiting, rule).
    mirror_requests: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "direction": self.direction, "startedAt": self.started_at, "finishedAt": self.finished_at,
            "budgetExhausted": self.budget_exhausted, "tenants": [t.to_dict() for t in self.tenants]}
        if self.mirror_requests is not None:
            out["mirrorRequests"] = self.mirror_requests
        return out
