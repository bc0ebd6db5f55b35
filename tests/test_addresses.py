"""The LDH fast path for domains agrees with full IDNA processing."""

from __future__ import annotations

import idna
from hypothesis import given
from hypothesis import strategies as st

from inbox.addresses import _idna_pair

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
