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
The idle-session pool lives in `inbox.delivery.pool`, MAIL/RCPT/DATA on an open session in
`inbox.delivery.transaction`, the result types in `inbox.delivery.results` and `RelayConfig` in
`inbox.delivery.relay`; the public names are re-exported here.

Hosts are strings or objects with a `.host` attribute (e.g. `inbox.delivery.mx.MxHost`). An
object may also carry a `.port`, overriding the transport's port: an affordance for tests and
relays, since real MX hosts all listen on 25.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
)

from inbox.delivery import dane
from inbox.delivery.pool import Connection, Endpoint, PoolKey, SessionPool
from inbox.delivery.relay import RelayConfig
from inbox.delivery.results import (
    NO_TLS,
    AttemptResult,
    RecipientResult,
    TlsOutcome,
    TlsReport,
    split_enhanced,
    synthetic,
)
from inbox.delivery.tlspolicy import OPPORTUNISTIC, HostPolicy
from inbox.delivery.transaction import HostFailed, StaleSession, describe, run_transaction

__all__ = [
    "NO_TLS", "AttemptResult", "HostLike", "RecipientResult", "RelayConfig", "SmtpTransport",
    "TlsContextFactory", "TlsOutcome", "opportunistic_tls_context", "split_enhanced",
]

log = logging.getLogger(__name__)

TlsContextFactory = Callable[[str], ssl.SSLContext]
"""Given the host name being connected to, the client TLS context to use for STARTTLS."""

_QUIT_TIMEOUT = 5.0
_TlsMode = Literal["off", "opportunistic", "required"]


class HostLike(Protocol):
    """Anything with a host name, e.g. a frozen `MxHost`; an optional `.port` is honoured."""

    @property
    def host(self) -> str: ...


