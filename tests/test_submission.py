"""SMTP submission (587 STARTTLS, 465 implicit TLS) over real peers: swaks, smtplib (in a
thread) and aiosmtplib → our submission server → submit() → the real embedded database →
worker → loopback DNS → SMTP sink; credentials through GraphQL over HTTP and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import email
import smtplib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email import policy
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest

from inbox.app import running_submission
from inbox.tenancy import set_domain_quotas
from inbox.tenancy.smtpcreds import create_smtp_credential, revoke_smtp_credential
from tests.conftest import (
    Stack,
    Tenant,
    make_settings,
    make_tenant,
    route_to_sink,
    run_stack,
    wait_status,
)
from tests.support.dnsserver import DnsServer
from tests.support.procs import free_port, inbox_env, run_cli, run_cli_json
from tests.test_send_e2e import _dnsfunc_via

HOSTNAME = "submit.inbox.test"
AUTH_FAILURE_LIMIT = 3


@dataclass
class Sub:
    stack: Stack
    port: int
    tls_port: int
    tenant: Tenant
    user: str
    password: str


@contextlib.asynccontextmanager
async def submission_stack(tmp_path: Path, dns: DnsServer, sink_port: int, **settings: Any
                           ) -> AsyncIterator[Sub]:
    values: dict[str, Any] = {
        "SMTP_OUTBOUND_PORT": sink_port, "INBOX_DB_SYNC": "false", "SERVER_HOSTNAME": HOSTNAME,
        "SMTP_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE": AUTH_FAILURE_LIMIT}
    values.update(settings)
    config = make_settings(tmp_path, dns, **values)
    async with run_stack(config, dns) as stack, \
            running_submission(stack.services, port=0, tls_port=free_port()) as listeners:
        tenant = await make_tenant(stack.services, dns)
        row, password = await create_smtp_credential(stack.services.db, tenant.org,
                                                     stack.services.clock(), "tests")
        route_to_sink(dns, "dest.test")
        yield Sub(stack, listeners.port, listeners.tls_port, tenant, row["id"], password)


@pytest.fixture
async def sub(tmp_path: Path, dns_server: DnsServer, smtp_sink: Any) -> AsyncIterator[Sub]:
    async with submission_stack(tmp_path, dns_server, smtp_sink.port) as s:
        yield s


def mime(sender: str, *, to: str = "alice@dest.test", subject: str = "Hello",
         extra: str = "", body: str = "Hello from SMTP.\r\n") -> bytes:
    return (f"From: Acme <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}").encode()


def client(port: int, *, implicit: bool = False) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=implicit, start_tls=False,
                           local_hostname="client.test",
                           validate_certs=False, timeout=10)


@contextlib.asynccontextmanager
async def authed(s: Sub, *, user: str | None = None, password: str | None = None
                 ) -> AsyncIterator[aiosmtplib.SMTP]:
    smtp = client(s.port)
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.starttls()
        await smtp.ehlo()
        await smtp.auth_plain(user or s.user, password or s.password)
        yield smtp
    finally:
        smtp.close()


async def transaction(smtp: aiosmtplib.SMTP, mail: str, rcpts: list[str], data: bytes
                      ) -> list[str]:
    """MAIL, RCPT..., DATA with raw arguments; the replies as 'code text' (never raises)."""
    replies = []
    r = await smtp.execute_command(b"MAIL", f"FROM:{mail}".encode())
    replies.append(f"{r.code} {r.message}")
    if r.code != 250:
        return replies
    for rcpt in rcpts:
        r = await smtp.execute_command(b"RCPT", f"TO:{rcpt}".encode())
        replies.append(f"{r.code} {r.message}")
    if replies[0].startswith("250") and any(x.startswith("250") for x in replies[1:]):
        try:
            r = await smtp.data(data)
            replies.append(f"{r.code} {r.message}")
        except aiosmtplib.SMTPResponseException as exc:
            replies.append(f"{exc.code} {exc.message}")
    else:
        await smtp.rset()
    return replies


async def db_row(s: Sub, table: str, **where: Any) -> list[dict[str, Any]]:
    cond = " AND ".join(f"{k} = ${k}" for k in where)
    return await s.stack.services.db.one(f"SELECT * FROM {table} WHERE {cond}", where) or []


def queued_id(reply: str) -> str:
    assert reply.startswith("250 2.0.0 OK queued as "), reply
    return reply.rsplit(" ", 1)[1]


async def run_swaks(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "swaks", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode(errors="replace")


# --- delivered end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["PLAIN", "LOGIN"])
async def test_swaks_starttls_auth_delivers_signed_message(sub: Sub, smtp_sink: Any,
                                                           auth: str) -> None:
    out = await run_swaks(
        "--server", f"127.0.0.1:{sub.port}", "--tls", "--auth", auth, "--auth-user", sub.user,
        "--auth-password", sub.password, "--from", f"hello@{sub.tenant.domain}", "--to",
        "alice@dest.test,secret@dest.test", "--helo", "client.test",
        "--header", f"From: Acme <hello@{sub.tenant.domain}>", "--header", "To: alice@dest.test",
        "--header", "Subject: via swaks", "--body", "line one\n.\nline three")
    assert "235 2.7.0 Authentication successful" in out, out
    msg_id = queued_id(next(line.split("<~ ", 1)[1].strip() for line in out.splitlines()
                            if "OK queued as" in line))
    msg = await wait_status(sub.stack.api, sub.tenant.key, msg_id, {"DELIVERED"})
    assert sorted(r["address"] for r in msg["recipients"]) == ["alice@dest.test",
                                                               "secret@dest.test"]
    assert msg["subject"] == "via swaks"
    await smtp_sink.wait_for(1)
    received = smtp_sink.messages[0]
    assert received.mail_from == f"hello@{sub.tenant.domain}"
    assert sorted(received.rcpt_tos) == ["alice@dest.test", "secret@dest.test"]
    parsed = email.message_from_bytes(received.data, policy=policy.default)
    assert parsed["Message-ID"] and parsed["Date"]
    assert "with ESMTPSA" in parsed["Received"]
    assert b"\r\n\r\nline one\r\n.\r\nline three\r\n" in received.data
    verifier = dkim.DKIM(received.data)
    assert len(parsed.get_all("DKIM-Signature") or []) == 2
    assert verifier.verify(idx=0, dnsfunc=_dnsfunc_via(sub.stack))
    assert verifier.verify(idx=1, dnsfunc=_dnsfunc_via(sub.stack))


async def test_smtplib_in_a_thread_bcc_from_the_envelope(sub: Sub, smtp_sink: Any) -> None:
    data = mime(f"hello@{sub.tenant.domain}", extra="Cc: carol@dest.test\r\n"
                "Bcc: hidden@dest.test\r\n")

    def send() -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", sub.port, timeout=10) as smtp:
            smtp.starttls(context=ssl._create_unverified_context())  # noqa: S323
            smtp.login(sub.user, sub.password)
            return smtp.sendmail(f"hello@{sub.tenant.domain}",
                                 ["alice@dest.test", "carol@dest.test", "hidden@dest.test"],
                                 data)

    assert await asyncio.to_thread(send) == {}
    [row] = await db_row(sub, "message", org=sub.tenant.org)
    assert row["source"] == "smtp" and row["to"] == ["alice@dest.test"]
    assert row["cc"] == ["carol@dest.test"] and row["from"] == f"Acme <hello@{sub.tenant.domain}>"
    await wait_status(sub.stack.api, sub.tenant.key, row["id"], {"DELIVERED"})
    await smtp_sink.wait_for(1)
    received = smtp_sink.messages[0]
    assert sorted(received.rcpt_tos) == ["alice@dest.test", "carol@dest.test",
                                         "hidden@dest.test"]
    assert b"Bcc:" not in received.data and b"hidden@dest.test" not in received.data


async def test_aiosmtplib_implicit_tls_port_and_login(sub: Sub, smtp_sink: Any) -> None:
    smtp = client(sub.tls_port, implicit=True)
    await smtp.connect()
    try:
        assert smtp.supports_extension("auth") is False  # no EHLO yet
        await smtp.ehlo()
        assert "starttls" not in smtp.esmtp_extensions and smtp.supports_extension("requiretls")
        await smtp.auth_login(sub.user, sub.password)
        errors, reply = await smtp.sendmail(f"hello@{sub.tenant.domain}", ["alice@dest.test"],
                                            mime(f"hello@{sub.tenant.domain}"))
    finally:
        smtp.close()
    assert errors == {}
    msg_id = queued_id(f"250 {reply}")
    await wait_status(sub.stack.api, sub.tenant.key, msg_id, {"DELIVERED"})


# --- authentication ----------------------------------------------------------------------------

async def test_no_auth_before_tls_and_no_mail_without_auth(sub: Sub) -> None:
    smtp = client(sub.port)
    await smtp.connect()
    try:
        await smtp.ehlo()
        assert "starttls" in smtp.esmtp_extensions and "auth" not in smtp.esmtp_extensions
        r = await smtp.execute_command(b"AUTH", b"PLAIN", b"AHgAeQ==")
        assert (r.code, r.message[:6]) == (538, "5.7.11")
        r = await smtp.execute_command(b"MAIL", f"FROM:<a@{sub.tenant.domain}>".encode())
        assert (r.code, r.message[:5]) == (530, "5.7.0")
        await smtp.starttls()
        await smtp.ehlo()
        assert smtp.esmtp_extensions["auth"].split() == ["PLAIN", "LOGIN"]
        r = await smtp.execute_command(b"MAIL", f"FROM:<a@{sub.tenant.domain}>".encode())
        assert (r.code, r.message) == (530, "5.7.0 Authentication required")
    finally:
        smtp.close()


async def test_wrong_password_then_rate_limited(sub: Sub) -> None:
    for _ in range(AUTH_FAILURE_LIMIT):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            async with authed(sub, password="wrong-password"):
                pass
        assert info.value.code == 535 and info.value.message.startswith("5.7.8")
    with pytest.raises(aiosmtplib.SMTPResponseException) as limited:
        async with authed(sub, password="wrong-password"):
            pass
    assert (limited.value.code, limited.value.message[:5]) == (454, "4.7.0")
    # Blocked for the window, even with the right password.
    with pytest.raises(aiosmtplib.SMTPResponseException) as blocked:
        async with authed(sub):
            pass
    assert blocked.value.code == 454


async def test_revoked_credential_refused(sub: Sub) -> None:
    async with authed(sub) as smtp:  # works before
        assert (await smtp.noop()).code == 250
    await revoke_smtp_credential(sub.stack.services.db, sub.tenant.org, sub.user,
                                 sub.stack.services.clock())
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
        async with authed(sub):
            pass
    assert info.value.code == 535


# --- who may send as whom ----------------------------------------------------------------------

async def test_foreign_domains_cross_tenant_and_unverified(sub: Sub) -> None:
    other = await make_tenant(sub.stack.services, sub.stack.dns, "other.test", name="Other")
    await make_tenant(sub.stack.services, sub.stack.dns, "pending.test", verified=False)
    own = f"hello@{sub.tenant.domain}"
    cases = [
        ("mail-from-foreign", "<ceo@nowhere.test>", mime(own), "550 5.7.1"),
        ("mail-from-other-tenant", f"<ceo@{other.domain}>", mime(own), "550 5.7.1"),
        ("header-from-other-tenant", f"<{own}>", mime(f"ceo@{other.domain}"), "550 5.7.1"),
        ("header-from-unverified", f"<{own}>", mime("x@pending.test"), "550 5.7.1"),
        ("null-sender", "<>", mime(own), "550 5.7.1"),
        ("mail-from-literal", "<a@[127.0.0.1]>", mime(own), "553 5.1.7"),
        ("no-from-header", f"<{own}>", b"To: a@dest.test\r\nSubject: x\r\n\r\nbody\r\n",
         "550 5.6.0"),
        ("two-from-mailboxes", f"<{own}>", mime(f"{own}, b@{sub.tenant.domain}"), "550 5.6.0"),
    ]
    async with authed(sub) as smtp:
        for name, mail_from, data, expected in cases:
            replies = await transaction(smtp, mail_from, ["<alice@dest.test>"], data)
            assert replies[-1].startswith(expected), (name, replies)
    assert await db_row(sub, "message", org=sub.tenant.org) == []
    assert await db_row(sub, "message", org=other.org) == []


# --- submit(): quotas, idempotency, DSN, REQUIRETLS ---------------------------------------------

async def test_quotas(sub: Sub) -> None:
    await set_domain_quotas(sub.stack.services.db, sub.tenant.org, sub.tenant.domain, {
        "quota_hourly_send_limit": 2, "quota_max_recipients_per_message": 2})
    sub.stack.services.tenant_cache.evict(sub.tenant.org)
    own = f"<hello@{sub.tenant.domain}>"
    async with authed(sub) as smtp:
        replies = await transaction(smtp, own, ["<a@dest.test>", "<b@dest.test>",
                                                "<c@dest.test>"], mime(own[1:-1]))
        assert replies[3] == ("452 4.5.3 Too many recipients (limit "
                              "max_recipients_per_message: 2)")
        queued_id(replies[-1])  # the two accepted recipients count against the hour
        replies = await transaction(smtp, own, ["<d@dest.test>"], mime(own[1:-1]))
        assert replies[-1].startswith("452 4.7.0 hourly_send_limit of sender.test reached"), \
            replies
        assert "(limit hourly_send_limit)" in replies[-1]
    assert len(await db_row(sub, "message", org=sub.tenant.org)) == 1


async def test_idempotency_key_header(sub: Sub) -> None:
    own = f"hello@{sub.tenant.domain}"
    data = mime(own, extra="Idempotency-Key: order-42\r\n")
    async with authed(sub) as smtp:
        first = queued_id((await transaction(smtp, f"<{own}>", ["<a@dest.test>"], data))[-1])
        again = queued_id((await transaction(smtp, f"<{own}>", ["<a@dest.test>"], data))[-1])
        changed = await transaction(smtp, f"<{own}>", ["<a@dest.test>"],
                                    mime(own, extra="Idempotency-Key: order-42\r\n",
                                         subject="Other"))
    assert first == again and changed[-1].startswith("550 ")
    [row] = await db_row(sub, "message", org=sub.tenant.org)
    assert row["idempotency_key"] == "order-42"
    raw = await sub.stack.services.db.one(
        "SELECT VALUE raw FROM ONLY type::thing('message_raw', $id)", {"id": first})
    assert b"Idempotency-Key" not in raw


async def test_dsn_parameters_and_requiretls_are_stored(sub: Sub) -> None:
    own = f"hello@{sub.tenant.domain}"
    async with authed(sub) as smtp:
        r = await smtp.execute_command(b"MAIL", f"FROM:<{own}>".encode(), b"RET=HDRS",
                                       b"ENVID=QQ+2B314", b"REQUIRETLS", b"BODY=8BITMIME")
        assert r.code == 250, r
        for rcpt, params in (("a@dest.test", [b"NOTIFY=SUCCESS,FAILURE",
                                              b"ORCPT=rfc822;a@dest.test"]),
                             ("b@dest.test", [b"NOTIFY=NEVER"]), ("c@dest.test", [])):
            r = await smtp.execute_command(b"RCPT", f"TO:<{rcpt}>".encode(), *params)
            assert r.code == 250, r
        msg_id = queued_id(f"250 {(await smtp.data(mime(own))).message}")
    [message] = await db_row(sub, "message", id=_thing("message", msg_id))
    assert message["require_tls"] is True
    assert (message["dsn_ret"], message["dsn_envid"]) == ("HDRS", "QQ+2B314")
    [job] = await db_row(sub, "job", message=msg_id)
    assert (job["require_tls"], job["dsn_ret"], job["dsn_envid"]) == (True, "HDRS", "QQ+2B314")
    rcpts = {r["address"]: (r.get("dsn_notify"), r.get("dsn_orcpt"))
             for r in await db_row(sub, "recipient", message=msg_id)}
    assert rcpts == {"a@dest.test": ("SUCCESS,FAILURE", "rfc822;a@dest.test"),
                     "b@dest.test": ("NEVER", None), "c@dest.test": (None, None)}


def _thing(table: str, key: str) -> Any:
    from surrealdb import RecordID

    return RecordID(table, key)


BAD_PARAMS = [
    ("ret-value", b"MAIL", [b"RET=ALL"], "501 5.5.4"),
    ("envid-not-xtext", b"MAIL", [b"ENVID=a+zz"], "501 5.5.4"),
    ("envid-too-long", b"MAIL", [b"ENVID=" + b"x" * 101], "501 5.5.4"),
    ("requiretls-value", b"MAIL", [b"REQUIRETLS=yes"], "501 5.5.4"),
    ("unknown-mail", b"MAIL", [b"XFOO=1"], "555 5.5.4"),
    ("notify-never-and", b"RCPT", [b"NOTIFY=NEVER,SUCCESS"], "501 5.5.4"),
    ("notify-unknown", b"RCPT", [b"NOTIFY=SOMETIMES"], "501 5.5.4"),
    ("orcpt-no-type", b"RCPT", [b"ORCPT=a@dest.test"], "501 5.5.4"),
    ("unknown-rcpt", b"RCPT", [b"XFOO=1"], "555 5.5.4"),
    ("bad-rcpt", b"RCPT", [], "553 5.1.3"),
]


@pytest.mark.parametrize("verb, params, expected", [c[1:] for c in BAD_PARAMS],
                         ids=[c[0] for c in BAD_PARAMS])
async def test_bad_parameters(sub: Sub, verb: bytes, params: list[bytes], expected: str
                              ) -> None:
    own = f"<hello@{sub.tenant.domain}>".encode()
    async with authed(sub) as smtp:
        if verb == b"MAIL":
            r = await smtp.execute_command(b"MAIL", b"FROM:" + own, *params)
        else:
            assert (await smtp.execute_command(b"MAIL", b"FROM:" + own)).code == 250
            target = b"<a@dest.test>" if params else b"<a@[127.0.0.1]>"  # no literals
            r = await smtp.execute_command(b"RCPT", b"TO:" + target, *params)
    assert f"{r.code} {r.message}".startswith(expected), r


async def test_graphql_require_tls_and_credentials(sub: Sub) -> None:
    api, key = sub.stack.api, sub.tenant.key
    r = await api("""mutation($from: String!) { sendEmail(from: $from, to: ["a@dest.test"],
        subject: "s", textBody: "t", requireTls: true) { message { id } errors { code } } }""",
                  {"from": f"hello@{sub.tenant.domain}"}, key=key)
    msg_id = r["data"]["sendEmail"]["message"]["id"]
    [row] = await db_row(sub, "message", id=_thing("message", msg_id))
    assert row["require_tls"] is True
    created = (await api('mutation { createSmtpCredential(name: "app") { credential { id '
                         'username name revokedAt } password errors { code } } }', key=key)
               )["data"]["createSmtpCredential"]
    cred = created["credential"]
    assert cred["username"] == cred["id"] and cred["revokedAt"] is None
    async with authed(sub, user=cred["username"], password=created["password"]) as smtp:
        assert (await smtp.noop()).code == 250
    listed = (await api("{ smtpCredentials { id name } }", key=key))["data"]["smtpCredentials"]
    assert {c["id"] for c in listed} == {sub.user, cred["id"]}
    assert "password" not in str(listed) and "scrypt" not in str(listed)
    other = await make_tenant(sub.stack.services, sub.stack.dns, "other.test", name="Other")
    revoke = 'mutation($id: ID!) { revokeSmtpCredential(id: $id) { credential { revokedAt } ' \
             'errors { code } } }'
    r = await api(revoke, {"id": cred["id"]}, key=other.key)  # another tenant's id
    assert r["data"]["revokeSmtpCredential"]["errors"] == [{"code": "NOT_FOUND"}]
    assert (await api("{ smtpCredentials { id } }", key=other.key))["data"][
        "smtpCredentials"] == []
    r = await api(revoke, {"id": cred["id"]}, key=key)
    assert r["data"]["revokeSmtpCredential"]["credential"]["revokedAt"]
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        async with authed(sub, user=cred["username"], password=created["password"]):
            pass


def test_cli_creates_and_revokes_credentials(tmp_path: Path) -> None:
    env = inbox_env(tmp_path / "data", INBOX_MASTER_KEY="a" * 43 + "=")
    org = run_cli_json(env, "org", "create", "Acme", "--json")["id"]
    cred = run_cli_json(env, "smtp-credential", "create", org, "--name", "app", "--json")
    assert set(cred) == {"id", "username", "password"} and cred["id"].startswith("smtp_")
    revoked = run_cli_json(env, "smtp-credential", "revoke", org, cred["id"], "--json")
    assert revoked["id"] == cred["id"] and revoked["revoked_at"]
    missing = run_cli(env, "smtp-credential", "revoke", "org_nope", cred["id"])
    assert missing.returncode == 1 and "not found" in missing.stderr
