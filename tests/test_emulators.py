"""The emulators speak the public contracts: the real azure-identity, azure-monitor-ingestion, azure-data-tables and
requests clients work against them unmodified, with TLS trust only through REQUESTS_CA_BUNDLE."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.identity import (
    CertificateCredential,
    ClientAssertionCredential,
    ClientSecretCredential,
    DefaultAzureCredential,
    ManagedIdentityCredential,
)

from emulators.base import EmuRequest, Fault, match_request
from emulators.certs import make_client_certificate
from emulators.generator import PROFILES, generate_incidents, make_tenants, seed_world
from emulators.graph import expand_alerts_page_over, format_ticks, parse_ticks
from emulators.hub import EmulatorHub, RemoteHub, World
from emulators.tokens import TokenError, TokenIssuer

REPO = Path(__file__).resolve().parent.parent
MONITOR_SCOPE = "https://monitor.azure.com/.default"
FEDERATED_SCOPE = "api://AzureADTokenExchange/.default"


def t(seconds: float) -> str:
    """A fixed-base timestamp (7 digits) ``seconds`` after 2026-11-20T10:00:00Z."""
    return format_ticks(parse_ticks("2026-11-20T10:00:00Z") + int(seconds * 10_000_000))


def secret_credential(hub: EmulatorHub, tenant_id: str, client_id: str, secret: str) -> ClientSecretCredential:
    return ClientSecretCredential(tenant_id, client_id, secret, authority=hub.endpoints.authority_host,
                                  disable_instance_discovery=True)


class GraphClient:
    """requests + a ClientSecretCredential token, the way the app talks to Graph."""

    def __init__(self, hub: EmulatorHub, tenant_id: str, client_id: str, secret: str) -> None:
        self.base = hub.endpoints.graph
        self.credential = secret_credential(hub, tenant_id, client_id, secret)
        self.session = requests.Session()

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.credential.get_token(f'{self.base}/.default').token}"}
        headers.update(extra or {})
        return headers

    def get(self, path_or_url: str, params: dict[str, str] | None = None, **headers: str) -> requests.Response:
        url = path_or_url if path_or_url.startswith("https://") else f"{self.base}{path_or_url}"
        return self.session.get(url, params=params, headers=self._headers(headers), timeout=10)

    def patch(self, path: str, body: Any) -> requests.Response:
        return self.session.patch(f"{self.base}{path}", json=body, headers=self._headers(), timeout=10)

    def post(self, path: str, body: Any) -> requests.Response:
        return self.session.post(f"{self.base}{path}", json=body, headers=self._headers(), timeout=10)

    def list_all(self, params: dict[str, str]) -> list[str]:
        ids: list[str] = []
        response = self.get("/v1.0/security/incidents", params)
        while True:
            assert response.status_code == 200, response.text
            data = response.json()
            ids.extend(i["id"] for i in data["value"])
            if "@odata.nextLink" not in data:
                return ids
            response = self.get(data["@odata.nextLink"])


def setup_tenant(hub: EmulatorHub, name: str = "Contoso") -> tuple[str, GraphClient]:
    tenant = hub.world.add_tenant(name=name)
    secret = secrets.token_urlsafe(24)
    app = hub.world.register_app(secret=secret, tenants=[tenant], display_name="sync-app")
    return tenant, GraphClient(hub, tenant, app.client_id, secret)


# ------------------------------------------------------------------------------------------------ tokens


def test_token_issuer_checks_signature_expiry_and_audience() -> None:
    issuer = TokenIssuer()
    token = issuer.issue("tid", "https://graph.example", "oid-1", "app-1")
    claims = issuer.verify(token, "https://graph.example/")
    assert claims["tid"] == "tid" and claims["oid"] == claims["sub"] == "oid-1" and claims["appid"] == "app-1"
    assert {"iss", "iat", "nbf", "exp", "aud"} <= set(claims)
    assert issuer.verify_bearer({"authorization": f"Bearer {token}"}, "https://graph.example")["tid"] == "tid"
    with pytest.raises(TokenError) as err:
        issuer.verify(token, "https://monitor.azure.com")
    assert err.value.code == "audience"
    with pytest.raises(TokenError):
        TokenIssuer().verify(token, "https://graph.example")          # another key
    expired = issuer.issue("tid", "aud", "s", "a", lifetime=-5)
    with pytest.raises(TokenError) as err:
        issuer.verify(expired, "aud")
    assert err.value.code == "expired"
    with pytest.raises(TokenError):
        issuer.verify_bearer({}, "aud")
    with pytest.raises(TokenError):
        issuer.verify(token[:-3] + "abc", "https://graph.example")


# ------------------------------------------------------------------------------------------------ Entra


def test_client_secret_credential_multi_tenant(emulators: EmulatorHub) -> None:
    world = emulators.world
    a, b, c = world.add_tenant(name="A"), world.add_tenant(name="B"), world.add_tenant(name="C")
    secret = secrets.token_urlsafe(24)
    app = world.register_app(secret=secret, tenants=[a, b])
    for tenant in (a, b):
        token = secret_credential(emulators, tenant, app.client_id, secret).get_token(
            f"{emulators.endpoints.graph}/.default")
        claims = emulators.issuer.verify(token.token, emulators.endpoints.graph)
        assert claims["tid"] == tenant and claims["appid"] == app.client_id
        assert token.expires_on > time.time() + 3000
    with pytest.raises(ClientAuthenticationError, match="AADSTS700016"):
        secret_credential(emulators, c, app.client_id, secret).get_token(f"{emulators.endpoints.graph}/.default")
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        secret_credential(emulators, a, app.client_id, "wrong").get_token(f"{emulators.endpoints.graph}/.default")
    with pytest.raises(ClientAuthenticationError, match="AADSTS500011"):
        secret_credential(emulators, a, app.client_id, secret).get_token("https://graph.microsoft.com/.default")
    assert world.entra.tokens_issued(app.client_id, a, emulators.endpoints.graph) == 1
    assert world.entra.tokens_issued(app.client_id) == 2


def test_certificate_credential_verifies_the_assertion_signature(emulators: EmulatorHub) -> None:
    world = emulators.world
    tenant = world.add_tenant()
    cert = make_client_certificate()
    app = world.register_app(certificate_pem=cert.cert_pem, tenants=[tenant])
    authority = emulators.endpoints.authority_host
    for chain in (False, True):
        credential = CertificateCredential(tenant, app.client_id, certificate_data=cert.combined_pem,
                                           authority=authority, disable_instance_discovery=True,
                                           send_certificate_chain=chain)
        token = credential.get_token(MONITOR_SCOPE)
        assert emulators.issuer.verify(token.token, "https://monitor.azure.com")["tid"] == tenant
    other = make_client_certificate()          # not registered: signature cannot be verified
    with pytest.raises(ClientAuthenticationError, match="AADSTS700027"):
        CertificateCredential(tenant, app.client_id, certificate_data=other.combined_pem, authority=authority,
                              disable_instance_discovery=True).get_token(MONITOR_SCOPE)


def test_managed_identity_and_federated_client_assertion(emulators: EmulatorHub,
                                                         managed_identity_env: dict[str, str]) -> None:
    world = emulators.world
    mi = world.managed_identity
    customer = world.add_tenant(name="Customer")
    app = world.register_app(federated_subjects=[mi.principal_id], tenants=[customer])

    identity = ManagedIdentityCredential()
    exchange = identity.get_token(FEDERATED_SCOPE)
    claims = emulators.issuer.verify(exchange.token, "api://AzureADTokenExchange")
    assert claims["tid"] == world.home_tenant_id and claims["oid"] == mi.principal_id

    credential = ClientAssertionCredential(customer, app.client_id, lambda: identity.get_token(FEDERATED_SCOPE).token,
                                           authority=emulators.endpoints.authority_host,
                                           disable_instance_discovery=True)
    graph = credential.get_token(f"{emulators.endpoints.graph}/.default")
    claims = emulators.issuer.verify(graph.token, emulators.endpoints.graph)
    assert claims["tid"] == customer and claims["appid"] == app.client_id

    # An app that does not trust this identity refuses the assertion.
    stranger = world.register_app(tenants=[customer])
    with pytest.raises(ClientAuthenticationError, match="AADSTS70021"):
        ClientAssertionCredential(customer, stranger.client_id, lambda: identity.get_token(FEDERATED_SCOPE).token,
                                  authority=emulators.endpoints.authority_host,
                                  disable_instance_discovery=True).get_token(f"{emulators.endpoints.graph}/.default")

    # DefaultAzureCredential picks up the App Service identity; its tokens carry the home tenant.
    token = DefaultAzureCredential().get_token(MONITOR_SCOPE)
    assert emulators.issuer.verify(token.token, "https://monitor.azure.com")["tid"] == world.home_tenant_id
    assert world.entra.tokens_issued(mi.client_id, world.home_tenant_id, "https://monitor.azure.com") == 1


def test_msi_endpoint_contract(emulators: EmulatorHub) -> None:
    url = emulators.endpoints.identity_endpoint
    header = {"X-IDENTITY-HEADER": emulators.endpoints.identity_header}
    ok = requests.get(url, params={"resource": "https://monitor.azure.com", "api-version": "2019-08-01"},
                      headers=header, timeout=10)
    assert ok.status_code == 200
    body = ok.json()
    assert body["expires_on"].isdigit() and int(body["expires_on"]) > time.time()
    assert body["resource"] == "https://monitor.azure.com" and body["token_type"] == "Bearer"
    wrong = requests.get(url, params={"resource": "https://monitor.azure.com", "api-version": "2019-08-01"},
                         headers={"X-IDENTITY-HEADER": "nope"}, timeout=10)
    assert wrong.status_code == 401
    old = requests.get(url, params={"resource": "https://monitor.azure.com", "api-version": "2017-09-01"},
                       headers=header, timeout=10)
    assert old.status_code == 400
    unknown = requests.get(url, params={"resource": "https://monitor.azure.com", "api-version": "2019-08-01",
                                        "client_id": "00000000-0000-0000-0000-000000000000"},
                           headers=header, timeout=10)
    assert unknown.status_code == 400


def test_entra_error_shape_and_openid(emulators: EmulatorHub) -> None:
    base = emulators.endpoints.authority_host
    tenant = emulators.world.add_tenant()
    config = requests.get(f"{base}/{tenant}/v2.0/.well-known/openid-configuration", timeout=10).json()
    assert config["token_endpoint"] == f"{base}/{tenant}/oauth2/v2.0/token"
    missing = requests.get(f"{base}/{secrets.token_hex(4)}/v2.0/.well-known/openid-configuration", timeout=10)
    assert missing.status_code == 400 and missing.json()["error_codes"] == [90002]
    bad = requests.post(f"{base}/{tenant}/oauth2/v2.0/token", timeout=10,
                        data={"grant_type": "client_credentials", "client_id": "x", "client_secret": "y",
                              "scope": "https://monitor.azure.com/.default"})
    err = bad.json()
    assert bad.status_code == 400 and err["error"] == "unauthorized_client" and err["error_codes"] == [700016]
    assert err["error_description"].startswith("AADSTS700016:") and "y" not in err["error_description"].split()


# ------------------------------------------------------------------------------------------------ Azurite


def test_data_tables_against_azurite(storage: str) -> None:
    from azure.core import MatchConditions
    from azure.data.tables import TableServiceClient, UpdateMode

    service = TableServiceClient.from_connection_string(storage)
    table = service.create_table_if_not_exists("syncTenants")
    table.upsert_entity({"PartitionKey": "tenant", "RowKey": "t1", "cursor": "2026-11-20T10:00:00.1234567Z"})
    entity = table.get_entity("tenant", "t1")
    assert entity["cursor"] == "2026-11-20T10:00:00.1234567Z"
    entity["cursor"] = "later"
    table.update_entity(entity, mode=UpdateMode.REPLACE, etag=entity.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified)
    assert [e["RowKey"] for e in table.query_entities("PartitionKey eq 'tenant'")] == ["t1"]

    from azure.storage.queue import QueueClient

    queue = QueueClient.from_connection_string(storage, "defender-tenant-work")
    queue.create_queue()
    queue.send_message(json.dumps({"tenantId": "t1", "direction": "pull"}))
    assert [json.loads(m.content)["tenantId"] for m in queue.receive_messages()] == ["t1"]


# ------------------------------------------------------------------------------------------------ Logs Ingestion


def ingestion_client(hub: EmulatorHub) -> Any:
    from azure.monitor.ingestion import LogsIngestionClient

    return LogsIngestionClient(hub.endpoints.ingestion, ManagedIdentityCredential(), retry_total=0)


def incident_row(i: int, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"TimeGenerated": datetime.now(UTC).isoformat(), "RecordId": f"rec-{i}",
                           "DefenderTenantId": "t", "IncidentId": str(i), "LastUpdateDateTime": t(i),
                           "Status": "active", "AlertCount": 2, "CustomTags": ["a", "顧客"], "PriorityScore": None}
    row.update(extra)
    return row


def test_logs_ingestion_client_upload(emulators: EmulatorHub, managed_identity_env: dict[str, str]) -> None:
    client = ingestion_client(emulators)
    dcr = emulators.endpoints.dcr_immutable_id
    client.upload(dcr, "Custom-DefenderIncidents", [incident_row(i) for i in range(3)])
    client.upload(dcr, "Custom-DefenderEvidence", [{"RecordId": "e1", "EvidenceIndex": 0, "ProcessId": 2**40,
                                                    "Evidence": {"@odata.type": "#x", "n": [1, 2]}}])
    rows = emulators.world.rows("DefenderIncidents_CL")
    assert [r["RecordId"] for r in rows] == ["rec-0", "rec-1", "rec-2"]
    assert rows[0]["CustomTags"] == ["a", "顧客"] and rows[0]["TimeGenerated"]
    evidence = emulators.world.rows("DefenderEvidence_CL")
    assert evidence[0]["ProcessId"] == 2**40 and "TimeGenerated" in evidence[0]
    stats = emulators.world.ingestion.stats
    assert stats.accepted == 2 and stats.rows["DefenderIncidents_CL"] == 3 and stats.bytes_sent > 0
    assert emulators.world.violations == []

    # A value over 64 KB is accepted but recorded (the app must cut it first).
    client.upload(dcr, "Custom-DefenderIncidents", [incident_row(9, Description="x" * 70_000)])
    assert [(v.column, v.record_id) for v in emulators.world.violations] == [("Description", "rec-9")]
    assert len(emulators.world.rows("DefenderIncidents_CL")[-1]["Description"]) == 65_536


def test_logs_ingestion_rejections(emulators: EmulatorHub, managed_identity_env: dict[str, str]) -> None:
    client = ingestion_client(emulators)
    dcr = emulators.endpoints.dcr_immutable_id
    with pytest.raises(HttpResponseError) as err:                     # one record over 1 MiB
        client.upload(dcr, "Custom-DefenderIncidents", [incident_row(1, Description="é" * 600_000)])
    assert err.value.status_code == 413
    with pytest.raises(HttpResponseError) as err:                     # not a column
        client.upload(dcr, "Custom-DefenderIncidents", [incident_row(1, Title="reserved name")])
    assert err.value.status_code == 400 and "'Title' is not a column of DefenderIncidents_CL" in str(err.value)
    with pytest.raises(HttpResponseError) as err:                     # wrong type
        client.upload(dcr, "Custom-DefenderIncidents", [incident_row(1, AlertCount="2")])
    assert err.value.status_code == 400 and "AlertCount" in str(err.value)
    with pytest.raises(HttpResponseError) as err:                     # int out of 32-bit range
        client.upload(dcr, "Custom-DefenderIncidents", [incident_row(1, AlertCount=2**40)])
    assert err.value.status_code == 400
    with pytest.raises(HttpResponseError) as err:
        client.upload(dcr, "Custom-Nope", [incident_row(1)])
    assert err.value.status_code == 400
    with pytest.raises(HttpResponseError) as err:
        client.upload("dcr-unknown", "Custom-DefenderIncidents", [incident_row(1)])
    assert err.value.status_code == 404
    assert emulators.world.rows("DefenderIncidents_CL") == []

    # Raw HTTP: a plain (non-gzip) body over 1 MiB, a non-array body, a wrong audience.
    token = ManagedIdentityCredential().get_token(MONITOR_SCOPE).token
    url = f"{emulators.endpoints.ingestion}/dataCollectionRules/{dcr}/streams/Custom-DefenderIncidents"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    big = json.dumps([incident_row(i, Description="y" * 1000) for i in range(1100)]).encode()
    small_gzip = gzip.compress(big)
    assert len(small_gzip) < 1_048_576 < len(big)
    r = requests.post(url, params={"api-version": "2023-01-01"}, data=small_gzip, timeout=10,
                      headers={**headers, "Content-Encoding": "gzip"})
    assert r.status_code == 413                                       # uncompressed size counts too
    r = requests.post(url, params={"api-version": "2023-01-01"}, data=b'{"RecordId": "x"}', headers=headers,
                      timeout=10)
    assert r.status_code == 400
    graph_token = ManagedIdentityCredential().get_token(f"{emulators.endpoints.graph}/.default").token
    r = requests.post(url, params={"api-version": "2023-01-01"}, data=b"[]", timeout=10,
                      headers={**headers, "Authorization": f"Bearer {graph_token}"})
    assert r.status_code == 401
    ok = requests.post(url, params={"api-version": "2023-01-01"}, data=gzip.compress(b"[]"), timeout=10,
                       headers={**headers, "Content-Encoding": "gzip"})
    assert ok.status_code == 204


# ------------------------------------------------------------------------------------------------ Graph


def test_graph_newest_first_ties_and_offset_paging(emulators: EmulatorHub) -> None:
    tenant, graph = setup_tenant(emulators)
    world = emulators.world
    for i in range(1, 13):
        world.add_incident(tenant, {"id": str(i), "lastUpdateDateTime": t(i if i <= 8 else 8)})  # 8..12 tie
    first = graph.get("/v1.0/security/incidents", {"$top": "5"}).json()
    assert [i["id"] for i in first["value"]] == ["12", "11", "10", "9", "8"]       # ties: id descending
    assert first["@odata.nextLink"].endswith("$top=5&$skip=5")
    assert all(len(i["lastUpdateDateTime"]) == 28 for i in first["value"])       # 7 fractional digits
    assert graph.list_all({"$top": "5"}) == [str(i) for i in (12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1)]

    # The offset problem: an incident updated while a client pages moves to the front, and one is skipped.
    world.after_page(1, lambda page: world.update_incident(tenant, "6", severity="high"), tenant_id=tenant)
    seen = graph.list_all({"$top": "5"})
    assert "6" not in seen[5:] and len(set(seen)) == 11                          # one incident never seen
    assert world.incident_ids(tenant)[0] == "6"


def test_graph_filters_and_options(emulators: EmulatorHub) -> None:
    tenant, graph = setup_tenant(emulators)
    for i in range(1, 11):
        emulators.world.add_incident(tenant, {"id": str(i), "lastUpdateDateTime": t(i), "createdDateTime": t(0),
                                              "status": "resolved" if i % 2 else "active"})
    ids = graph.list_all({"$filter": f"lastUpdateDateTime ge {t(4)} and lastUpdateDateTime lt {t(7)}"})
    assert ids == ["6", "5", "4"]
    assert graph.list_all({"$filter": f"lastUpdateDateTime gt {t(9)}"}) == ["10"]
    assert graph.list_all({"$filter": f"lastUpdateDateTime eq {t(3)}"}) == ["3"]
    assert graph.list_all({"$filter": f"createdDateTime le {t(0)} and status eq 'active'", "$top": "2"}) == [
        "10", "8", "6", "4", "2"]
    counted = graph.get("/v1.0/security/incidents", {"$count": "true", "$top": "1",
                                                     "$filter": f"lastUpdateDateTime ge {t(5)}"}).json()
    assert counted["@odata.count"] == 6 and len(counted["value"]) == 1
    # 7-digit precision: ticks one apart are different instants.
    assert graph.list_all({"$filter": f"lastUpdateDateTime ge {t(5)[:-2]}1Z"}) == ["10", "9", "8", "7", "6"]
    for bad in (f"lastUpdateDateTime ge '{t(1)}'", "displayName eq 'x'", f"lastUpdateDateTime ge {t(1)} or "
                f"lastUpdateDateTime le {t(2)}", "lastUpdateDateTime ge yesterday", "status eq 'Active'"):
        r = graph.get("/v1.0/security/incidents", {"$filter": bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "BadRequest", bad
    assert graph.get("/v1.0/security/incidents", {"$top": "51", "$expand": "alerts"}).status_code == 400
    assert graph.get("/v1.0/security/incidents", {"$top": "1000"}).status_code == 200
    assert graph.get("/v1.0/security/incidents", {"$top": "1001"}).status_code == 400
    assert graph.get("/v1.0/security/incidents", {"$search": "x"}).status_code == 400
    assert graph.get("/v1.0/security/incidents", {"$expand": "comments"}).status_code == 400


def test_graph_get_expand_alerts_and_alerts_v2(emulators: EmulatorHub) -> None:
    tenant, graph = setup_tenant(emulators)
    spec = make_tenants(3, 1)[0]
    for incident in generate_incidents(3, spec, 6, profile="small"):
        incident["tenantId"] = tenant
        emulators.world.add_incident(tenant, incident)
    incident_id = next(i for i in emulators.world.incident_ids(tenant)
                       if emulators.world.get_incident(tenant, i)["alerts"])
    plain = graph.get(f"/v1.0/security/incidents/{incident_id}").json()
    assert "alerts" not in plain and plain["id"] == incident_id and plain["tenantId"] == tenant
    full = graph.get(f"/v1.0/security/incidents/{incident_id}", {"$expand": "alerts"}).json()
    assert full["alerts"] and all("evidence" in a for a in full["alerts"])
    alerts = graph.get("/v1.0/security/alerts_v2", {"$filter": f"incidentId eq '{incident_id}'", "$top": "1"})
    data = alerts.json()
    assert len(data["value"]) == 1 and data["value"][0]["incidentId"] == incident_id
    assert ("@odata.nextLink" in data) == (len(full["alerts"]) > 1)
    one = graph.get(f"/v1.0/security/alerts_v2/{full['alerts'][0]['id']}").json()
    assert one["id"] == full["alerts"][0]["id"]
    missing = graph.get("/v1.0/security/incidents/999999999")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NotFound"
    assert "innerError" in missing.json()["error"]


def test_graph_patch_validation_and_comments(emulators: EmulatorHub) -> None:
    tenant, graph = setup_tenant(emulators)
    emulators.world.add_incident(tenant, {"id": "7", "lastUpdateDateTime": t(1), "alerts": [
        {"id": "da1", "status": "new"}]})
    path = "/v1.0/security/incidents/7"
    r = graph.patch(path, {"status": "resolved", "classification": "truePositive", "determination": "malware",
                           "assignedTo": "kai@contoso.com", "customTags": ["Demo", "顧客A"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "resolved" and body["lastModifiedBy"] == "sync-app"
    assert body["lastUpdateDateTime"] > t(1) and body["customTags"] == ["Demo", "顧客A"]
    alert = emulators.world.get_incident(tenant, "7")["alerts"][0]
    assert alert["status"] == "resolved" and alert["classification"] == "truePositive"   # cascade on resolve
    assert graph.patch(path, {"customTags": ["Only"]}).json()["customTags"] == ["Only"]  # replaces
    for bad in ({"classification": "TruePositive"}, {"status": "redirected"}, {"status": "awaitingAction"},
                {"severity": "high"}, {"tags": ["x"]}, {"determination": "clean"},
                {"classification": "falsePositive", "determination": "malware"}, {"customTags": "x"},
                {"assignedTo": 5}):
        r = graph.patch(path, bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "BadRequest", bad
    assert graph.patch("/v1.0/security/incidents/404", {"status": "active"}).status_code == 404

    before = emulators.world.get_incident(tenant, "7")["lastUpdateDateTime"]
    r = graph.post(f"{path}/comments", {"@odata.type": "microsoft.graph.security.alertComment",
                                        "comment": "Investigating — 調査中 🔍"})
    assert r.status_code == 200
    comments = r.json()["value"]
    assert comments[-1]["comment"] == "Investigating — 調査中 🔍"
    assert comments[-1]["createdByDisplayName"] == "sync-app"
    assert emulators.world.get_incident(tenant, "7")["lastUpdateDateTime"] > before
    assert graph.post(f"{path}/comments", {"comment": ""}).status_code == 400
    kinds = Counter(w.kind for w in emulators.world.graph.writes)
    assert kinds == {"patch": 2, "comment": 1}


def test_graph_prefer_header_and_tenant_isolation(emulators: EmulatorHub) -> None:
    tenant_a, graph_a = setup_tenant(emulators, "A")
    tenant_b, graph_b = setup_tenant(emulators, "B")
    emulators.world.add_incident(tenant_a, {"id": "1", "status": "awaitingAction"})
    emulators.world.add_incident(tenant_b, {"id": "2"})
    plain = graph_a.get("/v1.0/security/incidents/1").json()
    assert plain["status"] == "unknownFutureValue"
    preferred = graph_a.get("/v1.0/security/incidents/1", Prefer="include-unknown-enum-members").json()
    assert preferred["status"] == "awaitingAction"
    assert graph_a.list_all({}) == ["1"] and graph_b.list_all({}) == ["2"]
    assert graph_b.get("/v1.0/security/incidents/1").status_code == 404
    assert graph_b.patch("/v1.0/security/incidents/1", {"status": "active"}).status_code == 404

    # Wrong audience and missing token.
    r = requests.get(f"{emulators.endpoints.graph}/v1.0/security/incidents", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "InvalidAuthenticationToken"
    foreign = emulators.issuer.issue(tenant_a, "https://monitor.azure.com", "x", "y",
                                     extra_claims={"roles": ["SecurityIncident.Read.All"]})
    r = requests.get(f"{emulators.endpoints.graph}/v1.0/security/incidents", timeout=10,
                     headers={"Authorization": f"Bearer {foreign}"})
    assert r.status_code == 401
    no_roles = emulators.issuer.issue(tenant_a, emulators.endpoints.graph, "x", "y")
    r = requests.get(f"{emulators.endpoints.graph}/v1.0/security/incidents", timeout=10,
                     headers={"Authorization": f"Bearer {no_roles}"})
    assert r.status_code == 403


def test_world_api_redirect_ties_and_delete(world: World) -> None:
    tenant = world.add_tenant()
    world.add_incident(tenant, {"id": "10", "alerts": [{"id": "a1"}, {"id": "a2"}]})
    world.add_incident(tenant, {"id": "11"})
    loser, winner = world.redirect_incident(tenant, "10", "11")
    assert loser["status"] == "redirected" and loser["redirectIncidentId"] == "11" and loser["alerts"] == []
    assert {a["id"] for a in winner["alerts"]} == {"a1", "a2"}
    assert all(a["incidentId"] == "11" for a in winner["alerts"])
    first = world.update_incident(tenant, "10", assignedTo="x@y")
    second = world.update_incident(tenant, "11", assignedTo="x@y")
    assert second["lastUpdateDateTime"] > first["lastUpdateDateTime"]       # strictly increasing clock
    tie = world.update_incident(tenant, "10", last_update=second["lastUpdateDateTime"])
    assert tie["lastUpdateDateTime"] == second["lastUpdateDateTime"]
    assert world.incident_ids(tenant) == ["11", "10"]
    world.update_alert(tenant, "a1", status="inProgress")
    assert world.incident_ids(tenant)[0] == "11"
    assert world.delete_incident(tenant, "11") and world.get_incident(tenant, "11") is None
    assert world.incident_ids(tenant) == ["10"]


# ------------------------------------------------------------------------------------------------ faults


def test_faults_status_retry_after_drop_delay(emulators: EmulatorHub) -> None:
    _, graph = setup_tenant(emulators)
    graph.credential.get_token(f"{graph.base}/.default")            # token first: faults target Graph only
    emulators.faults.queue("graph", Fault("status", 429, retry_after="3"))
    emulators.faults.queue("graph", Fault("status", 503))
    r = graph.get("/v1.0/security/incidents")
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert r.json()["error"]["code"] == "TooManyRequests"
    assert graph.get("/v1.0/security/incidents").status_code == 503
    assert graph.get("/v1.0/security/incidents").status_code == 200
    emulators.faults.queue("graph", Fault("drop"))
    with pytest.raises(requests.ConnectionError):
        graph.get("/v1.0/security/incidents")
    assert graph.get("/v1.0/security/incidents").status_code == 200
    emulators.faults.queue("graph", Fault("delay", seconds=0.3))
    started = time.monotonic()
    assert graph.get("/v1.0/security/incidents").status_code == 200
    assert time.monotonic() - started >= 0.3
    assert emulators.faults.injected["graph"] == 4
    # A queued fault can wait for a matching request.
    emulators.faults.queue("graph", Fault("status", 500), when=match_request("PATCH"))
    assert graph.get("/v1.0/security/incidents").status_code == 200
    assert emulators.faults.pending("graph") == 1
    dropped = [e for e in emulators.log.entries(service="graph") if e.status == 0]
    assert len(dropped) == 1 and dropped[0].fault == "drop"


def test_big_tenant_expand_failure_rule(emulators: EmulatorHub) -> None:
    tenant, graph = setup_tenant(emulators)
    emulators.world.add_incident(tenant, {"id": "1"})
    emulators.faults.rule("graph", expand_alerts_page_over(10), Fault("status", 500))
    assert graph.get("/v1.0/security/incidents", {"$expand": "alerts", "$top": "50"}).status_code == 500
    assert graph.get("/v1.0/security/incidents", {"$expand": "alerts"}).status_code == 500   # default 50
    assert graph.get("/v1.0/security/incidents", {"$expand": "alerts", "$top": "10"}).status_code == 200
    assert graph.get("/v1.0/security/incidents", {"$top": "50"}).status_code == 200
    probe = EmuRequest("GET", "/v1.0/security/incidents", {"$expand": ["alerts"], "$top": ["11"]}, {})
    assert expand_alerts_page_over(10)(probe)


def test_entra_faults_surface_to_azure_identity(emulators: EmulatorHub) -> None:
    tenant = emulators.world.add_tenant()
    secret = secrets.token_urlsafe(24)
    app = emulators.world.register_app(secret=secret, tenants=[tenant])
    emulators.faults.queue("entra", Fault("status", 400), times=10)
    with pytest.raises(ClientAuthenticationError):
        secret_credential(emulators, tenant, app.client_id, secret).get_token(MONITOR_SCOPE)


# ------------------------------------------------------------------------------------------------ generator


def test_generator_is_seeded_lazy_and_realistic() -> None:
    spec = make_tenants(11, 2)[1]
    end = datetime(2026, 11, 20, tzinfo=UTC)
    stream = generate_incidents(11, spec, 400, profile="realistic", end=end, start=end - timedelta(days=5))
    assert iter(stream) is stream                                     # a generator, not a list
    incidents = list(stream)
    again = list(generate_incidents(11, spec, 400, profile="realistic", end=end, start=end - timedelta(days=5)))
    assert incidents == again
    assert {i["status"] for i in incidents} >= {"active", "inProgress", "resolved", "redirected", "awaitingAction"}
    assert {i["severity"] for i in incidents} >= {"high", "medium", "low", "informational", "unknown"}
    assert {i["classification"] for i in incidents} >= {"truePositive", "falsePositive",
                                                        "informationalExpectedActivity", "unknown"}
    redirected = [i for i in incidents if i["status"] == "redirected"]
    assert redirected and all(i["redirectIncidentId"] for i in redirected)
    ties = Counter(i["lastUpdateDateTime"] for i in incidents)
    assert max(ties.values()) >= 2
    assert max(len(i["alerts"]) for i in incidents) >= 150
    types = {e["@odata.type"].rsplit(".", 1)[1] for i in incidents for a in i["alerts"] for e in a["evidence"]}
    assert types >= {"deviceEvidence", "userEvidence", "ipEvidence", "urlEvidence", "fileEvidence",
                     "processEvidence", "mailboxEvidence", "analyzedMessageEvidence", "registryKeyEvidence",
                     "cloudApplicationEvidence"}
    user = next(e for i in incidents for a in i["alerts"] for e in a["evidence"]
                if e["@odata.type"].endswith("userEvidence"))
    assert set(user["userAccount"]) >= {"accountName", "domainName", "userSid", "azureAdUserId",
                                        "userPrincipalName"}
    file_ev = next(e for i in incidents for a in i["alerts"] for e in a["evidence"]
                   if e["@odata.type"].endswith("fileEvidence"))
    assert set(file_ev["fileDetails"]) >= {"fileName", "filePath", "sha1", "sha256", "md5"}
    text = json.dumps(incidents, ensure_ascii=False)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "🔥" in text                # CJK, emoji
    assert any("\u0590" <= ch <= "\u06ff" for ch in text)                                  # Hebrew/Arabic (RTL)
    assert any(i["description"] is None for i in incidents) and any(i["comments"] for i in incidents)
    for i in incidents:
        assert i["createdDateTime"] <= i["lastUpdateDateTime"] <= format_ticks(parse_ticks(end.isoformat()))
    assert PROFILES["bench"].big_rate < PROFILES["realistic"].big_rate


def test_seed_world_and_compact_storage() -> None:
    world = World()
    specs = seed_world(world, seed=5, tenants=2, incidents_per_tenant=30, profile="small")
    assert [world.graph.incident_count(s.tenant_id) for s in specs] == [30, 30]
    ids = world.incident_ids(specs[0].tenant_id)
    times = [world.get_incident(specs[0].tenant_id, i)["lastUpdateDateTime"] for i in ids]
    assert times == sorted(times, reverse=True)


# ------------------------------------------------------------------------------------------------ control API


def test_control_api_via_remote_hub(emulators: EmulatorHub, managed_identity_env: dict[str, str]) -> None:
    remote = RemoteHub(emulators.endpoints.state_dir)
    assert remote.endpoints.graph == emulators.endpoints.graph
    tenant = remote.add_tenant(name="Remote")
    assert remote.add_incident(tenant, {"id": "5", "displayName": "über"}) == "5"
    remote.update_incident(tenant, "5", status="inProgress")
    assert remote.get_incident(tenant, "5")["status"] == "inProgress"
    created = remote.generate(3, [tenant], 4, profile="small")
    assert created[0]["incidents"] == 4
    remote.inject_fault("graph", status=429, retry_after="7")
    token = ManagedIdentityCredential().get_token(f"{emulators.endpoints.graph}/.default").token
    r = requests.get(f"{emulators.endpoints.graph}/v1.0/security/incidents", timeout=10,
                     headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    remote.inject_fault("graph", status=500, persistent=True, match={"method": "GET", "path": "incidents/5$"})
    assert requests.get(f"{emulators.endpoints.graph}/v1.0/security/incidents/5", timeout=10,
                        headers={"Authorization": f"Bearer {token}"}).status_code == 500
    remote.clear_faults()
    ingestion_client(emulators).upload(emulators.endpoints.dcr_immutable_id, "Custom-DefenderAlerts",
                                       [{"RecordId": "a", "AlertId": "da1", "EvidenceCount": 3}])
    assert remote.rows("DefenderAlerts_CL")[0]["AlertId"] == "da1"
    stats = remote.stats()
    assert stats["ingestion"]["accepted"] == 1 and stats["faultsInjected"]["graph"] == 2
    with pytest.raises(RuntimeError, match="404"):
        remote.control("GET", "nothing-here")
    remote.reset()
    assert emulators.world.rows("DefenderAlerts_CL") == []


def test_sentinel_is_registered_when_present(emulators: EmulatorHub, managed_identity_env: dict[str, str]) -> None:
    if emulators.sentinel is None:
        pytest.skip("emulators.sentinel is not available")
    arm = emulators.endpoints.arm
    token = ManagedIdentityCredential().get_token(f"{arm}/.default").token
    url = (f"{arm}{emulators.endpoints.sentinel_workspace_id}/providers/Microsoft.SecurityInsights/incidents")
    r = requests.get(url, params={"api-version": "2025-09-01"}, headers={"Authorization": f"Bearer {token}"},
                     timeout=10)
    assert r.status_code == 200, r.text
    graph_token = ManagedIdentityCredential().get_token(f"{emulators.endpoints.graph}/.default").token
    r = requests.get(url, params={"api-version": "2025-09-01"}, timeout=10,
                     headers={"Authorization": f"Bearer {graph_token}"})
    assert r.status_code == 401


def test_app_settings_helper(emulators: EmulatorHub, make_app_settings: Any) -> None:
    tenants = [emulators.world.add_tenant(), emulators.world.add_tenant()]
    settings = make_app_settings(tenants, storage=False, SYNC_FANOUT="queue", SYNC_OVERLAP_SECONDS=None)
    assert settings["DEFENDER_TENANT_IDS"] == ",".join(tenants)
    assert settings["SYNC_FANOUT"] == "queue" and "SYNC_OVERLAP_SECONDS" not in settings
    for name in ("DEFENDER_CLIENT_ID", "DEFENDER_CLIENT_SECRET", "AZURE_AUTHORITY_HOST", "GRAPH_ENDPOINT",
                 "LOGS_INGESTION_ENDPOINT", "LOGS_DCR_IMMUTABLE_ID", "LOGS_INGESTION_SCOPE", "SENTINEL_WORKSPACE_ID",
                 "ARM_ENDPOINT", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "DEFENDER_PULL_SCHEDULE",
                 "SENTINEL_RECONCILE_SCHEDULE", "SYNC_QUEUE"):
        assert settings[name], name
    credential = secret_credential(emulators, tenants[1], settings["DEFENDER_CLIENT_ID"],
                                   settings["DEFENDER_CLIENT_SECRET"])
    assert credential.get_token(f"{settings['GRAPH_ENDPOINT']}/.default").token
    federated = make_app_settings(tenants, credential="federated", storage=False)
    assert "DEFENDER_CLIENT_SECRET" not in federated and federated["DEFENDER_CLIENT_ID"]
    cert = make_app_settings(tenants[:1], credential="certificate", storage=False)
    assert "BEGIN CERTIFICATE" in cert["DEFENDER_CLIENT_CERTIFICATE"]


def test_serve_as_a_process(tmp_path: Path, ca_bundle: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "emulators", "serve", "--state-dir", str(tmp_path),
                                "--tenants", "2", "--incidents", "5", "--profile", "small"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("READY "), line
        data = json.loads((tmp_path / "endpoints.json").read_text())
        assert (tmp_path / "ca.pem").exists() and len(data["tenants"]) == 2
        settings = data["appSettings"]
        session = requests.Session()
        session.verify = data["caBundle"]
        session.trust_env = False
        health = session.get(f"{data['graph']}/_control/health", timeout=10)
        assert health.json() == {"ok": True}
        tenant = data["tenants"][0]["tenantId"]
        token_response = session.post(f"{settings['AZURE_AUTHORITY_HOST']}/{tenant}/oauth2/v2.0/token", timeout=10,
                                      data={"grant_type": "client_credentials",
                                            "client_id": settings["DEFENDER_CLIENT_ID"],
                                            "client_secret": settings["DEFENDER_CLIENT_SECRET"],
                                            "scope": f"{settings['GRAPH_ENDPOINT']}/.default"})
        token = token_response.json()["access_token"]
        listing = session.get(f"{settings['GRAPH_ENDPOINT']}/v1.0/security/incidents", timeout=10,
                              headers={"Authorization": f"Bearer {token}"})
        assert len(listing.json()["value"]) == 5
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    assert process.returncode == 0
