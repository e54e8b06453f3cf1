"""Property-based and example tests of the pure Defender ⇄ Sentinel mapping (sync.mapping)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync import mapping as m
from sync.mapping import OwnerMap, SyncedFields

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------------------------

_name_chars = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))
user_tag = st.text(_name_chars, min_size=1, max_size=12).filter(lambda t: t.strip() != "" and not m.is_app_label(t))
app_shaped_tag = st.sampled_from(["redirected", "Redirected", "defender-sync", "tenant:x", "determination:malware",
                                  "DETERMINATION:other"])
identity = st.builds(lambda u, d, upper: (f"{u}@{d}.com".upper() if upper else f"{u}@{d}.com"),
                     st.text("abcdefgh", min_size=1, max_size=5), st.sampled_from(["contoso", "mssp", "customer"]),
                     st.booleans())


@st.composite
def owner_maps(draw: st.DrawFn) -> dict[str, str]:
    sentinel_ids = draw(st.lists(identity, max_size=4, unique_by=str.lower))
    defender_ids = draw(st.lists(identity, min_size=len(sentinel_ids), max_size=len(sentinel_ids),
                                 unique_by=str.lower))
    return dict(zip(sentinel_ids, defender_ids, strict=True))


def representable_owner(draw: st.DrawFn, raw_map: dict[str, str]) -> str | None:
    """A Defender owner the map can express in Sentinel (see OwnerMap's documented limitation)."""
    keys = {k.lower() for k in raw_map}
    values = {v.lower() for v in raw_map.values()}
    choices = st.one_of(st.none(), identity.filter(lambda x: x.lower() not in keys or x.lower() in values))
    if raw_map:
        choices = st.one_of(choices, st.sampled_from(sorted(raw_map.values())))
    return draw(choices)


ALL_DETERMINATIONS = sorted(set().union(*m.VALID_DETERMINATIONS.values(), *m.TOLERATED_DETERMINATIONS.values()))
RAW_DETERMINATIONS = [*ALL_DETERMINATIONS, "compromisedUser", "clean", "insufficientData", "confirmedUserActivity",
                      "unknownFutureValue", "someFutureValue", None, ""]
RAW_CLASSIFICATIONS = ["truePositive", "falsePositive", "informationalExpectedActivity", "unknown", "TruePositive",
                       "unknownFutureValue", None]
DEFENDER_STATUSES = ["active", "inProgress", "awaitingAction", "unknownFutureValue", "resolved", "redirected"]
SEVERITIES = ["high", "medium", "low", "informational", "unknown", "unknownFutureValue", None]

alert = st.fixed_dictionaries({
    "id": st.text("abc0123", min_size=1, max_size=6),
    "title": st.text(_name_chars, max_size=40),
    "severity": st.sampled_from(SEVERITIES),
    "status": st.sampled_from(["new", "inProgress", "resolved"]),
    "createdDateTime": st.sampled_from(["2024-01-01T00:00:00.1234567Z", "2024-01-02T00:00:00Z"]),
    "firstActivityDateTime": st.sampled_from(["2024-01-01T00:00:00.1234567Z", "2023-12-31T10:00:00Z"]),
    "lastActivityDateTime": st.sampled_from(["2024-01-01T00:00:00.1234567Z", "2024-01-03T10:00:00Z"]),
})


@st.composite
def defender_incidents(draw: st.DrawFn, raw_map: dict[str, str] | None = None) -> dict[str, Any]:
    status = draw(st.sampled_from(DEFENDER_STATUSES))
    incident: dict[str, Any] = {
        "id": str(draw(st.integers(1, 10**7))),
        "tenantId": "11111111-2222-3333-4444-555555555555",
        "status": status,
        "severity": draw(st.sampled_from(SEVERITIES)),
        "displayName": draw(st.text(_name_chars, max_size=300)),
        "description": draw(st.text(_name_chars, max_size=300)),
        "classification": draw(st.sampled_from(RAW_CLASSIFICATIONS)),
        "determination": draw(st.sampled_from(RAW_DETERMINATIONS)),
        "assignedTo": representable_owner(draw, raw_map or {}),
        "customTags": draw(st.lists(st.one_of(user_tag, app_shaped_tag), max_size=5)),
        "alerts": draw(st.lists(alert, max_size=4)),
    }
    incident["incidentWebUrl"] = f"https://security.microsoft.com/incidents/{incident['id']}?tid={incident['tenantId']}"
    if status == "redirected":
        incident["redirectIncidentId"] = str(draw(st.integers(1, 10**7)))
    return incident


@st.composite
def current_sentinel(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    labels = [{"labelName": n, "labelType": "User"} for n in draw(st.lists(st.one_of(user_tag, app_shaped_tag),
                                                                           max_size=3))]
    labels += [{"labelName": n, "labelType": "AutoAssigned"} for n in draw(st.lists(user_tag, max_size=2))]
    props: dict[str, Any] = {
        "title": "edited by analyst", "severity": "High", "status": draw(st.sampled_from(["New", "Active", "Closed"])),
        "labels": labels, "firstActivityTimeUtc": "2020-01-01T00:00:00Z", "incidentNumber": 7,
        "lastModifiedTimeUtc": "2024-01-01T00:00:00Z", "providerName": "Azure Sentinel",
        "additionalData": {"alertsCount": 0},
    }
    if props["status"] == "Closed":
        props["classification"] = draw(st.sampled_from(["TruePositive", "FalsePositive", "Undetermined"]))
        props["classificationComment"] = "analyst note"
    if draw(st.booleans()):
        props["owner"] = {"objectId": str(uuid.uuid4()), "userPrincipalName": draw(identity), "ownerType": "User"}
    return props


# ------------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------------

@FAST
@given(st.data())
def test_defender_to_sentinel_round_trip(data: st.DataObject) -> None:
    raw_map = data.draw(owner_maps())
    owner_map = OwnerMap(raw_map)
    incident = data.draw(defender_incidents(raw_map))
    current = data.draw(current_sentinel())
    fields = m.from_defender(incident)

    props = m.to_sentinel_properties(incident, fields, current, owner_map=owner_map, tenant_name="Contoso")
    back, problems = m.from_sentinel(props, owner_map=owner_map, base=fields)
    assert back == fields
    assert problems == []
    # Without a base, the Defender incident alone gives the same reading.
    back2, problems2 = m.from_sentinel(props, owner_map=owner_map, base=None, defender=incident)
    assert back2 == fields
    assert problems2 == []

    assert not m.sentinel_labels_stale(props, fields, tenant_name="Contoso",
                                       redirected=incident["status"] == "redirected")
    # Invariants of a PUT body.
    assert {"title", "severity", "status"} <= props.keys()
    assert not props.keys() & {"incidentNumber", "lastModifiedTimeUtc", "providerName", "additionalData"}
    assert m.utf16_len(props["description"]) <= m.DESCRIPTION_LIMIT
    assert m.utf16_len(props["title"]) <= m.TITLE_LIMIT
    names = [label["labelName"] for label in props["labels"]]
    assert m.SOURCE_LABEL in names and "tenant:Contoso" in names
    assert (m.REDIRECTED_LABEL in names) == (incident["status"] == "redirected")
    if props["status"] == "Closed":
        assert props["classification"] in {"TruePositive", "FalsePositive", "BenignPositive", "Undetermined"}
        assert ("classificationReason" in props) == (props["classification"] != "Undetermined")
    else:
        assert not props.keys() & {"classification", "classificationReason", "classificationComment"}
    if current is not None:
        assert props["firstActivityTimeUtc"] == "2020-01-01T00:00:00Z"
        auto = [lb for lb in current["labels"] if lb["labelType"] == "AutoAssigned"]
        assert all(lb in props["labels"] for lb in auto)
        # Defender-owned fields are put back over an analyst's edit.
        assert props["title"] != "edited by analyst" or incident["displayName"] == "edited by analyst"


@FAST
@given(st.data())
def test_sentinel_put_is_stable(data: st.DataObject) -> None:
    """Rebuilding from the incident just written gives the same body: a quiet system never rewrites."""
    raw_map = data.draw(owner_maps())
    owner_map = OwnerMap(raw_map)
    incident = data.draw(defender_incidents(raw_map))
    fields = m.from_defender(incident)
    first = m.to_sentinel_properties(incident, fields, data.draw(current_sentinel()), owner_map=owner_map,
                                     tenant_name="t")
    second = m.to_sentinel_properties(incident, fields, first, owner_map=owner_map, tenant_name="t")
    assert second == first


@FAST
@given(st.data())
def test_defender_patch_round_trip(data: st.DataObject) -> None:
    incident = data.draw(defender_incidents())
    assert m.to_defender_patch(m.from_defender(incident), incident) == {}  # echo: nothing to write

    target = m.from_defender(data.draw(defender_incidents().filter(lambda i: i["status"] != "redirected")))
    patch = m.to_defender_patch(target, incident)
    if incident["status"] == "redirected":
        assert patch == {}
        return
    assert patch.get("status") not in ("redirected", "awaitingAction")
    assert ("classification" in patch) == ("determination" in patch)
    if "classification" in patch:
        assert target.status == "resolved"
    updated = {**incident, **patch}
    assert m.from_defender(updated) == target
    assert m.to_defender_patch(target, updated) == {}
    # App-label-shaped Defender tags are not ours to drop.
    if "customTags" in patch:
        kept = [t for t in incident["customTags"] if m.is_app_label(t)]
        assert all(t in patch["customTags"] for t in kept)


def test_reopen_leaves_defender_classification_alone() -> None:
    incident = {"status": "resolved", "classification": "truePositive", "determination": "malware"}
    reopened = SyncedFields("active", None, None, None, frozenset())
    assert m.to_defender_patch(reopened, incident) == {"status": "active"}
    in_progress = SyncedFields("inProgress", None, None, None, frozenset())
    assert m.to_defender_patch(in_progress, incident) == {"status": "inProgress"}


def test_in_progress_fallback() -> None:
    assert m.in_progress_fallback({"status": "inProgress", "assignedTo": "a"}) == {"status": "active",
                                                                                 "assignedTo": "a"}
    assert m.in_progress_fallback({"status": "resolved"}) == {"status": "resolved"}


def test_awaiting_action_reads_in_progress_and_is_not_overwritten() -> None:
    incident = {"status": "awaitingAction"}
    fields = m.from_defender(incident)
    assert fields.status == "inProgress"
    assert m.to_defender_patch(fields, incident) == {}
    assert m.from_defender({"status": "unknownFutureValue"}).status == "inProgress"


def test_close_writes_classification_and_determination_together() -> None:
    incident = {"status": "active", "classification": "truePositive", "determination": "malware"}
    closed = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    assert m.to_defender_patch(closed, incident) == {"status": "resolved", "classification": "truePositive",
                                                     "determination": "malware"}
    reclassified = SyncedFields("resolved", None, "falsePositive", "other", frozenset())
    current = {"status": "resolved", "classification": "truePositive", "determination": "malware"}
    assert m.to_defender_patch(reclassified, current) == {"classification": "falsePositive", "determination": "other"}


def test_owner_and_tags_patch() -> None:
    current = {"status": "active", "assignedTo": "Kai@Contoso.com", "customTags": ["b", "redirected", "a"]}
    same = SyncedFields("active", "kai@contoso.com", None, None, frozenset({"a", "b"}))
    assert m.to_defender_patch(same, current) == {}
    changed = SyncedFields("active", None, None, None, frozenset({"a", "c"}))
    assert m.to_defender_patch(changed, current) == {"assignedTo": None, "customTags": ["redirected", "a", "c"]}


# ------------------------------------------------------------------------------------------------------------------
# Determination rules
# ------------------------------------------------------------------------------------------------------------------

OM = OwnerMap({})
OPEN = SyncedFields("active", None, None, None, frozenset())


def closed(classification: str, *labels: str, reason: str | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"status": "Closed", "classification": classification,
                             "labels": [{"labelName": n, "labelType": "User"} for n in labels]}
    if reason:
        props["classificationReason"] = reason
    return props


def read(props: dict[str, Any], base: SyncedFields | None = OPEN,
         defender: dict[str, Any] | None = None) -> tuple[SyncedFields, list[str]]:
    return m.from_sentinel(props, owner_map=OM, base=base, defender=defender)


def test_sentinel_close_keeps_valid_defender_determination() -> None:
    base = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    fields, problems = read(closed("TruePositive"), base)
    assert (fields.classification, fields.determination, problems) == ("truePositive", "malware", [])
    # Reopened earlier: Defender still holds its determination, and a re-close keeps it.
    fields, _ = read(closed("TruePositive"), OPEN, {"status": "active", "classification": "truePositive",
                                                    "determination": "phishing"})
    assert fields.determination == "phishing"
    # "other" is valid for every classification but unknown.
    base_fp = SyncedFields("resolved", None, "falsePositive", "other", frozenset())
    assert read(closed("BenignPositive"), base_fp)[0].determination == "other"


def test_sentinel_close_falls_back_to_other_or_unknown() -> None:
    base = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    assert read(closed("FalsePositive", reason="InaccurateData"), base)[0].determination == "other"
    assert read(closed("TruePositive"), OPEN)[0].determination == "other"
    assert read(closed("TruePositive"), None)[0].determination == "other"
    fields, problems = read(closed("Undetermined"), base)
    assert (fields.classification, fields.determination, problems) == ("unknown", "unknown", [])


def test_incorrect_alert_logic_reads_false_positive_and_is_kept() -> None:
    fields, _ = read(closed("FalsePositive", reason="IncorrectAlertLogic"))
    assert fields.classification == "falsePositive"
    current = closed("FalsePositive", reason="IncorrectAlertLogic")
    props = m.to_sentinel_properties({"id": "1"}, fields, current, owner_map=OM, tenant_name="t")
    assert props["classificationReason"] == "IncorrectAlertLogic"
    other = SyncedFields("resolved", None, "truePositive", "other", frozenset())
    props = m.to_sentinel_properties({"id": "1"}, other, current, owner_map=OM, tenant_name="t")
    assert (props["classification"], props["classificationReason"]) == ("TruePositive", "SuspiciousActivity")


def test_determination_label_sets_it_explicitly() -> None:
    fields, problems = read(closed("BenignPositive", "determination:securityTesting"))
    assert (fields.determination, problems) == ("securityTesting", [])
    fields, problems = read(closed("FalsePositive", "determination:Clean"))  # legacy name, value in any case
    assert (fields.determination, problems) == ("notMalicious", [])
    # Two labels: the analyst's new one is the one that differs from the base (the app's label shows the base),
    # whatever Sentinel's label order; the ambiguity is reported.
    base = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    both = closed("TruePositive", "determination:malware", "determination:phishing")
    reordered = closed("TruePositive", "determination:phishing", "determination:malware")
    fields, problems = read(both, base)
    assert fields.determination == "phishing" and read(reordered, base)[0] == fields
    assert len(problems) == 1 and "several determination labels (malware, phishing)" in problems[0]
    assert fields.tags == frozenset()
    # ...and the labels are flagged for the one repairing write, after which they are clean.
    assert m.sentinel_labels_stale(both, fields, tenant_name="t", redirected=False)
    repaired = m.to_sentinel_properties({"id": "1"}, fields, both, owner_map=OM, tenant_name="t")
    assert not m.sentinel_labels_stale(repaired, fields, tenant_name="t", redirected=False)
    assert read(repaired, fields) == (fields, [])


def test_invalid_determination_label_is_ignored_and_reported() -> None:
    fields, problems = read(closed("FalsePositive", "determination:malware"))
    assert fields.determination == "other"
    assert len(problems) == 1 and "determination:malware" in problems[0]
    fields, problems = read(closed("TruePositive", "determination:bogus"))
    assert fields.determination == "other" and len(problems) == 1


def test_stale_app_label_after_reclassification_is_not_an_error() -> None:
    base = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    fields, problems = read(closed("FalsePositive", "determination:malware"), base)
    assert (fields.classification, fields.determination, problems) == ("falsePositive", "other", [])
    props = m.to_sentinel_properties({"id": "1"}, fields, closed("FalsePositive", "determination:malware"),
                                     owner_map=OM, tenant_name="t")
    names = {label["labelName"] for label in props["labels"]}
    assert "determination:other" in names and "determination:malware" not in names


def test_open_sentinel_incident_has_no_classification() -> None:
    fields, problems = read({"status": "Active", "classification": "TruePositive", "labels": []})
    assert (fields.status, fields.classification, fields.determination, problems) == ("inProgress", None, None, [])
    assert read({"status": "New"})[0].status == "active"
    fields, problems = read({"status": "Weird"})
    assert fields.status == "active" and problems
    base = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    fields, problems = read({"status": None}, base)
    assert fields == base and problems


def test_validity_table_and_legacy_names() -> None:
    assert m.VALID_DETERMINATIONS["unknown"] == {"unknown"}
    assert "other" in m.VALID_DETERMINATIONS["truePositive"] & m.VALID_DETERMINATIONS["falsePositive"]
    assert m.is_valid_determination("truePositive", "apt", tolerate_deprecated=True)
    assert not m.is_valid_determination("truePositive", "apt")
    legacy = {"compromisedUser": "compromisedAccount", "clean": "notMalicious",
              "insufficientData": "notEnoughDataToValidate", "confirmedUserActivity": "confirmedActivity"}
    for old, new in legacy.items():
        assert m.normalize_determination(old) == new
    assert m.from_defender({"status": "resolved", "classification": "TruePositive",
                            "determination": "compromisedUser"}).determination == "compromisedAccount"
    assert m.normalize_determination(None) == "unknown"
    assert m.normalize_classification("unknownFutureValue") == "unknown"


# ------------------------------------------------------------------------------------------------------------------
# Redirected, severity, owners, labels, description
# ------------------------------------------------------------------------------------------------------------------

def test_redirected_maps_to_closed_undetermined_with_link() -> None:
    incident = {"id": "10", "tenantId": "tid", "status": "redirected", "redirectIncidentId": "42",
                "classification": "truePositive", "determination": "malware",
                "incidentWebUrl": "https://security.microsoft.com/incidents/10?tid=tid"}
    fields = m.from_defender(incident)
    assert (fields.status, fields.classification, fields.determination) == ("resolved", "unknown", "unknown")
    props = m.to_sentinel_properties(incident, fields, None, owner_map=OM, tenant_name="t",
                                     surviving_sentinel_url="https://portal/x")
    assert props["status"] == "Closed" and props["classification"] == "Undetermined"
    assert "classificationReason" not in props
    assert {"labelName": "redirected", "labelType": "User"} in props["labels"]
    comment = m.redirect_comment(incident)
    assert comment is not None and "https://security.microsoft.com/incidents/42?tid=tid" in comment
    assert "https://portal/x" in props["classificationComment"]
    assert m.to_defender_patch(SyncedFields("active", None, None, None, frozenset()), incident) == {}
    assert m.redirect_comment({"status": "active"}) is None
    assert m.redirect_comment_id(incident) == m.redirect_comment_id(dict(incident))
    uuid.UUID(m.redirect_comment_id(incident))
    posted = m.redirect_sentinel_comment(incident)
    assert posted is not None and posted[0] == m.redirect_comment_id(incident)
    assert m.is_mirrored_comment(posted[1]) == "defender"  # never pushed back to Defender
    assert "incidents/42" in posted[1]
    assert m.redirect_sentinel_comment({"status": "resolved"}) is None


@pytest.mark.parametrize(("defender", "sentinel"), [
    ("high", "High"), ("medium", "Medium"), ("low", "Low"), ("informational", "Informational"),
    ("unknown", "Informational"), ("unknownFutureValue", "Informational"), (None, "Informational"), ("HIGH", "High"),
])
def test_severity(defender: str | None, sentinel: str) -> None:
    assert m.sentinel_severity(defender) == sentinel
    fields = SyncedFields("active", None, None, None, frozenset())
    props = m.to_sentinel_properties({"id": "1", "severity": defender}, fields, None, owner_map=OM, tenant_name="t")
    assert props["severity"] == sentinel


def test_owner_map_is_bidirectional_and_case_insensitive() -> None:
    owner_map = OwnerMap({"Analyst@MSSP.com": "analyst@Customer.com"})
    assert owner_map.to_defender("analyst@mssp.COM") == "analyst@customer.com"
    assert owner_map.to_sentinel("ANALYST@customer.com") == "analyst@mssp.com"
    assert owner_map.to_defender("other@x.com") == "other@x.com"
    assert owner_map.to_sentinel(None) is None and owner_map.to_defender("  ") is None
    with pytest.raises(ValueError, match="same Defender identity"):
        OwnerMap({"a@x.com": "z@y.com", "b@x.com": "Z@y.com"})

    fields = SyncedFields("active", "analyst@customer.com", None, None, frozenset())
    props = m.to_sentinel_properties({"id": "1"}, fields, None, owner_map=owner_map, tenant_name="t")
    assert props["owner"] == {"userPrincipalName": "analyst@mssp.com", "email": "analyst@mssp.com",
                              "ownerType": "User"}
    # Same person: the current owner object (objectId, display name) is kept.
    current = {"owner": {"objectId": "oid", "userPrincipalName": "Analyst@mssp.com", "assignedTo": "Ann"}}
    props = m.to_sentinel_properties({"id": "1"}, fields, current, owner_map=owner_map, tenant_name="t")
    assert props["owner"] == current["owner"]
    unassigned = SyncedFields("active", None, None, None, frozenset())
    assert "owner" not in m.to_sentinel_properties({"id": "1"}, unassigned, current, owner_map=owner_map,
                                                   tenant_name="t")
    group = {"owner": {"objectId": "g", "assignedTo": "SOC tier 2", "ownerType": "Group"}}
    assert m.from_sentinel({"status": "New", **group}, owner_map=owner_map, base=None)[0].owner is None
    props = m.to_sentinel_properties({"id": "1"}, unassigned, group, owner_map=owner_map, tenant_name="t")
    assert props["owner"] == group["owner"]  # not expressible in Defender, so not removed either
    assert m.from_sentinel({"status": "New", "owner": {"email": "ANALYST@mssp.com"}}, owner_map=owner_map,
                           base=None)[0].owner == "analyst@customer.com"


def test_app_labels_are_not_user_tags() -> None:
    for name in ["defender-sync", "redirected", "duplicate", "tenant:Contoso", "determination:malware",
                 "owner:Automation"]:
        assert m.is_app_label(name)
    # Matched exactly: a customer's own tags spelled otherwise are tags.
    for name in ["redirect", "tenants", "sync", "determinations", "Redirected", "Duplicate", "Tenant:x",
                 " determination:x", "Owner:x", "owner"]:
        assert not m.is_app_label(name)
    labels = [{"labelName": "x", "labelType": "User"}, {"labelName": "y"}, {"labelName": "auto", "labelType":
              "AutoAssigned"}, {"labelName": "tenant:a", "labelType": "User"}, {"labelName": ""}, "junk"]
    assert m.user_tags_from_labels(labels) == {"x", "y"}
    assert m.user_tags_from_labels(None) == frozenset()


def test_auto_assigned_label_with_a_tag_name() -> None:
    """Sentinel keeps one label per name: an automation rule's label named like a tag neither adds nor drops it."""
    current = {"labels": [{"labelName": "phish", "labelType": "AutoAssigned"}]}
    fields = SyncedFields("active", None, None, None, frozenset({"phish", "x"}))
    props = m.to_sentinel_properties({"id": "1"}, fields, current, owner_map=OM, tenant_name="t")
    assert [lb["labelName"] for lb in props["labels"]].count("phish") == 1
    assert read(props, fields)[0].tags == {"phish", "x"}
    assert read(props, None, {"customTags": ["phish"]})[0].tags == {"phish", "x"}
    assert read(props, None)[0].tags == {"x"}  # never made a tag on its own
    assert m.user_tags_from_labels(props["labels"], known_tags={"phish"}) == {"phish", "x"}


@FAST
@given(st.lists(alert, max_size=400), st.text(_name_chars, max_size=8000))
def test_description_is_bounded_and_lists_alerts(alerts: list[dict[str, Any]], description: str) -> None:
    incident = {"id": "7", "incidentWebUrl": "https://security.microsoft.com/incidents/7?tid=t",
                "description": description, "alerts": alerts}
    text = m.sentinel_description(incident)
    assert m.utf16_len(text) <= m.DESCRIPTION_LIMIT
    assert text.startswith("Defender XDR incident 7: https://security.microsoft.com/incidents/7?tid=t")
    if alerts:
        assert f"Alerts ({len(alerts)}):" in text
        listed = sum(1 for line in text.splitlines() if line.startswith("- ") and " (severity: " in line)
        more = [line for line in text.splitlines() if line.startswith("- and ") and line.endswith(" more")]
        assert listed <= m.MAX_LISTED_ALERTS
        if listed < len(alerts):
            assert more and int(more[-1].split()[2]) == len(alerts) - listed


def test_description_with_many_long_alerts() -> None:
    alerts = [{"id": str(i), "title": "😀" * 300, "severity": "high", "status": "new"} for i in range(150)]
    text = m.sentinel_description({"id": "1", "incidentWebUrl": "https://x/incidents/1", "alerts": alerts,
                                   "description": "<script>alert(1)</script>" * 500})
    assert m.utf16_len(text) <= m.DESCRIPTION_LIMIT
    assert "and " in text and "<script>alert(1)</script>" in text  # text kept verbatim, cut


# ------------------------------------------------------------------------------------------------------------------
# Comments
# ------------------------------------------------------------------------------------------------------------------

@FAST
@given(st.sampled_from(["defender", "sentinel"]), st.text(_name_chars, max_size=60),
       st.sampled_from(["2024-05-01T12:00:05.1234567Z", "2024-05-01T12:00:05Z", "", "garbage"]),
       st.text(_name_chars, max_size=200)
       | st.builds(lambda chunk, n: chunk * n, st.text("😀é\u0301a<>\n", min_size=1, max_size=12),
                   st.integers(300, 8000)))
def test_mirrored_comment_is_recognised_and_bounded(origin: m.Origin, author: str, created: str, text: str) -> None:
    mirrored = m.mirrored_comment_text(origin, author, created, text)
    assert m.is_mirrored_comment(mirrored) == origin
    assert m.mirrored_comment_key(mirrored) == m.comment_key(origin, author, created, text)
    limit = m.SENTINEL_COMMENT_LIMIT if origin == "defender" else m.DEFENDER_COMMENT_LIMIT
    assert m.utf16_len(mirrored) <= limit
    marker = m.comment_marker(origin, author, created, m.comment_key(origin, author, created, text))
    assert mirrored.startswith(marker + "\n")
    body = mirrored[len(marker) + 1:]
    if m.utf16_len(marker) + 1 + m.utf16_len(text) <= limit:
        assert body == text  # verbatim: markup and script stay text
    else:
        assert body.endswith(m.TRUNCATION_MARKER)
        kept = body[: -len(m.TRUNCATION_MARKER)]
        assert text.startswith(kept)
        assert not kept or not ("\ud800" <= kept[-1] <= "\udfff")
    # A native comment is never mistaken for a mirrored one.
    if not text.lstrip().startswith("[Synced from") and "[Synced" not in text[:300]:
        assert m.is_mirrored_comment(text) is None


def test_comment_key_is_stable_and_guid_deterministic() -> None:
    a = m.comment_key("defender", "Jane", "2024-05-01T12:00:05.1234567Z", "hello")
    b = m.comment_key("defender", "Jane", "2024-05-01T12:00:05.123456Z", "hello")
    assert a == b and len(a) == 32
    assert m.comment_key("sentinel", "Jane", "2024-05-01T12:00:05Z", "hello") != a
    assert m.comment_key("defender", "Jane", "2024-05-01T12:00:05Z", "hello!") != m.comment_key(
        "defender", "Jane", "2024-05-01T12:00:05Z", "hello")
    guid = m.comment_guid(a)
    assert uuid.UUID(guid).version == 5 and guid == m.comment_guid(a)


def test_markup_in_comments_stays_text() -> None:
    text = '<img src=x onerror="alert(1)"><script>fetch("//evil")</script> ]]> · ref:'
    mirrored = m.mirrored_comment_text("sentinel", "Eve <b>]</b>", "2024-01-01T00:00:00Z", text)
    assert mirrored.endswith("\n" + text)
    assert m.is_mirrored_comment(mirrored) == "sentinel"
    assert m.is_mirrored_comment(text) is None
    # Sentinel's portal may wrap text in markup; the marker is still found.
    assert m.is_mirrored_comment("<p>" + mirrored) == "sentinel"


def test_truncation_never_splits_characters() -> None:
    text = "a" + "👍🏽" * 20_000  # surrogate pairs plus skin-tone modifiers
    cut = m.cut_text(text, 101)
    assert m.utf16_len(cut) <= 101 and cut.endswith(m.TRUNCATION_MARKER)
    kept = cut[: -len(m.TRUNCATION_MARKER)]
    assert not kept.endswith("👍") and (kept == "a" or kept.endswith("🏽"))
    combining = "e\u0301" * 100
    kept = m.cut_text(combining, 21)[: -len(m.TRUNCATION_MARKER)]
    assert kept.endswith("\u0301") and combining.startswith(kept)
    with pytest.raises(ValueError):
        m.mirrored_comment_text("defender", "a", "", "text", 20)


def test_comment_parts_accept_both_graph_spellings() -> None:
    typed = m.defender_comment_parts({"comment": "c", "createdByDisplayName": "a", "createdDateTime": "t"})
    legacy = m.defender_comment_parts({"comment": "c", "createdBy": "a", "createdTime": "t"})
    assert typed == legacy == m.CommentParts("a", "t", "c")
    parts = m.sentinel_comment_parts({"name": "g", "properties": {"message": "m", "createdTimeUtc": "t",
                                                                  "author": {"name": "n", "email": "e"}}})
    assert parts == m.CommentParts("n", "t", "m")


def test_synced_fields_invariants() -> None:
    with pytest.raises(ValueError):
        SyncedFields("active", None, "truePositive", "malware", frozenset())
    with pytest.raises(ValueError):
        SyncedFields("resolved", None, None, None, frozenset())
    with pytest.raises(ValueError):
        SyncedFields("redirected", None, None, None, frozenset())
    with pytest.raises(ValueError):
        SyncedFields("active", "Upper@x.com", None, None, frozenset())
