"""The DATA reader (`inbox.smtp.content.read_message`): the bulk reader must do exactly what
the line-by-line reader it replaced did (kept below as the oracle), byte for byte, including
what it leaves in the reader for the pipelined commands after the end of the data.

Run `python -m tests.test_data_reader` for the old-versus-new micro-benchmark."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbox.smtp.content import LINE_TOO_LONG, MAX_LINE_OCTETS, read_message, too_big
from tests.support.smtp_smuggling import FIRST, PAYLOADS, SMUGGLED, Smuggle

Reader = Callable[..., Awaitable[tuple[bytes, str | None]]]
log = logging.getLogger("inbox.smtp.content")  # the oracle logs where the product does
_BARE_EOL = re.compile(rb"\r|\n")
TRAILER = b"QUIT\r\n"


async def oracle_read_message(reader: asyncio.StreamReader, max_bytes: int,
                              activity: Callable[[], None] = lambda: None
                              ) -> tuple[bytes, str | None]:
    """The line-by-line reader as it was before the bulk reader (commit 7f5f621), verbatim."""
    out = bytearray()
    problem: str | None = None
    overlong = False  # in the middle of a line longer than the reader's limit
    bare = 0
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            # Drop what was buffered; the rest of the line follows. `consumed` keeps the last
            # byte back when no CRLF was found, so a CR split from its LF is not lost.
            await reader.readexactly(exc.consumed)
            overlong = True
            activity()
            continue
        activity()
        if overlong:  # the tail of an over-long line
            overlong = False
            problem = problem or LINE_TOO_LONG
            out.clear()
            continue
        if line == b".\r\n":  # the end: <CRLF>.<CRLF> with the previous line's CRLF
            break
        if problem:
            continue
        body = line[:-2]
        if body[:1] == b".":  # RFC 5321 §4.5.2 transparency
            body = body[1:]
        if len(body) > MAX_LINE_OCTETS:
            problem = LINE_TOO_LONG
            out.clear()
            continue
        if b"\r" in body or b"\n" in body:
            body = _BARE_EOL.sub(b"\r\n", body)
            bare += 1
        if len(out) + len(body) + 2 > max_bytes:
            problem = too_big(max_bytes)
            out.clear()
            continue
        out += body
        out += b"\r\n"
    if bare:
        log.info("DATA: normalised bare CR/LF in %d line(s)", bare)
    return (b"", problem) if problem else (bytes(out), None)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def run(read: Reader, stream: bytes, *, limit: int, max_bytes: int,
              chunks: list[int] | None = None, eof: bool = True) -> dict[str, Any]:
    """Feed `stream` to a real StreamReader (all at once, or in `chunks` sizes from a task that
    yields between them) and read one message with `read`. Returns what it returned or
    raised, what it logged, and what it left in the reader."""
    reader = asyncio.StreamReader(limit=limit)

    async def feed() -> None:
        if chunks is None:
            reader.feed_data(stream)
        else:
            pos, i = 0, 0
            while pos < len(stream):
                size = chunks[i % len(chunks)] if chunks else len(stream)
                reader.feed_data(stream[pos:pos + size])
                pos, i = pos + size, i + 1
                await asyncio.sleep(0)
        if eof:
            reader.feed_eof()

    records = _Records()
    log.addHandler(records)
    old_level = log.level
    log.setLevel(logging.INFO)
    feeder = asyncio.ensure_future(feed())
    reading = asyncio.ensure_future(read(reader, max_bytes))
    try:
        await feeder
        # Everything is in the reader now: a reader still waiting wants bytes past the end.
        outcome: Any = await asyncio.wait_for(reading, 1)
    except asyncio.IncompleteReadError:
        outcome = "IncompleteReadError"
    finally:
        log.removeHandler(records)
        log.setLevel(old_level)
    if not eof:
        reader.feed_eof()
    return {"outcome": outcome, "log": records.messages, "left": await reader.read()}


# --- property: the bulk reader is the line reader ----------------------------------------

LIMITS = [999, 1001, 1100, 65536]  # 999 is the least the reader supports; aiosmtpd uses 1001
PIECES = [b"\r\n", b"\r", b"\n", b".", b"..", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r",
          b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\r\n..\r\n", b"\r\r\n", b"a", b"bc",
          b"Subject: hi", b" ", b"\x00\xff"]


@st.composite
def pieces(draw: st.DrawFn) -> bytes:
    """Message text: mostly ordinary lines (some dot-stuffed), or those mixed with the
    smuggling pieces, or also with runs long enough for the line and reader limits."""
    def run_of(lengths: st.SearchStrategy[int]) -> st.SearchStrategy[bytes]:
        return st.builds(lambda n, dot, ch: (b"." if dot else b"") + ch * n,
                         lengths, st.booleans(), st.sampled_from([b"x", b"\r", b"."]))

    plain = st.builds(lambda dot, n, ch: dot + ch * n + b"\r\n",
                      st.sampled_from([b"", b"", b"", b".", b".."]), st.integers(0, 200),
                      st.sampled_from([b"a", b" ", b"\xe9"]))
    near_limits = st.one_of(*(st.integers(n - 4, n + 4) for n in (998, 1001, 1100)))
    profile = draw(st.sampled_from(["plain", "smuggling", "long"]))
    one = {
        "plain": st.one_of(plain, st.just(b"\r\n")),
        "smuggling": st.one_of(plain, st.sampled_from(PIECES), run_of(st.integers(0, 80))),
        "long": st.one_of(plain, st.sampled_from(PIECES), run_of(near_limits),
                          run_of(st.integers(1000, 3000))),
    }[profile]
    return b"".join(draw(st.lists(one, min_size=10 if profile == "plain" else 0, max_size=50)))


@st.composite
def delivery(draw: st.DrawFn) -> dict[str, Any]:
    """How the bytes reach the reader: its limit, the size limit, the chunking, EOF or not."""
    return {
        "limit": draw(st.sampled_from(LIMITS)),
        "max_bytes": draw(st.one_of(st.integers(0, 3000), st.just(10 ** 6))),
        "chunks": draw(st.one_of(st.none(), st.lists(st.integers(1, 1500), min_size=1,
                                                      max_size=8))),
        "eof": draw(st.booleans()),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces(), delivery())
def test_same_as_line_reader(content: bytes, how: dict[str, Any]) -> None:
    stream = content + b"\r\n.\r\n" + TRAILER

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return (await run(oracle_read_message, stream, **how),
                await run(read_message, stream, **how))

    old, new = asyncio.run(both())
    assert new == old
    assert old["left"].endswith(TRAILER)  # the oracle itself never reads past the end


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces(), delivery())
def test_peer_closing_early_is_the_same(content: bytes, how: dict[str, Any]) -> None:
    """Without the final end marker: IncompleteReadError from both (unless the content has
    an end line of its own, and then the same message)."""
    how["eof"] = True

    async def both() -> tuple[dict[str, Any], dict[str, Any]]:
        return (await run(oracle_read_message, content, **how),
                await run(read_message, content, **how))

    old, new = asyncio.run(both())
    assert new == old


EOF_TABLE = [
    ("nothing", b""),
    ("no-marker", b"hello\r\n"),
    ("half-marker", b"hello\r\n."),
    ("marker-without-lf", b"hello\r\n.\r"),
    ("lf-dot-lf", b"hello\n.\n"),
    ("long-line", b"x" * 5000),
    ("dot-first", b"."),
]


@pytest.mark.parametrize("limit", [1001, 65536])
@pytest.mark.parametrize("sent", [c[1] for c in EOF_TABLE], ids=[c[0] for c in EOF_TABLE])
async def test_peer_closing_before_the_end_raises(sent: bytes, limit: int) -> None:
    for chunks in (None, [1], [7]):
        for read in (oracle_read_message, read_message):
            result = await run(read, sent, limit=limit, max_bytes=10 ** 6, chunks=chunks)
            assert result["outcome"] == "IncompleteReadError", (read, chunks)


# --- table: exact cases --------------------------------------------------------------------

CASE_TABLE = [
    # id, content sent before the final <CRLF>.<CRLF> (None: the first line is the end),
    # max_bytes, the expected return value
    ("empty", None, 100, (b"", None)),
    ("one-line", b"hello", 100, (b"hello\r\n", None)),
    ("stuffed", b"..a\r\n..\r\n..", 100, (b".a\r\n.\r\n.\r\n", None)),
    ("first-line-dot", b".x", 100, (b"x\r\n", None)),
    ("bare-lf-normalised", b"a\nb", 100, (b"a\r\nb\r\n", None)),
    ("dot-after-bare-lf-kept", b"a\n.b", 100, (b"a\r\n.b\r\n", None)),
    ("998-octets", b"x" * 998, 10 ** 6, (b"x" * 998 + b"\r\n", None)),
    ("999-octets", b"x" * 999, 10 ** 6, (b"", LINE_TOO_LONG)),
    ("999-stuffed", b"." + b"x" * 998, 10 ** 6, (b"x" * 998 + b"\r\n", None)),
    ("1000-stuffed", b"." + b"x" * 999, 10 ** 6, (b"", LINE_TOO_LONG)),
    ("over-reader-limit", b"a\r\n" + b"x" * 70000 + b"\r\nb", 10 ** 6, (b"", LINE_TOO_LONG)),
    ("at-size-limit", b"a" * 8, 10, (b"a" * 8 + b"\r\n", None)),
    ("over-size-limit", b"a" * 9, 10, (b"", too_big(10))),
    ("size-before-long", b"a" * 20 + b"\r\n" + b"x" * 2000, 10, (b"", too_big(10))),
    ("long-before-size", b"x" * 2000 + b"\r\n" + b"a" * 20, 10, (b"", LINE_TOO_LONG)),
]


@pytest.mark.parametrize("limit", [1001, 65536])
@pytest.mark.parametrize("content, max_bytes, expected", [c[1:] for c in CASE_TABLE],
                         ids=[c[0] for c in CASE_TABLE])
async def test_cases(content: bytes | None, max_bytes: int, expected: tuple[bytes, str | None],
                     limit: int) -> None:
    stream = (b".\r\n" if content is None else content + b"\r\n.\r\n") + TRAILER
    for chunks in (None, [1], [3, 1000]):
        result = await run(read_message, stream, limit=limit, max_bytes=max_bytes,
                           chunks=chunks, eof=False)
        assert result["outcome"] == expected
        assert result["left"] == TRAILER


@pytest.mark.parametrize("case", PAYLOADS, ids=[p.id for p in PAYLOADS])
@pytest.mark.parametrize("chunks", [None, [1], [5]], ids=["whole", "bytewise", "by5"])
async def test_smuggling_sequences_are_content(case: Smuggle, chunks: list[int] | None
                                               ) -> None:
    """SEC Consult's sequences before a "MAIL FROM ..." block: only the real <CRLF>.<CRLF>
    ends the message; the text after a false end is in it, and what follows the real end
    (the pipelined commands) is left in the reader."""
    stream = FIRST + case.separator + SMUGGLED + b".\r\n" + TRAILER
    result = await run(read_message, stream, limit=1001, max_bytes=10 ** 6, chunks=chunks,
                       eof=False)
    if case.messages == 1:
        assert result["outcome"] == (FIRST + case.stored + SMUGGLED, None)
        assert result["left"] == TRAILER
    else:  # the control row: the real end comes first, the block after it is left unread
        assert result["outcome"] == (FIRST + b"\r\n", None)
        assert result["left"] == SMUGGLED + b".\r\n" + TRAILER
    assert result == await run(oracle_read_message, stream, limit=1001, max_bytes=10 ** 6,
                               chunks=chunks, eof=False)


async def test_bare_newlines_logged_once_with_a_count() -> None:
    stream = b"a\nb\r\nc\rd\r\n..\r\r\nok\r\n.\r\n" + TRAILER
    result = await run(read_message, stream, limit=1001, max_bytes=1000, eof=False)
    assert result["outcome"] == (b"a\r\nb\r\nc\r\nd\r\n.\r\n\r\nok\r\n", None)
    assert result["log"] == ["DATA: normalised bare CR/LF in 3 line(s)"]


async def test_activity_is_reported_while_reading() -> None:
    calls: list[int] = []
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data((b"y" * 70 + b"\r\n") * 500 + b".\r\n" + TRAILER)
    body, problem = await read_message(reader, 10 ** 6, lambda: calls.append(1))
    assert problem is None and len(body) == 72 * 500
    assert 1 <= len(calls) <= 10  # once per read, not once per line


# --- over a real connection ----------------------------------------------------------------


@pytest.mark.parametrize("size", [1_000, 100_000, 3_000_000])
async def test_over_loopback_with_pipelined_commands(size: int) -> None:
    """A client on 127.0.0.1 sends a message and the next commands in one write; the server
    side reads it with aiosmtpd's limit (1001) while the transport pauses and resumes."""
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    lines = [b"." + line if i % 7 == 0 else line for i in range(size // len(line))]
    sent = b"".join(lines)
    expected = b"".join(x[1:] if x[:1] == b"." else x for x in lines)
    got: asyncio.Future[tuple[tuple[bytes, str | None], bytes]] = asyncio.Future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        result = await read_message(reader, 10 ** 7)
        got.set_result((result, await reader.readuntil(b"QUIT\r\n")))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=1001)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent + b".\r\nMAIL FROM:<a@b.test>\r\nQUIT\r\n")
        await writer.drain()
        (body, problem), rest = await asyncio.wait_for(got, 20)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert problem is None
    assert body == expected
    assert rest == b"MAIL FROM:<a@b.test>\r\nQUIT\r\n"


