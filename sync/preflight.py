"""Onboarding preflight (``sync_check``, ``python -m sync check``): is everything in place before data is due?

Per tenant: a Graph token can be had (consent), its application roles cover the tenant's mode, one incident read works.
Shared, reported once: a token for Logs Ingestion (and the DCR and streams the app will use), the Sentinel workspace
answers, the app's effective permissions on it cover incidents and comments, the mirror rule (``defender-portal``)
exists and is enabled, and the state tables and queue answer.

Rules: every call is a read (no table, queue, row or incident is created); one cause gives one failed check: a check
that cannot run because an earlier one failed is ``skipped``; tenants run concurrently and each check has a bounded
time, so one slow tenant cannot hold the answer. Tokens are decoded (payload only) to read their roles and are never
printed; error texts come from Entra/ARM error bodies, which carry no secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from azure.core.credentials import TokenCredential
from azure.core.exceptions import ResourceNotFoundError

from .budget import BudgetExhausted, Deadline
from .context import AppContext
from .http import ApiError, BearerSession, RetryPolicy, describe_error, new_session, transport_options
from .rows import CHANGE_LOG_TABLES, STREAMS
from .sentinel import ALERT_RULES_API_VERSION
from .settings import Settings, TenantConfig
from .state import ALL_TABLES
from .timeutil import format_time, utcnow

log = logging.getLogger(__name__)

DEFAULT_CHECK_SECONDS = 15.0      # per check
ANSWER_SECONDS = 55.0             # the whole answer, however slow one tenant is (the bound: 60 s)
MAX_CHECK_SECONDS = 50.0
PERMISSIONS_API_VERSION = "2022-04-01"
WORKSPACE_API_VERSION = "2025-02-01"

INCIDENT_READ = "SecurityIncident.Read.All"
INCIDENT_WRITE = "SecurityIncident.ReadWrite.All"
ALERT_READ = "SecurityAlert.Read.All"
ALERT_WRITE = "SecurityAlert.ReadWrite.All"
_IMPLIED = {INCIDENT_WRITE: INCIDENT_READ, ALERT_WRITE: ALERT_READ}   # ReadWrite implies Read
SENTINEL_ACTIONS = tuple(f"Microsoft.SecurityInsights/incidents/{a}"
                         for a in ("read", "write", "comments/read", "comments/write"))
# Entra errors that mean "no service principal / no consent in that tenant" rather than a bad credential.
_CONSENT_CODES = frozenset({"AADSTS65001", "AADSTS700016", "AADSTS7000229", "AADSTS500011", "AADSTS650052"})
_CREDENTIAL_CODES = frozenset({"AADSTS7000215", "AADSTS7000222", "AADSTS700027", "AADSTS700024", "AADSTS70021",
                               "AADSTS700213", "AADSTS700211"})
_AADSTS = re.compile(r"AADSTS\d+")

Status = Literal["ok", "failed", "skipped"]


@dataclass
class Check:
    """One check's result: what was found and, when it failed, what to do."""

    name: str
    status: Status
    found: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"check": self.name, "ok": self.ok, "status": self.status, "found": self.found}
        if self.fix:
            body["fix"] = self.fix
        if self.details:
            body["details"] = self.details
        return body


@dataclass
class Report:
    """The ``sync_check`` answer."""

    tenants: list[tuple[TenantConfig, list[Check]]]
    shared: list[Check]
    checked_at: str

    @property
    def ok(self) -> bool:
        return all(c.status != "failed" for c in self.shared) and all(
            c.status != "failed" for _, checks in self.tenants for c in checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "checkedAt": self.checked_at,
            "tenants": [{"tenantId": t.tenant_id, "name": t.name, "mode": t.mode,
                         "ok": all(c.status != "failed" for c in checks), "checks": [c.to_dict() for c in checks]}
                        for t, checks in self.tenants],
            "shared": {"ok": all(c.status != "failed" for c in self.shared),
                       "checks": [c.to_dict() for c in self.shared]},
        }


