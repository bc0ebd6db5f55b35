"""Outbound SMTP client: one delivery attempt of one message to one recipient domain's MX hosts,
over pooled sessions. Does not resolve DNS or touch the database.

`SmtpTransport.deliver` never raises for SMTP or network trouble; it returns an `AttemptResult`
with one `RecipientResult` per recipient:

* hosts are tried in order; a host that cannot be used before the transaction starts (connect
  refused/timed out/reset, a 4xx or 5xx greeting, EHLO/HELO refused, a 421 or a dropped
  connection before DATA) moves on to the next one (RFC 5321 §5.1: try the other MX hosts);
* STARTTLS is used when offered, without certificate checks (opportunistic, RFC 7435 / RFC
  3207). If the TLS handshake fails the connection is unusable, so that host is retried once
  in plaintext (`TlsOutcome.error` says why); a refused STARTTLS (454) continues in plaintext;
* a recipient counts as delivered only after a 2xx reply to the end of DATA (RFC 5321 §4.1.1.4);
  a connection lost during DATA leaves the accepted recipients temporary (a duplicate is
  better than a loss, RFC 5321 §6.1).

Sessions are reused (a fresh connect, EHLO and STARTTLS per message costs more than the
message). Each transport keeps idle sessions per (host, port, TLS name, relay): after a
transaction the server answered in full, the session goes back to the pool (RSET first if a
transaction is still open; after a completed DATA the next MAIL may follow directly, RFC 5321
§4.1.1.4) instead of QUIT, within `max_idle_secs`, `max_messages_per_connection` and
`max_connections_per_endpoint`. A session left in an unknown state (timeout, connection lost,
anything raised mid-command) is closed. A pooled session may have died while idle: if its MAIL
FROM fails with 421 or a connection error, nothing was accepted, so it is dropped and the host
is tried once more on a fresh connection, as if the pool had been empty. Nothing is retried
once DATA was sent. `aclose()` closes every pooled session (the worker calls it on shutdown).

Hosts are strings or objects with a `.host` attribute (e.g. `inbox.delivery.mx.MxHost`). An
object may also carry a `.port`, overriding the transport's port: an affordance for tests and
relays, since real MX hosts all listen on 25.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
)

log = logging.getLogger(__name__)

TlsContextFactory = Callable[[str], ssl.SSLContext]
"""Given the host name being connected to, the client TLS context to use for STARTTLS."""

# RFC 3463 §2: class "." subject "." detail; subject and detail are 1-3 digits.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_QUIT_TIMEOUT = 5.0


class HostLike(Protocol):
    """Anything with a host name, e.g. a frozen `MxHost`; an optional `.port` is honoured."""

    @property
    def host(self) -> str: ...


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient: the remote (or a synthetic) reply and what it means."""

    address: str
    code: int
    enhanced: str | None
    text: str
    temporary: bool
    delivered: bool

    @property
    def reply(self) -> str:
        """The reply as one line, e.g. "250 2.0.0 OK queued"."""
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)

    @property
    def permanent(self) -> bool:
        return not self.delivered and not self.temporary


@dataclass(frozen=True)
class TlsOutcome:
    """Whether the session that carried the transaction used TLS.

    `error` is set when STARTTLS was offered but not used (refused or handshake failed).
    """

    used: bool
    version: str | None = None
    cipher: str | None = None
    error: str | None = None


NO_TLS = TlsOutcome(used=False)


@dataclass(frozen=True)
class AttemptResult:
    """One attempt. `host` is the host that ran the transaction, None when none could be used;
    then `connection_error` says what went wrong with each host tried."""

    recipients: list[RecipientResult]
    host: str | None
    tls: TlsOutcome
    connection_error: str | None


