"""SentinelClient against the Sentinel emulator over real HTTPS (emulators/server.py), with real bearer tokens.

A module-scoped HTTPS server serves a fresh SentinelService per test; faults come from the server's FaultPlan, as in
the end-to-end setup. A few boundary-validation cases use an in-process fake session instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import requests
from azure.core.credentials import AccessToken

from emulators.base import Fault, FaultPlan, match_request
from emulators.certs import ensure_tls
from emulators.sentinel import SentinelService
from emulators.server import EmuHTTPServer, server_context
from emulators.tokens import TokenIssuer
from sync.budget import BudgetExhausted, Deadline
from sync.http import ApiError, BearerSession, RateLimiter, RetryPolicy
from sync.sentinel import READ_ONLY_PROPERTIES, ConflictError, SentinelClient, SentinelResponseError
from sync.timeutil import parse_time

WS = ("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-soc/providers/"
      "Microsoft.OperationalInsights/workspaces/ws-central")
ARM_AUDIENCE = "https://management.azure.com"
TENANT = "11111111-2222-3333-4444-555555555555"


class StubCredential:
    """Hands out emulator-signed ARM tokens (what DefaultAzureCredential would get from the Entra emulator)."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self.issuer = issuer
        self.token = issuer.issue(TENANT, ARM_AUDIENCE, "aaaaaaaa-0000-0000-0000-000000000001", "sync-app")

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, 2_000_000_000)


class Env:
    def __init__(self, server: EmuHTTPServer, issuer: TokenIssuer, ca: str) -> None:
        self.server = server
        self.issuer = issuer
        self.ca = ca
        self.faults: FaultPlan = server.faults  # type: ignore[assignment]
        self.sleeps: list[float] = []
        self.service = SentinelService(lambda h: issuer.verify_bearer(h, ARM_AUDIENCE), [WS])
        server.service = self.service
        self.faults.clear(counts=True)
        self.credential = StubCredential(issuer)
        self.http = requests.Session()
        self.http.trust_env = False        # the shell's REQUESTS_CA_BUNDLE would override verify=
        self.http.verify = ca
        self.session = BearerSession(self.credential, f"{ARM_AUDIENCE}/.default",
                                     policy=RetryPolicy(max_attempts=4, backoff_base=0.01),
                                     session=self.http, sleep=self.sleeps.append)

    def client(self, write_limiter: RateLimiter | None = None) -> SentinelClient:
        return SentinelClient(self.session, self.server.base_url, WS, write_limiter=write_limiter)


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmuHTTPServer, TokenIssuer, str]]:
    tls = ensure_tls(tmp_path_factory.mktemp("tls"))
    issuer = TokenIssuer()
    placeholder = SentinelService(None, [WS])
    server = EmuHTTPServer(placeholder, server_context(str(tls.cert_pem), str(tls.key_pem)), faults=FaultPlan())
    server.start()
    yield server, issuer, str(tls.ca_pem)
    server.stop()


@pytest.fixture
def env(https_server: tuple[EmuHTTPServer, TokenIssuer, str]) -> Iterator[Env]:
    e = Env(*https_server)
    yield e
    e.http.close()


def dl() -> Deadline:
    return Deadline(20)


def base_props(**kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"title": "Mirrored incident", "severity": "Medium", "status": "New"}
    p.update(kw)
    return p


# ----------------------------------------------------------------------------------------------- basics


def test_get_missing_is_none_and_put_creates(env: Env) -> None:
    client = env.client()
    assert client.get_incident("inc-1", deadline=dl()) is None
    created = client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    assert created["name"] == "inc-1" and created["properties"]["providerName"] == "Azure Sentinel"
    got = client.get_incident("inc-1", deadline=dl())
    assert got is not None and got["etag"] == created["etag"]
    assert got["id"].lower() == client.incident_resource_id("inc-1").lower()
    assert client.incident_url("inc-1").startswith(env.server.base_url)
    assert "api-version=2025-09-01" in client.incident_url("inc-1")


