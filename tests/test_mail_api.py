"""The receiving-side GraphQL API over the real stack (uvicorn over HTTP and websockets, the
embedded database, the local blob store): mailboxes, aliases, catch-all and inbound settings,
listing and reading stored mail (standard and end-to-end encrypted), flags, folders, deleting,
threads, the live subscription, and the wall between organizations."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from inbox.smtp.receiving import inbound_topic
from inbox.storage.envelope import decrypt_message, generate_keypair
from inbox.storage.mailstore import Delivery, InboundMeta, list_query
from inbox.storage.mimeparse import parse_inbound
from inbox.tenancy.mailboxes import create_mailbox, resolve_recipient
from inbox.tenancy.orgkeys import set_e2ee_public_key
from tests.conftest import Stack, Tenant, make_settings, make_tenant, run_stack
from tests.support.dnsserver import DnsServer

AUTH = {
    "spf": "pass", "spf_domain": "sender.example",
    "dkim": [{"result": "pass", "domain": "sender.example", "selector": "s1",
              "algorithm": "rsa-sha256", "reason": ""}],
    "dmarc": "pass", "dmarc_policy": "reject", "dmarc_disposition": "none",
    "header_from_domain": "sender.example", "arc": "none",
    "header": "Authentication-Results: mx.inbox.test; spf=pass; dkim=pass; dmarc=pass",
}


@dataclass
class Org:
    tenant: Tenant
    mailbox: str  # mailbox id of info@<domain>

    @property
    def key(self) -> str:
        return self.tenant.key


@dataclass
class Mail:
    stack: Stack
    a: Org
    b: Org

    async def api(self, query: str, variables: dict[str, Any] | None = None, *,
                  key: str) -> dict[str, Any]:
        return await self.stack.api(query, variables, key=key)


async def _org(stack: Stack, domain: str, name: str) -> Org:
    tenant = await make_tenant(stack.services, stack.dns, domain, name=name)
    row = await create_mailbox(stack.services.db, tenant.org, domain, "info",
                               stack.services.clock())
    return Org(tenant, row["id"])


@contextlib.asynccontextmanager
async def _mail_stack(tmp_path: Any, dns: DnsServer) -> AsyncIterator[Mail]:
    settings = make_settings(tmp_path, dns, INBOX_DB_SYNC="false",
                             SERVER_HOSTNAME="mx.inbox.test")
    async with run_stack(settings, dns, workers=False) as stack:
        yield Mail(stack, await _org(stack, "a.test", "A"), await _org(stack, "b.test", "B"))


@pytest.fixture
async def mail(tmp_path: Any, dns_server: DnsServer) -> AsyncIterator[Mail]:
    """A fresh stack for tests that change settings or folders."""
    async with _mail_stack(tmp_path, dns_server) as m:
        yield m


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: Any) -> AsyncIterator[Mail]:
    """One stack for the table-driven tests whose cases change nothing they share (each
    case there either only reads or is refused); keeps the file fast."""
    dns = DnsServer().start()
    try:
        async with _mail_stack(tmp_path_factory.mktemp("shared"), dns) as m:
            yield m
    finally:
        dns.stop()
    assert not dns.errors, dns.errors


def message(subject: str = "Hello", *, sender: str = "alice@sender.example",
            to: str = "info@a.test", message_id: str | None = None, in_reply_to: str = "",
            references: str = "", text: str = "Hi there,\nthis is a test.\n",
            html: str | None = None, attachment: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Sun, 22 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = message_id or f"<{subject.replace(' ', '.')}@sender.example>"
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf",
                           filename="report.pdf")
    return bytes(msg)


async def store(stack: Stack, org: Org, raw: bytes, *, folder: str = "INBOX",
                enc_mode: str = "standard", public_key: str | None = None,
                spam: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store one message as the port-25 side does (parse, then MailStore.store)."""
    s = stack.services
    # Ids order by millisecond, then at random: a pause keeps "newest first" deterministic.
    await asyncio.sleep(0.002)
    rows = await s.mailstore.store(
        raw, parse_inbound(raw),
        [Delivery(org=org.tenant.org, mailbox=org.mailbox, rcpt_to=[f"info@{org.tenant.domain}"],
                  folder=folder, enc_mode=enc_mode, e2ee_public_key=public_key)],
        InboundMeta(peer_ip="127.0.0.1", helo="mail.sender.example",
                    mail_from="bounce@sender.example", tls=True, auth=AUTH,
                    spam=spam or {"verdict": "ham", "reasons": []}),
        s.clock())
    return rows[0]


# ---- mailboxes, aliases, catch-all, inbound settings -------------------------------------

CREATE = """mutation($d: String!, $l: String!, $n: String) {
  createMailbox(domain: $d, localPart: $l, name: $n) {
    mailbox { id address domain name aliases { address } } errors { code field message } } }"""
ADD_ALIAS = """mutation($a: String!, $m: ID!) {
  addAlias(address: $a, mailbox: $m) { alias { id address mailboxId } errors { code field } } }"""
REMOVE_ALIAS = """mutation($a: String!) {
  removeAlias(address: $a) { removed errors { code field } } }"""
