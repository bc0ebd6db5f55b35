"""A real SMTP server for tests: aiosmtpd in its own thread, scripted replies, recorded mail.

`SmtpSink` runs aiosmtpd's `Controller` (its own thread and event loop, so it answers while
the test's loop awaits) on 127.0.0.1 and a port the kernel picks. Its behaviour attributes may
be changed while it runs; settings read per connection (`tls_context`, `smtputf8_supported`,
`auth_users`, `greeting_reply`, `refuse`) apply to the next connection.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message (a 250 was sent to the end of DATA)."""

    mail_from: str  # "" for the null reverse-path
    rcpt_tos: list[str]
    data: bytes  # as the client meant it: dot-stuffing removed, CRLF line ends
    peer: Any
    tls: bool
    mail_options: list[str]
    smtputf8: bool
    auth_user: str | None


class SmtpSink:
    """A scriptable SMTP server. Use `start()`/`stop()` or `with SmtpSink() as sink:`.

    Behaviour (all optional, changeable at runtime):

    * `rcpt_replies`: address -> reply for its RCPT, e.g. {"gone@x.test": "550 5.1.1 No such user"}
    * `mail_reply`: reply to every MAIL FROM instead of accepting it
    * `data_reply`: reply to every end of DATA instead of accepting (message not recorded)
    * `fail_next_data`: answer the next N ends of DATA with 451 4.3.0, then accept
    * `drop_next_data`: close the connection in the next N DATAs after the data arrived,
      without replying
    * `hold_data`: when an Event, every end of DATA waits until it is set (then replies as
      usual); `data_held` is set once a DATA is waiting
    * `greeting_reply`: send this instead of the 220 greeting and hang up (e.g. "421 4.3.2 busy")
    * `refuse`: accept the TCP connection and close it at once, without a greeting
    * `tls_context`: advertise STARTTLS with this server context (see `make_self_signed_context`)
    * `smtputf8_supported`: advertise SMTPUTF8 (default True)
    * `auth_users`: user -> password; AUTH PLAIN/LOGIN is offered without TLS and MAIL requires it
    * `pipelining`: advertise PIPELINING (RFC 2920; default True, as most MXes do). aiosmtpd
      reads commands one by one from its stream, so pipelined commands are served in order;
      `pipelined` counts the reads that held a RCPT and a DATA together.
    """

    def __init__(self, *, tls_context: ssl.SSLContext | None = None,
                 smtputf8_supported: bool = True, auth_users: dict[str, str] | None = None,
                 hostname: str = "sink.test", pipelining: bool = True) -> None:
        self.hostname = hostname
        self.pipelining = pipelining
        self.pipelined = 0
        self.tls_context = tls_context
        self.smtputf8_supported = smtputf8_supported
        self.auth_users = auth_users
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.fail_next_data = 0
        self.drop_next_data = 0
        self.hold_data: threading.Event | None = None
        self.data_held = threading.Event()
        self.open_sessions = 0  # TCP connections the sink has seen and not yet seen close
        self.greeting_reply: str | None = None
        self.refuse = False
        self.port = 0
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._controller: _SinkController | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages accepted so far."""
        with self._lock:
            return list(self._messages)

    def start(self) -> SmtpSink:
        controller = _SinkController(self)
        controller.start()
        self._controller = controller
        self.port = controller.port
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def wait_for(self, count: int, timeout: float = 10  # noqa: ASYNC109
                       ) -> list[ReceivedMessage]:
        """Wait (without blocking the caller's loop) until `count` messages arrived."""
        deadline = time.monotonic() + timeout
        while len(messages := self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink got {len(messages)} messages, wanted {count}")
            await asyncio.sleep(0.01)
        return messages

    def wait_for_sync(self, count: int, timeout: float = 10) -> list[ReceivedMessage]:
        """`wait_for` for synchronous code (blocks the calling thread)."""
        deadline = time.monotonic() + timeout
        while len(messages := self.messages) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink got {len(messages)} messages, wanted {count}")
            time.sleep(0.01)
        return messages

    def _take(self, counter: str) -> bool:
        with self._lock:
            left = getattr(self, counter)
            if left > 0:
                setattr(self, counter, left - 1)
                return True
            return False

    def _record(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.pipelining:
            responses.insert(-1, "250-PIPELINING")  # before the last line ("250 HELP")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if self.sink.auth_users is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.sink.mail_reply is not None:
            return self.sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.sink.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        if sink._take("drop_next_data"):
            assert server.transport is not None
            server.transport.close()
            await asyncio.sleep(3600)  # cancelled by connection_lost
        hold = sink.hold_data
        if hold is not None:
            sink.data_held.set()
            # A threading.Event (set from the test's thread); polled so stop() can cancel it.
            while not hold.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        if sink._take("fail_next_data"):
            return "451 4.3.0 Try again later (scripted)"
        if sink.data_reply is not None:
            return sink.data_reply
        assert envelope.mail_from is not None and isinstance(envelope.original_content, bytes)
        sink._record(ReceivedMessage(
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            peer=session.peer,
            tls=session.ssl is not None,
            mail_options=list(envelope.mail_options),
            smtputf8=envelope.smtp_utf8,
            auth_user=session.auth_data if session.authenticated else None,
        ))
        return "250 2.0.0 OK queued"

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
        users = self.sink.auth_users or {}
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            if users.get(user) == auth_data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


class _SinkSMTP(SMTP):
    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = handler.sink

    def connection_made(self, transport: Any) -> None:
        with self._sink._lock:
            self._sink.open_sessions += 1
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        with self._sink._lock:
            self._sink.open_sessions -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if b"RCPT TO:" in data and b"DATA\r\n" in data:
            with self._sink._lock:
                self._sink.pipelined += 1
        super().data_received(data)

    async def _handle_client(self) -> None:
        sink = self._sink
        if sink.refuse:
            assert self.transport is not None
            self.transport.close()
            return
        if sink.greeting_reply is not None:
            await self.push(sink.greeting_reply)
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()


class _SinkController(Controller):
    """Binds port 0 and reads back the port the kernel chose (no free-port race)."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink
        super().__init__(_Handler(sink), hostname="127.0.0.1", port=0, ready_timeout=5)

    def factory(self) -> SMTP:
        sink = self.sink
        handler = self.handler
        kwargs: dict[str, Any] = {
            "hostname": sink.hostname,
            "enable_SMTPUTF8": sink.smtputf8_supported,
            "tls_context": sink.tls_context,
            "timeout": 30,
        }
        if sink.auth_users is not None:
            kwargs.update(authenticator=handler.authenticate, auth_require_tls=False)
        return _SinkSMTP(handler, **kwargs)

    def _create_server(self) -> Any:
        async def bind() -> asyncio.AbstractServer:
            server = await self.loop.create_server(self._factory_invoker, host=self.hostname,
                                                   port=0)
            self.port = server.sockets[0].getsockname()[1]
            return server

        return bind()


def closed_port() -> int:
    """A localhost port with nothing listening (bound then released: connections are refused,
    unless something else grabs the port meanwhile; see the `refused_port` fixture)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_self_signed_cert(hostname: str) -> tuple[bytes, bytes]:
    """A throwaway (certificate PEM, private key PEM) for `hostname` and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def make_self_signed_context(hostname: str, cert: tuple[bytes, bytes] | None = None
                             ) -> ssl.SSLContext:
    """A server TLS context with a throwaway self-signed certificate (or the given one)."""
    cert_pem, key_pem = cert or make_self_signed_cert(hostname)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context
