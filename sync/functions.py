"""Function handlers: validate what arrives, run the engine, shape the JSON. ``function_app.py`` binds them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import azure.functions as func

from .budget import Deadline
from .context import AppContext, get_context
from .fanout import enqueue_tenants
from .http import describe_error
from .models import CycleSummary, RequestError
from .pull import TenantPull
from .runner import run_cycle, status
from .settings import SettingsError, TenantConfig
from .telemetry import traced_webhook
from .timeutil import parse_time, utcnow

log = logging.getLogger(__name__)

HTTP_BUDGET_CAP_SECONDS = 200.0   # Azure cuts HTTP responses at 230 s
DIRECTIONS = ("pull", "reconcile")


def error_response(status: int, code: str, message: str) -> func.HttpResponse:
    return json_response({"error": {"code": code, "message": message}}, status)


def json_response(body: Any, status: int = 200) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(body, ensure_ascii=False), status_code=status,
                             mimetype="application/json", charset="utf-8")


def _context_or_error() -> AppContext:
    try:
        return get_context()
    except SettingsError as exc:
        raise RequestError(500, "configuration_error", str(exc)) from exc


def _cycle_factory(direction: str) -> Callable[[AppContext, TenantConfig, Deadline, datetime | None], Any]:
    if direction == "reconcile":
        from .pushback import ReconcileCycle, WorkspaceChanges

        shared: dict[int, WorkspaceChanges] = {}   # one workspace listing per run, for every tenant

        def reconcile(ctx: AppContext, tenant: TenantConfig, deadline: Deadline, since: datetime | None) -> Any:
            changes = shared.setdefault(id(ctx), WorkspaceChanges(ctx))
            return ReconcileCycle(ctx, tenant, deadline=deadline, since=since, changes=changes)

        return reconcile

    def pull(ctx: AppContext, tenant: TenantConfig, deadline: Deadline, since: datetime | None) -> Any:
        from .mirror import mirror_hook

        return TenantPull(ctx, tenant, deadline=deadline, since=since, hook=mirror_hook(ctx))

    return pull


def run(ctx: AppContext, direction: str, tenants: list[TenantConfig], budget: float,
        since: datetime | None = None) -> CycleSummary:
    """One cycle over ``tenants`` within ``budget`` seconds."""
    deadline = Deadline(budget)
    phase = ctx.portal_phase() if direction == "pull" else None
    if phase is None:
        return run_cycle(ctx, direction, tenants, deadline, _cycle_factory(direction), since=since)
    # defender-portal: link what the rule made and send what the pace allows now, pull, then keep sending at the pace
    # (linking each minute) while the budget lasts.
    before = phase.run(deadline, wait=False)
    summary = run_cycle(ctx, direction, tenants, deadline, _cycle_factory(direction), since=since)
    after = phase.run(deadline, wait=True)
    summary.mirror_requests = before.merged(after).to_dict()
    return summary


def timer_cycle(direction: str) -> CycleSummary | None:
    """The timers: run every tenant inline, or enqueue one message per tenant when ``SYNC_FANOUT=queue``."""
    ctx = get_context()
    if ctx.settings.fanout == "queue":
        enqueue_tenants(ctx, direction)
        log.info("enqueued tenant work", extra={"action": direction, "outcome": "enqueued",
                                                "tenants": len(ctx.settings.tenants)})
        return None
    summary = run(ctx, direction, list(ctx.settings.tenants), ctx.settings.time_budget_seconds)
    _log_summary(summary)
    return summary


def tenant_message(body: bytes | str) -> CycleSummary | None:
    """The queue worker: one tenant's cycle. A malformed message is logged and dropped (retrying cannot help)."""
    ctx = get_context()
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        message = json.loads(text)
        if not isinstance(message, dict):
            raise ValueError("the message must be a JSON object")
        tenant_id = message.get("tenantId")
        direction = message.get("direction", "pull")
        if not isinstance(tenant_id, str) or direction not in DIRECTIONS:
            raise ValueError('expected {"tenantId": "<guid>", "direction": "pull" or "reconcile"}')
    except (UnicodeDecodeError, ValueError) as exc:
        log.error("dropped malformed queue message: %s", exc, extra={"action": "tenant-pull", "outcome": "rejected"})
        return None
    tenant = ctx.settings.tenant(tenant_id)
    if tenant is None:
        log.error("dropped queue message for a tenant that is not configured",
                  extra={"tenantId": tenant_id, "action": "tenant-pull", "outcome": "rejected"})
        return None
    summary = run(ctx, direction, [tenant], ctx.settings.time_budget_seconds)
    _log_summary(summary)
    return summary


def _log_summary(summary: CycleSummary) -> None:
    for t in summary.tenants:
        log.info("tenant cycle summary", extra={"tenantId": t.tenant_id, "action": summary.direction,
                                                "outcome": t.outcome, **{k: v for k, v in t.to_dict().items()
                                                                         if isinstance(v, int)}})