SET_INBOUND = """mutation($d: String!, $in: Boolean, $plus: Boolean, $ca: ID,
                          $enc: EncryptionMode, $spf: Boolean, $dkim: Boolean, $dmarc: Boolean) {
  setDomainInbound(domain: $d, inbound: $in, plusAddressing: $plus, catchAllMailbox: $ca,
                   encMode: $enc, requireSpfPass: $spf, requireDkimPass: $dkim,
                   requireDmarcPass: $dmarc) {
    settings { domain inbound plusAddressing catchAllMailbox encMode requireSpfPass
               requireDkimPass requireDmarcPass }
    errors { code field } } }"""


async def test_mailboxes_aliases_and_catch_all(mail: Mail) -> None:
    a, db = mail.a, mail.stack.services.db
    r = await mail.api(CREATE, {"d": "a.test", "l": "Sales", "n": "Sales team"}, key=a.key)
    box = r["data"]["createMailbox"]
    assert box["errors"] == []
    assert box["mailbox"]["address"] == "sales@a.test"
    assert box["mailbox"]["name"] == "Sales team"
    sales = box["mailbox"]["id"]

    r = await mail.api(ADD_ALIAS, {"a": "deals@a.test", "m": sales}, key=a.key)
    assert r["data"]["addAlias"]["alias"]["mailboxId"] == sales
    listing = await mail.api("{ mailboxes { address aliases { address } } }", key=a.key)
    assert listing["data"]["mailboxes"] == [
        {"address": "info@a.test", "aliases": []},
        {"address": "sales@a.test", "aliases": [{"address": "deals@a.test"}]}]
    assert (await resolve_recipient(db, "deals@a.test")).mailbox == sales
    got = await mail.api("query($id: ID!) { mailbox(id: $id) { address } }", {"id": sales},
                         key=a.key)
    assert got["data"]["mailbox"] == {"address": "sales@a.test"}

    r = await mail.api(REMOVE_ALIAS, {"a": "deals@a.test"}, key=a.key)
    assert r["data"]["removeAlias"] == {"removed": True, "errors": []}
    assert (await mail.api("{ aliases { address } }", key=a.key))["data"]["aliases"] == []

    # Catch-all: unknown addresses land in `sales`, until cleared with null.
    r = await mail.api(SET_INBOUND, {"d": "a.test", "ca": sales}, key=a.key)
    assert r["data"]["setDomainInbound"]["settings"]["catchAllMailbox"] == sales
    assert (await resolve_recipient(db, "nobody@a.test")).mailbox == sales
    r = await mail.api(SET_INBOUND, {"d": "a.test", "ca": None}, key=a.key)
    assert r["data"]["setDomainInbound"]["settings"]["catchAllMailbox"] is None
    with pytest.raises(Exception, match="no such user"):
        await resolve_recipient(db, "nobody@a.test")

    # Omitted arguments stay; null puts a require* override back to the server default.
    r = await mail.api(SET_INBOUND, {"d": "a.test", "plus": False, "spf": True}, key=a.key)
    r = await mail.api(SET_INBOUND, {"d": "a.test", "dkim": True}, key=a.key)
    assert r["data"]["setDomainInbound"]["settings"] == {
        "domain": "a.test", "inbound": True, "plusAddressing": False, "catchAllMailbox": None,
        "encMode": "STANDARD", "requireSpfPass": True, "requireDkimPass": True,
        "requireDmarcPass": None}
    r = await mail.api(SET_INBOUND, {"d": "a.test", "spf": None, "in": False}, key=a.key)
    settings = r["data"]["setDomainInbound"]["settings"]
    assert settings["requireSpfPass"] is None and settings["inbound"] is False
    shown = await mail.api('{ domainInbound(domain: "a.test") { inbound requireDkimPass } }',
                           key=a.key)
    assert shown["data"]["domainInbound"] == {"inbound": False, "requireDkimPass": True}


