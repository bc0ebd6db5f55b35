"""Rate limits kept in the database, so every instance sharing it enforces the same budget.

A sliding-window counter (the "sliding log" approximated by two fixed windows, as Cloudflare
and Redis-cell describe it): the estimate is `current + previous * (1 - elapsed/window)`.
One counter row per (scope, key, window start); rows expire after two windows and `cleanup`
removes them. Does not decide what happens when the database fails: callers do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from inbox.errors import RateLimited, StorageUnavailable
from inbox.storage.db import Database

log = logging.getLogger(__name__)


_HIT = """BEGIN TRANSACTION;
UPSERT type::thing('rate_counter', [$scope, $key, $w]) SET n += 1, expires_at = $expires
  RETURN n;
SELECT VALUE n FROM type::thing('rate_counter', [$scope, $key, $prev]);
COMMIT TRANSACTION;"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    count: float  # the sliding estimate including this hit
    limit: int
    retry_after_secs: float


class RateLimiter:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def hit(self, scope: str, key: str, limit: int, window_secs: int = 60
                  ) -> RateDecision:
        """Count one event for (scope, key) and say whether it is within `limit` per window.

        `limit <= 0` means unlimited (nothing is counted). Raises StorageUnavailable when the
        database fails.
        """
        if limit <= 0:
            return RateDecision(True, 0, limit, 0.0)
        now = self._clock()
        window = int(now // window_secs)
        elapsed = (now - window * window_secs) / window_secs
        expires = datetime.fromtimestamp((window + 2) * window_secs, UTC)
        # Grouped: concurrent hits (every connection and message) share one commit.
        results = await self._db.run_grouped(_HIT, {
            "scope": scope, "key": key, "w": window, "prev": window - 1, "expires": expires})
        current = results[0][0]["n"] if results[0] else 1
        previous = results[1][0] if results[1] else 0
        estimate = current + previous * (1.0 - elapsed)
        allowed = estimate <= limit
        retry = 0.0 if allowed else (1.0 - elapsed) * window_secs
        return RateDecision(allowed, estimate, limit, retry)

    async def cleanup(self, now: datetime | None = None) -> None:
        cutoff = now or datetime.now(UTC)
        await self._db.run("DELETE rate_counter WHERE expires_at < $cutoff",
                           {"cutoff": cutoff - timedelta(seconds=0)})


async def enforce(limiter: RateLimiter, scope: str, key: str, limit: int, what: str, *,
                  fail_open: bool) -> RateDecision | None:
    """Count one event and raise RateLimited (4.7.0) when over `limit` per minute. When the
    store is unreachable: let it through (`fail_open`, returns None) or refuse for now."""
    try:
        decision = await limiter.hit(scope, key, limit)
    except StorageUnavailable:
        if fail_open:
            log.warning("rate-limit store unavailable; letting %s from %s in", what, key)
            return None
        raise RateLimited("rate limiting is unavailable; try again later") from None
    if not decision.allowed:
        raise RateLimited(f"too many {what} from {key}; try again in "
                          f"{int(decision.retry_after_secs) + 1} s")
    return decision
