"""Receiving side of tenancy: mailboxes, aliases, catch-all, per-domain inbound settings, and
resolving an SMTP recipient to a mailbox. Does not parse or store mail.

A domain is hosted, and receives mail, when its `has_domain` row is verified (verifyDomain, or
added verified by an operator) and has `inbound` on (the default): domains are unique across
organizations, so an unverified claim must not let a tenant receive another's mail. The row
also carries `plus_addressing` (default on: `info+tag@` reaches `info@`), `catch_all` (a mailbox
id or none), `enc_mode` (`standard` | `e2ee`) and optional `require_spf_pass`,
`require_dkim_pass`, `require_dmarc_pass` overrides of the global SMTP_REQUIRE_* settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from inbox.errors import Conflict, InvalidAddress, NotFound, RelayDenied, ValidationError
from inbox.storage import Database, new_id
from inbox.tenancy.domains import get_domain, normalize_domain
from inbox.tenancy.orgkeys import parse_x25519_public

# Our own mailbox names: a conservative dot-atom subset (RFC 5322 §3.2.3) without "+", which
# is reserved for plus addressing. Lookups are case-insensitive (RFC 5321 §2.4 lets us choose).
_LOCAL = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")
ENC_MODES = ("standard", "e2ee")
INBOUND_FIELDS = ("inbound", "plus_addressing", "catch_all", "enc_mode", "require_spf_pass",
                  "require_dkim_pass", "require_dmarc_pass")


def normalize_local(local: str, field: str = "localPart") -> str:
    text = local.strip().lower()
    if not _LOCAL.match(text) or ".." in text:
        raise ValidationError(
            f"'{local}' is not a valid mailbox name (letters, digits, '.', '_', '-'; no '+')",
            field=[field])
    return text


def split_address(address: str) -> tuple[str, str]:
    """(local part, A-label domain) of an envelope address; InvalidAddress when malformed."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or len(text) > 320:
        raise InvalidAddress(f"'{address}' is not an address", field=["address"])
    try:
        return local.lower(), normalize_domain(domain, "address")
    except ValidationError:
        raise InvalidAddress(f"'{address}' has an invalid domain", field=["address"]) from None


@dataclass(frozen=True)
class InboundRecipient:
    """Where one accepted RCPT TO goes."""

    address: str  # as given by the client
    org: str
    domain: str
    mailbox: str  # mailbox id
    mailbox_address: str
    settings: dict[str, Any]  # the has_domain row (inbound fields; no key material)


def _inbound_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "org": row["org"], "domain": row["domain"],
        "inbound": row.get("inbound", True) is not False,
        "plus_addressing": row.get("plus_addressing", True) is not False,
        "catch_all": row.get("catch_all"),
        "enc_mode": row.get("enc_mode") or "standard",
        "require_spf_pass": row.get("require_spf_pass"),
        "require_dkim_pass": row.get("require_dkim_pass"),
        "require_dmarc_pass": row.get("require_dmarc_pass"),
    }


async def hosted_domain(db: Database, domain: str) -> dict[str, Any] | None:
    """The inbound view of a hosted domain (any organization): verified, with inbound on.
    None for a domain nobody registered, one not verified yet, or one not receiving."""
    rows = await db.one("SELECT * OMIT dkim_rsa_private, dkim_ed25519_private FROM has_domain"
                        " WHERE domain = $domain LIMIT 1", {"domain": domain})
    if not rows or rows[0].get("verified") is not True:
        return None
    view = _inbound_view(rows[0])
    return view if view["inbound"] else None


async def resolve_recipient(db: Database, address: str,
                            domain_row: dict[str, Any] | None = None) -> InboundRecipient:
    """Map an RCPT TO address to a mailbox: exact mailbox, alias, plus-address, catch-all.

    RelayDenied when the domain is not hosted here (unknown, unverified or not receiving);
    NotFound (5.1.1) when the domain is ours but nobody is at that address.
    """
    local, domain = split_address(address)
    row = domain_row if domain_row is not None else await hosted_domain(db, domain)
    if row is None or not row["inbound"]:
        raise RelayDenied(f"relay access denied: {domain} is not hosted here")
    candidates = [f"{local}@{domain}"]
    base, plus, _tag = local.partition("+")
    if plus and base and row["plus_addressing"]:
        candidates.append(f"{base}@{domain}")
    results = await db.run(
        "SELECT id, address FROM mailbox WHERE address IN $c AND org = $org;"
        "SELECT mailbox, address FROM alias WHERE address IN $c AND org = $org;",
        {"c": candidates, "org": row["org"]},
    )
    found: dict[str, str] = {}
    for r in results[0] or []:
        found.setdefault(r["address"], r["id"])
    for r in results[1] or []:
        found.setdefault(r["address"], r["mailbox"])
    for candidate in candidates:
        if candidate in found:
            return InboundRecipient(address, row["org"], domain, found[candidate], candidate, row)
    if row["catch_all"]:
        return InboundRecipient(address, row["org"], domain, row["catch_all"], f"*@{domain}", row)
    raise NotFound(f"mailbox unavailable: no such user here ({local}@{domain})")


