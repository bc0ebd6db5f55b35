"""RFC 2920 command pipelining for the outbound mail transaction.

With PIPELINING the client sends MAIL, every RCPT and DATA in one write, reads their replies
in order, and sends the message after DATA's 354: two round trips per message instead of
3 + one per recipient, and half the writes and wake-ups on both ends.

aiosmtplib cannot do it: its protocol reads one reply per command written and drops bytes
that arrive while an earlier reply waits to be picked up. So for the span of one transaction
the session's transport is handed to `Replies`, a protocol that queues every reply in order,
and then handed back. What happens to the connection meanwhile (end of file, loss, flow
control) is passed on to aiosmtplib's protocol as well, so its SMTP object stays truthful.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Iterator
from typing import Any

from aiosmtplib import (
    SMTP,
    SMTPReadTimeoutError,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.email import quote_address

MAX_REPLY_BYTES = 64 * 1024  # one reply, however many lines; more is not a sane server
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # aiosmtplib refuses these in command arguments
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")  # aiosmtplib's DATA normalisation
_DOT = re.compile(rb"(?m)^\.")


class Replies(asyncio.Protocol):
    """Every SMTP reply on the connection, queued in order as (code, text); `text` has the
    lines of a multi-line reply joined by newlines, as aiosmtplib gives it."""

    def __init__(self, inner: Any, timeout: float | None) -> None:
        self.inner = inner  # aiosmtplib's protocol, told about EOF, loss and flow control
        self.timeout = timeout  # seconds to wait for each reply
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        try:
            self._parse()
        except SMTPResponseException as exc:
            self._fail(exc)
        self._wake()

    def _parse(self) -> None:
        while True:
            offset, lines, code = 0, [], -1
            while True:
                end = self._buffer.find(b"\n", offset)
                if end == -1:
                    if len(self._buffer) > MAX_REPLY_BYTES:
                        raise SMTPResponseException(-1, "Response too long")
                    return  # the rest of this reply is still to come
                line = bytes(self._buffer[offset:end + 1])
                offset = end + 1
                try:
                    code = int(line[:3])
                except ValueError:
                    raise SMTPResponseException(
                        -1, "Malformed SMTP response line: "
                        + line.decode("utf-8", "ignore").strip()) from None
                lines.append(line[4:].strip(b" \t\r\n"))
                if line[3:4] != b"-":
                    break
            del self._buffer[:offset]
            self._replies.append((code, b"\n".join(lines).decode("utf-8", "surrogateescape")))

    def eof_received(self) -> bool | None:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def reply(self) -> tuple[int, str]:
        """The next reply; SMTPServerDisconnected, SMTPResponseException or
        SMTPReadTimeoutError when there is none to be had."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, self.timeout)
            except TimeoutError:
                raise SMTPReadTimeoutError("Timed out waiting for server response") from None
            finally:
                self._waiter = None
        return self._replies.popleft()


@contextlib.contextmanager
def replies_of(smtp: SMTP) -> Iterator[tuple[Replies, asyncio.WriteTransport]]:
    """The session's replies and transport, taken from aiosmtplib for the block (replies
    waited for as long as the session's own timeout)."""
    protocol = smtp.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise SMTPServerDisconnected("Connection lost")
    replies = Replies(protocol, smtp.timeout)
    transport.set_protocol(replies)
    try:
        yield replies, transport  # type: ignore[misc]
    finally:
        if transport.get_protocol() is replies:
            transport.set_protocol(protocol)


def command(verb: bytes, *args: bytes) -> bytes:
    """One command line; ValueError for control characters, as aiosmtplib refuses them."""
    for arg in args:
        if _CONTROL.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join((verb, *args)) + b"\r\n"


def mail_command(sender: str, options: list[str], encoding: str) -> bytes:
    return command(b"MAIL", b"FROM:" + quote_address(sender).encode(encoding),
                   *(o.encode("ascii") for o in options))


def rcpt_command(recipient: str, encoding: str) -> bytes:
    return command(b"RCPT", b"TO:" + quote_address(recipient).encode(encoding))


def data_payload(raw: bytes) -> bytes:
    """The message as sent after 354: CRLF line ends, leading dots doubled, ending in
    CRLF.CRLF (as aiosmtplib's DATA sends it)."""
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:  # a bare CR or LF
        raw = _LINE_END.sub(b"\r\n", raw)
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    if raw.startswith(b".") or b"\n." in raw:
        raw = _DOT.sub(b"..", raw)
    return raw + b".\r\n"
