"""Text that cannot be stored (a lone UTF-16 surrogate, JSON's "\\ud800") in any argument of any
operation is a typed VALIDATION error naming the argument's path, over HTTP against the real
stack: the payload's errors for mutations, a GraphQL error with the code for queries and the
subscription. It never reaches the database. The cases are generated from the served schema,
so an operation added later is covered too.

Behind that boundary: submit() refuses such tags, metadata and idempotency keys itself (SMTP
submission reaches it without GraphQL), and the database gateway reports such parameters as a
permanent error, not as STORAGE_UNAVAILABLE (which tells clients to try again)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from graphql import (
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    get_named_type,
)
from websockets.asyncio.client import connect

from inbox.errors import StorageUnavailable, UnencodableText
from inbox.graphql import build_schema
from inbox.message import OutboundMessage
from inbox.storage import Database
from inbox.submission import SubmitOptions, submit
from inbox.tenancy import Principal
from tests.conftest import SEND, Stack, Tenant, make_settings, make_tenant, run_stack
from tests.support.dnsserver import DnsServer
from tests.support.surreal_ws import EngineOverWebSocket

BAD = "a\ud800b"  # a lone high surrogate between two letters
TEXT_SCALARS = {"String", "ID"}


def _valid(type_: Any) -> Any:
    """A value of `type_` that passes GraphQL's coercion (its content does not matter here:
    the check runs before any resolver)."""
    if isinstance(type_, GraphQLNonNull):
        return _valid(type_.of_type)
    if isinstance(type_, GraphQLList):
        return [_valid(type_.of_type)]
    if isinstance(type_, GraphQLInputObjectType):
        return {name: _valid(f.type) for name, f in type_.fields.items()
                if isinstance(f.type, GraphQLNonNull)}
    if isinstance(type_, GraphQLEnumType):
        return next(iter(type_.values))
    assert isinstance(type_, GraphQLScalarType), type_
    return {"Int": 1, "Float": 1.5, "Boolean": True, "JSON": {},
            "DateTime": "2030-01-01T00:00:00+00:00"}.get(type_.name, "x")


def _positions(type_: Any) -> Iterator[tuple[list[str], Any]]:
    """(path within the value, a value of `type_` with BAD there) for every place text can go."""
    if isinstance(type_, GraphQLNonNull):
        yield from _positions(type_.of_type)
    elif isinstance(type_, GraphQLList):
        # Second in the list, after a good one: the path names the index.
        for path, value in _positions(type_.of_type):
            yield ["1", *path], [_valid(type_.of_type), value]
    elif isinstance(type_, GraphQLInputObjectType):
        for name, f in type_.fields.items():
            for path, value in _positions(f.type):
                yield [name, *path], {**_valid(type_), name: value}
    elif isinstance(type_, GraphQLScalarType) and type_.name in TEXT_SCALARS:
        yield [], BAD
    elif isinstance(type_, GraphQLScalarType) and type_.name == "JSON":
        yield ["k"], {"ok": "fine", "k": BAD}  # a value
        yield [], {"ok": "fine", BAD: "v"}  # a key: the object as a whole
        yield ["k", "1"], {"k": ["fine", BAD]}  # deeper


@dataclass
class Case:
    kind: str  # query, mutation, subscription
    field: str
    document: str
    variables: dict[str, Any]
    path: list[str]
    payload: bool  # a mutation answering with errors in its payload

    @property
    def id(self) -> str:
        return f"{self.field}:{'.'.join(self.path)}".replace(BAD, "BAD")


def _cases() -> list[Case]:
    schema = build_schema()._schema
    cases = []
    for kind, root in (("query", schema.query_type), ("mutation", schema.mutation_type),
                       ("subscription", schema.subscription_type)):
        assert root is not None
        for fname, field in root.fields.items():
            returned = get_named_type(field.type)
            payload = isinstance(returned, GraphQLObjectType) and "errors" in returned.fields
            selection = ("{ errors { code field message } }" if payload else
                         "{ __typename }" if isinstance(returned, GraphQLObjectType) else "")
            for aname, arg in field.args.items():
                for path, value in _positions(arg.type):
                    variables = {n: _valid(a.type) for n, a in field.args.items()
                                 if isinstance(a.type, GraphQLNonNull)}
                    variables[aname] = value
                    declared = ", ".join(f"${n}: {field.args[n].type}" for n in variables)
                    passed = ", ".join(f"{n}: ${n}" for n in variables)
                    document = f"{kind}({declared}) {{ {fname}({passed}) {selection} }}"
                    cases.append(Case(kind, fname, document, variables, [aname, *path],
                                      payload and kind == "mutation"))
    return cases


CASES = _cases()
HTTP_CASES = [c for c in CASES if c.kind != "subscription"]


def test_every_operation_with_text_arguments_is_covered() -> None:
    covered = {(c.kind, c.field) for c in CASES}
    # The ones named in the review, and every mutation answers with a payload of errors.
    for expected in [("mutation", "sendEmail"), ("mutation", "createApiKey"),
                     ("mutation", "addSuppression"), ("query", "message"),
                     ("subscription", "inboundMessageReceived")]:
        assert expected in covered
    assert all(c.payload for c in CASES if c.kind == "mutation")
    paths = {tuple(c.path) for c in CASES if c.field == "sendEmail"}
    assert {("tags", "1"), ("metadata", "k"), ("metadata",), ("idempotencyKey",),
            ("headers", "1", "value"), ("attachments", "1", "filename"), ("to", "1"),
            ("from",), ("subject",), ("textBody",)} <= paths


async def _post(stack: Stack, key: str, query: str, variables: dict[str, Any]
                ) -> dict[str, Any]:
    # json.dumps writes the lone surrogate as the escape "\ud800", as a JavaScript client does.
    body = json.dumps({"query": query, "variables": variables}).encode()
    resp = await stack.api.client.post("/graphql", content=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


@dataclass
class Shared:
    stack: Stack
    tenant: Tenant


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: Any) -> AsyncIterator[Shared]:
    """One stack for every case: each is refused before it changes anything."""
    dns = DnsServer().start()
    try:
        settings = make_settings(tmp_path_factory.mktemp("unencodable"), dns,
                                 INBOX_DB_SYNC="false")
        async with run_stack(settings, dns, workers=False) as stack:
            yield Shared(stack, await make_tenant(stack.services, dns))
    finally:
        dns.stop()


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
@pytest.mark.asyncio(loop_scope="module")
async def test_unencodable_argument_is_a_typed_error(shared: Shared, case: Case) -> None:
    stack, key = shared.stack, shared.tenant.key
    before = await stack.services.db.run("SELECT count() FROM message GROUP ALL;"
                                         "SELECT count() FROM api_key GROUP ALL;"
                                         "SELECT count() FROM suppression GROUP ALL;")
    # Twice: the second time the validated query text runs on graphql/http.py's direct path.
    for _ in range(2):
        answer = await _post(stack, key, case.document, case.variables)
        text = json.dumps(answer)
        assert "\\ud800" not in text, answer  # the bad text is not echoed
        if case.payload:
            assert "errors" not in answer, answer
            [error] = answer["data"][case.field]["errors"]
            assert error["code"] == "VALIDATION" and error["field"] == case.path, answer
            assert "not valid Unicode" in error["message"]
        else:
            [error] = answer["errors"]
            assert error["extensions"] == {"code": "VALIDATION", "field": case.path}, answer
            assert error["path"] == [case.field]
            assert error["message"] != "Unexpected error."
            assert answer["data"] is None or answer["data"][case.field] is None
    after = await stack.services.db.run("SELECT count() FROM message GROUP ALL;"
                                        "SELECT count() FROM api_key GROUP ALL;"
                                        "SELECT count() FROM suppression GROUP ALL;")
    assert after == before  # nothing was stored


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "subscription"],
                         ids=[c.id for c in CASES if c.kind == "subscription"])
@pytest.mark.asyncio(loop_scope="module")
async def test_unencodable_subscription_argument(shared: Shared, case: Case) -> None:
    url = shared.stack.base_url.replace("http://", "ws://") + "/graphql"
    async with connect(url, subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                       additional_headers={"Authorization": f"Bearer {shared.tenant.key}"},
                       open_timeout=5) as ws:
        await ws.send(json.dumps({"type": "connection_init"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "connection_ack"
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {
            "query": case.document, "variables": case.variables}}))
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
    errors = event["payload"] if event["type"] == "error" else event["payload"]["errors"]
    assert errors[0]["extensions"] == {"code": "VALIDATION", "field": case.path}, event


@pytest.mark.parametrize("where", ["tags", "metadata-key", "metadata-value", "idempotencyKey"])
@pytest.mark.asyncio(loop_scope="module")
async def test_send_email_names_the_field(shared: Shared, where: str) -> None:
    """The review's cases, through the SEND document the other tests use."""
    override, field = {
        "tags": ({"tags": ["ok", "\ud800"]}, ["tags", "1"]),
        "metadata-key": ({"metadata": {"\ud800": "v"}}, ["metadata"]),
        "metadata-value": ({"metadata": {"order": "\ud800"}}, ["metadata", "order"]),
        "idempotencyKey": ({"key": "\ud800"}, ["idempotencyKey"]),
    }[where]
    tenant = shared.tenant
    variables = {"from": f"a@{tenant.domain}", "to": ["x@dest.test"], "subject": "s",
                 "text": "t", **override}
    answer = await _post(shared.stack, tenant.key, SEND, variables)
    payload = answer["data"]["sendEmail"]
    assert payload["message"] is None
    [error] = payload["errors"]
    assert (error["code"], error["field"]) == ("VALIDATION", field)


