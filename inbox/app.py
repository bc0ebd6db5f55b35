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
from inbox.delivery.handoff import Handoff
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
    # Receiving (port 25) and stored mail.
    blobs: Any = None
    org_keys: Any = None
    mailstore: Any = None
    limiter: Any = None
    pubsub: Any = None
    inbound: Any = None
    # Outbound TLS policy: MTA-STS policy cache and the per-host planner.
    mtasts: Any = None
    tls_planner: Any = None
    clock: Callable[[], datetime] = utcnow
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Stored jobs go straight to a local worker with room (delivery/handoff.py).
    handoff: Handoff = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "handoff", Handoff(self.wakeup))  # frozen dataclass

    def worker(self, name: str | None = None) -> DeliveryWorker:
        return DeliveryWorker(queue=self.queue, resolver=self.resolver, transport=self.transport,
                              signers=self.signers, settings=self.settings, clock=self.clock,
                              wakeup=self.wakeup, name=name, tls_planner=self.tls_planner,
                              handoff=self.handoff)


def build_transport(settings: Settings) -> Any:
    """The outbound transport: an `SmtpTransport`, in a child process when
    SMTP_OUTBOUND_PROCESS says so (`ProcessTransport`, same interface)."""
    relay = None
    if settings.SMTP_OUTBOUND_RELAY:
        try:
            relay = RelayConfig.parse(settings.SMTP_OUTBOUND_RELAY)
        except ValueError as exc:
            from inbox.errors import ConfigError

            raise ConfigError(f"SMTP_OUTBOUND_RELAY: {exc}") from None
    if settings.outbound_process:
        from inbox.delivery.outproc import ProcessTransport

        return ProcessTransport(helo_name=settings.SERVER_HOSTNAME,
                                port=settings.SMTP_OUTBOUND_PORT,
                                timeout=settings.SMTP_OUTBOUND_TIMEOUT_SECS, relay=relay,
                                ca_file=settings.SMTP_OUTBOUND_CA_FILE or None,
                                max_sessions_per_host=settings.SMTP_OUTBOUND_MAX_SESSIONS_PER_HOST,
                                log_level=settings.INBOX_LOG_LEVEL)
    return SmtpTransport(helo_name=settings.SERVER_HOSTNAME, port=settings.SMTP_OUTBOUND_PORT,
                         timeout=settings.SMTP_OUTBOUND_TIMEOUT_SECS, relay=relay,
                         ca_file=settings.SMTP_OUTBOUND_CA_FILE or None,
                         max_sessions_per_host=settings.SMTP_OUTBOUND_MAX_SESSIONS_PER_HOST)


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
    blobs = overrides.pop("blobs", None)
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
    services = replace(services, **overrides) if overrides else services
    return _with_inbound(services, blobs=blobs)


def build_blobs(settings: Settings) -> Any:
    from inbox.storage.blobs import build_blob_store

    return build_blob_store(
        endpoint=settings.S3_ENDPOINT, bucket=settings.S3_BUCKET,
        access_key_id=settings.S3_ACCESS_KEY_ID,
        secret_access_key=settings.S3_SECRET_ACCESS_KEY, region=settings.S3_REGION,
        force_path_style=settings.S3_FORCE_PATH_STYLE, local_dir=settings.incoming_dir)