# --- micro-benchmark (by hand: python -m tests.test_data_reader) ---------------------------


def _bench() -> None:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.\r\n"
    small = (line[:38] + b"\r\n") * 25  # 25 lines of 40 octets
    big = line * (100_000 // len(line))
    cases = [("1 KB, 25 lines", small), ("100 KB", big)]

    async def timeit(read: Reader, data: bytes, limit: int, n: int) -> float:
        loop = asyncio.get_running_loop()
        handle = [loop.call_later(300, lambda: None)]

        def activity() -> None:  # what aiosmtpd's _reset_timeout does
            handle[0].cancel()
            handle[0] = loop.call_later(300, lambda: None)

        stream = data + b".\r\n" + TRAILER
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                reader = asyncio.StreamReader(limit=limit)
                reader.feed_data(stream)
                await read(reader, 10 ** 7, activity)
            best = min(best, (time.perf_counter() - start) / n)
        handle[0].cancel()
        return best * 1e6

    async def main() -> None:
        for limit in (1001, 65536):
            for name, data in cases:
                n = 2000 if len(data) < 10_000 else 40
                old = await timeit(oracle_read_message, data, limit, n)
                new = await timeit(read_message, data, limit, n)
                print(f"limit {limit:>5}  {name:<15} old {old:9.1f} µs   new {new:8.1f} µs"
                      f"   x{old / new:.1f}")

    asyncio.run(main())


if __name__ == "__main__":
    _bench()
