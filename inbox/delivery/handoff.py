"""Direct handoff: a message just stored goes straight to a delivery worker of this process.

Without it a stored job waits for a worker to lease it and load the message back from the
database: two round trips that cost the embedded engine more than the delivery's own writes.
With it, `submit` asks for a claim before storing. A claim names a local worker with a free
slot; the jobs are then stored already leased to that worker (status 'processing', its name as
owner, a normal lease expiry), in the same transaction as the message, and after the commit the
worker gets them with the message, raw bytes and recipients still in memory.

Nothing is lost if this process dies in between: the jobs are in the database, leased, and
another worker takes them over when the lease expires (queue.py), as for any crashed worker.
When no worker has room (or none runs here, e.g. `inbox serve --no-workers`), the jobs are
stored queued and the workers are woken to lease them, as before.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

# A job row with its message row, raw bytes and recipient rows (queue.Loaded).
Handed = tuple[dict[str, Any], tuple[dict[str, Any] | None, bytes | None, list[dict[str, Any]]]]


class Taker(Protocol):
    """What a worker offers the handoff (DeliveryWorker implements it)."""

    name: str
    lease_secs: float

    def room(self) -> int: ...
    def take(self, handed: list[Handed]) -> None: ...


@dataclass
class Claim:
    """Room reserved on one worker for the jobs of one message being stored."""

    taker: Taker
    count: int
    handoff: Handoff
    done: bool = field(default=False)

    def lease(self, now: datetime) -> dict[str, Any]:
        """The lease columns the jobs are stored with (as a lease would set them)."""
        until = now + timedelta(seconds=self.taker.lease_secs)
        return {"status": "processing", "owner": self.taker.name, "lease_until": until,
                "due": until,  # a leased job is due again when its lease ends (queue.py)
                "attempts": 1, "last_attempt_at": now}

    def deliver(self, handed: list[Handed]) -> None:
        """The jobs are committed: the worker starts them."""
        if not self.done:
            self.done = True
            self.handoff._settle(self)
            self.handoff.handed += len(handed)
            self.taker.take(handed)

    def cancel(self) -> None:
        """The store failed or was not needed: give the room back."""
        if not self.done:
            self.done = True
            self.handoff._settle(self)


class Handoff:
    """Claims on the local workers' free slots; wakes the workers for jobs stored queued."""

    def __init__(self, wakeup: asyncio.Event | None = None) -> None:
        self.wakeup = wakeup or asyncio.Event()
        self._takers: list[Taker] = []
        self._reserved: dict[int, int] = {}  # id(taker) -> slots claimed, not yet settled
        self.handed = 0  # jobs handed over so far
        self.stored_queued = 0  # jobs stored queued (no room) so far

    def attach(self, taker: Taker) -> None:
        self._takers.append(taker)

    def detach(self, taker: Taker) -> None:
        """No new claims on `taker` (it is shutting down)."""
        self._takers = [t for t in self._takers if t is not taker]

    def reserved(self, taker: Taker) -> int:
        return self._reserved.get(id(taker), 0)

    def claim(self, count: int) -> Claim | None:
        """Room for `count` jobs on one worker, or None (then store them queued)."""
        best, room = None, 0
        for taker in self._takers:
            free = taker.room() - self.reserved(taker)
            if free > room:
                best, room = taker, free
        if best is None or room < count:
            return None
        self._reserved[id(best)] = self.reserved(best) + count
        return Claim(best, count, self)

    def queued(self, count: int) -> None:
        """`count` jobs were stored queued: wake the workers to lease them."""
        self.stored_queued += count
        self.wakeup.set()

    def _settle(self, claim: Claim) -> None:
        key = id(claim.taker)
        left = self._reserved.get(key, 0) - claim.count
        if left > 0:
            self._reserved[key] = left
        else:
            self._reserved.pop(key, None)