@pytest.mark.asyncio(loop_scope="module")
async def test_literal_surrogate_in_the_query_text_is_a_syntax_error(shared: Shared) -> None:
    # GraphQL's own escape, and the raw character (JSON's escape inside the query string).
    for literal in ("\\ud800", "\ud800"):
        query = ('mutation { createApiKey(scopes: [READ], name: "' + literal
                 + '") { errors { code } } }')
        answer = await _post(shared.stack, shared.tenant.key, query, {})
        assert answer.get("data") is None and answer["errors"], answer
        assert "Syntax Error" in answer["errors"][0]["message"], answer


@pytest.mark.asyncio(loop_scope="module")
async def test_valid_non_ascii_text_passes(shared: Shared) -> None:
    r = await _post(shared.stack, shared.tenant.key,
                    'mutation($n: String) { createApiKey(scopes: [READ], name: $n) '
                    '{ apiKey { name } errors { code } } }', {"n": "Grüße 😀 你好"})
    assert r["data"]["createApiKey"] == {"apiKey": {"name": "Grüße 😀 你好"}, "errors": []}


@pytest.mark.asyncio(loop_scope="module")
async def test_websocket_key_that_is_not_text(shared: Shared) -> None:
    url = shared.stack.base_url.replace("http://", "ws://") + "/graphql"
    async with connect(url, subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                       open_timeout=5) as ws:
        await ws.send(json.dumps({"type": "connection_init",
                                  "payload": {"Authorization": "Bearer ibx_\ud800_x"}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "connection_ack"
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {
            "query": "subscription($m: ID!) { inboundMessageReceived(mailbox: $m) { id } }",
            "variables": {"m": "mbx_x"}}}))
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
    errors = event["payload"] if event["type"] == "error" else event["payload"]["errors"]
    assert errors[0]["extensions"]["code"] == "UNAUTHENTICATED", event


