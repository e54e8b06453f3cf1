"""Emulated Microsoft Entra ID (token service) and the App Service managed-identity endpoint.

Routes (the public contracts MSAL / azure-identity use, so their real clients work unmodified):

- ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (and the v1 ``/{tenant}/.well-known/...``): OIDC metadata
  whose ``token_endpoint`` is this server. Unknown tenant -> 400 ``AADSTS90002``.
- ``GET /common/discovery/instance``: instance discovery answer (for clients that do not disable it).
- ``GET /{tenant}/discovery/v2.0/keys``: an empty JWKS (tokens are HS256 with the emulator's key).
- ``POST /{tenant}/oauth2/v2.0/token``: ``grant_type=client_credentials`` with ``scope=<resource>/.default`` and one of
  ``client_secret``; ``client_assertion`` = a JWT signed (RS256 or PS256) with a registered certificate, found by its
  ``x5t`` (SHA-1) or ``x5t#S256`` header, ``aud`` = the token endpoint, ``iss`` = ``sub`` = client ID; or
  ``client_assertion`` = a managed-identity token of this emulator for ``api://AzureADTokenExchange`` whose
  ``sub``/``oid`` is a registered federated subject of the app (secretless federated credential).
  ``POST /{tenant}/oauth2/token`` (v1, ``resource=``) is accepted too.
- ``GET /msi/token?resource=..&api-version=2019-08-01[&client_id=|object_id=|principal_id=|mi_res_id=]`` with header
  ``X-IDENTITY-HEADER``: the App Service managed identity protocol (``expires_on`` in epoch seconds). Tokens for the
  identity carry ``tid`` = its home tenant.

A multi-tenant app gets tokens only in the tenants it is consented in (``AppRegistration.tenants``) or its home tenant;
elsewhere 400 ``unauthorized_client`` / ``AADSTS700016``. Errors use Entra's JSON shape (``error``,
``error_description``, ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``). Tokens issued are counted per
``(client_id, tenant_id, audience)``. Secrets, assertions and tokens are never logged.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .base import EmuRequest, EmuResponse
from .tokens import TokenError, TokenIssuer, b64url_decode, normalize_audience, scope_to_resource, split_jwt

FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MSI_API_VERSION = "2019-08-01"
DEFAULT_ROLES = ("SecurityIncident.ReadWrite.All", "SecurityAlert.Read.All")
_RESERVED_SCOPES = {"openid", "profile", "offline_access", "email"}
_NS = uuid.UUID("6f1a3d52-9a0e-4d8f-8f0e-6c2b1f0a7e11")


@dataclass
class TenantInfo:
    """An Entra tenant known to the emulator."""

    tenant_id: str
    name: str
    domain: str


@dataclass
class AppRegistration:
    """A (multi-tenant) app registration and where it may get tokens.

    ``tenants`` is the set of tenants that consented to the app (plus ``home_tenant_id``). ``certificates`` maps a
    lower-case hex thumbprint (SHA-1 and SHA-256 both) to the certificate's RSA public key. ``federated_subjects``
    holds managed-identity object IDs whose tokens (audience ``api://AzureADTokenExchange``) the app accepts as
    client assertions. ``display_name`` is what Graph shows as the modifying/commenting identity.
    """

    client_id: str
    display_name: str
    home_tenant_id: str | None = None
    secrets: list[str] = field(default_factory=list, repr=False)
    certificates: dict[str, Any] = field(default_factory=dict, repr=False)
    federated_subjects: set[str] = field(default_factory=set)
    tenants: set[str] = field(default_factory=set)
    roles: list[str] = field(default_factory=lambda: list(DEFAULT_ROLES))
    # Application roles an admin granted in one tenant (overrides ``roles`` there): consent is per tenant, and a
    # customer may grant read-only roles while the MSSP expects ReadWrite.
    tenant_roles: dict[str, list[str]] = field(default_factory=dict)

    def roles_in(self, tenant_id: str) -> list[str]:
        """The roles a token issued in ``tenant_id`` carries."""
        return list(self.tenant_roles.get(tenant_id, self.roles))

    def object_id(self, tenant_id: str) -> str:
        """The service principal's object ID in ``tenant_id`` (stable per app and tenant)."""
        return str(uuid.uuid5(_NS, f"sp/{self.client_id}/{tenant_id}"))

    def may_use(self, tenant_id: str) -> bool:
        return tenant_id in self.tenants or tenant_id == self.home_tenant_id


@dataclass
class ManagedIdentity:
    """A managed identity of the Function app (system-assigned, or user-assigned selected by client ID)."""

    client_id: str
    principal_id: str
    tenant_id: str
    resource_id: str = ""
    system: bool = True
    display_name: str = "defender-sentinel-sync-func"
    roles: list[str] = field(default_factory=lambda: list(DEFAULT_ROLES))


class EntraState:
    """Tenants, app registrations, managed identities and token counters. Thread-safe (one re-entrant lock)."""

    def __init__(self, lock: threading.RLock | None = None) -> None:
        self.lock = lock or threading.RLock()
        self.tenants: dict[str, TenantInfo] = {}
        self.apps: dict[str, AppRegistration] = {}
        self.identities: list[ManagedIdentity] = []
        self.identity_header: str = ""
        self.resources: set[str] = set()          # normalized audiences tokens may be issued for; empty = any
        self.token_lifetime = 3600
        self.issued: Counter[tuple[str, str, str]] = Counter()
        self.failures: Counter[str] = Counter()   # AADSTS code -> count of refusals

    # -- registry ---------------------------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str, name: str | None = None, domain: str | None = None) -> TenantInfo:
        """Register a tenant (idempotent)."""
        with self.lock:
            info = self.tenants.get(tenant_id)
            if info is None:
                short = (name or tenant_id[:8]).split()[0].lower()
                info = TenantInfo(tenant_id, name or f"Tenant {tenant_id[:8]}",
                                  domain or f"{''.join(c for c in short if c.isalnum()) or 'tenant'}.onmicrosoft.com")
                self.tenants[tenant_id] = info
            return info

    def find_tenant(self, key: str) -> TenantInfo | None:
        """A tenant by ID or domain (case-insensitive)."""
        with self.lock:
            if key in self.tenants:
                return self.tenants[key]
            low = key.lower()
            for info in self.tenants.values():
                if info.tenant_id.lower() == low or info.domain.lower() == low:
                    return info
            return None

    def register_app(self, client_id: str | None = None, *, secret: str | None = None,
                     tenants: list[str] | tuple[str, ...] = (), home_tenant_id: str | None = None,
                     certificate_pem: bytes | str | None = None, federated_subjects: list[str] | tuple[str, ...] = (),
                     display_name: str | None = None, roles: list[str] | None = None) -> AppRegistration:
        """Create or extend an app registration; returns it. Extending adds the given secret/certificate/subjects
        and consents the given tenants."""
        with self.lock:
            cid = client_id or str(uuid.uuid4())
            app = self.apps.get(cid)
            if app is None:
                app = AppRegistration(cid, display_name or cid, home_tenant_id)
                self.apps[cid] = app
            if display_name:
                app.display_name = display_name
            if home_tenant_id:
                app.home_tenant_id = home_tenant_id
            if secret:
                app.secrets.append(secret)
            if certificate_pem:
                self.add_certificate(cid, certificate_pem)
            app.federated_subjects.update(federated_subjects)
            app.tenants.update(tenants)
            if roles is not None:
                app.roles = list(roles)
            return app

    def add_certificate(self, client_id: str, certificate_pem: bytes | str) -> str:
        """Register a certificate credential; returns its SHA-1 thumbprint (hex)."""
        data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
        cert = x509.load_pem_x509_certificate(data)
        sha1 = cert.fingerprint(hashes.SHA1()).hex()
        with self.lock:
            app = self.apps[client_id]
            app.certificates[sha1] = cert.public_key()
            app.certificates[cert.fingerprint(hashes.SHA256()).hex()] = cert.public_key()
        return sha1

    def consent(self, client_id: str, tenant_id: str) -> None:
        """Consent ``client_id`` in ``tenant_id`` (admin consent for the multi-tenant app)."""
        with self.lock:
            self.apps[client_id].tenants.add(tenant_id)

    def grant_roles(self, client_id: str, tenant_id: str, roles: list[str] | tuple[str, ...]) -> None:
        """Set the application roles consented for ``client_id`` in ``tenant_id`` (tokens there carry exactly these)."""
        with self.lock:
            self.apps[client_id].tenant_roles[tenant_id] = list(roles)

    def revoke_consent(self, client_id: str, tenant_id: str) -> None:
        with self.lock:
            self.apps[client_id].tenants.discard(tenant_id)

    def add_identity(self, identity: ManagedIdentity) -> ManagedIdentity:
        with self.lock:
            self.identities.append(identity)
            return identity

    def system_identity(self) -> ManagedIdentity | None:
        with self.lock:
            return next((i for i in self.identities if i.system), None)

    def register_resource(self, resource: str) -> None:
        """Allow tokens for ``resource`` (a base URL or URI; compared without trailing slash, case-insensitive)."""
        with self.lock:
            self.resources.add(normalize_audience(resource))

    # -- counters ---------------------------------------------------------------------------------------------

    def record(self, client_id: str, tenant_id: str, audience: str) -> None:
        with self.lock:
            self.issued[(client_id, tenant_id, normalize_audience(audience))] += 1

    def tokens_issued(self, client_id: str | None = None, tenant_id: str | None = None,
                      audience: str | None = None) -> int:
        """How many tokens were issued, optionally for one client/tenant/audience."""
        aud = normalize_audience(audience) if audience else None
        with self.lock:
            return sum(n for (c, t, a), n in self.issued.items()
                       if (client_id is None or c == client_id) and (tenant_id is None or t == tenant_id)
                       and (aud is None or a == aud))

    def reset_counters(self) -> None:
        with self.lock:
            self.issued.clear()
            self.failures.clear()


class _AadError(Exception):
    def __init__(self, status: int, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.code = code
        self.description = description


def aad_error_body(error: str, code: int, description: str) -> dict[str, Any]:
    """Entra's OAuth error JSON."""
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return {
        "error": error,
        "error_description": f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {correlation} "
                             f"Timestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


class EntraService:
    """The Entra token service + App Service MSI endpoint over :class:`EntraState`."""

    name = "entra"

    def __init__(self, state: EntraState, issuer: TokenIssuer, base_url: str = "") -> None:
        self.state = state
        self.issuer = issuer
        self.base_url = base_url

    def fault_body(self, status: int) -> dict[str, Any]:
        """Injected failures in Entra's error shape."""
        if status == 429:
            return aad_error_body("temporarily_unavailable", 50196, "The server is throttling requests.")
        return aad_error_body("temporarily_unavailable", 50001 if status >= 500 else 90000,
                              f"Injected fault: HTTP {status}.")

    def handle(self, request: EmuRequest) -> EmuResponse:
        """Route one request (see the module docstring)."""
        base = (request.base_url or self.base_url).rstrip("/")
        parts = [p for p in request.path.split("/") if p]
        try:
            if parts == ["msi", "token"] and request.method == "GET":
                return self._msi(request)
            if parts == ["common", "discovery", "instance"] and request.method == "GET":
                return self._instance_discovery(request, base)
            if len(parts) >= 2 and request.method == "GET" and parts[-2:] == [".well-known", "openid-configuration"]:
                v2 = parts[1:2] == ["v2.0"]
                return self._openid(parts[0], base, v2)
            if len(parts) >= 3 and parts[1] == "discovery" and parts[-1] == "keys":
                return EmuResponse(200, {"keys": []})
            if request.method == "POST" and (parts[1:] == ["oauth2", "v2.0", "token"]
                                             or parts[1:] == ["oauth2", "token"]) and len(parts) >= 3:
                return self._token(request, parts[0], base, v2=parts[2] == "v2.0")
            return EmuResponse(404, aad_error_body("invalid_request", 90010, f"No route for {request.path}."))
        except _AadError as err:
            with self.state.lock:
                self.state.failures[f"AADSTS{err.code}"] += 1
            return EmuResponse(err.status, aad_error_body(err.error, err.code, err.description),
                               {"Cache-Control": "no-store"})

    # -- discovery --------------------------------------------------------------------------------------------

    def _openid(self, tenant: str, base: str, v2: bool) -> EmuResponse:
        info = self.state.find_tenant(tenant)
        generic = tenant.lower() in ("common", "organizations", "consumers")
        if info is None and not generic:
            raise _AadError(400, "invalid_tenant", 90002,
                            f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID.")
        tid = info.tenant_id if info else "{tenantid}"
        path = tenant
        version = "/v2.0" if v2 else ""
        return EmuResponse(200, {
            "token_endpoint": f"{base}/{path}/oauth2{version}/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/{path}/discovery{version}/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/{tid}{version}",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{base}/oidc/userinfo",
            "authorization_endpoint": f"{base}/{path}/oauth2{version}/authorize",
            "device_authorization_endpoint": f"{base}/{path}/oauth2{version}/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/{path}/oauth2{version}/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "oid"],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "emulator.local",
            "cloud_graph_host_name": "graph.emulator.local",
            "msgraph_host": "graph.emulator.local",
        })

    def _instance_discovery(self, request: EmuRequest, base: str) -> EmuResponse:
        auth = request.q("authorization_endpoint") or f"{base}/common/oauth2/v2.0/authorize"
        tenant = auth.replace(base, "").strip("/").split("/")[0] or "common"
        host = base.split("://", 1)[-1]
        return EmuResponse(200, {
            "tenant_discovery_endpoint": f"{base}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        })

    # -- token endpoint ---------------------------------------------------------------------------------------

    def _token(self, request: EmuRequest, tenant: str, base: str, v2: bool) -> EmuResponse:
        form = {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            raise _AadError(400, "unsupported_grant_type", 70003,
                            f"The app requested an unsupported grant type '{grant}'. Only client_credentials is "
                            "emulated.")
        info = self.state.find_tenant(tenant)
        if info is None:
            raise _AadError(400, "invalid_request", 90002,
                            f"Tenant '{tenant}' not found. The client credentials flow needs a tenant ID or domain.")
        client_id = form.get("client_id", "")
        with self.state.lock:
            app = self.state.apps.get(client_id)
        if app is None or not app.may_use(info.tenant_id):
            raise _AadError(400, "unauthorized_client", 700016,
                            f"Application with identifier '{client_id}' was not found in the directory "
                            f"'{info.tenant_id}'. This can happen if the application has not been installed by the "
                            "administrator of the tenant or consented to by any user in the tenant.")
        resource = self._resource(form, v2, info.tenant_id)
        self._authenticate_client(form, app, info.tenant_id, base, tenant)
        lifetime = self.state.token_lifetime
        claims: dict[str, Any] = {"app_displayname": app.display_name}
        roles = app.roles_in(info.tenant_id)
        if roles:  # Entra omits the claim when no application role was granted
            claims["roles"] = roles
        token = self.issuer.issue(info.tenant_id, resource, app.object_id(info.tenant_id), app.client_id,
                                  lifetime, extra_claims=claims)
        self.state.record(app.client_id, info.tenant_id, resource)
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                                "access_token": token}
        if not v2:
            body.update({"expires_on": str(int(time.time()) + lifetime), "resource": resource})
        return EmuResponse(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _resource(self, form: dict[str, str], v2: bool, tenant_id: str) -> str:
        if v2:
            scopes = [s for s in form.get("scope", "").split() if s and s not in _RESERVED_SCOPES]
            if not scopes:
                raise _AadError(400, "invalid_request", 900144,
                                "The request body must contain the following parameter: 'scope'.")
            if len(scopes) != 1 or not scopes[0].endswith(".default"):
                raise _AadError(400, "invalid_scope", 1002012,
                                f"The provided value for scope {' '.join(scopes)} is not valid. Client credential "
                                "flows must have a scope value with /.default suffixed to the resource identifier "
                                "(application ID URI).")
            resource = scope_to_resource(scopes[0])
        else:
            resource = form.get("resource", "")
            if not resource:
                raise _AadError(400, "invalid_request", 900144,
                                "The request body must contain the following parameter: 'resource'.")
        self._check_resource(resource, tenant_id)
        return resource

    def _check_resource(self, resource: str, tenant_id: str) -> None:
        with self.state.lock:
            known = set(self.state.resources)
        if known and normalize_audience(resource) not in known:
            raise _AadError(400, "invalid_resource", 500011,
                            f"The resource principal named {resource} was not found in the tenant named "
                            f"{tenant_id}. This can happen if the application has not been installed by the "
                            "administrator of the tenant or consented to by any user in the tenant.")

    def _authenticate_client(self, form: dict[str, str], app: AppRegistration, tenant_id: str, base: str,
                             tenant_in_path: str) -> None:
        secret = form.get("client_secret")
        assertion = form.get("client_assertion")
        if secret and assertion:
            raise _AadError(400, "invalid_request", 90023, "Send either client_secret or client_assertion, not both.")
        if secret is not None and secret != "":
            if not any(hmac.compare_digest(secret.encode(), s.encode()) for s in app.secrets):
                raise _AadError(401, "invalid_client", 7000215,
                                "Invalid client secret provided. Ensure the secret being sent in the request is the "
                                f"client secret value, not the client secret ID, for a secret added to app "
                                f"'{app.client_id}'.")
            return
        if assertion:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise _AadError(400, "invalid_request", 900144,
                                f"client_assertion_type must be '{JWT_BEARER}'.")
            try:
                header, _, _, _ = split_jwt(assertion)
            except TokenError as exc:
                raise _AadError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from exc
            if header.get("alg") == "HS256":
                self._verify_federated(assertion, app)
            else:
                self._verify_certificate_assertion(assertion, app, base, {tenant_in_path, tenant_id})
            return
        raise _AadError(401, "invalid_client", 7000218,
                        "The request body must contain the following parameter: 'client_assertion' or "
                        "'client_secret'.")

    def _verify_federated(self, assertion: str, app: AppRegistration) -> None:
        try:
            claims = self.issuer.verify(assertion, FEDERATED_AUDIENCE)
        except TokenError as exc:
            if exc.code == "expired":
                raise _AadError(400, "invalid_client", 700024,
                                "Client assertion is not within its valid time range.") from exc
            if exc.code == "audience":
                raise _AadError(400, "invalid_client", 700212,
                                f"No matching federated identity record found for presented assertion audience. "
                                f"The audience must be '{FEDERATED_AUDIENCE}'.") from exc
            raise _AadError(401, "invalid_client", 700027,
                            f"Client assertion failed signature validation. ({exc.code})") from exc
        subject = str(claims.get("sub") or claims.get("oid") or "")
        if subject not in app.federated_subjects and str(claims.get("oid", "")) not in app.federated_subjects:
            raise _AadError(400, "invalid_client", 70021,
                            f"No matching federated identity record found for presented assertion. Assertion "
                            f"Issuer: '{claims.get('iss')}'. Assertion Subject: '{subject}'. Assertion Audience: "
                            f"'{claims.get('aud')}'.")

    def _verify_certificate_assertion(self, assertion: str, app: AppRegistration, base: str,
                                      tenants: set[str]) -> None:
        header, claims, signing_input, signature = split_jwt(assertion)
        alg = header.get("alg")
        if alg not in ("RS256", "PS256"):
            raise _AadError(401, "invalid_client", 5002730, f"Unsupported client assertion algorithm '{alg}'.")
        key = None
        for name in ("x5t#S256", "x5t"):
            if isinstance(header.get(name), str):
                try:
                    thumb = b64url_decode(header[name]).hex()
                except ValueError:
                    continue
                key = app.certificates.get(thumb)
                if key is not None:
                    break
        if key is None or not isinstance(key, rsa.RSAPublicKey):
            raise _AadError(401, "invalid_client", 700027,
                            "Client assertion failed signature validation. [Reason - The key was not found., "
                            f"Thumbprint of key used by client: '{header.get('x5t') or header.get('x5t#S256')}']")
        pad: padding.AsymmetricPadding = (padding.PKCS1v15() if alg == "RS256"
                                          else padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                           salt_length=padding.PSS.AUTO))
        try:
            key.verify(signature, signing_input, pad, hashes.SHA256())
        except InvalidSignature as exc:
            raise _AadError(401, "invalid_client", 700027,
                            "Client assertion failed signature validation.") from exc
        now = time.time()
        if not (claims.get("iss") == claims.get("sub") == app.client_id):
            raise _AadError(401, "invalid_client", 700023,
                            "Client assertion audience claim does not match Realm issuer, or iss/sub is not the "
                            "client ID.")
        allowed = {f"{base}/{t}/oauth2/v2.0/token".lower() for t in tenants}
        allowed |= {f"{base}/{t}/oauth2/token".lower() for t in tenants}
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a.rstrip("/").lower() in allowed for a in auds):
            raise _AadError(401, "invalid_client", 700023,
                            f"Client assertion audience claim does not match the token endpoint: {aud!r}.")
        try:
            exp = float(claims["exp"])
            nbf = float(claims.get("nbf", claims.get("iat", now)))
        except (KeyError, TypeError, ValueError) as exc:
            raise _AadError(401, "invalid_client", 700024, "Client assertion has no valid exp claim.") from exc
        if exp <= now or nbf > now + 300:
            raise _AadError(400, "invalid_client", 700024, "Client assertion is not within its valid time range.")

    # -- managed identity ------------------------------------------------------------------------------------

    def _msi(self, request: EmuRequest) -> EmuResponse:
        def fail(status: int, message: str) -> EmuResponse:
            return EmuResponse(status, {"statusCode": status, "message": message,
                                        "correlationId": str(uuid.uuid4())})

        expected = self.state.identity_header
        sent = request.headers.get("x-identity-header", "")
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            return fail(401, "The X-IDENTITY-HEADER header is missing or does not match IDENTITY_HEADER.")
        if request.q("api-version") != MSI_API_VERSION:
            return fail(400, f"api-version must be {MSI_API_VERSION}.")
        resource = request.q("resource") or ""
        if not resource:
            return fail(400, "The 'resource' query parameter is required.")
        resource = scope_to_resource(resource)
        identity = self._select_identity(request)
        if identity is None:
            return fail(400, "No managed identity matches the request (client_id/object_id/mi_res_id), or the app "
                             "has no system-assigned identity.")
        try:
            self._check_resource(resource, identity.tenant_id)
        except _AadError as err:
            return fail(400, err.description)
        lifetime = self.state.token_lifetime
        token = self.issuer.issue(identity.tenant_id, resource, identity.principal_id, identity.client_id, lifetime,
                                  extra_claims={"roles": list(identity.roles), "xms_mirid": identity.resource_id,
                                                "app_displayname": identity.display_name})
        self.state.record(identity.client_id, identity.tenant_id, resource)
        return EmuResponse(200, {"access_token": token, "expires_on": str(int(time.time()) + lifetime),
                                 "resource": resource, "token_type": "Bearer", "client_id": identity.client_id})

    def _select_identity(self, request: EmuRequest) -> ManagedIdentity | None:
        with self.state.lock:
            identities = list(self.state.identities)
        for param, attr in (("client_id", "client_id"), ("object_id", "principal_id"),
                            ("principal_id", "principal_id"), ("mi_res_id", "resource_id")):
            wanted = request.q(param)
            if wanted:
                return next((i for i in identities if getattr(i, attr).lower() == wanted.lower()), None)
        return next((i for i in identities if i.system), None)
