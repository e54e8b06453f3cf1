"""Wiring: builds the clients once per process from the settings and hands them to the engine.

Clients hold token caches, HTTP connection pools and per-tenant rate limiters, so they live as long as the worker
process; a change of settings (tests, or a restarted host) builds a new context.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .credentials import CredentialProvider
from .graph import GraphSecurityClient
from .http import BearerSession, RateLimiter, new_session, transport_options
from .logs_sink import LogsSink
from .sentinel import SentinelClient
from .settings import Settings, load_settings, settings_fingerprint
from .shared_budget import SharedRateBudget
from .state import LEASES, StateStore
from .targets import MirrorTarget
from .targets.sentinel_api import SentinelTarget
from .timeutil import utcnow

MIRROR_REQUESTS_STREAM = "Custom-DefenderMirrorRequests"
# From a request unit's grant to the rows' hand-over (intents stored, one upload): each grant counts 60 s plus this.
REQUEST_HANDOVER_SECONDS = 3.0


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
        self._target: MirrorTarget | None = None
        self._portal: Any = None
        self._request_client: Any = None
        # The defender-portal target's clock and sleep (request times, the 30-minute re-request, the request pace):
        # tests move them instead of waiting minutes.
        self.clock: Callable[[], datetime] = utcnow
        self.sleep: Callable[[float], None] = time.sleep

    @property
    def state(self) -> StateStore:
        with self._lock:
            if self._state is None:
                store = StateStore.from_config(self.settings.storage, self.credentials.storage(),
                                               **transport_options(self.settings))
                store.ensure_tables()
                self._state = store
            return self._state

    @property
    def sink(self) -> LogsSink:
        with self._lock:
            if self._sink is None:
                s = self.settings
                self._sink = LogsSink(s.logs_ingestion_endpoint, s.logs_dcr_immutable_id, self.credentials.app(),
                                      scope=s.logs_ingestion_scope, **transport_options(s))
            return self._sink

    @property
    def sentinel(self) -> SentinelClient:
        ledger = self.state.table(LEASES)  # outside the lock: ``state`` takes it too
        with self._lock:
            if self._sentinel is None:
                s = self.settings
                session = BearerSession(self.credentials.app(), s.arm_scope, session=new_session(s))
                # One cap for the whole app, not per process: a queue fan-out runs many processes.
                writes = SharedRateBudget(ledger, "sentinel-writes", s.sentinel_max_writes_per_minute,
                                          block=max(1, s.sentinel_max_writes_per_minute // 60))
                self._sentinel = SentinelClient(session, s.arm_endpoint, s.sentinel_workspace_id,
                                                write_limiter=writes)
            return self._sentinel

    @property
    def target(self) -> MirrorTarget:
        """The mirror target of ``SYNC_MIRROR_TARGET``."""
        sentinel, state = self.sentinel, self.state  # outside the lock: both take it
        with self._lock:
            if self._target is None:
                if self.settings.mirror_target == "defender-portal":
                    from .mirror_requests import MirrorRequestStore
                    from .targets.defender_portal import DefenderPortalTarget

                    assert self.settings.mirror_rule_id is not None  # settings refuse defender-portal without it
                    self._target = DefenderPortalTarget(sentinel, self.settings.mirror_rule_id,
                                                        MirrorRequestStore(state.service), lambda: self.clock())
                else:
                    self._target = SentinelTarget(sentinel)
            return self._target

    def portal_phase(self) -> Any:
        """The defender-portal target's request/link phase (:class:`~sync.targets.defender_portal.PortalMirrorPhase`),
        or None with ``sentinel-api``."""
        if self.settings.mirror_target != "defender-portal":
            return None
        from .incident_sync import IncidentSyncer
        from .mirror_requests import RequestDispatcher
        from .targets.defender_portal import DefenderPortalTarget, MirrorLinker, PortalMirrorPhase

        target, state = self.target, self.state
        assert isinstance(target, DefenderPortalTarget)
        with self._lock:
            if self._portal is None:
                def sync(tenant: Any, incident_id: str, deadline: Any) -> Any:
                    return IncidentSyncer(self).sync(tenant, incident_id, deadline=deadline, trigger="link")

                pace = SharedRateBudget(state.table(LEASES), "mirror-requests",
                                        self.settings.mirror_requests_per_minute, hold_seconds=REQUEST_HANDOVER_SECONDS,
                                        clock=lambda: self.clock().timestamp(), sleep=lambda s: self.sleep(s))
                linker = MirrorLinker(target, state, self.settings.tenant, sync)
                dispatcher = RequestDispatcher(target.requests, pace, self._upload_requests, clock=lambda: self.clock())
                self._portal = PortalMirrorPhase(target, linker, dispatcher, state, owner=self.instance_id)
            return self._portal

    def _upload_requests(self, rows: list[dict[str, Any]]) -> None:
        """One call, no retries: every row handed to the API must have taken a unit of the request pace."""
        if self._request_client is None:
            from azure.monitor.ingestion import LogsIngestionClient

            s = self.settings
            self._request_client = LogsIngestionClient(s.logs_ingestion_endpoint, self.credentials.app(),
                                                       credential_scopes=[s.logs_ingestion_scope], retry_total=0,
                                                       **transport_options(s))
        self._request_client.upload(rule_id=self.settings.logs_dcr_immutable_id, stream_name=MIRROR_REQUESTS_STREAM,
                                    logs=rows)

    def graph(self, tenant_id: str) -> GraphSecurityClient:
        """The Graph client of one tenant: its own credential, token and request-rate cap."""
        with self._lock:
            client = self._graph.get(tenant_id)
            if client is None:
                s = self.settings
                limiter = RateLimiter(s.graph_max_requests_per_minute)
                session = BearerSession(self.credentials.graph(tenant_id), s.graph_scope, limiter=limiter,
                                        session=new_session(s))
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