def test_wrong_token_audience_is_an_api_error(env: Env) -> None:
    env.credential.token = env.issuer.issue(TENANT, "https://graph.microsoft.com", "x", "sync-app")
    with pytest.raises(ApiError) as info:
        env.client().get_incident("inc-1", deadline=dl())
    assert info.value.status == 401 and info.value.code == "InvalidAuthenticationToken"


def test_put_strips_read_only_properties_and_none(env: Env) -> None:
    client = env.client()
    current = client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    sent: list[dict[str, Any]] = []
    original = env.http.request

    def spy(method: str, url: str, **kw: Any) -> requests.Response:
        if method == "PUT":
            sent.append(kw["json"])
        return original(method, url, **kw)

    env.http.request = spy  # type: ignore[method-assign,assignment]
    props = dict(current["properties"], severity="High", classification=None, alerts=[], comments=[])
    updated = client.put_incident("inc-1", props, etag=current["etag"], deadline=dl())
    assert updated["properties"]["severity"] == "High"
    body = sent[-1]
    assert set(body) == {"properties", "etag"} and body["etag"] == current["etag"]
    assert not READ_ONLY_PROPERTIES & set(body["properties"])
    assert "classification" not in body["properties"]
    assert {"title", "severity", "status", "owner", "labels"} <= set(body["properties"])
    with pytest.raises(ValueError, match="status"):
        client.put_incident("inc-1", {"title": "t", "severity": "Low"}, etag=None, deadline=dl())


def test_put_with_stale_etag_raises_conflict(env: Env) -> None:
    client = env.client()
    first = client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    client.put_incident("inc-1", base_props(severity="Low"), etag=first["etag"], deadline=dl())
    with pytest.raises(ConflictError) as info:
        client.put_incident("inc-1", base_props(severity="High"), etag=first["etag"], deadline=dl())
    assert info.value.status == 409 and "New version of resource" in str(info.value)
    assert isinstance(info.value, ApiError)


def test_bad_closure_is_a_non_retried_400(env: Env) -> None:
    client = env.client()
    with pytest.raises(ApiError) as info:
        client.put_incident("inc-1", base_props(status="Closed", classification="TruePositive"), etag=None,
                            deadline=dl())
    assert info.value.status == 400 and "classificationReason" in str(info.value)
    assert env.session.stats.retries == 0


# ----------------------------------------------------------------------------------------------- GET-merge-PUT


def test_update_creates_when_absent(env: Env) -> None:
    client = env.client()
    seen: list[Any] = []

    def mutate(current: dict[str, Any] | None) -> dict[str, Any] | None:
        seen.append(current)
        return base_props(labels=[{"labelName": "tenant:contoso"}])

    result = client.update_incident("inc-new", mutate, deadline=dl())
    assert seen == [None]
    assert result is not None and result["properties"]["labels"][0]["labelName"] == "tenant:contoso"
    assert env.service.writes("inc-new") == 1


def test_conflict_rereads_and_remerges_preserving_a_concurrent_analyst_edit(env: Env) -> None:
    client = env.client()
    client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    env.service.reset_write_log()
    calls: list[dict[str, Any]] = []

    def mutate(current: dict[str, Any] | None) -> dict[str, Any] | None:
        assert current is not None
        calls.append(json.loads(json.dumps(current)))
        if len(calls) == 1:
            # an analyst edits the incident between our GET and our PUT
            env.service.analyst_update("inc-1", owner="ana@contoso.com", updated_by="ana@contoso.com")
        current["severity"] = "High"
        current["labels"] = [*current["labels"], {"labelName": "synced"}]
        return current

    result = client.update_incident("inc-1", mutate, deadline=dl())
    assert result is not None
    assert len(calls) == 2
    assert calls[0]["owner"]["userPrincipalName"] is None
    assert calls[1]["owner"]["userPrincipalName"] == "ana@contoso.com"
    p = env.service.get("inc-1")["properties"]  # type: ignore[index]
    assert p["owner"]["userPrincipalName"] == "ana@contoso.com" and p["severity"] == "High"
    assert [lbl["labelName"] for lbl in p["labels"]] == ["synced"]
    assert env.service.writes("inc-1") == 1 and [w.status for w in env.service.rejected_writes()] == [409]
    assert env.session.stats.extra["sentinelConflicts"] == 1


