"""Durability under kill -9: the real service (`python -m inbox serve`) loses no accepted message.

The service runs as a subprocess with INBOX_DB_SYNC=true against the loopback DNS server and
the aiosmtpd sink; the tenant is set up with the CLI. After SIGKILL the service restarts on the
same data dir and every message it acknowledged must still be delivered (at least once).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from inbox.config import load_settings
from inbox.storage import Database
from tests.conftest import MASTER_KEY, MESSAGE, SEND, publish, route_to_sink
from tests.support.dnsserver import DnsServer
from tests.support.procs import Service, inbox_env, run_cli_json
from tests.support.smtpsink import SmtpSink

SENDER_DOMAIN = "sender.test"
DEST_DOMAIN = "dest.test"


@dataclass
class Setup:
    env: dict[str, str]
    key: str
    logs: Path


@pytest.fixture
def setup(tmp_path: Path, dns_server: DnsServer, smtp_sink: SmtpSink) -> Setup:
    """A data dir with a verified sending domain (set up through the CLI), its DKIM records
    published and DEST_DOMAIN's MX pointing at the sink."""
    env = inbox_env(
        tmp_path / "data",
        INBOX_MASTER_KEY=MASTER_KEY,
        INBOX_DB_SYNC="true",
        INBOX_DNS_NAMESERVERS=dns_server.address,
        INBOX_DNS_TIMEOUT_SECS="2",
        INBOX_LOG_LEVEL="INFO",
        SERVER_HOSTNAME="outbound.inbox.test",
        SMTP_OUTBOUND_PORT=smtp_sink.port,
        SMTP_OUTBOUND_QUEUE_LEASE_SECS="2",
        SMTP_OUTBOUND_QUEUE_POLL_SECS="0.1",
        SMTP_OUTBOUND_RETRY_BASE_DELAY_SECS="0.2",
        SMTP_OUTBOUND_RETRY_MAX_DELAY_SECS="0.5",
        SMTP_OUTBOUND_TIMEOUT_SECS="5",
    )
    org = run_cli_json(env, "org", "create", "Acme", "--json")
    domain = run_cli_json(env, "domain", "add", org["id"], SENDER_DOMAIN, "--verified",
                          "--json")
    publish(dns_server, domain["records"])
    route_to_sink(dns_server, DEST_DOMAIN)
    key = run_cli_json(env, "apikey", "create", org["id"], "--scope", "send", "--scope", "read",
                       "--json")["key"]
    return Setup(env=env, key=key, logs=tmp_path / "logs")


def gql(client: httpx.Client, key: str, query: str, variables: dict[str, Any]
        ) -> dict[str, Any]:
    resp = client.post("/graphql", json={"query": query, "variables": variables},
                       headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert not body.get("errors"), body
    return body["data"]


def send(client: httpx.Client, key: str, rcpt: str, subject: str) -> str:
    """sendEmail; returns the acknowledged message id."""
    payload = gql(client, key, SEND, {"from": f"hello@{SENDER_DOMAIN}", "to": [rcpt],
                                      "subject": subject, "text": "durable?"})["sendEmail"]
    assert payload["errors"] == [], payload
    assert payload["message"]["status"] == "QUEUED"
    return str(payload["message"]["id"])


def wait_delivered(service: Service, key: str, ids: list[str], timeout: float = 20
                   ) -> dict[str, dict[str, Any]]:
    """Poll until every message is DELIVERED; a message that is missing fails at once."""
    deadline = time.monotonic() + timeout
    pending = list(ids)
    done: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=service.base_url, timeout=10) as client:
        while pending:
            msg_id = pending[0]
            msg = gql(client, key, MESSAGE, {"id": msg_id})["message"]
            assert msg is not None, f"acknowledged message {msg_id} was lost"
            if msg["status"] == "DELIVERED":
                done[msg_id] = msg
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(pending)} not delivered; {msg_id} is {msg}\n"
                                     f"{service.stderr()[-4000:]}")
            time.sleep(0.1)
    return done



def _sessions_closed(smtp_sink: Any) -> None:
    """Wait until the sink has seen every delivery session of the killed service close.

    Delivery runs in a child process that the kernel kills once the parent is gone
    (PR_SET_PDEATHSIG): release the sink only after that, or a 250 could still go out to a
    peer that is about to vanish."""
    deadline = time.monotonic() + 10
    while smtp_sink.open_sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert smtp_sink.open_sessions == 0, "a delivery session outlived the killed service"

