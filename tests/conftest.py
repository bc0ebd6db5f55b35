"""Shared fixtures: a real DNS server, a real SMTP sink, the real database engine and a real
HTTP server running the inbox app, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from inbox.app import Services, build_services, create_app, running_workers
from inbox.config import Settings, load_settings
from inbox.tenancy import add_domain, create_api_key, create_organization, dns_records
from tests.support.dnsserver import DnsServer
from tests.support.fixtures_dns import dns_server, resolver  # noqa: F401
from tests.support.fixtures_smtp import smtp_sink, smtp_sink_tls  # noqa: F401
from tests.support.localstack import localstack  # noqa: F401  (one per session, shared)

MASTER_KEY = base64.b64encode(b"k" * 32).decode()


def make_settings(tmp_path: Any, dns: DnsServer | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "INBOX_DATA_DIR": str(tmp_path / "data"),
        "INBOX_MASTER_KEY": MASTER_KEY,
        "SERVER_HOSTNAME": "outbound.inbox.test",
        "SMTP_OUTBOUND_QUEUE_POLL_SECS": "0.05",
        "SMTP_OUTBOUND_RETRY_BASE_DELAY_SECS": "0.2",
        "SMTP_OUTBOUND_RETRY_MAX_DELAY_SECS": "0.5",
        "SMTP_OUTBOUND_TIMEOUT_SECS": "5",
        "INBOX_DNS_TIMEOUT_SECS": "2",
        "INBOX_HTTP_PORT": "0",
    }
    if dns is not None:
        values["INBOX_DNS_NAMESERVERS"] = dns.address
    values.update({k: str(v) for k, v in overrides.items()})
    return load_settings(env={}, **values)


@dataclass
class Tenant:
    org: str
    domain: str
    key: str
    records: list[dict[str, str]]


def publish(dns: DnsServer, records: list[dict[str, str]]) -> None:
    for record in records:
        dns.add_txt(record["name"], record["value"])


async def make_tenant(services: Services, dns: DnsServer, domain: str = "sender.test",
                      *, scopes: tuple[str, ...] = ("send", "read", "admin"),
                      verified: bool = True, name: str = "Acme") -> Tenant:
    now = services.clock()
    org = await create_organization(services.db, name, now)
    row = await add_domain(services.db, services.box, org["id"], domain, now, verified=verified)
    records = dns_records(row)
    publish(dns, records)
    _, key = await create_api_key(services.db, org["id"], list(scopes), now)
    return Tenant(org=org["id"], domain=row["domain"], key=key, records=records)


def route_to_sink(dns: DnsServer, domain: str, host: str = "mx") -> None:
    """`domain` has an MX pointing at 127.0.0.1 (the sink listens on SMTP_OUTBOUND_PORT)."""
    dns.add(domain, "MX", f"10 {host}.{domain}.")
    dns.add(f"{host}.{domain}", "A", "127.0.0.1")


class Api:
    """A GraphQL client speaking HTTP to the running server."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def __call__(self, query: str, variables: dict[str, Any] | None = None, *,
                       key: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = await self.client.post("/graphql", json={"query": query,
                                                        "variables": variables or {}},
                                      headers=headers)
        assert resp.status_code == 200, resp.text
        return resp.json()


@dataclass
class Stack:
    settings: Settings
    services: Services
    api: Api
    dns: DnsServer
    base_url: str


@contextlib.asynccontextmanager
async def run_stack(settings: Settings, dns: DnsServer, *, workers: bool = True,
                    **overrides: Any) -> AsyncIterator[Stack]:
    services = await build_services(settings, **overrides)
    app = create_app(settings, workers=False, **overrides)
    app.state.services = services
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    serve = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
            if serve.done():
                serve.result()
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            stack = Stack(settings, services, Api(client), dns, base)
            if workers:
                async with running_workers(services):
                    yield stack
            else:
                yield stack
    finally:
        server.should_exit = True
        await serve
        await services.db.close()


@pytest.fixture
async def stack(tmp_path: Any, dns_server: DnsServer, smtp_sink: Any  # noqa: F811
                ) -> AsyncIterator[Stack]:
    settings = make_settings(tmp_path, dns_server, SMTP_OUTBOUND_PORT=smtp_sink.port,
                             INBOX_DB_SYNC="false")
    async with run_stack(settings, dns_server) as s:
        yield s


SEND = """
mutation Send($from: String!, $to: [String!], $cc: [String!], $bcc: [String!],
              $subject: String!, $text: String, $html: String, $key: String,
              $tags: [String!], $metadata: JSON, $headers: [HeaderInput!],
              $attachments: [AttachmentInput!]) {
  sendEmail(from: $from, to: $to, cc: $cc, bcc: $bcc, subject: $subject, textBody: $text,
            htmlBody: $html, idempotencyKey: $key, tags: $tags, metadata: $metadata,
            headers: $headers, attachments: $attachments) {
    message { id messageId status recipients { address status } }
    errors { code field message limit resetsAt }
  }
}
"""

MESSAGE = """
query M($id: ID!) {
  message(id: $id) {
    id messageId from subject status tags metadata
    recipients { address status attempts lastResponse nextAttemptAt }
    events { type at recipient detail }
  }
}
"""


async def wait_status(api: Api, key: str, message_id: str, statuses: set[str],
                      timeout: float = 15.0) -> dict[str, Any]:
    """Poll the API until the message reaches one of `statuses`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        data = await api(MESSAGE, {"id": message_id}, key=key)
        msg = data["data"]["message"]
        if msg and msg["status"] in statuses:
            return msg
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"message stayed {msg and msg['status']}: {msg}")
        await asyncio.sleep(0.05)