def sync_run(req: func.HttpRequest) -> func.HttpResponse:
    """POST sync/run: ``{"tenants": [...], "since": "<ISO>", "direction": "pull"|"reconcile"}``, all optional."""
    try:
        ctx = _context_or_error()
        body = _json_body(req, ctx.settings.webhook_max_body_bytes, allow_empty=True)
        unknown = set(body) - {"tenants", "since", "direction"}
        if unknown:
            raise RequestError(400, "invalid_request", f"unknown keys {sorted(unknown)}; allowed: tenants, since, "
                                                       "direction")
        direction = body.get("direction", "pull")
        if direction not in DIRECTIONS:
            raise RequestError(400, "invalid_direction", 'direction must be "pull" or "reconcile"')
        tenants = _requested_tenants(ctx, body.get("tenants"))
        since = _since(body.get("since"))
        budget = min(ctx.settings.time_budget_seconds, HTTP_BUDGET_CAP_SECONDS)
        summary = run(ctx, direction, tenants, budget, since)
    except RequestError as exc:
        return error_response(exc.status, exc.code, exc.message)
    _log_summary(summary)
    return json_response(summary.to_dict())


@traced_webhook  # sync.webhook span and counter (result from the JSON answer)
def sentinel_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """POST sentinel/incidents: the body only names the incident; both sides are re-read before anything changes."""
    from .pushback import handle_webhook

    try:
        ctx = _context_or_error()
        body = _json_body(req, ctx.settings.webhook_max_body_bytes)
        answer = handle_webhook(ctx, body, Deadline(min(ctx.settings.time_budget_seconds, HTTP_BUDGET_CAP_SECONDS)))
    except RequestError as exc:
        log.info("webhook rejected", extra={"action": "webhook", "outcome": exc.code})
        return error_response(exc.status, exc.code, exc.message)
    except Exception as exc:  # Graph, Sentinel, Table Storage or the identity failed: nothing was half-decided
        # Transient or upstream failure: the Logic App retries, and the reconcile timer catches it regardless.
        log.warning("webhook could not sync the incident", extra={"action": "webhook", "outcome": "upstream-error",
                                                                  "error": describe_error(exc)})
        return error_response(503, "upstream_unavailable", f"could not sync the incident now ({describe_error(exc)});"
                                                           " it will be retried")
    return json_response(answer)


def sync_status(req: func.HttpRequest) -> func.HttpResponse:
    """GET sync/status."""
    try:
        ctx = _context_or_error()
        body = status(ctx)
    except RequestError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except Exception as exc:  # the state store is unreachable
        return error_response(503, "state_unavailable", f"could not read the sync state: {describe_error(exc)}")
    return json_response(body)


def sync_check(req: func.HttpRequest) -> func.HttpResponse:
    """GET sync/check[?timeout=<seconds per check>]: the onboarding preflight; writes nothing, 200 with "ok"."""
    from .preflight import DEFAULT_CHECK_SECONDS, MAX_CHECK_SECONDS, run_checks

    try:
        ctx = _context_or_error()
        raw = req.params.get("timeout")
        seconds = DEFAULT_CHECK_SECONDS
        if raw is not None:
            try:
                seconds = float(raw)
            except ValueError:
                seconds = -1.0
            if not 1 <= seconds <= MAX_CHECK_SECONDS:
                raise RequestError(400, "invalid_timeout", f"timeout must be the seconds each check may take, "
                                                           f"between 1 and {MAX_CHECK_SECONDS:g}; got {raw[:32]!r}")
    except RequestError as exc:
        return error_response(exc.status, exc.code, exc.message)
    return json_response(run_checks(ctx, seconds).to_dict())


def _requested_tenants(ctx: AppContext, raw: object) -> list[TenantConfig]:
    if raw is None:
        return list(ctx.settings.tenants)
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise RequestError(400, "invalid_tenants", "tenants must be a list of tenant ID strings")
    chosen: list[TenantConfig] = []
    for tenant_id in raw:
        tenant = ctx.settings.tenant(tenant_id)
        if tenant is None:
            raise RequestError(400, "unknown_tenant", f"tenant {tenant_id!r} is not in DEFENDER_TENANT_IDS; "
                                                      "configured tenants: "
                                                      + ", ".join(t.tenant_id for t in ctx.settings.tenants))
        if tenant not in chosen:
            chosen.append(tenant)
    return chosen


def _since(raw: object) -> datetime | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise RequestError(400, "invalid_since", "since must be an ISO-8601 time string such as "
                                                 "2026-11-01T00:00:00Z")
    try:
        value = parse_time(raw)
    except ValueError as exc:
        raise RequestError(400, "invalid_since", f"since must be an ISO-8601 time such as 2026-11-01T00:00:00Z; "
                                                 f"got {raw[:64]!r}") from exc
    if value > utcnow() + timedelta(minutes=5):
        raise RequestError(400, "invalid_since", "since is in the future")
    return value


def _json_body(req: func.HttpRequest, limit: int, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object, after checking size (413), content type (415) and syntax (400)."""
    body = req.get_body() or b""
    if len(body) > limit:
        raise RequestError(413, "payload_too_large", f"the body is {len(body)} bytes; the limit is {limit} "
                                                     "(WEBHOOK_MAX_BODY_BYTES)")
    if not body.strip():
        if allow_empty:
            return {}
        raise RequestError(400, "empty_body", "the body is empty; send a JSON object")
    content_type = (req.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise RequestError(415, "unsupported_media_type", f"Content-Type must be application/json, not "
                                                          f"{content_type[:64]!r}")
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, "malformed_json", f"the body is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise RequestError(400, "invalid_request", "the body must be a JSON object")
    return parsed
