"""Wiring: builds the clients once per process from the settings and hands them to the engine.

Clients hold token caches, HTTP connection pools and per-tenant rate limiters, so they live as long as the worker
process; a change of settings (tests, or a restarted host) builds a new context.
"""

from __future__ import annotations

import threading
import uuid

from .credentials import CredentialProvider
from .graph import GraphSecurityClient
from .http import BearerSession, RateLimiter
from .logs_sink import LogsSink
from .sentinel import SentinelClient
from .settings import Settings, load_settings, settings_fingerprint
from .shared_budget import SharedRateBudget
from .state import LEASES, StateStore


class AppContext:
    """Everything a cycle needs, built lazily from one :class:`Settings`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.credentials = CredentialProvider(settings)
        self.instance_id = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._state: StateStore | None = None
        self._sink: LogsSink | None = None
        self._sentinel: SentinelClient | None = None
        self._graph: dict[str, GraphSecurityClient] = {}
        self._graph_limiters: dict[str, RateLimiter] = {}

    @property
    def state(self) -> StateStore:
        with self._lock:
            if self._state is None:
                store = StateStore.from_config(self.settings.storage, self.credentials.storage())
                store.ensure_tables()
                self._state = store
            return self._state

    @property
    def sink(self) -> LogsSink:
        with self._lock:
            if self._sink is None:
                s = self.settings
                self._sink = LogsSink(s.logs_ingestion_endpoint, s.logs_dcr_immutable_id, self.credentials.app(),
                                      scope=s.logs_ingestion_scope)
            return self._sink

    @property
    def sentinel(self) -> SentinelClient:
        ledger = self.state.table(LEASES)  # outside the lock: ``state`` takes it too
        with self._lock:
            if self._sentinel is None:
                s = self.settings
                session = BearerSession(self.credentials.app(), s.arm_scope)
                # One cap for the whole app, not per process: a queue fan-out runs many processes.
                writes = SharedRateBudget(ledger, "sentinel-writes", s.sentinel_max_writes_per_minute,
                                          block=max(1, s.sentinel_max_writes_per_minute // 60))
                self._sentinel = SentinelClient(session, s.arm_endpoint, s.sentinel_workspace_id,
                                                write_limiter=writes)
            return self._sentinel

    def graph(self, tenant_id: str) -> GraphSecurityClient:
        """The Graph client of one tenant: its own credential, token and request-rate cap."""
        with self._lock:
            client = self._graph.get(tenant_id)
            if client is None:
                s = self.settings
                limiter = RateLimiter(s.graph_max_requests_per_minute)
                session = BearerSession(self.credentials.graph(tenant_id), s.graph_scope, limiter=limiter)
                client = GraphSecurityClient(session, s.graph_endpoint, page_size=s.graph_page_size)
                self._graph[tenant_id] = client
            return client


_context: AppContext | None = None
_fingerprint: str | None = None
_context_lock = threading.Lock()


def get_context() -> AppContext:
    """The process-wide context; rebuilt when the app settings change. Raises SettingsError on bad settings."""
    global _context, _fingerprint
    fingerprint = settings_fingerprint()
    with _context_lock:
        if _context is None or fingerprint != _fingerprint:
            _context = AppContext(load_settings())
            _fingerprint = fingerprint
        return _context
