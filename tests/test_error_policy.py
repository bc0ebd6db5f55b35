"""ErrorPolicy: our errors carry their code; anything unexpected is masked. The argument guard
(graphql/arguments.py) on a schema of its own."""

from __future__ import annotations

import strawberry
from graphql import GraphQLError

from inbox.errors import ValidationError
from inbox.graphql.arguments import guard_arguments
from inbox.graphql.schema import ErrorPolicy
from inbox.graphql.types import UserError


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


@strawberry.type
class Payload:
    done: bool
    note: str | None
    items: list[str]
    errors: list[UserError]


@strawberry.type
class Odd:  # a payload whose `label` has no empty value: the error is raised instead
    label: str
    errors: list[UserError]


@strawberry.type
class Mutation:
    @strawberry.mutation
    def act(self, text: str, more: list[str] | None = None) -> Payload:
        return Payload(done=True, note=text, items=more or [], errors=[])

    @strawberry.mutation
    def odd(self, text: str) -> Odd:
        return Odd(label=text, errors=[])


GUARDED = strawberry.Schema(query=Query, mutation=Mutation, extensions=[ErrorPolicy])
guard_arguments(GUARDED._schema)
guard_arguments(GUARDED._schema)  # once is enough: a second call wraps nothing again


async def test_unencodable_argument_in_a_payload_mutation() -> None:
    result = await GUARDED.execute("mutation($t: String!, $m: [String!]) { act(text: $t, "
                                   "more: $m) { done note items errors { code field } } }",
                                   variable_values={"t": "ok", "m": ["fine", "x\ud800"]})
    assert result.errors is None
    assert result.data == {"act": {"done": False, "note": None, "items": [], "errors": [
        {"code": "VALIDATION", "field": ["more", "1"]}]}}
    result = await GUARDED.execute('mutation { act(text: "Grüße") { note errors { code } } }')
    assert result.data == {"act": {"note": "Grüße", "errors": []}}


async def test_unencodable_argument_elsewhere_is_a_coded_error() -> None:
    result = await GUARDED.execute("mutation($t: String!) { odd(text: $t) { label } }",
                                   variable_values={"t": "\udcff"})
    [err] = result.errors or []
    assert err.extensions == {"code": "VALIDATION", "field": ["text"]}
    assert "\udcff" not in err.message
