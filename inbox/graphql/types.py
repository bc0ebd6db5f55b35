"""GraphQL output and input types (strawberry), and conversions from stored rows."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

import strawberry
from strawberry.scalars import JSON

from inbox.errors import InboxError


@strawberry.enum
class ErrorCode(Enum):
    VALIDATION = "VALIDATION"
    INVALID_ADDRESS = "INVALID_ADDRESS"
    HEADER_INJECTION = "HEADER_INJECTION"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    DOMAIN_NOT_VERIFIED = "DOMAIN_NOT_VERIFIED"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    TEMPORARY_FAILURE = "TEMPORARY_FAILURE"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"
    RELAY_DENIED = "RELAY_DENIED"
    POLICY_REJECTED = "POLICY_REJECTED"
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    DECRYPTION_FAILED = "DECRYPTION_FAILED"
    INTERNAL = "INTERNAL"


@strawberry.type
class UserError:
    code: ErrorCode
    field: list[str] | None
    message: str
    limit: str | None = strawberry.field(
        default=None, description="For QUOTA_EXCEEDED: which limit was reached.")
    resets_at: datetime | None = strawberry.field(
        default=None, description="For QUOTA_EXCEEDED: when the limit's window resets.")

    @classmethod
    def of(cls, exc: InboxError) -> UserError:
        try:
            code = ErrorCode(exc.code)
        except ValueError:
            code = ErrorCode.INTERNAL
        resets = getattr(exc, "resets_at", None)
        return cls(code=code, field=exc.field, message=exc.message,
                   limit=getattr(exc, "limit", None),
                   resets_at=datetime.fromisoformat(resets) if resets else None)


@strawberry.enum
class RecipientStatus(Enum):
    QUEUED = "QUEUED"
    DEFERRED = "DEFERRED"
    DELIVERED = "DELIVERED"
    BOUNCED = "BOUNCED"
    EXPIRED = "EXPIRED"
    SUPPRESSED = "SUPPRESSED"


@strawberry.enum
class MessageStatus(Enum):
    QUEUED = "QUEUED"
    DEFERRED = "DEFERRED"
    SENDING = "SENDING"
    DELIVERED = "DELIVERED"
    PARTIALLY_DELIVERED = "PARTIALLY_DELIVERED"
    FAILED = "FAILED"
    SUPPRESSED = "SUPPRESSED"


@strawberry.enum
class ApiKeyScope(Enum):
    SEND = "send"
    READ = "read"
    ADMIN = "admin"


@strawberry.enum
class SuppressionScope(Enum):
    ADDRESS = "ADDRESS"
    DOMAIN = "DOMAIN"


@strawberry.type
class Recipient:
    address: str
    status: RecipientStatus
    attempts: int
    last_response: str | None
    next_attempt_at: datetime | None


@strawberry.type
class TlsInfo:
    """How the session of one delivery attempt was protected."""

    mx: str | None = strawberry.field(description="The MX host the attempt ended with.")
    used: bool = strawberry.field(description="A TLS session carried the transaction.")
    version: str | None
    cipher: str | None
    policy: str = strawberry.field(
        description="none, opportunistic, required, mta-sts or dane.")
    verified: bool = strawberry.field(description="The server was authenticated (DANE/PKIX).")
    reason: str | None = strawberry.field(description="Why TLS was not used or not verified.")

    @classmethod
    def of(cls, row: dict[str, Any] | None) -> TlsInfo | None:
        if not row:
            return None
        return cls(mx=row.get("mx"), used=bool(row.get("used")), version=row.get("version"),
                   cipher=row.get("cipher"), policy=row.get("policy") or "opportunistic",
                   verified=bool(row.get("verified")), reason=row.get("reason"))


@strawberry.type
class MessageEvent:
    type: str
    at: datetime
    recipient: str | None
    detail: str | None
    tls: TlsInfo | None = strawberry.field(
        default=None, description="TLS of the delivery attempt that produced this event.")


@strawberry.type
class Message:
    id: strawberry.ID
    message_id: str
    from_: str = strawberry.field(name="from")
    to: list[str]
    cc: list[str]
    subject: str
    status: MessageStatus
    created_at: datetime
    updated_at: datetime
    tags: list[str]
    metadata: JSON
    size: int
    # The QUEUED event, kept on the message row rather than as an event row (submission.py).
    queued_detail: strawberry.Private[str | None] = None

    @strawberry.field
    async def recipients(self, info: strawberry.Info) -> list[Recipient]:
        rows = await info.context.load_recipients(str(self.id))
        return [Recipient(address=r["address"], status=RecipientStatus(r["status"]),
                          attempts=r["attempts"], last_response=r.get("last_response"),
                          next_attempt_at=r.get("next_attempt_at")) for r in rows]

    @strawberry.field
    async def events(self, info: strawberry.Info) -> list[MessageEvent]:
        # Event rows (DEFERRED attempts; every event of mail stored before final events moved)
        # and each recipient's final event, kept on its row (delivery/queue.py), in time order.
        rows = list(await info.context.load_events(str(self.id)))
        # A final event leaves out the address, which its row has (older ones kept it).
        rows += [{"recipient": r["address"], **r["final_event"]}
                 for r in await info.context.load_recipients(str(self.id))
                 if r.get("final_event")]
        # Events of one completion share `at`; those go by recipient, wherever they are kept.
        rows.sort(key=lambda r: (r["at"], r.get("recipient") or ""))
        events = [MessageEvent(type=r["type"], at=r["at"], recipient=r.get("recipient"),
                               detail=r.get("detail"), tls=TlsInfo.of(r.get("tls")))
                  for r in rows]
        if self.queued_detail is not None:
            events.insert(0, MessageEvent(type="QUEUED", at=self.created_at, recipient=None,
                                          detail=self.queued_detail))
        return events

    @classmethod
    def of(cls, row: dict[str, Any]) -> Message:
        return cls(id=strawberry.ID(row["id"]), message_id=row["message_id"],
                   from_=row["from"], to=row.get("to", []), cc=row.get("cc", []),
                   subject=row["subject"], status=MessageStatus(row["status"]),
                   created_at=row["created_at"], updated_at=row["updated_at"],
                   tags=row.get("tags") or [], metadata=row.get("metadata") or {},  # type: ignore[arg-type]
                   size=row.get("size", 0), queued_detail=row.get("queued_detail"))


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class MessageEdge:
    cursor: str
    node: Message


@strawberry.type
class MessageConnection:
    edges: list[MessageEdge]
    page_info: PageInfo


@strawberry.type
class DnsRecord:
    type: str
    name: str
    value: str


@strawberry.type
class DnsRecordCheck:
    type: str
    name: str
    value: str
    ok: bool
    found: list[str]
    error: str | None


@strawberry.type
class DomainQuotas:
    max_recipients_per_message: int | None
    hourly_send_limit: int | None
    daily_send_limit: int | None
    max_queued_jobs: int | None


@strawberry.type(description="An organization's default limits for its domains. A null "
                  "value is not set: the server's INBOX_QUOTA_* setting applies. A domain's own "
                  "value (Domain.quotas) wins over these.")
class OrganizationQuotas:
    max_recipients_per_message: int | None
    hourly_send_limit: int | None
    daily_send_limit: int | None
    max_queued_jobs: int | None


@strawberry.type
class Organization:
    id: strawberry.ID
    name: str
    quotas: OrganizationQuotas

    @classmethod
    def of(cls, row: dict[str, Any]) -> Organization:
        return cls(id=strawberry.ID(row["id"]), name=row["name"], quotas=OrganizationQuotas(
            max_recipients_per_message=row.get("quota_max_recipients_per_message"),
            hourly_send_limit=row.get("quota_hourly_send_limit"),
            daily_send_limit=row.get("quota_daily_send_limit"),
            max_queued_jobs=row.get("quota_max_queued_jobs")))


@strawberry.type
class Domain:
    domain: str
    verified: bool
    verified_at: datetime | None
    created_at: datetime
    dkim_selectors: list[str]
    records: list[DnsRecord]
    quotas: DomainQuotas

    @classmethod
    def of(cls, row: dict[str, Any]) -> Domain:
        from inbox.tenancy import dns_records

        return cls(
            domain=row["domain"], verified=row["verified"], verified_at=row.get("verified_at"),
            created_at=row["created_at"],
            dkim_selectors=[s for s in (row.get("dkim_selector_rsa"),
                                        row.get("dkim_selector_ed25519")) if s],
            records=[DnsRecord(**r) for r in dns_records(row)],
            quotas=DomainQuotas(
                max_recipients_per_message=row.get("quota_max_recipients_per_message"),
                hourly_send_limit=row.get("quota_hourly_send_limit"),
                daily_send_limit=row.get("quota_daily_send_limit"),
                max_queued_jobs=row.get("quota_max_queued_jobs")),
        )


@strawberry.type
class ApiKey:
    id: strawberry.ID
    name: str
    scopes: list[ApiKeyScope]
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> ApiKey:
        return cls(id=strawberry.ID(row["id"]), name=row.get("name") or "",
                   scopes=[ApiKeyScope(s) for s in row["scopes"]], created_at=row["created_at"],
                   revoked_at=row.get("revoked_at"))


@strawberry.type
class Suppression:
    scope: SuppressionScope
    value: str
    reason: str | None
    source: str
    created_at: datetime
    expires_at: datetime | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> Suppression:
        return cls(scope=SuppressionScope(row["scope"]), value=row["value"],
                   reason=row.get("reason"), source=row.get("source", "manual"),
                   created_at=row["created_at"], expires_at=row.get("expires_at"))


@strawberry.type
class SuppressionEdge:
    cursor: str
    node: Suppression


@strawberry.type
class SuppressionConnection:
    edges: list[SuppressionEdge]
    page_info: PageInfo


@strawberry.input
class HeaderInput:
    name: str
    value: str


@strawberry.input
class AttachmentInput:
    filename: str
    content: str = strawberry.field(description="The file's bytes, base64-encoded.")
    content_type: str | None = None
    content_id: str | None = strawberry.field(
        default=None, description="Set to embed inline (cid:) in the HTML body.")


@strawberry.type
class Viewer:
    organization_id: strawberry.ID
    organization_name: str
    scopes: list[ApiKeyScope]


@strawberry.type
class SendEmailPayload:
    message: Message | None
    errors: list[UserError]


@strawberry.type
class CreateApiKeyPayload:
    api_key: ApiKey | None
    key: str | None = strawberry.field(description="The secret key. Shown only this once.")
    errors: list[UserError]


@strawberry.type
class ApiKeyPayload:
    api_key: ApiKey | None
    errors: list[UserError]


@strawberry.type
class DomainPayload:
    domain: Domain | None
    errors: list[UserError]


@strawberry.type
class OrganizationPayload:
    organization: Organization | None
    errors: list[UserError]


@strawberry.type
class VerifyDomainPayload:
    domain: Domain | None
    checks: list[DnsRecordCheck]
    errors: list[UserError]


@strawberry.type
class SuppressionPayload:
    suppression: Suppression | None
    errors: list[UserError]


@strawberry.type
class RemoveSuppressionPayload:
    removed: bool
    errors: list[UserError]
