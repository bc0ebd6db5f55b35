"""GraphQL API: strawberry schema and context, served by strawberry's own ASGI view.

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

from inbox.graphql.context import Context
from inbox.graphql.schema import build_schema
from inbox.telemetry import recording

tracer = trace.get_tracer("inbox.graphql")
_TRACE_HEADERS = (b"traceparent", b"tracestate", b"baggage")


def graphql_app(services_of: Callable[[], Any]) -> Any:
    """The ASGI app serving the schema; `services_of()` gives the running `Services`."""
    from strawberry.asgi import GraphQL

    class InboxGraphQL(GraphQL[Context, None]):
        async def get_context(self, request: Any, response: Any) -> Context:
            context = Context(services_of())
            context.request, context.response = request, response
            return context

    view = InboxGraphQL(build_schema())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if not recording():
            await view(scope, receive, send)
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
            await view(scope, receive, send_status)
            if status:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(Status(StatusCode.ERROR))

    return app


__all__ = ["build_schema", "graphql_app"]
