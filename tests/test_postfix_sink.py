"""Interop with Postfix's `smtp-sink` as the recipient MX: a real MTA's replies and capture.

smtp-sink is a different SMTP implementation from our aiosmtpd sink: it offers no SMTPUTF8
nor PIPELINING (with -f/-r) and ends its EHLO reply with an empty `250 ` line. Each accepted
message is dumped to a file, which must carry two DKIM signatures that verify against the
loopback DNS server.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from email import policy
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.conftest import SEND, make_settings, make_tenant, route_to_sink, run_stack, wait_status
from tests.support.dnsserver import DnsServer
from tests.support.procs import free_port
from tests.test_send_e2e import _dnsfunc_via

SMTP_SINK = Path("/usr/sbin/smtp-sink")
BODY_END = "END-OF-TEST-BODY"

pytestmark = pytest.mark.skipif(not SMTP_SINK.exists(),
                                reason=f"Postfix's {SMTP_SINK} is not installed")


class PostfixSink:
    """A running smtp-sink on 127.0.0.1:`port`, dumping each transaction under `dump_dir`."""

    def __init__(self, port: int, dump_dir: Path, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.port = port
        self.dump_dir = dump_dir
        self.proc = proc
        self.log = log

    def dumps(self) -> list[Path]:
        return sorted(p for p in self.dump_dir.iterdir() if p.is_file())


@pytest.fixture
def postfix_sink(tmp_path: Path) -> Iterator[Callable[..., PostfixSink]]:
    """`postfix_sink(*options)` starts smtp-sink with extra options (e.g. "-f", "RCPT")."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> PostfixSink:
        port = free_port()
        dump_dir = tmp_path / f"smtp-sink-{port}"
        dump_dir.mkdir()
        log = tmp_path / f"smtp-sink-{port}.log"
        # As root smtp-sink must drop privileges (-u); root keeps the dump dir writable.
        user = ["-u", "root"] if os.geteuid() == 0 else []
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(SMTP_SINK), *user, "-d", f"{dump_dir}/%Y%m%d%H%M%S.", *options,
                 f"127.0.0.1:{port}", "100"],  # 100: the listen(2) backlog
                stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        deadline = time.monotonic() + 10
        while True:  # ready when it accepts a connection
            if proc.poll() is not None:
                raise AssertionError(f"smtp-sink exited {proc.returncode}: {log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.recv(100)  # its 220 greeting
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"smtp-sink not listening: {log.read_text()}") from None
                time.sleep(0.05)
        return PostfixSink(port, dump_dir, proc, log)

    try:
        yield start
    finally:
        for proc in started:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def split_dump(text: bytes) -> tuple[dict[str, list[str]], bytes]:
    """smtp-sink's own records (X-Client-Addr … its three-line Received) and the message as
    received, with CRLF line ends again and without the empty line the dump appends."""
    lines = text.split(b"\n")
    records: dict[str, list[str]] = {}
    i = 0
    while not lines[i].startswith(b"Received: "):
        name, _, value = lines[i].decode().partition(": ")
        records.setdefault(name, []).append(value)
        i += 1
    i += 1
    while lines[i][:1] in (b" ", b"\t"):  # the Received header's continuation lines
        i += 1
    message = b"\n".join(lines[i:])
    assert message.endswith(b"\n\n"), message[-40:]
    return records, message[:-1].replace(b"\n", b"\r\n")


async def wait_dump(sink: PostfixSink, timeout: float = 5) -> bytes:
    """The single dump file, once it holds the whole message."""
    deadline = time.monotonic() + timeout
    while True:
        dumps = sink.dumps()
        if len(dumps) == 1 and BODY_END.encode() in (data := dumps[0].read_bytes()):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"smtp-sink dumps: {dumps}; log: {sink.log.read_text()}")
        await asyncio.sleep(0.05)