def _with_inbound(services: Services, *, blobs: Any) -> Services:
    """The stored-mail side, built on the (possibly overridden) core services."""
    from inbox.pubsub import PubSub
    from inbox.storage.mailstore import MailStore
    from inbox.storage.ratelimits import RateLimiter
    from inbox.tenancy.orgkeys import OrgKeys

    s = services.settings
    blobs = services.blobs or blobs or build_blobs(s)
    org_keys = services.org_keys or OrgKeys(services.db, services.box)
    mailstore = services.mailstore or MailStore(services.db, blobs, org_keys,
                                                keep_parts=s.INBOX_STORE_PARSED_PARTS)
    from inbox.delivery.mtasts import MtaStsResolver
    from inbox.delivery.tlspolicy import TlsPolicyPlanner

    mtasts = services.mtasts or MtaStsResolver(services.db, services.resolver,
                                               clock=services.clock,
                                               ca_file=s.SMTP_OUTBOUND_CA_FILE or None,
                                               memo_secs=s.INBOX_CACHE_SECS)
    planner = services.tls_planner or TlsPolicyPlanner(services.resolver, s, mtasts)
    return replace(services, blobs=blobs, org_keys=org_keys, mailstore=mailstore,
                   limiter=services.limiter or RateLimiter(services.db),
                   pubsub=services.pubsub or PubSub(), mtasts=mtasts, tls_planner=planner)


def build_inbound(services: Services) -> Any:
    """The policy behind port 25 (rate limits, recipients, authentication, storage)."""
    from publicsuffixlist import PublicSuffixList

    from inbox.smtp.receiving import InboundLimits, InboundService

    s = services.settings
    return InboundService(
        db=services.db, resolver=services.resolver, mailstore=services.mailstore,
        limiter=services.limiter, pubsub=services.pubsub, psl=PublicSuffixList(),
        hostname=s.SERVER_HOSTNAME,
        limits=InboundLimits(
            connections_per_minute=s.SMTP_RATE_LIMIT_CONNECTIONS_PER_MINUTE,
            messages_per_minute=s.SMTP_RATE_LIMIT_MESSAGES_PER_MINUTE,
            fail_open=s.SMTP_RATE_LIMIT_FAIL_OPEN_ON_DB_ERROR,
            require_spf=s.SMTP_REQUIRE_SPF_PASS, require_dkim=s.SMTP_REQUIRE_DKIM_PASS,
            require_dmarc=s.SMTP_REQUIRE_DMARC_PASS, keep_parts=s.INBOX_STORE_PARSED_PARTS,
            cache_secs=s.INBOX_CACHE_SECS),
        clock=services.clock)


@contextlib.asynccontextmanager
async def running_transfer(services: Services, *, port: int | None = None
                           ) -> AsyncIterator[Any]:
    """Run the inbound SMTP transfer server (port 25) in this event loop for the block."""
    from inbox.smtp.certs import load_tls_context
    from inbox.smtp.transfer import TransferServer

    s = services.settings
    server = TransferServer(
        services.inbound or build_inbound(services), hostname=s.SERVER_HOSTNAME,
        host=s.SERVER_BIND_ADDR,
        port=s.SMTP_TRANSFER_PORT if port is None else port,
        tls_context=load_tls_context(s.SMTP_TLS_CERT_FILE, s.SMTP_TLS_KEY_FILE,
                                     s.INBOX_DATA_DIR / "tls", s.SERVER_HOSTNAME),
        max_message_bytes=s.SMTP_MAX_MESSAGE_BYTES, max_recipients=s.SMTP_INBOUND_MAX_RCPT_TO,
        max_connections=s.SERVER_MAX_CONNECTIONS,
        command_timeout_secs=s.SMTP_COMMAND_TIMEOUT_SECS,
        data_timeout_secs=s.SMTP_DATA_TIMEOUT_SECS)
    sweep = getattr(services.blobs, "remove_stale_temp", None)
    if sweep is not None:
        await sweep()  # temp files of puts a crash interrupted (never visible as blobs)
    try:
        await server.start()
    except OSError as exc:
        from inbox.errors import ConfigError

        raise ConfigError(f"SMTP_TRANSFER_PORT: cannot listen on {s.SERVER_BIND_ADDR}:"
                          f"{s.SMTP_TRANSFER_PORT}: {exc.strerror or exc}") from None
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_submission(services: Services, port: int | None = None,
                             tls_port: int | None = None) -> AsyncIterator[Any]:
    """Run SMTP submission in this event loop for the block: STARTTLS on SMTP_SUBMISSION_PORT
    and implicit TLS on SMTP_SUBMISSIONS_PORT (0 = off). Yields the listeners (.port,
    .tls_port)."""
    from inbox.errors import ConfigError
    from inbox.smtp.certs import load_tls_context
    from inbox.smtp.submission import build_submission

    s = services.settings
    tls = load_tls_context(s.SMTP_TLS_CERT_FILE, s.SMTP_TLS_KEY_FILE, s.INBOX_DATA_DIR / "tls",
                           s.SERVER_HOSTNAME)
    if tls is None:  # not reached: a development certificate is made when none is configured
        raise ConfigError("SMTP_TLS_CERT_FILE: submission needs TLS")
    listeners = build_submission(
        services, tls_context=tls, port=s.SMTP_SUBMISSION_PORT if port is None else port,
        tls_port=s.SMTP_SUBMISSIONS_PORT if tls_port is None else tls_port)
    try:
        await listeners.start()
    except OSError as exc:
        raise ConfigError(f"SMTP_SUBMISSION_PORT/SMTP_SUBMISSIONS_PORT: cannot listen on "
                          f"{s.SERVER_BIND_ADDR}: {exc.strerror or exc}") from None
    try:
        yield listeners
    finally:
        await listeners.stop()


