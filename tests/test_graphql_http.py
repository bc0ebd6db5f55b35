"""Plain JSON POSTs are answered by inbox/graphql/http.py, everything else by strawberry's view:
the same request gets the same answer (status, content type, body) either way."""

from __future__ import annotations

import email
import email.policy
import json
from typing import Any

import httpx
import pytest

from inbox.graphql import InboxGraphQL, build_schema
from inbox.graphql.http import PlainPosts, is_plain_post, operation
from tests.conftest import Stack, make_tenant, route_to_sink, wait_status

JSON = {"content-type": "application/json"}

# (name, method, headers, body, answered by PlainPosts)
CASES: list[tuple[str, str, dict[str, str], bytes | None, bool]] = [
    ("query", "POST", JSON, b'{"query": "{ viewer { organizationName scopes } }"}', True),
    ("charset", "POST", {"content-type": "application/json; charset=utf-8"},
     b'{"query": "{ viewer { organizationName } }"}', True),
    ("validation error", "POST", JSON, b'{"query": "{ nope }"}', True),
    ("syntax error", "POST", JSON, b'{"query": "{ viewer { "}', True),
    ("variable coercion", "POST", JSON,
     b'{"query": "query($n: Int) { messages(first: $n) { edges { cursor } } }",'
     b' "variables": {"n": "ten"}}', True),
    ("user error", "POST", JSON,
     b'{"query": "mutation { sendEmail(from: \\"x@elsewhere.test\\", to: [\\"a@b.test\\"],'
     b' subject: \\"s\\", textBody: \\"t\\") { message { id } errors { code field } } }"}', True),
    ("named operation", "POST", JSON,
     b'{"query": "query A { __typename } query B { viewer { scopes } }",'
     b' "operationName": "B"}', True),
    ("extensions", "POST", JSON, b'{"query": "{ __typename }", "extensions": {"x": 1}}', True),
    ("unknown operation name", "POST", JSON,
     b'{"query": "query A { __typename } query B { __typename }", "operationName": "C"}',
     False),
    ("two operations, no name", "POST", JSON,
     b'{"query": "query A { __typename } query B { __typename }"}', True),
    ("subscription over POST", "POST", JSON,
     b'{"query": "subscription { __typename }"}', False),
    ("not JSON", "POST", JSON, b"{query", False),
    ("batch", "POST", JSON, b'[{"query": "{ __typename }"}]', False),
    ("query not a string", "POST", JSON, b'{"query": 5}', False),
    ("empty query", "POST", JSON, b'{"query": ""}', False),
    ("no query", "POST", JSON, b"{}", False),
    ("variables not an object", "POST", JSON,
     b'{"query": "{ __typename }", "variables": [1]}', False),
    ("operationName not a string", "POST", JSON,
     b'{"query": "{ __typename }", "operationName": 7}', False),
    ("text/plain", "POST", {"content-type": "text/plain"}, b'{"query": "{ __typename }"}',
     False),
    ("no content type", "POST", {}, b'{"query": "{ __typename }"}', False),
    ("GET query", "GET", {}, None, False),
    ("GraphiQL", "GET", {"accept": "text/html"}, None, False),
]


# The cases whose second sending runs directly: a validated document (no extensions) with
# one operation to run. The rest go through strawberry's execute each time.
DIRECT = {"query", "charset", "variable coercion", "user error", "named operation"}


