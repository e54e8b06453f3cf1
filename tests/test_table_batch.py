"""The hand-written Table transaction (sync.table_batch) against Azurite: what it writes reads back as the SDK's own
writes do, and a refused operation writes nothing and raises."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError
from azure.data.tables import TableServiceClient

from sync.table_batch import Operation, check_answer, entity_json, submit, submit_upserts


def test_upserts_read_back_like_the_sdks_entities(storage: str) -> None:
    table = TableServiceClient.from_connection_string(storage).create_table_if_not_exists("batchcheck")
    entities = [{"PartitionKey": "tenant'1", "RowKey": f"inc {n} é'", "Text": "x\u00e9\U0001f600\"\\",
                 "Flag": n % 2 == 0, "Small": n, "Big": 2**40 + n} for n in range(3)]
    submit_upserts(table, [(e, entity_json(e)) for e in entities])
    replaced = {**entities[0], "Text": "replaced"}
    del replaced["Big"]
    submit_upserts(table, [(replaced, entity_json(replaced))])
    got = {e["RowKey"]: dict(e) for e in table.query_entities("PartitionKey eq 'tenant''1'")}
    assert got["inc 0 é'"] == {**replaced}  # replaced, not merged: the dropped property is gone
    for entity in entities[1:]:
        assert {**got[entity["RowKey"]], "Big": got[entity["RowKey"]]["Big"].value} == entity


def test_a_refused_operation_raises_and_writes_nothing(storage: str) -> None:
    table = TableServiceClient.from_connection_string(storage).create_table_if_not_exists("batchcheck")
    good, bad = {"PartitionKey": "p", "RowKey": "ok"}, {"PartitionKey": "p", "RowKey": "bad/key"}
    with pytest.raises(HttpResponseError, match="refused: HTTP 400"):
        submit_upserts(table, [(good, entity_json(good)), (bad, entity_json(bad))])
    assert list(table.query_entities("PartitionKey eq 'p'")) == []


def test_answers_are_read_part_by_part() -> None:
    ok = b"--b\r\nHTTP/1.1 204 No Content\r\n\r\n--b\r\nHTTP/1.1 204 No Content\r\n\r\n--b--"
    assert check_answer(202, ok, 2) is None
    assert check_answer(202, ok, 3) == "2 answers for 3 operations"
    assert check_answer(413, b"", 2) == "HTTP 413"
    refused = b'HTTP/1.1 400 Bad Request\r\n\r\n{"odata.error":{"code":"EntityTooLarge","message":{"value":"1:big"}}}'
    assert check_answer(202, refused, 2) == "HTTP 400 EntityTooLarge: 1:big"
    with pytest.raises(TypeError, match="'When'"):
        entity_json({"When": 1.5})


def test_if_match_replaces_and_deletes_use_the_etags_the_transaction_answered(storage: str) -> None:
    table = TableServiceClient.from_connection_string(storage).create_table_if_not_exists("batchcheck")
    rows = [{"PartitionKey": "m", "RowKey": f"r{n}", "N": n} for n in range(3)]
    created = submit(table, [Operation("insert", r, entity_json(r)) for r in rows])
    assert all(created) and [table.get_entity("m", r["RowKey"]).metadata["etag"] for r in rows] == created
    with pytest.raises(HttpResponseError) as exists:
        submit(table, [Operation("insert", rows[0], entity_json(rows[0]))])
    assert exists.value.status_code == 409
    changed = [{**r, "N": 10 + r["N"]} for r in rows]
    replaced = submit(table, [Operation("replace", r, entity_json(r), etag)
                              for r, etag in zip(changed, created, strict=True)])
    assert [table.get_entity("m", r["RowKey"])["N"] for r in rows] == [10, 11, 12]
    stale = [Operation("replace", r, entity_json(r), etag)
             for r, etag in zip(rows, [replaced[0], *created[1:]], strict=True)]
    with pytest.raises(HttpResponseError) as refused:
        submit(table, stale)   # the second row's ETag is stale: nothing is written
    assert refused.value.status_code == 412
    assert [table.get_entity("m", r["RowKey"])["N"] for r in rows] == [10, 11, 12]
    with pytest.raises(HttpResponseError):
        submit(table, [Operation("delete", r, etag=etag)
                       for r, etag in zip(rows, [created[0], *replaced[1:]], strict=True)])
    deleted = submit(table, [Operation("delete", r, etag=etag) for r, etag in zip(rows, replaced, strict=True)])
    assert deleted == [None] * 3
    assert list(table.query_entities("PartitionKey eq 'm'")) == []