@pytest.mark.parametrize(("query", "variables", "code", "field"), [
    (CREATE, {"d": "a.test", "l": "info"}, "CONFLICT", ["localPart"]),
    (CREATE, {"d": "a.test", "l": "a+b"}, "VALIDATION", ["localPart"]),
    (CREATE, {"d": "a.test", "l": ".x"}, "VALIDATION", ["localPart"]),
    (CREATE, {"d": "nothere.test", "l": "x"}, "NOT_FOUND", ["domain"]),
    (ADD_ALIAS, {"a": "info@a.test", "m": "$A"}, "CONFLICT", ["address"]),
    (ADD_ALIAS, {"a": "not-an-address", "m": "$A"}, "INVALID_ADDRESS", ["address"]),
    (ADD_ALIAS, {"a": "x@nothere.test", "m": "$A"}, "NOT_FOUND", ["domain"]),
    (ADD_ALIAS, {"a": "x@a.test", "m": "mbx_missing"}, "NOT_FOUND", ["mailbox"]),
    (REMOVE_ALIAS, {"a": "never@a.test"}, "NOT_FOUND", ["address"]),
    (SET_INBOUND, {"d": "a.test", "ca": "mbx_missing"}, "NOT_FOUND", ["catchAllMailbox"]),
    (SET_INBOUND, {"d": "a.test", "in": None}, "VALIDATION", ["inbound"]),
    (SET_INBOUND, {"d": "a.test", "enc": None}, "VALIDATION", ["encMode"]),
    (SET_INBOUND, {"d": "a.test", "enc": "E2EE"}, "VALIDATION", ["encMode"]),
    (SET_INBOUND, {"d": "nothere.test", "in": True}, "NOT_FOUND", ["domain"]),
    ("mutation { setE2eePublicKey(publicKey: \"!!\") { publicKey errors { code field } } }",
     {}, "VALIDATION", ["publicKey"]),
    ("mutation { setE2eePublicKey(publicKey: \"AAAA\") { publicKey errors { code field } } }",
     {}, "VALIDATION", ["publicKey"]),
], ids=["mailbox-exists", "plus-in-name", "leading-dot", "foreign-domain", "alias-is-mailbox",
        "alias-malformed", "alias-foreign-domain", "alias-no-mailbox", "remove-unknown",
        "catch-all-unknown", "inbound-null", "enc-null", "e2ee-without-key",
        "settings-foreign-domain", "key-not-base64", "key-wrong-length"])
@pytest.mark.asyncio(loop_scope="module")
async def test_settings_mutations_give_typed_errors(shared: Mail, query: str,
                                                    variables: dict[str, Any], code: str,
                                                    field: list[str]) -> None:
    mail = shared
    variables = {k: mail.a.mailbox if v == "$A" else v for k, v in variables.items()}
    r = await mail.api(query, variables, key=mail.a.key)
    assert "errors" not in r, r
    payload = next(iter(r["data"].values()))
    assert [(e["code"], e["field"]) for e in payload["errors"]] == [(code, field)]


async def test_changing_settings_needs_admin_scope(mail: Mail) -> None:
    from inbox.tenancy import create_api_key

    _, read_key = await create_api_key(mail.stack.services.db, mail.a.tenant.org, ["read"],
                                       mail.stack.services.clock())
    r = await mail.api(CREATE, {"d": "a.test", "l": "x"}, key=read_key)
    assert r["data"]["createMailbox"]["errors"][0]["code"] == "FORBIDDEN"
    r = await mail.api(SET_INBOUND, {"d": "a.test", "in": False}, key=read_key)
    assert r["data"]["setDomainInbound"]["errors"][0]["code"] == "FORBIDDEN"
    listing = await mail.api("{ mailboxes { address } }", key=read_key)
    assert listing["data"]["mailboxes"] == [{"address": "info@a.test"}]


# ---- listing and reading ------------------------------------------------------------------

LIST = """query($m: ID!, $f: InboundFolder, $u: Boolean, $s: Boolean, $from: String,
               $q: String, $first: Int, $after: String) {
  inboundMessages(mailbox: $m, folder: $f, unread: $u, starred: $s, from: $from, search: $q,
                  first: $first, after: $after) {
    edges { cursor node { id subject } } pageInfo { hasNextPage endCursor } } }"""


async def _list(mail: Mail, org: Org, **args: Any) -> list[str]:
    names = {"folder": "f", "unread": "u", "starred": "s", "search": "q"}
    r = await mail.api(LIST, {"m": org.mailbox, **{names.get(k, k): v
                                                   for k, v in args.items()}}, key=org.key)
    assert "errors" not in r, r
    return [e["node"]["subject"] for e in r["data"]["inboundMessages"]["edges"]]


@pytest.mark.parametrize(("args", "subjects"), [
    ({}, ["five", "four", "three", "two", "one"]),
    ({"folder": "SPAM"}, ["junk"]),
    ({"folder": "TRASH"}, []),
    ({"unread": True}, ["five", "four", "two", "one"]),
    ({"unread": False}, ["three"]),
    ({"starred": True}, ["four"]),
    ({"from": "bob@"}, ["five", "two"]),
    ({"from": "BOB@OTHER.example"}, ["five", "two"]),
    ({"search": "quarterly"}, ["three"]),
    ({"search": "FOUR"}, ["four"]),
    ({"search": "zzz"}, []),
    ({"unread": True, "from": "bob@"}, ["five", "two"]),
], ids=["inbox-newest-first", "spam", "trash-empty", "unread", "read", "starred", "from",
        "from-any-case", "search-body", "search-subject", "search-none", "combined"])
