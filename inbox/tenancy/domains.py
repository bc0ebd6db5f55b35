"""Sending domains of an organization: adding (with DKIM keys), DNS records, verification.

The `has_domain` relation (organization → domain) carries the per-domain overrides: DKIM
selectors and sealed keys, quotas, and later auth policy and encryption mode.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import idna

from inbox.errors import Conflict, DnsNotFound, DnsTemporary, NotFound, ValidationError
from inbox.storage import Database
from inbox.tenancy.keys import SecretBox, dns_txt_value, generate_dkim_keys
from inbox.tenancy.organizations import QUOTA_FIELDS


def normalize_domain(name: str, field: str = "domain") -> str:
    """IDNA A-label, lowercased, without trailing dot; ValidationError naming `field`."""
    text = name.strip().rstrip(".").lower()
    if not text or any(c in text for c in "\r\n\0 /\\@"):
        raise ValidationError(f"'{name}' is not a domain name", field=[field])
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValidationError(f"'{name}' is not a valid domain name: {exc}",
                              field=[field]) from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or len(ascii_name) > 253 or any(not lb or len(lb) > 63 for lb in labels):
        raise ValidationError(f"'{name}' is not a fully qualified domain name", field=[field])
    return ascii_name


def _selectors(now: datetime) -> tuple[str, str]:
    stamp = now.strftime("%Y%m")
    return f"inbox{stamp}r", f"inbox{stamp}e"


def dns_records(row: dict[str, Any]) -> list[dict[str, str]]:
    """The DNS records the tenant publishes for this domain (DKIM is required to verify)."""
    domain = row["domain"]
    records = [{
        "type": "TXT",
        "name": f"{row['dkim_selector_rsa']}._domainkey.{domain}",
        "value": dns_txt_value("rsa", row["dkim_rsa_public"]),
    }]
    if row.get("dkim_selector_ed25519"):
        records.append({
            "type": "TXT",
            "name": f"{row['dkim_selector_ed25519']}._domainkey.{domain}",
            "value": dns_txt_value("ed25519", row["dkim_ed25519_public"]),
        })
    return records


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.endswith("_private")}


async def add_domain(db: Database, box: SecretBox, org: str, name: str, now: datetime,
                     *, verified: bool = False) -> dict[str, Any]:
    domain = normalize_domain(name)
    keys = await asyncio.to_thread(generate_dkim_keys)
    sel_rsa, sel_ed = _selectors(now)
    aad = domain.encode()
    content: dict[str, Any] = {
        "org": org,
        "domain": domain,
        "verified": verified,
        "verified_at": now if verified else None,
        "created_at": now,
        "dkim_selector_rsa": sel_rsa,
        "dkim_selector_ed25519": sel_ed,
        "dkim_rsa_public": keys.rsa_public_b64,
        "dkim_ed25519_public": keys.ed25519_public_b64,
        "dkim_rsa_private": box.seal(keys.rsa_private_pem, aad),
        "dkim_ed25519_private": box.seal(keys.ed25519_private_b64.encode(), aad),
        "last_verification": [],
        **{f: None for f in QUOTA_FIELDS},
    }
    try:
        results = await db.run(
            """BEGIN TRANSACTION;
            CREATE type::thing('domain', $domain) SET name = $domain, created_at = $now;
            RELATE (type::thing('organization', $org))->has_domain->(type::thing('domain', $domain))
              CONTENT $content;
            COMMIT TRANSACTION;""",
            {"domain": domain, "org": org, "now": now, "content": content},
        )
    except Conflict:
        raise Conflict(f"domain {domain} is already registered", field=["domain"]) from None
    return _public(results[-1][0])


async def get_domain(db: Database, org: str, name: str, *, with_keys: bool = False
                     ) -> dict[str, Any]:
    domain = normalize_domain(name)
    rows = await db.one(
        "SELECT * FROM has_domain WHERE org = $org AND domain = $domain LIMIT 1",
        {"org": org, "domain": domain},
    )
    if not rows:
        raise NotFound(f"domain {domain} is not a domain of this organization", field=["domain"])
    return rows[0] if with_keys else _public(rows[0])


async def list_domains(db: Database, org: str) -> list[dict[str, Any]]:
    rows = await db.one(
        "SELECT * FROM has_domain WHERE org = $org ORDER BY domain", {"org": org}
    )
    return [_public(r) for r in rows or []]


async def set_domain_quotas(db: Database, org: str, name: str,
                            quotas: dict[str, int | None]) -> dict[str, Any]:
    row = await get_domain(db, org, name)
    for key, value in quotas.items():
        if key not in QUOTA_FIELDS:
            raise ValidationError(f"unknown quota {key}", field=[key])
        if value is not None and value < 0:
            raise ValidationError(f"{key} must be >= 0", field=[key])
    rows = await db.one(
        "UPDATE type::thing('has_domain', $id) MERGE $quotas WHERE org = $org",
        {"id": row["id"], "quotas": quotas, "org": org},
    )
    return _public(rows[0])


def _dkim_p(text: str) -> str | None:
    tags = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = "".join(value.split())
    return tags.get("p")


async def verify_domain(db: Database, resolver: Any, org: str, name: str, now: datetime
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Look up each DKIM record; the domain is verified when every one is published."""
    row = await get_domain(db, org, name)
    checks = []
    for record in dns_records(row):
        expected_p = _dkim_p(record["value"])
        check: dict[str, Any] = {**record, "found": [], "ok": False, "error": None}
        try:
            found = list(await resolver.txt(record["name"]))
            check["found"] = found
            check["ok"] = any(_dkim_p(t) == expected_p for t in found)
            if not check["ok"]:
                check["error"] = "a TXT record exists but its p= does not match"
        except DnsNotFound:
            check["error"] = "no TXT record found"
        except DnsTemporary as exc:
            check["error"] = f"DNS lookup failed temporarily: {exc.message}"
        checks.append(check)
    ok = all(c["ok"] for c in checks)
    return await _record_verification(db, org, row, ok, now, checks), checks


async def force_verified(db: Database, org: str, name: str, now: datetime) -> dict[str, Any]:
    """Mark a domain verified without looking at DNS (development: `inbox domain verify
    --force`). Its last DNS checks are kept as they were."""
    row = await get_domain(db, org, name)
    return await _record_verification(db, org, row, True, now, row.get("last_verification"))


async def _record_verification(db: Database, org: str, row: dict[str, Any], ok: bool,
                               now: datetime, checks: Any) -> dict[str, Any]:
    """Once verified a domain stays verified; `checks` are stored as the last verification."""
    rows = await db.one(
        "UPDATE type::thing('has_domain', $id) SET verified = verified OR $ok,"
        " verified_at = IF $ok THEN $now ELSE verified_at END, last_verification = $checks"
        " WHERE org = $org",
        {"id": row["id"], "ok": ok, "now": now, "checks": checks or [], "org": org},
    )
    return _public(rows[0])


async def set_outbound_dnssec(db: Database, org: str, name: str, value: bool | None
                              ) -> dict[str, Any]:
    """The sending domain's override of SMTP_OUTBOUND_DNSSEC_VALIDATE (None: the default).
    Delivery workers pick it up within a minute."""
    row = await get_domain(db, org, name)
    rows = await db.one("UPDATE type::thing('has_domain', $id) SET outbound_dnssec_validate"
                        " = $value WHERE org = $org", {"id": row["id"], "value": value,
                                                       "org": org})
    return _public(rows[0])

