"""StateStore.get_versions against Azurite: stored versions come back as saved, absent ones are absent."""

from __future__ import annotations

import pytest
from azure.data.tables import TableServiceClient

from sync.state import IncidentVersion, StateStore

STAMP = "2026-01-01T00:00:00.0000000Z"


@pytest.fixture
def store(storage: str) -> StateStore:
    s = StateStore(TableServiceClient.from_connection_string(storage))
    s.ensure_tables()
    return s


def versions(ids: list[str]) -> list[IncidentVersion]:
    return [IncidentVersion(i, STAMP, {f"da{i}": STAMP}, partial=i.endswith("7"), incident_row_stored=i != "1207")
            for i in ids]


def test_versions_come_back_as_saved(store: StateStore) -> None:
    stored = [str(1000 + i) for i in range(0, 400, 2)]  # even IDs stored; odd ones never were
    store.save_versions("t1", versions(stored))
    store.save_versions("t2", versions(["1001"]))  # another tenant's partition is never read
    asked = ["1398", "1000", "1001", "1207", "1206", "1100", "1399", "9999", "1000"]
    found = store.get_versions("t1", asked)
    assert set(found) == {"1398", "1000", "1206", "1100"}
    assert found == {v.incident_id: v for v in versions(["1398", "1000", "1206", "1100"])}
    assert store.get_versions("t1", []) == {}
    assert set(store.get_versions("t2", asked)) == {"1001"}
