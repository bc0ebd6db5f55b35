"""The embedded engine's calls run one at a time (ENGINE-NOTES: concurrent calls are unsafe),
and closing the database waits for the calls in flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inbox.storage import Database


@pytest.fixture
async def disk_db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"surrealkv://{tmp_path}/db", namespace="t", database="t", sync=False)
    await database.connect()
    yield database
    await database.close()


async def test_real_engine_concurrent_increments_all_count(disk_db: Database) -> None:
    # ENGINE-NOTES: unserialised concurrent calls lost `n += 1` increments.
    await asyncio.gather(*(disk_db.run("UPSERT counter:c SET n += 1 RETURN NONE;")
                           for _ in range(200)))
    assert await disk_db.one("SELECT VALUE n FROM ONLY counter:c") == 200


async def test_close_waits_for_calls_in_flight(tmp_path: Path) -> None:
    database = Database(f"surrealkv://{tmp_path}/db", namespace="t", database="t")
    await database.connect()
    writes = [asyncio.ensure_future(database.run(f"CREATE item:{i} RETURN NONE;"))
              for i in range(50)]
    await asyncio.sleep(0)
    await database.close()
    assert all(w.done() and w.exception() is None for w in writes)
    again = Database(f"surrealkv://{tmp_path}/db", namespace="t", database="t")
    await again.connect()
    try:
        assert await again.one("SELECT count() FROM item GROUP ALL") == [{"count": 50}]
    finally:
        await again.close()
