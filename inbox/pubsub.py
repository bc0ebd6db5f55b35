"""In-process publish/subscribe for live GraphQL subscriptions (embedded SurrealDB has no LIVE
queries). Topics are strings such as `inbound:<org>:<mailbox>`; slow subscribers drop the
oldest events rather than block publishers. One process only: with several instances, a
subscriber sees the events of the instance it is connected to."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

QUEUE_SIZE = 256


class PubSub:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[Any]]] = defaultdict(set)

    def publish(self, topic: str, event: Any) -> int:
        """Deliver to every current subscriber of `topic`; returns how many got it."""
        queues = self._subscribers.get(topic, set())
        for queue in queues:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)
        return len(queues)

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[asyncio.Queue[Any]]:
        queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers[topic].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[topic].discard(queue)
            if not self._subscribers[topic]:
                del self._subscribers[topic]

    def subscribers(self, topic: str) -> int:
        return len(self._subscribers.get(topic, ()))
