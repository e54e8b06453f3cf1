"""Defender → Sentinel mirror, run from the pull cycle for every in-scope incident version."""

from __future__ import annotations

import logging
from typing import Any

from .budget import BudgetExhausted, Deadline
from .context import AppContext
from .http import describe_error
from .incident_sync import IncidentBusy, IncidentSyncer
from .leases import LeaseLost
from .models import TenantSummary
from .pull import IncidentHook
from .settings import TenantConfig
from .state import DeadLetter
from .timeutil import canonical_time, parse_time, utcnow

log = logging.getLogger(__name__)


def mirror_hook(ctx: AppContext) -> IncidentHook:
    """The pull's per-incident hook: mirror the version just read. A failure is dead-lettered for this incident
    (and retried by the next version, the reconcile sweep, or a re-run) instead of stopping the tenant's pull. A
    version whose mirror failed is not tried again before its letter's backoff has passed (the overlap re-reads it
    every run); a newer version is tried at once."""
    syncer: IncidentSyncer | None = None
    # Mirror dead letters per tenant, read once: a success clears only a letter that exists (no blind deletes).
    pending: dict[str, dict[str, DeadLetter]] = {}

    def hook(tenant: TenantConfig, incident: dict[str, Any], summary: TenantSummary, deadline: Deadline) -> None:
        nonlocal syncer
        if syncer is None:
            syncer = IncidentSyncer(ctx)
        if tenant.tenant_id not in pending:
            pending[tenant.tenant_id] = {d.key: d for d in ctx.state.dead_letters(tenant.tenant_id, pending_only=True)
                                         if d.kind == "mirror"}
        letters = pending[tenant.tenant_id]
        incident_id = str(incident.get("id"))
        if _backing_off(letters.get(incident_id), incident):
            return
        try:
            outcome = syncer.sync(tenant, incident_id, deadline=deadline, trigger="pull", defender=incident,
                                  retry=incident_id in letters)
        except (BudgetExhausted, LeaseLost):
            raise  # the run stops here; the page is read again next run
        except Exception as exc:  # any failure of one incident: never replay the page forever
            letter = ctx.state.dead_letter(tenant.tenant_id, "mirror", incident_id, describe_error(exc),
                                           version=str(incident.get("lastUpdateDateTime")),
                                           backoff=not isinstance(exc, IncidentBusy))
            letters[incident_id] = letter
            summary.dead_lettered += 1
            log.warning("mirror failed", extra={"tenantId": tenant.tenant_id, "incidentId": incident_id,
                                                "action": "mirror", "outcome": "dead-lettered",
                                                "retryCount": letter.retry_count, "error": describe_error(exc)})
            return
        if incident_id in letters:
            ctx.state.resolve_dead_letter(tenant.tenant_id, "mirror", incident_id)
            letters.pop(incident_id, None)
        if outcome.result == "requested":
            summary.mirror_requested += 1
        if outcome.wrote_sentinel or outcome.result == "created":
            summary.mirrored += 1
        if outcome.wrote_defender:
            summary.pushed += 1
        if outcome.reason and outcome.result == "ignored" and outcome.reason not in summary.notes:
            summary.notes.append(outcome.reason)

    return hook


def _backing_off(letter: DeadLetter | None, incident: dict[str, Any]) -> bool:
    """Whether this very version already failed to mirror and its letter's next attempt is not due yet."""
    if letter is None or not letter.next_attempt_at or not letter.version:
        return False
    try:
        same = canonical_time(letter.version) == canonical_time(str(incident.get("lastUpdateDateTime")))
        return same and parse_time(letter.next_attempt_at) > utcnow()
    except ValueError:
        return False
