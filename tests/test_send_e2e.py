"""End to end over real peers: GraphQL over HTTP → SurrealDB → worker → DNS → SMTP sink."""

from __future__ import annotations

import asyncio
import base64
import email
from email import policy
from typing import Any

import dkim

from tests.conftest import SEND, Stack, make_tenant, route_to_sink, wait_status
from tests.support.fixtures_dns import dkim_dnsfunc
from tests.support.opendkim import opendkim_verify


def _dnsfunc_via(stack: Stack):  # type: ignore[no-untyped-def]
    """dkimpy's DNS lookup, answered by the same loopback DNS server (no monkeypatching)."""
    return dkim_dnsfunc(stack.dns)


async def test_send_delivers_signed_message(stack: Stack, smtp_sink: Any) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    route_to_sink(stack.dns, "dest.test")
    result = await stack.api(SEND, {
        "from": f"Acme <hello@{tenant.domain}>", "to": ["alice@dest.test", "bob@dest.test"],
        "subject": "Grüße aus Köln", "text": "plain body", "html": "<p>html body</p>",
        "tags": ["welcome"], "metadata": {"user": "42"},
    }, key=tenant.key)
    payload = result["data"]["sendEmail"]
    assert payload["errors"] == []
    msg_id = payload["message"]["id"]
    assert payload["message"]["status"] == "QUEUED"

    msg = await wait_status(stack.api, tenant.key, msg_id, {"DELIVERED"})
    assert {r["address"]: r["status"] for r in msg["recipients"]} == {
        "alice@dest.test": "DELIVERED", "bob@dest.test": "DELIVERED"}
    assert all(r["attempts"] == 1 and r["lastResponse"].startswith("250")
               for r in msg["recipients"])
    types = [e["type"] for e in msg["events"]]
    assert types[0] == "QUEUED" and types.count("DELIVERED") == 2 and types.count("QUEUED") == 1
    assert msg["events"][0]["detail"] == "1 delivery job(s) via graphql"
    # The QUEUED event is kept on the message row and each DELIVERED on its recipient's row,
    # not as event rows of their own.
    assert await stack.services.db.one("SELECT VALUE type FROM event WHERE message = $m",
                                       {"m": msg_id}) == []
    delivered = [e for e in msg["events"] if e["type"] == "DELIVERED"]
    assert sorted(e["recipient"] for e in delivered) == ["alice@dest.test", "bob@dest.test"]
    assert all(e["detail"].startswith("250") and e["at"] >= msg["events"][0]["at"]
               for e in delivered)
    assert msg["tags"] == ["welcome"] and msg["metadata"] == {"user": "42"}

    await smtp_sink.wait_for(1)
    received = smtp_sink.messages[0]
    assert sorted(received.rcpt_tos) == ["alice@dest.test", "bob@dest.test"]
    assert received.mail_from == f"hello@{tenant.domain}"
    raw = received.data
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert str(parsed["Subject"]) == "Grüße aus Köln"
    assert parsed["Message-ID"].endswith(f"@{tenant.domain}>")
    sigs = parsed.get_all("DKIM-Signature")
    assert len(sigs) == 2 and any("a=ed25519-sha256" in s for s in sigs)
    dnsfunc = _dnsfunc_via(stack)
    verifier = dkim.DKIM(raw)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc)
    assert verifier.verify(idx=1, dnsfunc=dnsfunc)


async def test_final_events_read_the_same_from_recipient_rows_and_old_event_rows(
        stack: Stack, smtp_sink: Any) -> None:
    # Mail delivered before final events moved onto recipient rows has them as event rows.
    tenant = await make_tenant(stack.services, stack.dns)
    route_to_sink(stack.dns, "dest.test")
    result = await stack.api(SEND, {"from": f"hello@{tenant.domain}", "to": [
        "alice@dest.test", "bob@dest.test"], "subject": "s", "text": "t"}, key=tenant.key)
    msg_id = result["data"]["sendEmail"]["message"]["id"]
    now = await wait_status(stack.api, tenant.key, msg_id, {"DELIVERED"})
    db = stack.services.db
    rows = await db.one("SELECT id, address, final_event FROM recipient WHERE message = $m",
                        {"m": msg_id})
    assert sorted(r["final_event"]["type"] for r in rows) == ["DELIVERED", "DELIVERED"]
    # Final events on recipient rows leave the address out (the row has it); older ones,
    # whether on the row or in event rows, named it.
    assert all("recipient" not in r["final_event"] for r in rows)
    named = [{**r["final_event"], "recipient": r["address"]} for r in rows]
    await db.run("UPDATE recipient SET final_event = NONE WHERE message = $m;"
                 "INSERT INTO event $rows RETURN NONE;",
                 {"m": msg_id, "rows": [{**f, "org": tenant.org, "message": msg_id}
                                        for f in named]})
    moved = await wait_status(stack.api, tenant.key, msg_id, {"DELIVERED"})
    assert moved["events"] == now["events"] and len(now["events"]) == 3
    assert {e["recipient"] for e in now["events"]} == {None, "alice@dest.test", "bob@dest.test"}
    for r in rows:  # as older versions kept them on the row
        await db.run("UPDATE type::thing('recipient', $id) SET final_event = $f",
                     {"id": r["id"], "f": {**r["final_event"], "recipient": r["address"]}})
    await db.run("DELETE event WHERE message = $m", {"m": msg_id})
    kept = await wait_status(stack.api, tenant.key, msg_id, {"DELIVERED"})
    assert kept["events"] == now["events"]


