"""Quota limits: per-domain overrides on has_domain, else organization defaults, else settings."""

from __future__ import annotations

from typing import Any

from inbox.tenancy.organizations import QUOTA_FIELDS


def effective_quotas(settings: Any, org_row: dict[str, Any], domain_row: dict[str, Any]
                     ) -> dict[str, int]:
    limits = {}
    for name in QUOTA_FIELDS:
        value = domain_row.get(name)
        if value is None:
            value = org_row.get(name)
        if value is None:
            value = getattr(settings, "INBOX_" + name.upper())
        limits[name] = int(value)
    return limits
