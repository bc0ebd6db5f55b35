"""Outbound message validation and MIME building."""

from __future__ import annotations

import email.header
import email.utils
import re
from dataclasses import replace
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inbox.errors import (
    HeaderInjection,
    InboxError,
    InvalidAddress,
    MessageTooLarge,
    ValidationError,
)
from inbox.message import (
    MAX_ATTACHMENT_BYTES,
    MAX_MESSAGE_BYTES,
    Attachment,
    OutboundMessage,
    ValidatedMessage,
    build_mime,
    parse_address,
    validate,
)

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def make(**overrides) -> OutboundMessage:
    base = OutboundMessage(from_="Sender <sender@example.com>", to=["to@example.org"],
                           subject="Hello", text_body="Hi there.\n")
    return replace(base, **overrides)


def build(msg: OutboundMessage, **kw) -> tuple[bytes, EmailMessage]:
    raw, _ = build_mime(validate(msg), "example.com", NOW, **kw)
    return raw, BytesParser(policy=policy.default).parsebytes(raw)


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def assert_wire_clean(raw: bytes) -> None:
    """RFC 5322 §2.1.1 / §2.3: CRLF only, no line over 998 octets."""
    assert BARE_CR_OR_LF.search(raw) is None
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def display_name_of(raw: bytes, field: str) -> str:
    """The first display name of `field`, decoded the RFC 2047 §6.2 way.

    The stdlib's modern address parser keeps the folding space between two adjacent
    encoded-words of a phrase ("山田太 郎"); RFC 2047 says to drop it, as the legacy
    `email.header` decoder (and mail clients) do. Long non-ASCII names need several words.
    """
    lines = header_block(raw).decode("utf-8").replace("\r\n ", " ").split("\r\n")
    value = next(line for line in lines if line.startswith(f"{field}: "))[len(field) + 2:]
    if value.startswith('"'):
        return email.utils.unquote(re.match(r'"(?:[^"\\]|\\.)*"', value)[0])
    phrase = value.split(" <", 1)[0] if " <" in value else ""
    return str(email.header.make_header(email.header.decode_header(phrase)))


def tree(part) -> object:
    if part.is_multipart():
        return (part.get_content_type(), [tree(p) for p in part.iter_parts()])
    return part.get_content_type()


# --- header injection, in every field ----------------------------------------------------------

INJECT = "x@example.org\r\nBcc: victim@example.net"


@pytest.mark.parametrize(("overrides", "field"), [
    ({"from_": "Sender <sender@example.com>\r\nBcc: victim@example.net"}, ["from"]),
    ({"from_": "Sen\nder <sender@example.com>"}, ["from"]),
    ({"to": ["ok@example.org", INJECT]}, ["to", "1"]),
    ({"cc": [INJECT]}, ["cc", "0"]),
    ({"bcc": ["ok@example.org", "ok2@example.org", INJECT]}, ["bcc", "2"]),
    ({"reply_to": [INJECT]}, ["replyTo", "0"]),
    ({"subject": "Hello\r\nBcc: victim@example.net"}, ["subject"]),
    ({"subject": "Hello\nX-Injected: 1"}, ["subject"]),
    ({"subject": "Hello\rX-Injected: 1"}, ["subject"]),
    ({"subject": "Hello\x00"}, ["subject"]),
    ({"subject": "Hello\u2028X-Injected: 1"}, ["subject"]),
    ({"subject": "Hello\x85X-Injected: 1"}, ["subject"]),
    ({"subject": "Hello\x0bX-Injected: 1"}, ["subject"]),
    ({"headers": {"X-Tag\r\nBcc": "victim@example.net"}}, ["headers", "X-Tag\r\nBcc"]),
    ({"headers": {"X-Tag": "a\r\nBcc: victim@example.net"}}, ["headers", "X-Tag"]),
    ({"headers": {"X-Tag": "a\nb"}}, ["headers", "X-Tag"]),
    ({"attachments": [Attachment("a.pdf", PDF), Attachment("b\r\nX-Evil: 1.pdf", PDF)]},
     ["attachments", "1", "filename"]),
    ({"attachments": [Attachment("a.png", PNG, content_id="logo\r\nX-Evil: 1")],
      "html_body": "<img src=cid:logo>"}, ["attachments", "0", "contentId"]),
    ({"attachments": [Attachment("a.txt", b"x", content_type="text/plain\r\nX-Evil: 1")]},
     ["attachments", "0", "contentType"]),
], ids=["from", "from-display-name", "to", "cc", "bcc", "replyTo", "subject-crlf", "subject-lf",
        "subject-cr", "subject-nul", "subject-u2028", "subject-nel", "subject-vt", "header-name",
        "header-value-crlf", "header-value-lf", "attachment-filename", "attachment-content-id",
        "attachment-content-type"])