async def test_delivered_to_smtp_sink_with_verifiable_dkim(
        tmp_path: Path, dns_server: DnsServer, postfix_sink: Callable[..., PostfixSink]
) -> None:
    sink = postfix_sink()
    settings = make_settings(tmp_path, dns_server, SMTP_OUTBOUND_PORT=sink.port,
                             INBOX_DB_SYNC="false")
    async with run_stack(settings, dns_server) as stack:
        tenant = await make_tenant(stack.services, dns_server)
        route_to_sink(dns_server, "dest.test")
        result = await stack.api(SEND, {
            "from": f"Acme <hello@{tenant.domain}>", "to": ["alice@dest.test"],
            "cc": ["bob@dest.test"], "subject": "Grüße via Postfix",
            "text": f"Hello.\n.a line starting with a dot\n{BODY_END}\n",
        }, key=tenant.key)
        payload = result["data"]["sendEmail"]
        assert payload["errors"] == [], payload
        msg = await wait_status(stack.api, tenant.key, payload["message"]["id"], {"DELIVERED"})
        assert all(r["status"] == "DELIVERED" and r["lastResponse"].startswith("250 2.0.0")
                   for r in msg["recipients"]), msg
        dump = await wait_dump(sink)

        records, raw = split_dump(dump)
        assert records["X-Client-Addr"] == ["127.0.0.1"]
        assert records["X-Client-Proto"] == ["ESMTP"]
        assert records["X-Helo-Args"] == [settings.SERVER_HOSTNAME]
        assert records["X-Mail-Args"][0].startswith(f"<hello@{tenant.domain}>")
        assert sorted(r.split()[0] for r in records["X-Rcpt-Args"]) == [
            "<alice@dest.test>", "<bob@dest.test>"]

        parsed = email.message_from_bytes(raw, policy=policy.default)
        assert str(parsed["Subject"]) == "Grüße via Postfix"
        assert raw.split(b"\r\n\r\n", 1)[0].isascii()  # no SMTPUTF8 offered: encoded words
        body = parsed.get_body(("plain",))
        assert body is not None and ".a line starting with a dot" in body.get_content()
        sigs = parsed.get_all("DKIM-Signature") or []
        algorithms = [re.search(r"(?:^|;)\s*a=([\w-]+)", str(s)) for s in sigs]
        assert sorted(m[1] for m in algorithms if m) == ["ed25519-sha256", "rsa-sha256"]
        dnsfunc: Any = _dnsfunc_via(stack)
        verifier = dkim.DKIM(raw)
        assert verifier.verify(idx=0, dnsfunc=dnsfunc)
        assert verifier.verify(idx=1, dnsfunc=dnsfunc)


@pytest.mark.parametrize(("options", "recipient", "message", "reply"), [
    (("-f", "RCPT"), "BOUNCED", "FAILED", "500 5.3.0"),
    (("-f", "."), "BOUNCED", "FAILED", "500 5.3.0"),
    (("-r", "RCPT"), "DEFERRED", "DEFERRED", "450 4.3.0"),
    (("-r", "."), "DEFERRED", "DEFERRED", "450 4.3.0"),
], ids=["hard-rcpt", "hard-end-of-data", "soft-rcpt", "soft-end-of-data"])
async def test_smtp_sink_rejections(tmp_path: Path, dns_server: DnsServer,
                                    postfix_sink: Callable[..., PostfixSink],
                                    options: tuple[str, str], recipient: str, message: str,
                                    reply: str) -> None:
    sink = postfix_sink(*options)  # -f/-r also turn PIPELINING off: EHLO ends in "250 "
    settings = make_settings(tmp_path, dns_server, SMTP_OUTBOUND_PORT=sink.port,
                             INBOX_DB_SYNC="false", SMTP_OUTBOUND_RETRY_BASE_DELAY_SECS="30",
                             SMTP_OUTBOUND_RETRY_MAX_DELAY_SECS="60")
    async with run_stack(settings, dns_server) as stack:
        tenant = await make_tenant(stack.services, dns_server)
        route_to_sink(dns_server, "dest.test")
        result = await stack.api(SEND, {"from": f"hello@{tenant.domain}",
                                        "to": ["alice@dest.test"], "subject": "rejected",
                                        "text": BODY_END}, key=tenant.key)
        msg_id = result["data"]["sendEmail"]["message"]["id"]
        msg = await wait_status(stack.api, tenant.key, msg_id, {message})
        [rcpt] = msg["recipients"]
        assert rcpt["status"] == recipient, msg
        assert rcpt["attempts"] == 1
        assert rcpt["lastResponse"].startswith(reply), rcpt
        assert (rcpt["nextAttemptAt"] is not None) == (recipient == "DEFERRED"), rcpt