class _Skip(Exception):
    """Raised by a step whose prerequisite failed: it is reported as skipped."""


# ------------------------------------------------------------------------------------------------- pure helpers


def token_roles(token: str) -> list[str] | None:
    """The ``roles`` claim of a JWT access token (payload decoded, signature not checked); None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    roles = payload.get("roles") or []
    return [str(r) for r in roles] if isinstance(roles, list) else None


def required_roles(mode: str) -> tuple[str, ...]:
    """The Graph application roles a tenant's mode needs."""
    if mode == "sync":
        return (INCIDENT_WRITE, ALERT_READ)
    return (INCIDENT_READ, ALERT_READ)


def missing_roles(held: list[str], mode: str) -> list[str]:
    """Roles ``mode`` needs that ``held`` does not cover (a ReadWrite role covers its Read role)."""
    have = set(held) | {_IMPLIED[r] for r in held if r in _IMPLIED}
    return [r for r in required_roles(mode) if r not in have]


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$", re.IGNORECASE)


def allowed_actions(permissions: list[dict[str, Any]], wanted: tuple[str, ...]) -> dict[str, bool]:
    """Which ``wanted`` control-plane actions the ARM permissions list allows (``*`` wildcards; notActions subtract
    within the same entry, as ARM evaluates role definitions)."""
    result: dict[str, bool] = {}
    for action in wanted:
        result[action] = any(
            any(_wildcard(str(a)).match(action) for a in p.get("actions") or [])
            and not any(_wildcard(str(a)).match(action) for a in p.get("notActions") or [])
            for p in permissions if isinstance(p, dict))
    return result


def consent_url(settings: Settings, tenant_id: str) -> str:
    """The admin-consent URL of the multi-tenant app in ``tenant_id``."""
    return f"{settings.authority_host}/{tenant_id}/adminconsent?client_id={settings.defender_client_id}"


def streams(settings: Settings) -> list[str]:
    """The Logs Ingestion streams the app writes to with these settings."""
    names = [STREAMS[table] for table in CHANGE_LOG_TABLES]
    if settings.mirror_target == "defender-portal":
        names.append(STREAMS["DefenderMirrorRequests_CL"])
    return names


def entra_code(exc: BaseException) -> str | None:
    """The first ``AADSTS<n>`` code in an azure-identity error, if any."""
    match = _AADSTS.search(str(exc))
    return match.group(0) if match else None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


# ------------------------------------------------------------------------------------------------- the engine


