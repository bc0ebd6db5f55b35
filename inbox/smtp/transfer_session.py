"""One inbound SMTP session on port 25 (the protocol; `transfer.TransferServer` runs it).
aiosmtpd 1.4.6 supplies the command loop, the greeting and the STARTTLS switch; the commands
that carry mail are ours, every reply passes `push` (RFC 3463 enhanced codes, error count),
and the policy decides about the peer, the sender, each recipient and the message.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import secrets
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Envelope, TLSSetupException

from inbox.errors import InboxError, InvalidAddress, ValidationError
from inbox.smtp.content import read_message, received_header
from inbox.smtp.paths import (
    mail_parameter_problem,
    parse_parameters,
    parse_path,
    split_argument,
)
from inbox.smtp.replies import EXEMPT_PREFIXES, INTERNAL_ERROR, clean_text, enhance, error_reply
from inbox.smtp.transfer import InboundEnvelope

if TYPE_CHECKING:
    from inbox.smtp.transfer import TransferServer

log = logging.getLogger(__name__)

COMMAND_OCTETS = 510  # RFC 5321 §4.5.3.1.4: 512 octets including the CRLF
# RFC 1870 §3 (+26 for SIZE), RFC 6531 §3.4 (+10 for SMTPUTF8), " BODY=8BITMIME" (+14).
MAIL_COMMAND_OCTETS = COMMAND_OCTETS + 26 + 10 + 14
_BAD_HELO = re.compile(r"[\x00-\x20\x7f\ud800-\udfff]")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback for a delivery whose session is gone: consume its outcome."""
    if not task.cancelled() and task.exception() is not None:
        log.info("smtp: reply to DATA not sent: %r", task.exception())


