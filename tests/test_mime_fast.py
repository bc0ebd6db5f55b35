"""The fast MIME path (inbox.mimefast) against the email-package path, byte for byte."""

from __future__ import annotations

import email.utils
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbox.errors import InboxError
from inbox.message import (
    Attachment,
    OutboundMessage,
    ValidatedMessage,
    build_mime,
    email_package_mime,
    validate,
)
from inbox.mimefast import BOUNDARY, fast_mime, format_date, new_boundary

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
MID = "<0123456789abcdef@example.com>"
_MULTIPART = re.compile(rb'\r\nContent-Type: multipart/alternative;\r\n boundary="([^"]+)"\r\n')


def make(**overrides) -> OutboundMessage:
    base = OutboundMessage(from_="Sender <sender@example.com>", to=["to@example.org"],
                           subject="Hello", text_body="Hi there.\n")
    return replace(base, **overrides)


def both(v: ValidatedMessage, now: datetime = NOW) -> tuple[bytes | None, bytes]:
    """(fast path output, email package output), the fast path given the boundary the
    email package's generator chose, taken from its output."""
    slow = email_package_mime(v, MID, now)
    found = _MULTIPART.search(slow.split(b"\r\n\r\n", 1)[0] + b"\r\n")
    boundary = found[1].decode() if found else None
    return fast_mime(v, MID, now, boundary=boundary), slow


LONG_URL = "<https://example.com/unsubscribe?token=" + "t" * 300 + ">"
HTML = "<html><body><p>Hello Jane,</p><p>" + "Your invoice is ready. " * 8 + "</p></body></html>"


