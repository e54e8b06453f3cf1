"""App settings, read once from the environment into a typed, validated object.

This is the only module that reads ``os.environ``. Every error names the setting and says what a valid value
looks like, so a misconfigured deployment fails at start-up with an actionable message.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

Mode = Literal["sync", "pull-only", "data-only"]
ConflictPolicy = Literal["latest", "defender", "sentinel"]
Fanout = Literal["inline", "queue"]
MirrorTarget = Literal["sentinel-api", "defender-portal"]

log = logging.getLogger(__name__)

#: Graph's alertSeverity, a closed set: an unknown minSeverity is a typo (no rank can be guessed), so an error.
SEVERITY_ORDER = ("unknown", "informational", "low", "medium", "high")

# Every app setting the code reads; infra tests assert the Bicep sets each of the required ones.
SETTING_NAMES = (
    "DEFENDER_TENANT_IDS", "SYNC_TENANTS", "DEFENDER_CLIENT_ID", "DEFENDER_CLIENT_SECRET",
    "DEFENDER_CLIENT_CERTIFICATE", "DEFENDER_CLIENT_CERTIFICATE_PATH", "AZURE_AUTHORITY_HOST", "GRAPH_ENDPOINT",
    "LOGS_INGESTION_ENDPOINT", "LOGS_DCR_IMMUTABLE_ID", "LOGS_INGESTION_SCOPE", "SENTINEL_WORKSPACE_ID",
    "ARM_ENDPOINT", "AzureWebJobsStorage", "SYNC_STATE_STORAGE", "SYNC_INITIAL_LOOKBACK_DAYS", "SYNC_OVERLAP_SECONDS",
    "SYNC_TIME_BUDGET_SECONDS", "GRAPH_MAX_REQUESTS_PER_MINUTE", "SENTINEL_MAX_WRITES_PER_MINUTE",
    "SYNC_CONFLICT_POLICY", "SYNC_OWNER_MAP", "WEBHOOK_MAX_BODY_BYTES", "SYNC_FANOUT", "SYNC_QUEUE",
    "DEFENDER_PULL_SCHEDULE", "SENTINEL_RECONCILE_SCHEDULE", "SYNC_GRAPH_PAGE_SIZE", "AZURE_CLIENT_ID",
    "SYNC_MIRROR_TARGET", "SYNC_MIRROR_RULE_ID", "SYNC_MIRROR_REQUESTS_PER_MINUTE",
)
# Settings that hold credentials: never logged, never echoed in an error.
SECRET_SETTINGS = frozenset({"DEFENDER_CLIENT_SECRET", "DEFENDER_CLIENT_CERTIFICATE", "AzureWebJobsStorage",
                             "SYNC_STATE_STORAGE"})

#: Where requests and azure-core look for a CA bundle (in this order); read once into ``Settings.ca_bundle``.
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
#: Proxy variables. With none set (the usual deployment), the HTTP clients do not re-read the environment on every
#: request (``requests``' ``trust_env``: proxies, NO_PROXY, ~/.netrc, the CA bundle); with any set, they keep doing
#: so, which honours every proxy rule exactly as before at a cost of about 0.1 ms per request.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")

_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_WORKSPACE = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.OperationalInsights/workspaces/(?P<ws>[^/]+)$", re.IGNORECASE)
_QUEUE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")
_WELL_KNOWN_AUTHORITIES = frozenset({
    "login.microsoftonline.com", "login.microsoftonline.us", "login.chinacloudapi.cn", "login.microsoft.com",
    "login.windows.net", "login.partner.microsoftonline.cn", "login.microsoftonline.de", "sts.windows.net",
})
# Graph's serviceSource enum is evolvable (Microsoft adds members): an unknown value is a warning, never a start-up
# failure, and it is used as given (the filter compares case-insensitively).
_SERVICE_SOURCES = frozenset({
    "unknown", "microsoftDefenderForEndpoint", "microsoftDefenderForIdentity", "microsoftDefenderForCloudApps",
    "microsoftDefenderForOffice365", "microsoft365Defender", "azureAdIdentityProtection", "microsoftAppGovernance",
    "dataLossPrevention", "microsoftDefenderForCloud", "microsoftSentinel", "microsoftInsiderRiskManagement",
    "microsoftThreatIntelligence", "microsoftSecurityForAI",
})


class SettingsError(ValueError):
    """One or more app settings are missing or invalid; the message lists each with how to fix it."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("Invalid app settings:\n- " + "\n- ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TenantConfig:
    """One Defender tenant and its overrides from ``SYNC_TENANTS``."""

    tenant_id: str
    name: str
    mode: Mode = "sync"
    min_severity: str | None = None
    service_sources: frozenset[str] | None = None

    @property
    def writes_defender(self) -> bool:
        return self.mode == "sync"

    @property
    def mirrors(self) -> bool:
        return self.mode in ("sync", "pull-only")