class Preflight:
    """Runs every check once; build with the app's context (only its settings and credentials are used)."""

    def __init__(self, ctx: AppContext, check_seconds: float = DEFAULT_CHECK_SECONDS) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.check_seconds = check_seconds

    def run(self) -> Report:
        """All tenants and the shared parts concurrently; each check bounded by ``check_seconds``."""
        jobs: list[tuple[TenantConfig | None, _Job]] = [(None, _Job(self._shared_steps()))]
        jobs += [(t, _Job(self._tenant_steps(t))) for t in self.settings.tenants]
        end = time.monotonic() + ANSWER_SECONDS
        pool = ThreadPoolExecutor(max_workers=min(16, len(jobs)), thread_name_prefix="preflight")
        try:
            for _, job in jobs:
                pool.submit(job.run, self.check_seconds, end)
            for _, job in jobs:
                job.wait(self.check_seconds, end)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)   # a stuck call is abandoned, never awaited
        report = Report(tenants=[(t, job.results()) for t, job in jobs if t is not None],
                        shared=jobs[0][1].results(), checked_at=format_time(utcnow()))
        for tenant, checks in report.tenants:
            for c in checks:
                log.info("preflight check", extra={"tenantId": tenant.tenant_id, "action": f"check:{c.name}",
                                                   "outcome": c.status})
        for c in report.shared:
            log.info("preflight check", extra={"action": f"check:{c.name}", "outcome": c.status})
        return report

    # -- Graph, per tenant -----------------------------------------------------------------------------------

    def _tenant_steps(self, tenant: TenantConfig) -> list[tuple[str, Callable[[Deadline], Check]]]:
        token: dict[str, str] = {}
        roles: dict[str, list[str]] = {}
        s = self.settings

        def consent(deadline: Deadline) -> Check:
            name = "graph.consent"
            try:
                token["value"] = self.ctx.credentials.graph(tenant.tenant_id).get_token(s.graph_scope).token
            except Exception as exc:
                return self._token_failure(name, tenant, exc)
            who = "the app registration" if s.defender_client_id else "the app's own identity"
            return Check(name, "ok", f"{who} gets a Graph token in tenant {tenant.tenant_id}")

        def graph_roles(deadline: Deadline) -> Check:
            name = "graph.roles"
            if "value" not in token:
                raise _Skip("no Graph token (see graph.consent)")
            held = token_roles(token["value"])
            if held is None:
                raise _Skip("the Graph token is not a JWT, so its roles cannot be read")
            roles["held"] = held
            missing = missing_roles(held, tenant.mode)
            needs = ", ".join(required_roles(tenant.mode))
            found = f"roles {', '.join(held) or '(none)'}; mode {tenant.mode} needs {needs}"
            if not missing:
                return Check(name, "ok", found)
            fix = (f"Grant the application permission(s) {', '.join(missing)} (Microsoft Graph) to the app "
                   f"registration and have an administrator of tenant {tenant.tenant_id} grant admin consent again: "
                   f"{consent_url(s, tenant.tenant_id)}")
            if not s.defender_client_id:
                fix = f"Grant the app's managed identity the Graph application role(s) {', '.join(missing)}."
            if tenant.mode == "sync" and missing == [INCIDENT_WRITE] and INCIDENT_READ in held:
                fix += " (or set the tenant's mode to pull-only in SYNC_TENANTS if it must stay read-only)"
            return Check(name, "failed", found, fix, {"missing": missing})

        def read(deadline: Deadline) -> Check:
            name = "graph.read"
            if "value" not in token:
                raise _Skip("no Graph token (see graph.consent)")
            held = roles.get("held")
            if held is not None and (missing := [r for r in missing_roles(held, "pull-only") if r == INCIDENT_READ]):
                raise _Skip(f"the token lacks {missing[0]} (see graph.roles)")
            session = self._session(self.ctx.credentials.graph(tenant.tenant_id), s.graph_scope)
            try:
                response = session.request("GET", f"{s.graph_endpoint}/v1.0/security/incidents?$top=1",
                                           deadline=deadline)
            except ApiError as exc:
                fix = ("Check that the tenant has Microsoft Defender XDR and that GRAPH_ENDPOINT is right for its "
                       "cloud." if exc.status != 403 else f"Grant {INCIDENT_READ} and admin consent: "
                                                 f"{consent_url(s, tenant.tenant_id)}")
                return Check(name, "failed", f"reading one incident failed: {describe_error(exc)}", fix)
            count = len(response.json().get("value") or [])
            return Check(name, "ok", f"read {count} incident(s) with $top=1")

        return [("graph.consent", consent), ("graph.roles", graph_roles), ("graph.read", read)]

    def _token_failure(self, name: str, tenant: TenantConfig, exc: BaseException) -> Check:
        s = self.settings
        code = entra_code(exc)
        found = f"Entra refused a Graph token in tenant {tenant.tenant_id}: {code or _first_line(exc)}"
        details = {"entraError": code} if code else {}
        if s.defender_client_id and (code in _CONSENT_CODES or (code is None and "consent" in str(exc).lower())):
            fix = (f"An administrator of tenant {tenant.tenant_id} grants admin consent to the app: "
                   f"{consent_url(s, tenant.tenant_id)}")
            details["consentUrl"] = consent_url(s, tenant.tenant_id)
        elif code in _CREDENTIAL_CODES:
            fix = ("The app's credential was refused: renew the client secret or certificate in Key Vault, or check "
                   "the federated credential (issuer and subject of the managed identity) on the app registration.")
        elif code == "AADSTS90002":
            fix = f"Tenant {tenant.tenant_id} does not exist in this cloud: fix DEFENDER_TENANT_IDS."
        else:
            fix = ("Check DEFENDER_CLIENT_ID and its credential, AZURE_AUTHORITY_HOST, and that the tenant consented "
                   f"to the app: {consent_url(s, tenant.tenant_id)}")
        return Check(name, "failed", found, fix, details)

    # -- shared: Logs Ingestion, Sentinel, state storage --------------------------------------------------------

    def _shared_steps(self) -> list[tuple[str, Callable[[Deadline], Check]]]:
        s = self.settings
        workspace_ok: dict[str, bool] = {}

        def ingestion(deadline: Deadline) -> Check:
            details = {"endpoint": s.logs_ingestion_endpoint, "dcrImmutableId": s.logs_dcr_immutable_id,
                       "streams": streams(s)}
            try:
                self.ctx.credentials.app().get_token(s.logs_ingestion_scope)
            except Exception as exc:
                return Check("ingestion.token", "failed",
                             f"no token for {s.logs_ingestion_scope}: {entra_code(exc) or _first_line(exc)}",
                             "Check the app's managed identity (AZURE_CLIENT_ID for a user-assigned one) and "
                             "LOGS_INGESTION_SCOPE.", details)
            return Check("ingestion.token", "ok", f"token for {s.logs_ingestion_scope}; DCR {s.logs_dcr_immutable_id}"
                                                  f", streams {', '.join(details['streams'])} (nothing uploaded)",
                         details=details)

        def workspace(deadline: Deadline) -> Check:
            url = f"{s.arm_endpoint}{s.sentinel_workspace_id}?api-version={WORKSPACE_API_VERSION}"
            try:
                self._arm().request("GET", url, deadline=deadline)
            except Exception as exc:
                if isinstance(exc, BudgetExhausted):
                    raise
                return Check("sentinel.workspace", "failed", f"the workspace did not answer: {describe_error(exc)}",
                             "Check SENTINEL_WORKSPACE_ID and ARM_ENDPOINT, and assign the app's identity Microsoft "
                             "Sentinel Responder on the workspace.")
            workspace_ok["yes"] = True
            return Check("sentinel.workspace", "ok", f"workspace {s.sentinel_workspace_id.rsplit('/', 1)[-1]} answers")

        def permissions(deadline: Deadline) -> Check:
            if "yes" not in workspace_ok:
                raise _Skip("the workspace did not answer (see sentinel.workspace)")
            if not any(t.mirrors for t in s.tenants):
                return Check("sentinel.permissions", "ok", "no tenant mirrors into Sentinel (all data-only)")
            url = (f"{s.arm_endpoint}{s.sentinel_workspace_id}/providers/Microsoft.Authorization/permissions"
                   f"?api-version={PERMISSIONS_API_VERSION}")
            try:
                listed = self._arm().request("GET", url, deadline=deadline).json().get("value") or []
            except ApiError as exc:
                return Check("sentinel.permissions", "failed", f"could not list permissions: {describe_error(exc)}",
                             "Assign the app's identity Microsoft Sentinel Responder on the workspace.")
            allowed = allowed_actions(listed, SENTINEL_ACTIONS)
            lacking = [a for a, ok in allowed.items() if not ok]
            found = ("the identity may read and write incidents and comments" if not lacking
                     else f"the identity lacks {', '.join(lacking)} on the workspace")
            if not lacking:
                return Check("sentinel.permissions", "ok", found)
            return Check("sentinel.permissions", "failed", found,
                         "Assign the app's managed identity the Microsoft Sentinel Responder role on the workspace "
                         "(the infra does: check that deployment), then wait a few minutes for RBAC to apply.",
                         {"missing": lacking})

        def mirror_rule(deadline: Deadline) -> Check:
            if "yes" not in workspace_ok:
                raise _Skip("the workspace did not answer (see sentinel.workspace)")
            rule = s.mirror_rule_id or ""
            url = (f"{s.arm_endpoint}{s.sentinel_workspace_id}/providers/Microsoft.SecurityInsights/alertRules/"
                   f"{quote(rule)}?api-version={ALERT_RULES_API_VERSION}")
            try:
                body = self._arm().request("GET", url, deadline=deadline).json()
            except ApiError as exc:
                if exc.status == 404:
                    return Check("sentinel.mirrorRule", "failed", f"mirror rule {rule} does not exist",
                                 "Deploy the infra with mirrorTarget defender-portal (it creates the rule) and set "
                                 "SYNC_MIRROR_RULE_ID to the deployed rule's name.")
                return Check("sentinel.mirrorRule", "failed", f"could not read mirror rule {rule}: "
                                                              f"{describe_error(exc)}",
                             "Assign the app's identity Microsoft Sentinel Responder on the workspace.")
            props = body.get("properties") or {}
            if props.get("enabled") is True:
                return Check("sentinel.mirrorRule", "ok", f"mirror rule {rule} ({body.get('kind')}) is enabled")
            return Check("sentinel.mirrorRule", "failed", f"mirror rule {rule} exists but is disabled",
                         "Enable the analytics rule (Microsoft Sentinel > Analytics, or redeploy the infra with "
                         "mirrorTarget defender-portal): while it is off no mirror incident is created.")

        def storage(deadline: Deadline) -> Check:
            return self._storage_check()

        steps: list[tuple[str, Callable[[Deadline], Check]]] = [
            ("ingestion.token", ingestion), ("sentinel.workspace", workspace), ("sentinel.permissions", permissions)]
        if s.mirror_target == "defender-portal":
            steps.append(("sentinel.mirrorRule", mirror_rule))
        steps.append(("storage", storage))
        return steps

    def _storage_check(self) -> Check:
        """List the tables, read one entity of each existing state table, and read the queue's properties."""
        from azure.data.tables import TableServiceClient
        from azure.storage.queue import QueueClient

        cfg = self.settings.storage
        timeout: dict[str, Any] = {"connection_timeout": self.check_seconds, "read_timeout": self.check_seconds,
                                   **transport_options(self.settings)}
        try:
            if cfg.connection_string is not None:
                tables = TableServiceClient.from_connection_string(cfg.connection_string, **timeout)
                queue = QueueClient.from_connection_string(cfg.connection_string, self.settings.queue_name,
                                                           **timeout)
            else:
                credential = self.ctx.credentials.storage()
                tables = TableServiceClient(endpoint=cfg.table_uri or "", credential=credential, **timeout)
                queue = QueueClient(cfg.queue_uri or "", self.settings.queue_name, credential=credential, **timeout)
            existing = {t.name for t in tables.list_tables()}
            for name in ALL_TABLES:
                if name in existing:
                    next(iter(tables.get_table_client(name).list_entities(results_per_page=1).by_page()), None)
            try:
                queue.get_queue_properties()
                queue_found = f"queue {self.settings.queue_name} answers"
            except ResourceNotFoundError:
                queue_found = f"queue {self.settings.queue_name} does not exist yet (created on first fan-out)"
        except Exception as exc:
            return Check("storage", "failed", f"the state storage did not answer: {describe_error(exc)}",
                         "Check AzureWebJobsStorage (or SYNC_STATE_STORAGE) and assign the app's identity Storage "
                         "Table Data Contributor and Storage Queue Data Contributor on the account.")
        absent = [t for t in ALL_TABLES if t not in existing]
        found = (f"tables answer ({len(ALL_TABLES) - len(absent)} of {len(ALL_TABLES)} exist"
                 + (f"; {', '.join(absent)} created on the first run" if absent else "") + f"); {queue_found}")
        return Check("storage", "ok", found)

    # -- plumbing ------------------------------------------------------------------------------------------------

    def _session(self, credential: TokenCredential, scope: str) -> BearerSession:
        # Two attempts, short backoff: a preflight reports, it does not wait out an outage.
        return BearerSession(credential, scope, policy=RetryPolicy(max_attempts=2, backoff_base=0.2,
                                                                   backoff_max=1.0, timeout=self.check_seconds),
                             session=new_session(self.settings))

    def _arm(self) -> BearerSession:
        return self._session(self.ctx.credentials.app(), self.settings.arm_scope)


