"""Run every emulator together: one :class:`World`, one :class:`~emulators.base.FaultPlan`, one HTTPS server per
service, and a JSON control API.

In-process (tests)::

    hub = EmulatorHub()
    endpoints = hub.start(state_dir)          # writes state_dir/ca.pem and state_dir/endpoints.json
    tid = hub.world.add_tenant(name="Contoso")
    hub.world.add_incident(tid, {"id": "42", "severity": "high"})
    hub.faults.queue("graph", Fault("status", 429, retry_after="1"))
    hub.stop()

As a process (demo, crash tests): ``python -m emulators serve --state-dir DIR`` writes ``DIR/endpoints.json`` and
``DIR/ca.pem`` and serves until SIGTERM; another process drives it with :class:`RemoteHub` or plain HTTP on
``/_control/...`` of any emulator server (see :meth:`EmulatorHub.control` for the routes).

Services: ``entra`` (authority host + ``/msi/token``), ``graph``, ``ingestion`` and, when ``emulators.sentinel``
imports, ``sentinel`` (the ARM endpoint). More services can be passed as ``extra_services``: a mapping of name to
``factory(world, issuer, base_url) -> Service``; a service may offer ``reset()``, otherwise the hub rebuilds it from
its factory on :meth:`EmulatorHub.reset`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .base import EmuRequest, EmuResponse, Fault, FaultPlan, Service, match_request
from .certs import ensure_tls, make_client_certificate
from .entra import (
    FEDERATED_AUDIENCE,
    AppRegistration,
    EntraService,
    EntraState,
    ManagedIdentity,
    TenantInfo,
)
from .generator import TenantSpec, generate_incidents, make_tenants
from .graph import GraphService, GraphState, PageInfo, ServerClock, expand_alerts_page_over
from .ingestion import INGESTION_AUDIENCE, IngestionService, IngestionState, Violation
from .portal import PortalWorld
from .server import EmuHTTPServer, RequestLog, server_context
from .tokens import TokenIssuer

log = logging.getLogger(__name__)

ServiceFactory = Callable[["World", TokenIssuer, str], Service]
DEFAULT_SCHEDULES = {"DEFENDER_PULL_SCHEDULE": "0 */5 * * * *", "SENTINEL_RECONCILE_SCHEDULE": "0 */15 * * * *"}
TABLES = ("DefenderIncidents_CL", "DefenderAlerts_CL", "DefenderEvidence_CL")


# ------------------------------------------------------------------------------------------------------- World


class World:
    """Everything the emulators know, shared by all servers and guarded by one re-entrant :attr:`lock`.

    Sub-states: :attr:`entra` (:class:`~emulators.entra.EntraState`), :attr:`graph`
    (:class:`~emulators.graph.GraphState`), :attr:`ingestion` (:class:`~emulators.ingestion.IngestionState`);
    :attr:`extras` is free for other services. The Function app's own world: :attr:`home_tenant_id` (the MSSP
    tenant), :attr:`managed_identity` (system-assigned), :attr:`sentinel_workspace_id`.
    """

    def __init__(self, dcr_immutable_id: str | None = None, home_tenant_id: str | None = None) -> None:
        self.lock = threading.RLock()
        self.clock = ServerClock()
        self.entra = EntraState(self.lock)
        self.graph = GraphState(self.lock, self.clock)
        self.ingestion = IngestionState(dcr_immutable_id or f"dcr-{uuid.uuid4().hex}", self.lock,
                                        clock_ticks=self.clock.now_ticks)
        # The unified Defender portal (emulators/portal.py); bound to the Sentinel emulator when the hub builds it.
        self.portal = PortalWorld(self.lock, self.ingestion, self.clock.advance)
        self.extras: dict[str, Any] = {}
        self.home_tenant_id = home_tenant_id or str(uuid.uuid4())
        subscription = str(uuid.uuid4())
        self.sentinel_workspace_id = (f"/subscriptions/{subscription}/resourceGroups/rg-soc/providers/"
                                      "Microsoft.OperationalInsights/workspaces/sentinel-soc")
        self.managed_identity = ManagedIdentity(
            client_id=str(uuid.uuid4()), principal_id=str(uuid.uuid4()), tenant_id=self.home_tenant_id,
            resource_id=f"/subscriptions/{subscription}/resourceGroups/rg-soc/providers/Microsoft.Web/sites/"
                        "defender-sentinel-sync", system=True)
        self.entra.identity_header = secrets.token_urlsafe(24)
        self._baseline_resources: set[str] = set()
        self._apply_baseline()

    def _apply_baseline(self) -> None:
        with self.lock:
            self.entra.add_tenant(self.home_tenant_id, "MSSP (home)", "mssp.onmicrosoft.com")
            self.graph.ensure_tenant(self.home_tenant_id)
            self.entra.identities = [self.managed_identity]
            self.entra.resources = set(self._baseline_resources)

    def register_resource(self, resource: str) -> None:
        """Allow tokens for ``resource`` (kept across :meth:`reset`)."""
        with self.lock:
            self.entra.register_resource(resource)
            self._baseline_resources = set(self.entra.resources)

    def reset(self) -> None:
        """Back to the state right after start: home tenant and managed identity only; no customer tenants, apps,
        incidents, rows, counters or hooks. Endpoints, the identity header and the DCR ID stay."""
        with self.lock:
            self.entra.tenants.clear()
            self.entra.apps.clear()
            self.entra.reset_counters()
            self.entra.token_lifetime = 3600
            self.graph.reset()
            self.ingestion.reset()
            self.portal.reset()
            # A test that advanced the clock (e.g. the portal's rule minutes) must not leave later tests in the future.
            self.clock.reset()
            self.extras.clear()
            self._apply_baseline()

    # -- tenants & apps ------------------------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str | None = None, name: str | None = None, domain: str | None = None) -> str:
        """Create a customer tenant (Entra + Graph); returns its ID."""
        tid = tenant_id or str(uuid.uuid4())
        with self.lock:
            self.entra.add_tenant(tid, name, domain)
            self.graph.ensure_tenant(tid)
        return tid

    def tenants(self) -> list[TenantInfo]:
        with self.lock:
            return list(self.entra.tenants.values())

    def register_app(self, client_id: str | None = None, **kwargs: Any) -> AppRegistration:
        """See :meth:`emulators.entra.EntraState.register_app` (``secret=``, ``tenants=``, ``certificate_pem=``,
        ``federated_subjects=``, ``display_name=``, ``roles=``). The app's home tenant defaults to the MSSP's."""
        kwargs.setdefault("home_tenant_id", self.home_tenant_id)
        return self.entra.register_app(client_id, **kwargs)

    def consent(self, client_id: str, tenant_id: str) -> None:
        self.entra.consent(client_id, tenant_id)

    # -- incidents (delegates to GraphState) ---------------------------------------------------------------------

    def add_incident(self, tenant_id: str, incident: dict[str, Any]) -> dict[str, Any]:
        """Store an incident (Graph JSON shape; missing fields get defaults). See ``GraphState.add_incident``."""
        return self.graph.add_incident(tenant_id, incident)

    def add_incidents(self, tenant_id: str, incidents: Iterable[dict[str, Any]]) -> int:
        return self.graph.add_incidents(tenant_id, incidents)

    def update_incident(self, tenant_id: str, incident_id: str, changes: dict[str, Any] | None = None, *,
                        last_update: str | None = None, **fields: Any) -> dict[str, Any]:
        """Change an incident as Defender would; bumps ``lastUpdateDateTime`` (strictly increasing server clock)
        unless ``last_update`` gives one explicitly (for ties and late-visible updates)."""
        return self.graph.update_incident(tenant_id, incident_id, changes, last_update=last_update, **fields)

    def add_alert(self, tenant_id: str, incident_id: str, alert: dict[str, Any],
                  last_update: str | None = None) -> dict[str, Any]:
        return self.graph.add_alert(tenant_id, incident_id, alert, last_update=last_update)

    def update_alert(self, tenant_id: str, alert_id: str, changes: dict[str, Any] | None = None, **fields: Any
                     ) -> dict[str, Any]:
        return self.graph.update_alert(tenant_id, alert_id, changes, **fields)

    def redirect_incident(self, tenant_id: str, from_id: str, to_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Merge ``from_id`` into ``to_id`` (status ``redirected``, alerts move)."""
        return self.graph.redirect_incident(tenant_id, from_id, to_id)

    def delete_incident(self, tenant_id: str, incident_id: str) -> bool:
        return self.graph.delete_incident(tenant_id, incident_id)

    def get_incident(self, tenant_id: str, incident_id: str, expand_alerts: bool = True) -> dict[str, Any] | None:
        return self.graph.get_incident(tenant_id, incident_id, expand_alerts)

    def incident_ids(self, tenant_id: str) -> list[str]:
        """Newest first."""
        return self.graph.incident_ids(tenant_id)

    def after_page(self, n: int, callback: Callable[[PageInfo], Any], *, tenant_id: str | None = None,
                   resource: str = "incidents", once: bool = True) -> None:
        """Run ``callback(page_info)`` after the n-th list page (see ``GraphState.after_page``)."""
        self.graph.after_page(n, callback, tenant_id=tenant_id, resource=resource, once=once)

    def generate(self, seed: int, tenant_id: str, count: int, profile: str = "realistic", **kwargs: Any) -> int:
        """Fill ``tenant_id`` with ``count`` generated incidents (see :mod:`emulators.generator`)."""
        with self.lock:
            info = self.entra.tenants.get(tenant_id)
        spec = TenantSpec(tenant_id, info.name if info else "Tenant",
                          info.domain if info else "contoso.onmicrosoft.com")
        return self.graph.add_incidents(tenant_id, generate_incidents(seed, spec, count, profile=profile, **kwargs))

    # -- ingestion -----------------------------------------------------------------------------------------------

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Rows ingested into ``table`` (``DefenderIncidents_CL``, ``DefenderAlerts_CL``, ``DefenderEvidence_CL``)."""
        return self.ingestion.rows(table)

    @property
    def violations(self) -> list[Violation]:
        """Values over 64 KB the app sent (should stay empty)."""
        with self.lock:
            return list(self.ingestion.violations)


# ------------------------------------------------------------------------------------------------------- hub


@dataclass
class Endpoints:
    """Where everything is; also written to ``endpoints.json`` (camelCase keys)."""

    state_dir: str
    ca_bundle: str
    authority_host: str
    identity_endpoint: str
    identity_header: str = field(repr=False)
    graph: str
    ingestion: str
    arm: str | None
    dcr_immutable_id: str
    home_tenant_id: str
    managed_identity_client_id: str
    managed_identity_principal_id: str
    sentinel_workspace_id: str
    services: dict[str, str]
    pid: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {_camel(k): v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Endpoints:
        names = {_camel(k): k for k in cls.__dataclass_fields__}
        return cls(**{names[k]: v for k, v in data.items() if k in names})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


class _Starting:
    """Placeholder service while the real one is built (it needs the server's URL)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def handle(self, request: EmuRequest) -> EmuResponse:
        return EmuResponse(503, {"error": {"code": "Starting", "message": "the emulator is starting"}})


def sentinel_factory(world: World, issuer: TokenIssuer, base_url: str) -> Service | None:
    """Build ``emulators.sentinel.SentinelService`` for the World's workspace, if that module imports."""
    try:
        from .sentinel import SentinelService
    except ImportError:
        return None

    def verifier(headers: dict[str, str]) -> dict[str, Any]:
        return issuer.verify_bearer(headers, base_url)

    try:
        # One clock for Graph and Sentinel, so "latest wins" compares times from the same source.
        sentinel = SentinelService(verifier, [world.sentinel_workspace_id], base_url=base_url,
                                   clock_ns=lambda: world.clock.now_ticks() * 100)
        world.portal.bind(sentinel)
        service: Service = sentinel
    except TypeError:
        service = SentinelService(world, verifier)  # type: ignore[arg-type]
        if hasattr(service, "base_url"):
            service.base_url = base_url
    return service


class EmulatorHub:
    """Starts all emulators on loopback HTTPS ports sharing :attr:`world` and :attr:`faults`."""

    def __init__(self, world: World | None = None, faults: FaultPlan | None = None, *,
                 include_sentinel: bool = True, extra_services: Mapping[str, ServiceFactory] | None = None) -> None:
        self.world = world or World()
        self.faults = faults or FaultPlan()
        self.issuer = TokenIssuer()
        self.log = RequestLog()
        self.include_sentinel = include_sentinel
        self.extra_factories: dict[str, ServiceFactory] = dict(extra_services or {})
        self.servers: dict[str, EmuHTTPServer] = {}
        self.endpoints: Endpoints | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, state_dir: str | os.PathLike[str]) -> Endpoints:
        """Bind every server, write ``ca.pem`` and ``endpoints.json`` into ``state_dir``, return the endpoints."""
        root = Path(state_dir)
        root.mkdir(parents=True, exist_ok=True)
        tls = ensure_tls(root)
        context = server_context(str(tls.cert_pem), str(tls.key_pem))
        factories: dict[str, ServiceFactory | None] = {
            "entra": lambda w, i, u: EntraService(w.entra, i, u),
            "graph": lambda w, i, u: GraphService(w.graph, i, u),
            "ingestion": lambda w, i, u: IngestionService(w.ingestion, i),
        }
        if self.include_sentinel:
            factories["sentinel"] = sentinel_factory  # type: ignore[assignment]
        factories.update(self.extra_factories)
        self._factories = factories
        for name in factories:
            server = EmuHTTPServer(_Starting(name), context, self.faults, self.control, request_log=self.log)
            self.servers[name] = server
        for name, factory in list(factories.items()):
            service = factory(self.world, self.issuer, self.servers[name].base_url) if factory else None
            if service is None:
                self.servers.pop(name).server_close()
                continue
            self.servers[name].service = service
        self.issuer.issuer_base = self.servers["entra"].base_url
        for name in ("graph", "sentinel"):
            if name in self.servers:
                self.world.register_resource(self.servers[name].base_url)
        for name in self.extra_factories:
            if name in self.servers:
                self.world.register_resource(self.servers[name].base_url)
        self.world.register_resource(INGESTION_AUDIENCE)
        self.world.register_resource(FEDERATED_AUDIENCE)
        for server in self.servers.values():
            server.start()
        mi = self.world.managed_identity
        entra = self.servers["entra"].base_url
        self.endpoints = Endpoints(
            state_dir=str(root), ca_bundle=str(tls.ca_pem), authority_host=entra,
            identity_endpoint=f"{entra}/msi/token", identity_header=self.world.entra.identity_header,
            graph=self.servers["graph"].base_url, ingestion=self.servers["ingestion"].base_url,
            arm=self.servers["sentinel"].base_url if "sentinel" in self.servers else None,
            dcr_immutable_id=self.world.ingestion.dcr_immutable_id, home_tenant_id=self.world.home_tenant_id,
            managed_identity_client_id=mi.client_id, managed_identity_principal_id=mi.principal_id,
            sentinel_workspace_id=self.world.sentinel_workspace_id,
            services={n: s.base_url for n, s in self.servers.items()}, pid=os.getpid())
        self.write_endpoints()
        return self.endpoints

    def write_endpoints(self, extra: Mapping[str, Any] | None = None) -> Path:
        """(Re)write ``endpoints.json`` atomically, with optional extra keys (e.g. seeded app settings)."""
        assert self.endpoints is not None
        path = Path(self.endpoints.state_dir) / "endpoints.json"
        data = self.endpoints.to_json()
        data.update(extra or {})
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.replace(tmp, path)
        return path

    def stop(self) -> None:
        """Stop every server."""
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def reset(self) -> None:
        """Reset the world, clear faults (and their counters), the request log, and every extra service."""
        self.world.reset()
        self.faults.clear(counts=True)
        self.log.clear()
        for name, server in self.servers.items():
            if name in ("entra", "graph", "ingestion"):
                continue
            resetter = getattr(server.service, "reset", None)
            factory = self._factories.get(name)
            if callable(resetter):
                resetter()
            elif factory is not None:
                service = factory(self.world, self.issuer, server.base_url)
                if service is not None:
                    server.service = service

    def __enter__(self) -> EmulatorHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- conveniences --------------------------------------------------------------------------------------------

    def service(self, name: str) -> Any:
        """The live service object (``"entra"``, ``"graph"``, ``"ingestion"``, ``"sentinel"``...)."""
        return self.servers[name].service

    @property
    def sentinel(self) -> Any | None:
        """The Sentinel service, when ``emulators.sentinel`` is present."""
        server = self.servers.get("sentinel")
        return server.service if server else None

    def register_app(self, client_id: str | None = None, **kwargs: Any) -> AppRegistration:
        return self.world.register_app(client_id, **kwargs)

    def add_tenant(self, tenant_id: str | None = None, name: str | None = None, domain: str | None = None) -> str:
        return self.world.add_tenant(tenant_id, name, domain)

    def environ(self) -> dict[str, str]:
        """Environment for a process using the emulators' managed identity and TLS trust."""
        assert self.endpoints is not None
        return {"REQUESTS_CA_BUNDLE": self.endpoints.ca_bundle, "IDENTITY_ENDPOINT": self.endpoints.identity_endpoint,
                "IDENTITY_HEADER": self.endpoints.identity_header,
                "AZURE_AUTHORITY_HOST": self.endpoints.authority_host}

    # -- control API ---------------------------------------------------------------------------------------------

    def control(self, request: EmuRequest) -> EmuResponse:
        """JSON control API under ``/_control/`` (served by every emulator server; no faults applied):

        ``GET health`` | ``GET endpoints`` | ``POST reset`` |
        ``GET/POST tenants`` {tenantId?, name?, domain?} |
        ``POST apps`` {clientId?, secret? (string, or true to generate), tenants?, certificatePem?,
        federatedSubjects?, displayName?, roles?} -> {clientId, secret?} | ``POST/DELETE apps/{cid}/consent/{tid}`` |
        ``POST generate`` {seed, tenants (count or [ids]), count, profile?} -> {tenants: [...]} |
        ``POST incidents`` {tenantId, incident | incidents} -> {ids} | ``GET incidents/{tid}`` -> {ids} |
        ``GET/PATCH/DELETE incidents/{tid}/{id}`` (PATCH body: fields, optional lastUpdateDateTime) |
        ``POST incidents/{tid}/{id}/alerts`` {alert} | ``POST incidents/{tid}/{id}/redirect`` {to} |
        ``PATCH alerts/{tid}/{alertId}`` {fields} |
        ``POST faults`` {service, kind: status|drop|delay, status?, retryAfter?, seconds?, times? (default 1),
        persistent?: bool, match?: {method?, path? (regex), query?: {name: substring}}, expandAlertsTopOver?: n} |
        ``DELETE faults`` | ``GET rows/{table}?offset=N`` -> {count, rows} | ``GET violations`` | ``GET stats`` |
        ``GET requests?service=..`` | ``POST clock/advance`` {seconds} | ``POST graph/settings``
        {strictDetermination?, bumpOnNoopPatch?, cascadeResolve?} | ``GET graph/writes`` | ``POST tokens/lifetime``
        {seconds} | ``/_control/<service>/...`` is forwarded to that service (e.g. ``sentinel``).
        """
        parts = [p for p in request.path.split("/") if p][1:]
        if parts and parts[0] in self.servers and parts[0] not in ("entra", "graph", "ingestion"):
            return self.servers[parts[0]].service.handle(request)
        try:
            body = request.json() if request.body else {}
            result = self._control(request.method, parts, body if isinstance(body, dict) else {"value": body},
                                   request)
        except KeyError as exc:
            return EmuResponse(404, {"error": {"code": "NotFound", "message": str(exc)}})
        except (ValueError, TypeError) as exc:
            return EmuResponse(400, {"error": {"code": "BadRequest", "message": str(exc)}})
        return EmuResponse(200, result)

    def _control(self, method: str, parts: list[str], body: dict[str, Any], request: EmuRequest) -> Any:
        w = self.world
        route = (method, parts[0] if parts else "", len(parts))
        if route == ("GET", "health", 1):
            return {"ok": True}
        if route == ("GET", "endpoints", 1):
            return self.endpoints.to_json() if self.endpoints else {}
        if route == ("POST", "reset", 1):
            self.reset()
            return {"ok": True}
        if route == ("GET", "tenants", 1):
            return {"tenants": [asdict(t) for t in w.tenants()]}
        if route == ("POST", "tenants", 1):
            return {"tenantId": w.add_tenant(body.get("tenantId"), body.get("name"), body.get("domain"))}
        if route == ("POST", "apps", 1):
            secret = body.get("secret")
            generated = secrets.token_urlsafe(32) if secret is True else None
            app = w.register_app(body.get("clientId"), secret=generated or secret or None,
                                 tenants=body.get("tenants") or [],
                                 certificate_pem=body.get("certificatePem"),
                                 federated_subjects=body.get("federatedSubjects") or [],
                                 display_name=body.get("displayName"), roles=body.get("roles"))
            return {"clientId": app.client_id, **({"secret": generated} if generated else {})}
        if parts[:1] == ["apps"] and len(parts) == 4 and parts[2] == "consent":
            if method == "DELETE":
                w.entra.revoke_consent(parts[1], parts[3])
            else:
                w.consent(parts[1], parts[3])
            return {"ok": True}
        if route == ("POST", "generate", 1):
            seed = int(body.get("seed", 7))
            count = int(body.get("count", 20))
            tenants = body.get("tenants", 1)
            specs = make_tenants(seed, tenants) if isinstance(tenants, int) else [
                TenantSpec(t, "Tenant", "contoso.onmicrosoft.com") for t in tenants]
            out = []
            for spec in specs:
                if isinstance(tenants, int):
                    w.add_tenant(spec.tenant_id, spec.name, spec.domain)
                else:
                    w.add_tenant(spec.tenant_id)
                n = w.generate(seed, spec.tenant_id, count, profile=body.get("profile", "realistic"))
                out.append({"tenantId": spec.tenant_id, "name": spec.name, "incidents": n})
            return {"tenants": out}
        if parts[:1] == ["incidents"]:
            return self._control_incidents(method, parts, body)
        if parts[:1] == ["alerts"] and len(parts) == 3 and method == "PATCH":
            return w.update_alert(parts[1], parts[2], body)
        if parts[:1] == ["faults"] and len(parts) == 1:
            return self._control_faults(method, body)
        if route == ("GET", "rows", 2):
            rows = w.rows(parts[1])
            offset = int(request.q("offset") or 0)
            return {"count": len(rows), "rows": rows[offset:]}
        if route == ("GET", "violations", 1):
            return {"violations": [asdict(v) for v in w.violations]}
        if route == ("GET", "stats", 1):
            return self.stats()
        if route == ("GET", "requests", 1):
            return {"requests": [asdict(r) for r in self.log.entries(service=request.q("service"))]}
        if parts == ["clock", "advance"] and method == "POST":
            w.clock.advance(float(body.get("seconds", 0)))
            return {"now": w.clock.now()}
        if parts == ["graph", "settings"] and method == "POST":
            for key, attr in (("strictDetermination", "strict_determination"),
                              ("legacyDeterminations", "legacy_determinations"),
                              ("bumpOnNoopPatch", "bump_on_noop_patch"), ("cascadeResolve", "cascade_resolve"),
                              ("unstableTies", "unstable_ties"), ("unorderedPages", "unordered_pages")):
                if key in body:
                    setattr(w.graph, attr, bool(body[key]))
            return {"strictDetermination": w.graph.strict_determination,
                    "bumpOnNoopPatch": w.graph.bump_on_noop_patch, "cascadeResolve": w.graph.cascade_resolve}
        if parts == ["graph", "writes"] and method == "GET":
            with w.lock:
                return {"writes": [asdict(x) for x in w.graph.writes]}
        if parts == ["tokens", "lifetime"] and method == "POST":
            w.entra.token_lifetime = int(body["seconds"])
            return {"seconds": w.entra.token_lifetime}
        raise KeyError(f"no control route {method} /_control/{'/'.join(parts)}")

    def _control_incidents(self, method: str, parts: list[str], body: dict[str, Any]) -> Any:
        w = self.world
        if len(parts) == 1 and method == "POST":
            tid = body["tenantId"]
            items = body.get("incidents") or [body["incident"]]
            return {"ids": [w.add_incident(tid, item)["id"] for item in items]}
        if len(parts) == 2 and method == "GET":
            return {"ids": w.incident_ids(parts[1])}
        if len(parts) == 3:
            tid, iid = parts[1], parts[2]
            if method == "GET":
                doc = w.get_incident(tid, iid)
                if doc is None:
                    raise KeyError(f"no incident {iid} in {tid}")
                return doc
            if method == "PATCH":
                fields = dict(body.get("changes", body))
                stamp = fields.pop("lastUpdateDateTime", None) or body.get("lastUpdateDateTime")
                return w.update_incident(tid, iid, fields, last_update=stamp)
            if method == "DELETE":
                return {"deleted": w.delete_incident(tid, iid)}
        if len(parts) == 4 and method == "POST":
            tid, iid = parts[1], parts[2]
            if parts[3] == "alerts":
                return w.add_alert(tid, iid, body["alert"], body.get("lastUpdateDateTime"))
            if parts[3] == "redirect":
                loser, winner = w.redirect_incident(tid, iid, str(body["to"]))
                return {"from": loser, "to": winner}
        raise KeyError(f"no control route {method} /_control/{'/'.join(parts)}")

    def _control_faults(self, method: str, body: dict[str, Any]) -> Any:
        if method == "DELETE":
            self.faults.clear()
            return {"ok": True}
        if method == "GET":
            return {"injected": dict(self.faults.injected), "pending": self.faults.pending()}
        service = str(body["service"])
        fault = Fault(kind=str(body.get("kind", "status")), status=int(body.get("status", 500)),
                      retry_after=None if body.get("retryAfter") is None else str(body["retryAfter"]),
                      seconds=float(body.get("seconds", 0)))
        if fault.kind not in ("status", "drop", "delay"):
            raise ValueError("kind must be status, drop or delay")
        match = body.get("match") or {}
        predicate = match_request(match.get("method"), match.get("path"), match.get("query")) if match else None
        if body.get("expandAlertsTopOver") is not None:
            predicate = expand_alerts_page_over(int(body["expandAlertsTopOver"]))
        if body.get("persistent"):
            self.faults.rule(service, predicate or (lambda _r: True), fault)
        else:
            self.faults.queue(service, fault, int(body.get("times", 1)), when=predicate)
        return {"ok": True}

    def stats(self) -> dict[str, Any]:
        """Counters for tests and the demo: ingestion, tokens, faults, Graph writes, requests per service."""
        w = self.world
        with w.lock:
            ingestion = asdict(w.ingestion.stats)
            tokens = [{"clientId": c, "tenantId": t, "audience": a, "count": n}
                      for (c, t, a), n in w.entra.issued.items()]
            writes = len(w.graph.writes)
            violations = len(w.ingestion.violations)
        per_service: dict[str, int] = {}
        for entry in self.log.entries():
            per_service[entry.service] = per_service.get(entry.service, 0) + 1
        return {"ingestion": ingestion, "violations": violations, "tokens": tokens,
                "faultsInjected": dict(self.faults.injected), "graphWrites": writes, "requests": per_service}


