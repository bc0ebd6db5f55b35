"""Composition root: build_services(settings, **overrides) and the ASGI app with its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from inbox.config import Settings
from inbox.delivery.queue import Queue
from inbox.delivery.signers import SignerCache
from inbox.delivery.transport import RelayConfig, SmtpTransport
from inbox.delivery.worker import DeliveryWorker
from inbox.resolver import Resolver
from inbox.storage import Database
from inbox.telemetry import setup_telemetry
from inbox.tenancy import AuthCache, TenantCache
from inbox.tenancy.keys import SecretBox
from inbox.tenancy.masterkey import load_master_box

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    resolver: Any
    transport: Any
    box: SecretBox
    queue: Queue
    signers: SignerCache
    auth: AuthCache
    tenant_cache: TenantCache
    # Domain verification asks DNS afresh: a tenant who just published a record and presses
    # "verify" must not wait out our negative cache.
    verify_resolver: Any = None
    clock: Callable[[], datetime] = utcnow
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    def worker(self, name: str | None = None) -> DeliveryWorker:
        return DeliveryWorker(queue=self.queue, resolver=self.resolver, transport=self.transport,
                              signers=self.signers, settings=self.settings, clock=self.clock,
                              wakeup=self.wakeup, name=name)


def build_transport(settings: Settings) -> SmtpTransport:
    relay = None
    if settings.SMTP_OUTBOUND_RELAY:
        try:
            relay = RelayConfig.parse(settings.SMTP_OUTBOUND_RELAY)
        except ValueError as exc:
            from inbox.errors import ConfigError

            raise ConfigError(f"SMTP_OUTBOUND_RELAY: {exc}") from None
    return SmtpTransport(helo_name=settings.SERVER_HOSTNAME, port=settings.SMTP_OUTBOUND_PORT,
                         timeout=settings.SMTP_OUTBOUND_TIMEOUT_SECS, relay=relay)


async def build_services(settings: Settings, **overrides: Any) -> Services:
    """Make every service from settings; any piece can be overridden (tests, embedding)."""
    setup_telemetry(settings)
    db = overrides.pop("db", None)
    if db is None:
        db = Database(settings.database_url, namespace=settings.DATABASE_NAMESPACE,
                      database=settings.DATABASE_DATABASE, username=settings.DATABASE_USERNAME,
                      password=settings.DATABASE_PASSWORD, sync=settings.INBOX_DB_SYNC)
        await db.connect()
    box = overrides.pop("box", None) or load_master_box(settings.INBOX_MASTER_KEY,
                                                        settings.INBOX_DATA_DIR)
    resolver = overrides.pop("resolver", None) or Resolver(
        settings.INBOX_DNS_NAMESERVERS or None, timeout=settings.INBOX_DNS_TIMEOUT_SECS)
    transport = overrides.pop("transport", None) or build_transport(settings)
    services = Services(
        settings=settings, db=db, resolver=resolver, transport=transport, box=box,
        queue=Queue(db), signers=SignerCache(db, box, settings.SMTP_DKIM_HEADERS,
                                             settings.SMTP_DKIM_ED25519),
        auth=AuthCache(settings.INBOX_CACHE_SECS),
        tenant_cache=TenantCache(settings.INBOX_CACHE_SECS),
        verify_resolver=overrides.pop("verify_resolver", None) or Resolver(
            settings.INBOX_DNS_NAMESERVERS or None, timeout=settings.INBOX_DNS_TIMEOUT_SECS,
            cache=False),
    )
    return replace(services, **overrides) if overrides else services


@contextlib.asynccontextmanager
async def running_workers(services: Services, count: int = 1) -> AsyncIterator[None]:
    """Run delivery workers in this process for the duration of the block."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(services.worker().run(stop)) for _ in range(count)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        aclose = getattr(services.transport, "aclose", None)
        if aclose is not None:
            await aclose()  # pooled SMTP sessions: QUIT politely


def create_app(settings: Settings, *, workers: bool = True, **overrides: Any) -> Any:
    """The ASGI app: GraphQL at /graphql, health at /healthz; workers run in its lifespan."""
    from fastapi import FastAPI

    from inbox.graphql import graphql_router

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await build_services(settings, **overrides)
        app.state.services = services
        try:
            if workers:
                async with running_workers(services):
                    yield
            else:
                yield
        finally:
            await services.db.close()

    app = FastAPI(title="inbox", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(graphql_router(), prefix="/graphql")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
