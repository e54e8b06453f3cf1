"""The Sentinel incidents ARM emulator, exercised through SentinelService.handle() (no network)."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from emulators.base import EmuRequest, EmuResponse, Fault, FaultPlan
from emulators.sentinel import (
    API_VERSION,
    MAX_COMMENT_CHARS,
    SentinelService,
    format_ticks,
    parse_ticks,
)

WS = ("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-soc/providers/"
      "Microsoft.OperationalInsights/workspaces/ws-central")
INCIDENTS = f"{WS}/providers/Microsoft.SecurityInsights/incidents"


def req(method: str, path: str, body: Any = None, *, query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None, api_version: str | None = API_VERSION) -> EmuRequest:
    q = {k: [v] for k, v in (query or {}).items()}
    if api_version is not None:
        q["api-version"] = [api_version]
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    hdrs = {"host": "127.0.0.1:8443", **{k.lower(): v for k, v in (headers or {}).items()}}
    return EmuRequest(method=method, path=path, query=q, headers=hdrs, body=raw)


def props(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"title": "Suspicious sign-in", "severity": "High", "status": "New"}
    base.update(overrides)
    return base


class FakeClock:
    """Nanoseconds that only move when told to (so the service's own monotonic bump is visible)."""

    def __init__(self) -> None:
        self.ns = 1_750_000_000 * 10**9

    def __call__(self) -> int:
        return self.ns


def got(svc: SentinelService, name: str) -> dict[str, Any]:
    resource = svc.get(name)
    assert resource is not None, f"{name} does not exist"
    return resource


@pytest.fixture
def svc() -> SentinelService:
    return SentinelService(None, [WS])


def put(svc: SentinelService, name: str, properties: dict[str, Any], etag: str | None = None,
        **kw: Any) -> EmuResponse:
    body: dict[str, Any] = {"properties": properties}
    if etag is not None:
        body["etag"] = etag
    return svc.handle(req("PUT", f"{INCIDENTS}/{name}", body, **kw))


def assert_arm_error(resp: EmuResponse, status: int, code: str | None = None) -> str:
    assert resp.status == status, resp.body
    assert set(resp.body) == {"error"} and isinstance(resp.body["error"]["message"], str)
    if code:
        assert resp.body["error"]["code"] == code
    return str(resp.body["error"]["message"])


# ----------------------------------------------------------------------------------------------- protocol


def test_api_version_is_required_and_checked(svc: SentinelService) -> None:
    assert_arm_error(svc.handle(req("GET", INCIDENTS, api_version=None)), 400, "MissingApiVersionParameter")
    msg = assert_arm_error(svc.handle(req("GET", INCIDENTS, api_version="2021-04-01")), 400,
                           "NoRegisteredProviderFound")
    assert API_VERSION in msg
    assert svc.handle(req("GET", INCIDENTS)).status == 200


def test_verifier_failure_is_401_and_claims_identify_the_writer() -> None:
    seen: list[dict[str, str]] = []

    class TokenError(Exception):
        def __init__(self, message: str, code: str) -> None:
            super().__init__(message)
            self.code = code

    def verifier(headers: dict[str, str]) -> dict[str, Any]:
        seen.append(headers)
        if headers.get("authorization") != "Bearer good":
            raise TokenError("Authorization header is missing.", "missing")
        return {"appid": "sync-app-id", "oid": "11111111-1111-1111-1111-111111111111"}

    svc = SentinelService(verifier, [WS])
    resp = svc.handle(req("GET", f"{INCIDENTS}/x"))
    assert_arm_error(resp, 401, "AuthenticationFailed")
    assert "WWW-Authenticate" in resp.headers
    resp = svc.handle(req("PUT", f"{INCIDENTS}/x", {"properties": props()}, headers={"Authorization": "Bearer good"}))
    assert resp.status == 201
    assert resp.body["systemData"]["lastModifiedBy"] == "sync-app-id"
    assert resp.body["systemData"]["lastModifiedByType"] == "Application"
    assert seen[-1]["authorization"] == "Bearer good"


def test_workspace_is_matched_case_insensitively_and_unknown_is_404(svc: SentinelService) -> None:
    assert put(svc, "a", props()).status == 201
    resp = svc.handle(req("GET", f"{INCIDENTS.lower()}/A"))
    assert resp.status == 200 and resp.body["name"] == "a"
    other = INCIDENTS.replace("ws-central", "ws-other")
    assert_arm_error(svc.handle(req("GET", other)), 404, "ResourceNotFound")
    assert_arm_error(svc.handle(req("GET", f"{WS}/providers/Microsoft.SecurityInsights/watchlists")), 404)


def test_open_service_accepts_any_workspace() -> None:
    svc = SentinelService(None)
    assert put(svc, "a", props()).status == 201
    assert svc.get("a", workspace=WS.upper()) is not None


# ----------------------------------------------------------------------------------------------- PUT semantics


def test_create_sets_server_fields_and_ignores_read_only_ones(svc: SentinelService) -> None:
    body = props(providerName="Evil", providerIncidentId="999", incidentNumber=77,
                 createdTimeUtc="2000-01-01T00:00:00Z", additionalData={"commentsCount": 50}, unknownThing=1,
                 owner={"userPrincipalName": "ana@contoso.com"}, labels=[{"labelName": "x"}, {"labelName": "x"}])
    resp = put(svc, "inc-1", body)
    assert resp.status == 201
    res = resp.body
    p = res["properties"]
    assert res["id"] == f"{INCIDENTS}/inc-1" and res["name"] == "inc-1"
    assert res["type"] == "Microsoft.SecurityInsights/Incidents"
    assert re.fullmatch(r'"[0-9a-f-]{36}"', res["etag"]) and resp.headers["ETag"] == res["etag"]
    assert p["providerName"] == "Azure Sentinel"
    assert p["incidentNumber"] == 1 and p["providerIncidentId"] == "1"
    assert p["createdTimeUtc"] == p["lastModifiedTimeUtc"] and not p["createdTimeUtc"].startswith("2000")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z", p["lastModifiedTimeUtc"])
    assert p["additionalData"]["commentsCount"] == 0
    assert p["incidentUrl"].endswith(f"Incident{INCIDENTS}/inc-1")
    assert "unknownThing" not in p
    assert set(p["owner"]) == {"objectId", "email", "assignedTo", "userPrincipalName", "ownerType"}
    assert p["owner"]["userPrincipalName"] == "ana@contoso.com" and p["owner"]["ownerType"] == "User"
    assert p["labels"] == [{"labelName": "x", "labelType": "User"}]
    assert put(svc, "inc-2", props()).body["properties"]["incidentNumber"] == 2


def test_put_replaces_the_whole_incident(svc: SentinelService) -> None:
    first = put(svc, "a", props(description="d", owner={"userPrincipalName": "u@x"}, labels=[{"labelName": "l"}]))
    resp = put(svc, "a", props(title="New title"), etag=first.body["etag"])
    assert resp.status == 200
    p = resp.body["properties"]
    assert p["title"] == "New title" and "description" not in p and p["labels"] == []
    assert p["owner"]["userPrincipalName"] is None
    assert p["incidentNumber"] == 1 and p["createdTimeUtc"] == first.body["properties"]["createdTimeUtc"]


def test_stale_etag_is_409_and_nothing_is_saved(svc: SentinelService) -> None:
    first = put(svc, "a", props())
    second = put(svc, "a", props(severity="Low"), etag=first.body["etag"])
    assert second.status == 200 and second.body["etag"] != first.body["etag"]
    resp = put(svc, "a", props(severity="Medium"), etag=first.body["etag"])
    msg = assert_arm_error(resp, 409, "Conflict")
    assert msg == f"New version of resource '{INCIDENTS}/a' exists. Data was not saved."
    assert got(svc, "a")["properties"]["severity"] == "Low"
    # If-Match works too, and wins over the body
    resp = put(svc, "a", props(severity="Medium"), etag=second.body["etag"], headers={"If-Match": first.body["etag"]})
    assert resp.status == 409
    assert put(svc, "a", props(severity="Medium"), headers={"If-Match": second.body["etag"]}).status == 200
    # no etag: last writer wins
    assert put(svc, "a", props(severity="Informational")).status == 200
    # an etag for an incident that does not exist cannot match
    assert put(svc, "ghost", props(), etag=first.body["etag"]).status == 409
    assert svc.get("ghost") is None


def test_last_modified_is_strictly_increasing_with_a_stuck_clock() -> None:
    clock = FakeClock()
    svc = SentinelService(None, [WS], clock_ns=clock)
    stamps = []
    etag = None
    for _ in range(5):
        resp = put(svc, "a", props(), etag=etag)
        etag = resp.body["etag"]
        stamps.append(parse_ticks(resp.body["properties"]["lastModifiedTimeUtc"]))
    assert stamps == sorted(set(stamps))
    assert format_ticks(stamps[0]) == got(svc, "a")["properties"]["createdTimeUtc"]


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"title": None}, "title is required"),
    ({"title": "  "}, "title is required"),
    ({"severity": None}, "severity is required"),
    ({"status": None}, "status is required"),
    ({"severity": "high"}, "severity 'high' is not valid"),
    ({"severity": "Unknown"}, "severity"),
    ({"status": "Resolved"}, "status 'Resolved'"),
    ({"status": "Closed"}, "classification is required"),
    ({"status": "Closed", "classification": "TruePositive"}, "classificationReason is required"),
    ({"status": "Closed", "classification": "TruePositive", "classificationReason": "InaccurateData"},
     "not valid for classification TruePositive"),
    ({"status": "Closed", "classification": "BenignPositive", "classificationReason": "SuspiciousActivity"},
     "not valid"),
    ({"status": "Closed", "classification": "FalsePositive", "classificationReason": "SuspiciousButExpected"},
     "not valid"),
    ({"status": "Closed", "classification": "Undetermined", "classificationReason": "InaccurateData"}, "not valid"),
    ({"status": "Closed", "classification": "Maybe", "classificationReason": "InaccurateData"}, "classification"),
    ({"owner": {"objectId": "not-a-guid"}}, "objectId must be a GUID"),
    ({"owner": "someone"}, "owner must be an object"),
    ({"labels": [{"labelType": "User"}]}, "labelName is required"),
    ({"lastActivityTimeUtc": "yesterday"}, "ISO-8601"),
])
def test_validation_rejects_bad_bodies(svc: SentinelService, overrides: dict[str, Any], fragment: str) -> None:
    body = props(**overrides)
    body = {k: v for k, v in body.items() if v is not None}
    msg = assert_arm_error(put(svc, "a", body), 400, "BadRequest")
    assert fragment in msg
    assert svc.get("a") is None


