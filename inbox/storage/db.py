"""SurrealDB access: one serialised gateway per process, statement-level error checking, ids.

The embedded engine is unsafe under concurrent calls (see ENGINE-NOTES), so every call goes
through one lock. Multi-statement text is sent with `query_raw` and every statement's status is
checked; `THROW 'CODE|detail'` inside a transaction becomes a typed `DbThrow`.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import hashlib
import itertools
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surrealdb import AsyncEmbeddedSurrealConnection, AsyncSurreal, RecordID

from inbox.errors import ConfigError, Conflict, InboxError, StorageUnavailable, UnencodableText
from inbox.storage import wire

log = logging.getLogger(__name__)

SWITCH_INTERVAL_SECS = 0.0005
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    """A time-sortable unique id: `prefix_` + 10 chars of ms time + 64 random bits in hex."""
    ms = int(time.time() * 1000)
    head = "".join(_CROCKFORD[(ms >> shift) & 31] for shift in range(45, -1, -5))
    return f"{prefix}_{head}{secrets.token_hex(8)}"


class DbThrow(InboxError):
    """A `THROW 'CODE|detail'` raised by a statement inside our own SurrealQL."""

    code = "DB_THROW"

    def __init__(self, throw_code: str, detail: str) -> None:
        super().__init__(f"{throw_code}: {detail}")
        self.throw_code = throw_code
        self.detail = detail


def plain(value: Any) -> Any:
    """Turn SDK values into plain Python: RecordID → its key, recursively."""
    if isinstance(value, RecordID):
        return value.id
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


class DataDirLock:
    """Exclusive lock on the data dir: one process per embedded database (ENGINE-NOTES)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "inbox.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text().strip() or "another process"
            raise ConfigError(
                f"INBOX_DATA_DIR: {self.path.parent} is in use by {holder}; the embedded "
                "database allows one process per data dir. Stop it, or point "
                "INBOX_DATABASE_URL at a SurrealDB server (ws://…) to run several processes."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Database:
    """The gateway. `run()` executes SurrealQL and returns each statement's result."""

    def __init__(self, url: str, *, namespace: str, database: str, username: str = "",
                 password: str = "", sync: bool = True) -> None:
        self.url = url
        self.namespace = namespace
        self.database = database
        self._username = username
        self._password = password
        self._sync = sync
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self._dir_lock: DataDirLock | None = None
        self._groups: dict[str, _Group] = {}
        self._members = itertools.count()  # names grouped members' parameters apart
        self._procedures: dict[str, str] = {}  # transaction text -> the call that runs it
        self.embedded = not url.startswith(("ws://", "wss://", "http://", "https://"))

    async def connect(self) -> None:
        if self.embedded and self.url.startswith(("surrealkv://", "file://")):
            path = Path(self.url.split("://", 1)[1])
            self._dir_lock = DataDirLock(path.parent)
            self._dir_lock.acquire()
            if self._sync:
                # ENGINE-NOTES: fsync per commit only when set before the engine starts.
                os.environ["SURREAL_SYNC_DATA"] = "true"
        if self.embedded:
            # The engine's threads need the GIL to hand each result back; while the event loop
            # runs Python they wait out the switch interval (5 ms by default), which made each
            # commit cost ~17 ms under load instead of ~0.7 ms. 0.5 ms measured ~3 ms.
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_SECS))
        try:
            conn = AsyncSurreal(self.url)
            await conn.connect()  # type: ignore[call-arg]  # the URL was given above
            if self._username:
                await conn.signin({"username": self._username, "password": self._password})
            await conn.use(self.namespace, self.database)
        except Exception as exc:
            if self._dir_lock:
                self._dir_lock.release()
            raise ConfigError(f"INBOX_DATABASE_URL: cannot open {self.url}: {exc}") from None
        self._conn = conn
        from inbox.storage.schema import migrate

        await migrate(self)

    async def close(self) -> None:
        if self._conn is not None:
            async with self._lock:
                try:
                    await self._conn.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    log.debug("close failed", exc_info=True)
                self._conn = None
        if self._dir_lock:
            self._dir_lock.release()
            self._dir_lock = None

    async def run(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Run one or more statements; return the list of statement results (plain values).

        Raises DbThrow for our own THROWs, Conflict for unique-index violations and
        StorageUnavailable for anything else the engine reports.
        """
        return _checked((await self._query(sql, params)).get("result") or [])

    async def _query(self, sql: str, params: Mapping[str, Any] | None,
                     members: list[_Member] | None = None) -> dict[str, Any]:
        """One engine call; the raw response with every statement's status. The parameters
        are `params`, or the (renamed) parameters of grouped `members`."""
        if self._conn is None:
            raise StorageUnavailable("database is not connected")
        try:
            if isinstance(self._conn, AsyncEmbeddedSurrealConnection):
                if members is None:
                    payload = wire.query_request(sql, dict(params or {}))
                else:
                    payload = wire.query_request_pairs(sql, [m.pairs for m in members],
                                                       sum(m.count for m in members))
                raw = await self._embedded_query(payload)
            else:
                if members is not None:
                    params = {k: v for m in members for k, v in m.params.items()}
                async with self._lock:
                    raw = await self._conn.query_raw(sql, dict(params or {}))
        except UnicodeEncodeError:  # text from a client that UTF-8 cannot carry: not ours
            raise unencodable_text() from None
        except Exception as exc:  # noqa: BLE001 - SDK raises bare RuntimeError on parse errors
            log.exception("database call failed")
            raise StorageUnavailable(f"database error: {exc}") from None
        if "error" in raw:
            raise StorageUnavailable(f"database error: {raw['error']}")
        return dict(raw)

    async def run_grouped(self, sql: str, params: Mapping[str, Any], *,
                          procedure: bool = False) -> list[Any]:
        """`run` for one self-contained transaction (BEGIN … COMMIT), grouped with concurrent
        calls into one engine call, with each caller's own results and errors, as `run` gives
        them. The group first runs as one transaction (one commit); if anything in it fails,
        it is rolled back and each member runs as its own transaction, so a THROW or a
        conflict fails only its own caller.

        Callers arriving while a group is in flight form the next group (up to GROUP_MAX).
        Parameters are renamed per member (`$x` becomes `$x__3`), so `sql` must not rely on
        SurrealQL's built-in variables other than those in `_BUILTIN_VARS`.

        `procedure=True` (for callers that need no statement results): the transaction runs as
        a stored function (see `_procedure_call`), and the result is one NONE. Procedure calls
        of *different* texts share one group: a send's store and a batch of delivery results
        that arrive together commit together. Commits, not rows, are what the engine's
        serialised gateway spends its time on under load (an fsync each).
        """
        key = sql
        if procedure:
            call = await self._procedure_call(sql)
            key = _PROCEDURES if call != sql else call  # not when it fell back to the text
            sql = call
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        # Renamed and encoded now, while the engine runs the group before: what happens between
        # two engine calls is on the serial path of every caller (encoding a group of eight
        # stores there took ~1 ms of the ~1.8 ms the engine stood idle between calls).
        index = next(self._members)
        member = _Member(text=_VAR.sub(functools.partial(_rename, index=index), sql),
                         params={f"{k}__{index}": v for k, v in params.items()},
                         future=asyncio.get_running_loop().create_future())
        if self.embedded:
            try:
                member.pairs = wire.map_pairs(member.params)
            except UnicodeEncodeError:
                raise unencodable_text() from None
            member.count = len(member.params)
        group.pending.append(member)
        if group.flusher is None or group.flusher.done():
            group.flusher = asyncio.ensure_future(self._flush_group(group))
        return await member.future

    async def _procedure_call(self, sql: str) -> str:
        """The one-line call that runs a self-contained transaction (BEGIN … COMMIT) as a
        stored function. Its body is defined once (DEFINE FUNCTION, named after the text's
        hash, so instances running other versions never overwrite it). The engine parses a
        group commit of ten members' transaction texts in ~4 ms more than ten calls (measured
        with submission's store): parsing, not writing, was most of a small transaction's
        cost. Errors (THROW, conflicts) surface exactly as with the text. Falls back to the
        text itself when it has no stored-function form or cannot be defined."""
        call = self._procedures.get(sql)
        if call is None:
            proc = _procedure(sql)
            call = sql
            if proc is not None:
                try:
                    await self.run(proc.define)
                    call = proc.call
                except InboxError as exc:  # e.g. a server user without the right to define
                    log.warning("running a transaction as text (cannot define %s: %s)",
                                proc.name, exc)
            self._procedures[sql] = call
        return call

    async def _flush_group(self, group: _Group) -> None:
        while group.pending:
            batch, group.pending = group.pending[:GROUP_MAX], group.pending[GROUP_MAX:]
            try:
                await self._flush_batch(batch)
            except Exception as exc:  # a bug here must not leave callers waiting for ever
                log.exception("grouped call failed")
                _fail_members(batch, StorageUnavailable(f"database error: {exc}"))
            except BaseException:
                _fail_members(batch, StorageUnavailable("database call cancelled"))
                raise

    async def _flush_batch(self, batch: list[_Member]) -> None:
        if len(batch) == 1:
            await self._run_members(batch, batch[0].text)
            return
        inner = [_TXN.match(m.text) for m in batch]
        if all(inner):
            # Optimistic: all members in ONE transaction (one commit, one fsync). Any failure
            # rolls it all back, and then each runs as its own transaction below.
            one = ("BEGIN TRANSACTION;\n" + "\n".join(m.group(1) for m in inner if m)
                   + "\nCOMMIT TRANSACTION;")
            try:
                results = (await self._query(one, None, batch)).get("result") or []
            except InboxError:
                results = []
            if results and len(results) % len(batch) == 0 and all(
                    r.get("status") == "OK" for r in results):
                _settle_members(batch, results)
                return
        await self._run_members(batch, "\n".join(m.text for m in batch))

    async def _run_members(self, batch: list[_Member], sql: str) -> None:
        """Run `sql`, the members' texts each as its own transaction, and settle each member
        with its own results."""
        try:
            results = (await self._query(sql, None, batch)).get("result") or []
        except UnencodableText as exc:
            # A server's SDK encodes the group's parameters together: one member's bad text
            # must not fail the others (the embedded engine's members are encoded apart and
            # never get here with it).
            if len(batch) == 1:
                _fail_members(batch, exc)
                return
            for member in batch:
                await self._run_members([member], member.text)
            return
        except InboxError as exc:
            _fail_members(batch, exc)
            return
        if len(results) % len(batch):  # not one block per member: run them one by one
            log.error("grouped statement gave %d results for %d members",
                      len(results), len(batch))
            for member in batch:
                await self._run_members([member], member.text)
            return
        _settle_members(batch, results)

    async def _embedded_query(self, payload: bytes) -> Any:
        """query_raw for the embedded engine with only the engine call under the lock.

        Encoding and decoding happen outside the lock, so other callers use the engine
        meanwhile, and by cbor2's C extension (wire.py) rather than the SDK's pure-Python CBOR.
        This reaches past the SDK's `_send` to its engine handle, `_db.execute`, which takes
        and returns the same CBOR RPC messages as a server's WebSocket.
        """
        async with self._lock:
            response = await self._conn._db.execute(payload)
        decoded = wire.decode(response)
        return decoded if isinstance(decoded, dict) else {}

    async def one(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        """Run statements and return the last statement's result."""
        results = await self.run(sql, params)
        return results[-1] if results else None


def unencodable_text() -> UnencodableText:
    """The error for parameters with text that UTF-8 cannot encode (a lone surrogate): the
    caller's input, permanent, rather than StorageUnavailable, which says "try again"."""
    return UnencodableText("text with an unpaired surrogate cannot be stored; "
                           "send valid Unicode")


GROUP_MAX = 64
_BUILTIN_VARS = {"value", "this", "parent", "before", "after", "event", "auth", "session",
                 "token", "input"}
_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_TXN = re.compile(r"^\s*BEGIN TRANSACTION;(.*)COMMIT TRANSACTION;\s*$", re.S | re.I)


def _rename(match: re.Match[str], index: int) -> str:
    name = match.group(1)
    return match.group(0) if name in _BUILTIN_VARS else f"${name}__{index}"


_LOCAL_VAR = re.compile(r"\b(?:LET|FOR)\s+\$([A-Za-z_][A-Za-z0-9_]*)", re.I)
_RETURN_STATEMENT = re.compile(r"(?:^|[;{])\s*RETURN\b", re.I)


@dataclass(frozen=True)
class _Procedure:
    name: str
    define: str
    call: str


def _procedure(sql: str) -> _Procedure | None:
    """The stored-function form of a BEGIN … COMMIT text: its parameters are the variables it
    reads but does not bind itself (LET, FOR) and that SurrealQL does not provide. None when
    the text is not one transaction, or has a RETURN statement (which would end a function
    early instead of giving a result)."""
    match = _TXN.match(sql)
    if match is None or _RETURN_STATEMENT.search(match.group(1)):
        return None
    body = match.group(1)
    params = sorted(set(_VAR.findall(body)) - _BUILTIN_VARS - set(_LOCAL_VAR.findall(body)))
    name = "fn::inbox_txn_" + hashlib.sha256(sql.encode()).hexdigest()[:16]
    return _Procedure(
        name=name,
        define=(f"DEFINE FUNCTION OVERWRITE {name}("
                + ", ".join(f"${p}: any" for p in params) + ") {" + body + "};"),
        call=("BEGIN TRANSACTION; " + name + "(" + ", ".join(f"${p}" for p in params)
              + "); COMMIT TRANSACTION;"),
    )


# The group of every stored-function call (run_grouped with procedure=True): each member's text
# is `BEGIN TRANSACTION; fn::…(…); COMMIT TRANSACTION;`, so each gives the same number of
# statement results, whichever function it calls.
_PROCEDURES = "\0procedures"


@dataclass
class _Member:
    """One caller's transaction in a group, its parameters renamed apart from the others'
    (`$x` → `$x__<n>`, in `text` and `params`) and, for the embedded engine, encoded."""

    text: str
    params: dict[str, Any]
    future: asyncio.Future[list[Any]]
    pairs: bytes = b""  # wire.map_pairs(params)
    count: int = 0


@dataclass
class _Group:
    pending: list[_Member] = field(default_factory=list)
    flusher: asyncio.Future[None] | None = None


def _fail_members(batch: list[_Member], exc: Exception) -> None:
    for member in batch:
        if not member.future.done():
            member.future.set_exception(exc)


def _settle_members(batch: list[_Member], results: list[Any]) -> None:
    """Each member's block of `results`, checked as `run` checks them, to its caller."""
    size = len(results) // len(batch)
    for index, member in enumerate(batch):
        if member.future.done():
            continue
        try:
            member.future.set_result(_checked(results[index * size:(index + 1) * size]))
        except InboxError as exc:
            member.future.set_exception(exc)


def _checked(results: list[Any]) -> list[Any]:
    """Each statement's result as plain values; raises DbThrow for our own THROWs, Conflict
    for unique-index violations and StorageUnavailable for anything else."""
    errors = [r for r in results if r.get("status") != "OK"]
    if errors:
        texts = [str(r.get("result")) for r in errors]
        for text in texts:
            if text.startswith("An error occurred: "):
                body = text.removeprefix("An error occurred: ")
                code, _, detail = body.partition("|")
                raise DbThrow(code, detail)
        for text in texts:
            if "already contains" in text or "already exists" in text:
                raise Conflict(text)
        log.error("statement failed: %s", texts)
        raise StorageUnavailable(f"database error: {texts[0]}")
    return [plain(r.get("result")) for r in results]
