"""INBOX_DATABASE_URL=ws://…: two inbox instances share one database over the SDK's WebSocket
client (tests/support/surreal_ws.py puts the real engine behind a loopback RPC endpoint) and
deliver every message exactly once between them, their queue leases keeping them apart; an
`inbox worker` process delivers from the shared database; server credentials are checked."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter
from typing import Any

import pytest

from inbox.app import build_services, running_workers
from inbox.errors import ConfigError
from inbox.message import OutboundMessage
from inbox.submission import SubmitOptions, submit
from inbox.tenancy import Principal
from tests.conftest import MASTER_KEY, make_settings, make_tenant, route_to_sink
from tests.support.procs import inbox_env
from tests.support.surreal_ws import EngineOverWebSocket


async def test_two_instances_share_one_database_server(tmp_path: Any, dns_server: Any,
                                                       smtp_sink: Any) -> None:
    server = EngineOverWebSocket(f"surrealkv://{tmp_path}/server/db")
    url = await server.start()
    instances = []
    try:
        for name in ("a", "b"):
            settings = make_settings(tmp_path / name, dns_server, INBOX_DATABASE_URL=url,
                                     SMTP_OUTBOUND_PORT=smtp_sink.port,
                                     SMTP_OUTBOUND_CONCURRENCY=4,
                                     INBOX_QUOTA_HOURLY_SEND_LIMIT=1000)
            instances.append(await build_services(settings))
        a, b = instances
        assert not a.db.embedded and server.requests > 0
        tenant = await make_tenant(a, dns_server)  # made through one instance ...
        route_to_sink(dns_server, "dest.test")
        principal = Principal(tenant.org, "key_test", frozenset({"send"}))
        sent = []
        async with running_workers(a), running_workers(b):
            for i in range(30):  # ... sent through both: jobs are queued in the shared DB
                services = instances[i % 2]
                msg = OutboundMessage(from_=f"a@{tenant.domain}", to=[f"u{i}@dest.test"],
                                      subject=f"shared {i}", text_body="x")
                row = await submit(services.db, principal, msg, SubmitOptions(),
                                   settings=services.settings, now=services.clock())
                sent.append(row["id"])
                a.wakeup.set()
                b.wakeup.set()
            await asyncio.wait_for(smtp_sink.wait_for(30), 60)
            await asyncio.sleep(0.5)  # nothing more arrives: no message went out twice
        subjects = Counter(m.data.split(b"Subject: ")[1].split(b"\r\n")[0]
                           for m in smtp_sink.messages)
        assert len(smtp_sink.messages) == 30 and max(subjects.values()) == 1
        rows = await b.db.one("SELECT id, status FROM message")
        assert {r["status"] for r in rows} == {"DELIVERED"} and len(rows) == 30
        jobs = await a.db.one("SELECT status, attempts FROM job")
        assert len(jobs) == 30 and {(j["status"], j["attempts"]) for j in jobs} == {("done", 1)}
    finally:
        for services in instances:
            await services.db.close()
        await server.stop()


async def test_server_credentials_sign_in_and_wrong_ones_stop_start_up(tmp_path: Any) -> None:
    """DATABASE_USERNAME / DATABASE_PASSWORD sign in to the server before anything else; the
    server checks them (a root user defined on the real engine), and a wrong password stops
    start-up with an error naming the database setting instead of running unauthenticated."""
    server = EngineOverWebSocket(f"surrealkv://{tmp_path}/server/db")
    url = await server.start()
    try:
        admin = await build_services(make_settings(tmp_path / "admin", None,
                                                   INBOX_DATABASE_URL=url))
        await admin.db.run("DEFINE USER inboxsvc ON ROOT PASSWORD 's3cret' ROLES OWNER;")
        await admin.db.close()

        ok = await build_services(make_settings(
            tmp_path / "ok", None, INBOX_DATABASE_URL=url, DATABASE_USERNAME="inboxsvc",
            DATABASE_PASSWORD="s3cret"))
        try:
            rows = await ok.db.one("RETURN $token.ID")
            assert rows == "inboxsvc", rows  # the session carries the signed-in user's token
        finally:
            await ok.db.close()

        with pytest.raises(ConfigError) as caught:
            await build_services(make_settings(
                tmp_path / "bad", None, INBOX_DATABASE_URL=url, DATABASE_USERNAME="inboxsvc",
                DATABASE_PASSWORD="wrong"))
        assert "INBOX_DATABASE_URL" in str(caught.value)
        assert "authentication" in str(caught.value)
    finally:
        await server.stop()


async def test_inbox_worker_process_delivers_from_a_shared_server(tmp_path: Any, dns_server: Any,
                                                                  smtp_sink: Any) -> None:
    """`inbox worker`, a process of its own, takes the jobs an API instance queued in the shared
    database, delivers each once, and on SIGTERM stops cleanly with nothing left leased."""
    server = EngineOverWebSocket(f"surrealkv://{tmp_path}/server/db")
    url = await server.start()
    api = await build_services(make_settings(tmp_path / "api", dns_server,
                                             INBOX_DATABASE_URL=url,
                                             INBOX_QUOTA_HOURLY_SEND_LIMIT=1000))
    worker = None
    try:
        tenant = await make_tenant(api, dns_server)
        route_to_sink(dns_server, "dest.test")
        principal = Principal(tenant.org, "key_test", frozenset({"send"}))
        for i in range(5):  # no workers in this instance: the jobs wait queued in the server
            msg = OutboundMessage(from_=f"a@{tenant.domain}", to=[f"w{i}@dest.test"],
                                  subject=f"by worker {i}", text_body="x")
            await submit(api.db, principal, msg, SubmitOptions(), settings=api.settings,
                         now=api.clock())
        env = inbox_env(tmp_path / "worker", INBOX_DATABASE_URL=url, INBOX_MASTER_KEY=MASTER_KEY,
                        INBOX_DNS_NAMESERVERS=dns_server.address,
                        SMTP_OUTBOUND_PORT=smtp_sink.port, SMTP_OUTBOUND_QUEUE_POLL_SECS=0.1,
                        SMTP_OUTBOUND_PROCESS="off", INBOX_LOG_LEVEL="WARNING")
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inbox", "worker", env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await asyncio.wait_for(smtp_sink.wait_for(5, timeout=60), 70)
        worker.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(worker.communicate(), 30)
        assert worker.returncode == 0, err.decode(errors="replace")
        subjects = Counter(m.data.split(b"Subject: ")[1].split(b"\r\n")[0]
                           for m in smtp_sink.messages)
        assert sorted(subjects) == [f"by worker {i}".encode() for i in range(5)]
        assert max(subjects.values()) == 1
        jobs = await api.db.one("SELECT status, owner FROM job")
        assert [j["status"] for j in jobs] == ["done"] * 5
    finally:
        if worker is not None and worker.returncode is None:
            worker.kill()
            await worker.wait()
        await api.db.close()
        await server.stop()
