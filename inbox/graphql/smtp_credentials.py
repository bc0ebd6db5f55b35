"""GraphQL fields for SMTP submission credentials: list, create (the password is shown once)
and revoke. Storage and verification live in inbox.tenancy.smtpcreds. Every field needs the
`admin` scope and is scoped to the caller's organization (another tenant's id is NOT_FOUND).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import strawberry

from inbox.graphql.schema import _payload
from inbox.graphql.types import UserError
from inbox.tenancy import smtpcreds


@strawberry.type
class SmtpCredential:
    id: strawberry.ID
    username: str = strawberry.field(description="The SMTP AUTH username (the credential's id).")
    name: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: dict[str, Any]) -> SmtpCredential:
        return cls(id=strawberry.ID(row["id"]), username=row["id"], name=row.get("name") or "",
                   created_at=row["created_at"], revoked_at=row.get("revoked_at"))


@strawberry.type
class CreateSmtpCredentialPayload:
    credential: SmtpCredential | None
    password: str | None = strawberry.field(
        description="The SMTP AUTH password. Shown only this once.")
    errors: list[UserError]


@strawberry.type
class SmtpCredentialPayload:
    credential: SmtpCredential | None
    errors: list[UserError]


@strawberry.type
class SmtpCredentialQuery:
    @strawberry.field(description="SMTP submission credentials of the organization.")
    async def smtp_credentials(self, info: strawberry.Info) -> list[SmtpCredential]:
        p = await info.context.principal("admin")
        rows = await smtpcreds.list_smtp_credentials(info.context.services.db, p.org)
        return [SmtpCredential.of(r) for r in rows]


@strawberry.type
class SmtpCredentialMutation:
    @strawberry.mutation(description="A username/password for SMTP submission (ports 587 and "
                                     "465) that sends as the organization's verified domains.")
    async def create_smtp_credential(self, info: strawberry.Info, name: str | None = None
                                     ) -> CreateSmtpCredentialPayload:
        async def run() -> CreateSmtpCredentialPayload:
            p = await info.context.principal("admin")
            s = info.context.services
            row, password = await smtpcreds.create_smtp_credential(s.db, p.org, s.clock(),
                                                                   name or "")
            return CreateSmtpCredentialPayload(credential=SmtpCredential.of(row),
                                               password=password, errors=[])

        return await _payload(run, lambda e: CreateSmtpCredentialPayload(
            credential=None, password=None, errors=e))

    @strawberry.mutation(description="Revoke an SMTP credential: AUTH with it fails at once.")
    async def revoke_smtp_credential(self, info: strawberry.Info, id: strawberry.ID
                                     ) -> SmtpCredentialPayload:
        async def run() -> SmtpCredentialPayload:
            p = await info.context.principal("admin")
            s = info.context.services
            row = await smtpcreds.revoke_smtp_credential(s.db, p.org, str(id), s.clock())
            return SmtpCredentialPayload(credential=SmtpCredential.of(row), errors=[])

        return await _payload(run, lambda e: SmtpCredentialPayload(credential=None, errors=e))