def test_kill_during_data_then_restart_delivers(setup: Setup, smtp_sink: SmtpSink) -> None:
    rcpt = f"alice@{DEST_DOMAIN}"
    hold = threading.Event()
    smtp_sink.hold_data = hold
    first = Service(setup.env, setup.logs, name="first")
    try:
        first.start()
        with httpx.Client(base_url=first.base_url, timeout=10) as client:
            msg_id = send(client, setup.key, rcpt, "in flight")
        assert smtp_sink.data_held.wait(timeout=10), \
            f"the worker never reached DATA:\n{first.stderr()}"
        first.kill()  # kill -9 while the sink has the whole message but has not replied
        assert first.proc is not None and first.proc.returncode == -9
        _sessions_closed(smtp_sink)
    finally:
        hold.set()  # release the sink
        first.kill()
    time.sleep(0.2)
    # The peer vanished before the 250, so aiosmtpd cancelled that DATA: whatever arrives
    # from now on was sent again by the restarted service.
    assert smtp_sink.messages == []
    with Service(setup.env, setup.logs, name="second") as second:
        msg = wait_delivered(second, setup.key, [msg_id])[msg_id]
        assert [r["status"] for r in msg["recipients"]] == ["DELIVERED"]
        got = smtp_sink.wait_for_sync(1, timeout=5)
        time.sleep(0.3)  # a duplicate would show up now
        copies = [m for m in smtp_sink.messages if m.rcpt_tos == [rcpt]]
        assert 1 <= len(copies) <= 2, got  # at-least-once; a retransmission is allowed
        assert all(b"Subject: in flight" in m.data for m in copies)
        assert all(m.data.count(b"DKIM-Signature:") == 2 for m in copies)


def test_acknowledged_messages_survive_kill(setup: Setup, smtp_sink: SmtpSink) -> None:
    count = 20
    rcpts = [f"user{i}@{DEST_DOMAIN}" for i in range(count)]
    first = Service(setup.env, setup.logs, "--no-workers", name="api-only")
    try:
        first.start()
        with httpx.Client(base_url=first.base_url, timeout=10) as client, \
                ThreadPoolExecutor(max_workers=5) as pool:
            ids = list(pool.map(lambda i: send(client, setup.key, rcpts[i], f"n{i}"),
                                range(count)))
            first.kill()  # kill -9 right after the last acknowledgement
    finally:
        first.kill()
    assert len(set(ids)) == count
    assert smtp_sink.messages == []  # no workers: nothing left before the kill

    with Service(setup.env, setup.logs, name="restarted") as second:
        delivered = wait_delivered(second, setup.key, ids)
    assert sorted(r["address"] for m in delivered.values() for r in m["recipients"]) == \
        sorted(rcpts)
    received = sorted(r for m in smtp_sink.messages for r in m.rcpt_tos)
    assert set(received) == set(rcpts), received  # every one arrived (at least once)


async def _jobs_left(env: dict[str, str]) -> list[dict[str, Any]]:
    """The job rows in the data dir of a service that is no longer running."""
    settings = load_settings(env=env)
    db = Database(settings.database_url, namespace=settings.DATABASE_NAMESPACE,
                  database=settings.DATABASE_DATABASE, sync=False)
    await db.connect()
    try:
        return await db.one("SELECT * FROM job") or []
    finally:
        await db.close()


def test_acknowledged_messages_handed_to_the_local_worker_survive_kill(
        setup: Setup, smtp_sink: SmtpSink) -> None:
    # The default path (workers on): each message is stored already leased to the service's
    # own worker (delivery/handoff.py), which starts it at once. The MX holds every DATA
    # unanswered, so nothing is delivered before the kill; the SMTP timeout is long enough that
    # no attempt ends (and requeues its job) before it.
    count = 10
    rcpts = [f"held{i}@{DEST_DOMAIN}" for i in range(count)]
    hold = threading.Event()
    smtp_sink.hold_data = hold
    env = {**setup.env, "SMTP_OUTBOUND_TIMEOUT_SECS": "120"}
    first = Service(env, setup.logs, name="handoff")
    try:
        first.start()
        with httpx.Client(base_url=first.base_url, timeout=10) as client, \
                ThreadPoolExecutor(max_workers=5) as pool:
            ids = list(pool.map(lambda i: send(client, setup.key, rcpts[i], f"h{i}"),
                                range(count)))
            first.kill()  # kill -9 right after the last acknowledgement
        assert first.proc is not None and first.proc.returncode == -9
        _sessions_closed(smtp_sink)
    finally:
        hold.set()
        first.kill()
    assert len(set(ids)) == count
    time.sleep(0.2)
    assert smtp_sink.messages == []  # nothing was delivered before the kill

    # Every acknowledged message left a job leased to the dead service's worker (its name is
    # host:pid:…), mid-attempt: the restarted service must take them over when the leases
    # (2 s here) expire.
    jobs = asyncio.run(_jobs_left(env))
    assert len(jobs) == count
    owner = f"{socket.gethostname()}:{first.proc.pid}:"
    assert {(j["status"], j["attempts"]) for j in jobs} == {("processing", 1)}, jobs
    assert all(j["owner"].startswith(owner) for j in jobs), jobs

    with Service(setup.env, setup.logs, name="restarted") as second:
        delivered = wait_delivered(second, setup.key, ids)
        smtp_sink.wait_for_sync(count, timeout=10)
    assert sorted(r["address"] for m in delivered.values() for r in m["recipients"]) == \
        sorted(rcpts)
    received = [r for m in smtp_sink.messages for r in m.rcpt_tos]
    assert set(received) == set(rcpts), received  # every one arrived (at least once)