def test_header_injection_is_refused(overrides, field) -> None:
    with pytest.raises(HeaderInjection) as info:
        validate(make(**overrides))
    assert info.value.field == field
    assert info.value.code == "HEADER_INJECTION"


# --- addresses ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("   ", "empty"),
    ("plainaddress", "needs an @"),
    ("@example.com", "before @ is empty"),
    ("user@", "domain after @ is empty"),
    ("a@b@example.com", "unexpected '@'"),
    ("user name@example.com", "spaces"),
    ("user@exa mple.com", "spaces"),
    ("us(er)@example.com", "unexpected '('"),
    ("us[er]@example.com", "unexpected '['"),
    ('us"er@example.com', "unexpected"),
    ("us\\er@example.com", "unexpected"),
    ("a@example.com, b@example.com", "only one address"),
    ("a@example.com; b@example.com", "only one address"),
    ("Doe, John <john@example.com>", "only one address"),
    ("<a@example.com> <b@example.com>", "only one address"),
    ("Name <a@example.com", "angle brackets"),
    ("Name a@example.com>", "angle brackets"),
    ('"Unterminated <a@example.com>', "unterminated"),
    ("Na:me <a@example.com>", "unexpected ':'"),
    (".user@example.com", "dots"),
    ("user.@example.com", "dots"),
    ("us..er@example.com", "dots"),
    ("user@example..com", "not a valid domain"),
    ("user@.example.com", "not a valid domain"),
    ("user@example.com.", "not a valid domain"),
    ("user@-example.com", "not a valid domain"),
    ("user@exa_mple.com", "not a valid domain"),
    ("user@xn--zz.example", "not a valid domain"),
    ("user@" + "a" * 64 + ".example", "not a valid domain"),
    ("user@[192.0.2.1]", "literals"),
    ("x" * 65 + "@example.com", "64 octets"),
    ("x" * 64 + "@" + ".".join(["a" * 60] * 3) + ".example", "254 octets"),
    ('""@example.com', "invalid quoted local part"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_invalid_addresses(text: str, message: str) -> None:
    with pytest.raises(InvalidAddress, match=re.escape(message)) as info:
        validate(make(to=["ok@example.org", text]))
    assert info.value.field == ["to", "1"]
    assert info.value.code == "INVALID_ADDRESS"


@pytest.mark.parametrize(("text", "display", "addr_spec"), [
    ("user@example.com", "", "user@example.com"),
    ("<user@example.com>", "", "user@example.com"),
    ("  Jane Doe <jane@example.com>  ", "Jane Doe", "jane@example.com"),
    ('"Doe, Jane" <jane@example.com>', "Doe, Jane", "jane@example.com"),
    ('"Jane \\"JD\\" Doe" <jd@example.com>', 'Jane "JD" Doe', "jd@example.com"),
    ("Jane Q. Public <JQP@Example.COM>", "Jane Q. Public", "JQP@example.com"),
    ("first.last+tag@sub.example.co.uk", "", "first.last+tag@sub.example.co.uk"),
    ("o'brien@example.ie", "", "o'brien@example.ie"),
    ('"john doe"@example.com', "", '"john doe"@example.com'),
    ('"john"@example.com', "", "john@example.com"),
    ("Zoë Ünïcode <zoe@example.com>", "Zoë Ünïcode", "zoe@example.com"),
    ("user@Bücher.Example", "", "user@xn--bcher-kva.example"),
    ("user@xn--bcher-kva.example", "", "user@xn--bcher-kva.example"),
    ("user@localhost", "", "user@localhost"),
], ids=lambda v: v if isinstance(v, str) and v and len(v) < 40 else None)
def test_valid_addresses(text: str, display: str, addr_spec: str) -> None:
    addr = parse_address(text, ["to", "0"])
    assert (addr.display_name, addr.addr_spec, addr.smtputf8) == (display, addr_spec, False)


def test_parse_address_accepts_a_plain_field_name() -> None:
    with pytest.raises(InvalidAddress) as info:
        parse_address("nope", "value")
    assert info.value.field == ["value"]


def test_idna_domain_in_envelope_and_header() -> None:
    v = validate(make(to=["user@bücher.example"]))
    addr = v.to[0]
    assert (addr.domain, addr.ascii_domain) == ("bücher.example", "xn--bcher-kva.example")
    assert [a.addr_spec for a in v.envelope_recipients] == ["user@xn--bcher-kva.example"]
    raw, parsed = build(make(to=["user@bücher.example"]))
    assert b"\r\nTo: user@xn--bcher-kva.example\r\n" in header_block(raw)
    assert parsed["To"].addresses[0].domain == "xn--bcher-kva.example"


def test_utf8_local_part_needs_smtputf8() -> None:
    v = validate(make(to=["Jörg <jörg@bücher.example>"]))
    assert v.smtputf8 and v.to[0].smtputf8
    assert v.to[0].addr_spec == "jörg@xn--bcher-kva.example"
    raw, _ = build_mime(v, "example.com", NOW)
    assert "jörg@xn--bcher-kva.example".encode() in header_block(raw)
    assert_wire_clean(raw)
    assert not validate(make()).smtputf8


def test_envelope_recipients_dedupe_case_insensitively_on_domain() -> None:
    v = validate(make(to=["A <user@Example.COM>", "other@example.org"],
                      cc=["user@example.com", "User@example.com"],
                      bcc=["other@EXAMPLE.org", "hidden@example.net"]))
    assert [a.addr_spec for a in v.envelope_recipients] == [
        "user@example.com", "other@example.org", "User@example.com", "hidden@example.net"]
    assert len(v.to) == 2 and len(v.cc) == 2 and len(v.bcc) == 2  # headers keep what was given


def test_from_header_is_the_display_form() -> None:
    v = validate(make(from_='"Doe, Jane" <jane@Example.com>'))
    assert v.from_header == '"Doe, Jane" <jane@example.com>'


# --- other validation --------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "error", "field"), [
    ({"to": [], "cc": [], "bcc": []}, ValidationError, ["to"]),
    ({"text_body": None, "html_body": None}, ValidationError, ["textBody"]),
    ({"text_body": "", "html_body": ""}, ValidationError, ["textBody"]),
    ({"text_body": "bad \ud800 surrogate"}, ValidationError, ["textBody"]),
    ({"headers": {"X Space": "v"}}, ValidationError, ["headers", "X Space"]),
    ({"headers": {"X:Colon": "v"}}, ValidationError, ["headers", "X:Colon"]),
    ({"headers": {"X-Ünï": "v"}}, ValidationError, ["headers", "X-Ünï"]),
    ({"headers": {"": "v"}}, ValidationError, ["headers", ""]),
    ({"headers": {"X-" + "a" * 80: "v"}}, ValidationError, ["headers", "X-" + "a" * 80]),
    ({"headers": {"X-Long": "a" * 1000}}, ValidationError, ["headers", "X-Long"]),
    ({"attachments": [Attachment("", PDF)]}, ValidationError, ["attachments", "0", "filename"]),
    ({"attachments": [Attachment("a.pdf", PDF, "pdf")]}, ValidationError,
     ["attachments", "0", "contentType"]),
    ({"attachments": [Attachment("a.eml", PDF, "multipart/mixed")]}, ValidationError,
     ["attachments", "0", "contentType"]),
    ({"attachments": [Attachment("a.png", PNG, content_id="a b")]}, ValidationError,
     ["attachments", "0", "contentId"]),
    ({"attachments": [Attachment("a.pdf", "text, not bytes")]}, ValidationError,  # type: ignore
     ["attachments", "0", "content"]),
], ids=["no-recipients", "no-body", "empty-bodies", "surrogate-body", "header-name-space",
        "header-name-colon", "header-name-non-ascii", "header-name-empty", "header-name-long",
        "header-value-long-word", "empty-filename", "content-type-shape", "multipart-attachment",
        "content-id-space", "content-not-bytes"])