@pytest.mark.asyncio(loop_scope="module")
async def test_listing_filters(listed: tuple[Mail, Org], args: dict[str, Any],
                               subjects: list[str]) -> None:
    mail, org = listed
    assert await _list(mail, org, **args) == subjects


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def listed(shared: Mail) -> tuple[Mail, Org]:
    """A mailbox of its own in the shared stack, with six messages in known states."""
    s = shared.stack.services
    box = await create_mailbox(s.db, shared.a.tenant.org, "a.test", "list", s.clock())
    a = Org(shared.a.tenant, box["id"])
    rows = {}
    for subject, sender, text in [("one", "alice@sender.example", "hi"),
                                  ("two", "bob@other.example", "hi"),
                                  ("three", "alice@sender.example", "the quarterly numbers"),
                                  ("four", "carol@sender.example", "hi"),
                                  ("five", "bob@other.example", "hi")]:
        rows[subject] = await store(shared.stack, a, message(subject, sender=sender,
                                                             text=text))
    await store(shared.stack, a, message("junk"), folder="SPAM",
                spam={"verdict": "spam", "reasons": ["spf fail"]})
    mailstore = s.mailstore
    await mailstore.set_flags(a.tenant.org, rows["three"]["id"], read=True)
    await mailstore.set_flags(a.tenant.org, rows["four"]["id"], starred=True)
    return shared, a


# More matches than a page for every filter: each filter must list newest first and paging
# with `after` must reach every match exactly once. (A filter the planner could not run over
# the list index scanned the table oldest first: the first page held the OLDEST matches and
# paging stopped after them.)
PAGED = 40


def _paged_subject(i: int) -> str:
    return f"m{i:02d} NEEDLE" if i % 3 == 2 else f"m{i:02d}"


def _paged_match(i: int, args: dict[str, Any]) -> bool:
    checks = {"search": i % 3 != 0, "from": i % 2 == 0, "unread": i % 4 != 0,
              "starred": i % 3 == 0}
    return all(checks[k] if v is not False else not checks[k] for k, v in args.items())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def paged(shared: Mail) -> tuple[Mail, Org]:
    """A mailbox of its own in the shared stack with PAGED messages: "needle" in the subject
    (i % 3 == 2) or the body (i % 3 == 1), from bob when i is even, read when i % 4 == 0,
    starred when i % 3 == 0. Matching mail in another mailbox and organization around it."""
    s = shared.stack.services
    box = await create_mailbox(s.db, shared.a.tenant.org, "a.test", "paged", s.clock())
    a = Org(shared.a.tenant, box["id"])
    await store(shared.stack, shared.b, message("b-old needle", sender="bob@other.example"))
    for i in range(PAGED):
        sender = "bob@other.example" if i % 2 == 0 else "alice@sender.example"
        text = "a haystack with a Needle in it" if i % 3 == 1 else "hay"
        row = await store(shared.stack, a, message(_paged_subject(i), sender=sender,
                                                   text=text))
        if i % 4 == 0 or i % 3 == 0:
            await s.mailstore.set_flags(a.tenant.org, row["id"], read=i % 4 == 0 or None,
                                        starred=i % 3 == 0 or None)
    await store(shared.stack, shared.a, message("info needle", sender="bob@other.example"))
    await store(shared.stack, shared.b, message("b-new needle", sender="bob@other.example"))
    return shared, a


PAGED_FILTERS = [{}, {"search": "needle"}, {"from": "bob@"}, {"unread": True},
                 {"unread": False}, {"starred": True}, {"starred": False},
                 {"search": "NEEDLE", "from": "BOB@other", "unread": True},
                 {"starred": True, "unread": True}]


@pytest.mark.parametrize("args", PAGED_FILTERS,
                         ids=["+".join(f"{k}={v}" for k, v in a.items()) or "none"
                              for a in PAGED_FILTERS])
@pytest.mark.asyncio(loop_scope="module")
async def test_filtered_paging_is_newest_first_and_complete(
        paged: tuple[Mail, Org], args: dict[str, Any]) -> None:
    mail, org = paged
    gql = {"folder": "f", "unread": "u", "starred": "s", "search": "q"}
    want = [_paged_subject(i) for i in reversed(range(PAGED)) if _paged_match(i, args)]
    # More than a page and the row the LIMIT reads ahead (first + 1), or an oldest-first
    # scan would happen to hold every match and sort them right.
    assert len(want) > 3 + 1, "each case needs more matches than a page"
    seen: list[str] = []
    after = None
    for _ in range(PAGED):
        r = await mail.api(LIST, {"m": org.mailbox, "first": 3, "after": after,
                                  **{gql.get(k, k): v for k, v in args.items()}}, key=org.key)
        assert "errors" not in r, r
        conn = r["data"]["inboundMessages"]
        page = [e["node"]["subject"] for e in conn["edges"]]
        assert page == want[len(seen):len(seen) + 3], (seen, page)
        seen += page
        if not conn["pageInfo"]["hasNextPage"]:
            break
        after = conn["pageInfo"]["endCursor"]
    assert seen == want


@pytest.mark.parametrize("args", PAGED_FILTERS,
                         ids=["+".join(f"{k}={v}" for k, v in a.items()) or "none"
                              for a in PAGED_FILTERS])
@pytest.mark.asyncio(loop_scope="module")
async def test_every_listing_is_an_index_range(shared: Mail, args: dict[str, Any]) -> None:
    """The engine's plan for every filter walks inbound_folder (and stops at the LIMIT), never
    the whole table: what keeps the pages newest first and the cost per page bounded."""
    names = {"from": "from_address"}
    sql, params = list_query("org_x", "mbx_x", first=3, after="im_0000000000aaaaaaaaaaaaaaaa",
                             **{names.get(k, k): v for k, v in args.items()})
    plan = await shared.stack.services.db.one(f"{sql} EXPLAIN", params)
    assert plan[0]["operation"] == "Iterate Index", plan
    assert plan[0]["detail"]["plan"]["index"] == "inbound_folder", plan
    assert [p["operation"] for p in plan] == ["Iterate Index", "Collector"], plan