def test_malformed_json_and_missing_properties_are_400(svc: SentinelService) -> None:
    assert_arm_error(svc.handle(req("PUT", f"{INCIDENTS}/a", b"{nope")), 400, "InvalidRequestContent")
    assert_arm_error(svc.handle(req("PUT", f"{INCIDENTS}/a", {"title": "x"})), 400, "BadRequest")


@pytest.mark.parametrize(("classification", "reason"), [
    ("TruePositive", "SuspiciousActivity"),
    ("BenignPositive", "SuspiciousButExpected"),
    ("FalsePositive", "IncorrectAlertLogic"),
    ("FalsePositive", "InaccurateData"),
    ("Undetermined", None),
])
def test_valid_closures(svc: SentinelService, classification: str, reason: str | None) -> None:
    body = props(status="Closed", classification=classification, classificationComment="done")
    if reason:
        body["classificationReason"] = reason
    resp = put(svc, "a", body)
    assert resp.status == 201
    p = resp.body["properties"]
    assert p["classification"] == classification and p.get("classificationReason") == reason
    assert p["classificationComment"] == "done"


def test_open_incident_carries_no_classification(svc: SentinelService) -> None:
    closed = put(svc, "a", props(status="Closed", classification="TruePositive",
                                 classificationReason="SuspiciousActivity"))
    reopened = put(svc, "a", props(status="Active", classification="TruePositive",
                                   classificationReason="SuspiciousActivity"), etag=closed.body["etag"])
    assert reopened.status == 200
    assert "classification" not in reopened.body["properties"]
    assert "classificationReason" not in reopened.body["properties"]


