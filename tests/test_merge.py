"""Property-based tests of the three-way merge (sync.merge), alone and through the field mapping."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync import mapping as m
from sync.mapping import OwnerMap, SyncedFields
from sync.merge import MergeResult, merge

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OWNERS = [None, "a@x.com", "b@x.com", "c@x.com"]
TAGS = ["t1", "t2", "t3", "t4"]
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@st.composite
def synced(draw: st.DrawFn) -> SyncedFields:
    status = draw(st.sampled_from(["active", "inProgress", "resolved"]))
    cls = det = None
    if status == "resolved":
        cls = draw(st.sampled_from(sorted(m.VALID_DETERMINATIONS)))
        det = draw(st.sampled_from(sorted(m.VALID_DETERMINATIONS[cls])))
    return SyncedFields(status, draw(st.sampled_from(OWNERS)), cls, det,
                        frozenset(draw(st.sets(st.sampled_from(TAGS)))))


@st.composite
def edited(draw: st.DrawFn, base: SyncedFields) -> SyncedFields:
    """``base`` with a random subset of field groups replaced (so "unchanged" is common)."""
    other = draw(synced())
    value = base
    if draw(st.booleans()):
        value = replace(value, status=other.status, classification=other.classification,
                        determination=other.determination)
    if draw(st.booleans()):
        value = replace(value, owner=other.owner)
    if draw(st.booleans()):
        value = replace(value, tags=other.tags)
    return value


policies = st.sampled_from(["latest", "defender", "sentinel"])
times = st.one_of(st.none(), st.integers(0, 3).map(lambda n: T0 + timedelta(seconds=n)))


def apply(side: SyncedFields, changes: dict[str, Any]) -> SyncedFields:
    return replace(side, **changes)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[SyncedFields, SyncedFields, SyncedFields]:
    base = draw(synced())
    return base, draw(edited(base)), draw(edited(base))


def run(base: SyncedFields | None, d: SyncedFields, s: SyncedFields, policy: str = "latest",
        dt: datetime | None = None, stime: datetime | None = None, writable: bool = True) -> MergeResult:
    return merge(base, d, s, policy=policy, defender_time=dt, sentinel_time=stime, defender_writable=writable)


@FAST
@given(synced(), policies, times, times)
def test_idempotent_and_quiet(value: SyncedFields, policy: str, dt: datetime | None, stime: datetime | None) -> None:
    result = run(value, value, value, policy, dt, stime)
    assert result.merged == value
    assert result.defender_changes == {} and result.sentinel_changes == {} and result.conflicts == ()
    assert not result.changed


@FAST
@given(scenario(), policies, times, times, st.booleans())
def test_converges(sides: tuple[SyncedFields, SyncedFields, SyncedFields], policy: str, dt: datetime | None,
                   stime: datetime | None, writable: bool) -> None:
    base, d, s = sides
    result = run(base, d, s, policy, dt, stime, writable)
    d2 = apply(d, result.defender_changes)
    s2 = apply(s, result.sentinel_changes)
    assert d2 == s2 == result.merged
    again = run(result.merged, d2, s2, policy, dt, stime, writable)
    assert again.merged == result.merged and not again.changed and again.conflicts == ()
    # Closure group consistency: no classification without resolution.
    if result.merged.status != "resolved":
        assert result.merged.classification is None and result.merged.determination is None
    else:
        assert result.merged.classification is not None and result.merged.determination is not None
    # Every merged closure group is one side's whole group (never a mix of the two).
    closure = (result.merged.status, result.merged.classification, result.merged.determination)
    assert closure in {(d.status, d.classification, d.determination), (s.status, s.classification, s.determination)}


@FAST
@given(st.data(), policies, times, times)
def test_one_sided_change_wins(data: st.DataObject, policy: str, dt: datetime | None, stime: datetime | None) -> None:
    base = data.draw(synced())
    changed = data.draw(edited(base))
    from_defender = run(base, changed, base, policy, dt, stime)
    assert from_defender.merged == changed and from_defender.defender_changes == {}
    assert from_defender.conflicts == ()
    from_sentinel = run(base, base, changed, policy, dt, stime)
    assert from_sentinel.merged == changed and from_sentinel.sentinel_changes == {}
    assert from_sentinel.conflicts == ()


@FAST
@given(scenario(), policies, times, times)
def test_same_change_on_both_sides_is_no_conflict(sides: tuple[SyncedFields, SyncedFields, SyncedFields],
                                                  policy: str, dt: datetime | None, stime: datetime | None) -> None:
    base, d, _ = sides
    result = run(base, d, d, policy, dt, stime)
    assert result.merged == d and not result.changed and result.conflicts == ()


def test_policies_and_ties() -> None:
    base = SyncedFields("active", "a@x.com", None, None, frozenset())
    d = replace(base, owner="b@x.com")
    s = replace(base, owner="c@x.com")
    assert run(base, d, s, "defender", T0, T0 + timedelta(1)).merged.owner == "b@x.com"
    assert run(base, d, s, "sentinel", T0 + timedelta(1), T0).merged.owner == "c@x.com"
    assert run(base, d, s, "latest", T0, T0 + timedelta(seconds=1)).merged.owner == "c@x.com"
    assert run(base, d, s, "latest", T0 + timedelta(seconds=1), T0).merged.owner == "b@x.com"
    assert run(base, d, s, "latest", T0, T0).merged.owner == "b@x.com"  # tie -> Defender
    assert run(base, d, s, "latest", None, T0).merged.owner == "b@x.com"  # unknown time -> Defender
    result = run(base, d, s, "latest", T0, T0)
    assert result.conflicts == ("owner",)
    assert result.defender_changes == {} and result.sentinel_changes == {"owner": "b@x.com"}
    with pytest.raises(ValueError, match="policy"):
        run(base, d, s, "newest")


@FAST
@given(scenario(), policies, times, times)
def test_tags_merge_as_sets_commutatively(sides: tuple[SyncedFields, SyncedFields, SyncedFields], policy: str,
                                         dt: datetime | None, stime: datetime | None) -> None:
    base, d, s = sides
    tags = run(base, d, s, policy, dt, stime).merged.tags
    assert tags == run(base, s, d, policy, stime, dt).merged.tags
    adds = (d.tags - base.tags) | (s.tags - base.tags)
    removes = (base.tags - d.tags) | (base.tags - s.tags)
    assert adds <= tags and not removes & tags
    assert tags == (base.tags | adds) - removes


def test_tag_adds_and_removes_from_both_sides_survive() -> None:
    base = SyncedFields("active", None, None, None, frozenset({"keep", "dropD", "dropS"}))
    d = replace(base, tags=frozenset({"keep", "dropS", "addD"}))
    s = replace(base, tags=frozenset({"keep", "dropD", "addS"}))
    result = run(base, d, s)
    assert result.merged.tags == {"keep", "addD", "addS"}
    assert result.conflicts == ()
    assert result.defender_changes == {"tags": frozenset({"keep", "addD", "addS"})}


@FAST
@given(st.one_of(st.none(), synced()), synced(), synced(), policies, times, times)
def test_pull_only_never_writes_defender(base: SyncedFields | None, d: SyncedFields, s: SyncedFields, policy: str,
                                         dt: datetime | None, stime: datetime | None) -> None:
    result = run(base, d, s, policy, dt, stime, writable=False)
    assert result.merged == d and result.defender_changes == {}
    assert apply(s, result.sentinel_changes) == d


@FAST
@given(synced(), synced(), policies, times, times)
def test_first_sync_defender_wins(d: SyncedFields, s: SyncedFields, policy: str, dt: datetime | None,
                                  stime: datetime | None) -> None:
    result = run(None, d, s, policy, dt, stime)
    assert result.merged == d and result.defender_changes == {}
    # The documented way to let Sentinel win a first sync: use Defender's values as the base.
    assert run(d, d, s, policy, dt, stime).merged == s


def test_closure_group_reopen_vs_reclassify() -> None:
    base = SyncedFields("resolved", None, "truePositive", "malware", frozenset())
    reopened = SyncedFields("active", None, None, None, frozenset())
    reclassified = replace(base, classification="falsePositive", determination="other")
    newer_sentinel = run(base, reopened, reclassified, "latest", T0, T0 + timedelta(seconds=1))
    assert newer_sentinel.merged == reclassified
    assert set(newer_sentinel.conflicts) == {"status", "classification", "determination"}
    assert newer_sentinel.defender_changes == {"status": "resolved", "classification": "falsePositive",
                                               "determination": "other"}
    newer_defender = run(base, reopened, reclassified, "latest", T0 + timedelta(seconds=1), T0)
    assert newer_defender.merged == reopened
    assert newer_defender.sentinel_changes == {"status": "active", "classification": None, "determination": None}
    # A closure on one side and an owner change on the other are independent: both survive.
    closed = replace(reopened, status="resolved", classification="truePositive", determination="phishing")
    owned = replace(reopened, owner="a@x.com")
    result = run(reopened, closed, owned)
    assert result.merged == replace(closed, owner="a@x.com") and result.conflicts == ()


# ------------------------------------------------------------------------------------------------------------------
# Through the mapping: both real representations converge and a second cycle writes nothing
# ------------------------------------------------------------------------------------------------------------------

OWNER_MAP = OwnerMap({"ann@mssp.com": "a@x.com"})
SENTINEL_CLASSES = ["TruePositive", "FalsePositive", "BenignPositive", "Undetermined"]
LABEL_CHOICES = ["determination:malware", "determination:securityTesting", "determination:other",
                 "determination:notMalicious", "determination:bogus"]


@st.composite
def defender_edit(draw: st.DrawFn, incident: dict[str, Any]) -> dict[str, Any]:
    incident = dict(incident)
    if draw(st.booleans()):
        status = draw(st.sampled_from(["active", "inProgress", "awaitingAction", "resolved"]))
        incident["status"] = status
        if status == "resolved" or draw(st.booleans()):
            cls = draw(st.sampled_from(sorted(m.VALID_DETERMINATIONS)))
            incident["classification"] = cls
            incident["determination"] = draw(st.sampled_from(sorted(m.VALID_DETERMINATIONS[cls])))
    if draw(st.booleans()):
        incident["assignedTo"] = draw(st.sampled_from(OWNERS))
    if draw(st.booleans()):
        incident["customTags"] = sorted(draw(st.sets(st.sampled_from(TAGS))))
    return incident


@st.composite
def sentinel_edit(draw: st.DrawFn, props: dict[str, Any]) -> dict[str, Any]:
    props = dict(props)
    if draw(st.booleans()):
        props["status"] = draw(st.sampled_from(["New", "Active", "Closed"]))
        for key in ("classification", "classificationReason"):
            props.pop(key, None)
        if props["status"] == "Closed":
            props["classification"] = draw(st.sampled_from(SENTINEL_CLASSES))
            if props["classification"] == "FalsePositive":
                props["classificationReason"] = draw(st.sampled_from(["InaccurateData", "IncorrectAlertLogic"]))
    labels = list(props.get("labels", []))
    if draw(st.booleans()):
        labels = [lb for lb in labels if m.is_app_label(lb["labelName"])]
        labels += [{"labelName": t, "labelType": "User"} for t in sorted(draw(st.sets(st.sampled_from(TAGS))))]
    if draw(st.booleans()):
        labels.append({"labelName": draw(st.sampled_from(LABEL_CHOICES)), "labelType": "User"})
    if draw(st.booleans()):
        labels = [lb for lb in labels if not lb["labelName"].startswith("determination:")]
    props["labels"] = labels
    if draw(st.booleans()):
        owner = draw(st.sampled_from([None, "ann@mssp.com", "b@x.com", "C@X.com"]))
        props["owner"] = {"userPrincipalName": owner, "ownerType": "User"} if owner else None
    return props


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), policies, st.booleans(), st.integers(1, 4))
def test_two_sides_converge_through_the_mapping(data: st.DataObject, policy: str, writable: bool,
                                                rounds: int) -> None:
    """Rounds of concurrent edits on both sides, each followed by one sync cycle: after every cycle both sides read
    as the merged value, nothing is left to report, and another cycle writes nothing (no echo, no ping-pong)."""
    # A synced starting point: Defender incident, its mirror, and the base both agree on.
    defender = data.draw(defender_edit({"id": "1", "status": "active", "severity": "low", "displayName": "x"}))
    base = m.from_defender(defender)
    sentinel = m.to_sentinel_properties(defender, base, None, owner_map=OWNER_MAP, tenant_name="t")
    assert m.from_sentinel(sentinel, owner_map=OWNER_MAP, base=base, defender=defender) == (base, [])

    for _ in range(rounds):
        if data.draw(st.booleans()):
            defender = data.draw(defender_edit(defender))
        if data.draw(st.booleans()):
            sentinel = data.draw(sentinel_edit(sentinel))
        d_fields = m.from_defender(defender)
        s_fields, _ = m.from_sentinel(sentinel, owner_map=OWNER_MAP, base=base, defender=defender)
        dt, stime = data.draw(times), data.draw(times)
        result = merge(base, d_fields, s_fields, policy=policy, defender_time=dt, sentinel_time=stime,
                       defender_writable=writable)

        # Write what the merge says, the way the mirror and the push back do.
        if result.defender_changes:
            assert writable
            patch = m.to_defender_patch(result.merged, defender)
            assert patch
            defender = {**defender, **patch}
        else:
            assert m.to_defender_patch(result.merged, defender) == {}
        base = result.merged
        if not result.sentinel_changes:
            # Even without the repairing write, re-reading against the new base gives the same value, unless several
            # determination labels are there (ambiguous, reported): then the labels are stale and repaired below.
            assert (m.from_sentinel(sentinel, owner_map=OWNER_MAP, base=base, defender=defender)[0] == base
                    or m.sentinel_labels_stale(sentinel, base, tenant_name="t", redirected=False))
        if result.sentinel_changes or m.sentinel_labels_stale(sentinel, base, tenant_name="t", redirected=False):
            sentinel = m.to_sentinel_properties(defender, base, sentinel, owner_map=OWNER_MAP, tenant_name="t")

        # Both sides now read as the merged value, and another cycle writes nothing.
        d2 = m.from_defender(defender)
        s2, problems = m.from_sentinel(sentinel, owner_map=OWNER_MAP, base=base, defender=defender)
        assert d2 == base
        assert s2 == base
        assert problems == []  # a repaired incident has nothing left to report
        assert not m.sentinel_labels_stale(sentinel, base, tenant_name="t", redirected=False)
        again = merge(base, d2, s2, policy=policy, defender_time=dt, sentinel_time=stime,
                      defender_writable=writable)
        assert not again.changed
        assert m.to_defender_patch(base, defender) == {}
