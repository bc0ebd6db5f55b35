"""Mailboxes, aliases, catch-all, recipient resolution and DB-backed rate limits, on the real
embedded engine."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from inbox.errors import (
    Conflict,
    InvalidAddress,
    NotFound,
    RelayDenied,
    StorageUnavailable,
    ValidationError,
)
from inbox.storage import Database
from inbox.storage.envelope import SealedMessage, generate_keypair
from inbox.storage.ratelimits import RateLimiter
from inbox.storage.schema import migrate
from inbox.tenancy import add_domain, create_organization
from inbox.tenancy.keys import SecretBox
from inbox.tenancy.mailboxes import (
    add_alias,
    create_mailbox,
    hosted_domain,
    remove_alias,
    resolve_recipient,
    set_inbound_settings,
)
from inbox.tenancy.orgkeys import OrgKeys, e2ee_public_key, set_e2ee_public_key

NOW = datetime(2026, 11, 22, tzinfo=UTC)


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    database = Database("mem://", namespace="t", database="t")
    await database.connect()
    await migrate(database)
    yield database
    await database.close()


async def _org(db: Database, domain: str) -> str:
    org = await create_organization(db, f"org {domain}", NOW)
    await add_domain(db, SecretBox(b"m" * 32), org["id"], domain, NOW, verified=True)
    return org["id"]


async def test_recipient_resolution_table(db: Database) -> None:
    a = await _org(db, "a.test")
    b = await _org(db, "b.test")
    info_a = await create_mailbox(db, a, "a.test", "info", NOW)
    info_b = await create_mailbox(db, b, "b.test", "Info", NOW)
    await add_alias(db, a, "sales@a.test", info_a["id"], NOW)
    cases: list[tuple[str, Any]] = [
        ("info@a.test", info_a["id"]),
        ("INFO@A.TEST", info_a["id"]),
        ("<info@a.test>", info_a["id"]),
        ("info+x@a.test", info_a["id"]),
        ("sales@a.test", info_a["id"]),
        ("info@b.test", info_b["id"]),
        ("nobody@a.test", NotFound),
        ("info@c.test", RelayDenied),
        ("info@sub.a.test", RelayDenied),
        ("no-at-sign", InvalidAddress),
        ("x@-bad-.test", InvalidAddress),
    ]
    for address, expected in cases:
        if isinstance(expected, type):
            with pytest.raises(expected):
                await resolve_recipient(db, address)
        else:
            got = await resolve_recipient(db, address)
            assert got.mailbox == expected, address
    # Each resolution names the owning organization: b's info never lands in a's mailbox.
    assert (await resolve_recipient(db, "info@b.test")).org == b


async def test_catch_all_plus_switch_and_inbound_off(db: Database) -> None:
    org = await _org(db, "a.test")
    box = await create_mailbox(db, org, "a.test", "info", NOW)
    await set_inbound_settings(db, org, "a.test", {"plus_addressing": False})
    with pytest.raises(NotFound):
        await resolve_recipient(db, "info+x@a.test")
    await set_inbound_settings(db, org, "a.test", {"catch_all": box["id"]})
    assert (await resolve_recipient(db, "whoever@a.test")).mailbox == box["id"]
    await set_inbound_settings(db, org, "a.test", {"inbound": False})
    with pytest.raises(RelayDenied):
        await resolve_recipient(db, "info@a.test")


async def test_mailbox_and_alias_rules(db: Database) -> None:
    a = await _org(db, "a.test")
    b = await _org(db, "b.test")
    box = await create_mailbox(db, a, "a.test", "info", NOW)
    with pytest.raises(Conflict):
        await create_mailbox(db, a, "a.test", "INFO", NOW)
    for bad in ("in fo", "a+b", "", ".x", "x..y", "ü" * 3):
        with pytest.raises(ValidationError):
            await create_mailbox(db, a, "a.test", bad, NOW)
    with pytest.raises(NotFound):  # another org's domain
        await create_mailbox(db, b, "a.test", "x", NOW)
    with pytest.raises(NotFound):  # another org's mailbox as alias target
        await add_alias(db, b, "x@b.test", box["id"], NOW)
    with pytest.raises(Conflict):  # an alias cannot shadow a mailbox
        await add_alias(db, a, "info@a.test", box["id"], NOW)
    await add_alias(db, a, "hi@a.test", box["id"], NOW)
    with pytest.raises(Conflict):
        await create_mailbox(db, a, "a.test", "hi", NOW)
    assert not await remove_alias(db, b, "hi@a.test")  # b cannot remove a's alias
    assert await remove_alias(db, a, "hi@a.test")
    with pytest.raises(NotFound):
        await set_inbound_settings(db, b, "a.test", {"plus_addressing": False})
    with pytest.raises(NotFound):  # catch-all must be a mailbox of the same org
        other = await create_mailbox(db, b, "b.test", "info", NOW)
        await set_inbound_settings(db, a, "a.test", {"catch_all": other["id"]})
    with pytest.raises(ValidationError):  # e2ee needs a registered public key
        await set_inbound_settings(db, a, "a.test", {"enc_mode": "e2ee"})
    with pytest.raises(ValidationError):
        await set_e2ee_public_key(db, a, "not base64!")
    await set_e2ee_public_key(db, a, generate_keypair()[1])
    assert (await set_inbound_settings(db, a, "a.test", {"enc_mode": "e2ee"}))["enc_mode"] \
        == "e2ee"


async def test_only_verified_receiving_domains_are_hosted(db: Database) -> None:
    """Domains are unique across organizations: an unverified claim must not receive mail."""
    org = await create_organization(db, "claimer", NOW)
    await add_domain(db, SecretBox(b"m" * 32), org["id"], "claimed.test", NOW)  # unverified
    box = await create_mailbox(db, org["id"], "claimed.test", "info", NOW)
    assert await hosted_domain(db, "claimed.test") is None
    with pytest.raises(RelayDenied):
        await resolve_recipient(db, "info@claimed.test")
    await db.run("UPDATE has_domain SET verified = true WHERE domain = 'claimed.test'")
    assert (await hosted_domain(db, "claimed.test"))["org"] == org["id"]
    assert (await resolve_recipient(db, "info@claimed.test")).mailbox == box["id"]
    await set_inbound_settings(db, org["id"], "claimed.test", {"inbound": False})
    assert await hosted_domain(db, "claimed.test") is None


# Points of small order on Curve25519 (and non-canonical encodings of them): X25519 with any
# of them gives the all-zero shared secret (RFC 7748 §6.1), which wrapping refuses.
LOW_ORDER_KEYS = {
    "zero": bytes(32),
    "one": b"\x01" + bytes(31),
    "order-8": bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    "order-8-other": bytes.fromhex(
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    "p-1": bytes.fromhex("ec" + "ff" * 30 + "7f"),
    "p": bytes.fromhex("ed" + "ff" * 30 + "7f"),
    "p+1": bytes.fromhex("ee" + "ff" * 30 + "7f"),
}


@pytest.mark.parametrize("raw", list(LOW_ORDER_KEYS.values()), ids=list(LOW_ORDER_KEYS))
async def test_a_low_order_e2ee_key_is_refused_at_registration(db: Database,
                                                                raw: bytes) -> None:
    a = await _org(db, "a.test")
    with pytest.raises(ValidationError) as refused:
        await set_e2ee_public_key(db, a, base64.b64encode(raw).decode())
    assert refused.value.field == ["publicKey"]
    assert await e2ee_public_key(db, a) is None  # nothing was stored
    # A key that registers is one every message can be sealed to.
    _, public = generate_keypair()
    await set_e2ee_public_key(db, a, f" {public[:20]}\n{public[20:]} ")
    stored = await e2ee_public_key(db, a)
    assert stored == public and SealedMessage.seal(stored, b"m").wrapped_key


async def test_e2ee_cannot_be_chosen_with_an_unusable_stored_key(db: Database) -> None:
    """A key stored before registration checked it (written here behind the API's back)."""
    a = await _org(db, "a.test")
    await db.one("UPDATE ONLY type::thing('organization', $org) SET e2ee_public_key = $k",
                 {"org": a, "k": "A" * 43 + "="})
    with pytest.raises(ValidationError) as refused:
        await set_inbound_settings(db, a, "a.test", {"enc_mode": "e2ee"})
    assert refused.value.field == ["encMode"] and "not usable" in refused.value.message


async def test_org_storage_key_is_made_once_and_kept_sealed(db: Database) -> None:
    org = await _org(db, "a.test")
    box = SecretBox(b"m" * 32)
    first, second = OrgKeys(db, box), OrgKeys(db, box)
    keys = await asyncio.gather(first.storage_key(org), second.storage_key(org))
    assert keys[0] == keys[1] and len(keys[0]) == 32
    row = await db.one("SELECT storage_key FROM ONLY type::thing('organization', $o)", {"o": org})
    assert keys[0] not in bytes(row["storage_key"])  # stored wrapped, not in plaintext
    other = await _org(db, "b.test")
    assert await first.storage_key(other) != keys[0]
    with pytest.raises(NotFound):
        await first.storage_key("org_missing")


async def test_rate_limiter_sliding_window(db: Database) -> None:
    now = [1_000_000.0 * 60]  # the start of a window
    limiter = RateLimiter(db, clock=lambda: now[0])
    got = [(await limiter.hit("conn", "192.0.2.1", 3)).allowed for _ in range(4)]
    assert got == [True, True, True, False]
    assert (await limiter.hit("conn", "192.0.2.2", 3)).allowed  # keys are separate
    # Half way through the next window, half of the previous window still counts.
    now[0] += 90
    decisions = [await limiter.hit("conn", "192.0.2.1", 3) for _ in range(2)]
    assert [d.allowed for d in decisions] == [True, False]
    assert decisions[1].retry_after_secs == pytest.approx(30)
    # Two windows later the slate is clean.
    now[0] += 120
    assert (await limiter.hit("conn", "192.0.2.1", 3)).allowed
    assert (await limiter.hit("conn", "x", 0)).allowed  # 0 = unlimited


async def test_rate_limiter_reports_a_database_outage(db: Database) -> None:
    limiter = RateLimiter(db)
    await db.close()
    with pytest.raises(StorageUnavailable):
        await limiter.hit("conn", "192.0.2.1", 3)
