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
from .state import DeadLetter
from .telemetry import traced_cycle
from .timeutil import format_time, parse_time, utcnow

log = logging.getLogger(__name__)

HEALTHY_LAG_SECONDS = 3600.0
START_RESERVE_SECONDS = 2.0   # a tenant's turn starts only with this much budget left


class TenantCycle(Protocol):
    summary: TenantSummary

    def start(self) -> bool: ...

    def step(self) -> bool: ...

    def finish(self, outcome: str | None = None, error: str | None = None) -> TenantSummary: ...


CycleFactory = Callable[[AppContext, TenantConfig, Deadline, datetime | None], TenantCycle]




@traced_cycle  # sync.cycle span, a sync.tenant span per tenant, per-cycle metrics
def run_cycle(ctx: AppContext, direction: str, tenants: Sequence[TenantConfig], deadline: Deadline,
              factory: CycleFactory, *, since: datetime | None = None) -> CycleSummary:
    """Run ``factory``'s cycle for each tenant, round robin, until all are done or the budget is spent.

    Fair across runs too: each run starts with the tenant where the previous one stopped (a stored rotation), and a
    tenant's cycle starts (lease, state read) only when its turn comes, so a short budget serves the tenants in turn
    instead of the same first few every time.
    """
    summary = CycleSummary(direction=direction, started_at=format_time(utcnow()))
    order = _rotation(ctx, direction, tenants)
    cycles: dict[str, TenantCycle] = {}
    done: set[str] = set()
    stopped_at: str | None = None
    while len(done) < len(order) and stopped_at is None:
        for tenant in order:
            tid = tenant.tenant_id
            if tid in done:
                continue
            if deadline.expired(deadline.reserve(START_RESERVE_SECONDS)):
                summary.budget_exhausted, stopped_at = True, tid
                break
            cycle = cycles.get(tid)
            if cycle is None:
                cycle, started = _start(ctx, tenant, deadline, since, factory, direction, summary)
                if cycle is not None:
                    cycles[tid] = cycle
                if cycle is None or not started:
                    done.add(tid)
                    continue
            try:
                more = cycle.step()
            except BudgetExhausted:
                # Its step was cut having had its turn: the next tenant goes first next run. Starting with it
                # again would let a step that always outlasts the budget (a write cap's wait) starve the rest.
                summary.budget_exhausted, stopped_at = True, _after(order, tid)
                break
            except Exception as exc:
                log.warning("tenant cycle failed", exc_info=True,
                            extra={"tenantId": tid, "action": direction, "outcome": "error"})
                _finish(cycle, "error", describe_error(exc))
                done.add(tid)
                continue
            if not more:
                _finish(cycle, "success")
                done.add(tid)
    for tid, cycle in cycles.items():
        if tid not in done:
            _finish(cycle, "partial")
    summary.tenants.extend(c.summary for c in cycles.values())
    reported = {t.tenant_id for t in summary.tenants}
    for tenant in order:
        if tenant.tenant_id not in reported:
            summary.tenants.append(TenantSummary(tenant_id=tenant.tenant_id, outcome="not-started",
                                                 error="the run's time budget was spent before this tenant's turn; "
                                                       "it is served first next run"))
    _save_rotation(ctx, direction, tenants, order, stopped_at)
    position = {t.tenant_id: i for i, t in enumerate(tenants)}
    summary.tenants.sort(key=lambda t: position.get(t.tenant_id, 0))
    summary.finished_at = format_time(utcnow())
    log.info("cycle finished", extra={"action": direction, "outcome": "budget-exhausted" if summary.budget_exhausted
                                      else "complete", "tenants": len(summary.tenants)})
    return summary


def _after(order: Sequence[TenantConfig], tenant_id: str) -> str:
    """The tenant that follows ``tenant_id`` in the run's order (cyclically)."""
    ids = [t.tenant_id for t in order]
    return ids[(ids.index(tenant_id) + 1) % len(ids)]


def _start(ctx: AppContext, tenant: TenantConfig, deadline: Deadline, since: datetime | None,
           factory: CycleFactory, direction: str, summary: CycleSummary) -> tuple[TenantCycle | None, bool]:
    """Start one tenant's cycle: (the cycle, whether it has work to do). A failure is that tenant's summary, never
    the run's end."""
    try:
        cycle = factory(ctx, tenant, deadline, since)
        return cycle, cycle.start()
    except Exception as exc:  # one tenant's failure must not stop the others
        log.exception("tenant cycle could not start", extra={"tenantId": tenant.tenant_id, "action": direction,
                                                              "outcome": "error"})
        summary.tenants.append(TenantSummary(tenant_id=tenant.tenant_id, outcome="error", error=describe_error(exc)))
        return None, False