async def test_pagination(mail: Mail) -> None:
    for i in range(5):
        await store(mail.stack, mail.a, message(f"m{i}"))
    seen, after, pages = [], None, 0
    while True:
        r = await mail.api(LIST, {"m": mail.a.mailbox, "first": 2, "after": after},
                           key=mail.a.key)
        conn = r["data"]["inboundMessages"]
        seen += [e["node"]["subject"] for e in conn["edges"]]
        pages += 1
        if not conn["pageInfo"]["hasNextPage"]:
            break
        after = conn["pageInfo"]["endCursor"]
        assert after == conn["edges"][-1]["cursor"]
    assert seen == ["m4", "m3", "m2", "m1", "m0"] and pages == 3
    for first in (0, 101):
        r = await mail.api(LIST, {"m": mail.a.mailbox, "first": first}, key=mail.a.key)
        assert r["data"] is None
        assert r["errors"][0]["extensions"]["code"] == "VALIDATION"


DETAIL = """query($id: ID!) { inboundMessage(id: $id) {
  id mailbox folder read starred receivedAt size encMode messageId inReplyTo references
  threadId from fromName to cc date subject snippet mailFrom rcptTo helo peerIp tls
  authentication { spf spfDomain dkim { result domain selector algorithm reason } dmarc
                   dmarcPolicy dmarcDisposition headerFromDomain arc header }
  spam { verdict reasons }
  headers { name value } text html raw wrappedKey e2eeAad
  attachments { partId filename contentType contentId inline size e2eeAad } } }"""
CONTENT = """query($id: ID!) { inboundMessage(id: $id) {
  attachments { partId size content } } }"""


async def test_message_detail(mail: Mail) -> None:
    pdf = b"%PDF-1.4 " + bytes(range(256)) * 4
    raw = message("Report", html="<p>Hi <b>there</b></p>", attachment=pdf,
                  to="Info <info@a.test>, x@a.test")
    row = await store(mail.stack, mail.a, raw)
    r = await mail.api(DETAIL, {"id": row["id"]}, key=mail.a.key)
    assert "errors" not in r, r
    m = r["data"]["inboundMessage"]
    assert {k: m[k] for k in ("id", "mailbox", "folder", "read", "starred", "size", "encMode",
                              "messageId", "threadId", "from", "fromName", "to", "subject",
                              "mailFrom", "rcptTo", "helo", "peerIp", "tls", "wrappedKey",
                              "e2eeAad")} == {
        "id": row["id"], "mailbox": mail.a.mailbox, "folder": "INBOX", "read": False,
        "starred": False, "size": len(raw), "encMode": "STANDARD",
        "messageId": "<Report@sender.example>", "threadId": row["id"],
        "from": "alice@sender.example", "fromName": "Alice", "to": ["info@a.test", "x@a.test"],
        "subject": "Report", "mailFrom": "bounce@sender.example", "rcptTo": ["info@a.test"],
        "helo": "mail.sender.example", "peerIp": "127.0.0.1", "tls": True, "wrappedKey": None,
        "e2eeAad": None}
    assert m["snippet"] == "Hi there, this is a test."
    assert m["text"] == "Hi there,\nthis is a test.\n"
    assert m["html"] == "<p>Hi <b>there</b></p>\n"
    assert ("Subject", "Report") in [(h["name"], h["value"]) for h in m["headers"]]
    assert base64.b64decode(m["raw"]) == raw
    assert m["authentication"]["dkim"] == [{"result": "pass", "domain": "sender.example",
                                            "selector": "s1", "algorithm": "rsa-sha256",
                                            "reason": ""}]
    assert m["authentication"]["header"].startswith("Authentication-Results: mx.inbox.test")
    assert (m["authentication"]["spf"], m["authentication"]["dmarc"]) == ("pass", "pass")
    assert m["spam"] == {"verdict": "ham", "reasons": []}
    assert m["attachments"] == [{"partId": "a1", "filename": "report.pdf",
                                 "contentType": "application/pdf", "contentId": None,
                                 "inline": False, "size": len(pdf), "e2eeAad": None}]

    r = await mail.api(CONTENT, {"id": row["id"]}, key=mail.a.key)
    assert base64.b64decode(r["data"]["inboundMessage"]["attachments"][0]["content"]) == pdf

    # The content is fetched only when asked for: with its blob gone, the listing of
    # attachments still works and only a query for `content` fails.
    await mail.stack.services.blobs.delete(row["attachments"][0]["key"])
    r = await mail.api(DETAIL, {"id": row["id"]}, key=mail.a.key)
    assert "errors" not in r and r["data"]["inboundMessage"]["attachments"][0]["size"] == len(pdf)
    r = await mail.api(CONTENT, {"id": row["id"]}, key=mail.a.key)
    assert r["errors"] and r["data"]["inboundMessage"] is None


