"""GraphQL API: strawberry schema, context and the FastAPI router."""

from __future__ import annotations

from typing import Any

from inbox.graphql.schema import build_schema


def graphql_router() -> Any:
    from fastapi import Request
    from strawberry.fastapi import GraphQLRouter

    from inbox.graphql.context import Context

    async def get_context(request: Request) -> Context:
        return Context(request.app.state.services)

    return GraphQLRouter(build_schema(), context_getter=get_context)


__all__ = ["build_schema", "graphql_router"]