class _Job:
    """One tenant's (or the shared part's) steps, run in order in a worker thread; the caller waits a bounded time
    per step and reads whatever finished, the step still running reported as timed out and the rest skipped."""

    def __init__(self, steps: list[tuple[str, Callable[[Deadline], Check]]]) -> None:
        self._steps = steps
        self._done: list[Check] = []
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._started_at = time.monotonic()

    def run(self, check_seconds: float, end: float) -> None:
        for name, step in self._steps:
            with self._lock:
                self._started_at = time.monotonic()
            try:
                result = step(Deadline(max(0.0, min(check_seconds, end - time.monotonic()))))
            except _Skip as skip:
                result = Check(name, "skipped", str(skip))
            except BudgetExhausted:
                result = _timed_out(name, check_seconds)
            except Exception as exc:  # a check that breaks is a failed check, never a failed answer
                result = Check(name, "failed", f"the check itself failed: {describe_error(exc)}")
            with self._progress:
                self._done.append(result)
                self._progress.notify_all()

    def wait(self, check_seconds: float, end: float) -> None:
        """Until every step finished, the running step has taken ``check_seconds``, or ``end`` came."""
        with self._progress:
            while len(self._done) < len(self._steps):
                left = min(self._started_at + check_seconds + 0.5, end) - time.monotonic()
                if left <= 0:
                    return
                self._progress.wait(left)

    def results(self) -> list[Check]:
        with self._lock:
            done = list(self._done)
        if len(done) < len(self._steps):
            name = self._steps[len(done)][0]
            done.append(_timed_out(name, time.monotonic() - self._started_at))
            done += [Check(n, "skipped", f"not run: {name} timed out") for n, _ in self._steps[len(done):]]
        return done


