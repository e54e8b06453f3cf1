"""Telemetry: OpenTelemetry traces, metrics and logs, sent to Application Insights when configured.

:func:`configure_telemetry` (called once when ``function_app.py`` is imported) sets up ``azure-monitor-opentelemetry``
when ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is set; otherwise the OpenTelemetry API's no-op providers stay in
place and everything below costs next to nothing. The engine reports through a small API:

- spans: :func:`cycle_span`, :func:`tenant_span`, :func:`incident_span`, :func:`webhook_span` (context managers),
  and the decorators :func:`traced_cycle` (``runner.run_cycle``: a cycle span, one tenant span per tenant cycle
  (round robin, so each tenant's span is made current only while its own steps run), and :func:`record_cycle` at
  the end), :func:`traced_incident_sync` (``IncidentSyncer.sync``) and :func:`traced_webhook` (the webhook handler);
- metrics: :func:`record_cycle` (per tenant and cycle) and :func:`record_webhook`.

What is emitted (metric and span attributes carry only IDs, counts and names of actions/outcomes; never incident
content, never a secret):

=====================  ===========  ==========================================================================
``sync.cycles``        counter      tenant cycles; ``tenantId``, ``direction``, ``outcome``
``sync.incidents``     counter      incidents stored (pull) or synced (reconcile); ``tenantId``, ``direction``
``sync.alerts``        counter      alert rows stored; ``tenantId``, ``direction``
``sync.rows``          counter      rows stored per table (pull); ``tenantId``, ``direction``, ``table``
``sync.writes``        counter      incidents written per side; ``side`` = defender | sentinel, ``tenantId``,
                                    ``direction`` (pull, reconcile, webhook)
``sync.throttled``     counter      HTTP 429 answers from Graph; ``tenantId``, ``direction``
``sync.dead_letters``  counter      incidents dead-lettered; ``tenantId``, ``direction``
``sync.pages``         counter      Graph pages read; ``tenantId``, ``direction``
``sync.lag_seconds``   gauge        seconds the tenant's cursor is behind Defender (now - cursor) after a pull;
                                    ``tenantId``, ``direction``
``sync.webhook``       counter      webhook calls by ``result`` (applied, unchanged, ignored, stale, created or
                                    the error code); ``tenantId`` when known
=====================  ===========  ==========================================================================

Spans: ``sync.cycle`` (direction, tenants, budgetExhausted, outcome) > ``sync.tenant`` (tenantId, direction,
outcome, the summary counts, lagSeconds) > ``sync.incident`` (tenantId, incidentId, trigger, result);
``sync.webhook`` (result, tenantId, incidentId) > ``sync.incident``. A failure sets the span status to ERROR and
``error.type`` to the exception's class name: exception messages and stack traces are never recorded on spans.

Secrets: the app's own attributes are built from IDs and counts only. As defence in depth, when Application Insights
is configured every span (attributes, event attributes, status description) and every log record (attributes and
body) passes :class:`RedactingSpanProcessor` / :class:`RedactingLogRecordProcessor` before any exporter: values under
sensitive keys (authorization, token, secret, sig, key, password, cookie, ...) are replaced, and bearer tokens, JWTs,
SAS signatures, account keys, private keys and the app's own secret values are masked wherever they appear. Only
the ``requests`` and Azure SDK HTTP instrumentations are enabled (they record the method, host and the URL with
``sig`` redacted, never headers or bodies unless ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*`` asks for them, and
then the redaction masks them); logs are taken from the ``sync`` logger only, so ``azure.core``'s HTTP logging
never reaches Application Insights.
"""

from __future__ import annotations

import base64
import functools
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any, TypeVar, cast

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk._logs import LogRecordProcessor, ReadWriteLogRecord
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.trace import Span, Status, StatusCode

from .budget import BudgetExhausted
from .models import CycleSummary, TenantSummary
from .settings import telemetry_connection_string
from .timeutil import parse_time, utcnow

log = logging.getLogger(__name__)