def test_validation_errors(overrides, error, field) -> None:
    with pytest.raises(error) as info:
        validate(make(**overrides))
    assert info.value.field == field


@pytest.mark.parametrize("name", [
    "From", "to", "CC", "Bcc", "Date", "Message-ID", "MIME-Version", "Content-Type",
    "content-transfer-encoding", "DKIM-Signature", "Received", "Return-Path", "Subject",
    "Reply-To",
])
def test_structural_headers_cannot_be_overridden(name: str) -> None:
    with pytest.raises(ValidationError, match="cannot be given") as info:
        validate(make(headers={name: "x"}))
    assert info.value.field == ["headers", name]


def test_only_attachments_is_enough() -> None:
    raw, parsed = build(make(text_body=None, attachments=[Attachment("a.pdf", PDF)]))
    assert tree(parsed) == ("multipart/mixed", ["application/pdf"])


# --- sizes -------------------------------------------------------------------------------------

def test_limits() -> None:
    assert MAX_ATTACHMENT_BYTES == 18 * 1024 * 1024
    assert MAX_MESSAGE_BYTES == 25 * 1024 * 1024


def test_attachment_over_18_mb_names_the_attachment() -> None:
    big = bytes(MAX_ATTACHMENT_BYTES + 1)
    with pytest.raises(MessageTooLarge) as info:
        validate(make(attachments=[Attachment("a.pdf", PDF), Attachment("big.bin", big)]))
    assert info.value.field == ["attachments", "1"]
    assert info.value.code == "MESSAGE_TOO_LARGE"


