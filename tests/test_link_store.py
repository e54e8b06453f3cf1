"""StateStore links against Azurite: kept beside the incident's version and read with it in one query; links an
earlier version kept in the links table are found, moved once, and never overwrite a newer link."""

from __future__ import annotations

from typing import Any

import pytest
from azure.data.tables import TableServiceClient

from sync.state import INCIDENTS, LINK_SUFFIX, LINKS, NAME_INDEX, IncidentVersion, StateStore, _key, _split_json

STAMP = "2026-01-01T00:00:00.0000000Z"


@pytest.fixture
def service(storage: str) -> TableServiceClient:
    return TableServiceClient.from_connection_string(storage)


@pytest.fixture
def store(service: TableServiceClient) -> StateStore:
    s = StateStore(service)
    s.ensure_tables()
    return s


def link(incident_id: str, **extra: Any) -> dict[str, Any]:
    return {"sentinelName": f"mirror-{incident_id}", "state": "active", "defenderVersion": STAMP,
            "base": {"status": "active"}, **extra}


def legacy_link(service: TableServiceClient, tenant: str, incident_id: str, **extra: Any) -> None:
    """A link as versions before this one stored it: in the links table, partition tenant, key incident ID."""
    body = link(incident_id, **extra)
    service.get_table_client(LINKS).create_entity({
        "PartitionKey": _key(tenant), "RowKey": _key(incident_id), "IncidentId": incident_id,
        "SentinelName": body["sentinelName"], **_split_json("Link", body)})
    service.get_table_client(LINKS).upsert_entity({
        "PartitionKey": NAME_INDEX, "RowKey": body["sentinelName"], "TenantId": tenant, "IncidentId": incident_id})


def legacy_rows(service: TableServiceClient) -> list[str]:
    return [f"{e['PartitionKey']}/{e['RowKey']}" for e in service.get_table_client(LINKS).list_entities()
            if e["PartitionKey"] != NAME_INDEX]


