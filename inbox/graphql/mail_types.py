"""GraphQL types for received mail: mailboxes, aliases, per-domain inbound settings and inbound
messages, built from stored rows. Message bodies, headers, attachment bytes and the raw source
are fetched from the blob store only when a query asks for them."""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime
from enum import Enum
from typing import Any

import strawberry

from inbox.graphql.types import PageInfo, UserError
from inbox.storage.mailstore import e2ee_aad
from inbox.storage.mimeparse import ParsedMessage, parse_inbound
from inbox.tenancy.mailboxes import list_aliases

# Bigger messages are parsed off the event loop (same bound as the SMTP side uses).
PARSE_INLINE_BYTES = 256 * 1024


def b64(data: bytes | str | None) -> str | None:
    if data is None:
        return None
    if isinstance(data, str):
        return data  # already base64 text (as the envelope module stores wrapped keys)
    return base64.b64encode(bytes(data)).decode("ascii")


@strawberry.enum(description="Where an inbound message is filed.")
class InboundFolder(Enum):
    INBOX = "INBOX"
    SPAM = "SPAM"
    TRASH = "TRASH"


@strawberry.enum(description="How a domain's inbound mail is stored.")
class EncryptionMode(Enum):
    STANDARD = strawberry.enum_value(
        "standard", description="Encrypted at rest under the organization's storage key; the "
        "API can show subject, bodies and headers.")
    E2EE = strawberry.enum_value(
        "e2ee", description="Encrypted to the organization's registered X25519 public key; "
        "the server keeps no subject or bodies and returns only ciphertext.")


@strawberry.type(description="An address that delivers to a mailbox.")
class Alias:
    id: strawberry.ID
    address: str
    mailbox_id: strawberry.ID
    created_at: datetime

    @classmethod
    def of(cls, row: dict[str, Any]) -> Alias:
        return cls(id=strawberry.ID(row["id"]), address=row["address"],
                   mailbox_id=strawberry.ID(row["mailbox"]), created_at=row["created_at"])


@strawberry.type(description="A mailbox that receives mail at one address of a hosted domain.")
class Mailbox:
    id: strawberry.ID
    address: str
    domain: str
    name: str
    created_at: datetime
    org: strawberry.Private[str]

    @strawberry.field(description="Aliases that deliver to this mailbox.")
    async def aliases(self, info: strawberry.Info) -> list[Alias]:
        rows = await list_aliases(info.context.services.db, self.org, str(self.id))
        return [Alias.of(r) for r in rows]

    @classmethod
    def of(cls, row: dict[str, Any]) -> Mailbox:
        return cls(id=strawberry.ID(row["id"]), address=row["address"], domain=row["domain"],
                   name=row.get("name") or "", created_at=row["created_at"], org=row["org"])


@strawberry.type(description="A hosted domain's receiving settings.")
class DomainInbound:
    domain: str
    inbound: bool = strawberry.field(description="Whether the domain accepts mail on port 25.")
    plus_addressing: bool = strawberry.field(
        description="Whether local+tag@domain reaches local@domain.")
    catch_all_mailbox: strawberry.ID | None = strawberry.field(
        description="Mailbox that gets mail for unknown addresses; null: they are refused.")
    enc_mode: EncryptionMode
    require_spf_pass: bool | None = strawberry.field(
        description="Refuse mail without SPF pass; null: the server default applies.")
    require_dkim_pass: bool | None = strawberry.field(
        description="Refuse mail without a passing DKIM signature; null: the server default.")
    require_dmarc_pass: bool | None = strawberry.field(
        description="Refuse mail without DMARC pass; null: the server default applies.")

    @classmethod
    def of(cls, view: dict[str, Any]) -> DomainInbound:
        catch_all = view.get("catch_all")
        return cls(domain=view["domain"], inbound=view["inbound"],
                   plus_addressing=view["plus_addressing"],
                   catch_all_mailbox=strawberry.ID(catch_all) if catch_all else None,
                   enc_mode=EncryptionMode(view["enc_mode"]),
                   require_spf_pass=view.get("require_spf_pass"),
                   require_dkim_pass=view.get("require_dkim_pass"),
                   require_dmarc_pass=view.get("require_dmarc_pass"))


@strawberry.type
class InboundHeader:
    name: str
    value: str


@strawberry.type(description="One DKIM signature's result (RFC 6376).")
class DkimVerdict:
    result: str = strawberry.field(
        description="pass, fail, neutral, policy, temperror, permerror or none.")
    domain: str | None
    selector: str | None
    algorithm: str | None
    reason: str | None