# ----------------------------------------------------------------------------------------------- list


def seed_many(svc: SentinelService, n: int) -> list[str]:
    names = [f"inc-{i:03d}" for i in range(n)]
    for name in names:
        assert put(svc, name, props(title=name)).status == 201
    return names


def follow(svc: SentinelService, first: EmuRequest) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    request, pages = first, 0
    while True:
        resp = svc.handle(request)
        assert resp.status == 200, resp.body
        pages += 1
        items.extend(resp.body["value"])
        link = resp.body.get("nextLink")
        if not link:
            return items, pages
        parts = urlsplit(link)
        assert parts.scheme == "https" and parts.netloc == "127.0.0.1:8443"
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        request = req("GET", parts.path, query=query, api_version=None)


def test_paging_with_top_and_nextlink(svc: SentinelService) -> None:
    names = seed_many(svc, 23)
    items, pages = follow(svc, req("GET", INCIDENTS, query={"$top": "10",
                                                           "$orderby": "properties/lastModifiedTimeUtc asc"}))
    assert [i["name"] for i in items] == names and pages == 3
    items, _ = follow(svc, req("GET", INCIDENTS, query={"$orderby": "properties/createdTimeUtc desc", "$top": "7"}))
    assert [i["name"] for i in items] == names[::-1]
    resp = svc.handle(req("GET", INCIDENTS))
    assert len(resp.body["value"]) == 23 and "nextLink" not in resp.body     # default page size 50


