"""Suppression lists, per organization (never global): addresses and whole domains."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from surrealdb import RecordID

from inbox.errors import NotFound, ValidationError
from inbox.storage import Database

SCOPES = ("ADDRESS", "DOMAIN")


def normalize_value(scope: str, value: str) -> str:
    from inbox.message import parse_address
    from inbox.tenancy.domains import normalize_domain

    if scope == "ADDRESS":
        return parse_address(value, "value").addr_spec.lower()
    if scope == "DOMAIN":
        return normalize_domain(value, field="value")
    raise ValidationError(f"scope must be one of {', '.join(SCOPES)}", field=["scope"])


async def add_suppression(db: Database, org: str, scope: str, value: str, reason: str,
                          now: datetime, *, expires_at: datetime | None = None,
                          source: str = "manual") -> dict[str, Any]:
    value = normalize_value(scope, value)
    if expires_at is not None and expires_at <= now:
        raise ValidationError("expiresAt must be in the future", field=["expiresAt"])
    rows = await db.one(
        "UPSERT type::thing('suppression', [$org, $scope, $value]) CONTENT {"
        " org: $org, scope: $scope, target: $value, reason: $reason, source: $source,"
        " created_at: $now, expires_at: $expires }",
        {"org": org, "scope": scope, "value": value, "reason": reason[:500],
         "source": source, "now": now, "expires": expires_at},
    )
    return _row(rows[0])


async def remove_suppression(db: Database, org: str, scope: str, value: str) -> bool:
    value = normalize_value(scope, value)
    rows = await db.one(
        "DELETE type::thing('suppression', [$org, $scope, $value]) RETURN BEFORE",
        {"org": org, "scope": scope, "value": value},
    )
    if not rows:
        raise NotFound(f"no {scope.lower()} suppression for {value}", field=["value"])
    return True


async def list_suppressions(db: Database, org: str, now: datetime, *, limit: int,
                            after: str | None = None) -> list[dict[str, Any]]:
    rows = await db.one(
        "SELECT * FROM suppression WHERE org = $org AND (expires_at = NONE OR expires_at > $now)"
        " AND ($after = NONE OR created_at < $after_at OR"
        " (created_at = $after_at AND target > $after_value))"
        " ORDER BY created_at DESC, target LIMIT $limit",
        {"org": org, "now": now, "limit": limit, **_cursor(after)},
    )
    return [_row(r) for r in rows or []]


def _cursor(after: str | None) -> dict[str, Any]:
    if not after:
        return {"after": None, "after_at": None, "after_value": None}
    at, _, value = after.partition("|")
    return {"after": after, "after_at": datetime.fromisoformat(at), "after_value": value}


def cursor_of(row: dict[str, Any]) -> str:
    return f"{row['created_at'].isoformat()}|{row['value']}"


def _row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("id", "target")}
    out["value"] = row["target"]
    return out


# Active suppressions among record ids from `suppression_ids` (direct lookups, no scan).
SUPPRESSED_SQL = "SELECT target, reason FROM $ids WHERE expires_at = NONE OR expires_at > $now"


def suppression_ids(org: str, recipients: Iterable[Any]) -> list[RecordID]:
    """The suppression records that would block these recipients (address and domain)."""
    ids = []
    for addr in recipients:
        ids.append(RecordID("suppression", [org, "ADDRESS", addr.addr_spec.lower()]))
        ids.append(RecordID("suppression", [org, "DOMAIN", addr.ascii_domain]))
    return ids
