"""Inbound SMTP transfer (port 25): the server, run in the caller's event loop, and the
interface to the policy (`InboundPolicy`, `InboundEnvelope`). The session protocol is in
`transfer_session`. Together they own the conversation (RFC 5321, SIZE RFC 1870, PIPELINING
RFC 2920, STARTTLS RFC 3207, 8BITMIME RFC 6152, SMTPUTF8 RFC 6531, enhanced status codes
RFC 2034/3463), its limits and timeouts, and the Received trace field. Who may connect, send or
receive, and where a message is stored, are decided by the policy passed in.

DATA (see `content.read_message`): only <CRLF>.<CRLF> ends a message; <LF>.<LF>, <CR>.<CR>,
<CR><LF>.<LF> and the other "SMTP smuggling" sequences are content. Bare CR and bare LF are
NORMALISED to CRLF (as Postfix 3.9's default `smtpd_forbid_bare_newline = normalize`), so the
stored bytes have CRLF line endings only. Dot-unstuffing (RFC 5321 §4.5.2) applies at the start
of each line as sent, i.e. after a CRLF: a dot after a bare CR or LF is content and is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from inbox.smtp.content import received_header

if TYPE_CHECKING:
    from inbox.smtp.transfer_session import TransferProtocol

__all__ = ["InboundEnvelope", "InboundPolicy", "TransferServer", "received_header"]

log = logging.getLogger(__name__)


@dataclass
class InboundEnvelope:
    peer_ip: str
    helo: str
    mail_from: str  # "" for the null reverse-path <>
    recipients: list[Any]  # the objects returned by policy.on_recipient, in order
    rcpt_addresses: list[str]
    data: bytes  # as received: dot-unstuffed, CRLF line endings, our Received field first
    tls: bool
    smtputf8: bool
    mail_options: list[str]


class InboundPolicy(Protocol):
    """What the product decides. Raise InboxError to refuse (it becomes the reply); any other
    exception is logged with its traceback and answered 451 4.3.0 (421 at connect)."""

    async def on_connect(self, peer_ip: str) -> None: ...
    async def on_mail(self, peer_ip: str, mail_from: str) -> None: ...
    async def on_recipient(self, peer_ip: str, address: str) -> Any: ...
    async def on_message(self, envelope: InboundEnvelope) -> str: ...


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class TransferServer:
    """The port-25 listener: `await start()` in the event loop the policy belongs to."""

    def __init__(self, policy: InboundPolicy, *, hostname: str, host: str = "127.0.0.1",
                 port: int = 25, tls_context: ssl.SSLContext | None, max_message_bytes: int,
                 max_recipients: int = 100, max_connections: int = 1000,
                 command_timeout_secs: float = 300, data_timeout_secs: float = 600,
                 max_errors: int = 20, shutdown_grace_secs: float = 10,
                 clock: Callable[[], datetime.datetime] = _utc_now) -> None:
        self.policy = policy
        self.hostname = hostname
        self.host = host
        self.tls_context = tls_context
        self.max_message_bytes = max_message_bytes
        self.max_recipients = max_recipients
        self.max_connections = max_connections
        self.command_timeout_secs = command_timeout_secs
        self.data_timeout_secs = data_timeout_secs
        self.max_errors = max_errors
        self.shutdown_grace_secs = shutdown_grace_secs
        self.clock = clock
        self._port = port
        self._server: asyncio.Server | None = None
        self._sessions: set[TransferProtocol] = set()
        self._inflight: set[asyncio.Future[Any]] = set()
        self._drained = asyncio.Event()  # set when the last session is gone

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("TransferServer already started")
        from inbox.smtp.transfer_session import TransferProtocol  # it imports this module

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: TransferProtocol(self, loop),
                                                self.host, self._port)
        log.info("smtp transfer listening on %s:%d", self.host, self.port)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    def _session_ended(self, session: TransferProtocol) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._drained.set()

    async def stop(self) -> None:
        """Stop accepting; let messages being handed to the policy get their reply (up to
        `shutdown_grace_secs`); then close every session with 421 4.3.2 and wait for them."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.shutdown_grace_secs)
        handlers = [s._handler_coroutine for s in self._sessions if s._handler_coroutine]
        for session in list(self._sessions):
            session.close(f"421 4.3.2 {self.hostname} Service shutting down")
        if handlers:
            await asyncio.wait(handlers, timeout=self.shutdown_grace_secs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace_secs
        while self._sessions and loop.time() < deadline:  # TLS close_notify exchanges
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), deadline - loop.time())
        for session in list(self._sessions):  # peers that did not let go in time
            session.abort()
        await server.wait_closed()