@dataclass(frozen=True)
class RelayConfig:
    """A smarthost: all mail goes there instead of the recipients' MX hosts.

    `starttls=True` makes STARTTLS mandatory (the relay's certificate is verified unless the
    transport was given a `tls_context_factory`); `False` never starts TLS.
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = True

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("relay host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"relay port {self.port} is not in 1..65535")
        if (self.username is None) != (self.password is None):
            raise ValueError("relay username and password go together")

    @classmethod
    def parse(cls, value: str, *, starttls: bool = True) -> RelayConfig:
        """Parse "host:port" or "user:password@host:port" ("[::1]:587" for IPv6).

        The password may contain ":" and "@" (the last "@" ends it); the user may not contain ":".
        Error messages never include the password.
        """
        userinfo, at, hostport = value.strip().rpartition("@")
        shown = f"<user>:<password>@{hostport}" if at else hostport
        expected = "expected host:port or user:password@host:port"
        username = password = None
        if at:
            username, colon, password = userinfo.partition(":")
            if not colon or not username:
                raise ValueError(f"relay {shown!r}: credentials must be user:password; {expected}")
        if hostport.startswith("["):
            host, bracket, rest = hostport[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ValueError(f"relay {shown!r}: {expected}")
            port_text = rest[1:]
        else:
            host, colon, port_text = hostport.rpartition(":")
            if not colon or ":" in host:
                raise ValueError(f"relay {shown!r}: {expected}")
        if not host:
            raise ValueError(f"relay {shown!r}: missing host; {expected}")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"relay {shown!r}: port must be a number in 1..65535")
        return cls(host, int(port_text), username, password, starttls)


def split_enhanced(code: int, message: str) -> tuple[str | None, str]:
    """Split an RFC 3463 enhanced status code off a reply text: (enhanced or None, text).

    The code counts only if its class matches the reply's first digit (RFC 2034 §4). A
    multi-line reply repeating the code on each line (as Gmail does) becomes one line of text.
    """
    lines = [line.strip() for line in message.splitlines()]
    match = _ENHANCED.match(lines[0]) if lines else None
    if match is None or match.group(1) != str(code)[:1]:
        return None, " ".join(line for line in lines if line)
    enhanced = f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"
    raw_code = match.group(0)
    text = []
    for line in lines:
        if line.startswith(raw_code) and line[len(raw_code):len(raw_code) + 1] in ("", " ", "\t"):
            line = line[len(raw_code):].strip()
        if line:
            text.append(line)
    return enhanced, " ".join(text)


def opportunistic_tls_context() -> ssl.SSLContext:
    """A client context that encrypts without authenticating (RFC 7435 opportunistic security).

    Cheap to build: it loads no CA certificates. DANE/MTA-STS will supply verifying contexts.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _from_reply(address: str, code: int, message: str, *, delivered: bool = False
                ) -> RecipientResult:
    enhanced, text = split_enhanced(code, message)
    return RecipientResult(address, code, enhanced, text,
                           temporary=not delivered and not 500 <= code < 600, delivered=delivered)


def _synthetic(address: str, code: int, enhanced: str, text: str) -> RecipientResult:
    return RecipientResult(address, code, enhanced, text, temporary=code < 500, delivered=False)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SMTPResponseException):
        return f"{exc.code} {' '.join(exc.message.split())}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


class _Endpoint(NamedTuple):
    host: str  # what we connect to: an IP address or a name
    port: int
    name: str = ""  # the MX host name, for TLS (SNI, certificate checks); defaults to host

    @property
    def tls_name(self) -> str:
        return self.name or self.host


class _PoolKey(NamedTuple):
    host: str
    port: int
    tls_name: str
    relay: bool


