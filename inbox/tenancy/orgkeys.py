"""Per-organization key material for stored mail: the 256-bit storage key (kept wrapped by the
master key, never in plaintext) and the tenant's registered end-to-end public key (X25519)."""

from __future__ import annotations

import base64
import os
from typing import Any

from inbox.errors import NotFound
from inbox.storage import Database, envelope
from inbox.tenancy.keys import SecretBox

STORAGE_KEY_BYTES = 32  # AES-256 (SSE-C requires exactly 256 bits)


def _aad(org: str) -> bytes:
    return b"org-storage-key:" + org.encode()


class OrgKeys:
    """Unwrapped storage keys, cached per process (a key never changes once made)."""

    def __init__(self, db: Database, box: SecretBox) -> None:
        self._db = db
        self._box = box
        self._keys: dict[str, bytes] = {}

    async def storage_key(self, org: str) -> bytes:
        key = self._keys.get(org)
        if key is not None:
            return key
        row = await self._db.one(
            "SELECT storage_key FROM ONLY type::thing('organization', $org)", {"org": org})
        if row is None:
            raise NotFound(f"organization {org} not found")
        sealed = row.get("storage_key")
        if sealed is None:
            # Made lazily, once: the conditional update lets exactly one racer win.
            fresh = self._box.seal(os.urandom(STORAGE_KEY_BYTES), _aad(org))
            row = await self._db.one(
                "UPDATE ONLY type::thing('organization', $org) SET storage_key ="
                " IF storage_key = NONE THEN $k ELSE storage_key END RETURN storage_key",
                {"org": org, "k": fresh})
            sealed = row["storage_key"]
        key = self._box.open(bytes(sealed), _aad(org))
        self._keys[org] = key
        return key


def parse_x25519_public(text: str) -> str:
    """Normalised base64 of a raw 32-byte X25519 public key; ValidationError (field
    publicKey) otherwise. The check is `envelope.parse_public_key`, the one `wrap_data_key`
    applies to every message, so a key stored here (e.g. the all-zero, low-order point, which
    gives an all-zero shared secret) can never make e2ee delivery fail later."""
    return base64.b64encode(envelope.parse_public_key(text)).decode("ascii")


async def set_e2ee_public_key(db: Database, org: str, public_key: str) -> dict[str, Any]:
    value = parse_x25519_public(public_key)
    return await db.one("UPDATE ONLY type::thing('organization', $org) SET e2ee_public_key = $k",
                        {"org": org, "k": value})


async def e2ee_public_key(db: Database, org: str) -> str | None:
    row = await db.one("SELECT e2ee_public_key FROM ONLY type::thing('organization', $org)",
                       {"org": org})
    return (row or {}).get("e2ee_public_key")
