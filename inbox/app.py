"""Composition root: build_services(settings, **overrides) and the ASGI app with its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
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
from inbox.errors import ConfigError
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
            relay = RelayConfig.parse(settings.SMTP_OUTBOUND_RELAY,
                                    starttls=settings.SMTP_OUTBOUND_RELAY_STARTTLS)
        except ValueError as exc:  # not reached from the CLI: Settings checked it already
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
    if db is not None:
        return await _build_services(settings, db, overrides)
    db = Database(settings.database_url, namespace=settings.DATABASE_NAMESPACE,
                  database=settings.DATABASE_DATABASE, username=settings.DATABASE_USERNAME,
                  password=settings.DATABASE_PASSWORD, sync=settings.INBOX_DB_SYNC)
    await db.connect()
    try:
        return await _build_services(settings, db, overrides)
    except BaseException:
        await db.close()  # a start-up error (e.g. ConfigError) leaves nothing open
        raise


async def _build_services(settings: Settings, db: Any, overrides: dict[str, Any]) -> Services:
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
        raise listen_error("SMTP_TRANSFER_PORT", s.SERVER_BIND_ADDR, server.port, exc) from None
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
        raise listen_error("SMTP_SUBMISSION_PORT/SMTP_SUBMISSIONS_PORT", s.SERVER_BIND_ADDR,
                           None, exc) from None
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


def listen_error(name: str, host: str, port: int | None, exc: OSError) -> ConfigError:
    """The one-line error for a listener that cannot bind, naming its setting."""
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"SERVER_BIND_ADDR: cannot listen on {host!r}: {exc.strerror or exc}")
    # asyncio's own strerror repeats the address: the system's words are enough.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    where = host if port is None else f"{host}:{port}"
    return ConfigError(f"{name}: cannot listen on {where}: {reason.lower()}")


def listening_ports(settings: Settings, *, transfer: bool = True) -> list[tuple[str, int]]:
    """(setting, port) of each listener `inbox serve` opens; 0 (a free port, or off) left out."""
    ports = [("INBOX_HTTP_PORT", settings.INBOX_HTTP_PORT)]
    if transfer and settings.INBOX_SMTP_TRANSFER_ENABLED:
        ports.append(("SMTP_TRANSFER_PORT", settings.SMTP_TRANSFER_PORT))
    if settings.INBOX_SMTP_SUBMISSION_ENABLED:
        ports += [("SMTP_SUBMISSION_PORT", settings.SMTP_SUBMISSION_PORT),
                  ("SMTP_SUBMISSIONS_PORT", settings.SMTP_SUBMISSIONS_PORT)]
    return [(name, port) for name, port in ports if port]


async def check_listeners(settings: Settings, *, transfer: bool = True) -> None:
    """Bind each port `inbox serve` will listen on, as its listener will (all at once, so two
    settings naming one port collide here too), then let go: a port in use or privileged is a
    ConfigError naming its setting before anything is opened or generated."""
    loop = asyncio.get_running_loop()
    probes: list[asyncio.AbstractServer] = []
    try:
        for name, port in listening_ports(settings, transfer=transfer):
            try:
                probes.append(await loop.create_server(asyncio.Protocol,
                                                       settings.SERVER_BIND_ADDR, port))
            except OSError as exc:
                raise listen_error(name, settings.SERVER_BIND_ADDR, port, exc) from None
    finally:
        for probe in probes:
            probe.close()
        for probe in probes:
            await probe.wait_closed()


@contextlib.asynccontextmanager
async def running_service(settings: Settings, *, workers: bool = True, transfer: bool = True,
                          settle_heap: bool = False, **overrides: Any
                          ) -> AsyncIterator[Services]:
    """Everything `inbox serve` runs besides HTTP, for the block: the services, the SMTP
    listeners (transfer, submission) and the delivery workers. `settle_heap`: tune the garbage
    collector once started (inbox.heap)."""
    services = await build_services(settings, **overrides)
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
            yield services
    finally:
        await services.db.close()


def create_app(settings: Settings, *, workers: bool = True, transfer: bool = True,
               settle_heap: bool = False, started: contextlib.AsyncExitStack | None = None,
               **overrides: Any) -> Any:
    """The ASGI app: GraphQL at /graphql, health at /healthz; its lifespan runs
    `running_service`. With `started` (see `serve`) the caller has started that already and
    set `app.state.services`; the lifespan only closes `started` at shutdown."""
    from fastapi import FastAPI

    from inbox.graphql import graphql_app

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if started is not None:
            try:
                yield
            finally:
                await started.aclose()
            return
        async with running_service(settings, workers=workers, transfer=transfer,
                                   settle_heap=settle_heap, **overrides) as services:
            app.state.services = services
            yield

    app = FastAPI(title="inbox", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return InboxApp(app, graphql_app(lambda: app.state.services))


def serve(settings: Settings, *, workers: bool = True) -> None:
    """`inbox serve`: the HTTP API under uvicorn, with the SMTP listeners and workers.

    Everything that can fail at start-up happens before uvicorn starts, so the failure reaches
    the caller as a ConfigError (one line, no traceback): the ports are checked first (nothing
    is opened or generated yet), then the services are built and the listeners and workers
    started. uvicorn's lifespan then only stops them, at shutdown, before uvicorn re-raises
    the signal that stopped it."""
    import uvicorn

    stop = contextlib.AsyncExitStack()
    app = create_app(settings, started=stop)
    config = uvicorn.Config(app, host=settings.SERVER_BIND_ADDR, port=settings.INBOX_HTTP_PORT,
                            log_level=settings.INBOX_LOG_LEVEL.lower(), access_log=False)
    server = uvicorn.Server(config)

    async def main() -> None:
        await check_listeners(settings)
        async with stop:  # closes what was started if uvicorn never ran the lifespan
            app.state.services = await stop.enter_async_context(
                running_service(settings, workers=workers, settle_heap=True))
            await server.serve()

    # The event loop uvicorn.run would use (uvloop when installed).
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())


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
