"""Organizations (tenants): creation, lookup and their quota defaults."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from inbox.errors import NotFound, ValidationError
from inbox.storage import Database, new_id

QUOTA_FIELDS = (
    "quota_max_recipients_per_message",
    "quota_hourly_send_limit",
    "quota_daily_send_limit",
    "quota_max_queued_jobs",
)


async def create_organization(db: Database, name: str, now: datetime) -> dict[str, Any]:
    name = name.strip()
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise ValidationError("organization name must be 1-200 printable characters",
                              field=["name"])
    org_id = new_id("org")
    rows = await db.one(
        "CREATE type::thing('organization', $id) SET name = $name, created_at = $now",
        {"id": org_id, "name": name, "now": now},
    )
    return rows[0]


async def get_organization(db: Database, org: str) -> dict[str, Any]:
    row = await db.one("SELECT * FROM ONLY type::thing('organization', $id)", {"id": org})
    if not row:
        raise NotFound(f"organization {org} not found")
    return row