def test_top_limits_and_bad_tokens(svc: SentinelService) -> None:
    assert svc.handle(req("GET", INCIDENTS, query={"$top": "1000"})).status == 200
    assert_arm_error(svc.handle(req("GET", INCIDENTS, query={"$top": "1001"})), 400)
    assert_arm_error(svc.handle(req("GET", INCIDENTS, query={"$top": "0"})), 400)
    assert_arm_error(svc.handle(req("GET", INCIDENTS, query={"$top": "ten"})), 400)
    assert_arm_error(svc.handle(req("GET", INCIDENTS, query={"$skipToken": "!!"})), 400)
    assert_arm_error(svc.handle(req("GET", INCIDENTS, query={"$orderby": "properties/title asc"})), 400)


def test_filter_on_last_modified_and_provider_incident_id() -> None:
    clock = FakeClock()
    svc = SentinelService(None, [WS], clock_ns=clock)
    seed_many(svc, 3)
    cutoff = got(svc, "inc-001")["properties"]["lastModifiedTimeUtc"]
    q = {"$filter": f"properties/lastModifiedTimeUtc ge {cutoff}", "$orderby": "properties/lastModifiedTimeUtc"}
    assert [i["name"] for i in svc.handle(req("GET", INCIDENTS, query=q)).body["value"]] == ["inc-001", "inc-002"]
    q["$filter"] = f"properties/lastModifiedTimeUtc gt {cutoff}"
    assert [i["name"] for i in svc.handle(req("GET", INCIDENTS, query=q)).body["value"]] == ["inc-002"]
    # a microsecond-truncated cursor with gt still returns the incident at the cursor (7-digit times)
    truncated = cutoff[:26] + "Z"
    q["$filter"] = f"properties/lastModifiedTimeUtc gt {truncated}"
    names = [i["name"] for i in svc.handle(req("GET", INCIDENTS, query=q)).body["value"]]
    assert names[-1] == "inc-002" and len(names) in (1, 2)
    svc.seed_xdr_incident("2972395", name="xdr-1", title="From the connector")
    q = {"$filter": f"properties/providerIncidentId eq '2972395' and properties/lastModifiedTimeUtc ge {cutoff}"}
    found = svc.handle(req("GET", INCIDENTS, query=q)).body["value"]
    assert [i["name"] for i in found] == ["xdr-1"]
    assert found[0]["properties"]["providerName"] == "Microsoft XDR"
    q = {"$filter": "properties/providerIncidentId eq '1'"}          # native incident numbers are not Defender IDs
    assert [i["name"] for i in svc.handle(req("GET", INCIDENTS, query=q)).body["value"]] == ["inc-000"]
    q = {"$filter": "properties/providerIncidentId eq 'it''s'"}
    assert svc.handle(req("GET", INCIDENTS, query=q)).body["value"] == []
    q = {"$filter": "datetime'2020-01-01T00:00:00Z' le properties/lastModifiedTimeUtc"}
    assert_arm_error(svc.handle(req("GET", INCIDENTS, query=q)), 400)
    q = {"$filter": "properties/status eq 'New' or properties/status eq 'Active'"}
    assert "only 'and'" in assert_arm_error(svc.handle(req("GET", INCIDENTS, query=q)), 400)
    q = {"$filter": "properties/owner eq 'x'"}
    assert_arm_error(svc.handle(req("GET", INCIDENTS, query=q)), 400)