@dataclass(frozen=True)
class StorageConfig:
    """Where the state tables and the fan-out queue live: a connection string or identity-based service URIs."""

    connection_string: str | None = field(default=None, repr=False)
    table_uri: str | None = None
    queue_uri: str | None = None
    client_id: str | None = None  # user-assigned identity for identity-based access

    @property
    def identity_based(self) -> bool:
        return self.connection_string is None


@dataclass(frozen=True)
class Settings:
    """The validated configuration of the app. Build it with :func:`load_settings`."""

    tenants: tuple[TenantConfig, ...]
    defender_client_id: str | None
    defender_client_secret: str | None = field(repr=False)
    defender_client_certificate: bytes | None = field(repr=False)
    defender_client_certificate_path: str | None
    authority_host: str
    disable_instance_discovery: bool
    graph_endpoint: str
    logs_ingestion_endpoint: str
    logs_dcr_immutable_id: str
    logs_ingestion_scope: str
    sentinel_workspace_id: str
    arm_endpoint: str
    storage: StorageConfig
    initial_lookback_days: float
    overlap_seconds: float
    time_budget_seconds: float
    graph_max_requests_per_minute: int
    sentinel_max_writes_per_minute: int
    conflict_policy: ConflictPolicy
    owner_map: Mapping[str, str]
    webhook_max_body_bytes: int
    fanout: Fanout
    queue_name: str
    graph_page_size: int = 50
    app_client_id: str | None = None
    #: Accepted but doubtful values (e.g. a serviceSource this version does not know), logged at start-up.
    warnings: tuple[str, ...] = ()
    mirror_target: MirrorTarget = "sentinel-api"
    mirror_rule_id: str | None = None           # the mirror analytics rule's name (GUID), with defender-portal
    mirror_requests_per_minute: int = 25
    #: CA bundle for TLS (``REQUESTS_CA_BUNDLE``, else ``CURL_CA_BUNDLE``); None: the default trust store.
    ca_bundle: str | None = None
    #: A proxy variable is set (:data:`PROXY_VARIABLES`): HTTP clients keep reading the environment per request.
    env_proxies: bool = False

    @property
    def graph_scope(self) -> str:
        return f"{self.graph_endpoint}/.default"

    @property
    def arm_scope(self) -> str:
        return f"{self.arm_endpoint}/.default"

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        """The configured tenant with this ID (case-insensitive), or None."""
        wanted = tenant_id.strip().lower()
        return next((t for t in self.tenants if t.tenant_id == wanted), None)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every app setting. Raises :class:`SettingsError` listing every problem at once."""
    env = os.environ if env is None else env
    problems: list[str] = []
    reader = _Reader(env, problems)

    tenant_ids = reader.tenant_ids()
    tenants = reader.tenants(tenant_ids)
    client_id = reader.optional("DEFENDER_CLIENT_ID")
    if client_id is not None and not _GUID.match(client_id):
        problems.append(f"DEFENDER_CLIENT_ID must be the application (client) ID GUID of the multi-tenant app "
                        f"registration, e.g. 00000000-0000-0000-0000-000000000000; got {client_id!r}.")
    secret = reader.optional("DEFENDER_CLIENT_SECRET")
    cert_content = reader.optional("DEFENDER_CLIENT_CERTIFICATE")
    cert_path = reader.optional("DEFENDER_CLIENT_CERTIFICATE_PATH")
    certificate = _certificate_bytes(cert_content, problems) if cert_content else None
    if sum(x is not None for x in (secret, cert_content, cert_path)) > 1:
        problems.append("Set only one of DEFENDER_CLIENT_SECRET, DEFENDER_CLIENT_CERTIFICATE and "
                        "DEFENDER_CLIENT_CERTIFICATE_PATH (or none, for the secretless federated credential).")
    if client_id is None and (secret or cert_content or cert_path):
        problems.append("DEFENDER_CLIENT_SECRET/DEFENDER_CLIENT_CERTIFICATE* need DEFENDER_CLIENT_ID: set the "
                        "client ID of the app registration they belong to.")
    if client_id is None and len(tenants) > 1:
        problems.append("DEFENDER_CLIENT_ID is required when DEFENDER_TENANT_IDS lists more than one tenant: the "
                        "app's own identity can only call Graph in its home tenant. Set it to the multi-tenant app "
                        "registration's client ID.")
    if cert_path is not None and not os.path.isfile(cert_path):
        problems.append(f"DEFENDER_CLIENT_CERTIFICATE_PATH points to {cert_path!r}, which is not a readable file.")

    authority = reader.endpoint("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com")
    graph = reader.endpoint("GRAPH_ENDPOINT", "https://graph.microsoft.com")
    arm = reader.endpoint("ARM_ENDPOINT", "https://management.azure.com")
    ingestion = reader.endpoint("LOGS_INGESTION_ENDPOINT", None)
    scope = reader.optional("LOGS_INGESTION_SCOPE") or "https://monitor.azure.com/.default"
    if not scope.startswith("https://") or not scope.endswith("/.default"):
        problems.append(f"LOGS_INGESTION_SCOPE must look like https://monitor.azure.com/.default; got {scope!r}.")
    dcr = reader.required("LOGS_DCR_IMMUTABLE_ID", "the immutable ID of the data collection rule, e.g. dcr-0123...")
    if dcr and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", dcr):
        problems.append(f"LOGS_DCR_IMMUTABLE_ID must be a DCR immutable ID like dcr-0123456789abcdef0123456789abcdef "
                        f"(the DCR's immutableId property, not its resource ID); got {dcr!r}.")
    workspace = reader.required("SENTINEL_WORKSPACE_ID", "the full ARM resource ID of the Sentinel workspace")
    if workspace and not _WORKSPACE.match(workspace):
        problems.append("SENTINEL_WORKSPACE_ID must be the full ARM resource ID of the Log Analytics workspace: "
                        "/subscriptions/<guid>/resourceGroups/<rg>/providers/Microsoft.OperationalInsights/"
                        f"workspaces/<name>; got {workspace!r}.")

    storage = reader.storage()
    policy = reader.choice("SYNC_CONFLICT_POLICY", ("latest", "defender", "sentinel"), "latest")
    fanout = reader.choice("SYNC_FANOUT", ("inline", "queue"), "inline")
    queue = reader.optional("SYNC_QUEUE") or "defender-tenant-work"
    if not _QUEUE.match(queue):
        problems.append(f"SYNC_QUEUE must be a Storage queue name (3-63 lower-case letters, digits and single "
                        f"hyphens); got {queue!r}.")
    mirror_target = reader.choice("SYNC_MIRROR_TARGET", ("sentinel-api", "defender-portal"), "sentinel-api")
    rule_id = reader.optional("SYNC_MIRROR_RULE_ID")
    if rule_id is not None and not _GUID.match(rule_id):
        problems.append(f"SYNC_MIRROR_RULE_ID must be the mirror analytics rule's resource name, a GUID like "
                        f"00000000-0000-0000-0000-000000000000; got {rule_id!r}.")
    if mirror_target == "defender-portal" and rule_id is None:
        problems.append("SYNC_MIRROR_RULE_ID is missing: SYNC_MIRROR_TARGET=defender-portal needs the resource name "
                        "(GUID) of the mirror analytics rule the infra deploys (the deployment's mirrorRuleId output).")
    settings = Settings(
        tenants=tenants,
        defender_client_id=client_id.lower() if client_id else None,
        defender_client_secret=secret,
        defender_client_certificate=certificate,
        defender_client_certificate_path=cert_path,
        authority_host=authority,
        disable_instance_discovery=urlparse(authority).hostname not in _WELL_KNOWN_AUTHORITIES,
        graph_endpoint=graph,
        logs_ingestion_endpoint=ingestion,
        logs_dcr_immutable_id=dcr,
        logs_ingestion_scope=scope,
        sentinel_workspace_id=workspace,
        arm_endpoint=arm,
        storage=storage,
        initial_lookback_days=reader.number("SYNC_INITIAL_LOOKBACK_DAYS", 7, 0.0, 3650),
        overlap_seconds=reader.number("SYNC_OVERLAP_SECONDS", 120, 0.0, 86400),
        time_budget_seconds=reader.number("SYNC_TIME_BUDGET_SECONDS", 540, 1, 86400),
        graph_max_requests_per_minute=int(reader.number("GRAPH_MAX_REQUESTS_PER_MINUTE", 100, 1, 100000, True)),
        sentinel_max_writes_per_minute=int(reader.number("SENTINEL_MAX_WRITES_PER_MINUTE", 300, 1, 100000, True)),
        conflict_policy=policy,  # type: ignore[arg-type]
        owner_map=reader.owner_map(),
        webhook_max_body_bytes=int(reader.number("WEBHOOK_MAX_BODY_BYTES", 4 * 1024 * 1024, 1024, 100 * 2**20,
                                                 True)),
        fanout=fanout,  # type: ignore[arg-type]
        queue_name=queue,
        graph_page_size=int(reader.number("SYNC_GRAPH_PAGE_SIZE", 50, 1, 50, True)),
        app_client_id=reader.optional("AZURE_CLIENT_ID"),
        warnings=tuple(reader.warnings),
        mirror_target=mirror_target,  # type: ignore[arg-type]
        mirror_rule_id=rule_id.lower() if rule_id else None,
        mirror_requests_per_minute=int(reader.number("SYNC_MIRROR_REQUESTS_PER_MINUTE", 25, 1, 30, True)),
        ca_bundle=_ca_bundle(env, problems),
        env_proxies=any(env.get(name, "").strip() for name in PROXY_VARIABLES),
    )
    if problems:
        raise SettingsError(problems)
    for warning in settings.warnings:
        log.warning(warning, extra={"action": "settings", "outcome": "warning"})
    return settings


def _ca_bundle(env: Mapping[str, str], problems: list[str]) -> str | None:
    """The CA bundle the HTTP clients verify TLS with, read once here (they no longer read the environment)."""
    for name in CA_BUNDLE_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            if not os.path.exists(value):
                problems.append(f"{name} points to {value!r}, which does not exist: set it to a PEM file (or a "
                                f"directory) of trusted CA certificates, or remove it to use the default store.")
            return value
    return None


def _certificate_bytes(value: str, problems: list[str]) -> bytes | None:
    """PEM text as is, or base64 PFX content (what a Key Vault reference to a certificate yields)."""
    if "-----BEGIN" in value:
        return value.encode("utf-8")
    import base64
    import binascii

    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        problems.append("DEFENDER_CLIENT_CERTIFICATE must be PEM text (certificate and private key) or base64 PFX "
                        "content, as a Key Vault certificate reference provides; it is neither.")
        return None


class _Reader:
    """Reads settings from ``env`` and appends a problem for each invalid one instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self.env = env
        self.problems = problems
        self.warnings: list[str] = []

    def optional(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def required(self, name: str, what: str) -> str:
        value = self.optional(name)
        if value is None:
            self.problems.append(f"{name} is missing: set it to {what}.")
            return ""
        return value

    def endpoint(self, name: str, default: str | None) -> str:
        value = self.optional(name) or default
        if value is None:
            self.problems.append(f"{name} is missing: set it to an https URL, e.g. the data collection rule's "
                                 "logs ingestion endpoint https://<dcr>.<region>-1.ingest.monitor.azure.com.")
            return ""
        parsed = urlparse(value)
        if parsed.scheme != "https" or not parsed.hostname:
            self.problems.append(f"{name} must be an https URL such as https://host[:port]; got {value!r}.")
            return value
        if parsed.query or parsed.fragment:
            self.problems.append(f"{name} must not have a query string or fragment; got {value!r}.")
        return value.rstrip("/")

    def number(self, name: str, default: float, low: float, high: float, integer: bool = False) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            self.problems.append(f"{name} must be {kind} between {low:g} and {high:g}; got {raw!r}.")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name} must be between {low:g} and {high:g}; got {raw!r}.")
            return default
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.optional(name)
        if value is None:
            return default
        if value.lower() not in options:
            self.problems.append(f"{name} must be one of {', '.join(options)}; got {value!r}.")
            return default
        return value.lower()

    def json_object(self, name: str, what: str) -> dict[str, Any] | None:
        """The setting parsed as a JSON object; None (and a problem naming ``what`` is expected) otherwise."""
        raw = self.optional(name)
        if raw is None:
            return None
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            self.problems.append(f"{name} is not valid JSON ({exc.msg} at position {exc.pos}): it must be {what}.")
            return None
        if not isinstance(parsed, dict):
            self.problems.append(f"{name} must be a JSON object: {what}.")
            return None
        return parsed

    def tenant_ids(self) -> list[str]:
        raw = self.optional("DEFENDER_TENANT_IDS")
        if raw is None:
            self.problems.append("DEFENDER_TENANT_IDS is missing: set it to the comma-separated Entra tenant IDs "
                                 "(GUIDs) whose Defender XDR incidents are synced.")
            return []
        ids: list[str] = []
        for part in raw.split(","):
            item = part.strip().lower()
            if not item:
                continue
            if not _GUID.match(item):
                self.problems.append(f"DEFENDER_TENANT_IDS has {item!r}, which is not a tenant ID: each entry must "
                                     "be a GUID like 00000000-0000-0000-0000-000000000000.")
            elif item not in ids:
                ids.append(item)
        if not ids and not any("DEFENDER_TENANT_IDS" in p for p in self.problems):
            self.problems.append("DEFENDER_TENANT_IDS lists no tenant: give at least one tenant ID.")
        return ids

    def tenants(self, ids: list[str]) -> tuple[TenantConfig, ...]:
        overrides: dict[str, object] = {}
        parsed = self.json_object("SYNC_TENANTS", 'an object keyed by tenant ID, e.g. {"<tenant-guid>": '
                                                  '{"name": "Contoso", "mode": "pull-only"}}')
        if parsed is not None:
            overrides = {str(k).strip().lower(): v for k, v in parsed.items()}
            for key in overrides:
                if key not in ids:
                    self.problems.append(f"SYNC_TENANTS has overrides for {key!r}, which is not in "
                                         "DEFENDER_TENANT_IDS: add it there or remove the entry.")
        return tuple(self._tenant(tid, overrides.get(tid)) for tid in ids)

    def _tenant(self, tenant_id: str, raw: object) -> TenantConfig:
        if raw is None:
            return TenantConfig(tenant_id=tenant_id, name=tenant_id)
        where = f"SYNC_TENANTS[{tenant_id!r}]"
        if not isinstance(raw, dict):
            self.problems.append(f"{where} must be an object with optional name, mode, minSeverity, serviceSources.")
            return TenantConfig(tenant_id=tenant_id, name=tenant_id)
        unknown = set(raw) - {"name", "mode", "minSeverity", "serviceSources"}
        if unknown:
            self.problems.append(f"{where} has unknown keys {sorted(unknown)}; allowed: name, mode, minSeverity, "
                                 "serviceSources.")
        name = raw.get("name", tenant_id)
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            self.problems.append(f"{where}.name must be a non-empty string of at most 100 characters.")
            name = tenant_id
        mode = raw.get("mode", "sync")
        if mode not in ("sync", "pull-only", "data-only"):
            self.problems.append(f"{where}.mode must be sync, pull-only or data-only; got {mode!r}.")
            mode = "sync"
        severity = raw.get("minSeverity")
        if severity is not None and (not isinstance(severity, str) or severity.lower() not in SEVERITY_ORDER):
            self.problems.append(f"{where}.minSeverity must be one of {', '.join(SEVERITY_ORDER)}; got {severity!r}.")
            severity = None
        sources = raw.get("serviceSources")
        source_set: frozenset[str] | None = None
        if sources is not None:
            if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources) or not sources:
                self.problems.append(f"{where}.serviceSources must be a non-empty list of Graph serviceSource values "
                                     "such as microsoftDefenderForEndpoint.")
            else:
                lowered = {s.lower(): s for s in _SERVICE_SOURCES}
                bad = [s for s in sources if s.lower() not in lowered]
                if bad:
                    self.warnings.append(f"{where}.serviceSources has values this version does not know {bad} "
                                         "(used as given: Microsoft adds sources; check the spelling if "
                                         f"unintended); known: {', '.join(sorted(_SERVICE_SOURCES))}.")
                source_set = frozenset(str(lowered.get(str(s).lower(), s)) for s in sources)
        return TenantConfig(tenant_id=tenant_id, name=name.strip(), mode=mode,
                            min_severity=severity.lower() if isinstance(severity, str) else None,
                            service_sources=source_set)

    def owner_map(self) -> dict[str, str]:
        example = ('an object mapping the Sentinel-side identity to the Defender-side one, e.g. '
                   '{"analyst@mssp.com": "analyst@customer.com"}')
        parsed = self.json_object("SYNC_OWNER_MAP", example)
        if parsed is None:
            return {}
        if not all(isinstance(v, str) for v in parsed.values()):
            self.problems.append("SYNC_OWNER_MAP must be a JSON object of strings (Sentinel identity -> Defender "
                                 "identity).")
            return {}
        lowered = {k.strip().lower(): v.strip().lower() for k, v in parsed.items()}
        if len(set(lowered.values())) != len(lowered):
            self.problems.append("SYNC_OWNER_MAP maps two Sentinel identities to the same Defender identity; the "
                                 "mapping must be one-to-one so changes can flow back.")
        return lowered

    def storage(self) -> StorageConfig:
        for prefix in ("SYNC_STATE_STORAGE", "AzureWebJobsStorage"):
            config = self._storage(prefix)
            if config is not None:
                return config
        self.problems.append("AzureWebJobsStorage is missing: set a storage connection string, or identity-based "
                             "AzureWebJobsStorage__accountName (or __tableServiceUri and __queueServiceUri) with "
                             "__credential=managedidentity.")
        return StorageConfig()

    def _storage(self, prefix: str) -> StorageConfig | None:
        conn = self.optional(prefix)
        if conn is not None:
            if "=" not in conn:
                self.problems.append(f"{prefix} must be a storage connection string "
                                     "(DefaultEndpointsProtocol=...;AccountName=...;...) or use the identity-based "
                                     f"{prefix}__accountName form.")
            return StorageConfig(connection_string=conn)
        account = self.optional(f"{prefix}__accountName")
        table_uri = self.optional(f"{prefix}__tableServiceUri")
        queue_uri = self.optional(f"{prefix}__queueServiceUri")
        if account is None and table_uri is None and queue_uri is None:
            return None
        if account is not None:
            table_uri = table_uri or f"https://{account}.table.core.windows.net"
            queue_uri = queue_uri or f"https://{account}.queue.core.windows.net"
        if table_uri is None:
            self.problems.append(f"{prefix}__tableServiceUri is missing: identity-based state storage needs the "
                                 "table service URI (or set __accountName).")
        if queue_uri is None:
            queue_uri = (table_uri or "").replace(".table.", ".queue.")
        credential = self.optional(f"{prefix}__credential")
        if credential is not None and credential.lower() != "managedidentity":
            self.problems.append(f"{prefix}__credential must be managedidentity when set; got {credential!r}.")
        return StorageConfig(table_uri=table_uri, queue_uri=queue_uri, client_id=self.optional(f"{prefix}__clientId"))


