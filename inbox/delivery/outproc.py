"""Outbound SMTP in a child process: DKIM signing and the SMTP conversation run beside the API.

The process that serves GraphQL and owns the (embedded) database is bound to one core by the
GIL. Signing a message and talking SMTP to its MX need nothing from the database, so
`ProcessTransport` hands them to one child process (`python -m inbox.delivery.outproc`) that
runs an ordinary `SmtpTransport` with its own session pool. The worker still leases jobs,
resolves MX hosts and TLS policy, and records results; the child only signs and sends.

Protocol (stdin/stdout pipes, frames of a 4-byte big-endian length then a pickle; both ends are
this package, started by us):
  parent -> child: the transport's settings once, then (id, "deliver", args) and
                   (None, "close", None) to close the pool and exit;
  child -> parent: (id, AttemptResult) or (id, "error text").
`args` carries the unsigned message and the signer's key material (`DkimSigner.spec`); the
child keeps a signer per spec.

Failure: if the child dies, every attempt in flight returns a temporary (451 4.3.0) result, so
the jobs are retried: a message the child had already handed over is sent again (at least
once, never lost). The next attempt starts a new child. Ctrl-C reaches the whole process group:
the child ignores SIGINT and leaves when the parent closes it or its stdin ends; on Linux it is
killed with its parent (a kill -9 of the service leaves no SMTP session running on).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from typing import Any

from inbox.delivery.relay import RelayConfig
from inbox.delivery.results import AttemptResult, failed_attempt

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024  # a 25 MB message, base64 and all, fits well within this


async def _read(reader: asyncio.StreamReader) -> Any:
    size = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return pickle.loads(await reader.readexactly(size))


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


class ChildGone(Exception):
    """The delivery process ended while an attempt was in flight."""


def _local_error(rcpts: list[str], text: str) -> AttemptResult:
    return failed_attempt(rcpts, 451, "4.3.0", f"local error: {text}")  # retried


class ProcessTransport:
    """`SmtpTransport`'s interface (deliver, close_idle, aclose, relay), run in a child process.
    `signs` tells the worker to pass the unsigned message and `sign=DkimSigner.spec`."""

    signs = True

    def __init__(self, *, helo_name: str, port: int = 25, timeout: float = 60,
                 relay: RelayConfig | None = None, ca_file: str | None = None,
                 max_sessions_per_host: int = 20, log_level: str = "WARNING") -> None:
        self.relay = relay
        self._config = {"helo_name": helo_name, "port": port, "timeout": timeout,
                        "relay": relay, "ca_file": ca_file, "log_level": log_level,
                        "max_sessions_per_host": max_sessions_per_host}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._starting: asyncio.Lock | None = None
        self.started = 0  # children started so far (a restart after a crash counts)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None \
            else None

    async def deliver(self, hosts: Sequence[Any], mail_from: str, recipients: Sequence[str],
                      raw: bytes, *, smtputf8: bool = False,
                      sign: tuple[Any, ...] | None = None) -> AttemptResult:
        rcpts = list(recipients)
        try:
            proc = await self._child()
        except OSError as exc:
            return _local_error(rcpts, f"cannot start the delivery process: {exc}")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            assert proc.stdin is not None
            proc.stdin.write(_frame((request_id, "deliver", (list(hosts), mail_from, rcpts, raw,
                                                             smtputf8, sign))))
            await proc.stdin.drain()
            reply = await asyncio.shield(future)
        except (ConnectionError, BrokenPipeError) as exc:
            return _local_error(rcpts, f"delivery process unreachable: {exc}")
        except ChildGone as exc:
            return _local_error(rcpts, str(exc))
        finally:
            self._pending.pop(request_id, None)
        if isinstance(reply, str):
            return _local_error(rcpts, reply)
        return reply  # type: ignore[no-any-return]

    async def start(self) -> None:
        """Start the child now rather than at the first attempt (its imports take ~1 s)."""
        try:
            await self._child()
        except OSError as exc:
            log.warning("cannot start the delivery process yet: %s", exc)

    async def close_idle(self) -> None:
        """Pooled sessions live in the child; they close themselves when idle too long."""

    async def aclose(self) -> None:
        """Ask the child to close its sessions (QUIT) and exit; wait for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, BrokenPipeError, RuntimeError):
            assert proc.stdin is not None
            proc.stdin.write(_frame((None, "close", None)))
            await proc.stdin.drain()
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)

    async def _child(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._proc is not None and self._proc.returncode is None:
                return self._proc
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "inbox.delivery.outproc", str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(_frame(self._config))
            self._proc = proc
            self.started += 1
            self._reader_task = asyncio.create_task(self._replies(proc))
            log.info("delivery process %d started", proc.pid)
            return proc

    async def _replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                request_id, reply = await _read(proc.stdout)
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError,
                pickle.UnpicklingError):
            pass
        code = await proc.wait()
        if self._proc is proc:
            self._proc = None
        if code != 0:
            log.error("delivery process %d exited with %s; %d attempt(s) in flight are "
                      "retried", proc.pid, code, len(self._pending))
        gone = ChildGone(f"delivery process exited with {code}")
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(gone)


# -- the child ------------------------------------------------------------------------------

async def _serve() -> None:
    from inbox import heap
    from inbox.delivery.signing import DkimSigner
    from inbox.delivery.transport import SmtpTransport

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2 ** 16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out_transport, out_protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(out_transport, out_protocol, None, loop)
    config = await _read(reader)
    logging.basicConfig(level=config.pop("log_level"),
                        format="%(levelname)s %(name)s[outproc]: %(message)s")
    transport = SmtpTransport(**config)
    signers: dict[tuple[Any, ...], DkimSigner] = {}
    heap.settle()
    tasks: set[asyncio.Task[None]] = set()

    async def deliver(request_id: int, args: tuple[Any, ...]) -> None:
        hosts, mail_from, rcpts, raw, smtputf8, spec = args
        reply: Any
        try:
            if spec is not None:
                signer = signers.get(spec)
                if signer is None:
                    signer = signers[spec] = DkimSigner(*spec)
                raw = signer.sign(raw)
        except Exception as exc:  # noqa: BLE001 - our own failure: defer, never suppress
            log.exception("DKIM signing failed")
            reply = f"DKIM signing failed: {exc}"
        else:
            try:
                reply = await transport.deliver(hosts, mail_from, rcpts, raw,
                                                smtputf8=smtputf8)
            except Exception as exc:  # noqa: BLE001 - deliver does not raise; be sure
                log.exception("delivery failed unexpectedly")
                reply = f"delivery failed: {type(exc).__name__}: {exc}"
        writer.write(_frame((request_id, reply)))
        await writer.drain()

    try:
        while True:
            try:
                request_id, op, args = await _read(reader)
            except asyncio.IncompleteReadError:
                break  # the parent went away
            if op == "close":
                break
            task = asyncio.create_task(deliver(request_id, args))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await transport.aclose()
        writer.close()


def _die_with_parent(parent: int) -> None:
    """A kill -9 of the service must end its SMTP sessions too (tests/test_crash.py): Linux
    sends us SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); elsewhere the closed stdin
    ends us after the sessions in flight."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # it died before the prctl took effect
        os._exit(0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    if len(sys.argv) > 1:
        _die_with_parent(int(sys.argv[1]))
    try:
        import uvloop

        uvloop.run(_serve())
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        asyncio.run(_serve())
    os._exit(0)  # no lingering threads (the resolver's, TLS) keep the child alive


if __name__ == "__main__":
    main()