# ---- behind the boundary ---------------------------------------------------------------


@pytest.mark.parametrize(("opts", "field"), [
    (SubmitOptions(tags=["ok", "x\udcff"]), ["tags", "1"]),
    (SubmitOptions(metadata={"\udcff": "v"}), ["metadata"]),
    (SubmitOptions(metadata={"k": "\udcff"}), ["metadata", "k"]),
    # An SMTP Idempotency-Key header is decoded with surrogateescape: a byte not UTF-8.
    (SubmitOptions(idempotency_key="order-\udcff"), ["idempotencyKey"]),
], ids=["tag", "metadata-key", "metadata-value", "idempotency-key"])
@pytest.mark.asyncio(loop_scope="module")
async def test_submit_refuses_unencodable_options(shared: Shared, opts: SubmitOptions,
                                                  field: list[str]) -> None:
    services, tenant = shared.stack.services, shared.tenant
    principal = Principal(tenant.org, "key_test", frozenset({"send"}))
    msg = OutboundMessage(from_=f"a@{tenant.domain}", to=["x@dest.test"], subject="s",
                          text_body="t")
    with pytest.raises(UnencodableText) as info:
        await submit(services.db, principal, msg, opts, settings=services.settings,
                     now=services.clock())
    assert info.value.field == field and info.value.code == "VALIDATION"
    assert not info.value.temporary


async def _gateway_refuses(db: Database) -> None:
    for call in (db.run("RETURN $x", {"x": "\ud800"}),
                 db.run_grouped("BEGIN TRANSACTION; CREATE probe SET v = $x; "
                                "COMMIT TRANSACTION;", {"x": ["ok", {"k": "\ud800"}]})):
        with pytest.raises(UnencodableText) as info:
            await call
        assert not isinstance(info.value, StorageUnavailable)
        assert not info.value.temporary and info.value.code == "VALIDATION"
    # One member's bad text does not fail the others grouped with it.
    text = "BEGIN TRANSACTION; CREATE probe SET v = $x; COMMIT TRANSACTION;"
    results = await asyncio.gather(*(db.run_grouped(text, {"x": v})
                                     for v in ("one", "\ud800", "two", "drei ü")),
                                   return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["list", "UnencodableText", "list", "list"]
    assert sorted(await db.one("SELECT VALUE v FROM probe")) == ["drei ü", "one", "two"]


@pytest.mark.asyncio(loop_scope="module")
async def test_database_gateway_embedded(shared: Shared) -> None:
    db = shared.stack.services.db
    assert db.embedded
    await db.run("DELETE probe")
    await _gateway_refuses(db)


async def test_database_gateway_over_websocket(tmp_path: Any) -> None:
    server = EngineOverWebSocket(f"surrealkv://{tmp_path}/server/db")
    url = await server.start()
    db = Database(url, namespace="inbox", database="inbox")
    try:
        await db.connect()
        assert not db.embedded
        await _gateway_refuses(db)
    finally:
        await db.close()
        await server.stop()
