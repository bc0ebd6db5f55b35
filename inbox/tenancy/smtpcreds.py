"""SMTP credentials (submission, ports 587/465): issue per organization (the password is shown
once), verify AUTH PLAIN/LOGIN against a slow hash, revoke, list. Only the scrypt hash is stored.

A credential authenticates as a `Principal` of its organization with the `send` scope only.
The username is the credential's id (`smtp_…`); the password is 192 random bits.

Verifying costs one scrypt (RFC 7914) run, ~50 ms of CPU, so `SmtpAuthCache` remembers which
(credential, password) pairs matched which stored hash. The credential row is still read on
every AUTH: a revocation (from any instance) is refused at once, and a changed hash misses the
cache. The KDF runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from inbox.errors import NotFound, Unauthenticated, ValidationError
from inbox.storage import Database, new_id
from inbox.tenancy.principal import Principal

ID_PREFIX = "smtp"
# RFC 7914 §2 parameters: N=2^14, r=8, p=1 (16 MiB, ~50 ms here) — the interactive-login
# setting of the scrypt paper; the password is random, so this is defence in depth.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
_OMIT = "OMIT hash"


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
                  ) -> str:
    """`scrypt$N$r$p$salt$hash` (salt and hash base64): blocking, ~50 ms at the defaults."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM,
                            dklen=32)
    return (f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check_password(password: str, stored: str) -> bool:
    """Whether `password` matches a `hash_password` string (constant-time compare; blocking)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8", "surrogateescape"),
                             salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=SCRYPT_MAXMEM, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "hash"}


async def create_smtp_credential(db: Database, org: str, now: datetime, name: str = ""
                                 ) -> tuple[dict[str, Any], str]:
    """Create a credential; returns (record without the hash, password). The record's `id` is
    the SMTP username. The password is never retrievable again."""
    if len(name) > 200 or any(ord(c) < 32 for c in name):
        raise ValidationError("name is up to 200 printable characters", field=["name"])
    cred_id = new_id(ID_PREFIX)
    password = secrets.token_urlsafe(24)
    stored = await asyncio.to_thread(hash_password, password)
    rows = await db.one(
        "CREATE type::thing('smtp_credential', $id) SET org = $org, name = $name,"
        " hash = $hash, created_at = $now, revoked_at = NONE, last_used_at = NONE",
        {"id": cred_id, "org": org, "name": name, "hash": stored, "now": now})
    return _public(rows[0]), password


async def revoke_smtp_credential(db: Database, org: str, cred_id: str, now: datetime
                                 ) -> dict[str, Any]:
    """Revoke one of `org`'s credentials (another organization's id is NotFound)."""
    rows = await db.one(
        "UPDATE type::thing('smtp_credential', $id) SET revoked_at = $now"
        " WHERE org = $org AND revoked_at = NONE",
        {"id": cred_id, "org": org, "now": now})
    if not rows:
        row = await db.one(f"SELECT * {_OMIT} FROM ONLY type::thing('smtp_credential', $id)"
                           " WHERE org = $org", {"id": cred_id, "org": org})
        if not row:
            raise NotFound(f"SMTP credential {cred_id} not found", field=["id"])
        return dict(row)  # already revoked: revoking again changes nothing
    return _public(rows[0])


async def list_smtp_credentials(db: Database, org: str) -> list[dict[str, Any]]:
    rows = await db.one(f"SELECT * {_OMIT} FROM smtp_credential WHERE org = $org"
                        " ORDER BY created_at", {"org": org})
    return rows or []


def _well_formed(username: str) -> bool:
    head, _, tail = username.partition("_")
    return head == ID_PREFIX and 8 <= len(tail) <= 64 and tail.isalnum()


class SmtpAuthCache:
    """Verifies SMTP AUTH; remembers matched (username, password, stored hash) for `ttl`
    seconds (0 = verify every time). Concurrent AUTHs with the same pair share one KDF run."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._verified: dict[str, tuple[str, float]] = {}  # username -> (digest, expiry)
        self._running: dict[str, asyncio.Future[bool]] = {}

    async def authenticate(self, db: Database, username: str, password: str) -> Principal:
        """The principal for a username/password pair; raises Unauthenticated otherwise."""
        if not _well_formed(username) or not password or len(password) > 1000:
            raise Unauthenticated("invalid SMTP credentials")
        row = await db.one("SELECT * FROM ONLY type::thing('smtp_credential', $id)",
                           {"id": username})
        if not row or not isinstance(row.get("hash"), str):
            raise Unauthenticated("invalid SMTP credentials")
        key = hashlib.sha256("\0".join((username, password, row["hash"])).encode(
            "utf-8", "surrogateescape")).hexdigest()
        now = self._clock()
        hit = self._verified.get(username)
        if hit is None or hit[0] != key or hit[1] <= now:
            if not await self._check(key, password, row["hash"]):
                raise Unauthenticated("invalid SMTP credentials")
            if self.ttl > 0:
                if len(self._verified) > 10000:
                    self._verified.clear()
                self._verified[username] = (key, now + self.ttl)
        # Checked after the password: a wrong guess cannot tell a revoked credential apart.
        if row.get("revoked_at"):
            raise Unauthenticated("this SMTP credential has been revoked")
        return Principal(org=row["org"], key_id=username, scopes=frozenset({"send"}))

    async def _check(self, key: str, password: str, stored: str) -> bool:
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            ok = await asyncio.to_thread(check_password, password, stored)
            future.set_result(ok)
            return ok
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it, nobody logs it as lost
            raise
        finally:
            del self._running[key]

    def evict(self, cred_id: str) -> None:
        """Forget the credential's verified password. Revocation does not depend on this (the
        row is read on every AUTH, so every instance refuses at once); it frees memory early."""
        self._verified.pop(cred_id, None)
