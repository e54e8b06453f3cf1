"""Runs a cycle over many tenants fairly inside one time budget, and reports status.

Inline fan-out interleaves tenants one page at a time (round robin), so a tenant with a large backlog cannot starve
the others; each tenant checkpoints after every page, so when the budget is spent every tenant resumes next run
where it stopped. A failure in one tenant is reported in its summary and never stops the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from .budget import BudgetExhausted, Deadline
from .context import AppContext
from .http import describe_error
from .models import CycleSummary, TenantSummary
from .settings import TenantConfig
from .telemetry import traced_cycle
from .timeutil import format_time, parse_time, utcnow

log = logging.getLogger(__name__)

HEALTHY_LAG_SECONDS = 3600.0


class TenantCycle(Protocol):
    summary: TenantSummary

    def start(self) -> bool: ...

    def step(self) -> bool: ...

    def finish(self, outcome: str | None = None, error: str | None = None) -> TenantSummary: ...


CycleFactory = Callable[[AppContext, TenantConfig, Deadline, datetime | None], TenantCycle]




@traced_cycle  # sync.cycle span, a sync.tenant span per tenant, per-cycle metrics
def run_cycle(ctx: AppContext, direction: str, tenants: Sequence[TenantConfig], deadline: Deadline,
              factory: CycleFactory, *, since: datetime | None = None) -> CycleSummary:
    """Run ``factory``'s cycle for each tenant, round robin, until all are done or the budget is spent."""
    summary = CycleSummary(direction=direction, started_at=format_time(utcnow()))
    cycles: list[TenantCycle] = []
    active: list[TenantCycle] = []
    for tenant in tenants:
        try:
            cycle = factory(ctx, tenant, deadline, since)
            started = cycle.start()
            cycles.append(cycle)
            if started:
                active.append(cycle)
        except Exception as exc:  # one tenant's failure must not stop the others
            log.exception("tenant cycle could not start", extra={"tenantId": tenant.tenant_id, "action": direction,
                                                                  "outcome": "error"})
            failed = TenantSummary(tenant_id=tenant.tenant_id, outcome="error", error=describe_error(exc))
            summary.tenants.append(failed)
    while active:
        for cycle in list(active):
            try:
                more = cycle.step()
            except BudgetExhausted:
                summary.budget_exhausted = True
                more = None
            except Exception as exc:
                log.warning("tenant cycle failed", exc_info=True,
                            extra={"tenantId": cycle.summary.tenant_id, "action": direction, "outcome": "error"})
                _finish(cycle, "error", describe_error(exc))
                active.remove(cycle)
                continue
            if more is None:
                break
            if not more:
                _finish(cycle, "success")
                active.remove(cycle)
        if summary.budget_exhausted:
            break
    for cycle in active:
        _finish(cycle, "partial")
    summary.tenants.extend(c.summary for c in cycles)
    order = {t.tenant_id: i for i, t in enumerate(tenants)}
    summary.tenants.sort(key=lambda t: order.get(t.tenant_id, 0))
    summary.finished_at = format_time(utcnow())
    log.info("cycle finished", extra={"action": direction, "outcome": "budget-exhausted" if summary.budget_exhausted
                                      else "complete", "tenants": len(summary.tenants)})
    return summary


def _finish(cycle: TenantCycle, outcome: str, error: str | None = None) -> None:
    """Finish a tenant's cycle; a failure to record it is reported in its summary, never raised past the run."""
    try:
        cycle.finish(outcome, error)
    except Exception as exc:
        log.warning("tenant cycle could not be finished cleanly", exc_info=True,
                    extra={"tenantId": cycle.summary.tenant_id, "action": "finish", "outcome": "error"})
        cycle.summary.outcome = "error"
        cycle.summary.error = describe_error(exc)


def status(ctx: AppContext) -> dict[str, Any]:
    """The ``sync_status`` JSON: per-tenant cursor, lag, last run and dead letters."""
    now = utcnow()
    tenants: list[dict[str, Any]] = []
    healthy = True
    for tenant in ctx.settings.tenants:
        state = ctx.state.get_tenant(tenant.tenant_id)
        letters = list(ctx.state.dead_letters(tenant.tenant_id))
        lag = (now - parse_time(state.cursor)).total_seconds() if state.cursor else None
        last = state.last_run or {}
        last_run = {"startedAt": last.get("startedAt"), "finishedAt": last.get("finishedAt"),
                    "outcome": last.get("outcome")} if last else None
        ok = lag is not None and lag <= HEALTHY_LAG_SECONDS and last.get("outcome") != "error"
        healthy = healthy and ok
        tenants.append({
            "tenantId": tenant.tenant_id, "name": tenant.name, "mode": tenant.mode, "cursor": state.cursor,
            "lagSeconds": round(lag, 1) if lag is not None else None, "lastRun": last_run,
            "deadLetters": len(letters), "deadLettersGivenUp": sum(1 for d in letters if d.given_up),
            "mirrorRetriesWaiting": sum(1 for d in letters if d.kind == "mirror" and not d.given_up),
            "healthy": ok,
        })
    return {"healthy": healthy, "checkedAt": format_time(now), "tenants": tenants}
