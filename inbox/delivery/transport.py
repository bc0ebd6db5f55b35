"""Outbound SMTP client: one delivery attempt of one message to one recipient domain's MX hosts.

Does not resolve DNS or touch the database.

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

Hosts are strings or objects with a `.host` attribute (e.g. `inbox.delivery.mx.MxHost`). An
object may also carry a `.port`, overriding the transport's port: an affordance for tests and
relays, since real MX hosts all listen on 25.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
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


@dataclass
class _Connection:
    """An open, greeted (and possibly TLS-upgraded and authenticated) session; a pool would
    keep these between `deliver` calls and RSET instead of QUIT."""

    endpoint: _Endpoint
    smtp: SMTP
    tls: TlsOutcome


_TlsMode = Literal["off", "opportunistic", "required"]


class SmtpTransport:
    """Delivers one message per `deliver` call over SMTP. Holds no connection between calls."""

    def __init__(self, helo_name: str, port: int = 25, timeout: float = 60,
                 relay: RelayConfig | None = None,
                 tls_context_factory: TlsContextFactory | None = None,
                 source_address: str | None = None) -> None:
        if not helo_name or not helo_name.isascii() or any(c.isspace() for c in helo_name):
            raise ValueError(f"helo_name {helo_name!r} must be an ASCII host name")
        self.helo_name = helo_name
        self.port = port
        self.timeout = timeout
        self.relay = relay
        self.source_address = source_address
        self._tls_context_factory = tls_context_factory
        self._opportunistic = opportunistic_tls_context()
        self._verifying: ssl.SSLContext | None = None

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
                conn = await self._connect(endpoint)
            except _HostFailed as exc:
                log.info("smtp %s:%s unusable: %s", endpoint.host, endpoint.port, exc.text)
                failures.append((endpoint, exc))
                continue
            try:
                results = await self._transaction(conn, mail_from, rcpts, raw, smtputf8)
            except _HostFailed as exc:
                conn.smtp.close()
                log.info("smtp %s:%s failed before DATA: %s", endpoint.host, endpoint.port,
                         exc.text)
                failures.append((endpoint, exc))
                continue
            except BaseException:  # cancelled: drop the connection, no polite QUIT
                conn.smtp.close()
                raise
            await self._close(conn)
            return AttemptResult(results, endpoint.host, conn.tls, None)
        return _unreachable(rcpts, failures)

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
        caller may safely try another host.
        """
        smtp = conn.smtp
        if smtputf8 and not smtp.supports_extension("smtputf8"):
            # RFC 6531 §3.2: an internationalized envelope cannot go to a server without it.
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

        try:
            await smtp.mail(mail_from, options=options, encoding=encoding)
        except SMTPSenderRefused as exc:
            if exc.code == 421:
                raise _HostFailed(f"MAIL {_describe(exc)}") from None
            return [_from_reply(a, exc.code, exc.message) for a in rcpts]
        except ValueError as exc:  # not encodable / control characters
            return [_synthetic(a, 553, "5.1.7", f"bad sender address: {exc}") for a in rcpts]
        except (SMTPException, OSError) as exc:
            raise _HostFailed(f"MAIL: {_describe(exc)}") from None

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
            await _reset(smtp)
            return [r for r in results if r is not None]

        code, message, delivered, lost = 0, "", False, None
        try:
            response = await smtp.data(raw)
            code, message, delivered = response.code, response.message, True
        except SMTPDataError as exc:  # RFC 5321 §4.2.5: one reply for all accepted recipients
            code, message = exc.code, exc.message
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


async def _reset(smtp: SMTP) -> None:
    if smtp.is_connected:
        try:
            await smtp.rset()
        except (SMTPException, OSError):
            pass


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