class _HostFailed(Exception):
    """This host cannot be used for this attempt; try the next one."""

    def __init__(self, text: str, *, code: int = 0, enhanced: str | None = None,
                 reply_text: str = "", permanent: bool = False,
                 tls_handshake: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.enhanced = enhanced
        self.reply_text = reply_text
        self.permanent = permanent
        self.tls_handshake = tls_handshake


class _StaleSession(_HostFailed):
    """A pooled session failed its MAIL FROM (421 or connection error): it died while idle.
    Nothing was accepted on it, so a fresh connection to the same host may be tried."""


@dataclass
class _Connection:
    """An open, greeted (and possibly TLS-upgraded and authenticated) session."""

    endpoint: _Endpoint
    smtp: SMTP
    tls: TlsOutcome
    transactions: int = 0  # MAIL commands sent on this session
    ready: bool = False  # the last transaction left the session ready for a new MAIL
    idle_since: float = 0.0


_TlsMode = Literal["off", "opportunistic", "required"]


class SmtpTransport:
    """Delivers one message per `deliver` call over SMTP, reusing idle sessions per endpoint.

    Pool limits: a session idle for more than `max_idle_secs` is closed (checked whenever a
    session is taken or returned); one that has carried `max_messages_per_connection`
    transactions is closed with QUIT; at most `max_connections_per_endpoint` idle sessions are
    kept per endpoint (concurrent deliveries beyond that open extra connections, closed after
    use). `max_connections_per_endpoint=0` turns pooling off. `clock` is a monotonic clock in
    seconds. Call `aclose()` when done.
    """

    def __init__(self, helo_name: str, port: int = 25, timeout: float = 60,
                 relay: RelayConfig | None = None,
                 tls_context_factory: TlsContextFactory | None = None,
                 source_address: str | None = None, *, max_idle_secs: float = 30,
                 max_messages_per_connection: int = 100, max_connections_per_endpoint: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not helo_name or not helo_name.isascii() or any(c.isspace() for c in helo_name):
            raise ValueError(f"helo_name {helo_name!r} must be an ASCII host name")
        if not max_idle_secs >= 0:
            raise ValueError(f"max_idle_secs {max_idle_secs!r} must be >= 0")
        if max_messages_per_connection < 1:
            raise ValueError(f"max_messages_per_connection {max_messages_per_connection} "
                             "must be >= 1")
        if max_connections_per_endpoint < 0:
            raise ValueError(f"max_connections_per_endpoint {max_connections_per_endpoint} "
                             "must be >= 0")
        self.helo_name = helo_name
        self.port = port
        self.timeout = timeout
        self.relay = relay
        self.source_address = source_address
        self._tls_context_factory = tls_context_factory
        self._opportunistic = opportunistic_tls_context()
        self._verifying: ssl.SSLContext | None = None
        self.max_idle_secs = max_idle_secs
        self.max_messages_per_connection = max_messages_per_connection
        self.max_connections_per_endpoint = max_connections_per_endpoint
        self._clock = clock
        self._idle: dict[_PoolKey, list[_Connection]] = {}  # oldest first
        self._next_sweep = 0.0
        self._closing: set[asyncio.Task[None]] = set()  # QUITs sent in the background
        self._closed = False

    async def deliver(self, hosts: Sequence[str | HostLike], mail_from: str,
                      recipients: Sequence[str], raw: bytes, *, smtputf8: bool = False
                      ) -> AttemptResult:
        """Try `hosts` in order (or the relay, ignoring `hosts`) until one runs the transaction.

        `smtputf8=True` means the envelope or headers need SMTPUTF8 (RFC 6531); a server
        without it fails every recipient permanently with 5.6.7.
        """
        rcpts = list(recipients)
        if not rcpts:
            return AttemptResult([], None, NO_TLS, None)
        failures: list[tuple[_Endpoint, _HostFailed]] = []
        for endpoint in self._endpoints(hosts):
            try:
                conn, results = await self._deliver_to(endpoint, mail_from, rcpts, raw,
                                                       smtputf8)
            except _HostFailed as exc:
                log.info("smtp %s:%s unusable: %s", endpoint.host, endpoint.port, exc.text)
                failures.append((endpoint, exc))
                continue
            return AttemptResult(results, endpoint.host, conn.tls, None)
        return _unreachable(rcpts, failures)

    async def close_idle(self) -> None:
        """Close every idle pooled session (with QUIT). The transport stays usable."""
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        await asyncio.gather(*(self._close(conn) for conn in idle))

    async def aclose(self) -> None:
        """Close every pooled session and wait for closes under way. Later deliveries still
        work, on sessions that are closed after use."""
        self._closed = True
        await self.close_idle()
        while self._closing:
            await asyncio.gather(*self._closing)

    async def _deliver_to(self, endpoint: _Endpoint, mail_from: str, rcpts: list[str],
                          raw: bytes, smtputf8: bool
                          ) -> tuple[_Connection, list[RecipientResult]]:
        """One transaction with this endpoint, on a pooled session if there is one.

        Raises `_HostFailed` when the host cannot be used (nothing was sent after DATA).
        """
        key = self._pool_key(endpoint)
        pooled = self._take(key)
        if pooled is not None:
            try:
                return pooled, await self._run(pooled, mail_from, rcpts, raw, smtputf8)
            except _StaleSession as exc:
                # Nothing was accepted: the same as if the pool had been empty.
                log.info("smtp %s:%s pooled session unusable, reconnecting: %s",
                         endpoint.host, endpoint.port, exc.text)
        conn = await self._connect(endpoint)
        return conn, await self._run(conn, mail_from, rcpts, raw, smtputf8)

    async def _run(self, conn: _Connection, mail_from: str, rcpts: list[str], raw: bytes,
                   smtputf8: bool) -> list[RecipientResult]:
        try:
            results = await self._transaction(conn, mail_from, rcpts, raw, smtputf8)
        except BaseException:  # host failed, or cancelled: unknown state, no polite QUIT
            conn.smtp.close()
            raise
        self._release(conn)
        return results

    def _pool_key(self, endpoint: _Endpoint) -> _PoolKey:
        return _PoolKey(endpoint.host, endpoint.port, endpoint.tls_name, self.relay is not None)

    def _take(self, key: _PoolKey) -> _Connection | None:
        self._sweep(self._clock())
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have timed out
            if conn.smtp.is_connected:
                return conn
            conn.smtp.close()  # the server hung up while it was idle
        return None

    def _release(self, conn: _Connection) -> None:
        """Pool a session the transaction left ready for MAIL, or close it."""
        if not conn.ready or not conn.smtp.is_connected:
            conn.smtp.close()  # unknown state: the server may still answer an old command
            return
        now = self._clock()
        self._sweep(now)
        key = self._pool_key(conn.endpoint)
        idle = self._idle.setdefault(key, [])
        if (self._closed or conn.transactions >= self.max_messages_per_connection
                or len(idle) >= self.max_connections_per_endpoint or self.max_idle_secs <= 0):
            self._quit_later(conn)
            if not idle:
                del self._idle[key]
            return
        conn.idle_since = now
        idle.append(conn)

    def _sweep(self, now: float) -> None:
        """Close sessions idle for longer than `max_idle_secs`, at most about once a second."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(1.0, self.max_idle_secs)
        cutoff = now - self.max_idle_secs
        for key, idle in list(self._idle.items()):
            while idle and idle[0].idle_since <= cutoff:
                self._quit_later(idle.pop(0))
            if not idle:
                del self._idle[key]

    def _quit_later(self, conn: _Connection) -> None:
        # QUIT in the background so no delivery waits for another session's goodbye.
        if not conn.smtp.is_connected:
            conn.smtp.close()
            return
        task = asyncio.get_running_loop().create_task(self._close(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _endpoints(self, hosts: Sequence[str | HostLike]) -> list[_Endpoint]:
        if self.relay is not None:
            return [_Endpoint(self.relay.host, self.relay.port)]
        endpoints = []
        for host in hosts:
            if isinstance(host, str):
                endpoints.append(_Endpoint(host.rstrip("."), self.port))
            else:
                port = getattr(host, "port", None)
                name = getattr(host, "name", "") or ""
                endpoints.append(_Endpoint(host.host.rstrip("."), port or self.port,
                                           name.rstrip(".")))
        return endpoints

    async def _connect(self, endpoint: _Endpoint) -> _Connection:
        mode: _TlsMode = "opportunistic"
        if self.relay is not None:
            mode = "required" if self.relay.starttls else "off"
        try:
            return await self._open(endpoint, mode)
        except _HostFailed as exc:
            if not (exc.tls_handshake and mode == "opportunistic"):
                raise
            # RFC 7435 §3: opportunistic TLS must not make delivery worse than plaintext. A
            # failed handshake leaves the connection unusable, so retry this host once without.
            log.info("smtp %s:%s TLS failed, retrying in plaintext: %s", endpoint.host,
                     endpoint.port, exc.text)
            conn = await self._open(endpoint, "off")
            conn.tls = TlsOutcome(used=False, error=exc.text)
            return conn

    async def _open(self, endpoint: _Endpoint, mode: _TlsMode) -> _Connection:
        smtp = SMTP(hostname=endpoint.host, port=endpoint.port, local_hostname=self.helo_name,
                    source_address=(self.source_address, 0) if self.source_address else None,
                    timeout=self.timeout, start_tls=False)
        try:
            try:
                await smtp.connect()
            except SMTPConnectResponseError as exc:
                # RFC 5321 §3.1, §4.2: 554 = no service for us here; 421 = not now.
                enhanced, text = split_enhanced(exc.code, exc.message)
                raise _HostFailed(f"greeting {exc.code} {' '.join(exc.message.split())}",
                                  code=exc.code, enhanced=enhanced, reply_text=text,
                                  permanent=500 <= exc.code < 600) from None
            await self._hello(smtp)
            tls = NO_TLS
            if mode != "off":
                tls = await self._starttls(smtp, endpoint, required=mode == "required")
            if self.relay is not None and self.relay.username is not None:
                await self._login(smtp, self.relay.username, self.relay.password or "")
            return _Connection(endpoint, smtp, tls)
        except BaseException as exc:  # including cancellation: never leak the socket
            smtp.close()
            if isinstance(exc, (SMTPException, OSError)):
                raise _HostFailed(_describe(exc)) from None
            raise

    async def _hello(self, smtp: SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError as exc:
            if exc.code == 421 or not smtp.is_connected:
                raise _HostFailed(f"EHLO {_describe(exc)}") from None
            try:
                await smtp.helo()  # RFC 5321 §4.1.4: an old server may know only HELO
            except SMTPHeloError as helo_exc:
                raise _HostFailed(f"HELO {_describe(helo_exc)}") from None

    async def _starttls(self, smtp: SMTP, endpoint: _Endpoint, *, required: bool) -> TlsOutcome:
        if not smtp.supports_extension("starttls"):
            if required:
                raise _HostFailed("relay does not offer STARTTLS")
            return NO_TLS
        context = await self._tls_context(endpoint.tls_name, verify=required)
        try:
            await smtp.starttls(server_hostname=endpoint.tls_name, tls_context=context)
        except SMTPResponseException as exc:
            # RFC 3207 §4: e.g. 454 TLS not available; the plaintext session goes on.
            if required or exc.code == 421 or not smtp.is_connected:
                raise _HostFailed(f"STARTTLS {_describe(exc)}") from None
            return TlsOutcome(used=False, error=f"STARTTLS {_describe(exc)}")
        except (SMTPException, OSError) as exc:
            raise _HostFailed(f"TLS handshake failed: {_describe(exc)}",
                              tls_handshake=True) from None
        # RFC 3207 §4.2: forget what the server said before TLS and ask again.
        await self._hello(smtp)
        ssl_object = smtp.get_transport_info("ssl_object")
        if ssl_object is None:
            return TlsOutcome(used=True)
        cipher = ssl_object.cipher()
        return TlsOutcome(used=True, version=ssl_object.version(),
                          cipher=cipher[0] if cipher else None)

    async def _tls_context(self, host: str, *, verify: bool) -> ssl.SSLContext:
        if self._tls_context_factory is not None:
            return self._tls_context_factory(host)
        if not verify:
            return self._opportunistic
        if self._verifying is None:
            # Loads the system CA store: disk I/O, kept off the event loop.
            self._verifying = await asyncio.to_thread(ssl.create_default_context)
        return self._verifying

    async def _login(self, smtp: SMTP, username: str, password: str) -> None:
        try:
            await smtp.login(username, password)
        except SMTPAuthenticationError as exc:
            raise _HostFailed(f"relay AUTH failed: {_describe(exc)}") from None
        except (SMTPException, OSError) as exc:
            raise _HostFailed(f"relay AUTH not possible: {_describe(exc)}") from None

    async def _transaction(self, conn: _Connection, mail_from: str, rcpts: list[str],
                           raw: bytes, smtputf8: bool) -> list[RecipientResult]:
        """MAIL, RCPT for each recipient, DATA for the accepted ones.

        Raises `_HostFailed` only before any DATA was sent (421 or connection lost), so the
        caller may safely try another host; `_StaleSession` when that happens to the MAIL of a
        reused session. On return, `conn.ready` says whether a new MAIL may follow.
        """
        smtp = conn.smtp
        conn.ready = False
        reused = conn.transactions > 0
        if smtputf8 and not smtp.supports_extension("smtputf8"):
            # RFC 6531 §3.2: an internationalized envelope cannot go to a server without it.
            conn.ready = True
            return [_synthetic(a, 553, "5.6.7", "remote server does not support SMTPUTF8")
                    for a in rcpts]
        options = []
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(raw)}")  # RFC 1870 §3
        if smtp.supports_extension("8bitmime") and not raw.isascii():
            options.append("BODY=8BITMIME")  # RFC 6152 §3
        if smtputf8:
            options.append("SMTPUTF8")  # RFC 6531 §3.4
        encoding = "utf-8" if smtputf8 else "ascii"
        failed = _StaleSession if reused else _HostFailed

        conn.transactions += 1
        try:
            await smtp.mail(mail_from, options=options, encoding=encoding)
        except SMTPSenderRefused as exc:
            if exc.code == 421:
                raise failed(f"MAIL {_describe(exc)}") from None
            conn.ready = True  # RFC 5321 §3.3: only an accepted MAIL starts a transaction
            return [_from_reply(a, exc.code, exc.message) for a in rcpts]
        except ValueError as exc:  # not encodable / control characters: nothing was sent
            conn.ready = True
            return [_synthetic(a, 553, "5.1.7", f"bad sender address: {exc}") for a in rcpts]
        except (SMTPException, OSError) as exc:
            raise failed(f"MAIL: {_describe(exc)}") from None

        results: list[RecipientResult | None] = []
        accepted: list[int] = []
        for address in rcpts:
            try:
                await smtp.rcpt(address, encoding=encoding)
            except SMTPRecipientRefused as exc:
                if exc.code == 421:
                    raise _HostFailed(f"RCPT {_describe(exc)}") from None
                results.append(_from_reply(address, exc.code, exc.message))
                continue
            except ValueError as exc:
                results.append(_synthetic(address, 553, "5.1.3", f"bad address: {exc}"))
                continue
            except (SMTPException, OSError) as exc:
                raise _HostFailed(f"RCPT: {_describe(exc)}") from None
            accepted.append(len(results))
            results.append(None)

        if not accepted:
            conn.ready = await _reset(smtp)  # RFC 5321 §4.1.1.5: abort the open transaction
            return [r for r in results if r is not None]

        code, message, delivered, lost = 0, "", False, None
        try:
            response = await smtp.data(raw)
            code, message, delivered = response.code, response.message, True
            conn.ready = True  # RFC 5321 §4.1.1.4: the transaction is over
        except SMTPDataError as exc:  # RFC 5321 §4.2.5: one reply for all accepted recipients
            code, message = exc.code, exc.message
            # The refusal may have been to the DATA command itself, leaving MAIL and RCPT open.
            conn.ready = await _reset(smtp)
        except (SMTPException, OSError) as exc:
            # No 2xx to the end of data: never delivered. The server may have it anyway; a
            # retry may duplicate (RFC 5321 §6.1), which beats losing it.
            lost = f"connection lost during DATA: {_describe(exc)}"

        for index in accepted:
            address = rcpts[index]
            results[index] = (_synthetic(address, 451, "4.4.2", lost) if lost is not None
                              else _from_reply(address, code, message, delivered=delivered))
        return [r for r in results if r is not None]

    async def _close(self, conn: _Connection) -> None:
        smtp = conn.smtp
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=min(self.timeout, _QUIT_TIMEOUT))
        except (SMTPException, OSError):
            pass
        finally:
            smtp.close()


async def _reset(smtp: SMTP) -> bool:
    """RSET; whether the session is ready for a new MAIL."""
    if not smtp.is_connected:
        return False
    try:
        await smtp.rset()
    except (SMTPException, OSError):
        return False
    return True


def _unreachable(rcpts: list[str], failures: list[tuple[_Endpoint, _HostFailed]]
                 ) -> AttemptResult:
    if not failures:
        text = "no hosts to try"
        return AttemptResult([_synthetic(a, 451, "4.4.4", text) for a in rcpts], None, NO_TLS,
                             text)
    summary = "; ".join(f"{ep.host}:{ep.port}: {exc.text}" for ep, exc in failures)
    last_endpoint, last = failures[-1]
    if all(exc.permanent for _, exc in failures):
        # Every host refused us in its greeting (RFC 5321 §3.1: 554): nowhere left to try.
        # X.3.2: system not accepting network messages (RFC 3463).
        results = [_synthetic(a, last.code, last.enhanced or "5.3.2", last.reply_text)
                   for a in rcpts]
    else:
        text = f"{last_endpoint.host}:{last_endpoint.port}: {last.text}"
        results = [_synthetic(a, 451, "4.4.1", text) for a in rcpts]
    return AttemptResult(results, None, NO_TLS, summary)