@contextlib.asynccontextmanager
async def running_workers(services: Services, count: int = 1) -> AsyncIterator[None]:
    """Run delivery workers in this process for the duration of the block."""
    from inbox.delivery.tlsrpt_report import run_daily

    stop = asyncio.Event()
    tasks = [asyncio.create_task(services.worker().run(stop)) for _ in range(count)]
    start = getattr(services.transport, "start", None)  # a delivery process: start it now
    if start is not None:
        tasks.append(asyncio.create_task(start()))
    # TLS-RPT (RFC 8460): yesterday's aggregate reports, once a day (claimed in the database,
    # so several instances send each report once).
    tasks.append(asyncio.create_task(run_daily(services, stop, clock=services.clock)))
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        aclose = getattr(services.transport, "aclose", None)
        if aclose is not None:
            await aclose()  # pooled SMTP sessions: QUIT politely


def create_app(settings: Settings, *, workers: bool = True, transfer: bool = True,
               settle_heap: bool = False, **overrides: Any) -> Any:
    """The ASGI app: GraphQL at /graphql, health at /healthz; workers run in its lifespan.
    `settle_heap` (for `inbox serve`): tune the garbage collector once started (inbox.heap)."""
    from fastapi import FastAPI

    from inbox.graphql import graphql_app

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await build_services(settings, **overrides)
        app.state.services = services
        try:
            async with contextlib.AsyncExitStack() as stack:
                if transfer and settings.INBOX_SMTP_TRANSFER_ENABLED:
                    await stack.enter_async_context(running_transfer(services))
                if settings.INBOX_SMTP_SUBMISSION_ENABLED:
                    await stack.enter_async_context(running_submission(services))
                if workers:
                    await stack.enter_async_context(running_workers(services))
                if settle_heap:
                    from inbox import heap

                    heap.settle()
                yield
        finally:
            await services.db.close()

    app = FastAPI(title="inbox", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return InboxApp(app, graphql_app(lambda: app.state.services))


class InboxApp:
    """The served ASGI app: /graphql straight to strawberry's view (inbox/graphql/__init__.py
    says why); the rest (/healthz) and the lifespan to FastAPI. `state` is FastAPI's."""

    def __init__(self, fastapi: Any, graphql: Any) -> None:
        self.fastapi, self.graphql = fastapi, graphql
        self.state = fastapi.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan" and scope["path"] in ("/graphql", "/graphql/"):
            scope["app"] = self.fastapi  # Request.app, as under FastAPI
            await self.graphql(scope, receive, send)
        else:
            await self.fastapi(scope, receive, send)