_FINGERPRINT_EXTRA = ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "APPLICATIONINSIGHTS_CONNECTION_STRING",
                      *CA_BUNDLE_VARIABLES, *PROXY_VARIABLES)


def settings_fingerprint(env: Mapping[str, str] | None = None) -> str:
    """A digest of every setting the app reads, so a process notices when its configuration changed."""
    import hashlib

    env = os.environ if env is None else env
    names = sorted(k for k in env if k in SETTING_NAMES or k in _FINGERPRINT_EXTRA
                   or k.startswith(("AzureWebJobsStorage__", "SYNC_STATE_STORAGE__")))
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{env[name]}\0".encode())
    return digest.hexdigest()


def queue_connection_name(env: Mapping[str, str] | None = None) -> str:
    """The app-setting prefix of the account that holds the fan-out queue (for the queue trigger binding)."""
    env = os.environ if env is None else env
    if any(k == "SYNC_STATE_STORAGE" or k.startswith("SYNC_STATE_STORAGE__") for k in env):
        return "SYNC_STATE_STORAGE"
    return "AzureWebJobsStorage"


def telemetry_connection_string(env: Mapping[str, str] | None = None) -> str | None:
    """``APPLICATIONINSIGHTS_CONNECTION_STRING``, when telemetry is wanted."""
    env = os.environ if env is None else env
    value = env.get("APPLICATIONINSIGHTS_CONNECTION_STRING", "").strip()
    return value or None