SCOPE = "sync"
LOGGER_NAME = "sync"
TABLES = (("DefenderIncidents_CL", "incidents"), ("DefenderAlerts_CL", "alerts"), ("DefenderEvidence_CL", "evidence"))
# The HTTP-client instrumentations the app needs (Graph/ARM through requests; Tables, Queues and Logs Ingestion
# through the Azure SDK); the rest of the distro's defaults are off: urllib/urllib3 would only duplicate the
# requests spans, and the app serves no Django/Flask/FastAPI/psycopg2/httpx traffic.
INSTRUMENTATION_OPTIONS: dict[str, dict[str, bool]] = {
    "azure_sdk": {"enabled": True}, "requests": {"enabled": True},
    "urllib": {"enabled": False}, "urllib3": {"enabled": False}, "httpx": {"enabled": False},
    "httpx2": {"enabled": False}, "django": {"enabled": False}, "flask": {"enabled": False},
    "fastapi": {"enabled": False}, "psycopg2": {"enabled": False},
}

tracer = trace.get_tracer(SCOPE)
meter = metrics.get_meter(SCOPE)

_configured = False
_configure_lock = threading.Lock()
_F = TypeVar("_F", bound=Callable[..., Any])


# ------------------------------------------------------------------------------------------------------- redaction

REDACTED = "[REDACTED]"
_SENSITIVE_WORDS = frozenset({"token", "tokens", "sig", "signature", "key", "keys", "sas", "auth", "pwd", "passwd",
                              "bearer", "jwt", "secret", "secrets", "password", "credential", "credentials", "cookie",
                              "cookies", "assertion", "authorization", "authentication"})
_SENSITIVE_FRAGMENTS = ("authorization", "authentication", "secret", "password", "credential", "cookie", "assertion",
                        "connectionstring", "accountkey", "accesskey", "sharedaccess", "apikey", "accesstoken",
                        "refreshtoken", "idtoken", "sastoken", "identityheader", "privatekey")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S), REDACTED),
    (re.compile(r"(?i)\b(bearer|sharedkey|sharedaccesssignature)(\s+)[^\s,;\"']+"), rf"\1\2{REDACTED}"),
    (re.compile(r"eyJ[A-Za-z0-9_\-]{2,}(?:\.[A-Za-z0-9_\-]*){0,2}"), REDACTED),
    (re.compile(r"(?i)(?:(?<=[?&;\s\"'])|^)((?:sig|signature|client_secret|client_assertion|assertion|access_token|"
                r"refresh_token|id_token|api[-_]?key|key|token|password|pwd|secret|accountkey|sharedaccesskey|"
                r"sharedaccesssignature|x-identity-header)=)[^&;#\s\"']*"), rf"\1{REDACTED}"),
)


def sensitive_key(key: str) -> bool:
    """Whether an attribute or header named ``key`` holds a credential (authorization, token, secret, sig, ...)."""
    lowered = _CAMEL.sub("_", key).lower()
    if any(word in _SENSITIVE_WORDS for word in _NON_ALNUM.split(lowered)):
        return True
    compact = _NON_ALNUM.sub("", lowered)
    return any(fragment in compact for fragment in _SENSITIVE_FRAGMENTS)


