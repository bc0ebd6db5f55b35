"""One error hierarchy for inbox: stable codes, temporary vs permanent, SMTP and GraphQL mapping.

Every error raised on purpose by inbox code derives from `InboxError`. The edges (SMTP hooks,
the worker loop, the GraphQL result) turn it into a reply; nothing else catches broadly.
"""

from __future__ import annotations

from typing import ClassVar


class InboxError(Exception):
    """Base error. `code` is stable (it is part of the GraphQL contract)."""

    code: ClassVar[str] = "INTERNAL"
    temporary: ClassVar[bool] = False
    # RFC 3463 enhanced status code used when this error becomes an SMTP reply.
    smtp_enhanced: ClassVar[str] = "5.3.0"

    def __init__(self, message: str, *, field: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def smtp_reply(self) -> str:
        basic = 451 if self.temporary else 550
        enhanced = self.smtp_enhanced
        if self.temporary and enhanced.startswith("5"):
            enhanced = "4" + enhanced[1:]
        return f"{basic} {enhanced} {self.message}"


class ValidationError(InboxError):
    code = "VALIDATION"
    smtp_enhanced = "5.6.0"


class UnencodableText(ValidationError):
    """Text that cannot be encoded as UTF-8 (a lone surrogate): the client's input, never a
    fault of ours, so permanent. The GraphQL boundary refuses it naming the argument; the
    database gateway raises this for any that gets past (it cannot name the field)."""


class InvalidAddress(ValidationError):
    code = "INVALID_ADDRESS"
    smtp_enhanced = "5.1.3"


class HeaderInjection(ValidationError):
    code = "HEADER_INJECTION"


class MessageTooLarge(ValidationError):
    code = "MESSAGE_TOO_LARGE"
    smtp_enhanced = "5.3.4"


class Unauthenticated(InboxError):
    code = "UNAUTHENTICATED"
    smtp_enhanced = "5.7.8"


class Forbidden(InboxError):
    code = "FORBIDDEN"
    smtp_enhanced = "5.7.1"


class RelayDenied(Forbidden):
    """A recipient at a domain we do not host: we are not an open relay (RFC 5321 §3.6.2)."""

    code = "RELAY_DENIED"


class PolicyRejected(Forbidden):
    """Mail refused by authentication policy (DMARC p=reject, SMTP_REQUIRE_*_PASS)."""

    code = "POLICY_REJECTED"


class RateLimited(InboxError):
    """Too many connections or messages from one source; try later (RFC 3463 X.7.0)."""

    code = "RATE_LIMITED"
    temporary = True
    smtp_enhanced = "4.7.0"


class NotFound(InboxError):
    code = "NOT_FOUND"
    smtp_enhanced = "5.1.1"


class Conflict(InboxError):
    code = "CONFLICT"


class DomainNotVerified(Forbidden):
    code = "DOMAIN_NOT_VERIFIED"


class IdempotencyConflict(Conflict):
    code = "IDEMPOTENCY_CONFLICT"


class QuotaExceeded(InboxError):
    """A per-domain or per-organization limit; `limit` names it, `resets_at` says when."""

    code = "QUOTA_EXCEEDED"
    temporary = True
    smtp_enhanced = "4.7.0"

    def __init__(self, message: str, *, limit: str, resets_at: str | None = None,
                 field: list[str] | None = None) -> None:
        super().__init__(message, field=field)
        self.limit = limit
        self.resets_at = resets_at


class TemporaryFailure(InboxError):
    code = "TEMPORARY_FAILURE"
    temporary = True
    smtp_enhanced = "4.3.0"


class StorageUnavailable(TemporaryFailure):
    code = "STORAGE_UNAVAILABLE"


class DnsTemporary(TemporaryFailure):
    """DNS answer could not be had now (timeout, SERVFAIL); retry later."""

    code = "DNS_TEMPORARY"
    smtp_enhanced = "4.4.3"


class DnsNotFound(InboxError):
    """NXDOMAIN or no records of the asked type."""

    code = "DNS_NOT_FOUND"
    smtp_enhanced = "5.1.2"


class ConfigError(InboxError):
    """Bad settings; the message names the variable."""

    code = "CONFIG"
