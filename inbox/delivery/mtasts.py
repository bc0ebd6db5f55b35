"""MTA-STS (RFC 8461) for outbound mail: discovering, fetching, parsing and caching a recipient
domain's policy. Does not connect to MX hosts or decide what to do with a policy.

`MtaStsResolver.policy(domain)` answers "which policy applies to mail for `domain` now?":

* §3.1: the TXT record at `_mta-sts.<domain>` names the current policy `id`;
* §3.3: the policy itself is fetched from `https://mta-sts.<domain>/.well-known/mta-sts.txt`
  (certificate valid for that name, 200 only, no redirects, text/plain, bounded size and time);
* §5.1: fetched policies are cached in the database (table `mta_sts_policy`, one row per
  domain, shared by every resolver on the database) until `max_age` has passed. A cached
  policy whose id matches the TXT record is used without fetching; a new id triggers a
  fetch. When no live policy can be had (no or bad TXT record, DNS failure, fetch failure),
  an unexpired cached policy is used; without one the domain has no policy (None).

The HTTPS client is a minimal HTTP/1.1 GET on asyncio streams + ssl: it connects to an address
that *our* resolver gave for `mta-sts.<domain>` while sending that name as SNI and Host and
checking the certificate against it. (httpx would need a custom transport to do the same, and
is only a test dependency; one GET with Connection: close does not need it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import idna

from inbox.errors import InboxError, TemporaryFailure
from inbox.resolver import DnsLookup

log = logging.getLogger(__name__)

POLICY_PATH = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 §3.2: max_age is at most 31557600 seconds (~1 year)
MODES = ("enforce", "testing", "none")  # RFC 8461 §5
MAX_HEAD = 16 * 1024  # bytes of status line + headers we read before giving up

# RFC 8461 §3.1: records not starting with "v=STSv1;" are discarded.
_STS_RECORD = re.compile(r"v=STSv1[ \t]*;")
_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
# RFC 8461 §3.2: sts-policy-mx-value = ["*."] Domain (RFC 5321 §4.1.2).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")


class PolicyFetchError(TemporaryFailure):
    """The policy could not be fetched or was invalid (logged; `policy()` never raises it)."""

    code = "MTA_STS_FETCH"


@dataclass(frozen=True)
class StsPolicy:
    """A fetched policy: the TXT `id` it was fetched for and its fields (RFC 8461 §3.2)."""

    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]
    max_age: int
    fetched_at: datetime
    expires_at: datetime

    def mx_matches(self, host: str) -> bool:
        """Whether MX `host` is allowed (RFC 8461 §4.1): an exact name, or "*.example.com"
        covering exactly one more label; case-insensitive, trailing dots ignored."""
        name = host.strip().rstrip(".").lower()
        for pattern in self.mx:
            pattern = pattern.rstrip(".").lower()
            if pattern.startswith("*."):
                suffix = pattern[1:]  # ".example.com"
                label = name[: -len(suffix)]
                if name.endswith(suffix) and label and "." not in label:
                    return True
            elif name == pattern:
                return True
        return False


def parse_sts_record(text: str) -> str:
    """The policy id from a TXT record "v=STSv1; id=...;" (RFC 8461 §3.1); ValueError if
    it is not a valid STSv1 record. Unknown fields are checked for syntax, then ignored."""
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields[0] != "v=STSv1":
        raise ValueError("does not start with v=STSv1")
    if fields[-1] == "" and len(fields) > 1:
        fields.pop()  # the optional final separator
    policy_id = None
    for item in fields[1:]:
        name, sep, value = item.partition("=")
        if not sep or not _EXT_NAME.fullmatch(name):
            raise ValueError(f"malformed field {item!r}")
        if name == "id":
            if not _STS_ID.fullmatch(value):
                raise ValueError(f"id {value!r} is not 1 to 32 letters or digits")
            policy_id = policy_id or value
        elif not _EXT_VALUE.fullmatch(value):
            raise ValueError(f"malformed value in {item!r}")
    if policy_id is None:
        raise ValueError("no id field")
    return policy_id


def parse_policy(text: str) -> dict[str, Any]:
    """Parse a policy body (RFC 8461 §3.2) into {"version", "mode", "mx" (list), "max_age"}.

    Lines end in LF or CRLF; blank lines are tolerated. Field names and values are
    case-sensitive (the ABNF's %s), unknown fields are ignored, and a repeated field other
    than mx keeps its first value. Raises ValueError saying what is wrong.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        line = line.removesuffix("\r").strip(" \t")
        if not line:
            continue
        name, sep, value = line.partition(":")
        name, value = name.strip(" \t"), value.strip(" \t")
        if not sep or not _EXT_NAME.fullmatch(name):
            raise ValueError(f"line {number}: not a 'name: value' field")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError(f"line {number}: control character in {name}")
        if name == "mx":
            pattern = value.lower().removesuffix(".")
            if not _MX_PATTERN.fullmatch(pattern):
                raise ValueError(f"line {number}: bad mx pattern {value!r}")
            mx.append(pattern)
        else:
            fields.setdefault(name, value)
    if fields.get("version") != "STSv1":
        raise ValueError(f"version must be STSv1, not {fields.get('version')!r}")
    mode = fields.get("mode")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    max_age = fields.get("max_age")
    if max_age is None or not re.fullmatch(r"[0-9]{1,10}", max_age):
        raise ValueError(f"max_age must be 1 to 10 digits, not {max_age!r}")
    if int(max_age) > MAX_AGE_LIMIT:
        raise ValueError(f"max_age {max_age} is over {MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise ValueError(f"mode {mode} needs at least one mx")
    return {"version": "STSv1", "mode": mode, "mx": mx, "max_age": int(max_age)}


def _normalize(domain: str) -> str | None:
    """The domain as an A-label name, lowercase, without trailing dot; None if impossible."""
    name = domain.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    return name if _DOMAIN.fullmatch(name) and len(name) <= 253 else None


class MtaStsResolver:
    """Policies for recipient domains (see the module docstring). `clock()` returns an aware
    datetime; `db` is the `Database` gateway; `resolver` any `DnsLookup`. `https_port`,
    `ca_file` (trusted besides the system's store) and `timeout` (seconds, for the whole fetch)
    are for the policy fetch; `max_body` bounds the policy size (RFC 8461 §3.3: 64 KiB)."""

    def __init__(self, db: Any, resolver: DnsLookup, *, clock: Callable[[], datetime],
                 https_port: int = 443, ca_file: str | None = None, timeout: float = 10,
                 max_body: int = 64 * 1024, memo_secs: float = 0.0) -> None:
        self._db = db
        self._memo_secs = memo_secs  # reuse an answer this long (INBOX_CACHE_SECS); 0 = never
        self._memo: dict[str, tuple[float, StsPolicy | None]] = {}
        self._resolver = resolver
        self._clock = clock
        self._port = https_port
        self._timeout = timeout
        self._max_body = max_body
        # RFC 8461 §3.3: the certificate must chain to a trusted root and be valid for
        # mta-sts.<domain> (RFC 6125); the default context checks both.
        self._ssl = ssl.create_default_context()  # the system store, plus ca_file if given
        if ca_file:
            self._ssl.load_verify_locations(cafile=ca_file)
        self._inflight: dict[str, asyncio.Task[StsPolicy | None]] = {}

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy for `domain`, or None. Raises `StorageUnavailable` only when the cache
        cannot be read and no live policy could be fetched (it might have held one)."""
        name = _normalize(domain)
        if name is None:
            return None
        memo = self._memo.get(name)
        if memo is not None and memo[0] > time.monotonic():
            return memo[1]
        task = self._inflight.get(name)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._policy(name))
            self._inflight[name] = task
            task.add_done_callback(lambda done: self._landed(name, done))
        # Shielded: one caller giving up does not cancel the lookup the others wait for.
        return await asyncio.shield(task)

    def _landed(self, name: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]
        if not task.cancelled() and task.exception() is None and self._memo_secs > 0:
            # Every delivery asks; the answer (TXT id and the DB cache) is reused briefly.
            if len(self._memo) > 10000:
                self._memo.clear()
            self._memo[name] = (time.monotonic() + self._memo_secs, task.result())

    async def _policy(self, domain: str) -> StsPolicy | None:
        now = self._clock()
        cache_error: InboxError | None = None
        try:
            cached = await self._load(domain)
        except InboxError as exc:
            cached, cache_error = None, exc
        # RFC 8461 §5.1: a cached policy is usable until its max_age has passed.
        fresh = cached if cached is not None and now < cached.expires_at else None
        live_id = await self._live_id(domain)
        if live_id is not None and fresh is not None and fresh.id == live_id:
            return fresh
        fetched = None
        if live_id is not None:
            try:
                fetched = await self._fetch(domain, live_id)
            except PolicyFetchError as exc:
                log.warning("MTA-STS policy for %s (id %s) not fetched: %s%s", domain, live_id,
                            exc.message, "; using the cached one" if fresh else "")
        if fetched is None:
            # RFC 8461 §3.3/§5.1: no live policy, so an unexpired cached one applies.
            if cache_error is not None:
                raise cache_error
            return fresh
        try:
            await self._store(domain, fetched)
        except InboxError as exc:  # still the live policy: use it this time
            log.warning("MTA-STS policy for %s not cached: %s", domain, exc.message)
        return fetched

    async def _live_id(self, domain: str) -> str | None:
        """The id in the one "v=STSv1" TXT record at _mta-sts.<domain> (RFC 8461 §3.1), or
        None: no such record, several, an invalid one, or the lookup failed."""
        try:
            records = await self._resolver.txt(f"_mta-sts.{domain}")
        except InboxError as exc:  # DnsNotFound, DnsTemporary
            log.debug("MTA-STS TXT for %s: %s", domain, exc.message)
            return None
        sts = [r for r in records if _STS_RECORD.match(r)]
        if len(sts) != 1:
            return None
        try:
            return parse_sts_record(sts[0])
        except ValueError as exc:
            log.info("MTA-STS TXT for %s is invalid: %s", domain, exc)
            return None

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._get(host)
        except TimeoutError:
            raise PolicyFetchError(f"{host}: no answer within {self._timeout} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise PolicyFetchError(f"{host}: {type(exc).__name__}: {exc}") from None
        try:
            fields = parse_policy(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise PolicyFetchError(f"{host}: invalid policy: {exc}") from None
        fetched_at = self._clock()
        return StsPolicy(
            id=policy_id, mode=fields["mode"], mx=tuple(fields["mx"]),
            max_age=fields["max_age"], fetched_at=fetched_at,
            expires_at=fetched_at + timedelta(seconds=fields["max_age"]),
        )

    async def _get(self, host: str) -> bytes:
        """GET the policy from `host` at an address our resolver gives; the body."""
        try:
            addresses = await self._resolver.ips(host)
        except InboxError as exc:
            raise PolicyFetchError(f"{host}: {exc.message}") from None
        failures = []
        for address in addresses:
            try:
                reader, writer = await asyncio.open_connection(
                    address, self._port, ssl=self._ssl, server_hostname=host, limit=MAX_HEAD
                )
            except OSError as exc:  # refused, unreachable, certificate rejected
                failures.append(f"{address}: {exc}")
                continue
            try:
                body = await self._exchange(host, reader, writer)
            except BaseException:
                writer.transport.abort()  # no polite TLS close with a failed or slow peer
                raise
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)
            return body
        raise PolicyFetchError(f"{host}: cannot connect: {'; '.join(failures)}")

    async def _exchange(self, host: str, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bytes:
        authority = host if self._port == 443 else f"{host}:{self._port}"
        writer.write(
            f"GET {POLICY_PATH} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n"
            "Accept: text/plain\r\nUser-Agent: inbox-mta-sts\r\n\r\n".encode("ascii")
        )
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        # RFC 8461 §3.3: only 200 counts; 3xx redirects MUST NOT be followed.
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
            raise PolicyFetchError(f"{host}: answered {head[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        # RFC 8461 §3.3: the Content-Type must be text/plain (parameters allowed).
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "text/plain":
            raise PolicyFetchError(f"{host}: Content-Type {media or 'missing'}, not text/plain")
        too_big = PolicyFetchError(f"{host}: policy over {self._max_body} bytes")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._read_chunked(reader, too_big)
        if "content-length" in headers:  # RFC 9112 §6.3: ignored when chunked
            length = headers["content-length"]
            if not length.isdigit():
                raise PolicyFetchError(f"{host}: bad Content-Length {length[:20]!r}")
            if int(length) > self._max_body:
                raise too_big
            return await reader.readexactly(int(length))
        body = await reader.read(self._max_body + 1)  # no length: the body ends at the close
        while len(body) <= self._max_body:
            more = await reader.read(self._max_body + 1 - len(body))
            if not more:
                return body
            body += more
        raise too_big

    async def _read_chunked(self, reader: asyncio.StreamReader, too_big: Exception) -> bytes:
        """RFC 9112 §7.1: hex size [;ext] CRLF, data CRLF, ..., a zero size ends it."""
        body = b""
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,8}", size_text):
                raise PolicyFetchError(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            if size == 0:
                return body  # trailers, if any, are not needed
            if len(body) + size > self._max_body:
                raise too_big
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise PolicyFetchError("chunk not followed by CRLF")

    async def _load(self, domain: str) -> StsPolicy | None:
        row = await self._db.one(
            "SELECT * FROM type::thing('mta_sts_policy', $domain)", {"domain": domain}
        )
        if not row:
            return None
        row = row[0]
        try:
            return StsPolicy(
                id=row["policy_id"], mode=row["mode"], mx=tuple(row["mx"]),
                max_age=row["max_age"], fetched_at=row["fetched_at"],
                expires_at=row["expires_at"],
            )
        except (KeyError, TypeError):  # a row this code did not write: as if none
            log.warning("MTA-STS cache row for %s is malformed; ignored", domain)
            return None

    async def _store(self, domain: str, policy: StsPolicy) -> None:
        await self._db.run(
            "UPSERT type::thing('mta_sts_policy', $domain) CONTENT {domain: $domain,"
            " policy_id: $id, mode: $mode, mx: $mx, max_age: $max_age,"
            " fetched_at: $fetched_at, expires_at: $expires_at} RETURN NONE",
            {"domain": domain, "id": policy.id, "mode": policy.mode, "mx": list(policy.mx),
             "max_age": policy.max_age, "fetched_at": policy.fetched_at,
             "expires_at": policy.expires_at},
        )

    async def prune(self) -> int:
        """Delete cached policies past their max_age (they are never used); how many."""
        gone = await self._db.one(
            "DELETE mta_sts_policy WHERE expires_at <= $now RETURN BEFORE", {"now": self._clock()}
        )
        return len(gone or [])


__all__ = ["MtaStsResolver", "PolicyFetchError", "StsPolicy", "parse_policy", "parse_sts_record"]