def test_attachments_adding_up_over_25_mb_are_refused_before_building() -> None:
    parts = [Attachment(f"{i}.bin", bytes(10 * 1024 * 1024)) for i in range(2)]
    with pytest.raises(MessageTooLarge) as info:
        validate(make(attachments=parts))
    assert info.value.field == ["message"]


def test_built_message_over_25_mb_is_refused() -> None:
    # The attachment alone encodes to just under 25 MB; line endings and headers push it over.
    v = validate(make(text_body="aaaaaaaaa\n" * 38000,
                      attachments=[Attachment("big.bin", bytes(MAX_ATTACHMENT_BYTES))]))
    with pytest.raises(MessageTooLarge) as info:
        build_mime(v, "example.com", NOW)
    assert info.value.field == ["message"]


def test_size_limits_can_be_lowered() -> None:
    msg = make(attachments=[Attachment("a.bin", bytes(10_000))])
    v = validate(msg, max_bytes=14_000)  # the encoded attachment alone is 13.7 kB
    with pytest.raises(MessageTooLarge):
        build_mime(v, "example.com", NOW, max_bytes=14_000)  # headers and MIME make 14.3 kB
    with pytest.raises(MessageTooLarge) as info:
        validate(msg, max_attachment_bytes=9_999)
    assert info.value.field == ["attachments", "0"]


# --- MIME structure ----------------------------------------------------------------------------

LOGO = Attachment("logo.png", PNG, content_id="logo@example.com")
REPORT = Attachment("report.pdf", PDF)
ALT = ("multipart/alternative", ["text/plain", "text/html"])