def _scrub(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body


async def _ask(app: Any, key: str, method: str, headers: dict[str, str], body: bytes | None
               ) -> tuple[int, str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://inbox.test") as client:
        headers = {"authorization": f"Bearer {key}", **headers}
        if method == "GET":
            resp = await client.get("/graphql", params={"query": "{ __typename }"},
                                    headers=headers)
        else:
            resp = await client.post("/graphql", content=body, headers=headers)
    return resp.status_code, resp.headers.get("content-type", ""), _scrub(resp.content)


async def test_every_shape_gets_the_views_answer(stack: Stack) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    schema = build_schema()
    view = InboxGraphQL(schema, lambda: stack.services)
    plain = PlainPosts(view, schema)
    for name, method, headers, body, fast in CASES:
        before, direct = plain.answered, plain.direct
        # Twice: a query text seen and validated before is run by graphql-core directly.
        first = await _ask(plain, tenant.key, method, headers, body)
        again = await _ask(plain, tenant.key, method, headers, body)
        theirs = await _ask(view, tenant.key, method, headers, body)
        assert first == theirs and again == theirs, name
        assert plain.answered - before == (2 if fast else 0), name
        assert plain.direct - direct == (1 if name in DIRECT else 0), name
    # The cases answered with data really ran: the viewer is the tenant's organization.
    status, _, answer = await _ask(plain, tenant.key, *CASES[0][1:4])
    assert status == 200 and answer["data"]["viewer"]["organizationName"] == "Acme"


async def test_send_and_auth_errors_through_the_plain_path(stack: Stack) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    schema = build_schema()
    plain = PlainPosts(InboxGraphQL(schema, lambda: stack.services), schema)
    send = {"query": """mutation($to: [String!]) {
        sendEmail(from: "hello@sender.test", to: $to, subject: "Hi", textBody: "Body") {
          message { id subject status } errors { code } } }""",
            "variables": {"to": ["someone@dest.test"]}}
    status, ctype, answer = await _ask(plain, tenant.key, "POST", JSON, json.dumps(send).encode())
    assert (status, ctype) == (200, "application/json")
    message = answer["data"]["sendEmail"]["message"]
    assert answer["data"]["sendEmail"]["errors"] == [] and message["subject"] == "Hi"
    row = await stack.services.db.one("SELECT * FROM ONLY type::thing('message', $id)",
                                      {"id": message["id"]})
    assert row["org"] == tenant.org  # stored, in the caller's organization
    status, _, answer = await _ask(plain, "not-a-key", "POST", JSON, json.dumps(send).encode())
    assert status == 200 and answer["data"]["sendEmail"] == {
        "message": None, "errors": [{"code": "UNAUTHENTICATED"}]}
    # The same send again runs directly: a second message, stored as the first was.
    status, _, answer = await _ask(plain, tenant.key, "POST", JSON, json.dumps(send).encode())
    second = answer["data"]["sendEmail"]["message"]
    assert plain.direct == 2 and second["id"] != message["id"] and second["subject"] == "Hi"
    assert await stack.services.db.one("SELECT VALUE org FROM ONLY type::thing('message', $id)",
                                       {"id": second["id"]}) == tenant.org
    assert plain.answered == 3


# The contract's own example: every argument a literal in the query text, nothing in variables.
LITERAL_SEND = """mutation {
  sendEmail(from: "hello@sender.test", to: ["someone@dest.test"], subject: "Literal",
            textBody: "Plain body", htmlBody: "<p>HTML body</p>",
            idempotencyKey: "literal-1") {
    message { id subject status recipients { address status } }
    errors { code field message }
  }
}"""


async def test_send_email_with_only_literal_arguments_over_http(stack: Stack, smtp_sink: Any
                                                                ) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    route_to_sink(stack.dns, "dest.test")
    resp = await stack.api.client.post("/graphql", json={"query": LITERAL_SEND},
                                       headers={"Authorization": f"Bearer {tenant.key}"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    payload = resp.json()["data"]["sendEmail"]
    assert payload["errors"] == []
    message = payload["message"]
    assert message["subject"] == "Literal" and message["status"] == "QUEUED"
    assert message["recipients"] == [{"address": "someone@dest.test", "status": "QUEUED"}]
    await wait_status(stack.api, tenant.key, message["id"], {"DELIVERED"})
    await smtp_sink.wait_for(1)
    [received] = smtp_sink.messages
    assert received.mail_from == "hello@sender.test"
    assert received.rcpt_tos == ["someone@dest.test"]
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed["Subject"] == "Literal" and parsed["From"] == "hello@sender.test"
    assert parsed.get_content_type() == "multipart/alternative"
    bodies = {part.get_content_type(): part.get_content().strip()
              for part in parsed.iter_parts()}
    assert bodies == {"text/plain": "Plain body", "text/html": "<p>HTML body</p>"}
    # The same text again (now run by graphql-core directly): the literal key replays.
    again = await stack.api(LITERAL_SEND, key=tenant.key)
    assert again["data"]["sendEmail"]["message"]["id"] == message["id"]
    assert again["data"]["sendEmail"]["errors"] == []


async def test_bodies_the_view_fails_on_are_a_400(stack: Stack) -> None:
    # strawberry's view fails on these with a 500 (UnicodeDecodeError; AttributeError on a
    # JSON value that is not an object); we answer 400 as it does for other bad bodies.
    schema = build_schema()
    plain = PlainPosts(InboxGraphQL(schema, lambda: stack.services), schema)
    for body in (b'{"query": "\xff\xfe"}', b"\xff\xfe\x00"):
        assert await _ask(plain, "k", "POST", JSON, body) == (
            400, "text/plain; charset=utf-8", b"Unable to parse request body as JSON")
    for body in (b'"{ __typename }"', b"5", b"null", b"true"):
        assert await _ask(plain, "k", "POST", JSON, body) == (
            400, "text/plain; charset=utf-8",
            b"The request body must be a JSON object with a `query`"), body
    status, _, answer = await _ask(plain, "k", "POST", JSON, b'{"query": "{ __typename }"}')
    assert (status, answer) == (200, {"data": {"__typename": "Query"}})


async def test_unexpected_errors_are_masked_and_logged_on_the_direct_path(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    schema = build_schema()

    class Broken:  # services whose database is missing: the resolver fails unexpectedly
        def __getattr__(self, name: str) -> Any:
            if name == "db":
                raise RuntimeError("secret connection string")
            return getattr(stack.services, name)

    view = InboxGraphQL(schema, Broken)
    plain = PlainPosts(view, schema)
    body = b'{"query": "{ viewer { organizationName } }"}'
    theirs = await _ask(view, tenant.key, "POST", JSON, body)
    caplog.clear()
    ours = await _ask(plain, tenant.key, "POST", JSON, body)
    assert plain.direct == 1 and ours == theirs
    assert ours[2]["errors"][0]["message"] == "Unexpected error."
    assert "secret connection string" not in json.dumps(ours[2])
    assert "secret connection string" in caplog.text  # logged for us, not shown to them


@pytest.mark.parametrize("headers, plain", [
    ([(b"content-type", b"application/json")], True),
    ([(b"content-type", b"Application/JSON ; charset=utf-8")], True),
    ([(b"content-type", b"application/json"), (b"accept", b"application/json")], True),
    ([(b"content-type", b"application/json"), (b"accept", b"text/event-stream")], False),
    ([(b"content-type", b"application/json"), (b"accept", b"multipart/mixed")], False),
    ([(b"content-type", b"application/jsonl")], False),
    ([(b"content-type", b"multipart/form-data; boundary=x")], False),
    ([], False),
])
def test_which_requests_are_plain(headers: list[tuple[bytes, bytes]], plain: bool) -> None:
    assert is_plain_post({"type": "http", "method": "POST", "headers": headers}) is plain
    assert not is_plain_post({"type": "http", "method": "GET", "headers": headers})
    assert not is_plain_post({"type": "websocket", "method": "GET", "headers": headers})


def test_operation_fields() -> None:
    assert operation(b'{"query": "{ a }", "variables": {"x": 1}, "operationName": "A"}') == (
        "{ a }", {"x": 1}, "A", None)
    assert operation(b'{"query": "{ a }", "variables": null, "extensions": {"e": 2}}') == (
        "{ a }", None, None, {"e": 2})
    assert operation(b'{"query": "{ a }", "extensions": []}') is None
