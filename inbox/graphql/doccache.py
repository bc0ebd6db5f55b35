"""Parsed and validated GraphQL documents, cached by their query text.

strawberry's ParserCache and ValidationCache each keep an LRU cache, but the validation cache
is keyed by the parsed document, and graphql-core hashes a document by walking its whole tree:
for a `sendEmail` with variables that walk cost more than the resolver's own Python (~120k
`__hash__` calls per 1000 requests). Here one entry per query text holds the document and, once
validated, its validation errors; a repeated query costs one dict lookup per phase.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from graphql import DocumentNode, GraphQLError
from graphql.language.parser import parse
from strawberry.extensions import SchemaExtension
from strawberry.schema.schema import validate_document


class DocumentCache(SchemaExtension):
    """Pass one instance for every request (`extensions=[lambda: cache]`); `maxsize` bounds
    the number of distinct query texts kept (least recently used go first)."""

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__()
        self.maxsize = maxsize
        self.validations = 0  # documents validated so far (not served from the cache)
        self._entries: OrderedDict[tuple[str, tuple[Any, ...]], _Entry] = OrderedDict()

    def _entry(self) -> _Entry | None:
        context = self.execution_context
        if not context.query:
            return None  # a document given directly: strawberry parses and validates it
        options = context.parse_options or {}
        key = (context.query, tuple(sorted(options.items())))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        try:
            document = parse(context.query, **options)
        except GraphQLError:
            return None  # strawberry parses it again and reports the syntax error
        entry = self._entries[key] = _Entry(document)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return entry

    def validated(self, query: str) -> DocumentNode | None:
        """The document of `query` if a request before parsed and validated it (strawberry's
        default parse options) and found no errors; else None."""
        key = (query, ())
        entry = self._entries.get(key)
        if entry is None or entry.errors is None or entry.errors:
            return None
        self._entries.move_to_end(key)
        return entry.document

    def on_parse(self) -> Iterator[None]:
        entry = self._entry()
        if entry is not None:
            self.execution_context.graphql_document = entry.document
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        entry = self._entry()
        if entry is not None and entry.document is context.graphql_document:
            if entry.errors is None:
                self.validations += 1
                entry.errors = validate_document(context.schema._schema, entry.document,
                                                 context.validation_rules)
            context.pre_execution_errors = entry.errors
        yield


class _Entry:
    __slots__ = ("document", "errors")

    def __init__(self, document: DocumentNode) -> None:
        self.document = document
        self.errors: list[GraphQLError] | None = None
