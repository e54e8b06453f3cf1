"""BearerSession: what is retried, and what is not (a POST that appends must never be sent twice blindly)."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from azure.core.credentials import AccessToken

from sync.http import ApiError, BearerSession, RetryPolicy


class Token:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("t", 2**31)


class Scripted(requests.Session):
    """Answers from a script: an exception to raise or (status, headers)."""

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = script
        self.calls = 0

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        status, headers = step
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
        response._content = b"{}"
        return response


def session(script: list[Any]) -> tuple[BearerSession, Scripted]:
    fake = Scripted(script)
    waits: list[float] = []
    bearer = BearerSession(Token(), "https://graph/.default", session=fake, sleep=waits.append,
                           policy=RetryPolicy(max_attempts=4))
    return bearer, fake


def test_idempotent_requests_retry_drops_and_honour_retry_after() -> None:
    bearer, fake = session([requests.ConnectionError("reset"), (429, {"Retry-After": "2"}), (200, {})])
    assert bearer.request("GET", "https://graph/x").status_code == 200
    assert fake.calls == 3 and bearer.stats.throttled == 1


def test_appending_post_is_not_retried_after_an_ambiguous_failure() -> None:
    bearer, fake = session([requests.ConnectionError("reset"), (200, {})])
    with pytest.raises(ApiError):
        bearer.request("POST", "https://graph/comments", json={}, idempotent=False)
    assert fake.calls == 1
    bearer, fake = session([(500, {}), (200, {})])
    with pytest.raises(ApiError):
        bearer.request("POST", "https://graph/comments", json={}, idempotent=False)
    assert fake.calls == 1


def test_appending_post_is_retried_when_throttled() -> None:
    bearer, fake = session([(429, {"Retry-After": "1"}), (503, {}), (201, {})])
    assert bearer.request("POST", "https://graph/comments", json={}, idempotent=False).status_code == 201
    assert fake.calls == 3


# ---------------------------------------------------------------------------------------- environment, TLS trust


def test_sessions_read_tls_trust_from_settings_and_the_environment_only_with_a_proxy(tmp_path: Any) -> None:
    """Without a proxy variable the sessions do not re-read the environment per request; the CA bundle comes from
    the settings (passed explicitly, since requests and azure-core honour REQUESTS_CA_BUNDLE only with trust_env)."""
    from sync.http import new_session, transport_options
    from sync.settings import load_settings
    from tests.test_settings import base_env

    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    plain = load_settings(base_env(REQUESTS_CA_BUNDLE=str(bundle)))
    session = new_session(plain)
    assert session.trust_env is False and session.verify == str(bundle)
    assert transport_options(plain) == {"use_env_settings": False, "connection_verify": str(bundle)}
    proxied = load_settings(base_env(HTTPS_PROXY="http://proxy.contoso.com:3128"))
    assert new_session(proxied).trust_env is True and new_session(proxied).verify is True
    assert transport_options(proxied) == {"use_env_settings": True}


def test_clients_trust_the_emulators_without_reading_the_environment_per_request(
        make_app_settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph, ARM, Logs Ingestion and Table clients built by the app context: TLS to the emulators verifies with
    the settings' CA bundle, and no request walks the environment for proxies or reads ~/.netrc."""
    import requests.sessions
    from conftest import apply_settings

    from sync.context import AppContext
    from sync.settings import load_settings

    env = make_app_settings()
    apply_settings(monkeypatch, env)  # the managed identity's endpoint is read by azure-identity itself
    settings = load_settings(env)
    ctx = AppContext(settings)
    tenant = settings.tenants[0].tenant_id
    for credential, scope in ((ctx.credentials.graph(tenant), settings.graph_scope),
                              (ctx.credentials.app(), settings.logs_ingestion_scope),
                              (ctx.credentials.app(), settings.arm_scope)):
        credential.get_token(scope)  # identity keeps its own transport; tokens are cached from here on

    def environment_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request read the environment")

    monkeypatch.setattr(requests.sessions, "get_environ_proxies", environment_read)
    monkeypatch.setattr(requests.sessions, "get_netrc_auth", environment_read)
    graph = ctx.graph(tenant).session.request("GET", f"{settings.graph_endpoint}/v1.0/security/incidents?$top=1")
    assert graph.status_code == 200
    result = ctx.sink.upload("DefenderIncidents_CL", [{"TimeGenerated": "2026-01-01T00:00:00Z"}])
    assert result.requests == 1 and result.ok, result.errors
    ctx.state.ensure_tables()
    arm = ctx.sentinel._session._session
    assert arm.trust_env is False and arm.verify == settings.ca_bundle