def test_offset_paging_shifts_when_an_incident_moves_but_keyset_does_not() -> None:
    for mode, expect_skip in (("offset", True), ("keyset", False)):
        svc = SentinelService(None, [WS], paging=mode)
        names = seed_many(svc, 6)
        first = svc.handle(req("GET", INCIDENTS, query={"$top": "3", "$orderby": "properties/lastModifiedTimeUtc"}))
        svc.analyst_update("inc-000", severity="Low")          # moves to the end of the order
        link = urlsplit(first.body["nextLink"])
        rest = svc.handle(req("GET", link.path, query={k: v[0] for k, v in parse_qs(link.query).items()},
                              api_version=None))
        seen = [i["name"] for i in first.body["value"] + rest.body["value"]]
        assert ("inc-003" not in seen) is expect_skip, (mode, seen)
        assert set(seen) | {"inc-003"} == set(names)


# ----------------------------------------------------------------------------------------------- comments


def test_comments_put_get_list_and_limits(svc: SentinelService) -> None:
    put(svc, "a", props())
    before = got(svc, "a")
    path = f"{INCIDENTS}/a/comments/c-1"
    resp = svc.handle(req("PUT", path, {"properties": {"message": "hello"}}))
    assert resp.status == 201
    assert resp.body["properties"]["message"] == "hello" and resp.body["name"] == "c-1"
    assert resp.body["type"] == "Microsoft.SecurityInsights/Incidents/Comments"
    assert {"createdTimeUtc", "lastModifiedTimeUtc", "author"} <= set(resp.body["properties"])
    assert svc.handle(req("PUT", path, {"properties": {"message": "hello again"}})).status == 200
    assert svc.handle(req("GET", path)).body["properties"]["message"] == "hello again"
    assert_arm_error(svc.handle(req("GET", f"{INCIDENTS}/a/comments/nope")), 404)
    assert_arm_error(svc.handle(req("PUT", path, {"properties": {}})), 400)
    assert_arm_error(svc.handle(req("PUT", path, {"properties": {"message": ""}})), 400)
    assert svc.handle(req("PUT", path, {"properties": {"message": "x" * MAX_COMMENT_CHARS}})).status == 200
    msg = assert_arm_error(svc.handle(req("PUT", path, {"properties": {"message": "x" * (MAX_COMMENT_CHARS + 1)}})),
                           400)
    assert "30000" in msg
    emoji = "\U0001F600" * (MAX_COMMENT_CHARS // 2) + "x"          # 30,001 UTF-16 units in 15,001 code points
    assert_arm_error(svc.handle(req("PUT", path, {"properties": {"message": emoji}})), 400)
    assert_arm_error(svc.handle(req("PUT", f"{INCIDENTS}/zzz/comments/c", {"properties": {"message": "m"}})), 404)
    after = got(svc, "a")
    assert after["properties"]["additionalData"]["commentsCount"] == 1
    # default: a comment does not move the incident
    assert after["properties"]["lastModifiedTimeUtc"] == before["properties"]["lastModifiedTimeUtc"]
    assert after["etag"] == before["etag"]


def test_comment_bumps_modified_when_configured() -> None:
    svc = SentinelService(None, [WS], comment_bumps_modified=True)
    put(svc, "a", props())
    before = got(svc, "a")
    svc.analyst_comment("a", "looked at it", "ana@contoso.com")
    after = got(svc, "a")
    assert after["properties"]["lastModifiedTimeUtc"] > before["properties"]["lastModifiedTimeUtc"]
    assert after["etag"] != before["etag"]


def test_comment_list_pages_oldest_first() -> None:
    svc = SentinelService(None, [WS], default_page_size=4)
    put(svc, "a", props())
    for i in range(10):
        svc.handle(req("PUT", f"{INCIDENTS}/a/comments/c{i}", {"properties": {"message": f"m{i}"}}))
    items, pages = follow(svc, req("GET", f"{INCIDENTS}/a/comments"))
    assert [c["properties"]["message"] for c in items] == [f"m{i}" for i in range(10)] and pages == 3
    assert_arm_error(svc.handle(req("GET", f"{INCIDENTS}/nope/comments")), 404)


# ----------------------------------------------------------------------------------------------- delete


def test_delete_records_and_returns_404(svc: SentinelService) -> None:
    put(svc, "a", props())
    assert svc.handle(req("DELETE", f"{INCIDENTS}/a")).status == 200
    assert_arm_error(svc.handle(req("GET", f"{INCIDENTS}/a")), 404, "NotFound")
    assert_arm_error(svc.handle(req("GET", f"{INCIDENTS}/a/comments")), 404)
    assert svc.handle(req("DELETE", f"{INCIDENTS}/a")).status == 204
    assert "a" in svc.deleted() and svc.get("a") is None
    assert svc.all_incidents() == []
    put(svc, "b", props())
    svc.analyst_delete("b", deleted_by="boss@contoso.com")
    assert svc.deleted()["b"]["deletedBy"] == "boss@contoso.com"


def test_method_not_allowed(svc: SentinelService) -> None:
    assert_arm_error(svc.handle(req("POST", INCIDENTS)), 405)
    assert_arm_error(svc.handle(req("PATCH", f"{INCIDENTS}/a")), 405)


# ----------------------------------------------------------------------------------------------- analyst API


def test_analyst_update_bumps_and_records_the_user(svc: SentinelService) -> None:
    created = put(svc, "a", props(labels=[{"labelName": "keep"}]))
    resp = svc.analyst_update("a", status="Closed", classification="TruePositive",
                              classification_reason="SuspiciousActivity", owner="ana@contoso.com",
                              labels=["keep", "apt"], updated_by="ana@contoso.com")
    p = resp["properties"]
    assert p["status"] == "Closed" and p["classificationReason"] == "SuspiciousActivity"
    assert p["owner"]["email"] == "ana@contoso.com" and p["owner"]["objectId"]
    assert [lbl["labelName"] for lbl in p["labels"]] == ["keep", "apt"]
    assert resp["etag"] != created.body["etag"]
    assert p["lastModifiedTimeUtc"] > created.body["properties"]["lastModifiedTimeUtc"]
    assert resp["systemData"]["lastModifiedBy"] == "ana@contoso.com"
    assert resp["systemData"]["lastModifiedByType"] == "User"
    last = svc.history("a")[-1]
    assert last["by"] == "ana@contoso.com" and "status" in last["changed"]
    # reopening clears the closure
    p = svc.analyst_update("a", status="Active")["properties"]
    assert "classification" not in p
    with pytest.raises(ValueError, match="classification is required"):
        svc.analyst_update("a", status="Closed")
    with pytest.raises(ValueError, match="unknown incident property"):
        svc.analyst_update("a", colour="red")
    with pytest.raises(KeyError):
        svc.analyst_update("zzz", status="Active")
    assert svc.writes() == 1          # analyst edits are not API writes


def test_label_only_edit_can_leave_last_modified_alone() -> None:
    svc = SentinelService(None, [WS], label_bumps_modified=False)
    put(svc, "a", props())
    before = got(svc, "a")["properties"]["lastModifiedTimeUtc"]
    assert svc.analyst_update("a", labels=["x"])["properties"]["lastModifiedTimeUtc"] == before
    assert svc.analyst_update("a", severity="Low")["properties"]["lastModifiedTimeUtc"] > before


def test_seeded_xdr_incident_keeps_its_provider_through_puts(svc: SentinelService) -> None:
    seeded = svc.seed_xdr_incident("42", severity="Low", owner="ana@contoso.com")
    assert seeded["properties"]["providerName"] == "Microsoft XDR"
    assert seeded["properties"]["providerIncidentId"] == "42"
    assert seeded["properties"]["additionalData"]["providerIncidentUrl"] == "https://security.microsoft.com/incidents/42"
    resp = put(svc, seeded["name"], props(), etag=seeded["etag"])
    assert resp.status == 200
    assert resp.body["properties"]["providerName"] == "Microsoft XDR"
    assert resp.body["properties"]["providerIncidentId"] == "42"
    old = svc.seed_xdr_incident("43", provider_name="Microsoft 365 Defender")
    assert old["properties"]["providerName"] == "Microsoft 365 Defender"
    assert svc.writes() == 1


def test_write_counts(svc: SentinelService) -> None:
    first = put(svc, "a", props())
    put(svc, "a", props(), etag=first.body["etag"])
    put(svc, "a", props(), etag=first.body["etag"])                 # 409
    put(svc, "b", props(status="Closed"))                           # 400
    svc.handle(req("PUT", f"{INCIDENTS}/a/comments/c", {"properties": {"message": "m"}}))
    assert svc.writes("a") == 3 and svc.writes("a", kind="incident") == 2 and svc.writes("b") == 0
    assert svc.write_counts() == {"a": 3}
    assert sorted(w.status for w in svc.rejected_writes()) == [400, 409]
    svc.reset_write_log()
    assert svc.writes() == 0


def test_trigger_body_shape(svc: SentinelService) -> None:
    created = put(svc, "a", props(owner={"userPrincipalName": "ana@contoso.com"}))
    svc.analyst_comment("a", "<b>note</b>", "ana@contoso.com")
    body = svc.trigger_body("a")
    assert body["objectSchemaType"] == "Incident" and body["objectEventType"] == "Update"
    assert re.fullmatch(r"[0-9a-f-]{36}", body["eventUniqueId"])
    assert body["workspaceInfo"] == {"SubscriptionId": "00000000-0000-0000-0000-000000000001",
                                     "ResourceGroupName": "rg-soc", "WorkspaceName": "ws-central"}
    assert re.fullmatch(r"[0-9a-f-]{36}", body["workspaceId"]) and body["workspaceId"] == svc.workspace_guid()
    obj = body["object"]
    assert obj["id"].lower() == created.body["id"].lower() and "/Incidents/" in obj["id"]
    assert obj["name"] == "a" and obj["etag"] == created.body["etag"]
    assert obj["type"] == "Microsoft.SecurityInsights/Incidents"
    p = obj["properties"]
    assert p["title"] == "Suspicious sign-in" and p["owner"]["userPrincipalName"] == "ana@contoso.com"
    assert p["alerts"] == [] and p["relatedEntities"] == [] and len(p["comments"]) == 1
    assert svc.trigger_body("a")["eventUniqueId"] != body["eventUniqueId"]
    assert svc.trigger_body("a", event_type="Create")["objectEventType"] == "Create"
    json.dumps(body)


# ----------------------------------------------------------------------------------------------- faults & control


def test_fault_plan_is_applied_when_given() -> None:
    plan = FaultPlan()
    svc = SentinelService(None, [WS], faults=plan)
    plan.queue("sentinel", Fault("status", 429, retry_after="7"))
    resp = svc.handle(req("GET", INCIDENTS))
    assert resp.status == 429 and resp.headers["Retry-After"] == "7"
    assert resp.body["error"]["code"] == "TooManyRequests"
    assert svc.handle(req("GET", INCIDENTS)).status == 200
    plan.queue("sentinel", Fault("drop"))
    with pytest.raises(ConnectionAbortedError):
        svc.handle(req("GET", INCIDENTS))


def test_control_api_over_handle(svc: SentinelService) -> None:
    put(svc, "a", props())
    resp = svc.handle(EmuRequest("POST", "/_control/sentinel/analyst_update", {}, {},
                                 json.dumps({"incident_name": "a", "status": "Active"}).encode()))
    assert resp.status == 200 and resp.body["result"]["properties"]["status"] == "Active"
    resp = svc.handle(EmuRequest("POST", "/_control/sentinel/trigger_body", {}, {}, b'{"incident_name": "a"}'))
    assert resp.body["result"]["object"]["name"] == "a"
    assert svc.handle(EmuRequest("POST", "/_control/sentinel/nope", {}, {}, b"")).status == 404
    resp = svc.handle(EmuRequest("POST", "/_control/sentinel/analyst_update", {}, {},
                                 b'{"incident_name": "a", "status": "Closed"}'))
    assert resp.status == 400
    resp = svc.handle(EmuRequest("POST", "/_control/sentinel/config", {}, {}, b'{"comment_bumps_modified": true}'))
    assert resp.body["result"]["comment_bumps_modified"] is True and svc.comment_bumps_modified