async def test_end_to_end_encrypted_mail(mail: Mail) -> None:
    a = mail.a
    private, public = generate_keypair()
    r = await mail.api('mutation($k: String!) { setE2eePublicKey(publicKey: $k) '
                       '{ publicKey errors { code } } }', {"k": public}, key=a.key)
    assert r["data"]["setE2eePublicKey"] == {"publicKey": public, "errors": []}
    assert (await mail.api("{ e2eePublicKey }", key=a.key))["data"]["e2eePublicKey"] == public
    r = await mail.api(SET_INBOUND, {"d": "a.test", "enc": "E2EE"}, key=a.key)
    assert r["data"]["setDomainInbound"]["settings"]["encMode"] == "E2EE"

    pdf = b"%PDF-1.4 secret plans"
    raw = message("Secret", html="<p>secret</p>", attachment=pdf)
    row = await store(mail.stack, a, raw, enc_mode="e2ee", public_key=public)
    r = await mail.api(DETAIL, {"id": row["id"]}, key=a.key)
    assert "errors" not in r, r
    m = r["data"]["inboundMessage"]
    assert m["encMode"] == "E2EE"
    assert [m[k] for k in ("subject", "snippet", "text", "html", "headers")] == [None] * 5
    ciphertext = base64.b64decode(m["raw"])
    assert b"Secret" not in ciphertext and b"secret" not in ciphertext
    wrapped = base64.b64decode(m["wrappedKey"])
    assert decrypt_message(private, wrapped, ciphertext, aad=m["e2eeAad"].encode()) == raw
    att = m["attachments"][0]
    assert (att["filename"], att["contentType"], att["size"]) == (None, None, len(pdf))

    r = await mail.api(CONTENT, {"id": row["id"]}, key=a.key)
    sealed = base64.b64decode(r["data"]["inboundMessage"]["attachments"][0]["content"])
    assert pdf not in sealed
    assert decrypt_message(private, wrapped, sealed, aad=att["e2eeAad"].encode()) == pdf
    # The subject is not searchable: the server never had it.
    assert await _list(mail, a, search="secret") == []
    assert await _list(mail, a) == [None]


# ---- flags, folders, deleting ------------------------------------------------------------

UPDATE = """mutation($id: ID!, $r: Boolean, $s: Boolean) {
  updateInboundMessage(id: $id, read: $r, starred: $s) {
    message { read starred folder } errors { code field } } }"""
MOVE = """mutation($id: ID!, $f: InboundFolder!) {
  moveInboundMessage(id: $id, folder: $f) { message { folder } errors { code field } } }"""
RESTORE = """mutation($id: ID!) {
  restoreInboundMessage(id: $id) { message { folder } errors { code field } } }"""
DELETE = """mutation($id: ID!) {
  deleteInboundMessage(id: $id) { deleted errors { code field } } }"""


async def test_flags_move_restore(mail: Mail) -> None:
    a = mail.a
    mid = (await store(mail.stack, a, message("flagged")))["id"]
    spam_id = (await store(mail.stack, a, message("junk"), folder="SPAM"))["id"]

    r = await mail.api(UPDATE, {"id": mid, "r": True}, key=a.key)
    assert r["data"]["updateInboundMessage"]["message"] == {"read": True, "starred": False,
                                                            "folder": "INBOX"}
    r = await mail.api(UPDATE, {"id": mid, "s": True}, key=a.key)
    assert r["data"]["updateInboundMessage"]["message"] == {"read": True, "starred": True,
                                                            "folder": "INBOX"}
    r = await mail.api(UPDATE, {"id": mid, "r": False, "s": False}, key=a.key)
    assert r["data"]["updateInboundMessage"]["message"]["read"] is False
    r = await mail.api(UPDATE, {"id": mid}, key=a.key)
    assert r["data"]["updateInboundMessage"]["errors"][0]["code"] == "VALIDATION"

    for message_id in (mid, spam_id):
        r = await mail.api(MOVE, {"id": message_id, "f": "TRASH"}, key=a.key)
        assert r["data"]["moveInboundMessage"]["message"] == {"folder": "TRASH"}
    assert await _list(mail, a, folder="TRASH") == ["junk", "flagged"]
    assert await _list(mail, a) == []
    for message_id, home in ((mid, "INBOX"), (spam_id, "SPAM")):
        r = await mail.api(RESTORE, {"id": message_id}, key=a.key)
        assert r["data"]["restoreInboundMessage"]["message"] == {"folder": home}
    r = await mail.api(RESTORE, {"id": mid}, key=a.key)
    assert r["data"]["restoreInboundMessage"]["errors"] == [{"code": "VALIDATION",
                                                             "field": ["id"]}]
    r = await mail.api(MOVE, {"id": spam_id, "f": "INBOX"}, key=a.key)
    assert await _list(mail, a) == ["junk", "flagged"]


