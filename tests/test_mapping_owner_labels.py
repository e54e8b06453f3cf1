"""Owners that are free text, and the app's own labels matched exactly (mapping level, with property tests)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sync import mapping as m
from sync.mapping import OwnerMap, SyncedFields
from sync.merge import merge

OM = OwnerMap()
DEFENDER = {"id": "7", "status": "active", "severity": "high", "displayName": "x", "customTags": [],
            "lastUpdateDateTime": "2026-01-01T00:00:00Z"}


def names(props: dict[str, Any]) -> list[str]:
    return sorted(label["labelName"] for label in props["labels"])


def test_free_text_assigned_to_is_no_owner_and_shows_as_a_label() -> None:
    for text in ("Cortex XSOAR MS Graph Dev", "Automation"):
        incident = {**DEFENDER, "assignedTo": text}
        fields = m.from_defender(incident)
        assert fields.owner is None
        props = m.to_sentinel_properties(incident, fields, None, owner_map=OM, tenant_name="Contoso")
        assert "owner" not in props
        assert f"owner:{text}" in names(props)
        # Read back: the label is the app's, not a tag; the owner is still none, so nothing flows to Defender.
        back, problems = m.from_sentinel(props, owner_map=OM, base=fields, defender=incident)
        assert back == fields and problems == []
        assert m.to_defender_patch(back, incident) == {}


def test_upn_and_email_owners_still_map() -> None:
    incident = {**DEFENDER, "assignedTo": "KaiC@contoso.onmicrosoft.com"}
    fields = m.from_defender(incident)
    assert fields.owner == "kaic@contoso.onmicrosoft.com"
    props = m.to_sentinel_properties(incident, fields, None, owner_map=OM, tenant_name="Contoso")
    assert props["owner"]["userPrincipalName"] == "kaic@contoso.onmicrosoft.com"
    assert not [n for n in names(props) if n.startswith("owner:")]


def test_an_analyst_owner_in_sentinel_replaces_the_free_text_owner() -> None:
    incident = {**DEFENDER, "assignedTo": "Automation"}
    base = m.from_defender(incident)
    props = m.to_sentinel_properties(incident, base, None, owner_map=OM, tenant_name="Contoso")
    props["owner"] = {"userPrincipalName": "ana@contoso.com", "objectId": "o"}
    sentinel, _ = m.from_sentinel(props, owner_map=OM, base=base, defender=incident)
    result = merge(base, m.from_defender(incident), sentinel, policy="latest", defender_time=None,
                   sentinel_time=None)
    assert result.merged.owner == "ana@contoso.com"
    assert m.to_defender_patch(result.merged, incident) == {"assignedTo": "ana@contoso.com"}
    # Once Defender holds the analyst, the owner label goes.
    after = {**incident, "assignedTo": "ana@contoso.com"}
    rewritten = m.to_sentinel_properties(after, result.merged, props, owner_map=OM, tenant_name="Contoso")
    assert not [n for n in names(rewritten) if n.startswith("owner:")]


def test_owner_label_is_never_a_defender_tag() -> None:
    labels = [{"labelName": "owner:Automation", "labelType": "User"}, {"labelName": "vip", "labelType": "User"}]
    assert m.user_tags_from_labels(labels) == {"vip"}


def test_customer_tags_spelled_like_app_labels_sync_both_ways() -> None:
    incident = {**DEFENDER, "customTags": ["Redirected", "Duplicate", "Owner:x"]}
    fields = m.from_defender(incident)
    assert fields.tags == {"Redirected", "Duplicate", "Owner:x"}
    props = m.to_sentinel_properties(incident, fields, None, owner_map=OM, tenant_name="Contoso")
    assert {"Redirected", "Duplicate", "Owner:x"} <= set(names(props))
    back, _ = m.from_sentinel(props, owner_map=OM, base=fields, defender=incident)
    assert back.tags == fields.tags
    # The app's exact labels are not tags.
    assert m.from_defender({**DEFENDER, "customTags": ["redirected", "duplicate", "tenant:x"]}).tags == frozenset()


def test_an_automation_rules_determination_label_is_regenerated() -> None:
    fields = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    current = {"status": "Closed", "classification": "TruePositive",
               "labels": [{"labelName": "determination:phishing", "labelType": "AutoAssigned"},
                          {"labelName": "kept-by-rule", "labelType": "AutoAssigned"}]}
    props = m.to_sentinel_properties({**DEFENDER, "status": "resolved"}, fields, current, owner_map=OM,
                                     tenant_name="t")
    assert "determination:phishing" not in names(props) and "determination:malware" in names(props)
    assert "kept-by-rule" in names(props)


# --------------------------------------------------------------------------------------------------------------
# Property tests

local = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="@"),
                min_size=1, max_size=12)
label_part = st.text(alphabet=st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)
upns = st.builds(lambda u, d, t: f"{u}@{d}.{t}", local, label_part, label_part)
free_texts = st.text(min_size=1, max_size=40).filter(lambda t: "@" not in t and t.strip() != "")


@given(upns)
def test_every_upn_is_an_owner(upn: str) -> None:
    assert m.is_identity(upn) and m.owner_text(upn) is None
    assert m.from_defender({**DEFENDER, "assignedTo": upn}).owner == upn.lower()


@given(free_texts)
def test_free_text_never_becomes_an_owner_and_always_shows_as_an_app_label(text: str) -> None:
    incident = {**DEFENDER, "assignedTo": text}
    fields = m.from_defender(incident)
    assert fields.owner is None
    props = m.to_sentinel_properties(incident, fields, None, owner_map=OM, tenant_name="t")
    assert "owner" not in props
    owner_labels = [n for n in names(props) if n.startswith("owner:")]
    assert len(owner_labels) == 1 and m.is_app_label(owner_labels[0])
    assert m.utf16_len(owner_labels[0]) <= m.OWNER_LABEL_LIMIT
    assert m.from_sentinel(props, owner_map=OM, base=fields, defender=incident)[0] == fields


@settings(max_examples=200)
@given(st.text(max_size=20))
def test_a_label_is_the_apps_exactly_when_spelled_as_the_app_writes_it(name: str) -> None:
    ours = (name in ("defender-sync", "redirected", "duplicate")
            or any(name.startswith(p) for p in ("tenant:", "determination:", "owner:")))
    assert m.is_app_label(name) == ours
    # A tag is synced unless it is one of the app's labels.
    assert m.from_defender({**DEFENDER, "customTags": [name]}).tags == (
        frozenset() if ours or not name.strip() else frozenset({name}))
