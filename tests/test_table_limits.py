"""Table Storage limits: the service's size formula, the state store's writes under it, and the test guard."""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.data.tables import TableServiceClient
from table_guard import TableGuard, check_write

from sync.state import INCIDENTS, IncidentVersion, StateStore
from sync.table_limits import (
    MAX_BATCH_BYTES,
    MAX_ENTITY_BYTES,
    TableLimitError,
    check_entity,
    entity_size,
    split_batches,
    utf16_len,
)

TENANT = "11111111-2222-3333-4444-555555555555"


def test_entity_size_follows_the_service_formula() -> None:
    # 4 + keys*2 + per property 8 + name*2 + value (string: units*2 + 4, Int32 4, Int64 8, bool 1).
    entity = {"PartitionKey": "A", "RowKey": "B", "Address": "Mountain View", "Age": 23}
    assert entity_size(entity) == 4 + 2 + 2 + (8 + 14 + 13 * 2 + 4) + (8 + 6 + 4)
    assert entity_size({"PartitionKey": "", "RowKey": "", "N": 2 ** 40, "F": True}) == 4 + (8 + 2 + 8) + (8 + 2 + 1)
    assert entity_size({"PartitionKey": "", "RowKey": "", "N": "1"}, {"N": "Edm.Int64"}) == 4 + 8 + 2 + 8
    assert utf16_len("a\U0001F600") == 3, "a character outside the BMP counts two UTF-16 units"
    with pytest.raises(TableLimitError, match="at most 65536") as exc:
        check_entity({"PartitionKey": "p", "RowKey": "r", "S": "x" * 32_769})
    assert exc.value.code == "PropertyValueTooLarge"
    big = {"PartitionKey": "p", "RowKey": "r", **{f"S{i}": "x" * 30_000 for i in range(18)}}
    with pytest.raises(TableLimitError) as exc:
        check_entity(big)
    assert exc.value.code == "EntityTooLarge" and entity_size(big) > MAX_ENTITY_BYTES
    with pytest.raises(TableLimitError) as exc:
        check_entity({"PartitionKey": "p", "RowKey": "r", **{f"P{i}": i for i in range(253)}})
    assert exc.value.code == "TooManyProperties"


def test_batches_split_by_operations_and_bytes_and_keep_groups_together() -> None:
    batches = split_batches([[i] for i in range(250)], lambda _: 10)
    assert [len(b) for b in batches] == [100, 100, 50]
    big = MAX_BATCH_BYTES // 3 + 1
    batches = split_batches([[1, 2], [3, 4], [5]], lambda _: big)
    assert batches == [[1, 2], [3, 4], [5]], "a group is not cut when it fits one transaction"
    assert all(len(b) * big <= MAX_BATCH_BYTES for b in batches)


def test_guard_answers_as_the_service(storage: str, table_guard: TableGuard) -> None:
    table = TableServiceClient.from_connection_string(storage).create_table("guardprobe")
    entity = {"PartitionKey": "p", "RowKey": "r", **{f"S{i}": "x" * 30_000 for i in range(18)}}
    with pytest.raises(HttpResponseError) as exc:
        table.upsert_entity(entity)
    assert exc.value.error_code == "EntityTooLarge"
    with pytest.raises(HttpResponseError):
        table.submit_transaction([("upsert", {"PartitionKey": "p", "RowKey": str(i)}) for i in range(101)])
    assert check_write("POST", "https://x/$batch", b"x" * (MAX_BATCH_BYTES + 1))[:2] == (  # type: ignore[index]
        413, "RequestBodyTooLarge")
    assert len(table_guard.violations) == 2
    table_guard.violations.clear()
    table.upsert_entity({"PartitionKey": "p", "RowKey": "ok", "S": "x" * 30_000})   # within limits: passes


def _alerts(count: int, version: str = "2026-11-20T10:00:00.1234567Z") -> dict[str, str]:
    return {f"da{n:016d}_{n * 7919:010d}": version for n in range(count)}


def test_an_incident_with_9000_alerts_keeps_its_alert_versions(storage: str) -> None:
    store = StateStore(TableServiceClient.from_connection_string(storage))
    store.ensure_tables()
    alerts = _alerts(9000)
    assert store.save_versions(TENANT, [IncidentVersion("42", "2026-11-20T10:00:00.1234567Z", alerts)]) == []
    assert store.get_versions(TENANT, ["42"])["42"].alerts == alerts
    # A later, smaller version (fits inline again) replaces it; a larger one spreads over more rows.
    store.save_versions(TENANT, [IncidentVersion("42", "2026-11-21T10:00:00.1234567Z", _alerts(3))])
    assert store.get_versions(TENANT, ["42"])["42"].alerts == _alerts(3)
    more = _alerts(20_000, "2026-11-22T10:00:00.1234567Z")
    store.save_versions(TENANT, [IncidentVersion("42", "2026-11-22T10:00:00.1234567Z", more)])
    assert store.get_versions(TENANT, ["42"])["42"].alerts == more


def test_a_page_of_large_versions_is_split_under_4_mib(storage: str) -> None:
    store = StateStore(TableServiceClient.from_connection_string(storage))
    store.ensure_tables()
    versions = [IncidentVersion(str(i), "2026-11-20T10:00:00.1234567Z", _alerts(2500)) for i in range(50)]
    store.save_versions(TENANT, versions)
    got = store.get_versions(TENANT, [v.incident_id for v in versions])
    assert all(got[v.incident_id].alerts == v.alerts for v in versions)


def test_alert_versions_beyond_every_row_degrade_to_none_and_the_version_is_stored(storage: str) -> None:
    store = StateStore(TableServiceClient.from_connection_string(storage))
    store.ensure_tables()
    dropped = store.save_versions(TENANT, [IncidentVersion("7", "2026-11-20T10:00:00.1234567Z", _alerts(60_000))])
    assert dropped == ["7"]
    version = store.get_versions(TENANT, ["7"])["7"]
    assert version.last_update == "2026-11-20T10:00:00.1234567Z" and version.alerts == {}


def test_a_torn_alerts_write_reads_as_no_alerts_never_as_a_mix(storage: str) -> None:
    store = StateStore(TableServiceClient.from_connection_string(storage))
    store.ensure_tables()
    store.save_versions(TENANT, [IncidentVersion("9", "2026-11-20T10:00:00.1234567Z", _alerts(9000))])
    rows: list[dict[str, Any]] = list(store.table(INCIDENTS).query_entities("RowKey ge '9~'"))
    assert rows, "the alerts map spilled into extra rows"
    store.table(INCIDENTS).update_entity({**rows[0], "AlertGen": "other-write"})
    assert store.get_versions(TENANT, ["9"])["9"].alerts == {}