class Redactor:
    """Masks credentials in telemetry values: by key, by pattern, and the app's own secret values verbatim."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: tuple[str, ...] = ()
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Also mask these exact values (short ones are ignored: they would mask ordinary words)."""
        known = set(self._secrets) | {s for s in secrets if isinstance(s, str) and len(s) >= 8}
        self._secrets = tuple(sorted(known, key=len, reverse=True))

    def text(self, value: str) -> str:
        """``value`` with credentials masked (the same object when there was nothing to mask)."""
        original = value
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        for pattern, replacement in _VALUE_PATTERNS:
            value = pattern.sub(replacement, value)
        return original if value == original else value

    def value(self, key: str, value: Any) -> Any:
        """The value to keep for attribute ``key``."""
        if sensitive_key(key):
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes | bytearray):
            return REDACTED
        if isinstance(value, Sequence) and any(isinstance(v, str) for v in value):
            items = [self.text(v) if isinstance(v, str) else v for v in value]
            return value if items == list(value) else tuple(items)
        return value

    def attributes(self, attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The redacted attributes, or None when nothing needed masking (the common case: no copy)."""
        if not attributes:
            return None
        changed = False
        result: dict[str, Any] = {}
        for key, value in attributes.items():
            new = self.value(key, value)
            if new is not value:
                changed = True
            result[key] = new
        return result if changed else None


redactor = Redactor()


class RedactingSpanProcessor(SpanProcessor):
    """Masks credentials in every ended span before the processors registered after it (the exporters) see it."""

    def __init__(self, redaction: Redactor | None = None) -> None:
        self.redaction = redaction or redactor

    def on_end(self, span: ReadableSpan) -> None:
        # The SDK hands one ReadableSpan to each processor in turn, so replacing its (already frozen) attribute
        # mapping here is what the exporters registered after this processor receive.
        try:
            attributes = self.redaction.attributes(span.attributes)
            if attributes is not None:
                span._attributes = attributes
            events = list(span.events)
            changed = False
            for i, event in enumerate(events):
                redacted = self.redaction.attributes(event.attributes)
                if redacted is not None:
                    events[i] = Event(event.name, redacted, event.timestamp)
                    changed = True
            if changed:
                span._events = tuple(events)
            description = span.status.description
            if description and self.redaction.text(description) != description:
                span._status = Status(span.status.status_code, self.redaction.text(description))
        except Exception:  # telemetry must never break the app
            log.debug("span redaction failed", exc_info=True)


class RedactingLogRecordProcessor(LogRecordProcessor):
    """Masks credentials in every log record's attributes and body before the exporters see it."""

    def __init__(self, redaction: Redactor | None = None) -> None:
        self.redaction = redaction or redactor

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        try:
            record = log_record.log_record
            attributes = self.redaction.attributes(record.attributes)
            if attributes is not None:
                record.attributes = attributes
            if isinstance(record.body, str):
                record.body = self.redaction.text(record.body)
        except Exception:  # telemetry must never break the app
            log.debug("log redaction failed", exc_info=True)

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# ------------------------------------------------------------------------------------------------------- setup


def configure_telemetry() -> bool:
    """Route the ``sync`` logs, traces and metrics to Application Insights once per process; False when
    ``APPLICATIONINSIGHTS_CONNECTION_STRING`` is not set (then the no-op providers stay)."""
    global _configured
    with _configure_lock:
        if _configured:
            return True
        connection = telemetry_connection_string()
        if not connection:
            return False
        try:
            from azure.monitor.opentelemetry import configure_azure_monitor
        except ImportError:
            log.warning("APPLICATIONINSIGHTS_CONNECTION_STRING is set but azure-monitor-opentelemetry is not installed")
            return False
        redactor.add_secrets(_settings_secrets())
        try:
            # Entra ID ingestion: the exporter reads APPLICATIONINSIGHTS_AUTHENTICATION_STRING itself.
            configure_azure_monitor(
                connection_string=connection,
                logger_name=LOGGER_NAME,
                instrumentation_options=INSTRUMENTATION_OPTIONS,
                span_processors=[RedactingSpanProcessor()],
                log_record_processors=[RedactingLogRecordProcessor()],
            )
        except Exception as exc:  # a broken telemetry setup must not take the app down
            log.error("Application Insights telemetry could not be configured (%s); the app runs without it",
                      type(exc).__name__)
            return False
        app_logger = logging.getLogger(LOGGER_NAME)
        if app_logger.level == logging.NOTSET and app_logger.getEffectiveLevel() > logging.INFO:
            app_logger.setLevel(logging.INFO)  # the per-cycle traces (and the lag alert's fallback) are INFO
        _configured = True
        return True


def is_configured() -> bool:
    """Whether :func:`configure_telemetry` set up Application Insights in this process."""
    return _configured


def _settings_secrets() -> list[str]:
    """The credential values in the app settings, masked verbatim wherever they might appear."""
    try:
        from .settings import load_settings

        settings = load_settings()
    except Exception:  # invalid settings are reported by the first function call, not here
        return []
    values: list[str] = []
    if settings.defender_client_secret:
        values.append(settings.defender_client_secret)
    if settings.defender_client_certificate:
        values.append(base64.b64encode(settings.defender_client_certificate).decode("ascii"))
    connection = settings.storage.connection_string
    if connection:
        for part in connection.split(";"):
            name, _, value = part.partition("=")
            if name.strip().lower() in ("accountkey", "sharedaccesssignature") and value:
                values.append(value.strip())
    return values


# ------------------------------------------------------------------------------------------------------- metrics

_cycles = meter.create_counter("sync.cycles", unit="{cycle}", description="Tenant cycles by outcome")
_incidents = meter.create_counter("sync.incidents", unit="{incident}",
                                  description="Incidents stored (pull) or synced (reconcile)")
_alerts = meter.create_counter("sync.alerts", unit="{alert}", description="Alert rows stored")
_rows = meter.create_counter("sync.rows", unit="{row}", description="Rows stored in Log Analytics, per table")
_writes = meter.create_counter("sync.writes", unit="{incident}", description="Incidents written, per side")
_throttled = meter.create_counter("sync.throttled", unit="{response}", description="HTTP 429 answers from Graph")
_dead_letters = meter.create_counter("sync.dead_letters", unit="{incident}", description="Incidents dead-lettered")
_pages = meter.create_counter("sync.pages", unit="{page}", description="Graph incident pages read")
_webhooks = meter.create_counter("sync.webhook", unit="{call}", description="Webhook calls by result")

_lag_lock = threading.Lock()
_lag_pending: dict[str, datetime] = {}


def _observe_lag(options: CallbackOptions) -> Iterable[Observation]:
    """Each tenant's lag once per pull: a tenant whose pulls stop reporting goes quiet (the alert ages the last
    report), and an instance that pulled a tenant long ago never repeats its stale view."""
    with _lag_lock:
        pending = dict(_lag_pending)
        _lag_pending.clear()
    now = utcnow()
    return [Observation(round(max(0.0, (now - cursor).total_seconds()), 3), {"tenantId": tenant, "direction": "pull"})
            for tenant, cursor in pending.items()]


_lag = meter.create_observable_gauge("sync.lag_seconds", callbacks=[_observe_lag], unit="s",
                                     description="Seconds the tenant's cursor is behind Defender XDR")


def lag_seconds(tenant: TenantSummary, now: datetime | None = None) -> float | None:
    """Seconds between now and the tenant's cursor after the cycle, or None without a cursor."""
    cursor = _cursor(tenant)
    if cursor is None:
        return None
    return max(0.0, ((now or utcnow()) - cursor).total_seconds())


def _cursor(tenant: TenantSummary) -> datetime | None:
    if not tenant.cursor_after:
        return None
    try:
        return parse_time(tenant.cursor_after)
    except ValueError:
        return None


def record_cycle(summary: CycleSummary) -> None:
    """The per-tenant metrics of one cycle (see the module docstring)."""
    direction = summary.direction
    for tenant in summary.tenants:
        try:
            _record_tenant(direction, tenant)
        except Exception:  # telemetry must never break the app
            log.debug("recording cycle metrics failed", exc_info=True)


def _record_tenant(direction: str, tenant: TenantSummary) -> None:
    attributes = {"tenantId": tenant.tenant_id, "direction": direction}
    _cycles.add(1, {**attributes, "outcome": tenant.outcome})
    _incidents.add(tenant.incidents, attributes)
    _alerts.add(tenant.alerts, attributes)
    if direction == "pull":
        for table, field_name in TABLES:
            _rows.add(int(getattr(tenant, field_name)), {**attributes, "table": table})
    _writes.add(tenant.pushed, {**attributes, "side": "defender"})
    _writes.add(tenant.mirrored, {**attributes, "side": "sentinel"})
    _throttled.add(tenant.throttled, attributes)
    _dead_letters.add(tenant.dead_lettered, attributes)
    _pages.add(tenant.pages, attributes)
    cursor = _cursor(tenant) if direction == "pull" else None
    if cursor is not None:
        with _lag_lock:
            _lag_pending[tenant.tenant_id] = cursor


_RESULT = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")


def record_webhook(result: str, *, tenant_id: str | None = None, wrote_defender: bool = False,
                   wrote_sentinel: bool = False) -> None:
    """One webhook call: ``sync.webhook`` by result, and the incident writes it made."""
    result = result if _RESULT.match(result or "") else "other"
    attributes = {"result": result}
    if tenant_id:
        attributes["tenantId"] = tenant_id
    _webhooks.add(1, attributes)
    if tenant_id:
        base = {"tenantId": tenant_id, "direction": "webhook"}
        if wrote_defender:
            _writes.add(1, {**base, "side": "defender"})
        if wrote_sentinel:
            _writes.add(1, {**base, "side": "sentinel"})


# ------------------------------------------------------------------------------------------------------- spans


def _fail(span: Span, exc: BaseException) -> None:
    span.set_attribute("error.type", type(exc).__name__)
    if not isinstance(exc, BudgetExhausted):
        span.set_status(Status(StatusCode.ERROR))


@contextmanager
def _span(name: str, attributes: Mapping[str, Any]) -> Iterator[Span]:
    # Exceptions are not recorded (their messages and stack traces are free text); the class name is.
    with tracer.start_as_current_span(name, attributes=dict(attributes), record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:
            _fail(span, exc)
            raise


def cycle_span(direction: str) -> AbstractContextManager[Span]:
    """A whole run over the tenants (``sync.cycle``)."""
    return _span("sync.cycle", {"direction": direction})


def tenant_span(tenant_id: str, direction: str) -> AbstractContextManager[Span]:
    """One tenant's cycle (``sync.tenant``), for code that runs it in one block."""
    return _span("sync.tenant", {"tenantId": tenant_id, "direction": direction})


def incident_span(tenant_id: str, incident_id: str, trigger: str) -> AbstractContextManager[Span]:
    """One incident's two-way sync (``sync.incident``); set ``result`` on it when known."""
    return _span("sync.incident", {"tenantId": tenant_id, "incidentId": incident_id, "trigger": trigger})


def webhook_span() -> AbstractContextManager[Span]:
    """One webhook call (``sync.webhook``)."""
    return _span("sync.webhook", {"action": "webhook"})


def _tenant_attributes(direction: str, summary: TenantSummary) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "outcome": summary.outcome, "incidents": summary.incidents, "alerts": summary.alerts,
        "evidence": summary.evidence, "pages": summary.pages, "throttled": summary.throttled,
        "deadLettered": summary.dead_lettered, "mirrored": summary.mirrored, "pushed": summary.pushed,
        "skipped": summary.skipped, "filtered": summary.filtered, "requests": summary.requests,
    }
    lag = lag_seconds(summary) if direction == "pull" else None
    if lag is not None:
        attributes["lagSeconds"] = round(lag, 1)
    return attributes


class TracedTenantCycle:
    """Wraps a tenant cycle (``TenantPull``/``ReconcileCycle``) in a ``sync.tenant`` span that is current only while
    that tenant's own start/step/finish run: the runner interleaves tenants, so the spans cannot nest as blocks."""

    def __init__(self, inner: Any, tenant_id: str, direction: str) -> None:
        self._inner = inner
        self._direction = direction
        self._span = tracer.start_span("sync.tenant", attributes={"tenantId": tenant_id, "direction": direction})
        self._ended = False

    @property
    def summary(self) -> TenantSummary:
        return cast(TenantSummary, self._inner.summary)

    @summary.setter
    def summary(self, value: TenantSummary) -> None:
        self._inner.summary = value

    def __getattr__(self, name: str) -> Any:  # anything else the runner may read from the cycle
        return getattr(self._inner, name)

    @contextmanager
    def _current(self) -> Iterator[None]:
        with trace.use_span(self._span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

    def start(self) -> bool:
        try:
            with self._current():
                started = bool(self._inner.start())
        except BaseException as exc:
            _fail(self._span, exc)
            self._end(None)
            raise
        if not started:  # the runner never calls finish for a tenant that did not start (lease held elsewhere)
            self._end(self.summary)
        return started

    def step(self) -> bool:
        try:
            with self._current():
                return bool(self._inner.step())
        except BaseException as exc:
            self._span.set_attribute("error.type", type(exc).__name__)
            raise

    def finish(self, outcome: str | None = None, error: str | None = None) -> TenantSummary:
        try:
            with self._current():
                result = cast(TenantSummary, self._inner.finish(outcome, error))
        except BaseException as exc:
            _fail(self._span, exc)
            self._end(self.summary)
            raise
        self._end(result)
        return result

    def _end(self, summary: TenantSummary | None) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            if summary is not None:
                self._span.set_attributes(_tenant_attributes(self._direction, summary))
                if summary.outcome == "error":
                    self._span.set_status(Status(StatusCode.ERROR))
        finally:
            self._span.end()


def traced_factory(factory: Callable[..., Any], direction: str) -> Callable[..., Any]:
    """A cycle factory ``(ctx, tenant, deadline, since) -> cycle`` whose cycles run inside ``sync.tenant`` spans."""

    @functools.wraps(factory)
    def build(ctx: Any, tenant: Any, *args: Any, **kwargs: Any) -> Any:
        return TracedTenantCycle(factory(ctx, tenant, *args, **kwargs), str(tenant.tenant_id), direction)

    return build


def traced_cycle(run: _F) -> _F:
    """Decorates ``run_cycle(ctx, direction, tenants, deadline, factory, ...)``: a ``sync.cycle`` span, a
    ``sync.tenant`` span per tenant cycle, and :func:`record_cycle` with the summary it returns."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return run(*args, **kwargs)
        direction = str(bound.arguments.get("direction", ""))
        if "factory" in bound.arguments:
            bound.arguments["factory"] = traced_factory(bound.arguments["factory"], direction)
        with cycle_span(direction) as span:
            summary = run(*bound.args, **bound.kwargs)
            if isinstance(summary, CycleSummary):
                span.set_attributes({
                    "tenants": len(summary.tenants), "budgetExhausted": summary.budget_exhausted,
                    "outcome": "budget-exhausted" if summary.budget_exhausted else "complete",
                    "tenantErrors": sum(1 for t in summary.tenants if t.outcome == "error"),
                })
                record_cycle(summary)
            return summary

    return cast(_F, wrapper)


def traced_incident_sync(sync: _F) -> _F:
    """Decorates ``IncidentSyncer.sync(self, tenant, incident_id, *, trigger, ...)`` with a ``sync.incident`` span
    carrying tenantId, incidentId, trigger and the outcome's ``result``."""

    @functools.wraps(sync)
    def wrapper(self: Any, tenant: Any, incident_id: Any, *args: Any, **kwargs: Any) -> Any:
        tenant_id = str(getattr(tenant, "tenant_id", ""))
        with incident_span(tenant_id, str(incident_id), str(kwargs.get("trigger", ""))) as span:
            try:
                outcome = sync(self, tenant, incident_id, *args, **kwargs)
            except BaseException:
                span.set_attribute("result", "error")
                raise
            result = getattr(outcome, "result", None)
            if isinstance(result, str):
                span.set_attribute("result", result)
            return outcome

    return cast(_F, wrapper)


def traced_webhook(handler: _F) -> _F:
    """Decorates the webhook handler ``(req) -> HttpResponse``: a ``sync.webhook`` span and :func:`record_webhook`,
    both from the handler's JSON answer (``result`` on 200, ``error.code`` otherwise)."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with webhook_span() as span:
            try:
                response = handler(*args, **kwargs)
            except BaseException:
                span.set_attribute("result", "exception")
                record_webhook("exception")
                raise
            try:
                answer = _webhook_answer(response)
                span.set_attributes({k: v for k, v in answer.items()
                                     if k in ("result", "tenantId", "incidentId", "http.response.status_code")})
                record_webhook(str(answer["result"]), tenant_id=answer.get("tenantId"),
                               wrote_defender=bool(answer.get("wroteDefender")),
                               wrote_sentinel=bool(answer.get("wroteSentinel")))
            except Exception:  # telemetry must never break the app
                log.debug("recording the webhook failed", exc_info=True)
            return response

    return cast(_F, wrapper)


def _webhook_answer(response: Any) -> dict[str, Any]:
    """Result, IDs and writes from the webhook's JSON answer; only short tokens and IDs are kept."""
    import json

    status = int(getattr(response, "status_code", 0) or 0)
    answer: dict[str, Any] = {"http.response.status_code": status, "result": f"http-{status}"}
    try:
        body = json.loads(response.get_body() or b"{}")
    except (ValueError, AttributeError):
        return answer
    if not isinstance(body, dict):
        return answer
    if status == 200:
        result = body.get("result")
        raw_changes, raw_comments = body.get("changes"), body.get("comments")
        changes: dict[str, Any] = raw_changes if isinstance(raw_changes, dict) else {}
        comments: dict[str, Any] = raw_comments if isinstance(raw_comments, dict) else {}
        answer["wroteDefender"] = bool(changes.get("defender")) or bool(comments.get("toDefender"))
        answer["wroteSentinel"] = bool(changes.get("sentinel")) or bool(comments.get("toSentinel"))
        for key in ("tenantId", "incidentId"):
            value = body.get(key)
            if isinstance(value, str) and _ID.match(value):
                answer[key] = value
    else:
        error = body.get("error")
        result = error.get("code") if isinstance(error, dict) else None
    if isinstance(result, str) and _RESULT.match(result):
        answer["result"] = result
    return answer


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

__all__ = [
    "INSTRUMENTATION_OPTIONS", "REDACTED", "RedactingLogRecordProcessor", "RedactingSpanProcessor", "Redactor",
    "TracedTenantCycle", "configure_telemetry", "cycle_span", "incident_span", "is_configured", "lag_seconds", "meter",
    "record_cycle", "record_webhook", "redactor", "sensitive_key", "tenant_span", "traced_cycle",
    "traced_factory", "traced_incident_sync", "traced_webhook", "tracer", "webhook_span",
]
