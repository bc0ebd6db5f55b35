"""Database.run_grouped: concurrent transactions share one engine call yet stay independent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from inbox.errors import Conflict
from inbox.storage import Database, DbThrow
from inbox.storage.db import _procedure

SQL = """BEGIN TRANSACTION;
IF $n % 3 == 0 { THROW 'MULTIPLE_OF_THREE|' + <string>$n };
CREATE type::thing('item', $n) SET v = $n RETURN NONE;
UPSERT counter:total SET n += 1 RETURN NONE;
LET $seen = (SELECT VALUE n FROM ONLY counter:total);
COMMIT TRANSACTION;"""


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    database = Database("mem://", namespace="t", database="t")
    await database.connect()
    yield database
    await database.close()


@pytest.mark.parametrize("procedure", [False, True], ids=["text", "stored-function"])
async def test_each_member_is_its_own_transaction(db: Database, procedure: bool) -> None:
    results = await asyncio.gather(
        *(db.run_grouped(SQL, {"n": n}, procedure=procedure) for n in range(40)),
        return_exceptions=True)
    for n, result in enumerate(results):
        if n % 3 == 0:
            assert isinstance(result, DbThrow) and result.throw_code == "MULTIPLE_OF_THREE"
            assert result.detail == str(n)
        else:
            assert isinstance(result, list), result
    items = await db.one("SELECT VALUE v FROM item ORDER BY v")
    assert items == [n for n in range(40) if n % 3]  # thrown ones rolled back, only theirs
    assert (await db.one("SELECT VALUE n FROM ONLY counter:total")) == len(items)


async def test_conflicts_and_sequential_calls(db: Database) -> None:
    await db.run("DEFINE INDEX uniq ON item FIELDS v UNIQUE")
    sql = "BEGIN TRANSACTION; CREATE item SET v = $v RETURN NONE; COMMIT TRANSACTION;"
    results = await asyncio.gather(*(db.run_grouped(sql, {"v": v}) for v in (1, 2, 1, 3)),
                                   return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["list", "list", "Conflict", "list"]
    assert isinstance(results[2], Conflict)
    # One caller alone goes through the same path.
    assert await db.run_grouped(sql, {"v": 9}) == [[]]


async def test_a_group_without_failures_commits_together(db: Database) -> None:
    sql = ("BEGIN TRANSACTION; UPSERT counter:total SET n += 1 RETURN NONE;"
           " LET $now = (SELECT VALUE n FROM ONLY counter:total);"
           " CREATE type::thing('item', $n) SET v = $n, seen = $now RETURN NONE;"
           " COMMIT TRANSACTION;")
    await asyncio.gather(*(db.run_grouped(sql, {"n": n}) for n in range(1, 31)))
    rows = await db.one("SELECT v, seen FROM item ORDER BY v")
    assert [r["v"] for r in rows] == list(range(1, 31))
    # Members ran in order, each seeing the counter after its own increment.
    assert sorted(r["seen"] for r in rows) == list(range(1, 31))


async def test_procedure_is_defined_once_and_called_by_name(db: Database) -> None:
    await db.run_grouped(SQL, {"n": 1}, procedure=True)
    await db.run_grouped(SQL, {"n": 2}, procedure=True)
    with pytest.raises(DbThrow, match="MULTIPLE_OF_THREE"):
        await db.run_grouped(SQL, {"n": 3}, procedure=True)
    assert await db.one("SELECT VALUE v FROM item ORDER BY v") == [1, 2]
    functions = (await db.one("INFO FOR DB"))["functions"]
    assert len([f for f in functions if f.startswith("inbox_txn_")]) == 1


def test_procedure_parameters_and_refusals() -> None:
    proc = _procedure("BEGIN TRANSACTION; LET $x = $a + 1; FOR $i IN $list { CREATE t SET v = $i,"
                      " w = $x, at = $now } ; UPDATE t SET seen = $value RETURN NONE;"
                      " COMMIT TRANSACTION;")
    assert proc is not None
    assert proc.call.endswith("($a, $list, $now); COMMIT TRANSACTION;")  # not $x, $i, $value
    # A RETURN statement would end a function early: such a text stays text.
    assert _procedure("BEGIN TRANSACTION; UPSERT c:1 SET n += 1; RETURN 1; COMMIT TRANSACTION;"
                      ) is None
    assert _procedure("SELECT * FROM t;") is None  # not a transaction


async def test_different_procedures_commit_together_yet_fail_alone(db: Database) -> None:
    other = """BEGIN TRANSACTION;
IF $tag == 'bad' { THROW 'BAD_TAG|' + $tag };
CREATE type::thing('note', $tag) SET tag = $tag RETURN NONE;
COMMIT TRANSACTION;"""
    # Define both functions first, so that only the grouped calls are counted below.
    await db.run_grouped(SQL, {"n": 100}, procedure=True)
    await db.run_grouped(other, {"tag": "first"}, procedure=True)
    calls: list[str] = []
    query = db._query

    async def counting(sql: str, *args: Any) -> dict[str, object]:
        calls.append(sql)
        return await query(sql, *args)

    db._query = counting  # type: ignore[method-assign]
    ok = [db.run_grouped(SQL, {"n": n}, procedure=True) for n in (1, 2, 4, 5)]
    notes = [db.run_grouped(other, {"tag": t}, procedure=True) for t in ("a", "b", "c")]
    results = await asyncio.gather(*ok, *notes)
    assert all(r == [None] for r in results), results
    # All seven, of two different functions, share one engine call and ONE transaction.
    assert len(calls) == 1 and calls[0].count("fn::inbox_txn_") == 7
    assert calls[0].count("BEGIN TRANSACTION") == 1
    assert await db.one("SELECT VALUE tag FROM note ORDER BY tag") == ["a", "b", "c", "first"]

    # A THROW in one function's member rolls back the shared attempt; every member then runs
    # as its own transaction, so only the thrower fails.
    calls.clear()
    mixed = await asyncio.gather(
        db.run_grouped(SQL, {"n": 7}, procedure=True),
        db.run_grouped(other, {"tag": "bad"}, procedure=True),
        db.run_grouped(SQL, {"n": 8}, procedure=True),
        db.run_grouped(other, {"tag": "d"}, procedure=True),
        return_exceptions=True)
    assert mixed[0] == [None] and mixed[2] == [None] and mixed[3] == [None]
    assert isinstance(mixed[1], DbThrow) and mixed[1].throw_code == "BAD_TAG"
    assert await db.one("SELECT VALUE v FROM item WHERE v IN [7, 8] ORDER BY v") == [7, 8]
    assert await db.one("SELECT VALUE tag FROM note WHERE tag IN ['bad', 'd']") == ["d"]


async def test_a_failing_flush_fails_its_members_and_the_next_group_still_runs(
        db: Database) -> None:
    query = db._query
    broken = True

    async def failing(sql: str, *args: Any) -> dict[str, object]:
        if broken:
            raise TypeError("a bug in the flush")  # not an InboxError
        return await query(sql, *args)

    db._query = failing  # type: ignore[method-assign]
    first = await asyncio.gather(*(db.run_grouped(SQL, {"n": n}) for n in (1, 2)),
                                 return_exceptions=True)
    assert [type(r).__name__ for r in first] == ["StorageUnavailable", "StorageUnavailable"]
    broken = False
    assert await asyncio.wait_for(db.run_grouped(SQL, {"n": 4}), 10) is not None
    assert await db.one("SELECT VALUE v FROM item ORDER BY v") == [4]
