"""SPF macros (RFC 7208 §7): parsing macro-strings into tokens and expanding them for one
check_host() run; also the domain-name checks macro targets need. Looks nothing up itself
(%{p} asks the caller for the validated PTR names).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from inbox.errors import InboxError

MAX_DOMAIN = 253  # RFC 7208 §7.3 (the longest name in text form)

# RFC 7208 §7.1 ABNF pieces.
_TOPLABEL = r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN_END = re.compile(rf".*\.{_TOPLABEL}\.?", re.S)
_TOPLABEL_RE = re.compile(_TOPLABEL)
_TOKEN = re.compile(
    r"%\{(?P<letter>[A-Za-z])(?P<digits>[0-9]*)(?P<rev>[rR]?)(?P<delims>[.+,/_=-]*)\}"
    r"|%(?P<esc>[%_-])|(?P<lit>[^%]+)|%",
    re.S,
)
DOMAIN_LETTERS = "slodiphv"
EXP_LETTERS = DOMAIN_LETTERS + "crt"  # RFC 7208 §7.3: c, r, t only in explanation text
_LITERAL = re.compile(r"[!-$&-~]*")  # macro-literal = %x21-24 / %x26-7E
_EXP_LITERAL = re.compile(r"[ !-$&-~]*")  # explanation-string also allows SP (§6.2)
LABEL = re.compile(r"[ -\[\]-~]{1,63}")  # printable ASCII or SP; no "\\" (DNS escape)


class Abort(InboxError):
    """Ends the evaluation with `result` (permerror/temperror). Never leaves inbox.smtp.spf."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def perm(message: str) -> Abort:
    """A permerror ending the evaluation."""
    return Abort("permerror", message)


@dataclass(frozen=True)
class Macro:
    letter: str  # lowercase
    digits: int  # 0: all parts
    reverse: bool
    delims: str
    escape: bool  # an uppercase letter: URL-escape the value (RFC 7208 §7.3)


Tokens = list[str | Macro]


def macro_string(text: str, letters: str, *, domain_spec: bool, exp: bool = False) -> Tokens:
    """Parse a macro-string (RFC 7208 §7.1); with `domain_spec`, it must also end like a
    domain-spec: "." toplabel ["."] or a macro-expand. Raises `Abort` (permerror)."""
    if domain_spec and not text:
        raise perm("empty domain-spec")
    tokens: Tokens = []
    ends_with_macro = False
    literal = _EXP_LITERAL if exp else _LITERAL
    for match in _TOKEN.finditer(text):
        if match["lit"] is not None:
            if not literal.fullmatch(match["lit"]):
                raise perm(f"invalid character in {text!r}")
            tokens.append(match["lit"])
            ends_with_macro = False
        elif match["esc"] is not None:  # %% %_ %- (RFC 7208 §7.1)
            tokens.append({"%": "%", "_": " ", "-": "%20"}[match["esc"]])
            ends_with_macro = True
        elif match["letter"] is not None:
            letter = match["letter"]
            if letter.lower() not in letters:
                raise perm(f"macro letter {letter!r} not allowed in {text!r}")
            digits = int(match["digits"] or 0)
            if match["digits"] and digits == 0:  # RFC 7208 §7.3: "MUST be nonzero"
                raise perm(f"zero transformer in {text!r}")
            tokens.append(
                Macro(
                    letter.lower(), digits, bool(match["rev"]), match["delims"], letter.isupper()
                )
            )
            ends_with_macro = True
        else:
            raise perm(f"'%' not followed by '{{', '%', '_' or '-' in {text!r}")
    if domain_spec and not ends_with_macro and not _DOMAIN_END.fullmatch(str(tokens[-1])):
        raise perm(f"{text!r} does not end in a valid top-level label")
    return tokens


def valid_domain(domain: str) -> bool:
    """RFC 7208 §4.3: a multi-label name whose labels fit in DNS and whose last label is a
    valid top label (so address literals like "[192.0.2.1]" and bare IPs are not)."""
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return (
        len(labels) > 1
        and len(domain) <= MAX_DOMAIN + 1
        and all(LABEL.fullmatch(label) for label in labels)
        and _TOPLABEL_RE.fullmatch(labels[-1]) is not None
    )


def split_sender(sender: str, domain: str) -> tuple[str, str]:
    """(local-part, domain) of <sender>; RFC 7208 §4.3: no local-part means "postmaster"."""
    local, at, sender_domain = sender.rpartition("@")
    if not at:
        local, sender_domain = "", sender or domain
    return local or "postmaster", sender_domain


class MacroExpander:
    """Expands macro-strings for one check_host() run (RFC 7208 §7.3). `ptr_names` gives the
    client's validated PTR names (RFC 7208 §5.5), for %{p}; `clock` gives %{t}."""

    def __init__(
        self,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        sender: str,
        helo: str,
        receiver: str,
        clock: Callable[[], float],
        ptr_names: Callable[[], Awaitable[list[str]]],
    ) -> None:
        self.ip = ip
        self.local, self.sender_domain = split_sender(sender, "")
        self.sender = f"{self.local}@{self.sender_domain}"
        self.helo = helo
        self.receiver = receiver or "unknown"  # RFC 7208 §7.3
        self.clock = clock
        self.ptr_names = ptr_names

    async def macro_value(self, letter: str, domain: str) -> str:
        """The value of macro `letter` (RFC 7208 §7.2) before transformers are applied."""
        ip = self.ip
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":  # RFC 7208 §7.3: dotted nibbles for IPv6
            return str(ip) if ip.version == 4 else ".".join(ip.packed.hex().upper())
        if letter == "p":
            names = await self.ptr_names()
            domain = domain.lower()
            for good in (lambda n: n == domain, lambda n: n.endswith("." + domain), lambda n: True):
                for name in names:
                    if good(name):
                        return name
            return "unknown"
        if letter == "v":
            return "in-addr" if ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(ip)
        if letter == "r":
            return self.receiver
        return str(int(self.clock()))  # "t"

    async def expand(self, tokens: Tokens, domain: str) -> str:
        """A parsed macro-string with each macro replaced (RFC 7208 §7.3, §7.4)."""
        out = []
        for token in tokens:
            if isinstance(token, str):
                out.append(token)
                continue
            value = await self.macro_value(token.letter, domain)
            parts = re.split("[" + re.escape(token.delims or ".") + "]", value)
            if token.reverse:
                parts.reverse()
            if token.digits:
                parts = parts[-token.digits :]
            value = ".".join(parts)
            out.append(quote(value, safe="") if token.escape else value)
        return "".join(out)

    async def target(self, tokens: Tokens | None, domain: str) -> str | None:
        """The <target-name> for a lookup, or None if it cannot be a DNS name. RFC 7208 §7.3:
        over 253 characters, labels are dropped from the left; a trailing dot is ignored."""
        if tokens is None:
            return domain
        name = (await self.expand(tokens, domain)).removesuffix(".")
        while len(name) > MAX_DOMAIN and "." in name:
            name = name.split(".", 1)[1]
        labels = name.split(".")
        if len(name) > MAX_DOMAIN or not all(LABEL.fullmatch(label) for label in labels):
            return None
        return name
