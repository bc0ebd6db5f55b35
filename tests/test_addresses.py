"""The fast paths of address parsing agree with the full rules: LDH domains with IDNA
processing, ASCII dot-atoms with the per-character RFC 5322/6532 check."""

from __future__ import annotations

import string

import idna
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.addresses import ATEXT, _dot_atom_ok, _idna_pair, _utf8_char_ok

LABEL = st.from_regex(r"\A[A-Za-z0-9-]{1,20}\Z")


def _full(raw: str) -> tuple[str, str] | None:
    try:
        ascii_name = idna.encode(raw, uts46=True, std3_rules=True).decode("ascii")
        if any(not lb or len(lb) > 63 for lb in ascii_name.split(".")):
            return None
        return idna.decode(ascii_name), ascii_name
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


@given(st.lists(LABEL, min_size=1, max_size=4))
def test_fast_path_matches_idna(labels: list[str]) -> None:
    raw = ".".join(labels)
    expected = _full(raw)
    _idna_pair.cache_clear()
    try:
        got: tuple[str, str] | None = _idna_pair(raw)
    except (idna.IDNAError, UnicodeError, ValueError):
        got = None
    assert got == expected, raw


def test_unicode_and_a_labels_take_the_idna_path() -> None:
    assert _idna_pair("Bücher.example") == ("bücher.example", "xn--bcher-kva.example")
    assert _idna_pair("xn--bcher-kva.example") == ("bücher.example", "xn--bcher-kva.example")


@settings(max_examples=3000)
@given(st.text(alphabet=string.printable + "é\u00a0\u200b..", max_size=14))
def test_dot_atom_fast_path_agrees_with_the_rule(text: str) -> None:
    # RFC 5322 §3.2.3 dot-atom with RFC 6532 UTF-8, written out character by character.
    def by_rule(t: str) -> bool:
        return all(part and all(c in ATEXT or (ord(c) > 127 and _utf8_char_ok(c)) for c in part)
                   for part in t.split("."))

    assert _dot_atom_ok(text) == by_rule(text)