@strawberry.type(description="What the receiving server concluded about the sender.")
class InboundAuthentication:
    spf: str | None = strawberry.field(description="SPF result (RFC 7208 §2.6).")
    spf_domain: str | None
    dkim: list[DkimVerdict]
    dmarc: str | None = strawberry.field(description="DMARC result (RFC 7489).")
    dmarc_policy: str | None
    dmarc_disposition: str | None
    header_from_domain: str | None
    arc: str | None = strawberry.field(description="ARC chain validation (RFC 8617).")
    header: str | None = strawberry.field(
        description="The Authentication-Results header we added (RFC 8601).")

    @classmethod
    def of(cls, auth: dict[str, Any]) -> InboundAuthentication:
        return cls(spf=auth.get("spf"), spf_domain=auth.get("spf_domain"),
                   dkim=[DkimVerdict(result=d.get("result") or "none", domain=d.get("domain"),
                                     selector=d.get("selector"),
                                     algorithm=d.get("algorithm"), reason=d.get("reason"))
                         for d in auth.get("dkim") or []],
                   dmarc=auth.get("dmarc"), dmarc_policy=auth.get("dmarc_policy"),
                   dmarc_disposition=auth.get("dmarc_disposition"),
                   header_from_domain=auth.get("header_from_domain"), arc=auth.get("arc"),
                   header=auth.get("header"))


@strawberry.type
class SpamVerdict:
    verdict: str = strawberry.field(description="spam or ham.")
    reasons: list[str]


