"""One SMTP mail transaction on an open outbound session: MAIL, RCPT per recipient, DATA, RSET.
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


async def reset(smtp: SMTP) -> bool:
    """RSET; whether the session is ready for a new MAIL."""
    if not smtp.is_connected:
        return False
    try:
        await smtp.rset()
    except (SMTPException, OSError):
        return False
    return True
