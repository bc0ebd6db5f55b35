"""The Authentication-Results header field (RFC 8601): writing ours, removing forged copies of
ours from inbound mail, prepending ours. Does not evaluate SPF, DKIM, DMARC or ARC.

Every value that came from the network (HELO name, MAIL FROM, d=, s=, b=, reasons) is reduced to
printable ASCII and written as a token when RFC 8601's grammar allows it, else as a quoted-string,
so a sender cannot inject header fields or extra results through them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Protocol

from inbox.smtp.dkimcheck import ArcResult, DkimResult
from inbox.smtp.dmarc import DmarcResult

HEADER = "Authentication-Results"
MAX_COLUMNS = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
MAX_REASON = 60
_INDENT, _CONTINUE = "  ", "    "
# RFC 2045 §5.1 token: printable ASCII except SPACE and tspecials.
_TOKEN = re.compile(r"^[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+$")
# RFC 5322 dot-atom, for the local-part of an address pvalue (RFC 8601 §2.2).
_DOT_ATOM = re.compile(r"^[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+(\.[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+)*$")
_DOMAIN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                     r"[A-Za-z0-9])?)*\.?$")


class SpfOutcome(Protocol):
    """What is needed of an SPF result: `result` (RFC 7208 §2.6 name). Read-only, so frozen
    dataclasses fit."""

    @property
    def result(self) -> str: ...


def _printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


def _quoted(text: str) -> str:
    """RFC 5322 §3.2.4 quoted-string."""
    return '"' + _printable(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(text: str) -> str:
    """RFC 2045 value: a token if possible, else a quoted-string."""
    text = _printable(text)
    return text if _TOKEN.match(text) else _quoted(text)


def _address(text: str) -> str:
    """RFC 8601 §2.2 pvalue for an address: [local-part "@"] domain-name, else quoted."""
    text = _printable(text)
    local, at, domain = text.rpartition("@")
    if at and _DOMAIN.match(domain) and (not local or _DOT_ATOM.match(local)):
        return text
    if not at and _DOMAIN.match(text):
        return text
    return _quoted(text)


def _result(name: str, allowed: tuple[str, ...]) -> str:
    """A method result from a fixed set (RFC 8601 §2.7); anything else is "permerror"."""
    name = str(name).lower()
    return name if name in allowed else "permerror"


def _reason(text: str) -> list[str]:
    if not text:
        return []
    text = _printable(text)
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return ["reason=" + _quoted(text)]


_SPF = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
_DKIM = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
_DMARC = ("none", "pass", "fail", "temperror", "permerror")
_ARC = ("none", "pass", "fail")


def _spf(spf: SpfOutcome, helo: str, mail_from: str, client_ip: str) -> list[str]:
    words = ["spf=" + _result(spf.result, _SPF)]
    try:
        words.append(f"(client-ip={ipaddress.ip_address(client_ip.strip('[]'))})")
    except ValueError:
        pass
    # RFC 7208 §2.4/§9.1: with a null reverse-path SPF checked the HELO identity
    # (inbox.smtp.spf.SpfResult says which in `identity`).
    if mail_from and getattr(spf, "identity", "mailfrom") != "helo":
        words.append("smtp.mailfrom=" + _address(mail_from))
    elif helo:
        words.append("smtp.helo=" + _value(helo))
    return words


def _dkim(result: DkimResult) -> list[str]:
    words = ["dkim=" + _result(result.result, _DKIM)]
    if result.result != "pass":
        words += _reason(result.reason)
    if result.domain:
        words.append("header.d=" + _value(result.domain))
    if result.selector:  # RFC 8601 §2.7.1 header.s, header.a
        words.append("header.s=" + _value(result.selector))
    if result.algorithm:
        words.append("header.a=" + _value(result.algorithm))
    if result.header_b:  # RFC 6008
        words.append("header.b=" + _value(result.header_b))
    return words


def _dmarc(result: DmarcResult) -> list[str]:
    words = ["dmarc=" + _result(result.result, _DMARC)]
    if result.result in ("pass", "fail", "temperror"):
        words.append(f"(p={_result(result.policy, ('none', 'quarantine', 'reject'))}"
                     f" dis={_result(result.disposition, ('none', 'quarantine', 'reject'))})")
    if result.result not in ("pass", "fail"):
        words += _reason(result.reason)
    if result.from_domain:  # RFC 7489 §11.2
        words.append("header.from=" + _value(result.from_domain))
    return words


def _arc(result: ArcResult) -> list[str]:
    words = ["arc=" + _result(result.result, _ARC)]
    if result.instances:
        words.append(f"(i={int(result.instances)})")
    if result.result == "fail":
        words += _reason(result.reason)
    return words


def _fold(first: str, resinfos: list[list[str]]) -> str:
    """One resinfo per line, words wrapped at MAX_COLUMNS; a word too long for any line
    stands alone on its own (RFC 5322 §2.2.3 folds only at whitespace)."""
    lines = [first]
    for index, words in enumerate(resinfos):
        words = list(words)
        if index < len(resinfos) - 1:
            words[-1] += ";"
        line = _INDENT + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) <= MAX_COLUMNS:
                line += " " + word
            else:
                lines.append(line)
                line = _CONTINUE + word
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def build_authentication_results(authserv_id: str, *, spf: SpfOutcome, dkim: list[DkimResult],
                                 dmarc: DmarcResult, arc: ArcResult, helo: str,
                                 mail_from: str, client_ip: str) -> str:
    """The whole header field, folded, CRLF-terminated. `spf` needs a `.result`; an empty
    `dkim` list is reported as dkim=none. Results appear as spf, dkim..., dmarc, arc."""
    resinfos = [_spf(spf, helo, mail_from, client_ip)]
    resinfos += [_dkim(r) for r in dkim] or [["dkim=none"]]
    resinfos += [_dmarc(dmarc), _arc(arc)]
    return _fold(f"{HEADER}: {_value(authserv_id)};", resinfos)


# -- stripping ------------------------------------------------------------------------------


def _skip_cfws(text: str, pos: int) -> int:
    """Past whitespace and (nested) comments (RFC 5322 §3.2.2)."""
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if depth and ch == "\\":
            pos += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth and ch not in " \t\r\n":
            break
        pos += 1
    return pos


def authserv_id_of(value: bytes) -> str:
    """The authserv-id of an Authentication-Results field value (RFC 8601 §2.2), lowercased,
    without a trailing dot; "" if there is none."""
    text = value.decode("latin-1")
    pos = _skip_cfws(text, 0)
    if text[pos : pos + 1] == '"':
        out, pos = [], pos + 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\" and pos + 1 < len(text):
                pos += 1
            if text[pos] not in "\r\n":
                out.append(text[pos])
            pos += 1
        ident = "".join(out)
    else:
        end = pos
        while end < len(text) and text[end] not in ' \t\r\n;()"':
            end += 1
        ident = text[pos:end]
    return ident.strip().rstrip(".").lower()


def _lines(raw: bytes) -> list[bytes]:
    """Lines with their endings (LF or CRLF); a lone CR stays inside its line."""
    parts = raw.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def strip_forged_results(raw: bytes, authserv_id: str) -> bytes:
    """`raw` without the Authentication-Results fields that carry our `authserv_id` (RFC 8601
    §5: a forged claim of our own verdicts). Everything else, including other ADMDs' results and
    the whole body, is kept byte for byte. Works on CRLF and LF-only input and on a message that
    is only a header section."""
    ours = authserv_id.strip().rstrip(".").lower()
    lines = _lines(raw)
    out: list[bytes] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line in (b"\r\n", b"\n"):  # end of the header section: the rest is the body
            out.extend(lines[index:])
            break
        field = [line]
        index += 1
        while index < len(lines) and lines[index][:1] in (b" ", b"\t"):
            field.append(lines[index])
            index += 1
        name, colon, first = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() == b"authentication-results" and (
            authserv_id_of(first + b"".join(field[1:])) == ours
        ):
            continue
        out.extend(field)
    return b"".join(out)


def prepend_authentication_results(raw: bytes, header: str) -> bytes:
    """`header` (from `build_authentication_results`) put on top of `raw`, with the line
    endings `raw` uses (CRLF unless its first line ends in a bare LF)."""
    data = header.encode("ascii")
    first = raw.find(b"\n")
    if first >= 0 and raw[first - 1 : first] != b"\r":
        data = data.replace(b"\r\n", b"\n")
    return data + raw


def stamp_authentication_results(raw: bytes, authserv_id: str, header: str) -> bytes:
    """Strip forged copies of ours, then prepend ours: what an inbound MTA does."""
    return prepend_authentication_results(strip_forged_results(raw, authserv_id), header)
