"""Per-instance cache of domain settings read on every send (verified flag, quota overrides).

Entries live `ttl` seconds (INBOX_CACHE_SECS). Changes made through this instance evict at
once; another instance sees them within `ttl`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Rows = tuple[dict[str, Any] | None, dict[str, Any] | None]


class TenantCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, Rows]] = {}

    def get(self, org: str, domain: str) -> Rows | None:
        hit = self._entries.get((org, domain))
        if hit is None or hit[0] <= self._clock():
            return None
        return hit[1]

    def put(self, org: str, domain: str, rows: Rows) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) > 10000:
            self._entries.clear()
        self._entries[(org, domain)] = (self._clock() + self.ttl, rows)

    def evict(self, org: str, domain: str | None = None) -> None:
        for key in [k for k in self._entries if k[0] == org and domain in (None, k[1])]:
            del self._entries[key]
