"""Idle outbound SMTP sessions kept for reuse per endpoint: taking, returning, expiring, closing.
Does not open connections or run transactions (inbox.delivery.transport does).

A session goes back to the pool only when its last transaction left it ready for a new MAIL
(RFC 5321 §4.1.1.4: after a completed DATA the next MAIL may follow directly); one in an unknown
state is closed without QUIT, since the server may still answer an old command.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiosmtplib import SMTP, SMTPException

from inbox.delivery.results import TlsOutcome


class Endpoint(NamedTuple):
    """Where one SMTP session goes."""

    host: str  # what we connect to: an IP address or a name
    port: int
    name: str = ""  # the MX host name, for TLS (SNI, certificate checks); defaults to host
    policy: Any = None  # the `tlspolicy.HostPolicy` for this host (None: opportunistic)

    @property
    def tls_name(self) -> str:
        return self.name or self.host


class PoolKey(NamedTuple):
    host: str
    port: int
    tls_name: str
    relay: bool
    tls_policy: str = ""  # HostPolicy.pool_tag: never reuse a session set up under another


@dataclass
class Connection:
    """An open, greeted (and possibly TLS-upgraded and authenticated) session."""

    endpoint: Endpoint
    smtp: SMTP
    tls: TlsOutcome
    transactions: int = 0  # MAIL commands sent on this session
    ready: bool = False  # the last transaction left the session ready for a new MAIL
    idle_since: float = 0.0


class SessionPool:
    """Idle sessions per `PoolKey`, oldest first.

    A session idle for more than `max_idle_secs` is closed (checked whenever a session is taken
    or returned); one that has carried `max_messages_per_connection` transactions is closed with
    QUIT; at most `max_connections_per_endpoint` idle sessions are kept per key (0 turns pooling
    off). QUITs run in the background and wait at most `quit_timeout` seconds. `clock` is a
    monotonic clock in seconds.
    """

    def __init__(self, *, max_idle_secs: float, max_messages_per_connection: int,
                 max_connections_per_endpoint: int, quit_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not max_idle_secs >= 0:
            raise ValueError(f"max_idle_secs {max_idle_secs!r} must be >= 0")
        if max_messages_per_connection < 1:
            raise ValueError(f"max_messages_per_connection {max_messages_per_connection} "
                             "must be >= 1")
        if max_connections_per_endpoint < 0:
            raise ValueError(f"max_connections_per_endpoint {max_connections_per_endpoint} "
                             "must be >= 0")
        self.max_idle_secs = max_idle_secs
        self.max_messages_per_connection = max_messages_per_connection
        self.max_connections_per_endpoint = max_connections_per_endpoint
        self.quit_timeout = quit_timeout
        self._clock = clock
        self._idle: dict[PoolKey, list[Connection]] = {}  # oldest first
        self._next_sweep = 0.0
        self._closing: set[asyncio.Task[None]] = set()  # QUITs sent in the background
        self._closed = False

    def take(self, key: PoolKey) -> Connection | None:
        """The most recently used live idle session for `key`, or None."""
        self._sweep(self._clock())
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have timed out
            if conn.smtp.is_connected:
                return conn
            conn.smtp.close()  # the server hung up while it was idle
        return None

    def release(self, key: PoolKey, conn: Connection) -> None:
        """Pool a session the transaction left ready for MAIL, or close it."""
        if not conn.ready or not conn.smtp.is_connected:
            conn.smtp.close()  # unknown state: the server may still answer an old command
            return
        now = self._clock()
        self._sweep(now)
        idle = self._idle.setdefault(key, [])
        if (self._closed or conn.transactions >= self.max_messages_per_connection
                or len(idle) >= self.max_connections_per_endpoint or self.max_idle_secs <= 0):
            self._quit_later(conn)
            if not idle:
                del self._idle[key]
            return
        conn.idle_since = now
        idle.append(conn)

    async def close_idle(self) -> None:
        """Close every idle session (with QUIT). The pool stays usable."""
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        await asyncio.gather(*(self.close(conn) for conn in idle))

    async def aclose(self) -> None:
        """Close every idle session and wait for closes under way; sessions released later are
        closed instead of pooled."""
        self._closed = True
        await self.close_idle()
        while self._closing:
            await asyncio.gather(*self._closing)

    async def close(self, conn: Connection) -> None:
        """QUIT (bounded by `quit_timeout`) and close, whatever the server does."""
        smtp = conn.smtp
        try:
            if smtp.is_connected:
                await smtp.quit(timeout=self.quit_timeout)
        except (SMTPException, OSError):
            pass
        finally:
            smtp.close()

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

    def _quit_later(self, conn: Connection) -> None:
        # QUIT in the background so no delivery waits for another session's goodbye.
        if not conn.smtp.is_connected:
            conn.smtp.close()
            return
        task = asyncio.get_running_loop().create_task(self.close(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