async def create_mailbox(db: Database, org: str, domain: str, local: str, now: datetime,
                         *, name: str = "") -> dict[str, Any]:
    row = await get_domain(db, org, domain)
    address = f"{normalize_local(local)}@{row['domain']}"
    mailbox_id = new_id("mbx")
    taken = await db.one("SELECT id FROM alias WHERE address = $a", {"a": address})
    if taken:
        raise Conflict(f"{address} is already an alias", field=["localPart"])
    try:
        rows = await db.one(
            "CREATE type::thing('mailbox', $id) CONTENT $content",
            {"id": mailbox_id, "content": {
                "org": org, "domain": row["domain"], "address": address,
                "name": name.strip()[:200], "created_at": now}},
        )
    except Conflict:
        raise Conflict(f"mailbox {address} already exists", field=["localPart"]) from None
    return rows[0]


async def list_mailboxes(db: Database, org: str) -> list[dict[str, Any]]:
    return await db.one("SELECT * FROM mailbox WHERE org = $org ORDER BY address",
                        {"org": org}) or []


async def get_mailbox(db: Database, org: str, mailbox: str) -> dict[str, Any]:
    rows = await db.one("SELECT * FROM mailbox WHERE id = type::thing('mailbox', $id)"
                        " AND org = $org", {"id": mailbox, "org": org})
    if not rows:
        raise NotFound(f"mailbox {mailbox} not found", field=["mailbox"])
    return rows[0]


async def add_alias(db: Database, org: str, address: str, mailbox: str, now: datetime
                    ) -> dict[str, Any]:
    target = await get_mailbox(db, org, mailbox)
    local, domain = split_address(address)
    row = await get_domain(db, org, domain)
    full = f"{normalize_local(local, 'address')}@{row['domain']}"
    clash = await db.one("SELECT id FROM mailbox WHERE address = $a", {"a": full})
    if clash:
        raise Conflict(f"{full} is already a mailbox", field=["address"])
    try:
        rows = await db.one(
            "CREATE type::thing('alias', $id) CONTENT $content",
            {"id": new_id("als"), "content": {
                "org": org, "domain": row["domain"], "address": full,
                "mailbox": target["id"], "created_at": now}},
        )
    except Conflict:
        raise Conflict(f"alias {full} already exists", field=["address"]) from None
    return rows[0]


async def remove_alias(db: Database, org: str, address: str) -> bool:
    local, domain = split_address(address)
    rows = await db.one("DELETE alias WHERE address = $a AND org = $org RETURN BEFORE",
                        {"a": f"{local}@{domain}", "org": org})
    return bool(rows)


async def list_aliases(db: Database, org: str, mailbox: str | None = None
                       ) -> list[dict[str, Any]]:
    if mailbox is None:
        return await db.one("SELECT * FROM alias WHERE org = $org ORDER BY address",
                            {"org": org}) or []
    return await db.one("SELECT * FROM alias WHERE org = $org AND mailbox = $m"
                        " ORDER BY address", {"org": org, "m": mailbox}) or []


async def set_inbound_settings(db: Database, org: str, domain: str,
                               changes: dict[str, Any]) -> dict[str, Any]:
    """Change a domain's inbound fields; None for a require_* override means "use global"."""
    row = await get_domain(db, org, domain)
    for key in changes:
        if key not in INBOUND_FIELDS:
            raise ValidationError(f"unknown inbound setting {key}", field=[key])
    if "enc_mode" in changes and changes["enc_mode"] not in ENC_MODES:
        raise ValidationError(f"encryption mode must be one of {', '.join(ENC_MODES)}",
                              field=["encMode"])
    if changes.get("enc_mode") == "e2ee":
        org_row = await db.one("SELECT e2ee_public_key FROM ONLY type::thing('organization',"
                               " $org)", {"org": org})
        public = (org_row or {}).get("e2ee_public_key")
        if not public:
            raise ValidationError("register an end-to-end public key before choosing e2ee",
                                  field=["encMode"])
        try:  # one stored before registration checked it would defer every message
            parse_x25519_public(public)
        except ValidationError:
            raise ValidationError("the registered end-to-end public key is not usable;"
                                  " register a new one first", field=["encMode"]) from None
    if changes.get("catch_all"):
        await get_mailbox(db, org, changes["catch_all"])
    rows = await db.one("UPDATE type::thing('has_domain', $id) MERGE $changes WHERE org = $org",
                        {"id": row["id"], "changes": changes, "org": org})
    return _inbound_view(rows[0])


async def domain_inbound(db: Database, org: str, domain: str) -> dict[str, Any]:
    return _inbound_view(await get_domain(db, org, domain))