@pytest.mark.parametrize("overrides", [
    {},
    {"text_body": None, "html_body": "<p>Hi</p>"},
    {"html_body": "<p>Hi</p>"},
    {"html_body": HTML, "text_body": "Your invoice is ready. " * 8},
    {"from_": "Jörg Größe <sender@example.com>", "to": ["山田太郎 <t@example.org>"]},
    {"from_": '"Doe, Jane" <jane@example.com>', "to": ['"Jane \\"JD\\" Doe" <jd@example.com>']},
    {"from_": "=?utf-8?q?fake?= <sender@example.com>"},
    {"from_": f"{'x' * 100} <sender@example.com>"},
    {"subject": "Grüße aus Köln"},
    {"subject": "日本語の件名です" * 10},
    {"subject": "Your invoice #1234 is ready for you to download from our website today"},
    {"subject": "a" * 300},
    {"subject": "word " * 40},
    {"subject": "=?utf-8?q?not_an_encoded_word?="},
    {"subject": "tabs\tand  double  spaces"},
    {"subject": ""},
    {"text_body": "x" * 79},
    {"text_body": "short\n" + "y" * 5000 + "\nend", "html_body": "z" * 1200},
    {"text_body": "é" * 5000},
    {"text_body": "Grüße, mostly ASCII text with one umlaut\n"},
    {"text_body": ".\nlone dots\n.\n..\n", "html_body": ".\r\n.\r\n"},
    {"text_body": "trailing spaces   \n" * 3 + "\tand tabs\t\n"},
    {"text_body": "trailing space " + "q" * 100 + " \n"},
    {"text_body": "crlf\r\nline\r\nends\r\n", "html_body": "lf\nline\nends\n"},
    {"text_body": "mixed\r\nline\rendings\nhere"},
    {"text_body": "no final newline"},
    {"text_body": "\n"},
    {"text_body": " "},
    {"text_body": "nul\x00and\x1bescape\x7f"},
    {"text_body": "From the start\nFrom here\n>From\n"},
    {"text_body": "a=b =3D soft= break=\n" + "=" * 200},
    {"text_body": "--===============1234567890123456789==\n"},
    {"text_body": "\u2028separator\u0085next\x0cfeed"},
    {"text_body": "🎉" * 30 + "\n" + "ascii " * 30},
    {"headers": {"List-Unsubscribe": f"{LONG_URL}, <mailto:unsub@example.com>",
                 "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}},
    {"headers": {"X-Campaign": "  spring  sale  ", "X-Note": "Grüße", "X-Empty": ""}},
    {"headers": {"X-Long": "word " * 40, "X-Encodedish": "=?x?="}},
    {"headers": {"X-Exactly-Fits": "v" * (78 - len("X-Exactly-Fits: "))}},
    {"headers": {"X-One-Over": "v" * (79 - len("X-One-Over: "))}},
    {"reply_to": ["Help <help@example.com>", "other@example.com"],
     "cc": ["cc@example.org", "Çé <cc2@example.org>"]},
    {"to": [f"Person {i} <person{i}@example.org>" for i in range(12)]},
    {"to": ["user@bücher.example"], "from_": "Shop <shop@Bücher.Example>"},
    {"to": ["Jörg <jörg@bücher.example>"]},
    {"from_": "Ünï <ünï@example.com>", "html_body": "<p>ü</p>", "subject": "Grüße"},
    {"bcc": ["Hidden <hidden@example.net>"]},
], ids=["basic", "html-only", "text+html", "qp-both", "non-ascii-names", "quoted-names",
        "looks-encoded-name", "long-name", "subject-german", "subject-japanese",
        "subject-78-ish", "subject-long-word", "subject-folds", "subject-looks-encoded",
        "subject-whitespace", "subject-empty", "line-79", "lines-over-998", "mostly-non-ascii",
        "one-umlaut", "lone-dots", "trailing-spaces", "trailing-space-qp", "crlf-and-lf",
        "mixed-newlines", "no-final-newline", "only-newline", "only-space", "controls",
        "from-lines", "equals-signs", "boundary-lookalike", "unicode-separators", "emoji",
        "custom-long-url", "custom-mixed", "custom-folds", "custom-fits-78",
        "custom-over-78", "reply-to-cc", "many-recipients", "idna", "smtputf8-to",
        "smtputf8-from", "bcc"])
def test_fast_path_writes_the_same_bytes(overrides) -> None:
    fast, slow = both(validate(make(**overrides)))
    assert fast is not None  # every case in this table is one the fast path takes
    assert fast == slow


@pytest.mark.parametrize("now", [
    datetime(2024, 1, 2, 3, 4, 5, 999_999, tzinfo=UTC),
    datetime(2024, 2, 29, 23, 59, 59, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(1999, 12, 31, 0, 0, 0, tzinfo=timezone(timedelta(hours=-8))),
    datetime(2024, 6, 1, 12, 0, 0, tzinfo=timezone(timedelta(0), "UTC")),
], ids=["utc-microseconds", "plus-0530", "minus-0800", "timezone-utc"])
def test_dates_are_formatted_alike(now: datetime) -> None:
    assert format_date(now) == email.utils.format_datetime(now)
    fast, slow = both(validate(make(html_body="<p>x</p>")), now)
    assert fast == slow


def test_attachments_take_the_email_package() -> None:
    v = validate(make(attachments=[Attachment("a.pdf", b"%PDF-1.4")]))
    assert fast_mime(v, MID, NOW) is None
    raw, _ = build_mime(v, "example.com", NOW, MID)
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert parsed.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain",
                                                                   "application/pdf"]


def test_repeated_field_names_take_the_email_package() -> None:
    v = validate(make(headers={"X-Tag": "a", "x-tag": "b"}))
    assert fast_mime(v, MID, NOW) is None
    assert b"\r\nX-Tag: a\r\nx-tag: b\r\n" in build_mime(v, "example.com", NOW, MID)[0]
    unique = validate(make(headers={"Sender": "a@example.com", "SENDER": "b@example.com"}))
    assert fast_mime(unique, MID, NOW) is None  # the email package refuses this one
    with pytest.raises(ValueError, match="at most 1"):
        build_mime(unique, "example.com", NOW, MID)


def test_a_boundary_found_in_a_part_takes_the_email_package() -> None:
    boundary = new_boundary()
    v = validate(make(text_body=f"see\n--{boundary}\nhere", html_body="<p>x</p>"))
    assert fast_mime(v, MID, NOW, boundary=boundary) is None
    assert fast_mime(v, MID, NOW, boundary="not-a-generated-boundary") is None
    fast, slow = both(v)
    assert fast == slow


def test_build_mime_takes_the_fast_path_with_a_fresh_boundary() -> None:
    v = validate(make(html_body=HTML))
    raw1, _ = build_mime(v, "example.com", NOW, MID)
    raw2, _ = build_mime(v, "example.com", NOW, MID)
    found = [_MULTIPART.search(raw) for raw in (raw1, raw2)]
    assert found[0] and found[1]
    b1, b2 = found[0][1].decode(), found[1][1].decode()
    assert BOUNDARY.fullmatch(b1) and b1 != b2
    assert raw1 == fast_mime(v, MID, NOW, boundary=b1)
    parsed = BytesParser(policy=policy.default).parsebytes(raw1)
    assert parsed.get_content_type() == "multipart/alternative" and not parsed.defects
    html = parsed.get_body(("html",))
    assert html is not None and html.get_content() == HTML + "\r\n"  # quoted-printable


def test_the_email_package_chooses_boundaries_of_the_same_shape() -> None:
    v = validate(make(html_body="<p>x</p>"))
    for _ in range(20):
        found = _MULTIPART.search(email_package_mime(v, MID, NOW))
        assert found and BOUNDARY.fullmatch(found[1].decode())
        assert BOUNDARY.fullmatch(new_boundary())


# --- properties --------------------------------------------------------------------------------

_PIECES = ["a", "word ", " ", "  ", "\t", "\n", "\r\n", "\r", ".", "..", "=", "=?", "?=", "-",
           "From ", "é", "ü", "日本", "🎉", "\x00", "\x1b", "x" * 40, "y" * 79, "z" * 1000,
           "<p>", "</p>", '"', "\\", ",", "\u2028"]
_texts = st.one_of(st.text(max_size=300),
                   st.text(st.characters(min_codepoint=32, max_codepoint=126)
                           | st.sampled_from("\t\r\n"), max_size=300),
                   st.lists(st.sampled_from(_PIECES), max_size=40).map("".join))
_bodies = st.none() | _texts
# Header values: what validation lets through (no line breaks or controls), mostly.
_printable = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
_field_texts = st.one_of(
    st.text(_printable, max_size=200),
    st.lists(st.sampled_from([p for p in _PIECES if p.isprintable() or p == "\t"]),
             max_size=40).map("".join))
_names = st.one_of(st.just(""), st.text(_printable, max_size=40),
                   st.lists(st.sampled_from(["Jane", "Doe", " ", "Ü", ",", '"', "山田", "=?",
                                             "x" * 30]), max_size=8).map("".join))
_locals = st.sampled_from(["a", "jane.doe", "o'brien", "x" * 64, '"a b"'] * 3 + ["jörg", "ünï"])
_domains = st.sampled_from(["example.com", "Bücher.example", "xn--bcher-kva.example",
                            "sub.example.co.uk", "localhost"])
_mailbox = st.builds(
    lambda name, local, domain: (
        f'"{name.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}" '
        f"<{local}@{domain}>" if name else f"{local}@{domain}"),
    _names, _locals, _domains)
_header_names = st.sampled_from(["X-Tag", "X-Campaign", "List-Unsubscribe", "X-A",
                                 "X-" + "n" * 60])
_zones = st.sampled_from([UTC, timezone(timedelta(0), "Z"),
                          timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-11))])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sender=_mailbox, to=st.lists(_mailbox, min_size=1, max_size=4),
       cc=st.lists(_mailbox, max_size=2), reply_to=st.lists(_mailbox, max_size=2),
       subject=_field_texts, text=_texts.filter(bool), html=_bodies,
       headers=st.dictionaries(_header_names, _field_texts, max_size=3),
       now=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 12, 30),
                        timezones=_zones))
def test_fast_path_property(sender, to, cc, reply_to, subject, text, html, headers,
                            now) -> None:
    msg = OutboundMessage(from_=sender, to=to, cc=cc, reply_to=reply_to, subject=subject,
                          text_body=text, html_body=html, headers=headers)
    try:
        v = validate(msg)
    except InboxError:
        return
    fast, slow = both(v, now)
    assert fast is not None and fast == slow


@settings(max_examples=300, deadline=None)
@given(now=st.datetimes(timezones=st.none() | _zones))
def test_format_date_property(now: datetime) -> None:
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    assert format_date(now) == email.utils.format_datetime(now)
