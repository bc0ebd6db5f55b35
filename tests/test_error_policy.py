"""ErrorPolicy: our errors carry their code; anything unexpected is masked."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError

from inbox.errors import ValidationError
from inbox.graphql.schema import ErrorPolicy


@strawberry.type
class Query:
    @strawberry.field
    def ours(self) -> str:
        raise ValidationError("subject is too long", field=["subject"])

    @strawberry.field
    def unexpected(self) -> str:
        raise RuntimeError("password=hunter2 at /srv/db")

    @strawberry.field
    def graphql(self) -> str:
        raise GraphQLError("a plain GraphQL error")


SCHEMA = strawberry.Schema(query=Query, extensions=[ErrorPolicy])


async def test_our_error_keeps_message_and_gets_code_and_field() -> None:
    result = await SCHEMA.execute("{ ours }")
    [err] = result.errors or []
    assert err.message == "subject is too long"
    assert err.extensions == {"code": "VALIDATION", "field": ["subject"]}


async def test_unexpected_error_is_masked() -> None:
    result = await SCHEMA.execute("{ unexpected }")
    [err] = result.errors or []
    assert err.message == "Unexpected error." and "hunter2" not in str(err.formatted)
    assert err.path == ["unexpected"]


async def test_graphql_errors_and_bad_queries_are_shown() -> None:
    result = await SCHEMA.execute("{ graphql }")
    assert [e.message for e in result.errors or []] == ["a plain GraphQL error"]
    result = await SCHEMA.execute("{ missing }")
    assert "Cannot query field 'missing'" in (result.errors or [])[0].message
