"""StateStore.get_versions against Azurite: one range query, point reads past it, the same answers either way."""

from __future__ import annotations

from typing import Any

import pytest
from azure.data.tables import TableServiceClient

from sync import state as state_module
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


@pytest.mark.parametrize("range_rows", [200, 3])  # 3: the range query stops early and point reads do the rest
def test_versions_are_found_by_range_and_point_reads_alike(store: StateStore, range_rows: int,
                                                           monkeypatch: Any) -> None:
    stored = [str(1000 + i) for i in range(0, 400, 2)]  # even IDs stored; odd ones never were
    store.save_versions("t1", versions(stored))
    store.save_versions("t2", versions(["1001"]))  # another tenant's partition is never read
    monkeypatch.setattr(state_module, "RANGE_ROWS", range_rows)
    asked = ["1398", "1000", "1001", "1207", "1206", "1100", "1399", "9999", "1000"]
    found = store.get_versions("t1", asked)
    assert set(found) == {"1398", "1000", "1206", "1100"}
    assert found == {v.incident_id: v for v in versions(["1398", "1000", "1206", "1100"])}
    assert store.get_versions("t1", []) == {}
    assert set(store.get_versions("t2", asked)) == {"1001"}
