"""DocumentCache: one parse and one validation per distinct query text, errors kept."""

from __future__ import annotations

import strawberry

from inbox.graphql.doccache import DocumentCache


@strawberry.type
class Query:
    @strawberry.field
    def echo(self, text: str) -> str:
        return text


def _schema(cache: DocumentCache) -> strawberry.Schema:
    return strawberry.Schema(query=Query, extensions=[lambda: cache])


async def test_repeated_query_is_validated_once_and_still_executes() -> None:
    cache = DocumentCache()
    schema = _schema(cache)
    query = "query Q($t: String!) { echo(text: $t) }"
    for text in ("a", "b", "c"):
        result = await schema.execute(query, variable_values={"t": text})
        assert result.errors is None and result.data == {"echo": text}
    assert cache.validations == 1
    # A wrong variable type is checked per request, not cached with the document.
    result = await schema.execute(query, variable_values={"t": 5})
    assert result.errors and "String" in result.errors[0].message


async def test_invalid_and_malformed_queries_keep_their_errors() -> None:
    cache = DocumentCache()
    schema = _schema(cache)
    for _ in range(2):
        result = await schema.execute("{ nope }")
        assert result.errors and "Cannot query field 'nope'" in result.errors[0].message
    assert cache.validations == 1
    for _ in range(2):
        result = await schema.execute("{ echo(text: ")
        assert result.errors and "Syntax Error" in result.errors[0].message


async def test_least_recently_used_text_is_dropped_beyond_maxsize() -> None:
    cache = DocumentCache(maxsize=2)
    schema = _schema(cache)
    texts = ['{ echo(text: "1") }', '{ echo(text: "2") }']
    for text in texts:
        assert (await schema.execute(text)).errors is None
    assert (await schema.execute(texts[0])).errors is None  # hit: now most recent
    assert (await schema.execute('{ echo(text: "3") }')).errors is None  # drops text 2
    assert cache.validations == 3
    assert (await schema.execute(texts[0])).errors is None
    assert cache.validations == 3
    assert (await schema.execute(texts[1])).errors is None
    assert cache.validations == 4