async def test_delete_forever_removes_the_blobs(mail: Mail) -> None:
    from inbox.tenancy import create_api_key

    a, s = mail.a, mail.stack.services
    row = await store(mail.stack, a, message("doomed", attachment=b"attached bytes"))
    keys = [row["blob_key"], row["attachments"][0]["key"]]
    tenant_key = await s.org_keys.storage_key(a.tenant.org)
    assert [await s.blobs.exists(k, tenant_key=tenant_key) for k in keys] == [True, True]

    _, read_key = await create_api_key(s.db, a.tenant.org, ["read"], s.clock())
    r = await mail.api(DELETE, {"id": row["id"]}, key=read_key)
    assert r["data"]["deleteInboundMessage"] == {"deleted": False,
                                                 "errors": [{"code": "FORBIDDEN",
                                                             "field": None}]}
    r = await mail.api(DELETE, {"id": row["id"]}, key=a.key)
    assert r["data"]["deleteInboundMessage"] == {"deleted": True, "errors": []}
    assert [await s.blobs.exists(k) for k in keys] == [False, False]
    got = await mail.api(DETAIL, {"id": row["id"]}, key=a.key)
    assert got["data"]["inboundMessage"] is None
    r = await mail.api(DELETE, {"id": row["id"]}, key=a.key)
    assert r["data"]["deleteInboundMessage"]["errors"][0]["code"] == "NOT_FOUND"


# ---- threads ------------------------------------------------------------------------------

THREAD = """query($id: ID!) { inboundMessage(id: $id) {
  threadId thread { id messages { subject } } } }"""


async def test_threads(mail: Mail) -> None:
    a = mail.a
    first = await store(mail.stack, a, message("Plan", message_id="<plan@x>"))
    await store(mail.stack, a, message("Re: Plan", message_id="<re1@y>",
                                       in_reply_to="<plan@x>", references="<plan@x>"))
    # Only References (no In-Reply-To), naming a message we never saw and then ours.
    third = await store(mail.stack, a, message("Re: Re: Plan", message_id="<re2@x>",
                                               references="<plan@x> <lost@z>"))
    other = await store(mail.stack, a, message("Lunch?", message_id="<lunch@x>"))
    # The same Message-ID in another organization's mailbox does not join A's thread.
    await store(mail.stack, mail.b, message("Re: Plan", message_id="<b@y>",
                                            in_reply_to="<plan@x>"))

    r = await mail.api(THREAD, {"id": third["id"]}, key=a.key)
    t = r["data"]["inboundMessage"]
    assert t["threadId"] == first["id"] == t["thread"]["id"]
    assert [m["subject"] for m in t["thread"]["messages"]] == ["Plan", "Re: Plan",
                                                               "Re: Re: Plan"]
    r = await mail.api(THREAD, {"id": other["id"]}, key=a.key)
    assert [m["subject"] for m in r["data"]["inboundMessage"]["thread"]["messages"]] == [
        "Lunch?"]
    by_id = await mail.api("query($id: ID!) { inboundThread(id: $id) { messages { subject } } }",
                           {"id": first["id"]}, key=a.key)
    assert len(by_id["data"]["inboundThread"]["messages"]) == 3
    across = await mail.api("query($id: ID!) { inboundThread(id: $id) { id } }",
                            {"id": first["id"]}, key=mail.b.key)
    assert across["data"]["inboundThread"] is None


# ---- subscription over a real websocket -------------------------------------------------

SUBSCRIBE = """subscription($m: ID!) { inboundMessageReceived(mailbox: $m) {
  id mailbox subject from } }"""


@contextlib.asynccontextmanager
async def ws_session(stack: Stack, *, header_key: str | None = None,
                     payload_key: str | None = None) -> AsyncIterator[Any]:
    url = stack.base_url.replace("http://", "ws://") + "/graphql"
    headers = {"Authorization": f"Bearer {header_key}"} if header_key else {}
    async with connect(url, subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                       additional_headers=headers, open_timeout=5) as ws:
        init: dict[str, Any] = {"type": "connection_init"}
        if payload_key:
            init["payload"] = {"Authorization": f"Bearer {payload_key}"}
        await ws.send(json.dumps(init))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "connection_ack"
        yield ws


async def _next(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))


async def _subscribed(stack: Stack, topic: str, count: int = 1) -> None:
    for _ in range(500):
        if stack.services.pubsub.subscribers(topic) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no subscriber on {topic}")


@pytest.mark.parametrize("auth", ["header", "connection_init"])
async def test_subscription_receives_stored_mail(mail: Mail, auth: str) -> None:
    a, stack = mail.a, mail.stack
    keys = {"header_key": a.key} if auth == "header" else {"payload_key": a.key}
    topic = inbound_topic(a.tenant.org, a.mailbox)
    async with ws_session(stack, **keys) as ws:
        await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                  "payload": {"query": SUBSCRIBE,
                                              "variables": {"m": a.mailbox}}}))
        await _subscribed(stack, topic)
        # As the port-25 side does: store, then publish each stored row on its topic.
        for subject in ("first", "second"):
            row = await store(stack, a, message(subject))
            assert stack.services.pubsub.publish(topic, row) == 1
            event = await _next(ws)
            assert event["type"] == "next" and event["id"] == "1"
            assert event["payload"]["data"]["inboundMessageReceived"] == {
                "id": row["id"], "mailbox": a.mailbox, "subject": subject,
                "from": "alice@sender.example"}
        await ws.send(json.dumps({"id": "1", "type": "complete"}))
        for _ in range(500):
            if not stack.services.pubsub.subscribers(topic):
                break
            await asyncio.sleep(0.01)
        assert stack.services.pubsub.subscribers(topic) == 0


