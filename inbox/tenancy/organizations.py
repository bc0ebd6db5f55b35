"""Organizations (tenants): creation, lookup and their quota defaults.

An organization's quota fields (QUOTA_FIELDS) are the defaults of its domains: a domain's own
value (has_domain) wins, an unset one falls back to the organization's, and an unset
organization value to the server's INBOX_QUOTA_* setting (quotas.effective_quotas).
"""

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


def check_quotas(quotas: dict[str, int | None]) -> None:
    """ValidationError for a name that is not a quota field or a negative limit."""
    for key, value in quotas.items():
        if key not in QUOTA_FIELDS:
            raise ValidationError(f"unknown quota {key}", field=[key])
        if value is not None and value < 0:
            raise ValidationError(f"{key} must be >= 0", field=[key])


async def set_organization_quotas(db: Database, org: str, quotas: dict[str, int | None]
                                  ) -> dict[str, Any]:
    """Set the organization's default quotas; None clears one (the server setting applies).
    Quota fields not in `quotas` are left as they are."""
    check_quotas(quotas)
    rows = await db.one("UPDATE type::thing('organization', $id) MERGE $quotas",
                        {"id": org, "quotas": quotas})
    if not rows:
        raise NotFound(f"organization {org} not found")
    return rows[0]