def strip(found: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if found is None else {k: v for k, v in found.items() if k != "etag"}


def test_a_version_and_its_link_come_back_together_and_neighbouring_keys_stay_apart(store: StateStore) -> None:
    # Keys that sort inside or right beside "12"'s range ("12" .. "12!link"): a space, a digit; and IDs holding
    # "!", which keys never do ("12!link" would otherwise be 12's link).
    ids = ["12", "12 3", "120", "12!a", "12!link", "1"]
    store.save_versions("t1", [IncidentVersion(i, STAMP, {f"da{i}": STAMP}) for i in ids])
    assert store.create_links("t1", {i: link(i) for i in ids if i != "120"}) == []
    store.move_legacy_links()
    versions, links = store.get_versions_and_links("t1", [*ids, "999"])
    assert versions == {i: IncidentVersion(i, STAMP, {f"da{i}": STAMP}) for i in ids}
    assert {i: strip(found) for i, found in links.items()} == {
        **{i: link(i) for i in ids if i != "120"}, "120": None, "999": None}
    assert all(found is None or found["etag"] for found in links.values())
    assert store.get_versions("t1", ids) == versions, "the version read alone is the same"
    # The sweep's order is the links' keys' ("12 3!link" < "12!link" < "12_a!link" < "12_link!link"), and it
    # resumes in it.
    assert [i for i, _ in store.iter_links("t1")] == ["1", "12 3", "12", "12!a", "12!link"]
    assert [i for i, _ in store.iter_links("t1", after="12")] == ["12!a", "12!link"]


def test_an_alerts_map_spread_over_rows_is_read_with_the_link(store: StateStore) -> None:
    alerts = {f"da{n:06d}-{'x' * 40}": STAMP for n in range(12_000)}  # more than one entity holds
    store.save_versions("t1", [IncidentVersion("77", STAMP, alerts)])
    store.create_links("t1", {"77": link("77")})
    versions, links = store.get_versions_and_links("t1", ["77"])
    assert versions["77"].alerts == alerts
    assert strip(links["77"]) == link("77")


def test_a_link_an_earlier_version_stored_is_found_and_moved_by_one_read(service: TableServiceClient,
                                                                         store: StateStore) -> None:
    legacy_link(service, "t1", "5", note="old")
    found = store.get_link("t1", "5")
    assert strip(found) == link("5", note="old")
    assert legacy_rows(service) == [], "moved out of the links table"
    assert found is not None and store.save_link("t1", "5", link("5", note="new"), etag=found["etag"]), (
        "its ETag is the moved link's: the next write goes through")
    hit = store.find_link_by_sentinel_name("Mirror-5")
    assert hit is not None and strip(hit[2]) == link("5", note="new")
    assert store.get_link("t1", "6") is None


def test_every_earlier_link_is_moved_once_and_never_over_a_newer_one(service: TableServiceClient,
                                                                     store: StateStore) -> None:
    for n in range(230):   # more than two transactions' worth in one tenant
        legacy_link(service, "t1", str(1000 + n))
    legacy_link(service, "t2", "2000")
    store.save_link("t1", "1000", link("1000", note="written since"), etag=None)  # a newer link in its new place
    fresh = StateStore(service)   # another process, started after the upgrade
    assert fresh.move_legacy_links() == 230, "every link but the one written since"
    assert legacy_rows(service) == []
    assert sum(1 for e in service.get_table_client(LINKS).list_entities()) == 231, "the name index stays"
    assert strip(fresh.get_link("t1", "1000")) == link("1000", note="written since")
    assert strip(fresh.get_link("t2", "2000")) == link("2000")
    assert len(dict(fresh.iter_links("t1"))) == 230
    assert fresh.move_legacy_links() == 0 and StateStore(service).move_legacy_links() == 0, "the marker says so"
    rows = [e for e in service.get_table_client(INCIDENTS).list_entities() if str(e["RowKey"]).endswith(LINK_SUFFIX)]
    assert len(rows) == 231 and all(e["IsLink"] is True for e in rows)


def test_before_the_move_a_missing_link_is_left_to_get_link(service: TableServiceClient, store: StateStore,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A look-up that cannot tell absent from not yet moved says neither: the hook reads the link itself."""
    legacy_link(service, "t1", "8")
    store.save_versions("t1", [IncidentVersion("8", STAMP), IncidentVersion("9", STAMP)])

    def unavailable() -> int:
        from azure.core.exceptions import ServiceRequestError
        raise ServiceRequestError("storage unreachable")

    monkeypatch.setattr(store, "move_legacy_links", unavailable)
    versions, links = store.get_versions_and_links("t1", ["8", "9"])
    assert set(versions) == {"8", "9"} and links == {}
    assert strip(store.get_link("t1", "8")) == link("8")
    assert store.get_link("t1", "9") is None


def test_the_move_goes_on_over_calls_until_none_are_left(service: TableServiceClient, store: StateStore) -> None:
    for n in range(7):
        legacy_link(service, "t1", str(100 + n))
    assert store.move_legacy_links(limit=3) == 3 and len(legacy_rows(service)) == 4, "a bounded call"
    assert store.get_versions_and_links("t1", ["100", "106", "999"])[1].keys() == {"100", "106", "999"}, (
        "the look-up moves the rest, then knows an absent link is absent")
    assert legacy_rows(service) == []
    # Once the marker is written, a link an old version writes in the old place (the old and the new version run
    # side by side, which OPERATIONS.md tells not to do) is not read: there is no second read per missing link.
    legacy_link(service, "t2", "200")
    other = StateStore(service)
    assert [i for i, _ in other.iter_links("t2")] == [] and other.get_link("t2", "200") is None


def test_a_quiet_deployment_sweep_moves_the_links(service: TableServiceClient, store: StateStore) -> None:
    """No pull look-up ever runs (nothing changes in Defender): the reconcile's sweep moves the links and sees
    them."""
    legacy_link(service, "t1", "300")
    assert [i for i, _ in StateStore(service).iter_links("t1")] == ["300"]
    assert legacy_rows(service) == []