@pytest.mark.parametrize(("text", "html", "attachments", "expected"), [
    ("Hi", None, [], "text/plain"),
    (None, "<p>Hi</p>", [], "text/html"),
    ("Hi", "<p>Hi</p>", [], ALT),
    ("Hi", None, [REPORT], ("multipart/mixed", ["text/plain", "application/pdf"])),
    ("Hi", "<p>Hi</p>", [REPORT], ("multipart/mixed", [ALT, "application/pdf"])),
    (None, "<img src=cid:logo@example.com>", [LOGO],
     ("multipart/related", ["text/html", "image/png"])),
    ("Hi", "<img src=cid:logo@example.com>", [LOGO, REPORT],
     ("multipart/mixed", [("multipart/alternative", [
         "text/plain", ("multipart/related", ["text/html", "image/png"])]), "application/pdf"])),
    ("Hi", None, [LOGO], ("multipart/mixed", ["text/plain", "image/png"])),
    (None, None, [REPORT, LOGO], ("multipart/mixed", ["application/pdf", "image/png"])),
], ids=["text", "html", "text+html", "text+attachment", "text+html+attachment",
        "html+inline", "everything", "inline-without-html", "attachments-only"])
def test_mime_structure(text, html, attachments, expected) -> None:
    raw, parsed = build(make(text_body=text, html_body=html, attachments=attachments))
    assert tree(parsed) == expected
    assert parsed["MIME-Version"] == "1.0"
    assert_wire_clean(raw)
    assert all(not part.defects for part in parsed.walk())


def test_parts_carry_content_and_metadata() -> None:
    ics = Attachment("invite.ics", b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n",
                     'text/calendar; method=REQUEST; charset="utf-8"')
    raw, parsed = build(make(text_body="Grüße\n", html_body="<img src=cid:logo@example.com>",
                             attachments=[LOGO, REPORT, ics,
                                          Attachment("Résumé 2024.pdf", PDF)]))
    parts = {p.get_filename(): p for p in parsed.walk() if p.get_filename()}
    assert parts["logo.png"].get_content() == PNG
    assert parts["logo.png"]["Content-ID"] == "<logo@example.com>"
    assert parts["logo.png"].get_content_disposition() == "inline"
    assert parts["report.pdf"].get_content() == PDF
    assert parts["report.pdf"].get_content_disposition() == "attachment"
    assert parts["Résumé 2024.pdf"].get_content() == PDF  # RFC 2231 filename
    assert parts["invite.ics"].get_content_type() == "text/calendar"
    assert parts["invite.ics"].get_param("method") == "REQUEST"
    related = next(p for p in parsed.walk() if p.get_content_type() == "multipart/related")
    assert related.get_param("type") == "text/html"  # RFC 2387 §3.1
    assert parsed.get_body(("plain",)).get_content() == "Grüße\r\n"  # canonical CRLF


@pytest.mark.parametrize(("filename", "expected"), [
    ("report.pdf", "application/pdf"),
    ("photo.JPG", "image/jpeg"),
    ("data.unknownext", "application/octet-stream"),
    ("forwarded.eml", "application/octet-stream"),  # message/rfc822 cannot be base64
], ids=["pdf", "jpg-uppercase", "unknown", "eml"])
def test_attachment_type_is_guessed_from_the_filename(filename: str, expected: str) -> None:
    assert validate(make(attachments=[Attachment(filename, PDF)])).attachments[0].content_type \
        == expected


@pytest.mark.parametrize("text", [
    "x" * 5000,
    "é" * 5000,
    "<p>" + "word " * 2000 + "</p>",
    "short line\n" + "y" * 5000 + "\nend",
    "trailing spaces   \n" * 3 + "\tand tabs\t\n",
    "nul\x00and\x1bescape",
    "mixed\r\nline\rendings\nhere",
    ".\nFrom the start\n..",
], ids=["5000-ascii", "5000-non-ascii", "long-html-ish", "one-long-line", "trailing-space",
        "control-chars", "mixed-newlines", "dots-and-from"])
def test_body_lines_stay_under_998_and_round_trip(text: str) -> None:
    raw, parsed = build(make(text_body=text, html_body=text))
    assert_wire_clean(raw)
    expected = "".join(line.decode() + "\n" for line in text.encode().splitlines())
    for subtype in ("plain", "html"):
        body = parsed.get_body((subtype,))
        assert body["Content-Transfer-Encoding"] in ("7bit", "quoted-printable", "base64")
        assert body.get_content().replace("\r\n", "\n") == expected