def test_conflicts_beyond_the_limit_raise(env: Env) -> None:
    client = env.client()
    client.put_incident("inc-1", base_props(), etag=None, deadline=dl())

    def always_raced(current: dict[str, Any] | None) -> dict[str, Any] | None:
        assert current is not None
        env.service.analyst_update("inc-1", description=f"edit {current.get('description')}")
        return current

    with pytest.raises(ConflictError):
        client.update_incident("inc-1", always_raced, deadline=dl(), max_conflicts=2)
    assert len(env.service.rejected_writes()) == 3


def test_mutate_returning_none_makes_no_write(env: Env) -> None:
    client = env.client()
    created = client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    env.service.reset_write_log()
    puts_before = env.session.stats.writes
    result = client.update_incident("inc-1", lambda current: None, deadline=dl())
    assert result is not None and result["etag"] == created["etag"]
    assert client.update_incident("absent", lambda current: None, deadline=dl()) is None
    assert env.service.writes() == 0 and env.session.stats.writes == puts_before
    assert env.service.rejected_writes() == []


def test_a_put_applied_but_its_response_lost_is_not_written_twice(env: Env) -> None:
    client = env.client()
    client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    env.service.reset_write_log()
    original = env.http.request
    lost = [True]

    def lose_first_put_response(method: str, url: str, **kw: Any) -> requests.Response:
        response = original(method, url, **kw)
        if method == "PUT" and lost[0]:
            lost[0] = False
            raise requests.ConnectionError("connection reset after the server committed")
        return response

    env.http.request = lose_first_put_response  # type: ignore[method-assign,assignment]

    def mutate(current: dict[str, Any] | None) -> dict[str, Any] | None:
        assert current is not None
        if current["severity"] == "High":
            return None                          # already as wanted: no write
        current["severity"] = "High"
        return current

    result = client.update_incident("inc-1", mutate, deadline=dl())
    assert result is not None and result["properties"]["severity"] == "High"
    # the session retried the PUT with the old etag (409), the client re-read and found nothing to do
    assert env.service.writes("inc-1") == 1
    assert [w.status for w in env.service.rejected_writes()] == [409]


def test_deleted_between_get_and_put_is_seen_as_absent(env: Env) -> None:
    client = env.client()
    client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    seen: list[bool] = []

    def mutate(current: dict[str, Any] | None) -> dict[str, Any] | None:
        seen.append(current is not None)
        if current is None:
            return None                         # the mirror does not recreate a deleted incident
        env.service.analyst_delete("inc-1")
        return current

    assert client.update_incident("inc-1", mutate, deadline=dl()) is None
    assert seen == [True, False] and env.service.get("inc-1") is None


# ----------------------------------------------------------------------------------------------- throttling & caps