# ------------------------------------------------------------------------------------------------------- remote


class RemoteHub:
    """Drive a hub running in another process (``python -m emulators serve``) through its control API."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        data = json.loads((Path(state_dir) / "endpoints.json").read_text(encoding="utf-8"))
        self.raw = data
        self.endpoints = Endpoints.from_json(data)
        self._base = self.endpoints.services["graph"]

    def control(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        """Call ``/_control/<path>``; raises ``RuntimeError`` with the error message on a non-200 answer."""
        import requests

        response = requests.request(method, f"{self._base}/_control/{path.lstrip('/')}", json=body, params=params,
                                    verify=self.endpoints.ca_bundle, timeout=60)
        data = response.json() if response.content else None
        if response.status_code != 200:
            raise RuntimeError(f"control {method} {path} -> {response.status_code}: {data}")
        return data

    def reset(self) -> None:
        self.control("POST", "reset")

    def add_tenant(self, tenant_id: str | None = None, name: str | None = None, domain: str | None = None) -> str:
        return str(self.control("POST", "tenants", {"tenantId": tenant_id, "name": name, "domain": domain})[
            "tenantId"])

    def register_app(self, client_id: str | None = None, *, secret: str | None = None,
                     tenants: Iterable[str] = (), certificate_pem: bytes | str | None = None,
                     federated_subjects: Iterable[str] = (), display_name: str | None = None,
                     roles: list[str] | None = None) -> AppRegistration:
        """Register (or extend) an app in the remote Entra; returns a local description of it."""
        pem = certificate_pem.decode() if isinstance(certificate_pem, bytes) else certificate_pem
        data = self.control("POST", "apps", {"clientId": client_id, "secret": secret, "tenants": list(tenants),
                                             "certificatePem": pem, "federatedSubjects": list(federated_subjects),
                                             "displayName": display_name, "roles": roles})
        return AppRegistration(data["clientId"], display_name or data["clientId"], None,
                               [secret] if secret else [], {}, set(federated_subjects), set(tenants))

    def add_incident(self, tenant_id: str, incident: dict[str, Any]) -> str:
        return str(self.control("POST", "incidents", {"tenantId": tenant_id, "incident": incident})["ids"][0])

    def update_incident(self, tenant_id: str, incident_id: str, last_update: str | None = None,
                        **fields: Any) -> dict[str, Any]:
        body = dict(fields)
        if last_update:
            body["lastUpdateDateTime"] = last_update
        return dict(self.control("PATCH", f"incidents/{tenant_id}/{incident_id}", body))

    def get_incident(self, tenant_id: str, incident_id: str) -> dict[str, Any]:
        return dict(self.control("GET", f"incidents/{tenant_id}/{incident_id}"))

    def generate(self, seed: int, tenants: int | list[str], count: int, profile: str = "realistic") -> list[Any]:
        return list(self.control("POST", "generate", {"seed": seed, "tenants": tenants, "count": count,
                                                      "profile": profile})["tenants"])

    def inject_fault(self, service: str, kind: str = "status", status: int = 500, *, retry_after: str | None = None,
                     seconds: float = 0.0, times: int = 1, persistent: bool = False,
                     match: dict[str, Any] | None = None) -> None:
        self.control("POST", "faults", {"service": service, "kind": kind, "status": status,
                                        "retryAfter": retry_after, "seconds": seconds, "times": times,
                                        "persistent": persistent, "match": match})

    def clear_faults(self) -> None:
        self.control("DELETE", "faults")

    def rows(self, table: str, offset: int = 0) -> list[dict[str, Any]]:
        return list(self.control("GET", f"rows/{table}", params={"offset": offset})["rows"])

    def stats(self) -> dict[str, Any]:
        return dict(self.control("GET", "stats"))


# ------------------------------------------------------------------------------------------------------- settings


def app_settings(hub: EmulatorHub | RemoteHub, azurite: str | None, tenants: Iterable[str | TenantSpec] = (), *,
                 credential: str = "secret", **overrides: str | None) -> dict[str, str]:
    """The Function app's settings (names as in PRODUCT.md) wired to the emulators and Azurite.

    Registers a multi-tenant app consented in ``tenants`` (creating unknown tenants) with the chosen ``credential``:
    ``"secret"`` (``DEFENDER_CLIENT_SECRET``, generated now), ``"certificate"`` (``DEFENDER_CLIENT_CERTIFICATE``, a
    PEM key + certificate generated now), ``"federated"`` (secretless: the managed identity is the app's federated
    credential) or ``"managed-identity"`` (no ``DEFENDER_CLIENT_ID``: the app's own identity, home tenant only).
    ``overrides`` replace settings; an override of ``None`` removes that setting.
    """
    endpoints = hub.endpoints
    assert endpoints is not None, "start the hub first"
    tenant_ids: list[str] = []
    for tenant in tenants:
        if isinstance(tenant, TenantSpec):
            hub.add_tenant(tenant.tenant_id, tenant.name, tenant.domain)
            tenant_ids.append(tenant.tenant_id)
        else:
            hub.add_tenant(tenant)
            tenant_ids.append(tenant)
    if not tenant_ids:
        tenant_ids = [endpoints.home_tenant_id]
    settings: dict[str, str] = {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "DEFENDER_TENANT_IDS": ",".join(tenant_ids),
        "AZURE_AUTHORITY_HOST": endpoints.authority_host,
        "GRAPH_ENDPOINT": endpoints.graph,
        "LOGS_INGESTION_ENDPOINT": endpoints.ingestion,
        "LOGS_DCR_IMMUTABLE_ID": endpoints.dcr_immutable_id,
        "LOGS_INGESTION_SCOPE": f"{INGESTION_AUDIENCE}/.default",
        "SENTINEL_WORKSPACE_ID": endpoints.sentinel_workspace_id,
        # Without a Sentinel emulator, a closed loopback port: never the real ARM.
        "ARM_ENDPOINT": endpoints.arm or "https://127.0.0.1:9",
        "IDENTITY_ENDPOINT": endpoints.identity_endpoint,
        "IDENTITY_HEADER": endpoints.identity_header,
        "REQUESTS_CA_BUNDLE": endpoints.ca_bundle,
        "SYNC_QUEUE": "defender-tenant-work",
        "SYNC_FANOUT": "inline",
        "SYNC_INITIAL_LOOKBACK_DAYS": "7",
        "SYNC_OVERLAP_SECONDS": "120",
        "SYNC_TIME_BUDGET_SECONDS": "200",
        "GRAPH_MAX_REQUESTS_PER_MINUTE": "6000",
        "SENTINEL_MAX_WRITES_PER_MINUTE": "6000",
        "SYNC_CONFLICT_POLICY": "latest",
        **DEFAULT_SCHEDULES,
    }
    if azurite:
        settings["AzureWebJobsStorage"] = azurite
    if credential == "secret":
        secret = secrets.token_urlsafe(32)
        app = hub.register_app(secret=secret, tenants=tenant_ids, display_name="defender-sentinel-sync")
        settings["DEFENDER_CLIENT_ID"] = app.client_id
        settings["DEFENDER_CLIENT_SECRET"] = secret
    elif credential == "certificate":
        cert = make_client_certificate()
        app = hub.register_app(certificate_pem=cert.cert_pem, tenants=tenant_ids,
                               display_name="defender-sentinel-sync")
        settings["DEFENDER_CLIENT_ID"] = app.client_id
        settings["DEFENDER_CLIENT_CERTIFICATE"] = cert.combined_pem.decode("ascii")
    elif credential == "federated":
        app = hub.register_app(federated_subjects=[endpoints.managed_identity_principal_id], tenants=tenant_ids,
                               display_name="defender-sentinel-sync")
        settings["DEFENDER_CLIENT_ID"] = app.client_id
    elif credential != "managed-identity":
        raise ValueError("credential must be secret, certificate, federated or managed-identity")
    for key, value in overrides.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = str(value)
    return settings


__all__ = ["EmulatorHub", "Endpoints", "RemoteHub", "World", "app_settings", "sentinel_factory"]