def test_5000_char_single_line_text_body() -> None:
    raw, _ = build(make(text_body="z" * 5000))
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"z" * 999 not in raw


# --- headers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("subject", [
    "Grüße aus Köln",
    "日本語の件名です" * 10,
    "Emoji 🎉🚀 party",
    "=?utf-8?q?not_an_encoded_word?=",
    "literal =?iso-8859-1?q?x?= inside",
    "a" * 300,
    "Mixed ascii and a very long tail " + "ü" * 200,
    "tabs\tand  double  spaces",
    "",
], ids=["german", "japanese-long", "emoji", "looks-encoded", "looks-encoded-inside",
        "long-word", "long-non-ascii", "whitespace", "empty"])
def test_subject_round_trips_through_rfc2047(subject: str) -> None:
    raw, parsed = build(make(subject=subject))
    assert_wire_clean(raw)
    assert header_block(raw).isascii()
    assert str(parsed["Subject"]) == subject
    assert all(len(line) <= 78 for line in header_block(raw).split(b"\r\n")
               if not line.startswith(b"Message-ID"))


@pytest.mark.parametrize("name", [
    "Jörg Größe", "Doe, Jane", 'Jane "JD" Doe', "山田太郎", "=?utf-8?q?fake?=", "x" * 100,
    "O'Brien (Sales)",
], ids=["german", "comma", "quotes", "japanese", "looks-encoded", "long", "parens"])
def test_display_names_are_encoded_and_round_trip(name: str) -> None:
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raw, parsed = build(make(from_=f"{quoted} <sender@example.com>",
                             to=[f"{quoted} <to@example.org>", "plain@example.org"]))
    assert header_block(raw).isascii()
    assert_wire_clean(raw)
    assert parsed["From"].addresses[0].display_name == name
    assert [a.addr_spec for a in parsed["To"].addresses] == ["to@example.org",
                                                             "plain@example.org"]
    assert parsed["To"].addresses[0].display_name == name
    assert display_name_of(raw, "From") == display_name_of(raw, "To") == name


@pytest.mark.parametrize("name", ["山田太郎" * 10, "Jörg Größe von und zu Müller-Lüdenscheidt"],
                         ids=["cjk-40", "german-long"])
def test_long_non_ascii_display_names_use_several_encoded_words(name: str) -> None:
    raw, _ = build(make(to=[f"{name} <to@example.org>"]))
    to_lines = header_block(raw).split(b"\r\nTo: ")[1].split(b"\r\nCc")[0]
    assert to_lines.count(b"=?utf-8?") >= 2
    assert all(len(line) <= 78 for line in header_block(raw).split(b"\r\n"))
    assert display_name_of(raw, "To") == name


def test_bcc_never_appears_in_the_message() -> None:
    raw, parsed = build(make(bcc=["Hidden Person <hidden@secret.example>"]))
    # Field names only: the Message-ID's random hex may spell "bcc" (a full CI run once did).
    names = [line.split(b":")[0].lower() for line in header_block(raw).split(b"\r\n")
             if line[:1] not in (b" ", b"\t")]
    assert b"bcc" not in names and b"message-id" in names
    assert b"hidden" not in raw.lower() and b"secret.example" not in raw
    assert parsed["Bcc"] is None


def test_standard_headers() -> None:
    raw, parsed = build(make(cc=["cc@example.org"], reply_to=["Help <help@example.com>"]))
    assert parsed["Date"] == "Tue, 02 Jan 2024 03:04:05 +0000"
    assert parsed["MIME-Version"] == "1.0"
    assert str(parsed["Reply-To"]) == "Help <help@example.com>"
    assert str(parsed["Cc"]) == "cc@example.org"
    names = [line.split(b":")[0] for line in header_block(raw).split(b"\r\n")
             if line[:1] not in (b" ", b"\t")]
    assert names[:8] == [b"From", b"Reply-To", b"To", b"Cc", b"Subject", b"Date",
                         b"Message-ID", b"MIME-Version"]


