"""Group commit of delivery results: a worker's job outcomes that arrive while a write is in
flight share the next transaction (`Queue.complete_many`: one commit, one fsync)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from inbox.delivery.queue import JobOutcome, Queue
from inbox.errors import InboxError


class Completer:
    """Group commit for job results: outcomes that arrive while a write is in flight go
    together in the next transaction (one commit, one fsync, for up to `max_batch` jobs)."""

    def __init__(self, queue: Queue, owner: str, clock: Callable[[], datetime],
                 max_batch: int = 64) -> None:
        self._queue = queue
        self._owner = owner
        self._clock = clock
        self._max = max_batch
        self._pending: list[tuple[JobOutcome, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def complete(self, outcome: JobOutcome) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((outcome, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self._max], self._pending[self._max:]
            try:
                lost = await self._queue.complete_many([o for o, _ in batch], self._owner,
                                                       self._clock())
            except InboxError as exc:
                if len(batch) > 1:  # one bad entry must not sink the others: go one by one
                    for item in batch:
                        await self._one(*item)
                    continue
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                continue
            for outcome, future in batch:
                if not future.done():
                    future.set_result(outcome.job["id"] not in lost)

    async def _one(self, outcome: JobOutcome, future: asyncio.Future[bool]) -> None:
        try:
            lost = await self._queue.complete_many([outcome], self._owner, self._clock())
        except InboxError as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(outcome.job["id"] not in lost)
