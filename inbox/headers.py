"""Header fields of built messages: RFC 2047 encoded-words and folding at 78 (RFC 5322 §2.2.3),
handed to the `email` package pre-folded, so text that merely looks like an encoded-word stays
literal and no line can exceed 998 octets. Does no I/O.
"""

from __future__ import annotations

import base64
import email.policy
import re
import string
from collections.abc import Sequence

from inbox.addresses import Address, quote_phrase

FOLD_AT = 78  # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
_Q_SAFE = frozenset(string.ascii_letters + string.digits + "!*+-/")  # RFC 2047 §5(3)


class Prefolded(str):
    """A header field folded here; `email` writes objects with .name and .fold() verbatim."""

    name: str
    lines: list[str]

    def __new__(cls, name: str, lines: list[str]) -> Prefolded:
        obj = super().__new__(cls, "".join(lines)[len(name) + 2:])
        obj.name, obj.lines = name, lines
        return obj

    def fold(self, *, policy: email.policy.Policy) -> str:
        return policy.linesep.join(self.lines) + policy.linesep


def fold(name: str, tokens: list[str]) -> Prefolded:
    """Join `name: token token ...`, breaking before a token's leading whitespace at 78."""
    lines, line = [], f"{name}:"
    for i, tok in enumerate(tokens):
        tok = tok if tok[:1] in (" ", "\t") else " " + tok
        if i and len(line) + len(tok) > FOLD_AT:
            lines.append(line)
            line = tok
        else:
            line += tok
    lines.append(line)
    return Prefolded(name, lines)


def encoded_words(text: str, first: int = 75) -> list[str]:
    """`text` as UTF-8 encoded-words (RFC 2047 §2: at most 75 characters each; the first at
    most `first`, to fit after the field name), never splitting a character (§5)."""
    use_b = sum(ord(c) > 127 for c in text) * 10 > len(text)
    words: list[str] = []
    chunk, size, room = "", 0, max(first, 30) - 12  # 12 = len("=?utf-8?q?") + len("?=")
    for ch in text:
        raw = ch.encode()
        size_after = (-(-(len(chunk.encode()) + len(raw)) // 3) * 4 if use_b else
                      size + sum(1 if chr(b) in _Q_SAFE or b == 32 else 3 for b in raw))
        if chunk and size_after > room:
            words.append(chunk)
            chunk, size, room = "", 0, 75 - 12
            size_after = (-(-len(raw) // 3) * 4 if use_b else
                          sum(1 if chr(b) in _Q_SAFE or b == 32 else 3 for b in raw))
        chunk, size = chunk + ch, size_after
    words.append(chunk)
    if use_b:
        return [f"=?utf-8?b?{base64.b64encode(w.encode()).decode()}?=" for w in words]
    return ["=?utf-8?q?" + "".join(
        chr(b) if chr(b) in _Q_SAFE else "_" if b == 32 else f"={b:02X}" for b in w.encode()
    ) + "?=" for w in words]


def needs_encoding(text: str, longest: int = 66) -> bool:
    """Non-ASCII, text an RFC 2047 decoder would take for an encoded-word, or a word (or run
    of spaces) too long to fold at 78."""
    return (not text.isascii() or "=?" in text
            or any(len(t) > longest for t in re.findall(r"[^ \t]+|[ \t]+", text)))


def unstructured(name: str, text: str) -> Prefolded:
    """An unstructured field (Subject, a custom header): encoded-words only when needed."""
    if not text:
        return Prefolded(name, [f"{name}: "])
    if needs_encoding(text):
        return fold(name, encoded_words(text, FOLD_AT - len(name) - 2))
    return fold(name, re.findall(r"[ \t]*[^ \t]+", text))


def address_list(name: str, addrs: Sequence[Address]) -> Prefolded:
    """An address-list field (From, To, Cc, Reply-To), display names encoded as whole phrases."""
    tokens: list[str] = []
    for addr in addrs:
        if tokens:
            tokens[-1] += ","
        display = addr.display_name
        if len(display) > 200 or not display.isascii() or "=?" in display:
            first = FOLD_AT - len(name) - 2 if not tokens else 75
            tokens.extend(encoded_words(display, first))  # RFC 2047 §5(3): a whole phrase
        elif display:
            tokens.append(quote_phrase(display))  # one token, at most ~400 characters
        tokens.append(f"<{addr.addr_spec}>" if display else addr.addr_spec)
    return fold(name, tokens)
