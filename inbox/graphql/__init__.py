"""GraphQL API: strawberry schema and context, served by strawberry's ASGI view and, for plain
JSON POSTs, by the leaner handler in http.py.

`graphql_app(services_of)` is the ASGI app for /graphql (POST, GET with GraphiQL, and
graphql-transport-ws subscriptions). It is mounted in front of FastAPI rather than as a FastAPI
router: the router's dependency solving and middleware stack cost about as much CPU as a whole
sendEmail resolver (bench: `{ __typename }` 1.1 ms per request through FastAPI). Each request
still gets an OpenTelemetry server span, joined to the caller's trace (W3C traceparent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from strawberry.asgi import GraphQL

from inbox.graphql.context import Context
from inbox.graphql.http import PlainPosts
from inbox.graphql.schema import build_schema
from inbox.telemetry import recording

tracer = trace.get_tracer("inbox.graphql")
_TRACE_HEADERS = (b"traceparent", b"tracestate", b"baggage")


class InboxGraphQL(GraphQL[Context, None]):
    """strawberry's ASGI view with our context; `services_of()` gives the running `Services`."""

    def __init__(self, schema: Any, services_of: Callable[[], Any]) -> None:
        super().__init__(schema)
        self.services_of = services_of

    async def get_context(self, request: Any, response: Any) -> Context:
        context = Context(self.services_of())
        context.request, context.response = request, response
        return context


def graphql_app(services_of: Callable[[], Any], *, plain_posts: bool = True) -> Any:
    """The ASGI app serving the schema; `services_of()` gives the running `Services`.
    `plain_posts=False` leaves every request to strawberry's view (tests compare the two)."""
    schema = build_schema()
    view = InboxGraphQL(schema, services_of)
    serve = PlainPosts(view, schema) if plain_posts else view

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if not recording():
            await serve(scope, receive, send)
            return
        carrier = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope.get("headers", ()) if name in _TRACE_HEADERS}
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        status: list[int] = []

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        with tracer.start_as_current_span(
                f"{method} /graphql", kind=SpanKind.SERVER,
                context=propagate.extract(carrier) if carrier else None,
                attributes={"http.request.method": method, "http.route": "/graphql",
                            "url.scheme": scope.get("scheme", "http")}) as span:
            await serve(scope, receive, send_status)
            if status:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(Status(StatusCode.ERROR))

    return app


__all__ = ["InboxGraphQL", "build_schema", "graphql_app"]
