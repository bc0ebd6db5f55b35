"""Per-request GraphQL context: services, the authenticated principal, batched loaders."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from strawberry.dataloader import DataLoader
from strawberry.fastapi import BaseContext

from inbox.errors import Unauthenticated
from inbox.tenancy import Principal


class Context(BaseContext):
    def __init__(self, services: Any) -> None:
        super().__init__()
        self.services = services
        self._principal: Principal | None = None
        self._recipients = DataLoader(self._batch_recipients)
        self._events = DataLoader(self._batch_events)

    async def principal(self, scope: str) -> Principal:
        """The caller, checked for `scope`; raises Unauthenticated / Forbidden."""
        if self._principal is None:
            scheme, _, token = self._authorization().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("send 'Authorization: Bearer <API key>'")
            if not token.isascii():  # our keys are ASCII; a websocket's JSON could hold anything
                raise Unauthenticated("malformed API key")
            self._principal = await self.services.auth.authenticate(self.services.db, token)
        self._principal.require(scope)
        return self._principal

    def _authorization(self) -> str:
        """The Authorization header; for a websocket without one, the `Authorization` entry of
        the graphql-transport-ws `connection_init` payload (browsers cannot set headers on a
        websocket upgrade)."""
        header = self.request.headers.get("authorization", "") if self.request else ""
        if header or not isinstance(self.connection_params, dict):
            return header
        for name, value in self.connection_params.items():
            if str(name).lower() == "authorization" and isinstance(value, str):
                return value
        return ""

    async def _batch(self, table: str, order: str, ids: list[str]) -> list[list[dict[str, Any]]]:
        assert self._principal is not None  # loaders run only under an authorised field
        rows = await self.services.db.one(
            f"SELECT * FROM {table} WHERE message IN $ids AND org = $org ORDER BY {order}",
            {"ids": ids, "org": self._principal.org},
        )
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows or []:
            grouped[row["message"]].append(row)
        return [grouped.get(i, []) for i in ids]

    async def _batch_recipients(self, ids: list[str]) -> list[list[dict[str, Any]]]:
        return await self._batch("recipient", "address", ids)

    async def _batch_events(self, ids: list[str]) -> list[list[dict[str, Any]]]:
        return await self._batch("event", "at, id", ids)

    async def load_recipients(self, message_id: str) -> list[dict[str, Any]]:
        return await self._recipients.load(message_id)

    async def load_events(self, message_id: str) -> list[dict[str, Any]]:
        return await self._events.load(message_id)
