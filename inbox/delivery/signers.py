"""DKIM signers per sending domain, built from the sealed keys on has_domain, cached briefly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from inbox.delivery.signing import DkimSigner
from inbox.storage import Database
from inbox.tenancy.keys import SecretBox

CACHE_SECS = 60.0


class SignerCache:
    def __init__(self, db: Database, box: SecretBox, headers: Sequence[str],
                 ed25519: bool = True) -> None:
        self._db = db
        self._box = box
        self._headers = tuple(headers)
        self._ed25519 = ed25519
        self._cache: dict[tuple[str, str], tuple[float, DkimSigner]] = {}
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, org: str, domain: str) -> DkimSigner:
        key = (org, domain)
        hit = self._cache.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        # One load per key at a time: concurrent jobs wait for it instead of all loading.
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            hit = self._cache.get(key)
            if hit and hit[0] > time.monotonic():
                return hit[1]
            signer = await self._load(org, domain)
            self._cache[key] = (time.monotonic() + CACHE_SECS, signer)
        self._loading.pop(key, None)
        return signer

    async def _load(self, org: str, domain: str) -> DkimSigner:
        from inbox.tenancy import get_domain

        row: dict[str, Any] = await get_domain(self._db, org, domain, with_keys=True)
        aad = row["domain"].encode()

        def build() -> DkimSigner:
            return DkimSigner(
                row["domain"], row["dkim_selector_rsa"],
                self._box.open(row["dkim_rsa_private"], aad),
                row["dkim_selector_ed25519"] if self._ed25519 else None,
                self._box.open(row["dkim_ed25519_private"], aad).decode()
                if self._ed25519 else None,
                self._headers,
            )

        return await asyncio.to_thread(build)
