"""API keys: issue (shown once), authenticate by hash, revoke. Only a hash is stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from inbox.errors import NotFound, Unauthenticated, ValidationError
from inbox.storage import Database, new_id
from inbox.tenancy.principal import SCOPES, Principal

PREFIX = "ibx"


def _hash(secret: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_scopes(scopes: list[str]) -> list[str]:
    clean = sorted({s.strip().lower() for s in scopes if s.strip()})
    bad = [s for s in clean if s not in SCOPES]
    if bad or not clean:
        raise ValidationError(
            f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {scopes}",
            field=["scopes"],
        )
    return clean


async def create_api_key(db: Database, org: str, scopes: list[str], now: datetime,
                         name: str = "") -> tuple[dict[str, Any], str]:
    """Create a key; returns (record, the full key). The key is never retrievable again."""
    clean = _check_scopes(scopes)
    key_id = new_id("key")
    secret = secrets.token_urlsafe(32)
    token = f"{PREFIX}_{key_id.removeprefix('key_')}_{secret}"
    rows = await db.one(
        "CREATE type::thing('api_key', $id) SET org = $org, name = $name, scopes = $scopes,"
        " hash = $hash, created_at = $now, revoked_at = NONE",
        {"id": key_id, "org": org, "name": name[:200], "scopes": clean,
         "hash": _hash(secret), "now": now},
    )
    record = {k: v for k, v in rows[0].items() if k != "hash"}
    return record, token


async def authenticate(db: Database, token: str) -> Principal:
    parts = token.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        raise Unauthenticated("malformed API key")
    key_id = f"key_{parts[1]}"
    row = await db.one("SELECT * FROM ONLY type::thing('api_key', $id)", {"id": key_id})
    if not row or not hmac.compare_digest(row["hash"], _hash(parts[2])):
        raise Unauthenticated("invalid API key")
    if row.get("revoked_at"):
        raise Unauthenticated("this API key has been revoked")
    return Principal(org=row["org"], key_id=key_id, scopes=frozenset(row["scopes"]))


async def revoke_api_key(db: Database, org: str, key_id: str, now: datetime) -> dict[str, Any]:
    rows = await db.one(
        "UPDATE type::thing('api_key', $id) SET revoked_at = $now WHERE org = $org",
        {"id": key_id, "org": org, "now": now},
    )
    if not rows:
        raise NotFound(f"API key {key_id} not found", field=["id"])
    return {k: v for k, v in rows[0].items() if k != "hash"}


async def list_api_keys(db: Database, org: str) -> list[dict[str, Any]]:
    rows = await db.one(
        "SELECT * OMIT hash FROM api_key WHERE org = $org ORDER BY created_at", {"org": org}
    )
    return rows or []


class AuthCache:
    """Authenticated principals, remembered for `ttl` seconds per key.

    A revocation evicts the key here at once; another instance that cached it keeps accepting
    it for at most `ttl` seconds (INBOX_CACHE_SECS; 0 turns the cache off).
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, db: Database, token: str) -> Principal:
        if self.ttl <= 0:
            return await authenticate(db, token)
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._entries.get(digest)
        now = self._clock()
        if hit and hit[0] > now:
            return hit[1]
        principal = await authenticate(db, token)
        if len(self._entries) > 10000:
            self._entries.clear()
        self._entries[digest] = (now + self.ttl, principal)
        return principal

    def evict(self, key_id: str) -> None:
        for digest, (_, principal) in list(self._entries.items()):
            if principal.key_id == key_id:
                del self._entries[digest]