class Transaction(Envelope):
    """aiosmtpd's envelope plus what the policy returned for each accepted recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.recipients: list[Any] = []


class _NoHooks:
    """aiosmtpd wants a handler; ours are methods of TransferProtocol."""


class TransferProtocol(SMTP):
    """One SMTP session. aiosmtpd's command loop, greeting and STARTTLS are kept; the
    commands that carry mail are ours, and every reply goes through `push` (enhanced codes)."""

    def __init__(self, server: TransferServer, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(_NoHooks(), hostname=server.hostname, ident="ESMTP",
                         tls_context=server.tls_context, enable_SMTPUTF8=True,
                         data_size_limit=server.max_message_bytes,
                         timeout=server.command_timeout_secs,
                         auth_exclude_mechanism=("LOGIN", "PLAIN"), loop=loop)
        self.server = server
        self._smtp_methods.pop("AUTH", None)  # no AUTH on the transfer port
        # Per instance: aiosmtpd's class-level dict is shared with every other SMTP in the
        # process (and grows on each EHLO).
        self.command_size_limits = collections.defaultdict(  # type: ignore[misc]
            lambda: COMMAND_OCTETS, {"MAIL": MAIL_COMMAND_OCTETS})
        self.command_size_limit = COMMAND_OCTETS  # type: ignore[misc]
        self.session_id = secrets.token_hex(6)
        self._errors = 0

    # -- plumbing ---------------------------------------------------------------------------

    def _create_envelope(self) -> Transaction:
        return Transaction()

    def _transaction(self) -> Transaction:
        assert isinstance(self.envelope, Transaction)
        return self.envelope

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session else None
        ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return ip
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(addr)

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.server._sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.server._session_ended(self)
        super().connection_lost(error)

    def close(self, last_reply: str | None = None) -> None:
        """Write `last_reply` (if any), close the connection and stop the command loop."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if last_reply:
                transport.write(f"{last_reply}\r\n".encode("utf-8", "replace"))  # type: ignore[attr-defined]
            transport.close()
        if self._handler_coroutine is not None and \
                self._handler_coroutine is not asyncio.current_task():
            self._handler_coroutine.cancel()

    def abort(self) -> None:
        """Drop the connection now (no TLS close_notify exchange, no flushing)."""
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]

    def _timeout_cb(self) -> None:
        log.info("smtp %s %s: timeout", self.session_id, self.peer_ip)
        self.close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    async def _push_raw(self, reply: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        await super().push(reply.encode("utf-8", "replace"))

    async def push(self, status: str | bytes) -> None:  # type: ignore[override]
        reply = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if not reply.startswith((f"220 {self.hostname} ", *EXEMPT_PREFIXES)):
            reply = enhance(reply)
        await self._push_raw(reply)
        # A pipelining client (RFC 2920) sends every RCPT before it sees the first 452 4.5.3:
        # that is a capacity answer, not client misbehaviour, so it does not count.
        if reply[:1] in "45" and reply[:3] != "421" and not reply.startswith("452 4.5.3"):
            self._errors += 1
            if self._errors >= self.server.max_errors:  # like Postfix smtpd_hard_error_limit
                self.close(f"421 4.7.0 {self.hostname} Error: too many errors")

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            log.info("smtp %s %s: TLS handshake failed: %r", self.session_id, self.peer_ip,
                     error.__cause__)
        else:
            log.error("smtp %s %s: unexpected error", self.session_id, self.peer_ip,
                      exc_info=error)
        return INTERNAL_ERROR

    async def _policy(self, call: Any, *args: Any) -> tuple[Any, str | None]:
        """(result, None) or (None, reply) for one policy call."""
        try:
            return await call(*args), None
        except InboxError as err:
            return None, error_reply(err)
        except Exception:
            log.exception("smtp %s %s: policy %s failed", self.session_id, self.peer_ip,
                          getattr(call, "__name__", call))
            return None, INTERNAL_ERROR

    # -- connection -------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        if await self._admit():
            await super()._handle_client()

    async def _admit(self) -> bool:
        if len(self.server._sessions) > self.server.max_connections:
            log.warning("smtp %s %s: over max_connections", self.session_id, self.peer_ip)
            self.close(f"421 4.7.0 {self.hostname} Too many connections, try again later")
            return False
        try:
            await self.server.policy.on_connect(self.peer_ip)
        except InboxError as err:
            if err.temporary:
                self.close(error_reply(err, temporary_code=421))
                return False
            await self._push_raw(error_reply(err, permanent_code=554))
            await self._refused_session()
            return False
        except Exception:
            log.exception("smtp %s %s: policy on_connect failed", self.session_id, self.peer_ip)
            self.close(f"421 4.3.0 {self.hostname} Internal error, try again later")
            return False
        return True

    async def _refused_session(self) -> None:
        """RFC 5321 §3.1: after a 554 greeting, wait for QUIT, answering 503 meanwhile."""
        for _ in range(self.server.max_errors):
            try:
                line = await self._reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                break
            if not line:
                break
            if line.strip().upper() == b"QUIT":
                self.close("221 2.0.0 Bye")
                return
            await self._push_raw("503 5.5.1 Error: session refused, send QUIT")
        self.close()

    # -- commands ---------------------------------------------------------------------------

    async def _hello(self, arg: str | None, extended: bool) -> bool:
        if not arg or _BAD_HELO.search(arg.replace(" ", "")) or len(arg) > 255:
            await self.push(f"501 5.5.4 Syntax: {'EHLO' if extended else 'HELO'} hostname")
            return False
        self._set_rset_state()  # RFC 5321 §4.1.4: EHLO also resets the transaction
        assert self.session is not None
        self.session.host_name = arg
        self.session.extended_smtp = extended
        return True

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not await self._hello(arg, True):
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.server.max_message_bytes}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context and not self.tls_active:  # RFC 3207 §4.2: not again after TLS
            lines.append("STARTTLS")
        for i, line in enumerate(lines):
            await self._push_raw(f"250{' ' if i == len(lines) - 1 else '-'}{line}")

    async def smtp_HELO(self, arg: str | None) -> None:
        if await self._hello(arg, False):
            await self._push_raw(f"250 {self.hostname}")

    async def _need_hello(self) -> bool:
        if self.session is None or not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._need_hello():
            return
        tx = self._transaction()
        if tx.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        try:
            path, tokens = split_argument(arg, "FROM")
            params = parse_parameters(tokens)
            address = parse_path(path, null_allowed=True)
        except InvalidAddress as err:  # RFC 3463 X.1.7: bad sender's mailbox address syntax
            await self.push(f"501 5.1.7 {err.message}")
            return
        except ValidationError as err:
            await self.push(f"501 5.5.4 {err.message}")
            return
        options = [k if v is None else f"{k}={v}" for k, v in params.items()]
        assert self.session is not None
        if params and not self.session.extended_smtp:
            await self.push("555 5.5.4 MAIL parameters need EHLO")
            return
        problem = self._mail_parameter_problem(params, address)
        if problem:
            await self.push(problem)
            return
        refusal = await self._accept_mail(address, params)
        if refusal:
            await self.push(refusal)
            return
        tx.mail_from = address
        tx.mail_options = options
        tx.smtp_utf8 = "SMTPUTF8" in params
        await self.push("250 2.1.0 OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._need_hello():
            return
        tx = self._transaction()
        if tx.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        try:
            path, tokens = split_argument(arg, "TO")
            params = parse_parameters(tokens)
            address = parse_path(path, postmaster_allowed=True)
        except InvalidAddress as err:  # RFC 3463 X.1.3: bad destination mailbox syntax
            await self.push(f"501 5.1.3 {err.message}")
            return
        except ValidationError as err:
            await self.push(f"501 5.5.4 {err.message}")
            return
        problem = self._rcpt_parameter_problem(params)
        if problem:
            await self.push(problem)
            return
        if not tx.smtp_utf8 and not address.isascii():
            await self.push("553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter "
                            "(RFC 6531)")
            return
        if len(tx.rcpt_tos) >= self.server.max_recipients:
            # RFC 5321 §4.5.3.1.8 (recipients buffer) and §4.5.3.1.10 (452, not 552)
            await self.push("452 4.5.3 Too many recipients")
            return
        result, refusal = await self._accept_recipient(address, params)
        if refusal:
            await self.push(refusal)
            return
        tx.rcpt_tos.append(address)
        tx.recipients.append(result)
        await self.push("250 2.1.5 OK")

    # Hooks a session on another port (submission) overrides.

    def _mail_parameter_problem(self, params: dict[str, str | None], address: str
                                ) -> str | None:
        return mail_parameter_problem(params, address, self.server.max_message_bytes)

    async def _accept_mail(self, address: str, params: dict[str, str | None]) -> str | None:
        """None to accept the sender, or the refusal reply."""
        _, refusal = await self._policy(self.server.policy.on_mail, self.peer_ip, address)
        return refusal

    def _rcpt_parameter_problem(self, params: dict[str, str | None]) -> str | None:
        if params:
            return f"555 5.5.4 Unsupported RCPT parameter {clean_text(next(iter(params)), 40)}"
        return None

    async def _accept_recipient(self, address: str, params: dict[str, str | None]
                                ) -> tuple[Any, str | None]:
        """(what to keep for this recipient, None) or (None, the refusal reply)."""
        return await self._policy(self.server.policy.on_recipient, self.peer_ip, address)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self._need_hello():
            return
        tx = self._transaction()
        if tx.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not tx.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            async with asyncio.timeout(self.server.data_timeout_secs):
                body, problem = await read_message(self._reader, self.server.max_message_bytes,
                                                   self._reset_timeout)
        except TimeoutError:
            self.close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")
            return
        except asyncio.IncompleteReadError:
            self.close()  # the client went away mid-DATA: nothing is handed on
            return
        self._set_post_data_state()  # a new transaction, whatever happens below
        if problem:
            await self.push(problem)
            return
        # Shielded, and the reply is part of it: a client hanging up must not tear a storage
        # write in half, and stop() waits for these so every stored message gets its 250.
        task = asyncio.ensure_future(self._deliver(tx, body))
        self.server._inflight.add(task)
        task.add_done_callback(self.server._inflight.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retrieve)
            raise

    async def _deliver(self, tx: Transaction, body: bytes) -> None:
        assert self.session is not None and tx.mail_from is not None
        trace_id = secrets.token_hex(8)
        header = received_header(
            helo=self.session.host_name or "", peer_ip=self.peer_ip, hostname=self.hostname,
            esmtp=self.session.extended_smtp, tls=self.tls_active, smtputf8=tx.smtp_utf8,
            trace_id=trace_id, recipients=tx.rcpt_tos, when=self.server.clock())
        envelope = InboundEnvelope(
            peer_ip=self.peer_ip, helo=self.session.host_name or "", mail_from=tx.mail_from,
            recipients=list(tx.recipients), rcpt_addresses=list(tx.rcpt_tos),
            data=header + body, tls=self.tls_active, smtputf8=tx.smtp_utf8,
            mail_options=list(tx.mail_options))
        stored_id, refusal = await self._policy(self.server.policy.on_message, envelope)
        if refusal:
            await self.push(refusal)
            return
        log.info("smtp %s %s: queued %s (trace %s)", self.session_id, self.peer_ip,
                 stored_id, trace_id)
        if self.transport is None or self.transport.is_closing():
            log.warning("smtp %s %s: client gone before the reply; %s may arrive twice",
                        self.session_id, self.peer_ip, stored_id)
        await self.push(f"250 2.0.0 OK queued as {clean_text(str(stored_id), 100)}")

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._set_rset_state()
        await self.push("250 2.0.0 OK")

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: QUIT")
            return
        await self._push_raw(f"221 2.0.0 {self.hostname} closing connection")
        self.close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        # RFC 5321 §3.5.3: 252 when we will not say (mailbox existence is not disclosed).
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt "
                        "delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not implemented")

    async def smtp_HELP(self, arg: str | None) -> None:
        starttls = " STARTTLS" if self.tls_context else ""
        await self.push(f"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY"
                        f"{starttls} (RFC 5321)")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if not self.tls_context:
            await self.push("502 5.5.1 Error: STARTTLS not offered")
        elif self.tls_active:
            await self.push("503 5.5.1 Error: TLS already active")
        elif arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
        else:
            await super().smtp_STARTTLS(arg)
