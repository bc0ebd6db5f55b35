"""SMTP submission (RFC 6409): port 587 with STARTTLS (RFC 3207) and port 465 with implicit
TLS (RFC 8314). Owns the submission session and its policy: AUTH PLAIN (RFC 4616) and LOGIN
only after TLS (RFC 4954), the sender checks, rate limits, and the DSN (RFC 3461) and
REQUIRETLS (RFC 8689) parameters. Every message goes through `inbox.submission.submit`, the
path GraphQL sends take; delivery is not done here.

The session is the port-25 one (`transfer_session.TransferProtocol`: command loop, reply
enhancement, path syntax, smuggling-safe DATA reading) with AUTH added and the MAIL/RCPT/DATA
hooks answered by `SubmissionService`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiosmtpd.smtp import MISSING

from inbox.delivery.handoff import Handoff
from inbox.errors import (
    Forbidden,
    InboxError,
    InvalidAddress,
    MessageTooLarge,
    QuotaExceeded,
    RateLimited,
    Unauthenticated,
    ValidationError,
)
from inbox.message import EnvelopeRecipient, RawMessage, parse_address
from inbox.smtp.content import received_header
from inbox.smtp.paths import mail_parameter_problem
from inbox.smtp.replies import INTERNAL_ERROR, clean_text, error_reply
from inbox.smtp.transfer import TransferServer
from inbox.smtp.transfer_session import COMMAND_OCTETS, Transaction, TransferProtocol
from inbox.storage.ratelimits import enforce
from inbox.submission import SubmitOptions, sending_limits, submit
from inbox.tenancy.principal import Principal
from inbox.tenancy.smtpcreds import SmtpAuthCache

log = logging.getLogger(__name__)

# RFC 3461 §4: xtext (RFC 3461 §4 / RFC 6533 §3 for utf-8 addr-type: we check the xtext form).
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
MAX_ENVID = 100  # RFC 3461 §4.4
MAX_ORCPT = 500  # RFC 3461 §4.2


@dataclass(frozen=True)
class SubmissionLimits:
    connections_per_minute: int  # per source IP
    messages_per_minute: int  # per credential
    auth_failures_per_minute: int  # per source IP
    fail_open: bool = True  # when the rate-limit store is unreachable


def submission_reply(err: InboxError) -> str:
    """The SMTP reply for an error of `submit()` and friends (RFC 3463 codes)."""
    if isinstance(err, QuotaExceeded):
        text = clean_text(f"{err.message} (limit {err.limit})")
        if err.limit == "max_recipients_per_message":
            return f"550 5.7.0 {text}"  # the same message will never fit
        return f"452 4.7.0 {text}"  # RFC 5321 §4.3.2: 452 may end DATA
    if isinstance(err, MessageTooLarge):
        return f"552 5.3.4 {clean_text(err.message)}"
    if isinstance(err, Unauthenticated):
        return "535 5.7.8 Authentication credentials invalid"
    if isinstance(err, ValidationError) and not isinstance(err, InvalidAddress):
        return f"550 5.6.0 {clean_text(err.message)}"
    return error_reply(err)


class SubmissionService:
    """The decisions behind the submission ports, on top of the database and `submit()`."""

    def __init__(self, *, db: Any, settings: Any, limiter: Any, auth: SmtpAuthCache,
                 tenant_cache: Any, limits: SubmissionLimits, clock: Callable[[], datetime],
                 handoff: Handoff | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.settings = settings
        self.limiter = limiter
        self.auth = auth
        self.tenant_cache = tenant_cache
        self.limits = limits
        self.clock = clock
        self.handoff = handoff
        self._monotonic = monotonic
        self._blocked: dict[str, float] = {}  # source IP -> AUTH refused until

    async def _rate(self, scope: str, key: str, limit: int, what: str) -> Any:
        return await enforce(self.limiter, scope, key, limit, what,
                             fail_open=self.limits.fail_open)

    async def on_connect(self, peer_ip: str) -> None:
        await self._rate("smtp-sub-conn", peer_ip, self.limits.connections_per_minute,
                         "connections")

    async def authenticate(self, peer_ip: str, username: str, password: str) -> Principal:
        """Raises Unauthenticated (535) or, past the failure limit, RateLimited (454)."""
        until = self._blocked.get(peer_ip)
        if until is not None:
            if until > self._monotonic():
                raise RateLimited("too many failed authentications; try again later")
            del self._blocked[peer_ip]
        try:
            return await self.auth.authenticate(self.db, username, password)
        except Unauthenticated:
            try:
                await self._rate("smtp-auth-fail", peer_ip, self.limits.auth_failures_per_minute,
                                 "failed authentications")
            except RateLimited:
                if len(self._blocked) > 10000:
                    self._blocked.clear()
                self._blocked[peer_ip] = self._monotonic() + 60
                raise
            raise

    async def on_mail(self, principal: Principal, address: str) -> int:
        """Check MAIL FROM; returns how many recipients one message may have."""
        if not address:
            raise Forbidden("the null sender cannot submit: use an address at one of your "
                            "verified domains", field=["mailFrom"])
        sender = parse_address(address, ["mailFrom"])
        await self._rate("smtp-sub-msg", principal.key_id, self.limits.messages_per_minute,
                         "messages")
        limits = await sending_limits(self.db, principal, sender.ascii_domain, self.settings,
                                      self.tenant_cache, field="mailFrom")
        return int(limits["quota_max_recipients_per_message"])

    async def on_message(self, principal: Principal, msg: RawMessage, opts: SubmitOptions
                         ) -> dict[str, Any]:
        """Store the message for delivery (durable when this returns)."""
        row = await submit(self.db, principal, msg, opts, settings=self.settings,
                           now=self.clock(), cache=self.tenant_cache, handoff=self.handoff)
        return row


class SubmissionTransaction(Transaction):
    def __init__(self) -> None:
        super().__init__()
        self.ret: str | None = None
        self.envid: str | None = None
        self.require_tls = False
        self.max_recipients = 0


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class SubmissionProtocol(TransferProtocol):
    """One submission session: the port-25 session plus AUTH, answered by SubmissionService."""

    server: SubmissionServer

    def __init__(self, server: SubmissionServer, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(server, loop)
        self._smtp_methods["AUTH"] = self.smtp_AUTH  # the transfer session removes it
        # RFC 3461 §4-5: ENVID (100), RET, AUTH= (RFC 4954 §5), REQUIRETLS; NOTIFY and ORCPT.
        self.command_size_limits["MAIL"] += 700
        self.command_size_limits["RCPT"] = COMMAND_OCTETS + 600
        self.principal: Principal | None = None

    @property
    def service(self) -> SubmissionService:
        return self.server.service

    @property
    def tls_active(self) -> bool:
        transport = self.transport
        return self._tls_protocol is not None or (
            transport is not None and transport.get_extra_info("sslcontext") is not None)

    def _create_envelope(self) -> SubmissionTransaction:
        return SubmissionTransaction()

    def _tx(self) -> SubmissionTransaction:
        assert isinstance(self.envelope, SubmissionTransaction)
        return self.envelope

    async def _policy(self, call: Any, *args: Any) -> tuple[Any, str | None]:
        try:
            return await call(*args), None
        except InboxError as err:
            return None, submission_reply(err)
        except Exception:
            log.exception("submission %s %s: %s failed", self.session_id, self.peer_ip,
                          getattr(call, "__name__", call))
            return None, INTERNAL_ERROR

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not await self._hello(arg, True):
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.server.max_message_bytes}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
        if self.tls_active:  # RFC 4954 §4 / RFC 8689 §4.1: only over TLS
            lines += ["AUTH PLAIN LOGIN", "REQUIRETLS"]
        elif self.tls_context:
            lines.append("STARTTLS")
        for i, line in enumerate(lines):
            await self._push_raw(f"250{' ' if i == len(lines) - 1 else '-'}{line}")

    # -- AUTH (RFC 4954) --------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self._need_hello():
            return
        if not self.tls_active:
            await self.push("538 5.7.11 Encryption required for requested authentication "
                            "mechanism")
            return
        if self.principal is not None:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self._tx().mail_from is not None:
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        mechanism, _, initial = (arg or "").strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            creds = await self._auth_plain(initial.strip())
        elif mechanism == "LOGIN":
            creds = await self._auth_login(initial.strip())
        elif not mechanism:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        else:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        if creds is None:
            return
        principal, refusal = await self._policy(self.service.authenticate, self.peer_ip,
                                                *creds)
        if refusal:
            if refusal.startswith("4"):  # RFC 4954 §6: temporary authentication failure
                await self.push("454 4.7.0 Too many failed authentications; try again later")
                self.close()
                return
            await self.push(refusal)
            return
        self.principal = principal
        log.info("submission %s %s: authenticated as %s", self.session_id, self.peer_ip,
                 principal.key_id)
        await self.push("235 2.7.0 Authentication successful")

    async def _response(self, initial: str, challenge: str) -> bytes | None:
        if initial == "=":  # RFC 4954 §4: an empty initial response
            return b""
        if initial:
            decoded = _b64(initial)
            if decoded is None:
                await self.push("501 5.5.2 Cannot decode the response")
            return decoded
        blob = await self.challenge_auth(challenge)  # "*" or bad base64: it answered 501
        return None if blob is MISSING else bytes(blob)  # type: ignore[arg-type]

    async def _auth_plain(self, initial: str) -> tuple[str, str] | None:
        blob = await self._response(initial, "")
        if blob is None:
            return None
        parts = blob.split(b"\0")  # RFC 4616 §2: [authzid] NUL authcid NUL passwd
        if len(parts) != 3:
            await self.push("501 5.5.2 Malformed PLAIN response")
            return None
        authzid, user, password = (p.decode("utf-8", "surrogateescape") for p in parts)
        if authzid and authzid != user:
            await self.push("535 5.7.8 Authentication credentials invalid")
            return None
        return user, password

    async def _auth_login(self, initial: str) -> tuple[str, str] | None:
        user = await self._response(initial, "Username:")
        if user is None:
            return None
        password = await self._response("", "Password:")
        if password is None:
            return None
        return (user.decode("utf-8", "surrogateescape"),
                password.decode("utf-8", "surrogateescape"))

    # -- the transaction --------------------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._need_hello():
            return
        if self.principal is None:  # RFC 4954 §6
            await self.push("530 5.7.0 Authentication required")
            return
        await super().smtp_MAIL(arg)

    def _mail_parameter_problem(self, params: dict[str, str | None], address: str
                                ) -> str | None:
        rest = {k: v for k, v in params.items()
                if k not in ("RET", "ENVID", "REQUIRETLS", "AUTH")}
        problem = mail_parameter_problem(rest, address, self.server.max_message_bytes)
        if problem:
            return problem
        if "RET" in params and (params["RET"] or "").upper() not in ("FULL", "HDRS"):
            return "501 5.5.4 RET must be FULL or HDRS (RFC 3461 4.3)"
        envid = params.get("ENVID", "")
        if "ENVID" in params and not (envid and len(envid) <= MAX_ENVID
                                      and _XTEXT.fullmatch(envid)):
            return "501 5.5.4 ENVID must be xtext of at most 100 characters (RFC 3461 4.4)"
        if "REQUIRETLS" in params and params["REQUIRETLS"] is not None:
            return "501 5.5.4 REQUIRETLS takes no value (RFC 8689)"
        if "REQUIRETLS" in params and not self.tls_active:
            return "530 5.7.10 REQUIRETLS needs TLS (RFC 8689 4.1)"
        return None  # AUTH=: RFC 4954 §5 says to accept it; we trust only our own AUTH

    async def _accept_mail(self, address: str, params: dict[str, str | None]) -> str | None:
        assert self.principal is not None
        if address:
            try:
                parse_address(address, ["mailFrom"])
            except InvalidAddress as err:  # RFC 3463 X.1.7: bad sender mailbox syntax
                return f"553 5.1.7 {clean_text(err.message)}"
        limit, refusal = await self._policy(self.service.on_mail, self.principal, address)
        if refusal:
            return refusal
        tx = self._tx()
        tx.max_recipients = limit
        tx.ret = (params.get("RET") or "").upper() or None
        tx.envid = params.get("ENVID")
        tx.require_tls = "REQUIRETLS" in params
        return None

    def _rcpt_parameter_problem(self, params: dict[str, str | None]) -> str | None:
        unknown = [k for k in params if k not in ("NOTIFY", "ORCPT")]
        if unknown:
            return f"555 5.5.4 Unsupported RCPT parameter {clean_text(unknown[0], 40)}"
        if "NOTIFY" in params:
            values = (params["NOTIFY"] or "").upper().split(",")
            if not (values == ["NEVER"] or (values and set(values) <= _NOTIFY
                                            and len(set(values)) == len(values))):
                return ("501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY "
                        "(RFC 3461 4.1)")
        if "ORCPT" in params:
            kind, _, value = (params["ORCPT"] or "").partition(";")
            if not (re.fullmatch(r"[A-Za-z0-9-]+", kind) and value
                    and len(params["ORCPT"] or "") <= MAX_ORCPT
                    and (kind.lower() == "utf-8" or _XTEXT.fullmatch(value))):
                return "501 5.5.4 ORCPT must be addr-type;xtext (RFC 3461 4.2)"
        return None

    async def _accept_recipient(self, address: str, params: dict[str, str | None]
                                ) -> tuple[Any, str | None]:
        tx = self._tx()
        try:
            parse_address(address, ["rcptTo"])
        except InvalidAddress as err:
            return None, f"553 5.1.3 {clean_text(err.message)}"
        if len(tx.rcpt_tos) >= tx.max_recipients:  # RFC 5321 §4.5.3.1.10
            return None, (f"452 4.5.3 Too many recipients (limit max_recipients_per_message: "
                          f"{tx.max_recipients})")
        notify = params.get("NOTIFY")
        return EnvelopeRecipient(address, notify.upper() if notify else None,
                                 params.get("ORCPT")), None

    async def _deliver(self, tx: Transaction, body: bytes) -> None:
        assert isinstance(tx, SubmissionTransaction)
        assert self.session is not None and tx.mail_from is not None
        assert self.principal is not None
        trace_id = secrets.token_hex(8)
        header = received_header(
            helo=self.session.host_name or "", peer_ip=self.peer_ip, hostname=self.hostname,
            esmtp=self.session.extended_smtp, tls=self.tls_active, smtputf8=tx.smtp_utf8,
            trace_id=trace_id, recipients=tx.rcpt_tos, when=self.server.clock(),
            authenticated=True)
        msg = RawMessage(data=body, mail_from=tx.mail_from, rcpt_to=list(tx.recipients),
                         smtputf8=tx.smtp_utf8, dsn_ret=tx.ret, dsn_envid=tx.envid,
                         trace=header)
        opts = SubmitOptions(source="smtp", require_tls=tx.require_tls)
        row, refusal = await self._policy(self.service.on_message, self.principal, msg, opts)
        if refusal:
            await self.push(refusal)
            return
        log.info("submission %s %s: queued %s (trace %s)", self.session_id, self.peer_ip,
                 row["id"], trace_id)
        await self.push(f"250 2.0.0 OK queued as {clean_text(str(row['id']), 100)}")


class SubmissionServer(TransferServer):
    """One submission listener: STARTTLS (587) or, with `implicit_tls`, TLS from the first
    byte (465). `service` answers; the rest of the arguments are TransferServer's."""

    def __init__(self, service: SubmissionService, *, implicit_tls: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(service, **kwargs)  # type: ignore[arg-type]
        self.service = service
        self.implicit_tls = implicit_tls
        if implicit_tls and self.tls_context is None:
            raise ValueError("implicit TLS needs a TLS context")

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("SubmissionServer already started")
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = self.tls_context if self.implicit_tls else None
        self._server = await loop.create_server(lambda: SubmissionProtocol(self, loop),
                                                self.host, self._port, ssl=context)
        log.info("smtp submission listening on %s:%d%s", self.host, self.port,
                 " (implicit TLS)" if self.implicit_tls else "")


class SubmissionListeners:
    """The STARTTLS listener and, when configured, the implicit-TLS one, started together."""

    def __init__(self, starttls: SubmissionServer, implicit: SubmissionServer | None) -> None:
        self.starttls = starttls
        self.implicit = implicit

    @property
    def port(self) -> int:
        return self.starttls.port

    @property
    def tls_port(self) -> int | None:
        return self.implicit.port if self.implicit is not None else None

    async def start(self) -> None:
        await self.starttls.start()
        if self.implicit is not None:
            try:
                await self.implicit.start()
            except BaseException:
                await self.starttls.stop()
                raise

    async def stop(self) -> None:
        servers = [s for s in (self.starttls, self.implicit) if s is not None]
        await asyncio.gather(*(s.stop() for s in servers))


def build_submission(services: Any, *, tls_context: ssl.SSLContext, port: int,
                     tls_port: int) -> SubmissionListeners:
    """Listeners on `port` (STARTTLS) and `tls_port` (implicit TLS; 0 = none) sharing one
    SubmissionService built from `services` (settings, database, limiter, caches, clock)."""
    s = services.settings
    service = SubmissionService(
        db=services.db, settings=s, limiter=services.limiter,
        # The row is read on every AUTH (revocation applies at once), so verified passwords
        # can be remembered longer than other cached settings; INBOX_CACHE_SECS=0 turns it off.
        auth=SmtpAuthCache(600 if s.INBOX_CACHE_SECS > 0 else 0),
        tenant_cache=services.tenant_cache,
        limits=SubmissionLimits(
            connections_per_minute=s.SMTP_RATE_LIMIT_SUBMISSION_CONNECTIONS_PER_MINUTE,
            messages_per_minute=s.SMTP_RATE_LIMIT_SUBMISSION_MESSAGES_PER_MINUTE,
            auth_failures_per_minute=s.SMTP_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE,
            fail_open=s.SMTP_RATE_LIMIT_FAIL_OPEN_ON_DB_ERROR),
        clock=services.clock, handoff=services.handoff)
    common: dict[str, Any] = {
        "hostname": s.SERVER_HOSTNAME, "host": s.SERVER_BIND_ADDR, "tls_context": tls_context,
        "max_message_bytes": s.SMTP_MAX_MESSAGE_BYTES,
        # The per-message limit is the organization's (checked at RCPT); this only bounds it.
        "max_recipients": 1000, "max_connections": s.SERVER_MAX_CONNECTIONS,
        "command_timeout_secs": s.SMTP_COMMAND_TIMEOUT_SECS,
        "data_timeout_secs": s.SMTP_DATA_TIMEOUT_SECS, "clock": services.clock}
    starttls = SubmissionServer(service, port=port, **common)
    implicit = SubmissionServer(service, port=tls_port, implicit_tls=True,
                                **common) if tls_port else None
    return SubmissionListeners(starttls, implicit)
