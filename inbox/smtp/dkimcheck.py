"""Inbound DKIM (RFC 6376, RFC 8463) and ARC (RFC 8617) verification. Does not sign, decide policy
or write headers (dmarc.py and authresults.py do).

dkimpy does the tag parsing and canonicalisation; the public-key step is dkimverify.py's (RSA by
`cryptography`, key records parsed once and cached by content). That work is blocking and
CPU-bound, and dkimpy's own DNS lookups are blocking too. So every key record is fetched first,
concurrently, through our async resolver; then verification runs in one call (in a thread for
messages over VERIFY_INLINE_BYTES) with a `dnsfunc` that only answers from those prefetched records
and never touches the network.

Result names are those of RFC 8601 §2.7.1. How they are chosen:

* pass: the signature verified. A signature with `l=` (body length) that verified is reported
  as "policy" instead: content can be appended below the signed part (RFC 6376 §8.2).
* fail: the body hash or the signature did not match.
* neutral: the DKIM-Signature field has syntax errors (unparseable tag list, missing or malformed
  tags), RFC 8601 §2.7.1 "neutral".
* permerror: no key record (NXDOMAIN/NODATA, RFC 6376 §6.1.2 step 3), a revoked or unusable key,
  a key smaller than 1024 bits (RFC 8301 §3.2), rsa-sha1 (RFC 8301 §3.1), From not signed
  (RFC 6376 §6.1.1), an expired signature or a bad i= (RFC 6376 §6.1.1).
* temperror: the key lookup failed temporarily (RFC 6376 §6.1.2 step 2).

At most `MAX_SIGNATURES` (10) DKIM-Signature fields are evaluated, the topmost first; the rest
are ignored (RFC 6376 §6.1 lets verifiers limit the work they do; a flood of signatures would
otherwise cost one DNS query and one public-key operation each).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from inbox import dkimcanon
from inbox.errors import DnsNotFound, DnsTemporary
from inbox.smtp.dkimverify import FastARC, FastDKIM, parse_key_record

MAX_SIGNATURES = 10
# RFC 8617 §4.2.1: i= is 1..50; a longer chain is invalid (and each instance costs two lookups).
MAX_ARC_INSTANCES = 50
HEADER_B_MIN = 8  # RFC 6008 §4: header.b carries at least the first 8 characters of b=
# Up to this size verification runs on the event loop: it is GIL-bound either way, and for a
# small message the hop to a thread (and the GIL hand-offs) cost more than the work.
VERIFY_INLINE_BYTES = 64 * 1024

# dkimpy logs every failed check at ERROR; those are results, not faults of ours.
_quiet = logging.getLogger("inbox.smtp.dkimcheck.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class DkimResult:
    """The outcome for one DKIM-Signature header field (RFC 8601 §2.7.1 names)."""

    result: str  # pass|fail|neutral|policy|temperror|permerror
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a= (rsa-sha256, ed25519-sha256)
    reason: str = ""
    header_b: str = ""  # leading characters of b= (RFC 6008), unique among the signatures


@dataclass(frozen=True)
class ArcResult:
    """The ARC chain validation status (RFC 8617 §5.2 "cv") and the number of ARC sets."""

    result: str  # none|pass|fail
    instances: int
    reason: str = ""


# -- parsing (cheap: header section only) ---------------------------------------------------


def _header_section(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Header fields (name, raw value) as dkimpy parses them, without touching the body."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(sep)
        if end >= 0:
            raw = raw[: end + len(sep)]
            break
    try:
        headers, _ = dkimcanon.parse(raw)  # dkimpy's result, by one pattern per field
    except dkim.MessageFormatError:
        return []
    return [(name, value) for name, value in headers]


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", errors="replace").strip()


def _key_name(tags: dict[bytes, bytes]) -> str | None:
    """`<s>._domainkey.<d>.` (RFC 6376 §3.6.2.1), or None if s= or d= are unusable."""
    selector, domain = _text(tags.get(b"s")).lower(), _text(tags.get(b"d")).lower()
    name = f"{selector}._domainkey.{domain}".rstrip(".")
    if not selector or not domain or len(name) > 253 or not re.fullmatch(r"[a-z0-9._-]+", name):
        return None
    return name + "."


def _unique_prefixes(values: list[str]) -> list[str]:
    """For each b= value, its shortest prefix of at least 8 characters that no other differing
    value shares (RFC 6008 §4 lets header.b be truncated as long as it stays distinct)."""
    out = []
    for value in values:
        length = HEADER_B_MIN
        while length < len(value) and any(
            other != value and other[:length] == value[:length] for other in values
        ):
            length += 1
        out.append(value[:length])
    return out


# -- key prefetch -------------------------------------------------------------------------


async def _fetch_keys(names: Iterable[str], resolver: Any) -> dict[str, str | Exception]:
    """TXT record per key name, all at once. Values: the record text (the first that looks like
    a DKIM key when there are several, RFC 6376 §3.6.2.2), or the DnsNotFound/DnsTemporary."""
    unique = sorted(set(names))

    async def one(name: str) -> str | Exception:
        try:
            records = await resolver.txt(name)
        except (DnsNotFound, DnsTemporary) as exc:
            return exc
        if not records:
            return DnsNotFound(f"{name} TXT: no records")
        keyish = [r for r in records if r.lstrip().startswith("v=DKIM1") or "p=" in r]
        return (keyish or list(records))[0]

    answers = await asyncio.gather(*(one(name) for name in unique))
    return dict(zip(unique, answers, strict=True))


def _dnsfunc(keys: dict[str, str | Exception]) -> Any:
    """dkimpy's `dnsfunc(name, timeout=...)`, answering only from prefetched records."""

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        key = (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower()
        found = keys.get(key)
        return found.encode("utf-8") if isinstance(found, str) else None

    return lookup


# -- DKIM ---------------------------------------------------------------------------------


@dataclass
class _Sig:
    index: int
    tags: dict[bytes, bytes] | None
    syntax_error: str
    key_name: str | None


def _parse_signatures(headers: list[tuple[bytes, bytes]]) -> list[_Sig]:
    values = [v for name, v in headers if name.lower() == b"dkim-signature"][:MAX_SIGNATURES]
    sigs = []
    for index, value in enumerate(values):
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList as exc:
            sigs.append(_Sig(index, None, f"bad tag list: {exc}", None))
            continue
        sigs.append(_Sig(index, tags, "", _key_name(tags)))
    return sigs


_Keys = dict[str, str | Exception]
# ValidationError texts of dkimpy for well-formed but unacceptable signatures (RFC 6376 §6.1.1).
_UNACCEPTABLE = ("past", "future", "less than", "i= domain", "unknown signature")


def _verify_one(verifier: FastDKIM, sig: _Sig, keys: _Keys) -> tuple[str, str]:
    """(result, reason) for one signature. Runs in a worker thread."""
    tags = sig.tags
    if tags is None:
        return "neutral", sig.syntax_error
    try:
        dkim.validate_signature_fields(dict(tags))
    except dkim.ValidationError as exc:
        text = str(exc)
        if any(word in text for word in _UNACCEPTABLE):
            return "permerror", text
        return "neutral", text
    if sig.key_name is None:
        return "neutral", "unusable s= or d="
    if tags.get(b"a") == b"rsa-sha1":
        return "permerror", "rsa-sha1 is not acceptable (RFC 8301 §3.1)"
    signed = [h.strip().lower() for h in tags.get(b"h", b"").split(b":")]
    if b"from" not in signed:
        return "permerror", "From is not signed (RFC 6376 §6.1.1)"
    record = keys.get(sig.key_name)
    if isinstance(record, DnsTemporary):
        return "temperror", f"key lookup failed: {record.message}"
    if not isinstance(record, str):
        return "permerror", f"no key record at {sig.key_name.rstrip('.')}"
    try:
        _, keysize, ktag, _ = parse_key_record(sig.key_name.encode(), record.encode("utf-8"))
    except (dkim.KeyFormatError, ValueError) as exc:  # binascii.Error is a ValueError
        return "permerror", f"unusable key: {exc}"
    if ktag is None or keysize is None:  # RFC 6376 §3.6.1: s= lists only other services
        return "permerror", "key record is not for email (s= service type)"
    algorithm = tags.get(b"a", b"")
    if not algorithm.startswith(ktag + b"-"):
        return "permerror", f"key type {ktag.decode()} does not match a={algorithm.decode()}"
    if ktag == b"rsa" and keysize < 1024:  # RFC 8301 §3.2
        return "permerror", f"RSA key of {keysize} bits is too small"
    try:
        ok = verifier.verify(idx=sig.index, dnsfunc=_dnsfunc(keys))
    except dkim.ValidationError as exc:
        text = str(exc)
        return ("fail", "body hash did not verify") if "body hash" in text else ("permerror", text)
    except (dkim.DKIMException, ValueError, LookupError, TypeError) as exc:
        # dkimpy on hostile input can raise more than its own errors; none of them is a pass.
        return "permerror", str(exc) or type(exc).__name__
    if not ok:
        return "fail", "signature did not verify"
    if b"l" in tags:
        return "policy", "l= signs only part of the body (RFC 6376 §8.2)"
    return "pass", ""


def _verify_all(raw: bytes, sigs: list[_Sig], keys: _Keys) -> list[tuple[str, str]]:
    try:
        verifier = FastDKIM(raw, logger=_quiet, minkey=1024)
    except dkim.DKIMException as exc:
        return [("permerror", f"message cannot be parsed: {exc}")] * len(sigs)
    return [_verify_one(verifier, sig, keys) for sig in sigs]


async def verify_dkim(raw: bytes, resolver: Any) -> list[DkimResult]:
    """One `DkimResult` per DKIM-Signature field (top first, at most MAX_SIGNATURES); empty
    when the message is not signed (the caller reports "dkim=none").

    `resolver` is an `inbox.resolver.DnsLookup` (only `txt` is used)."""
    sigs = _parse_signatures(_header_section(raw))
    if not sigs:
        return []
    keys = await _fetch_keys((s.key_name for s in sigs if s.key_name), resolver)
    outcomes = (await asyncio.to_thread(_verify_all, raw, sigs, keys)
                if len(raw) > VERIFY_INLINE_BYTES else _verify_all(raw, sigs, keys))
    b_values = [re.sub(r"\s+", "", _text((s.tags or {}).get(b"b"))) for s in sigs]
    prefixes = _unique_prefixes(b_values)
    return [
        DkimResult(
            result=result,
            domain=_text((sig.tags or {}).get(b"d")).lower(),
            selector=_text((sig.tags or {}).get(b"s")),
            algorithm=_text((sig.tags or {}).get(b"a")).lower(),
            reason=reason,
            header_b=prefix,
        )
        for sig, (result, reason), prefix in zip(sigs, outcomes, prefixes, strict=True)
    ]


# -- ARC ----------------------------------------------------------------------------------

_ARC_SIGNED = (b"arc-seal", b"arc-message-signature")
_ARC_ALL = (*_ARC_SIGNED, b"arc-authentication-results")
_AAR_INSTANCE = re.compile(rb"\s*i\s*=\s*(\d{1,5})\s*;")


def _arc_key_names(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[str], str]:
    """(highest i=, key names of every AS/AMS, problem) from the ARC header fields."""
    highest, names = 0, list[str]()
    for name, value in headers:
        lname = name.lower()
        if lname not in _ARC_ALL:
            continue
        label = name.decode("ascii", "replace")
        tags: dict[bytes, bytes] = {}
        try:
            if lname in _ARC_SIGNED:
                tags = parse_tag_value(value)
                instance = int(_text(tags.get(b"i")))
            else:  # ARC-Authentication-Results: "i=N; <authserv-id>; ..." (RFC 8617 §4.1.1)
                found = _AAR_INSTANCE.match(value)
                instance = int(found.group(1)) if found else 0
        except (InvalidTagValueList, ValueError):
            return highest, names, f"unparseable {label} field"
        if not 1 <= instance <= MAX_ARC_INSTANCES:
            return highest, names, f"i={instance} is outside 1..{MAX_ARC_INSTANCES}"
        highest = max(highest, instance)
        if lname in _ARC_SIGNED:
            key = _key_name(tags)
            if key is None:
                return highest, names, f"unusable s= or d= in {label}"
            names.append(key)
    return highest, names, ""


def _arc_verify(raw: bytes, keys: dict[str, str | Exception]) -> tuple[str, str]:
    try:
        cv, _, reason = FastARC(raw, logger=_quiet, minkey=1024).verify(dnsfunc=_dnsfunc(keys))
    except (dkim.DKIMException, ValueError, LookupError, TypeError) as exc:
        return "fail", str(exc) or type(exc).__name__
    if cv == dkim.CV_Pass:
        return "pass", ""
    if cv == dkim.CV_None:
        return "none", _text(reason.encode() if isinstance(reason, str) else reason)
    # None: an earlier sealer already said cv=fail, so the chain ended there (RFC 8617 §5.2).
    return "fail", reason if isinstance(reason, str) else _text(reason)


async def verify_arc(raw: bytes, resolver: Any) -> ArcResult:
    """Validate the ARC chain (RFC 8617 §5.2). "none" without ARC header fields.

    A temporary DNS failure for any ARC key makes the chain "fail" with a reason saying so:
    RFC 8617 has no temperror cv, and an unvalidated chain must not count as a pass."""
    highest, names, problem = _arc_key_names(_header_section(raw))
    if problem:
        return ArcResult("fail", highest, problem)
    if highest == 0:
        return ArcResult("none", 0)
    keys = await _fetch_keys(names, resolver)
    for name, value in sorted(keys.items()):
        if isinstance(value, DnsTemporary):
            return ArcResult("fail", highest, f"temperror: key lookup failed for {name}")
    result, reason = (await asyncio.to_thread(_arc_verify, raw, keys)
                      if len(raw) > VERIFY_INLINE_BYTES else _arc_verify(raw, keys))
    return ArcResult(result, highest, reason)