def test_429_retry_after_is_honoured(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    client = env.client()
    client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    env.faults.queue("sentinel", Fault("status", 429, retry_after="3"), times=2)
    caplog.set_level(logging.DEBUG)
    got = client.get_incident("inc-1", deadline=dl())
    assert got is not None
    assert env.sleeps == [3.0, 3.0]
    assert env.session.stats.throttled == 2
    text = caplog.text + json.dumps([r.__dict__ for r in caplog.records], default=str)
    assert env.credential.token not in text and "Bearer" not in text


def test_retry_after_beyond_the_deadline_stops_cleanly(env: Env) -> None:
    env.faults.queue("sentinel", Fault("status", 429, retry_after="120"))
    with pytest.raises(BudgetExhausted):
        env.client().get_incident("inc-1", deadline=Deadline(10))


def test_5xx_and_dropped_connections_are_retried_for_puts(env: Env) -> None:
    client = env.client()
    env.faults.queue("sentinel", Fault("status", 503), when=match_request(method="PUT"))
    env.faults.queue("sentinel", Fault("drop"), when=match_request(method="PUT"))
    created = client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    assert created["name"] == "inc-1"
    assert env.session.stats.retries == 2 and env.service.writes() == 1


def test_write_cap_spaces_puts_but_not_reads(env: Env) -> None:
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(2, clock=lambda: now[0], sleep=sleep)
    client = env.client(write_limiter=limiter)
    budget = Deadline(1000, clock=lambda: now[0])
    for i in range(3):
        client.put_incident(f"inc-{i}", base_props(), etag=None, deadline=budget)
    assert waits == [60.0]
    for _ in range(5):
        client.get_incident("inc-0", deadline=budget)
    client.put_comment("inc-0", "c-1", "hello", deadline=budget)
    assert waits == [60.0]                      # reads take no write slot; the 4th write fits the new window
    client.put_comment("inc-0", "c-2", "hello", deadline=budget)
    assert waits == [60.0, 60.0]
    client.put_comment("inc-0", "c-3", "hello", deadline=budget)                # window full again
    with pytest.raises(BudgetExhausted):        # a cap wait longer than the budget ends the run cleanly
        client.put_incident("inc-9", base_props(), etag=None, deadline=Deadline(5, clock=lambda: now[0]))
    assert env.service.writes() == 6 and waits == [60.0, 60.0]


# ----------------------------------------------------------------------------------------------- listing


def test_list_follows_next_link_and_filters(env: Env) -> None:
    client = env.client()
    for i in range(25):
        env.service.seed_incident(f"inc-{i:02d}", title=f"t{i}")
    mid = parse_time(env.service.get("inc-10")["properties"]["lastModifiedTimeUtc"])  # type: ignore[index]
    names = [i["name"] for i in client.list_incidents(deadline=dl(), top=10)]
    assert names == [f"inc-{i:02d}" for i in range(25)]
    gets = [r for r in env.server.log.entries("sentinel", "GET") if r.path.endswith("/incidents")]
    assert len(gets) == 3 and all(r.query["$top"] == ["10"] for r in gets)
    since = [i["name"] for i in client.list_incidents(modified_since=mid, deadline=dl(), top=7)]
    assert since[0] in ("inc-09", "inc-10") and since[-1] == "inc-24"   # ge on a microsecond-cut cursor
    env.service.seed_xdr_incident("2972395", name="xdr-1")
    found = list(client.list_incidents(provider_incident_id="2972395", deadline=dl()))
    assert [i["name"] for i in found] == ["xdr-1"]
    assert found[0]["properties"]["providerName"] == "Microsoft XDR"
    both = list(client.list_incidents(provider_incident_id="2972395", modified_since=mid - timedelta(days=1),
                                      deadline=dl()))
    assert [i["name"] for i in both] == ["xdr-1"]
    assert list(client.list_incidents(provider_incident_id="o'brien", deadline=dl())) == []
    with pytest.raises(ValueError):
        list(client.list_incidents(deadline=dl(), top=1001))


def test_list_retries_a_throttled_page(env: Env) -> None:
    client = env.client()
    for i in range(6):
        env.service.seed_incident(f"inc-{i}")
    env.faults.queue("sentinel", Fault("status", 429, retry_after="1"),
                     when=match_request(method="GET", query={"$skipToken": ""}))
    assert len(list(client.list_incidents(deadline=dl(), top=4))) == 6
    assert env.sleeps == [1.0]


def test_next_link_to_another_host_is_refused(env: Env) -> None:
    client = env.client()
    for i in range(3):
        env.service.seed_incident(f"inc-{i}")
    env.service.base_url = "https://attacker.example"
    with pytest.raises(SentinelResponseError, match="outside"):
        list(client.list_incidents(deadline=dl(), top=2))


# ----------------------------------------------------------------------------------------------- comments


def test_comments_are_idempotent_by_id_and_paged(env: Env) -> None:
    client = env.client()
    env.service.default_page_size = 3
    client.put_incident("inc-1", base_props(), etag=None, deadline=dl())
    for i in range(7):
        client.put_comment("inc-1", f"c-{i}", f"<p>message {i}</p>", deadline=dl())
    client.put_comment("inc-1", "c-0", "<p>message 0</p>", deadline=dl())      # a retry of the same comment
    comments = client.list_comments("inc-1", deadline=dl())
    assert [c["name"] for c in comments] == [f"c-{i}" for i in range(7)]
    assert comments[0]["properties"]["message"] == "<p>message 0</p>"
    assert env.service.get("inc-1")["properties"]["additionalData"]["commentsCount"] == 7  # type: ignore[index]
    with pytest.raises(ValueError):
        client.put_comment("inc-1", "c-big", "x" * 30_001, deadline=dl())
    with pytest.raises(ValueError, match="UTF-16"):
        client.put_comment("inc-1", "c-emoji", "\U0001F600" * 15_001, deadline=dl())
    with pytest.raises(ValueError):
        client.put_comment("inc-1", "../evil", "x", deadline=dl())
    with pytest.raises(ApiError) as info:
        client.list_comments("absent", deadline=dl())
    assert info.value.status == 404


# ----------------------------------------------------------------------------------------------- boundary validation


class CannedSession(requests.Session):
    """Answers every request with one canned JSON body (for malformed-response cases)."""

    def __init__(self, body: Any, status: int = 200) -> None:
        super().__init__()
        self.body = body
        self.status = status

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        resp = requests.Response()
        resp.status_code = self.status
        resp._content = json.dumps(self.body).encode()
        resp.headers["Content-Type"] = "application/json"
        resp.url = url
        return resp


@pytest.mark.parametrize(("body", "fragment"), [
    ([], "not a JSON object"),
    ({"properties": {}}, "without 'name'"),
    ({"name": "x"}, "no 'properties'"),
    ({"name": "x", "etag": '"e"', "properties": {"title": "t", "severity": "Low"}}, "properties.status"),
    ({"name": "x", "etag": 5, "properties": {"title": "t", "severity": "Low", "status": "New",
                                             "lastModifiedTimeUtc": "2025-01-01T00:00:00Z"}}, "etag"),
])
def test_malformed_incident_responses_are_named(body: Any, fragment: str) -> None:
    session = BearerSession(StubCredential(TokenIssuer()), "s", session=CannedSession(body))
    client = SentinelClient(session, "https://management.azure.com", WS)
    with pytest.raises(SentinelResponseError, match=fragment) as info:
        client.get_incident("x", deadline=dl())
    assert not info.value.transient


def test_malformed_list_response_is_named() -> None:
    session = BearerSession(StubCredential(TokenIssuer()), "s", session=CannedSession({"values": []}))
    client = SentinelClient(session, "https://management.azure.com/", WS + "/")
    with pytest.raises(SentinelResponseError, match="'value'"):
        list(client.list_incidents(deadline=dl()))
    assert client.incident_url("a b").startswith(
        f"https://management.azure.com{WS}/providers/Microsoft.SecurityInsights/incidents/a%20b?")


# ----------------------------------------------------------------------------------------------- through the hub


def test_client_through_the_emulator_hub_with_managed_identity(emulators: Any, managed_identity_env: Any) -> None:
    """The wiring the app uses: managed identity token from the Entra emulator, ARM endpoint = the hub's server."""
    from azure.identity import ManagedIdentityCredential

    endpoints = emulators.endpoints
    if endpoints.arm is None or emulators.sentinel is None:
        pytest.skip("the hub runs without a Sentinel emulator")
    service: SentinelService = emulators.sentinel
    session = BearerSession(ManagedIdentityCredential(), f"{endpoints.arm}/.default")
    client = SentinelClient(session, endpoints.arm, endpoints.sentinel_workspace_id.upper(),
                            write_limiter=RateLimiter(100))
    created = client.update_incident("3f2b6a4e-0000-4000-8000-000000000001", lambda cur: base_props(), deadline=dl())
    assert created is not None and created["properties"]["providerName"] == "Azure Sentinel"
    service.analyst_update(created["name"], status="Closed", classification="TruePositive",
                           classification_reason="SuspiciousActivity", updated_by="ana@contoso.com")
    client.put_comment(created["name"], "c-1", "closed in Sentinel", deadline=dl())
    [listed] = list(client.list_incidents(deadline=dl()))
    assert listed["properties"]["status"] == "Closed"
    assert [c["properties"]["message"] for c in client.list_comments(created["name"], deadline=dl())] == [
        "closed in Sentinel"]
    body = service.trigger_body(created["name"])
    assert body["object"]["id"].lower() == client.incident_resource_id(created["name"]).lower()
