"""Signing and SMTP in the delivery child process (inbox/delivery/outproc.py), over real peers:
GraphQL -> worker -> child -> aiosmtpd sink, DKIM checked with dkimpy; a killed child costs a
retry, never a message."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import dkim

from inbox.delivery.outproc import ProcessTransport
from inbox.delivery.signing import DkimSigner
from tests.conftest import SEND, make_settings, make_tenant, route_to_sink, run_stack, wait_status
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dkim_dnsfunc


async def test_process_transport_signs_and_delivers(dns_server: DnsServer, smtp_sink: Any,
                                                    tmp_path: Any) -> None:
    settings = make_settings(tmp_path, dns_server, SMTP_OUTBOUND_PORT=smtp_sink.port,
                             INBOX_DB_SYNC="false", SMTP_OUTBOUND_PROCESS="on")
    async with run_stack(settings, dns_server) as stack:
        transport = stack.services.transport
        assert isinstance(transport, ProcessTransport)
        tenant = await make_tenant(stack.services, stack.dns)
        route_to_sink(stack.dns, "dest.test")
        ids = []
        for i in range(3):
            result = await stack.api(SEND, {
                "from": f"Acme <hello@{tenant.domain}>", "to": [f"u{i}@dest.test"],
                "subject": f"Grüße {i}", "text": "plain body\n.leading dot"}, key=tenant.key)
            ids.append(result["data"]["sendEmail"]["message"]["id"])
        for message_id in ids:
            msg = await wait_status(stack.api, tenant.key, message_id, {"DELIVERED"})
            assert msg["recipients"][0]["lastResponse"].startswith("250")
        pid = transport.pid
        assert pid is not None and pid != os.getpid() and transport.started == 1
        received = await smtp_sink.wait_for(3)
        dnsfunc = dkim_dnsfunc(stack.dns)
        for item in received:
            assert item.data.count(b"DKIM-Signature:") == 2
            verifier = dkim.DKIM(item.data)
            assert verifier.verify(idx=0, dnsfunc=dnsfunc)
            assert verifier.verify(idx=1, dnsfunc=dnsfunc)
    assert transport.pid is None  # shutdown closed the child
    await asyncio.sleep(0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:  # reaped by now unless it is still running
        raise AssertionError(f"delivery process {pid} still running after shutdown")


async def test_a_killed_child_costs_a_retry_not_the_message(dns_server: DnsServer,
                                                           smtp_sink: Any,
                                                           tmp_path: Any) -> None:
    settings = make_settings(tmp_path, dns_server, SMTP_OUTBOUND_PORT=smtp_sink.port,
                             INBOX_DB_SYNC="false", SMTP_OUTBOUND_PROCESS="on")
    async with run_stack(settings, dns_server) as stack:
        transport = stack.services.transport
        tenant = await make_tenant(stack.services, stack.dns)
        route_to_sink(stack.dns, "dest.test")
        first = await stack.api(SEND, {"from": f"hello@{tenant.domain}",
                                       "to": ["warm@dest.test"], "subject": "warm-up",
                                       "text": "x"}, key=tenant.key)
        await wait_status(stack.api, tenant.key, first["data"]["sendEmail"]["message"]["id"],
                          {"DELIVERED"})
        # Kill the child while the sink holds the next DATA: the attempt in flight comes back
        # temporary, a new child is started, and the retry delivers.
        import threading

        smtp_sink.hold_data = threading.Event()
        result = await stack.api(SEND, {"from": f"hello@{tenant.domain}",
                                        "to": ["held@dest.test"], "subject": "held",
                                        "text": "y"}, key=tenant.key)
        message_id = result["data"]["sendEmail"]["message"]["id"]
        await asyncio.to_thread(smtp_sink.data_held.wait, 10)
        killed = transport.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        smtp_sink.hold_data.set()
        smtp_sink.hold_data = None
        msg = await wait_status(stack.api, tenant.key, message_id, {"DELIVERED"}, timeout=20)
        rcpt = msg["recipients"][0]
        assert rcpt["attempts"] >= 2, rcpt
        assert any(e["type"] == "DEFERRED" and "delivery process exited" in (e["detail"] or "")
                   for e in msg["events"]), msg["events"]
        assert transport.started == 2 and transport.pid not in (None, killed)


async def test_signing_failure_in_the_child_defers(dns_server: DnsServer, smtp_sink: Any
                                                   ) -> None:
    transport = ProcessTransport(helo_name="client.test", port=smtp_sink.port, timeout=5)
    try:
        bad_spec = ("example.test", "s1", b"not a pem", None, None, ("From",))
        result = await transport.deliver(["127.0.0.1"], "a@example.test", ["b@dest.test"],
                                         b"From: a@example.test\r\n\r\nhi\r\n", sign=bad_spec)
        (rcpt,) = result.recipients
        assert (rcpt.code, rcpt.enhanced, rcpt.temporary) == (451, "4.3.0", True)
        assert "DKIM signing failed" in rcpt.text and "cannot be loaded" in rcpt.text
        assert smtp_sink.messages == []
        # The same child still delivers the next (signed) message.
        signer = DkimSigner("example.test", None, None, "ed", _ED25519_SEED, ("From",))
        ok = await transport.deliver(["127.0.0.1"], "a@example.test", ["b@dest.test"],
                                     b"From: a@example.test\r\n\r\nhi\r\n", sign=signer.spec)
        assert ok.recipients[0].delivered, ok
        (got,) = await smtp_sink.wait_for(1)
        assert got.data.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;")
        assert transport.started == 1
    finally:
        await transport.aclose()


_ED25519_SEED = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A="