def _timed_out(name: str, seconds: float) -> Check:
    return Check(name, "failed", f"no answer within {seconds:.0f} s",
                 "The service is slow or unreachable from the app: check network rules and the endpoint settings, "
                 "then run the check again.")


def run_checks(ctx: AppContext, check_seconds: float = DEFAULT_CHECK_SECONDS) -> Report:
    """The preflight report for ``ctx``'s settings."""
    return Preflight(ctx, check_seconds).run()


def format_table(report: Report) -> str:
    """A readable table for a shell: one line per check, the fix indented under a failed one."""
    lines = [f"{'scope':<38} {'check':<22} {'status':<8} found"]
    groups: list[tuple[str, list[Check]]] = [("shared", report.shared)]
    groups += [(f"{t.name} ({t.mode})" if t.name != t.tenant_id else f"{t.tenant_id} ({t.mode})", checks)
               for t, checks in report.tenants]
    for scope, checks in groups:
        for c in checks:
            lines.append(f"{scope[:38]:<38} {c.name:<22} {c.status.upper():<8} {c.found}")
            if c.fix and c.status == "failed":
                lines.append(f"{'':<38} {'':<22} {'fix:':<8} {c.fix}")
    lines.append("")
    lines.append("ALL CHECKS PASSED" if report.ok else "SOME CHECKS FAILED: apply the fixes above and run again")
    return "\n".join(lines)