class _Loaded:
    """The message's blob, fetched and parsed at most once per query, however many fields
    ask (they resolve concurrently)."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self._lock = asyncio.Lock()
        self._raw: bytes | None = None
        self._parsed: ParsedMessage | None = None

    async def raw(self, info: strawberry.Info) -> bytes:
        async with self._lock:
            if self._raw is None:
                self._raw = await info.context.services.mailstore.raw(self.row["org"],
                                                                      self.row)
            return self._raw

    async def parsed(self, info: strawberry.Info) -> ParsedMessage:
        raw = await self.raw(info)
        async with self._lock:
            if self._parsed is None:
                if len(raw) > PARSE_INLINE_BYTES:
                    self._parsed = await asyncio.to_thread(parse_inbound, raw)
                else:
                    self._parsed = parse_inbound(raw)
            return self._parsed


@strawberry.type(description="A file attached to (or embedded in) an inbound message.")
class InboundAttachment:
    part_id: str
    filename: str | None = strawberry.field(description="Null for end-to-end encrypted mail.")
    content_type: str | None = strawberry.field(
        description="Null for end-to-end encrypted mail.")
    content_id: str | None
    inline: bool
    size: int = strawberry.field(description="Size of the decoded content in bytes.")
    row: strawberry.Private[dict[str, Any]]

    @strawberry.field(description="The bytes, base64-encoded; fetched only when asked for. For "
                      "end-to-end encrypted mail: the ciphertext.")
    async def content(self, info: strawberry.Info) -> str:
        data = await info.context.services.mailstore.attachment(self.row["org"], self.row,
                                                                self.part_id)
        return b64(data) or ""

    @strawberry.field(description="End-to-end encrypted mail: the additional authenticated "
                      "data (UTF-8) the content was sealed with. Null otherwise.")
    def e2ee_aad(self) -> str | None:
        if self.row.get("enc_mode") != "e2ee":
            return None
        return e2ee_aad(self.row["id"], self.part_id)


@strawberry.type(description="Messages of one mailbox linked by Message-ID, In-Reply-To and "
                 "References (RFC 5322 §3.6.4).")
class InboundThread:
    id: strawberry.ID
    org: strawberry.Private[str]

    @strawberry.field(description="Oldest first.")
    async def messages(self, info: strawberry.Info) -> list[InboundMessage]:
        rows = await info.context.services.mailstore.thread(self.org, str(self.id))
        return [InboundMessage.of(r) for r in rows]


@strawberry.type(description="A received message. For end-to-end encrypted mail, subject, "
                 "snippet, headers, text and html are null; `raw` is the ciphertext and "
                 "`wrappedKey` the data key wrapped to the organization's public key.")
class InboundMessage:
    id: strawberry.ID
    mailbox: strawberry.ID
    folder: InboundFolder
    read: bool
    starred: bool
    received_at: datetime
    size: int = strawberry.field(description="Size of the stored message in bytes.")
    enc_mode: EncryptionMode
    message_id: str | None = strawberry.field(description="The Message-ID header.")
    in_reply_to: str | None
    references: list[str]
    thread_id: strawberry.ID
    from_: str | None = strawberry.field(name="from", description="The From header's address.")
    from_name: str | None
    to: list[str]
    cc: list[str]
    date: str | None = strawberry.field(description="The Date header as sent.")
    subject: str | None
    snippet: str | None
    mail_from: str = strawberry.field(description="The SMTP envelope sender (MAIL FROM).")
    rcpt_to: list[str] = strawberry.field(description="The SMTP envelope recipients.")
    helo: str
    peer_ip: str
    tls: bool
    row: strawberry.Private[dict[str, Any]]
    loaded: strawberry.Private[_Loaded]

    @property
    def e2ee(self) -> bool:
        return self.enc_mode is EncryptionMode.E2EE

    @strawberry.field(description="The Authentication-Results verdicts; null if none recorded.")
    def authentication(self) -> InboundAuthentication | None:
        auth = self.row.get("auth") or {}
        return InboundAuthentication.of(auth) if auth else None

    @strawberry.field
    def spam(self) -> SpamVerdict | None:
        spam = self.row.get("spam") or {}
        if not spam:
            return None
        return SpamVerdict(verdict=spam.get("verdict") or "ham",
                           reasons=list(spam.get("reasons") or []))

    @strawberry.field(description="Every header field in order (parsed from the stored message).")
    async def headers(self, info: strawberry.Info) -> list[InboundHeader] | None:
        if self.e2ee:
            return None
        parsed = await self.loaded.parsed(info)
        return [InboundHeader(name=n, value=v) for n, v in parsed.headers]

    @strawberry.field(description="The text/plain body.")
    async def text(self, info: strawberry.Info) -> str | None:
        return None if self.e2ee else (await self.loaded.parsed(info)).text or None

    @strawberry.field(description="The text/html body (not sanitised: render it sandboxed).")
    async def html(self, info: strawberry.Info) -> str | None:
        return None if self.e2ee else (await self.loaded.parsed(info)).html or None

    @strawberry.field(description="The stored message, base64-encoded (RFC 5322 source; for "
                      "end-to-end encrypted mail the ciphertext).")
    async def raw(self, info: strawberry.Info) -> str:
        return b64(await self.loaded.raw(info)) or ""

    @strawberry.field(description="End-to-end encrypted mail: the message's data key wrapped "
                      "to the organization's X25519 public key, base64. Null otherwise.")
    def wrapped_key(self) -> str | None:
        return b64(self.row.get("wrapped_key")) if self.e2ee else None

    @strawberry.field(description="End-to-end encrypted mail: the additional authenticated "
                      "data (UTF-8) `raw` was sealed with; pass it to decryption. Null "
                      "otherwise.")
    def e2ee_aad(self) -> str | None:
        return e2ee_aad(str(self.id)) if self.e2ee else None

    @strawberry.field
    def attachments(self) -> list[InboundAttachment]:
        return [InboundAttachment(part_id=a["part_id"], filename=a.get("filename"),
                                  content_type=a.get("content_type"),
                                  content_id=a.get("content_id") or None,
                                  inline=bool(a.get("inline")), size=a.get("size", 0), row=self.row)
                for a in self.row.get("attachments") or []]

    @strawberry.field
    def thread(self) -> InboundThread:
        return InboundThread(id=self.thread_id, org=self.row["org"])

    @classmethod
    def of(cls, row: dict[str, Any]) -> InboundMessage:
        def text(name: str) -> str | None:
            return row.get(name) or None

        return cls(
            id=strawberry.ID(row["id"]), mailbox=strawberry.ID(row["mailbox"]),
            folder=InboundFolder(row["folder"]), read=bool(row.get("read")),
            starred=bool(row.get("starred")), received_at=row["received_at"],
            size=row.get("size", 0), enc_mode=EncryptionMode(row.get("enc_mode") or "standard"),
            message_id=text("message_id_header"), in_reply_to=text("in_reply_to"),
            references=list(row.get("references") or []),
            thread_id=strawberry.ID(row.get("thread") or row["id"]),
            from_=text("from_address"), from_name=text("from_name"),
            to=list(row.get("to") or []), cc=list(row.get("cc") or []), date=text("date"),
            subject=row.get("subject"), snippet=row.get("snippet"),
            mail_from=row.get("mail_from") or "", rcpt_to=list(row.get("rcpt_to") or []),
            helo=row.get("helo") or "", peer_ip=row.get("peer_ip") or "",
            tls=bool(row.get("tls")), row=row, loaded=_Loaded(row))


@strawberry.type
class InboundMessageEdge:
    cursor: str
    node: InboundMessage


@strawberry.type
class InboundMessageConnection:
    edges: list[InboundMessageEdge]
    page_info: PageInfo


@strawberry.type
class MailboxPayload:
    mailbox: Mailbox | None
    errors: list[UserError]


@strawberry.type
class AliasPayload:
    alias: Alias | None
    errors: list[UserError]


@strawberry.type
class RemoveAliasPayload:
    removed: bool
    errors: list[UserError]


@strawberry.type
class DomainInboundPayload:
    settings: DomainInbound | None
    errors: list[UserError]


@strawberry.type
class E2eePublicKeyPayload:
    public_key: str | None = strawberry.field(description="The stored key, base64 (32 bytes).")
    errors: list[UserError]


@strawberry.type
class InboundMessagePayload:
    message: InboundMessage | None
    errors: list[UserError]


@strawberry.type
class DeleteInboundMessagePayload:
    deleted: bool
    errors: list[UserError]
