"""Shared HTTP plumbing for the Graph and Sentinel clients: retries, Retry-After, rate caps.

Graph and ARM both answer throttling with 429 (sometimes 503) and a ``Retry-After`` header in seconds; other
transient failures (5xx, dropped connections, timeouts) get exponential backoff with full jitter. Every wait is
bounded by the run's :class:`~sync.budget.Deadline`, so a long ``Retry-After`` ends the run cleanly instead of
overrunning ``functionTimeout``.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from azure.core.credentials import TokenCredential

from .budget import BudgetExhausted, Deadline
from .settings import Settings

log = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
THROTTLE_STATUS = frozenset({429, 503})


class ApiError(Exception):
    """A non-transient HTTP error (or a transient one that outlived its retries)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in TRANSIENT_STATUS


class RateLimiter:
    """Sliding-window cap: at most ``per_minute`` acquisitions in any 60-second window."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        self._stamps: deque[float] = deque()
        self._lock = threading.Lock()

    def acquire(self, deadline: Deadline | None = None) -> None:
        """Block until a slot is free; raise :class:`BudgetExhausted` if that would pass ``deadline``."""
        while True:
            with self._lock:
                now = self._clock()
                while self._stamps and now - self._stamps[0] >= 60.0:
                    self._stamps.popleft()
                if len(self._stamps) < self.per_minute:
                    self._stamps.append(now)
                    return
                wait = 60.0 - (now - self._stamps[0])
            if deadline is not None and deadline.remaining() < wait:
                raise BudgetExhausted("rate cap wait exceeds the remaining budget")
            self._sleep(wait)


@dataclass
class RetryPolicy:
    """How hard to retry. ``max_attempts`` counts the first try."""

    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    timeout: float = 60.0


@dataclass
class CallStats:
    """Counters a client exposes so cycles can report requests and throttles."""

    requests: int = 0
    throttled: int = 0
    retries: int = 0
    writes: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_message(response: requests.Response) -> tuple[str | None, str]:
    """(code, message) from an OData/ARM error body, without echoing request headers or tokens."""
    try:
        body = response.json()
    except ValueError:
        return None, (response.text or "")[:300]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return (str(err.get("code")) if err.get("code") else None), str(err.get("message", ""))[:500]
    return None, str(body)[:300]


def new_session(settings: Settings) -> requests.Session:
    """A ``requests`` session that trusts ``settings.ca_bundle`` and, unless a proxy is configured, does not re-read
    the environment on every request (``trust_env``: a walk of every environment variable for proxies and
    NO_PROXY plus a ~/.netrc look-up, about 0.1 ms a call; the settings read what matters once)."""
    session = requests.Session()
    session.trust_env = settings.env_proxies
    if settings.ca_bundle is not None:
        session.verify = settings.ca_bundle
    return session


def transport_options(settings: Settings) -> dict[str, Any]:
    """azure-core client options with the same TLS trust and environment handling as :func:`new_session`
    (azure-core's transport honours ``REQUESTS_CA_BUNDLE`` only while it reads the environment per request)."""
    options: dict[str, Any] = {"use_env_settings": settings.env_proxies}
    if settings.ca_bundle is not None:
        options["connection_verify"] = settings.ca_bundle
    return options


class BearerSession:
    """A requests session that adds a bearer token for one scope and retries transient failures.

    One instance serves one (credential, scope) pair: a Graph session is per tenant, so a token for one tenant
    is never sent to another.
    """

    def __init__(self, credential: TokenCredential, scope: str, *, limiter: RateLimiter | None = None,
                 policy: RetryPolicy | None = None, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, user_agent: str = "defender-sentinel-sync/0.1") -> None:
        self._credential = credential
        self._scope = scope
        self._limiter = limiter
        self.policy = policy or RetryPolicy()
        self._session = session or requests.Session()
        self._sleep = sleep
        self._user_agent = user_agent
        self.stats = CallStats()

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        token = self._credential.get_token(self._scope).token
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json", "User-Agent": self._user_agent}
        if extra:
            headers.update(extra)
        return headers

    def token_claims(self) -> dict[str, Any]:
        """The claims of this session's access token, unverified ({} when it is not a JWT): for facts about our own
        identity, such as the tenant it lives in (``tid``), never for trusting a caller."""
        token = self._credential.get_token(self._scope).token
        parts = token.split(".")
        if len(parts) != 3:
            return {}
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except (ValueError, UnicodeError):
            return {}
        return claims if isinstance(claims, dict) else {}

    def _backoff(self, attempt: int) -> float:
        cap = min(self.policy.backoff_max, self.policy.backoff_base * (2 ** attempt))
        return random.uniform(0, cap)  # noqa: S311 - jitter, not security

    def request(self, method: str, url: str, *, deadline: Deadline | None = None, json: Any = None,
                headers: Mapping[str, str] | None = None, ok: frozenset[int] = frozenset({200, 201, 204}),
                attempts: int | None = None,
                idempotent: bool = True) -> requests.Response:
        """Send a request, retrying transient failures; return the response whose status is in ``ok``.

        A status outside ``ok`` that is not transient raises :class:`ApiError` at once (404, 400, 409 ...), so
        callers can map it. A wait longer than the remaining budget raises :class:`BudgetExhausted`.
        ``attempts`` overrides ``policy.max_attempts`` for this call (a caller with its own fallback, such as a
        smaller Graph page, need not sit through the full retry ladder again). ``idempotent=False`` (a POST that
        appends, such as a Graph comment): only a throttling answer (429/503, the request was not processed) is
        retried; a dropped connection or another 5xx may have been applied, so it is raised for the caller, which
        re-reads before trying again.
        """
        deadline = deadline or Deadline.unlimited()
        last_error: ApiError | None = None
        max_attempts = max(1, attempts if attempts is not None else self.policy.max_attempts)
        for attempt in range(max_attempts):
            deadline.check()
            if self._limiter is not None:
                self._limiter.acquire(deadline)
            self.stats.requests += 1
            if method.upper() != "GET":
                self.stats.writes += 1
            wait: float
            try:
                response = self._session.request(
                    method, url, json=json, headers=self._headers(headers),
                    timeout=min(self.policy.timeout, max(1.0, deadline.remaining())))
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                # ChunkedEncodingError: the connection dropped mid-body; as transient as a refused connection.
                last_error = ApiError(f"{method} {_safe_url(url)} failed: {type(exc).__name__}")
                if not idempotent:
                    raise last_error from exc
                wait = self._backoff(attempt)
            else:
                if response.status_code in ok:
                    return response
                code, message = error_message(response)
                last_error = ApiError(f"{method} {_safe_url(url)} returned {response.status_code}: {message}",
                                      response.status_code, code)
                if response.status_code not in TRANSIENT_STATUS or (
                        not idempotent and response.status_code not in THROTTLE_STATUS):
                    raise last_error
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if response.status_code in THROTTLE_STATUS:
                    self.stats.throttled += 1
                wait = retry_after if retry_after is not None else self._backoff(attempt)
            if attempt + 1 >= max_attempts:
                break
            if wait >= deadline.remaining():
                raise BudgetExhausted(f"retry wait of {wait:.1f}s exceeds the remaining budget") from last_error
            self.stats.retries += 1
            log.info("retrying request", extra={"action": "retry", "url": _safe_url(url),
                                                  "status": last_error.status, "waitSeconds": round(wait, 2)})
            self._sleep(wait)
        assert last_error is not None
        raise last_error


def describe_error(exc: BaseException) -> str:
    """A short, secret-free description of a failure for summaries and status."""
    if isinstance(exc, ApiError):
        return str(exc)[:500]
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{name}: {text}"[:500]


def _safe_url(url: str) -> str:
    """The URL without its query string (which can be long and carries nothing secret, but is noisy)."""
    return url.split("?", 1)[0]


