"""Mail addresses in submitted messages: parsing one mailbox (`Name <local@domain>`, RFC 5322
§3.4 with RFC 6532 UTF-8 and IDNA domains) into an `Address`, and the text checks every header
value gets. Does no I/O.
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import idna

from inbox.errors import HeaderInjection, InvalidAddress, ValidationError

ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_ATEXT_CLASS = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ASCII_DOT_ATOM = re.compile(rf"{_ATEXT_CLASS}(?:\.{_ATEXT_CLASS})*")
_SPECIALS = frozenset('()<>[]:;@\\,."')
# Line breaks for anyone (str.splitlines treats \v \f \x1c-\x1e \x85 U+2028/9 as breaks too).
_BREAKS = re.compile(r"[\r\n\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
SURROGATES = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Address:
    display_name: str
    local: str  # as written in an addr-spec: a dot-atom, or a quoted-string when it must be
    domain: str  # lowercase U-label form (bücher.example)
    ascii_domain: str  # A-label form (xn--bcher-kva.example): for DNS, SMTP and headers

    @property
    def addr_spec(self) -> str:
        return f"{self.local}@{self.ascii_domain}"

    @property
    def smtputf8(self) -> bool:
        """A UTF-8 local part can only travel with SMTPUTF8 (RFC 6531)."""
        return not self.local.isascii()

    @property
    def formatted(self) -> str:
        """For display and storage (Unicode, not encoded): `Name <addr-spec>`."""
        if not self.display_name:
            return self.addr_spec
        return f"{quote_phrase(self.display_name)} <{self.addr_spec}>"


def quote_phrase(name: str) -> str:
    """A display name as an RFC 5322 §3.2.5 phrase: as is if atext and spaces, else quoted."""
    if all(c in ATEXT or c == " " for c in name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_text(value: str, path: list[str], what: str) -> str:
    """`value` if it is text without line breaks, controls or lone surrogates; typed errors
    (HeaderInjection for breaks and controls) name `path`."""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be text", field=path)
    if _BREAKS.search(value):
        raise HeaderInjection(f"{what} contains a line break or NUL", field=path)
    if CONTROLS.search(value):
        raise HeaderInjection(f"{what} contains a control character", field=path)
    if SURROGATES.search(value):
        raise ValidationError(f"{what} is not valid Unicode", field=path)
    return value


def _utf8_char_ok(ch: str) -> bool:  # RFC 6532 §3.2 UTF8-non-ascii, minus spaces and controls
    return unicodedata.category(ch) not in ("Cc", "Cs", "Zs", "Zl", "Zp")


def _read_quoted(s: str, i: int, path: list[str]) -> tuple[int, str]:
    """s[i] is '"': (index after the closing quote, unescaped content). RFC 5322 §3.2.4."""
    out, j = [], i + 1
    while j < len(s):
        ch = s[j]
        if ch == "\\" and j + 1 < len(s):
            out.append(s[j + 1])
            j += 2
        elif ch == '"':
            return j + 1, "".join(out)
        else:
            out.append(ch)
            j += 1
    raise InvalidAddress("unterminated quoted string", field=path)


def _unexpected(ch: str, path: list[str]) -> InvalidAddress:
    if ch in ",;":
        return InvalidAddress("only one address is allowed here", field=path)
    if ch in " \t":
        return InvalidAddress("an address cannot contain spaces", field=path)
    return InvalidAddress(f"unexpected {ch!r} in the address", field=path)


def _split_display(s: str, path: list[str]) -> tuple[str, str]:
    """`Name <addr-spec>` or a bare addr-spec -> (display name, addr-spec)."""
    if not s.endswith(">") or "<" not in s:
        if "<" in s or ">" in s:
            raise InvalidAddress("angle brackets do not match", field=path)
        return "", s
    words, i = [], 0
    while i < len(s) and s[i] != "<":
        if s[i] in " \t":
            i += 1
        elif s[i] == '"':
            i, word = _read_quoted(s, i, path)
            words.append(word)
        else:
            j = i
            while j < len(s) and s[j] not in ' \t"<' and (s[j] == "." or s[j] not in _SPECIALS):
                j += 1
            if j == i:
                raise _unexpected(s[i], path)
            words.append(s[i:j])
            i = j
    if i == len(s):
        raise InvalidAddress("angle brackets do not match", field=path)
    return " ".join(" ".join(words).split()), s[i + 1:-1]


def _dot_atom_ok(text: str) -> bool:  # RFC 5322 §3.2.3, with RFC 6532 UTF-8
    if _ASCII_DOT_ATOM.fullmatch(text):  # the common case, without a loop per character
        return True
    return all(part and all(c in ATEXT or (ord(c) > 127 and _utf8_char_ok(c)) for c in part)
               for part in text.split("."))


def _local_part(spec: str, path: list[str]) -> tuple[str, str]:
    """(local part as written in an addr-spec, rest after the @)."""
    if spec.startswith('"'):
        end, content = _read_quoted(spec, 0, path)
        if not spec[end:].startswith("@"):
            raise InvalidAddress("expected @ after the quoted local part", field=path)
        if not content or not all(c == " " or c.isprintable() for c in content):
            raise InvalidAddress("invalid quoted local part", field=path)
        if _dot_atom_ok(content):
            return content, spec[end + 1:]
        return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"', spec[end + 1:]
    if "@" not in spec:
        raise InvalidAddress("an address needs an @", field=path)
    local, _, domain = spec.rpartition("@")
    if not local:
        raise InvalidAddress("the part before @ is empty", field=path)
    if not _dot_atom_ok(local):
        bad = next((c for c in local if c not in ATEXT and c != "." and not (
            ord(c) > 127 and _utf8_char_ok(c))), None)
        if bad is not None:
            raise _unexpected(bad, path)
        raise InvalidAddress("dots in the local part must separate non-empty words", field=path)
    return local, domain


def _domain(raw: str, path: list[str]) -> tuple[str, str]:
    """(U-label form, A-label form) of a mail domain. RFC 5321 §2.3.5, RFC 5890."""
    if not raw:
        raise InvalidAddress("the domain after @ is empty", field=path)
    if raw.startswith("["):
        raise InvalidAddress("address literals ([...]) are not accepted", field=path)
    if bad := next((c for c in raw if c in " \t,;<>()[]\\\"@:"), None):
        raise _unexpected(bad, path)
    try:
        return _idna_pair(raw)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise InvalidAddress(f"{raw!r} is not a valid domain name ({exc})", field=path) from None


# RFC 5890 §2.3.1 LDH labels; "--" in positions 3-4 is reserved (RFC 5891 §4.2.3.1), so such
# labels (A-labels among them) take the full IDNA path.
_LDH_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@functools.lru_cache(maxsize=4096)
def _idna_pair(raw: str) -> tuple[str, str]:
    """(U-label form, A-label form); IDNA is costly and the same domains recur, so plain
    LDH names skip it and results are cached."""
    lowered = raw.lower()
    labels = lowered.split(".")
    if raw.isascii() and len(lowered) <= 253 and all(
            _LDH_LABEL.match(label) and label[2:4] != "--" for label in labels):
        return lowered, lowered
    ascii_name = idna.encode(raw, uts46=True, std3_rules=True).decode("ascii")
    labels = ascii_name.split(".")
    if any(not label or len(label) > 63 for label in labels) or len(ascii_name) > 253:
        raise idna.IDNAError("empty label or name too long")
    return idna.decode(ascii_name), ascii_name


def parse_address(text: str, field: str | Sequence[str]) -> Address:
    """One mailbox, `Name <local@domain>` or `local@domain`; errors name `field`."""
    path = [field] if isinstance(field, str) else list(field)
    check_text(text, path, "address")
    s = text.strip(" \t")
    if not s:
        raise InvalidAddress("address is empty", field=path)
    if re.search(r"[,;]", re.sub(r'"(?:[^"\\]|\\.)*"', "", s)):
        raise InvalidAddress("only one address is allowed here", field=path)
    display, spec = _split_display(s, path)
    if "<" in spec or ">" in spec:
        raise InvalidAddress("only one address is allowed here", field=path)
    local, raw_domain = _local_part(spec, path)
    domain, ascii_domain = _domain(raw_domain, path)
    if len(local.encode()) > 64:  # RFC 5321 §4.5.3.1.1
        raise InvalidAddress("the part before @ is longer than 64 octets", field=path)
    if len(local.encode()) + 1 + len(ascii_domain) > 254:  # RFC 5321 §4.5.3.1.3, minus <>
        raise InvalidAddress("address is longer than 254 octets", field=path)
    return Address(display, local, domain, ascii_domain)
