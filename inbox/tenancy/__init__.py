"""Tenancy: organizations, domains (+ per-domain overrides), API keys, quotas, DKIM keys."""

from inbox.tenancy.apikeys import (
    AuthCache,
    authenticate,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from inbox.tenancy.cache import TenantCache
from inbox.tenancy.domains import (
    add_domain,
    dns_records,
    get_domain,
    list_domains,
    normalize_domain,
    set_domain_quotas,
    verify_domain,
)
from inbox.tenancy.organizations import QUOTA_FIELDS, create_organization, get_organization
from inbox.tenancy.principal import SCOPES, Principal
from inbox.tenancy.quotas import effective_quotas

__all__ = [
    "QUOTA_FIELDS", "SCOPES", "AuthCache", "Principal", "TenantCache", "add_domain", "authenticate",
    "create_api_key",
    "create_organization", "dns_records", "effective_quotas", "get_domain", "get_organization",
    "list_api_keys", "list_domains", "normalize_domain", "revoke_api_key", "set_domain_quotas",
    "verify_domain",
]
