"""POST /graphql with a JSON body, answered without strawberry's HTTP view.

Around the operation itself strawberry's view spends ~0.5 ms of event-loop CPU per request
(its request adapter, a content-type parse through the `email` package, a sub-response object,
a Starlette response): a third of a whole `sendEmail`. Almost every request is one shape —
POST, `Content-Type: application/json`, one operation object — and for that shape `PlainPosts`
reads the body, runs `schema.execute` exactly as the view does (same context, same allowed
operation types, same extensions) and writes the view's JSON.

Everything else goes to the view, with the body replayed when it was read: GET and GraphiQL,
websockets, batches, multipart, an `Accept` asking for a stream, a body that is not an object
with a non-empty string `query`, and an operation the view refuses before running it (unknown
operation name, a subscription over POST). So strawberry still words every error it words;
tests/test_graphql_http.py sends each of those shapes both ways and compares the answers.
"""

from __future__ import annotations

import json
from typing import Any

from graphql import ExecutionResult as GraphQLExecutionResult
from graphql import GraphQLError, get_operation_ast
from graphql import OperationType as CoreOperationType
from graphql import execute as graphql_execute
from starlette.requests import Request
from strawberry.exceptions import MissingQueryError
from strawberry.execution.is_awaitable import optimized_is_awaitable
from strawberry.http import process_result
from strawberry.schema._graphql_core import execution_context_class_kwargs
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.types.graphql import OperationType

from inbox.graphql.schema import ErrorPolicy

# What the view allows over POST (OperationType.from_http("POST")).
_POST_OPERATIONS = frozenset({OperationType.QUERY, OperationType.MUTATION})
_NOT_JSON = b"Unable to parse request body as JSON"  # the view's words for a body not JSON
_IS_AWAITABLE: Any = optimized_is_awaitable  # strawberry's test, as it passes it to graphql-core
_DIRECT_OPERATIONS = frozenset({CoreOperationType.QUERY, CoreOperationType.MUTATION})
_REFUSED = (MissingQueryError, CannotGetOperationTypeError, InvalidOperationTypeError)


class BadRequest(Exception):
    """A body answered 400 here (text/plain, as the view answers its HTTP errors)."""

    def __init__(self, reason: bytes) -> None:
        super().__init__(reason.decode())
        self.reason = reason


def is_plain_post(scope: Any) -> bool:
    """POST with a JSON body and no streaming `Accept` (which the view answers as a stream)."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    json_body = False
    for name, value in scope["headers"]:
        if name == b"content-type":
            json_body = value.split(b";", 1)[0].strip().lower() == b"application/json"
        elif name == b"accept":
            lowered = value.lower()
            if b"event-stream" in lowered or b"multipart" in lowered:
                return False
    return json_body


async def read_body(receive: Any) -> bytes | None:
    """The whole request body; None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Any) -> Any:
    """An ASGI `receive` that gives `body` once, then defers to the real one."""
    given = False

    async def again() -> Any:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


def operation(body: bytes) -> tuple[str, dict[str, Any] | None, str | None,
                                    dict[str, Any] | None] | None:
    """(query, variables, operationName, extensions) of a plain request; None for any other
    body, which the view parses and answers itself; BadRequest for one the view fails on."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None  # the view says so, in its words
    except UnicodeDecodeError:  # bytes in no UTF: the view would fail with a 500
        raise BadRequest(_NOT_JSON) from None
    if isinstance(data, list):
        return None  # a batch: the view's to refuse (batching is off)
    if not isinstance(data, dict):  # a bare string or number: the view would fail with a 500
        raise BadRequest(b"The request body must be a JSON object with a `query`")
    query, variables = data.get("query"), data.get("variables")
    name, extensions = data.get("operationName"), data.get("extensions")
    if not (isinstance(query, str) and query and isinstance(variables, (dict, type(None)))
            and isinstance(name, (str, type(None)))
            and isinstance(extensions, (dict, type(None)))):
        return None
    return query, variables, name, extensions


class PlainPosts:
    """The ASGI app: plain JSON POSTs answered here, every other request by `view` (strawberry's
    ASGI view for `schema`). `answered` counts the requests answered here."""

    def __init__(self, view: Any, schema: Any) -> None:
        self.view, self.schema = view, schema
        self.answered = 0
        self.direct = 0  # of those, run by graphql-core directly (see _execute)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        view = self.view
        if not is_plain_post(scope):
            await view(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return  # nobody to answer
        receive = replay(body, receive)
        try:
            parsed = operation(body)
        except BadRequest as exc:
            await _reply(send, 400, b"text/plain; charset=utf-8", exc.reason)
            return
        if parsed is None:
            await view(scope, receive, send)
            return
        query, variables, name, extensions = parsed
        context = await view.get_context(Request(scope, receive), None)
        try:
            result = await self._execute(query, variables, name, extensions, context)
        except _REFUSED:
            # Refused before any resolver ran: the view refuses it again, in its own words.
            await view(scope, receive, send)
            return
        self.answered += 1
        await _reply(send, 200, b"application/json",
                     json.dumps(process_result(result), separators=(",", ":")).encode())


    async def _execute(self, query: str, variables: dict[str, Any] | None, name: str | None,
                       extensions: dict[str, Any] | None, context: Any) -> Any:
        """The operation's result, as `schema.execute` gives it for a POST.

        A query text that an earlier request parsed and validated without errors (the
        schema's DocumentCache) is run by graphql-core directly, as strawberry would run it,
        without strawberry's per-request extension runner and execution context (~110 us of
        the event loop per request; bench: /tmp harness, `{ __typename }` 150-173 -> 36-48
        us). The result then gets what those would have given it: unexpected errors logged
        (`process_errors`) and ErrorPolicy's codes and masking. Anything else, and the first
        sight of a query text, goes through `schema.execute`."""
        schema = self.schema
        cache = schema.document_cache
        document = cache.validated(query) if cache is not None and not extensions else None
        operation = get_operation_ast(document, name) if document is not None else None
        if operation is None or operation.operation not in _DIRECT_OPERATIONS:
            return await schema.execute(
                query, variable_values=variables, context_value=context, operation_name=name,
                allowed_operation_types=_POST_OPERATIONS, operation_extensions=extensions)
        self.direct += 1
        assert document is not None
        result: Any
        try:
            result = graphql_execute(schema._schema, document, context_value=context,
                                     variable_values=variables, operation_name=name,
                                     is_awaitable=_IS_AWAITABLE,
                                     **execution_context_class_kwargs(
                                         schema.execution_context_class))
            if optimized_is_awaitable(result):
                result = await result
        except Exception as exc:  # noqa: BLE001 - as strawberry's execute turns it into an error
            result = GraphQLExecutionResult(data=None, errors=[
                exc if isinstance(exc, GraphQLError) else GraphQLError(str(exc),
                                                                       original_error=exc)])
        if result.errors:
            schema.process_errors(result.errors)
            ErrorPolicy.process(result)
        return result


async def _reply(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()),
                            (b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})
