"""GraphQL API: strawberry schema, context and the FastAPI router."""

from __future__ import annotations

from typing import Any

from starlette.requests import HTTPConnection

from inbox.graphql.context import Context
from inbox.graphql.schema import build_schema


async def get_context(connection: HTTPConnection) -> Context:
    # HTTPConnection (not Request) so the same getter serves websocket subscriptions.
    return Context(connection.app.state.services)


def graphql_router() -> Any:
    from strawberry.fastapi import GraphQLRouter

    return GraphQLRouter(build_schema(), context_getter=get_context)


__all__ = ["build_schema", "graphql_router"]