async def test_opendkim_verifies_a_delivered_message(stack: Stack, smtp_sink: Any,
                                                    tmp_path: Any) -> None:
    """An independent verifier (OpenDKIM) checks what actually arrived at the MX, against the
    DNS records the tenant was told to publish."""
    tenant = await make_tenant(stack.services, stack.dns)
    route_to_sink(stack.dns, "dest.test")
    result = await stack.api(SEND, {
        "from": f"Jörg <joerg@{tenant.domain}>", "to": ["alice@dest.test"],
        "subject": "Quittung — 東京", "text": "line\n.dot line\n" + "x" * 2000},
        key=tenant.key)
    await wait_status(stack.api, tenant.key, result["data"]["sendEmail"]["message"]["id"],
                      {"DELIVERED"})
    await smtp_sink.wait_for(1)
    delivered = smtp_sink.messages[0].data
    published = {f"{r['name']}.": r["value"] for r in tenant.records}
    tampered = delivered.replace(b"dot line", b"dot lime", 1)
    ok, bad = opendkim_verify(tmp_path, published, [delivered, tampered])
    assert ok["rc"] == 0 and not ok["stderr"], ok
    assert bad["rc"] != 0 and "Bad signature" in bad["stderr"], bad


async def test_attachments_and_bcc(stack: Stack, smtp_sink: Any) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    route_to_sink(stack.dns, "dest.test")
    content = b"%PDF-1.4 fake" * 100
    result = await stack.api(SEND, {
        "from": f"hello@{tenant.domain}", "to": ["alice@dest.test"],
        "bcc": ["secret@dest.test"], "subject": "Invoice", "text": "see attached",
        "attachments": [{"filename": "invoice.pdf", "contentType": "application/pdf",
                         "content": base64.b64encode(content).decode()}],
    }, key=tenant.key)
    msg_id = result["data"]["sendEmail"]["message"]["id"]
    await wait_status(stack.api, tenant.key, msg_id, {"DELIVERED"})
    await smtp_sink.wait_for(1)
    received = smtp_sink.messages[0]
    assert sorted(received.rcpt_tos) == ["alice@dest.test", "secret@dest.test"]
    parsed = email.message_from_bytes(received.data, policy=policy.default)
    assert parsed["Bcc"] is None and b"secret@dest.test" not in received.data
    parts = [p for p in parsed.iter_attachments()]
    assert parts[0].get_filename() == "invoice.pdf" and parts[0].get_content() == content


async def test_recipients_at_two_domains_become_two_jobs(stack: Stack, smtp_sink: Any) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    route_to_sink(stack.dns, "one.test")
    route_to_sink(stack.dns, "two.test")
    result = await stack.api(SEND, {
        "from": f"hello@{tenant.domain}", "to": ["a@one.test", "b@two.test"],
        "subject": "x", "text": "y"}, key=tenant.key)
    msg_id = result["data"]["sendEmail"]["message"]["id"]
    await wait_status(stack.api, tenant.key, msg_id, {"DELIVERED"})
    jobs = await stack.services.db.one("SELECT rcpt_domain, status FROM job WHERE message = $m",
                                       {"m": msg_id})
    assert sorted((j["rcpt_domain"], j["status"]) for j in jobs) == [
        ("one.test", "done"), ("two.test", "done")]
    await smtp_sink.wait_for(2)
    assert sorted(tuple(m.rcpt_tos) for m in smtp_sink.messages) == [("a@one.test",),
                                                                     ("b@two.test",)]


async def test_concurrent_sends_all_delivered_once(stack: Stack, smtp_sink: Any) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    route_to_sink(stack.dns, "dest.test")
    results = await asyncio.gather(*(stack.api(SEND, {
        "from": f"hello@{tenant.domain}", "to": [f"user{i}@dest.test"], "subject": f"n{i}",
        "text": "y"}, key=tenant.key) for i in range(30)))
    ids = [r["data"]["sendEmail"]["message"]["id"] for r in results]
    for msg_id in ids:
        await wait_status(stack.api, tenant.key, msg_id, {"DELIVERED"})
    await smtp_sink.wait_for(30)
    await asyncio.sleep(0.3)
    rcpts = sorted(r for m in smtp_sink.messages for r in m.rcpt_tos)
    assert rcpts == sorted(f"user{i}@dest.test" for i in range(30))


async def test_graphql_request_is_a_server_span_joined_to_the_callers_trace(
        stack: Stack) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)  # installed by build_services
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tenant = await make_tenant(stack.services, stack.dns)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    resp = await stack.api.client.post(
        "/graphql", headers={"Authorization": f"Bearer {tenant.key}",
                             "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        json={"query": SEND, "variables": {"from": f"hello@{tenant.domain}",
                                           "to": ["a@dest.test"], "subject": "s",
                                           "text": "t"}})
    assert resp.status_code == 200 and resp.json()["data"]["sendEmail"]["errors"] == []
    exporter.shutdown()  # later tests' spans are not kept
    spans = {s.name: s for s in exporter.get_finished_spans()}
    server, submit = spans["POST /graphql"], spans["submission.submit"]
    assert server.kind == SpanKind.SERVER
    assert server.attributes["http.response.status_code"] == 200
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert submit.parent.span_id == server.context.span_id
