"""The database wire format by cbor2's C extension: the same bytes as the SDK's encoder, the
same values as its decoder, and NONE/NULL kept apart on the real engine."""

from __future__ import annotations

import decimal
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cbor2
import pytest
from surrealdb import RecordID
from surrealdb.data.cbor import decode as sdk_decode
from surrealdb.data.cbor import encode as sdk_encode
from surrealdb.data.types.duration import Duration

from inbox.storage import Database, wire

NOW = datetime(2026, 11, 22, 4, 30, 15, 123456, tzinfo=UTC)

VALUES: list[Any] = [
    None, True, False, 0, -1, 2**40, 1.5, "", "text", "ünïcode ✉", b"", b"\x00\xffraw",
    [], {}, [None, [None, {"a": None}]], (1, None),
    {"message": {"id": "msg_1", "to": ["a@b.test"], "owner": None, "at": NOW}},
    NOW, NOW.astimezone(timezone(timedelta(hours=5, minutes=30))), datetime(2026, 1, 1, 12),
    RecordID("job", "job_1"), RecordID("quota_counter", ["d.test", "hour", "2026112204"]),
    [RecordID("job", "a"), RecordID("job", "b")], decimal.Decimal("12.50"),
    {"rows": [{"id": f"r{i}", "n": i, "none": None, "raw": b"x" * i} for i in range(5)]},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_encodes_the_same_bytes_as_the_sdk(value: Any) -> None:
    assert wire.encode(value) == sdk_encode(value)


@pytest.mark.parametrize("count", [1, 23, 24, 255, 256, 70000])
def test_a_request_from_encoded_pairs_equals_one_from_the_merged_map(count: int) -> None:
    # Grouped members are encoded apart (map_pairs) and joined under one map header; map
    # headers change size at 24, 256 and 65536 entries.
    values = [VALUES[i % len(VALUES)] for i in range(count)]
    parts = [{f"v{i}__{j}": values[i] for i in range(j, count, 3)} for j in range(3)]
    merged = {k: v for part in parts for k, v in part.items()}
    joined = wire.query_request_pairs("SELECT 1", [wire.map_pairs(p) for p in parts], count)
    alone = wire.query_request("SELECT 1", merged)
    a, b = cbor2.loads(joined), cbor2.loads(alone)
    assert a.pop("id") != b.pop("id")  # each request has its own id
    assert a == b


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_decodes_what_the_sdk_decodes(value: Any) -> None:
    data = sdk_encode(value)
    assert wire.decode(data) == sdk_decode(data)


def test_decodes_surrealdb_tags_the_sdk_knows() -> None:
    compact = cbor2.dumps(cbor2.CBORTag(12, [1_795_000_000, 123_456_789]))
    assert wire.decode(compact) == sdk_decode(compact) == datetime.fromtimestamp(
        1_795_000_000, UTC) + timedelta(microseconds=123_456)
    duration = cbor2.dumps(cbor2.CBORTag(14, [90, 5]))
    assert wire.decode(duration) == sdk_decode(duration) == Duration.parse(90, 5)
    none_in_record = cbor2.dumps({"a": cbor2.CBORTag(6, None), "b": None})
    assert wire.decode(none_in_record) == {"a": None, "b": None}


def test_refuses_what_it_cannot_send() -> None:
    with pytest.raises(cbor2.CBOREncodeTypeError, match="cannot send a object"):
        wire.encode({"x": object()})


def test_query_request_is_the_sdk_request_shape() -> None:
    request = wire.decode(wire.query_request("RETURN $x", {"x": None}))
    assert request["method"] == "query" and request["params"] == ["RETURN $x", {"x": None}]
    assert wire.query_request("x", {}) != wire.query_request("x", {})  # fresh ids


async def test_none_stays_none_and_values_round_trip_on_the_engine(tmp_path: Any) -> None:
    db = Database(f"surrealkv://{tmp_path}/db", namespace="t", database="t", sync=False)
    await db.connect()
    try:
        none_checks = await db.run("RETURN $x = NONE; RETURN $x = NULL; RETURN type::is::none($x)",
                                   {"x": None})
        assert none_checks == [True, False, True]
        row = {"id": "r1", "at": NOW, "n": 7, "raw": b"\x00\x01", "owner": None,
               "nested": {"list": [1, None, "x"]}, "ref": RecordID("job", "j1")}
        await db.run("CREATE type::thing('thing', $row.id) CONTENT $row", {"row": row})
        back = await db.one("SELECT * FROM ONLY thing:r1")
        assert back["at"] == NOW and back["raw"] == b"\x00\x01" and back["ref"] == "j1"
        assert "owner" not in back  # NONE: the field is absent, not null
        assert back["nested"] == {"list": [1, None, "x"]}
    finally:
        await db.close()