@pytest.mark.parametrize(("who", "code"), [("other-org", "NOT_FOUND"),
                                           ("anonymous", "UNAUTHENTICATED")])
async def test_subscription_refuses_foreign_mailbox(mail: Mail, who: str, code: str) -> None:
    stack = mail.stack
    key = mail.b.key if who == "other-org" else None
    async with ws_session(stack, payload_key=key) as ws:
        await ws.send(json.dumps({"id": "7", "type": "subscribe",
                                  "payload": {"query": SUBSCRIBE,
                                              "variables": {"m": mail.a.mailbox}}}))
        event = await _next(ws)
        assert event["type"] in ("error", "next"), event
        errors = event["payload"] if event["type"] == "error" else event["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == code
        assert event["type"] == "error" or event["payload"].get("data") is None
    assert stack.services.pubsub.subscribers(inbound_topic(mail.a.tenant.org,
                                                           mail.a.mailbox)) == 0


# ---- the wall between organizations -----------------------------------------------------

ACROSS = [
    ("read", DETAIL, "inboundMessage", None),
    ("thread", THREAD, "inboundMessage", None),
    ("flag", UPDATE.replace("$r: Boolean", "$r: Boolean = true"), "updateInboundMessage",
     "NOT_FOUND"),
    ("move", MOVE.replace("$f: InboundFolder!", "$f: InboundFolder! = TRASH"),
     "moveInboundMessage", "NOT_FOUND"),
    ("restore", RESTORE, "restoreInboundMessage", "NOT_FOUND"),
    ("delete", DELETE, "deleteInboundMessage", "NOT_FOUND"),
    ("mailbox", "query($m: ID!) { mailbox(id: $m) { id } }", "mailbox", None),
    ("list", LIST, "inboundMessages", "NOT_FOUND"),
    ("alias-to", ADD_ALIAS.replace("$a: String!", "$a: String! = \"x@b.test\""), "addAlias",
     "NOT_FOUND"),
    ("catch-all-to", SET_INBOUND.replace("$d: String!", "$d: String! = \"b.test\""),
     "setDomainInbound", "NOT_FOUND"),
    ("settings-of", SET_INBOUND.replace("$d: String!", "$d: String! = \"a.test\"")
     .replace("$in: Boolean", "$in: Boolean = false"), "setDomainInbound", "NOT_FOUND"),
    ("inbound-of", '{ domainInbound(domain: "a.test") { inbound } }',
     "domainInbound", None),
]


@pytest.mark.parametrize(("op", "query", "field", "code"), ACROSS, ids=[c[0] for c in ACROSS])
@pytest.mark.asyncio(loop_scope="module")
async def test_other_organization_gets_nothing(shared: Mail, op: str, query: str, field: str,
                                               code: str | None) -> None:
    mail = shared
    a, b, s = mail.a, mail.b, mail.stack.services
    row = await store(mail.stack, a, message("private", attachment=b"secret"))
    if op == "restore":
        await s.mailstore.move(a.tenant.org, row["id"], "TRASH")
    variables = {"id": row["id"], "m": a.mailbox, "ca": a.mailbox}
    used = {k: v for k, v in variables.items() if f"${k}:" in query}
    r = await mail.api(query, used, key=b.key)
    assert "private" not in json.dumps(r) and a.mailbox not in json.dumps(r.get("data"))
    if code is None:
        assert r["data"][field] is None, r
    elif field == "inboundMessages":
        assert r["data"] is None and r["errors"][0]["extensions"]["code"] == code
    else:
        assert [e["code"] for e in r["data"][field]["errors"]] == [code], r
    # A's message is exactly as it was, blobs included.
    after = await s.mailstore.get(a.tenant.org, row["id"])
    assert (after["read"], after["starred"]) == (False, False)
    assert after["folder"] == ("TRASH" if op == "restore" else "INBOX")
    assert await s.blobs.exists(row["attachments"][0]["key"])
    settings = await mail.api('{ domainInbound(domain: "a.test") { inbound catchAllMailbox } }',
                              key=a.key)
    assert settings["data"]["domainInbound"] == {"inbound": True, "catchAllMailbox": None}


async def test_e2ee_key_is_per_organization(mail: Mail) -> None:
    _, public = generate_keypair()
    await set_e2ee_public_key(mail.stack.services.db, mail.a.tenant.org, public)
    r = await mail.api("{ e2eePublicKey }", key=mail.b.key)
    assert r["data"]["e2eePublicKey"] is None
    r = await mail.api(SET_INBOUND, {"d": "b.test", "enc": "E2EE"}, key=mail.b.key)
    assert r["data"]["setDomainInbound"]["errors"][0]["field"] == ["encMode"]
