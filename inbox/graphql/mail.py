"""GraphQL fields for receiving mail: mailboxes, aliases, catch-all and per-domain inbound
settings, the end-to-end public key, reading/flagging/moving/deleting inbound messages, threads
and the live `inboundMessageReceived` subscription. Storage and policy live in the service layer
(inbox.tenancy.mailboxes, inbox.tenancy.orgkeys, inbox.storage.mailstore).

Scopes: reading mail and settings needs `read`; changing flags and folders needs `read`;
deleting a message forever and changing mailboxes, aliases, inbound settings or the public key
needs `admin`. Every read and change is scoped to the caller's organization: another tenant's
ids behave exactly like ids that do not exist (NOT_FOUND, or null).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated, Any

import strawberry
from graphql import GraphQLError

from inbox.errors import InboxError, NotFound, ValidationError
from inbox.graphql.mail_types import (
    Alias,
    AliasPayload,
    DeleteInboundMessagePayload,
    DomainInbound,
    DomainInboundPayload,
    E2eePublicKeyPayload,
    EncryptionMode,
    InboundFolder,
    InboundMessage,
    InboundMessageConnection,
    InboundMessageEdge,
    InboundMessagePayload,
    InboundThread,
    Mailbox,
    MailboxPayload,
    RemoveAliasPayload,
)
from inbox.graphql.schema import _page_size, _payload
from inbox.graphql.types import PageInfo, UserError
from inbox.tenancy import mailboxes as mbx
from inbox.tenancy import orgkeys


def _inbound_topic(org: str, mailbox: str) -> str:
    # Imported late: the SMTP side (and its DNS/DKIM stack) is not needed to build the schema.
    from inbox.smtp.receiving import inbound_topic

    return inbound_topic(org, mailbox)


async def _message(info: strawberry.Info, org: str, message_id: str) -> InboundMessage | None:
    try:
        row = await info.context.services.mailstore.get(org, message_id)
    except NotFound:
        return None
    return InboundMessage.of(row)


@strawberry.type
class MailQuery:
    @strawberry.field(description="The organization's mailboxes, by address. Scope: read.")
    async def mailboxes(self, info: strawberry.Info) -> list[Mailbox]:
        p = await info.context.principal("read")
        return [Mailbox.of(r) for r in await mbx.list_mailboxes(info.context.services.db, p.org)]

    @strawberry.field(description="One mailbox, or null. Scope: read.")
    async def mailbox(self, info: strawberry.Info, id: strawberry.ID) -> Mailbox | None:
        p = await info.context.principal("read")
        try:
            return Mailbox.of(await mbx.get_mailbox(info.context.services.db, p.org, str(id)))
        except NotFound:
            return None

    @strawberry.field(description="The organization's aliases (of one mailbox if given), by "
                      "address. Scope: read.")
    async def aliases(self, info: strawberry.Info, mailbox: strawberry.ID | None = None
                      ) -> list[Alias]:
        p = await info.context.principal("read")
        rows = await mbx.list_aliases(info.context.services.db, p.org,
                                      None if mailbox is None else str(mailbox))
        return [Alias.of(r) for r in rows]

    @strawberry.field(description="A domain's receiving settings (catch-all, plus addressing, "
                      "encryption, authentication requirements), or null. Scope: read.")
    async def domain_inbound(self, info: strawberry.Info, domain: str) -> DomainInbound | None:
        p = await info.context.principal("read")
        try:
            return DomainInbound.of(await mbx.domain_inbound(info.context.services.db, p.org,
                                                             domain))
        except (NotFound, ValidationError):
            return None

    @strawberry.field(description="The registered X25519 public key (base64) that end-to-end "
                      "encrypted mail is encrypted to, or null. Scope: read.")
    async def e2ee_public_key(self, info: strawberry.Info) -> str | None:
        p = await info.context.principal("read")
        return await orgkeys.e2ee_public_key(info.context.services.db, p.org)

    @strawberry.field(description="A mailbox's messages in one folder, newest first. `from` "
                      "matches part of the sender address; `search` part of the subject, "
                      "snippet or sender (not available for end-to-end encrypted mail). A "
                      "mailbox of another organization is NOT_FOUND. Scope: read.")
    async def inbound_messages(
        self, info: strawberry.Info, mailbox: strawberry.ID,
        folder: InboundFolder = InboundFolder.INBOX, unread: bool | None = None,
        starred: bool | None = None,
        from_: Annotated[str | None, strawberry.argument(name="from")] = None,
        search: str | None = None, first: int | None = 20, after: str | None = None,
    ) -> InboundMessageConnection:
        p = await info.context.principal("read")
        size = _page_size(first)
        services = info.context.services
        await mbx.get_mailbox(services.db, p.org, str(mailbox))
        rows = await services.mailstore.list_messages(
            p.org, str(mailbox), folder=folder.value, unread=unread, starred=starred,
            from_address=from_, search=search, first=size, after=after)
        edges = [InboundMessageEdge(cursor=r["id"], node=InboundMessage.of(r))
                 for r in rows[:size]]
        return InboundMessageConnection(edges=edges, page_info=PageInfo(
            has_next_page=len(rows) > size, end_cursor=edges[-1].cursor if edges else None))

    @strawberry.field(description="One inbound message, or null. Scope: read.")
    async def inbound_message(self, info: strawberry.Info, id: strawberry.ID
                              ) -> InboundMessage | None:
        p = await info.context.principal("read")
        return await _message(info, p.org, str(id))

    @strawberry.field(description="A conversation by thread id (InboundMessage.threadId); null "
                      "when it has no visible message. Scope: read.")
    async def inbound_thread(self, info: strawberry.Info, id: strawberry.ID
                             ) -> InboundThread | None:
        p = await info.context.principal("read")
        rows = await info.context.services.mailstore.thread(p.org, str(id))
        return InboundThread(id=id, org=p.org) if rows else None


@strawberry.type
class DomainOutboundTlsPayload:
    domain: str | None
    dnssec_validate: bool | None = strawberry.field(
        description="The override; null: SMTP_OUTBOUND_DNSSEC_VALIDATE applies.")
    errors: list[UserError]


@strawberry.type
class MailMutation:
    @strawberry.mutation(description="Create a mailbox at localPart@domain (a domain of this "
                         "organization). Scope: admin.")
    async def create_mailbox(self, info: strawberry.Info, domain: str, local_part: str,
                             name: str | None = None) -> MailboxPayload:
        async def run() -> MailboxPayload:
            p = await info.context.principal("admin")
            s = info.context.services
            row = await mbx.create_mailbox(s.db, p.org, domain, local_part, s.clock(),
                                           name=name or "")
            return MailboxPayload(mailbox=Mailbox.of(row), errors=[])

        return await _payload(run, lambda e: MailboxPayload(mailbox=None, errors=e))

    @strawberry.mutation(description="Deliver mail for `address` (on a domain of this "
                         "organization) to `mailbox`. Scope: admin.")
    async def add_alias(self, info: strawberry.Info, address: str, mailbox: strawberry.ID
                        ) -> AliasPayload:
        async def run() -> AliasPayload:
            p = await info.context.principal("admin")
            s = info.context.services
            row = await mbx.add_alias(s.db, p.org, address, str(mailbox), s.clock())
            return AliasPayload(alias=Alias.of(row), errors=[])

        return await _payload(run, lambda e: AliasPayload(alias=None, errors=e))

    @strawberry.mutation(description="Stop delivering mail for an alias address. Scope: admin.")
    async def remove_alias(self, info: strawberry.Info, address: str) -> RemoveAliasPayload:
        async def run() -> RemoveAliasPayload:
            p = await info.context.principal("admin")
            if not await mbx.remove_alias(info.context.services.db, p.org, address):
                raise NotFound(f"alias {address} not found", field=["address"])
            return RemoveAliasPayload(removed=True, errors=[])

        return await _payload(run, lambda e: RemoveAliasPayload(removed=False, errors=e))

    @strawberry.mutation(description="Change a domain's receiving settings. An omitted argument "
                         "is left unchanged; null clears catchAllMailbox and sets a require* "
                         "override back to the server default. encMode E2EE needs a public key "
                         "registered first (setE2eePublicKey). Scope: admin.")
    async def set_domain_inbound(
        self, info: strawberry.Info, domain: str,
        inbound: bool | None = strawberry.UNSET,
        plus_addressing: bool | None = strawberry.UNSET,
        catch_all_mailbox: strawberry.ID | None = strawberry.UNSET,
        enc_mode: EncryptionMode | None = strawberry.UNSET,
        require_spf_pass: bool | None = strawberry.UNSET,
        require_dkim_pass: bool | None = strawberry.UNSET,
        require_dmarc_pass: bool | None = strawberry.UNSET,
    ) -> DomainInboundPayload:
        async def run() -> DomainInboundPayload:
            p = await info.context.principal("admin")
            changes: dict[str, Any] = {}
            for key, arg, value, nullable in (
                ("inbound", "inbound", inbound, False),
                ("plus_addressing", "plusAddressing", plus_addressing, False),
                ("catch_all", "catchAllMailbox", catch_all_mailbox, True),
                ("enc_mode", "encMode", enc_mode, False),
                ("require_spf_pass", "requireSpfPass", require_spf_pass, True),
                ("require_dkim_pass", "requireDkimPass", require_dkim_pass, True),
                ("require_dmarc_pass", "requireDmarcPass", require_dmarc_pass, True),
            ):
                if value is strawberry.UNSET:
                    continue
                if value is None and not nullable:
                    raise ValidationError(f"{arg} cannot be null", field=[arg])
                changes[key] = value.value if isinstance(value, EncryptionMode) else (
                    str(value) if key == "catch_all" and value is not None else value)
            if changes.get("catch_all") == "":
                raise ValidationError("catchAllMailbox must be a mailbox id or null",
                                      field=["catchAllMailbox"])
            try:
                view = await mbx.set_inbound_settings(info.context.services.db, p.org, domain,
                                                      changes)
            except NotFound as exc:
                if exc.field == ["mailbox"]:  # the catch-all target
                    raise NotFound(exc.message, field=["catchAllMailbox"]) from None
                raise
            return DomainInboundPayload(settings=DomainInbound.of(view), errors=[])

        return await _payload(run, lambda e: DomainInboundPayload(settings=None, errors=e))

    @strawberry.mutation(description="Whether delivery from this sending domain trusts DNSSEC "
                         "(DANE needs it): true/false override the server's "
                         "SMTP_OUTBOUND_DNSSEC_VALIDATE, null goes back to it. Workers apply a "
                         "change within a minute. Scope: admin.")
    async def set_domain_outbound_tls(self, info: strawberry.Info, domain: str,
                                      dnssec_validate: bool | None) -> DomainOutboundTlsPayload:
        async def run() -> DomainOutboundTlsPayload:
            from inbox.tenancy.domains import set_outbound_dnssec

            p = await info.context.principal("admin")
            row = await set_outbound_dnssec(info.context.services.db, p.org, domain,
                                            dnssec_validate)
            return DomainOutboundTlsPayload(domain=row["domain"], dnssec_validate=row.get(
                "outbound_dnssec_validate"), errors=[])

        return await _payload(run, lambda e: DomainOutboundTlsPayload(
            domain=None, dnssec_validate=None, errors=e))

    @strawberry.mutation(description="Register the X25519 public key (base64 of 32 bytes) that "
                         "end-to-end encrypted mail is encrypted to. Scope: admin.")
    async def set_e2ee_public_key(self, info: strawberry.Info, public_key: str
                                  ) -> E2eePublicKeyPayload:
        async def run() -> E2eePublicKeyPayload:
            p = await info.context.principal("admin")
            row = await orgkeys.set_e2ee_public_key(info.context.services.db, p.org, public_key)
            return E2eePublicKeyPayload(public_key=row["e2ee_public_key"], errors=[])

        return await _payload(run, lambda e: E2eePublicKeyPayload(public_key=None, errors=e))

    @strawberry.mutation(description="Mark a message read/unread and/or starred/unstarred; an "
                         "omitted flag is unchanged. Scope: read.")
    async def update_inbound_message(self, info: strawberry.Info, id: strawberry.ID,
                                     read: bool | None = None, starred: bool | None = None
                                     ) -> InboundMessagePayload:
        async def run() -> InboundMessagePayload:
            p = await info.context.principal("read")
            if read is None and starred is None:
                raise ValidationError("give read and/or starred", field=["read"])
            row = await info.context.services.mailstore.set_flags(p.org, str(id), read=read,
                                                                  starred=starred)
            return InboundMessagePayload(message=InboundMessage.of(row), errors=[])

        return await _payload(run, lambda e: InboundMessagePayload(message=None, errors=e))

    @strawberry.mutation(description="Move a message to another folder (to TRASH to delete it "
                         "recoverably). Scope: read.")
    async def move_inbound_message(self, info: strawberry.Info, id: strawberry.ID,
                                   folder: InboundFolder) -> InboundMessagePayload:
        async def run() -> InboundMessagePayload:
            p = await info.context.principal("read")
            row = await info.context.services.mailstore.move(p.org, str(id), folder.value)
            return InboundMessagePayload(message=InboundMessage.of(row), errors=[])

        return await _payload(run, lambda e: InboundMessagePayload(message=None, errors=e))

    @strawberry.mutation(description="Move a message from TRASH back to the folder it came "
                         "from. Scope: read.")
    async def restore_inbound_message(self, info: strawberry.Info, id: strawberry.ID
                                      ) -> InboundMessagePayload:
        async def run() -> InboundMessagePayload:
            p = await info.context.principal("read")
            row = await info.context.services.mailstore.restore(p.org, str(id))
            return InboundMessagePayload(message=InboundMessage.of(row), errors=[])

        return await _payload(run, lambda e: InboundMessagePayload(message=None, errors=e))

    @strawberry.mutation(description="Delete a message forever: its stored source and "
                         "attachments are removed and cannot be restored. Scope: admin.")
    async def delete_inbound_message(self, info: strawberry.Info, id: strawberry.ID
                                     ) -> DeleteInboundMessagePayload:
        async def run() -> DeleteInboundMessagePayload:
            p = await info.context.principal("admin")
            await info.context.services.mailstore.delete_forever(p.org, str(id))
            return DeleteInboundMessagePayload(deleted=True, errors=[])

        return await _payload(run, lambda e: DeleteInboundMessagePayload(deleted=False,
                                                                         errors=e))


@strawberry.type
class MailSubscription:
    @strawberry.subscription(description="Each message stored in `mailbox` from now on "
                             "(graphql-transport-ws; authenticate with the Authorization header "
                             "or a connection_init payload {\"Authorization\": \"Bearer …\"}). "
                             "A mailbox of another organization is NOT_FOUND. Scope: read.")
    async def inbound_message_received(self, info: strawberry.Info, mailbox: strawberry.ID
                                       ) -> AsyncGenerator[InboundMessage, None]:
        services = info.context.services
        try:
            p = await info.context.principal("read")
            await mbx.get_mailbox(services.db, p.org, str(mailbox))
        except InboxError as exc:
            # The ErrorPolicy extension does not see subscription results: add the code here.
            raise GraphQLError(exc.message, extensions={"code": exc.code,
                                                        "field": exc.field}) from None
        async with services.pubsub.subscribe(_inbound_topic(p.org, str(mailbox))) as queue:
            while True:
                row = await queue.get()
                if row.get("org") == p.org and row.get("mailbox") == str(mailbox):
                    yield InboundMessage.of(row)