def _rotation(ctx: AppContext, direction: str, tenants: Sequence[TenantConfig]) -> list[TenantConfig]:
    """The tenants in configured order, rotated to start where the last run of this direction stopped."""
    if len(tenants) < 2:
        return list(tenants)  # nothing to rotate (a queue message's one tenant): spare the read
    try:
        first = ctx.state.get_marker("rotation", direction).get("next")
    except Exception:  # fairness is best effort: a storage hiccup must not stop the run
        log.warning("could not read the tenant rotation", exc_info=True, extra={"action": direction,
                                                                                "outcome": "rotation-unread"})
        first = None
    ids = [t.tenant_id for t in tenants]
    start = ids.index(first) if first in ids else 0
    return list(tenants[start:]) + list(tenants[:start])


def _save_rotation(ctx: AppContext, direction: str, tenants: Sequence[TenantConfig], order: list[TenantConfig],
                   stopped_at: str | None) -> None:
    """Remember where the next run starts: the first tenant the budget left without its turn, else the next one in
    line."""
    if len(order) < 2:
        return
    following = stopped_at or order[1].tenant_id
    try:
        ctx.state.set_marker("rotation", direction, {"next": following})
    except Exception:
        log.warning("could not store the tenant rotation", exc_info=True, extra={"action": direction,
                                                                                 "outcome": "rotation-unsaved"})


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
    """The ``sync_status`` JSON: per-tenant cursor, lag, last run, the reconcile's health, the mirrors waiting and
    the dead letters (total, given up, by kind)."""
    now = utcnow()
    tenants: list[dict[str, Any]] = []
    healthy = True
    requests, portal = _mirror_requests(ctx)
    for tenant in ctx.settings.tenants:
        state = ctx.state.get_tenant(tenant.tenant_id)
        letters = list(ctx.state.dead_letters(tenant.tenant_id))
        lag = (now - parse_time(state.cursor)).total_seconds() if state.cursor else None
        last = state.last_run or {}
        last_run = {"startedAt": last.get("startedAt"), "finishedAt": last.get("finishedAt"),
                    "outcome": last.get("outcome")} if last else None
        reconcile = reconcile_health(ctx.state.get_marker("reconcile", tenant.tenant_id))
        by_kind: dict[str, int] = {}
        for letter in letters:
            by_kind[letter.kind] = by_kind.get(letter.kind, 0) + 1
        ok = (lag is not None and lag <= HEALTHY_LAG_SECONDS and last.get("outcome") != "error"
              and reconcile["healthy"])
        healthy = healthy and ok
        tenants.append({
            "tenantId": tenant.tenant_id, "name": tenant.name, "mode": tenant.mode, "cursor": state.cursor,
            "lagSeconds": round(lag, 1) if lag is not None else None, "lastRun": last_run,
            "deadLetters": len(letters), "deadLettersGivenUp": sum(1 for d in letters if d.given_up),
            "deadLettersByKind": by_kind,
            "mirrorsWaiting": mirrors_waiting(letters) + requests.get(tenant.tenant_id, 0),
            "mirrorRequestsWaiting": requests.get(tenant.tenant_id, 0),
            "mirrorRetriesWaiting": mirrors_waiting(letters),
            "reconcile": reconcile, "healthy": ok,
        })
    answer = {"healthy": healthy, "checkedAt": format_time(now), "tenants": tenants}
    if portal is not None:
        answer["mirrorRule"] = portal
        answer["healthy"] = healthy and portal.get("state") in ("ok", None)
    return answer


def _mirror_requests(ctx: AppContext) -> tuple[dict[str, int], dict[str, Any] | None]:
    """defender-portal: the requests not yet linked, per tenant, and the mirror rule's last known state (a missing
    or disabled rule makes the app unhealthy: requests wait for it)."""
    if ctx.settings.mirror_target != "defender-portal":
        return {}, None
    from .targets.defender_portal import DefenderPortalTarget, waiting_per_tenant

    target = ctx.target
    assert isinstance(target, DefenderPortalTarget)
    rule = ctx.state.get_marker("mirror-rule", "app")
    return waiting_per_tenant(target.requests), {"ruleId": target.rule_id, "state": rule.get("state"),
                                                 "checkedAt": rule.get("checkedAt")}


def reconcile_health(marker: dict[str, Any]) -> dict[str, Any]:
    """The reconcile's last run (``lastRun`` of its marker, see ``ReconcileCycle.finish``) and whether it is healthy
    (never run yet counts as healthy: a new tenant has nothing to reconcile)."""
    last = marker.get("lastRun") if isinstance(marker.get("lastRun"), dict) else None
    outcome = last.get("outcome") if last else None
    return {"lastRun": {"finishedAt": last.get("finishedAt"), "outcome": outcome} if last else None,
            "cursor": marker.get("cursor"), "healthy": outcome != "error"}


def mirrors_waiting(letters: Sequence[DeadLetter]) -> int:
    """Mirrors that failed and wait for a retry: the pending (not given up) dead letters of kind ``mirror`` (with
    ``defender-portal``, ``status`` adds the requests not yet linked)."""
    return sum(1 for d in letters if d.kind == "mirror" and not d.given_up)
