"""One SMTP mail transaction on an open outbound session: MAIL, RCPT per recipient, DATA, RSET;
pipelined (RFC 2920) when the server offers PIPELINING.
Also the `HostFailed` signal that a host cannot be used and the next one may be tried. Does not
open, pool or close sessions.
"""

from __future__ import annotations

from aiosmtplib import (
    SMTP,
    SMTPDataError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from inbox.delivery.pipeline import (
    Replies,
    data_payload,
    mail_command,
    rcpt_command,
    replies_of,
)
from inbox.delivery.pool import Connection
from inbox.delivery.results import RecipientResult, from_reply, synthetic


def describe(exc: BaseException) -> str:
    """An exception as one line for logs and results: "421 text", or the message and cause."""
    if isinstance(exc, SMTPResponseException):
        return f"{exc.code} {' '.join(exc.message.split())}"
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


class HostFailed(Exception):
    """This host cannot be used for this attempt; try the next one."""

    def __init__(self, text: str, *, code: int = 0, enhanced: str | None = None,
                 reply_text: str = "", permanent: bool = False,
                 tls_handshake: bool = False, tls_result: str | None = None) -> None:
        super().__init__(text)
        self.tls_result = tls_result  # an RFC 8460 failure type when TLS policy failed
        self.text = text
        self.code = code
        self.enhanced = enhanced
        self.reply_text = reply_text
        self.permanent = permanent
        self.tls_handshake = tls_handshake


class StaleSession(HostFailed):
    """A pooled session failed its MAIL FROM (421 or connection error): it died while idle.
    Nothing was accepted on it, so a fresh connection to the same host may be tried."""


async def run_transaction(conn: Connection, mail_from: str, rcpts: list[str], raw: bytes,
                          smtputf8: bool, requiretls: bool = False) -> list[RecipientResult]:
    """MAIL, RCPT for each recipient, DATA for the accepted ones.

    Raises `HostFailed` only before any DATA was sent (421 or connection lost), so the
    caller may safely try another host; `StaleSession` when that happens to the MAIL of a
    reused session. On return, `conn.ready` says whether a new MAIL may follow.
    """
    smtp = conn.smtp
    conn.ready = False
    reused = conn.transactions > 0
    if smtputf8 and not smtp.supports_extension("smtputf8"):
        # RFC 6531 §3.2: an internationalized envelope cannot go to a server without it.
        conn.ready = True
        return [synthetic(a, 553, "5.6.7", "remote server does not support SMTPUTF8")
                for a in rcpts]
    options = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={len(raw)}")  # RFC 1870 §3
    if smtp.supports_extension("8bitmime") and not raw.isascii():
        options.append("BODY=8BITMIME")  # RFC 6152 §3
    if smtputf8:
        options.append("SMTPUTF8")  # RFC 6531 §3.4
    if requiretls:
        options.append("REQUIRETLS")  # RFC 8689 §4.1
    encoding = "utf-8" if smtputf8 else "ascii"
    failed = StaleSession if reused else HostFailed

    conn.transactions += 1
    if smtp.supports_extension("pipelining"):
        return await _pipelined(conn, mail_from, rcpts, raw, options, encoding, failed)
    try:
        await smtp.mail(mail_from, options=options, encoding=encoding)
    except SMTPSenderRefused as exc:
        if exc.code == 421:
            raise failed(f"MAIL {describe(exc)}") from None
        conn.ready = True  # RFC 5321 §3.3: only an accepted MAIL starts a transaction
        return [from_reply(a, exc.code, exc.message) for a in rcpts]
    except ValueError as exc:  # not encodable / control characters: nothing was sent
        conn.ready = True
        return [synthetic(a, 553, "5.1.7", f"bad sender address: {exc}") for a in rcpts]
    except (SMTPException, OSError) as exc:
        raise failed(f"MAIL: {describe(exc)}") from None

    results: list[RecipientResult | None] = []
    accepted: list[int] = []
    for address in rcpts:
        try:
            await smtp.rcpt(address, encoding=encoding)
        except SMTPRecipientRefused as exc:
            if exc.code == 421:
                raise HostFailed(f"RCPT {describe(exc)}") from None
            results.append(from_reply(address, exc.code, exc.message))
            continue
        except ValueError as exc:
            results.append(synthetic(address, 553, "5.1.3", f"bad address: {exc}"))
            continue
        except (SMTPException, OSError) as exc:
            raise HostFailed(f"RCPT: {describe(exc)}") from None
        accepted.append(len(results))
        results.append(None)

    if not accepted:
        conn.ready = await reset(smtp)  # RFC 5321 §4.1.1.5: abort the open transaction
        return [r for r in results if r is not None]

    code, message, delivered, lost = 0, "", False, None
    try:
        response = await smtp.data(raw)
        code, message, delivered = response.code, response.message, True
        conn.ready = True  # RFC 5321 §4.1.1.4: the transaction is over
    except SMTPDataError as exc:  # RFC 5321 §4.2.5: one reply for all accepted recipients
        code, message = exc.code, exc.message
        # The refusal may have been to the DATA command itself, leaving MAIL and RCPT open.
        conn.ready = await reset(smtp)
    except (SMTPException, OSError) as exc:
        # No 2xx to the end of data: never delivered. The server may have it anyway; a
        # retry may duplicate (RFC 5321 §6.1), which beats losing it.
        lost = f"connection lost during DATA: {describe(exc)}"

    for index in accepted:
        address = rcpts[index]
        results[index] = (synthetic(address, 451, "4.4.2", lost) if lost is not None
                          else from_reply(address, code, message, delivered=delivered))
    return [r for r in results if r is not None]


async def _pipelined(conn: Connection, mail_from: str, rcpts: list[str], raw: bytes,
                     options: list[str], encoding: str, failed: type[HostFailed]
                     ) -> list[RecipientResult]:
    """run_transaction with RFC 2920 PIPELINING: MAIL, the RCPTs and DATA in one write, the
    message after DATA's 354 (pipeline.py). Outcomes and errors as in the one-by-one path."""
    smtp = conn.smtp
    try:
        lines = [mail_command(mail_from, options, encoding)]
    except ValueError as exc:  # not encodable / control characters: nothing was sent
        conn.ready = True
        return [synthetic(a, 553, "5.1.7", f"bad sender address: {exc}") for a in rcpts]
    results: list[RecipientResult | None] = []
    sent: list[int] = []  # indexes into results of recipients whose RCPT goes out
    for address in rcpts:
        try:
            lines.append(rcpt_command(address, encoding))
        except ValueError as exc:
            results.append(synthetic(address, 553, "5.1.3", f"bad address: {exc}"))
            continue
        sent.append(len(results))
        results.append(None)
    if not sent:  # nothing to send to: no transaction is opened
        conn.ready = True
        return [r for r in results if r is not None]
    lines.append(b"DATA\r\n")
    payload = data_payload(raw)

    accepted: list[int] = []
    outcome: tuple[int, str] | None = None  # the reply that decides the accepted recipients
    lost: str | None = None
    must_reset = False
    try:
        with replies_of(smtp) as (replies, transport):
            transport.write(b"".join(lines))
            code, text = await _envelope_reply(replies, "MAIL", failed)
            mail_refused = (code, text) if code != 250 else None
            for index in sent:
                rcpt_code, rcpt_text = await _envelope_reply(replies, "RCPT", HostFailed)
                if mail_refused is not None:
                    continue  # a 503 for want of a MAIL: the MAIL's reply is the answer
                if rcpt_code in (250, 251):
                    accepted.append(index)
                else:
                    results[index] = from_reply(rcpts[index], rcpt_code, rcpt_text)
            try:
                data_code, data_text = await replies.reply()
                if data_code == 354:
                    # RFC 2920 §3.1: with nobody accepted the data is ended at once.
                    transport.write(payload if accepted else b".\r\n")
                    final = await replies.reply()
                    if accepted:
                        outcome = final
                    must_reset = final[0] != 250 or not accepted
                elif accepted:
                    outcome, must_reset = (data_code, data_text), True
                else:
                    must_reset = mail_refused is None  # MAIL and RCPTs left the transaction open
            except (SMTPException, OSError) as exc:
                # No 2xx to the end of data: never delivered. The server may have it anyway; a
                # retry may duplicate (RFC 5321 §6.1), which beats losing it.
                lost = f"connection lost during DATA: {describe(exc)}"
    except SMTPServerDisconnected as exc:  # closed before anything was written
        raise failed(f"MAIL: {describe(exc)}") from None
    if mail_refused is not None:
        conn.ready = lost is None and (not must_reset or await reset(smtp))
        return [from_reply(a, mail_refused[0], mail_refused[1]) for a in rcpts]

    for index in accepted:
        address = rcpts[index]
        if lost is not None:
            results[index] = synthetic(address, 451, "4.4.2", lost)
        else:
            assert outcome is not None
            results[index] = from_reply(address, outcome[0], outcome[1],
                                        delivered=outcome[0] == 250)
    conn.ready = lost is None and (not must_reset or await reset(smtp))
    return [r for r in results if r is not None]


async def _envelope_reply(replies: Replies, verb: str, failed: type[HostFailed]
                          ) -> tuple[int, str]:
    """The next reply, to MAIL or a RCPT: `failed` when there is none or it is a 421 (the
    server is closing), as the one-by-one path raises them."""
    try:
        code, text = await replies.reply()
    except (SMTPException, OSError) as exc:
        raise failed(f"{verb}: {describe(exc)}") from None
    if code == 421:
        raise failed(f"{verb} {code} {' '.join(text.split())}")
    return code, text


async def reset(smtp: SMTP) -> bool:
    """RSET; whether the session is ready for a new MAIL."""
    if not smtp.is_connected:
        return False
    try:
        await smtp.rset()
    except (SMTPException, OSError):
        return False
    return True