def test_message_id() -> None:
    v = validate(make())
    raw1, mid1 = build_mime(v, "Bücher.example", NOW)
    _, mid2 = build_mime(v, "Bücher.example", NOW)
    assert re.fullmatch(r"<[0-9a-f]{32}@xn--bcher-kva\.example>", mid1)
    assert mid1 != mid2
    assert f"\r\nMessage-ID: {mid1}\r\n".encode() in raw1
    raw3, mid3 = build_mime(v, "example.com", NOW, message_id="<given@example.com>")
    assert mid3 == "<given@example.com>" and b"Message-ID: <given@example.com>" in raw3
    with pytest.raises(ValidationError):
        build_mime(v, "example.com", NOW, message_id="<a\r\nb@example.com>")


def test_naive_datetime_is_taken_as_utc() -> None:
    raw, _ = build_mime(validate(make()), "example.com", datetime(2024, 1, 2, 3, 4, 5))
    assert b"Date: Tue, 02 Jan 2024 03:04:05 +0000\r\n" in raw


def test_custom_headers_are_added_verbatim_when_ascii() -> None:
    url = "<https://example.com/unsubscribe?token=" + "t" * 300 + ">"
    raw, parsed = build(make(headers={
        "List-Unsubscribe": f"{url}, <mailto:unsub@example.com>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "X-Campaign": "  spring  sale  ",
        "X-Note": "Grüße",
        "X-Empty": "",
    }))
    assert_wire_clean(raw)
    assert f"List-Unsubscribe: {url},".encode() in raw  # a URL is never encoded or split
    assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    assert str(parsed["X-Campaign"]) == "spring  sale"
    assert str(parsed["X-Note"]) == "Grüße" and b"X-Note: =?utf-8?" in raw
    assert str(parsed["X-Empty"]) == ""


def test_validated_message_is_frozen() -> None:
    v = validate(make())
    assert isinstance(v, ValidatedMessage)
    with pytest.raises(AttributeError):
        v.subject = "changed"  # type: ignore[misc]


# --- property: anything either fails typed or builds a clean, faithful message ------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=st.text(max_size=200), body=st.text(max_size=1500),
       name=st.text(max_size=120), html=st.none() | st.text(max_size=300),
       filename=st.none() | st.text(max_size=60))
def test_build_mime_property(subject: str, body: str, name: str, html: str | None,
                             filename: str | None) -> None:
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    attachments = [Attachment(filename, b"data")] if filename is not None else []
    msg = make(from_=f"{quoted} <sender@example.com>", subject=subject, text_body=body,
               html_body=html, attachments=attachments)
    try:
        v = validate(msg)
        raw, _ = build_mime(v, "example.com", NOW)
    except InboxError:
        return
    assert_wire_clean(raw)
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert str(parsed["Subject"]) == v.subject == subject.strip(" \t")
    assert display_name_of(raw, "From") == v.from_.display_name
    if v.text_body:
        expected = "".join(line.decode() + "\n" for line in body.encode().splitlines())
        assert parsed.get_body(("plain",)).get_content().replace("\r\n", "\n") == expected
    if attachments:
        found = [p.get_filename() for p in parsed.iter_attachments()]
        assert found == [v.attachments[0].filename]


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(
    st.text(max_size=80),
    st.builds(lambda name, local, domain: f"{name} <{local}@{domain}>", st.text(max_size=20),
              st.text(max_size=15), st.text(max_size=15)),
    st.builds(lambda local, domain: f"{local}@{domain}", st.text(max_size=15),
              st.text(max_size=15)),
))
def test_parse_address_property(text: str) -> None:
    """Typed errors only; what parses formats back to itself and fits SMTP limits."""
    try:
        addr = parse_address(text, ["to", "0"])
    except InboxError as exc:
        assert isinstance(exc, ValidationError) and exc.field == ["to", "0"]
        return
    assert parse_address(addr.formatted, "to") == addr
    assert len(addr.addr_spec.encode()) <= 254 and "\r" not in addr.addr_spec
    assert addr.ascii_domain.isascii() and addr.ascii_domain == addr.ascii_domain.lower()