def opportunistic_tls_context() -> ssl.SSLContext:
    """A client context that encrypts without authenticating (RFC 7435 opportunistic security).

    Cheap to build: it loads no CA certificates. DANE/MTA-STS will supply verifying contexts.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class SmtpTransport:
    """Delivers one message per `deliver` call over SMTP, reusing idle sessions per endpoint.

    Pool limits: a session idle for more than `max_idle_secs` is closed (checked whenever a
    session is taken or returned); one that has carried `max_messages_per_connection`
    transactions is closed with QUIT; at most `max_connections_per_endpoint` idle sessions are
    kept per endpoint (concurrent deliveries beyond that open extra connections, closed after
    use). `max_connections_per_endpoint=0` turns pooling off; by default it is
    `max_sessions_per_host`, so a steady load keeps its sessions. (With 8 kept and 20 allowed,
    16 concurrent deliveries to one MX opened and closed a connection for a steady share of
    messages: ~7% of the delivery child's CPU in bench/send.py.) At most
    `max_sessions_per_host` transactions run at once per (address, port); more wait for a free
    one. `clock` is a monotonic clock in seconds. Call `aclose()` when done.
    """

    def __init__(self, helo_name: str, port: int = 25, timeout: float = 60,
                 relay: RelayConfig | None = None,
                 tls_context_factory: TlsContextFactory | None = None,
                 source_address: str | None = None, *, ca_file: str | None = None,
                 max_idle_secs: float = 30,
                 max_messages_per_connection: int = 100,
                 max_connections_per_endpoint: int | None = None,
                 max_sessions_per_host: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
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
        self._ca_file = ca_file or None
        self._dane_context: ssl.SSLContext | None = None
        # Sessions in use per (address, port), like Postfix's destination concurrency limit
        # (default_destination_concurrency_limit = 20): more deliveries wait their turn.
        self._max_sessions_per_host = max_sessions_per_host
        self._host_slots: dict[tuple[str, int], list[Any]] = {}  # [semaphore, users]
        self._pool = SessionPool(
            max_idle_secs=max_idle_secs, max_messages_per_connection=max_messages_per_connection,
            max_connections_per_endpoint=(max_sessions_per_host
                                          if max_connections_per_endpoint is None
                                          else max_connections_per_endpoint),
            quit_timeout=min(timeout, _QUIT_TIMEOUT), clock=clock)

    @property
    def max_idle_secs(self) -> float:
        return self._pool.max_idle_secs

    @property
    def max_messages_per_connection(self) -> int:
        return self._pool.max_messages_per_connection

    @property
    def max_connections_per_endpoint(self) -> int:
        return self._pool.max_connections_per_endpoint

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
        failures: list[tuple[Endpoint, HostFailed]] = []
        reports: list[TlsReport] = []
        for endpoint in self._endpoints(hosts):
            try:
                conn, results = await self._deliver_to(endpoint, mail_from, rcpts, raw,
                                                       smtputf8)
            except HostFailed as exc:
                log.info("smtp %s:%s unusable: %s", endpoint.host, endpoint.port, exc.text)
                failures.append((endpoint, exc))
                if exc.tls_result is not None:
                    reports.append(_report(endpoint, False, exc.tls_result, exc.text))
                continue
            if conn.tls.used:
                reports.append(_report(endpoint, True))
            elif self.relay is None:
                reports.append(_report(endpoint, False, "starttls-not-supported",
                                       conn.tls.error or "STARTTLS not offered"))
            return AttemptResult(results, endpoint.host, conn.tls, None, tuple(reports))
        result = _unreachable(rcpts, failures)
        return AttemptResult(result.recipients, None, result.tls, result.connection_error,
                             tuple(reports), result.mx)

    async def close_idle(self) -> None:
        """Close every idle pooled session (with QUIT). The transport stays usable."""
        await self._pool.close_idle()

    async def aclose(self) -> None:
        """Close every pooled session and wait for closes under way. Later deliveries still
        work, on sessions that are closed after use."""
        await self._pool.aclose()

    async def _deliver_to(self, endpoint: Endpoint, mail_from: str, rcpts: list[str],
                          raw: bytes, smtputf8: bool
                          ) -> tuple[Connection, list[RecipientResult]]:
        """One transaction with this endpoint, on a pooled session if there is one.

        Raises `HostFailed` when the host cannot be used (nothing was sent after DATA).
        """
        slot = self._host_slots.get((endpoint.host, endpoint.port))
        if slot is None:
            slot = self._host_slots[(endpoint.host, endpoint.port)] = [
                asyncio.Semaphore(self._max_sessions_per_host), 0]
        slot[1] += 1
        try:
            async with slot[0]:
                return await self._transaction(endpoint, mail_from, rcpts, raw, smtputf8)
        finally:
            slot[1] -= 1
            if not slot[1]:
                del self._host_slots[(endpoint.host, endpoint.port)]

    async def _transaction(self, endpoint: Endpoint, mail_from: str, rcpts: list[str],
                           raw: bytes, smtputf8: bool
                           ) -> tuple[Connection, list[RecipientResult]]:
        key = self._pool_key(endpoint)
        pooled = self._pool.take(key)
        if pooled is not None:
            try:
                return pooled, await self._run(pooled, mail_from, rcpts, raw, smtputf8)
            except StaleSession as exc:
                # Nothing was accepted: the same as if the pool had been empty.
                log.info("smtp %s:%s pooled session unusable, reconnecting: %s",
                         endpoint.host, endpoint.port, exc.text)
        conn = await self._connect(endpoint)
        return conn, await self._run(conn, mail_from, rcpts, raw, smtputf8)

    async def _run(self, conn: Connection, mail_from: str, rcpts: list[str], raw: bytes,
                   smtputf8: bool) -> list[RecipientResult]:
        policy = conn.endpoint.policy or OPPORTUNISTIC
        try:
            results = await run_transaction(conn, mail_from, rcpts, raw, smtputf8,
                                            requiretls=policy.requiretls)
        except BaseException:  # host failed, or cancelled: unknown state, no polite QUIT
            conn.smtp.close()
            raise
        self._pool.release(self._pool_key(conn.endpoint), conn)
        return results

    def _pool_key(self, endpoint: Endpoint) -> PoolKey:
        tag = endpoint.policy.pool_tag if endpoint.policy is not None else ""
        return PoolKey(endpoint.host, endpoint.port, endpoint.tls_name, self.relay is not None,
                       tag)

    def _endpoints(self, hosts: Sequence[str | HostLike]) -> list[Endpoint]:
        if self.relay is not None:
            return [Endpoint(self.relay.host, self.relay.port)]
        endpoints = []
        for host in hosts:
            if isinstance(host, str):
                endpoints.append(Endpoint(host.rstrip("."), self.port))
            else:
                port = getattr(host, "port", None)
                name = getattr(host, "name", "") or ""
                endpoints.append(Endpoint(host.host.rstrip("."), port or self.port,
                                          name.rstrip("."), getattr(host, "policy", None)))
        return endpoints

    async def _connect(self, endpoint: Endpoint) -> Connection:
        mode: _TlsMode = "opportunistic"
        policy = endpoint.policy or OPPORTUNISTIC
        if self.relay is not None:
            mode = "required" if self.relay.starttls else "off"
        elif policy.skip:
            permanent = policy.skip_enhanced.startswith("5")
            raise HostFailed(policy.skip, code=550 if permanent else 451,
                             enhanced=policy.skip_enhanced, reply_text=policy.skip,
                             permanent=permanent, tls_result=policy.report_result)
        elif policy.require_tls:
            mode = "required"
        try:
            return await self._open(endpoint, mode)
        except HostFailed as exc:
            if not (exc.tls_handshake and mode == "opportunistic"
                    and policy.allow_plaintext_fallback):
                raise
            # RFC 7435 §3: opportunistic TLS must not make delivery worse than plaintext. A
            # failed handshake leaves the connection unusable, so retry this host once without.
            log.info("smtp %s:%s TLS failed, retrying in plaintext: %s", endpoint.host,
                     endpoint.port, exc.text)
            conn = await self._open(endpoint, "off")
            conn.tls = TlsOutcome(used=False, error=exc.text)
            return conn

    async def _open(self, endpoint: Endpoint, mode: _TlsMode) -> Connection:
        smtp = SMTP(hostname=endpoint.host, port=endpoint.port, local_hostname=self.helo_name,
                    source_address=(self.source_address, 0) if self.source_address else None,
                    timeout=self.timeout, start_tls=False)
        try:
            try:
                await smtp.connect()
            except SMTPConnectResponseError as exc:
                # RFC 5321 §3.1, §4.2: 554 = no service for us here; 421 = not now.
                enhanced, text = split_enhanced(exc.code, exc.message)
                raise HostFailed(f"greeting {exc.code} {' '.join(exc.message.split())}",
                                  code=exc.code, enhanced=enhanced, reply_text=text,
                                  permanent=500 <= exc.code < 600) from None
            await self._hello(smtp)
            tls = NO_TLS
            if mode != "off":
                tls = await self._starttls(smtp, endpoint, required=mode == "required")
            if self.relay is not None and self.relay.username is not None:
                await self._login(smtp, self.relay.username, self.relay.password or "")
            return Connection(endpoint, smtp, tls)
        except BaseException as exc:  # including cancellation: never leak the socket
            smtp.close()
            if isinstance(exc, (SMTPException, OSError)):
                raise HostFailed(describe(exc)) from None
            raise

    async def _hello(self, smtp: SMTP) -> None:
        try:
            await smtp.ehlo()
        except SMTPHeloError as exc:
            if exc.code == 421 or not smtp.is_connected:
                raise HostFailed(f"EHLO {describe(exc)}") from None
            try:
                await smtp.helo()  # RFC 5321 §4.1.4: an old server may know only HELO
            except SMTPHeloError as helo_exc:
                raise HostFailed(f"HELO {describe(helo_exc)}") from None

    async def _starttls(self, smtp: SMTP, endpoint: Endpoint, *, required: bool) -> TlsOutcome:
        policy = endpoint.policy or OPPORTUNISTIC
        verify = policy.verify if self.relay is None else ("pkix" if required else "none")
        if not smtp.supports_extension("starttls"):
            if required:
                what = "relay" if self.relay is not None else endpoint.tls_name
                raise HostFailed(f"{what} does not offer STARTTLS, which the {policy.policy}"
                                 " policy requires", tls_result="starttls-not-supported")
            return TlsOutcome(used=False, policy=policy.policy, reason="STARTTLS not offered")
        context = await self._tls_context(endpoint.tls_name, verify=verify)
        try:
            await smtp.starttls(server_hostname=endpoint.tls_name, tls_context=context)
        except SMTPResponseException as exc:
            # RFC 3207 §4: e.g. 454 TLS not available; the plaintext session goes on.
            if required or exc.code == 421 or not smtp.is_connected:
                raise HostFailed(f"STARTTLS {describe(exc)}",
                                 tls_result="starttls-not-supported") from None
            return TlsOutcome(used=False, error=f"STARTTLS {describe(exc)}",
                              policy=policy.policy)
        except (SMTPException, OSError) as exc:
            raise HostFailed(f"TLS handshake failed: {describe(exc)}", tls_handshake=True,
                             tls_result=_handshake_result(exc)) from None
        ssl_object = smtp.get_transport_info("ssl_object")
        verified, reason = verify == "pkix", None
        if verify == "dane":
            verdict = dane.verify_chain(policy.tlsa, dane.peer_chain_der(ssl_object),
                                        mx_host=endpoint.tls_name)
            if not verdict.ok:
                raise HostFailed(f"DANE: {verdict.reason}", tls_result="validation-failure")
            verified, reason = True, verdict.reason
        elif verify == "none":
            reason = "certificate not checked (opportunistic)"
        # RFC 3207 §4.2: forget what the server said before TLS and ask again.
        await self._hello(smtp)
        if policy.requiretls and not smtp.supports_extension("requiretls"):
            # RFC 8689 §4.2.1: the next hop must promise to keep requiring TLS.
            raise HostFailed(f"{endpoint.tls_name} does not support REQUIRETLS", code=550,
                             enhanced="5.7.30", permanent=True,
                             reply_text="REQUIRETLS support required")
        if ssl_object is None:
            return TlsOutcome(used=True, policy=policy.policy, verified=verified, reason=reason)
        cipher = ssl_object.cipher()
        return TlsOutcome(used=True, version=ssl_object.version(),
                          cipher=cipher[0] if cipher else None, policy=policy.policy,
                          verified=verified, reason=reason)

    async def _tls_context(self, host: str, *, verify: str) -> ssl.SSLContext:
        if self._tls_context_factory is not None:
            return self._tls_context_factory(host)
        if verify == "dane":
            if self._dane_context is None:
                self._dane_context = dane.tls_context_for_dane()
            return self._dane_context
        if verify != "pkix":
            return self._opportunistic
        if self._verifying is None:
            # Loads the system CA store (and SMTP_OUTBOUND_CA_FILE): disk I/O, off the loop.
            def build() -> ssl.SSLContext:
                context = ssl.create_default_context()
                if self._ca_file:
                    context.load_verify_locations(cafile=self._ca_file)
                return context

            self._verifying = await asyncio.to_thread(build)
        return self._verifying

    async def _login(self, smtp: SMTP, username: str, password: str) -> None:
        try:
            await smtp.login(username, password)
        except SMTPAuthenticationError as exc:
            raise HostFailed(f"relay AUTH failed: {describe(exc)}") from None
        except (SMTPException, OSError) as exc:
            raise HostFailed(f"relay AUTH not possible: {describe(exc)}") from None


def _unreachable(rcpts: list[str], failures: list[tuple[Endpoint, HostFailed]]
                 ) -> AttemptResult:
    if not failures:
        text = "no hosts to try"
        return AttemptResult([synthetic(a, 451, "4.4.4", text) for a in rcpts], None, NO_TLS,
                             text)
    summary = "; ".join(f"{ep.host}:{ep.port}: {exc.text}" for ep, exc in failures)
    last_endpoint, last = failures[-1]
    # The attempt's TLS outcome (stored on its events) names the policy the last host was
    # under and why it could not be used, not "opportunistic" with no reason.
    tls = TlsOutcome(used=False, policy=(last_endpoint.policy or OPPORTUNISTIC).policy,
                     reason=last.text)
    if all(exc.permanent for _, exc in failures):
        # Every host refused us in its greeting (RFC 5321 §3.1: 554): nowhere left to try.
        # X.3.2: system not accepting network messages (RFC 3463).
        results = [synthetic(a, last.code, last.enhanced or "5.3.2", last.reply_text)
                   for a in rcpts]
    else:
        text = f"{last_endpoint.host}:{last_endpoint.port}: {last.text}"
        results = [synthetic(a, 451, "4.4.1", text) for a in rcpts]
    return AttemptResult(results, None, tls, summary, mx=last_endpoint.tls_name)


def _report(endpoint: Endpoint, success: bool, result_type: str | None = None,
            reason: str = "") -> TlsReport:
    policy: HostPolicy = endpoint.policy or OPPORTUNISTIC
    return TlsReport(endpoint.tls_name, endpoint.host, policy.report_type,
                     policy.report_strings, success, None if success else result_type, reason)


def _handshake_result(exc: BaseException) -> str:
    """The RFC 8460 §4.3.1 result type for a failed TLS handshake."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            code = getattr(seen, "verify_code", 0)
            if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
                return "certificate-host-mismatch"
            if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
                return "certificate-expired"
            return "certificate-not-trusted"
        seen = seen.__cause__ or seen.__context__
    return "validation-failure"
