"""Credentials: the app's own identity, and one Graph credential per Defender tenant.

The app's identity (Log Analytics, Sentinel, Table Storage, and the federated credential) comes from
``DefaultAzureCredential``. Graph calls in each Defender tenant use the multi-tenant app registration
(``DEFENDER_CLIENT_ID``) with a secret, a certificate, or, with neither, the managed identity's token for
``api://AzureADTokenExchange`` as a client assertion (secretless). Each tenant gets its own credential object, so a
token issued for one tenant can never be sent to another.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlparse

from azure.core.credentials import TokenCredential
from azure.identity import (
    CertificateCredential,
    ClientAssertionCredential,
    ClientSecretCredential,
    DefaultAzureCredential,
)

from .settings import Settings

# The audience Entra expects for a managed identity used as a federated credential, per cloud.
_FEDERATED_AUDIENCES = {
    "login.microsoftonline.us": "api://AzureADTokenExchangeUSGov",
    "login.chinacloudapi.cn": "api://AzureADTokenExchangeChina",
    "login.partner.microsoftonline.cn": "api://AzureADTokenExchangeChina",
}
PUBLIC_FEDERATED_AUDIENCE = "api://AzureADTokenExchange"


def federated_scope(authority_host: str) -> str:
    """Token scope for the federated credential's assertion in the authority's cloud."""
    host = urlparse(authority_host).hostname or ""
    return f"{_FEDERATED_AUDIENCES.get(host, PUBLIC_FEDERATED_AUDIENCE)}/.default"


class CredentialProvider:
    """Builds credentials once per process and hands out the same objects (so their token caches are reused)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._app: TokenCredential | None = None
        self._storage: TokenCredential | None = None
        self._graph: dict[str, TokenCredential] = {}

    def app(self) -> TokenCredential:
        """The app's own identity (managed identity in Azure)."""
        with self._lock:
            if self._app is None:
                s = self._settings
                # Instance discovery would ask login.microsoftonline.com about a sovereign or local authority.
                self._app = DefaultAzureCredential(
                    authority=s.authority_host,
                    disable_instance_discovery=s.disable_instance_discovery,
                    managed_identity_client_id=s.app_client_id,
                    exclude_interactive_browser_credential=True,
                    exclude_visual_studio_code_credential=True,
                    exclude_shared_token_cache_credential=True,
                )
            return self._app

    def storage(self) -> TokenCredential:
        """The identity for identity-based state storage: ``__clientId`` when it names another identity."""
        client_id = self._settings.storage.client_id
        if client_id is None or client_id == self._settings.app_client_id:
            return self.app()
        with self._lock:
            if self._storage is None:
                self._storage = DefaultAzureCredential(
                    authority=self._settings.authority_host, managed_identity_client_id=client_id,
                    disable_instance_discovery=self._settings.disable_instance_discovery,
                    exclude_interactive_browser_credential=True)
            return self._storage

    def graph(self, tenant_id: str) -> TokenCredential:
        """The credential that calls Graph in ``tenant_id``; never shared between tenants."""
        with self._lock:
            cred = self._graph.get(tenant_id)
        if cred is None:
            cred = self._build_graph(tenant_id)
            with self._lock:
                cred = self._graph.setdefault(tenant_id, cred)
        return cred

    def _build_graph(self, tenant_id: str) -> TokenCredential:
        s = self._settings
        if s.defender_client_id is None:
            # Only the home tenant: settings validation refuses more than one tenant without DEFENDER_CLIENT_ID.
            return self.app()
        common: dict[str, Any] = {"authority": s.authority_host}
        msal: dict[str, Any] = {**common, "disable_instance_discovery": s.disable_instance_discovery}
        if s.defender_client_secret is not None:
            return ClientSecretCredential(tenant_id, s.defender_client_id, s.defender_client_secret, **msal)
        if s.defender_client_certificate is not None:
            return CertificateCredential(tenant_id, s.defender_client_id,
                                         certificate_data=s.defender_client_certificate, **msal)
        if s.defender_client_certificate_path is not None:
            return CertificateCredential(tenant_id, s.defender_client_id,
                                         certificate_path=s.defender_client_certificate_path, **msal)
        app = self.app()
        scope = federated_scope(s.authority_host)

        def assertion() -> str:
            return app.get_token(scope).token

        return ClientAssertionCredential(tenant_id, s.defender_client_id, assertion, **common)
