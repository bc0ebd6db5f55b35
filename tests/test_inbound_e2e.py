"""Inbound end to end over real peers: SMTP clients (aiosmtplib, swaks, our own outbound spine)
→ our port-25 server → SPF/DKIM/DMARC against the loopback DNS server → encrypted blobs + the
real embedded database → GraphQL over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from inbox.app import running_transfer, running_workers
from inbox.tenancy.mailboxes import add_alias, create_mailbox, set_inbound_settings
from tests.conftest import SEND, Stack, make_settings, make_tenant, run_stack, wait_status
from tests.support.dnsserver import DnsServer

HOSTNAME = "mx.inbox.test"
SENDER = "sender.example"


@dataclass
class Inbound:
    stack: Stack
    port: int
    org: str
    key: str
    mailbox: str
    domain: str


def _sender_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(pub).decode()


SENDER_PEM, SENDER_PUB = _sender_key()


def publish_sender(dns: DnsServer, *, spf: str = "v=spf1 ip4:127.0.0.1 -all",
                   dmarc: str | None = "v=DMARC1; p=reject") -> None:
    dns.add_txt(SENDER, spf)
    dns.add_txt(f"s1._domainkey.{SENDER}", f"v=DKIM1; k=rsa; p={SENDER_PUB}")
    if dmarc:
        dns.add_txt(f"_dmarc.{SENDER}", dmarc)


def message(subject: str = "Hello", *, sender: str = f"alice@{SENDER}",
            to: str = "info@rcpt.test", extra: str = "", sign: bool = True,
            body: str = "Hi there,\r\nthis is a test.\r\n") -> bytes:
    raw = (f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
           f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}"
           f"@{SENDER}>\r\n{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8"
           f"\r\n\r\n{body}").encode()
    if sign:
        sig = dkim.sign(raw, b"s1", SENDER.encode(), SENDER_PEM,
                        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        raw = sig + raw
    return raw


@contextlib.asynccontextmanager
async def inbound_stack(tmp_path: Path, dns: DnsServer, **settings: Any
                        ) -> AsyncIterator[Inbound]:
    values: dict[str, Any] = {"SERVER_HOSTNAME": HOSTNAME, "INBOX_DB_SYNC": "false"}
    values.update(settings)
    async with run_stack(make_settings(tmp_path, dns, **values), dns, workers=False) as stack:
        tenant = await make_tenant(stack.services, dns, "rcpt.test")
        box = await create_mailbox(stack.services.db, tenant.org, "rcpt.test", "info",
                                   stack.services.clock())
        async with running_transfer(stack.services, port=0) as server:
            yield Inbound(stack, server.port, tenant.org, tenant.key, box["id"], "rcpt.test")


@pytest.fixture
async def inbound(tmp_path: Path, dns_server: DnsServer) -> AsyncIterator[Inbound]:
    publish_sender(dns_server)
    async with inbound_stack(tmp_path, dns_server) as ib:
        yield ib


async def send(port: int, raw: bytes, rcpts: list[str], *, sender: str = f"alice@{SENDER}"
               ) -> tuple[int, str]:
    """One message over a fresh session; the reply to DATA (or the first refusal)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=20,
                             local_hostname=f"mail.{SENDER}", validate_certs=False)
    await client.connect()
    try:
        errors, reply = await client.sendmail(sender, rcpts, raw)
        return 250, reply
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0]
        return first.code, first.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


LIST = """
query L($mb: ID!, $folder: InboundFolder) {
  inboundMessages(mailbox: $mb, folder: $folder, first: 20) {
    edges { node { id subject from folder } }
  }
}"""

DETAIL = """
query D($id: ID!) {
  inboundMessage(id: $id) {
    id subject text raw headers { name value }
    authentication { spf dmarc arc header dkim { result domain selector } }
    spam { verdict reasons }
  }
}"""


async def listed(ib: Inbound, folder: str = "INBOX") -> list[dict[str, Any]]:
    data = await ib.stack.api(LIST, {"mb": ib.mailbox, "folder": folder}, key=ib.key)
    assert "errors" not in data, data
    return [e["node"] for e in data["data"]["inboundMessages"]["edges"]]


async def stored_count(ib: Inbound) -> int:
    rows = await ib.stack.services.db.one("SELECT count() AS n FROM inbound_message GROUP ALL")
    return rows[0]["n"] if rows else 0


def blob_files(ib: Inbound) -> list[Path]:
    root = ib.stack.settings.incoming_dir
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def test_signed_message_is_authenticated_stored_encrypted_and_readable(
        inbound: Inbound) -> None:
    forged = f"Authentication-Results: {HOSTNAME}; spf=pass; dkim=pass; dmarc=pass\r\n"
    raw = message("Welcome", extra=forged)
    code, reply = await send(inbound.port, raw, ["info@rcpt.test"])
    assert code == 250, reply
    [row] = await listed(inbound)
    assert row["subject"] == "Welcome" and row["folder"] == "INBOX"
    data = await inbound.stack.api(DETAIL, {"id": row["id"]}, key=inbound.key)
    detail = data["data"]["inboundMessage"]
    auth = detail["authentication"]
    assert (auth["spf"], auth["dmarc"]) == ("pass", "pass"), auth
    assert [d["result"] for d in auth["dkim"]] == ["pass"]
    assert auth["header"].startswith(f"Authentication-Results: {HOSTNAME};")
    stored = base64.b64decode(detail["raw"])
    # Exactly one AR header claims our authserv-id: ours, at the top; the forged one is gone.
    ours = [h for h in detail["headers"] if h["name"].lower() == "authentication-results"
            and h["value"].strip().lower().startswith(HOSTNAME)]
    assert len(ours) == 1 and "spf=pass" in ours[0]["value"]
    assert b"dkim=pass; dmarc=pass\r\n" not in stored
    assert stored.endswith(b"this is a test.\r\n")
    assert "this is a test." in detail["text"]
    # Encrypted at rest: nothing on disk contains the subject or the body.
    files = blob_files(inbound)
    assert files, "no blob was written"
    for path in files:
        content = path.read_bytes()
        assert b"Welcome" not in content and b"this is a test" not in content


@pytest.mark.parametrize(("rcpt", "code", "enhanced"), [
    ("someone@elsewhere.test", 550, "5.7.1"),
    ("nobody@rcpt.test", 550, "5.1.1"),
    ("info@sub.rcpt.test", 550, "5.7.1"),
], ids=["relay-denied", "unknown-user", "subdomain-not-hosted"])
async def test_recipients_that_are_not_ours_are_refused(inbound: Inbound, rcpt: str, code: int,
                                                        enhanced: str) -> None:
    got, reply = await send(inbound.port, message(), [rcpt])
    assert got == code and reply.startswith(enhanced), (got, reply)
    assert await stored_count(inbound) == 0


async def test_plus_address_alias_and_catch_all(tmp_path: Path, dns_server: DnsServer) -> None:
    publish_sender(dns_server)
    # Domain settings are reused for INBOX_CACHE_SECS; 0 makes the change below immediate.
    async with inbound_stack(tmp_path, dns_server, INBOX_CACHE_SECS="0") as inbound:
        await _plus_alias_catch_all(inbound)


async def _plus_alias_catch_all(inbound: Inbound) -> None:
    services = inbound.stack.services
    now = services.clock()
    await add_alias(services.db, inbound.org, "sales@rcpt.test", inbound.mailbox, now)
    for rcpt in ("info+news@rcpt.test", "SALES@rcpt.test"):
        code, reply = await send(inbound.port, message(f"to {rcpt}"), [rcpt])
        assert code == 250, reply
    code, _ = await send(inbound.port, message("lost"), ["random@rcpt.test"])
    assert code == 550
    await set_inbound_settings(services.db, inbound.org, "rcpt.test",
                               {"catch_all": inbound.mailbox, "plus_addressing": False})
    code, reply = await send(inbound.port, message("caught"), ["random@rcpt.test"])
    assert code == 250, reply
    subjects = sorted(r["subject"] for r in await listed(inbound))
    assert subjects == ["caught", "to SALES@rcpt.test", "to info+news@rcpt.test"]


@pytest.mark.parametrize(("dmarc", "sign", "outcome"), [
    ("v=DMARC1; p=reject", False, "550 5.7.1"),
    ("v=DMARC1; p=quarantine", False, "SPAM"),
    # DMARC asks for nothing, but an SPF hard fail on unsigned mail still goes to Spam.
    ("v=DMARC1; p=none", False, "SPAM"),
    ("v=DMARC1; p=reject", True, "INBOX"),
], ids=["reject", "quarantine", "none", "signed-passes"])
async def test_dmarc_policy_of_the_sender_is_applied(tmp_path: Path, dns_server: DnsServer,
                                                     dmarc: str, sign: bool,
                                                     outcome: str) -> None:
    # SPF fails (the sender's record does not list 127.0.0.1), so only DKIM can align.
    publish_sender(dns_server, spf="v=spf1 ip4:192.0.2.1 -all", dmarc=dmarc)
    async with inbound_stack(tmp_path, dns_server) as ib:
        code, reply = await send(ib.port, message("dmarc", sign=sign), ["info@rcpt.test"])
        if outcome.startswith("550"):
            assert (code, reply[:5]) == (550, "5.7.1"), (code, reply)
            assert await stored_count(ib) == 0
        else:
            assert code == 250, reply
            assert [r["subject"] for r in await listed(ib, outcome)] == ["dmarc"]


async def test_dns_failure_during_checks_is_a_temporary_refusal(tmp_path: Path,
                                                                dns_server: DnsServer) -> None:
    publish_sender(dns_server)
    dns_server.set_servfail(f"_dmarc.{SENDER}")
    async with inbound_stack(tmp_path, dns_server) as ib:
        code, reply = await send(ib.port, message("dns"), ["info@rcpt.test"])
        assert code == 451 and reply.startswith("4.7."), (code, reply)
        assert await stored_count(ib) == 0


@pytest.mark.parametrize(("setting", "dns_spf", "sign", "code"), [
    ("SMTP_REQUIRE_SPF_PASS", "v=spf1 -all", True, 550),
    ("SMTP_REQUIRE_SPF_PASS", "v=spf1 ip4:127.0.0.1 -all", True, 250),
    ("SMTP_REQUIRE_DKIM_PASS", "v=spf1 ip4:127.0.0.1 -all", False, 550),
    ("SMTP_REQUIRE_DKIM_PASS", "v=spf1 ip4:127.0.0.1 -all", True, 250),
], ids=["spf-required-fails", "spf-required-passes", "dkim-required-fails",
        "dkim-required-passes"])
async def test_require_pass_settings(tmp_path: Path, dns_server: DnsServer, setting: str,
                                     dns_spf: str, sign: bool, code: int) -> None:
    publish_sender(dns_server, spf=dns_spf, dmarc=None)
    async with inbound_stack(tmp_path, dns_server, **{setting: "true"}) as ib:
        got, reply = await send(ib.port, message("req", sign=sign), ["info@rcpt.test"])
        assert got == code, reply
        assert await stored_count(ib) == (1 if code == 250 else 0)


async def test_domain_override_beats_the_global_requirement(tmp_path: Path,
                                                            dns_server: DnsServer) -> None:
    publish_sender(dns_server, spf="v=spf1 -all", dmarc=None)
    async with inbound_stack(tmp_path, dns_server, SMTP_REQUIRE_SPF_PASS="true") as ib:
        await set_inbound_settings(ib.stack.services.db, ib.org, "rcpt.test",
                                   {"require_spf_pass": False})
        code, reply = await send(ib.port, message("override"), ["info@rcpt.test"])
        assert code == 250, reply


@pytest.mark.parametrize(("raw", "enhanced"), [
    (b"this is not a message at all\r\n", "5.6.0"),
    (b"Subject: no from\r\n\r\nbody\r\n", "5.6.0"),
    (b"From: a@sender.example\r\nContent-Type: multipart/mixed\r\n\r\nbody\r\n", "5.6.0"),
    (b"From: a@sender.example\r\n\r\n\x00\x01\x02binary", "5.6.0"),
], ids=["no-headers", "no-from", "multipart-without-boundary", "nul-octets"])
async def test_malformed_messages_are_refused_and_nothing_is_stored(
        inbound: Inbound, raw: bytes, enhanced: str) -> None:
    code, reply = await send(inbound.port, raw, ["info@rcpt.test"])
    assert code == 550 and reply.startswith(enhanced), (code, reply)
    assert await stored_count(inbound) == 0 and blob_files(inbound) == []
    # The server keeps serving.
    code, reply = await send(inbound.port, message("after"), ["info@rcpt.test"])
    assert code == 250, reply


async def test_database_failure_at_index_time_leaves_no_blob(inbound: Inbound) -> None:
    # A real engine error inside the index transaction, after the blobs were put.
    await inbound.stack.services.db.run(
        "DEFINE FIELD OVERWRITE subject ON inbound_message ASSERT $value != 'poison'")
    code, reply = await send(inbound.port, message("poison"), ["info@rcpt.test"])
    assert code == 451 and reply.startswith("4.3.0"), (code, reply)
    assert await stored_count(inbound) == 0
    assert blob_files(inbound) == []


async def test_blob_store_failure_is_a_temporary_refusal(tmp_path: Path,
                                                          dns_server: DnsServer) -> None:
    from inbox.storage.blobs import S3BlobStore
    from tests.support.procs import free_port

    publish_sender(dns_server)
    dead = S3BlobStore(endpoint=f"http://127.0.0.1:{free_port()}", bucket="b",
                       access_key_id="k", secret_access_key="s", region="us-east-1",
                       force_path_style=True)
    values = {"SERVER_HOSTNAME": HOSTNAME, "INBOX_DB_SYNC": "false"}
    async with run_stack(make_settings(tmp_path, dns_server, **values), dns_server,
                         workers=False, blobs=dead) as stack:
        tenant = await make_tenant(stack.services, dns_server, "rcpt.test")
        await create_mailbox(stack.services.db, tenant.org, "rcpt.test", "info",
                             stack.services.clock())
        async with running_transfer(stack.services, port=0) as server:
            code, reply = await send(server.port, message("s3 down"), ["info@rcpt.test"])
    assert code == 451 and reply.startswith("4.3.0"), (code, reply)


async def test_connection_rate_limit_is_shared_through_the_database(
        tmp_path: Path, dns_server: DnsServer) -> None:
    publish_sender(dns_server)
    async with inbound_stack(tmp_path, dns_server,
                             SMTP_RATE_LIMIT_CONNECTIONS_PER_MINUTE="3") as ib:
        # A second server (as a second instance would be) on the same database.
        async with running_transfer(ib.stack.services, port=0) as other:
            codes = []
            for port in (ib.port, other.port, ib.port, other.port):
                try:
                    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10,
                                             start_tls=False)
                    await client.connect()
                    codes.append(250)
                    await client.quit()
                except aiosmtplib.SMTPConnectResponseError as exc:
                    codes.append(exc.code)
            assert codes == [250, 250, 250, 421], codes


async def test_message_rate_limit(tmp_path: Path, dns_server: DnsServer) -> None:
    publish_sender(dns_server)
    async with inbound_stack(tmp_path, dns_server, SMTP_RATE_LIMIT_MESSAGES_PER_MINUTE="2") as ib:
        results = [await send(ib.port, message(f"m{i}"), ["info@rcpt.test"]) for i in range(3)]
        assert [c for c, _ in results] == [250, 250, 451], results
        assert results[2][1].startswith("4.7.0")


async def test_swaks_delivers(inbound: Inbound) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed (.ci/run installs it)"
    proc = await asyncio.create_subprocess_exec(
        swaks, "--server", f"127.0.0.1:{inbound.port}", "--from", f"bob@{SENDER}",
        "--to", "info@rcpt.test", "--helo", f"mail.{SENDER}", "--header", "Subject: via swaks",
        "--body", "swaks body", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode() + err.decode()
    assert b"<-  250 2.0.0" in out, out.decode()
    [row] = await listed(inbound)
    assert row["subject"] == "via swaks"


async def test_our_outbound_spine_delivers_to_our_port_25(tmp_path: Path,
                                                           dns_server: DnsServer) -> None:
    """Tenant A sends with sendEmail; DNS routes rcpt.test to our own MX; tenant B reads it
    with DKIM verified against the keys tenant A was told to publish."""
    values = {"SERVER_HOSTNAME": HOSTNAME, "INBOX_DB_SYNC": "false",
              "SMTP_TRANSFER_PORT": "0"}
    settings = make_settings(tmp_path, dns_server, **values)
    async with run_stack(settings, dns_server, workers=False) as stack:
        receiver = await make_tenant(stack.services, dns_server, "rcpt.test", name="B")
        box = await create_mailbox(stack.services.db, receiver.org, "rcpt.test", "info",
                                   stack.services.clock())
        sender = await make_tenant(stack.services, dns_server, "acme.test", name="A")
        dns_server.add_txt("acme.test", "v=spf1 ip4:127.0.0.1 -all")
        dns_server.add_txt("_dmarc.acme.test", "v=DMARC1; p=reject")
        async with running_transfer(stack.services, port=0) as server:
            dns_server.add("rcpt.test", "MX", "10 mx.rcpt.test.")
            dns_server.add("mx.rcpt.test", "A", "127.0.0.1")
            from dataclasses import replace

            from inbox.app import build_transport
            outbound = stack.settings.model_copy(update={"SMTP_OUTBOUND_PORT": server.port})
            services = replace(stack.services, settings=outbound,
                               transport=build_transport(outbound))
            async with running_workers(services):
                result = await stack.api(SEND, {
                    "from": "hello@acme.test", "to": ["info@rcpt.test"],
                    "subject": "spine to mx", "text": "from our own outbound"}, key=sender.key)
                msg = result["data"]["sendEmail"]["message"]
                await wait_status(stack.api, sender.key, msg["id"], {"DELIVERED"})
        ib = Inbound(stack, server.port, receiver.org, receiver.key, box["id"], "rcpt.test")
        [row] = await listed(ib)
        detail = (await stack.api(DETAIL, {"id": row["id"]}, key=receiver.key)
                  )["data"]["inboundMessage"]
        assert detail["subject"] == "spine to mx"
        dkim_results = {(d["domain"], d["result"]) for d in detail["authentication"]["dkim"]}
        assert dkim_results == {("acme.test", "pass")}, detail["authentication"]
        auth = detail["authentication"]
        assert (auth["spf"], auth["dmarc"]) == ("pass", "pass"), auth
        # Tenant A cannot read tenant B's mailbox.
        crossed = await stack.api(LIST, {"mb": box["id"], "folder": "INBOX"}, key=sender.key)
        assert not (crossed.get("data") or {}).get("inboundMessages", {}).get("edges")


async def test_postfix_relays_into_our_port_25(inbound: Inbound) -> None:
    """A real MTA peer: a private Postfix instance relays a signed message to us."""
    from tests.support.postfix import PostfixInstance, make_root, remove_root, unavailable

    reason = unavailable()
    assert reason is None, reason
    root = make_root()
    instance = PostfixInstance(root, relay_port=inbound.port)
    try:
        await asyncio.to_thread(instance.start)
        await asyncio.to_thread(instance.inject, message("via postfix"), f"alice@{SENDER}",
                                ["info@rcpt.test"])
        await asyncio.to_thread(instance.wait_empty, 30)
    finally:
        await asyncio.to_thread(instance.stop)
        remove_root(root)
    [row] = await listed(inbound)
    detail = (await inbound.stack.api(DETAIL, {"id": row["id"]}, key=inbound.key)
              )["data"]["inboundMessage"]
    assert detail["subject"] == "via postfix"
    auth = detail["authentication"]
    assert (auth["spf"], auth["dmarc"]) == ("pass", "pass"), auth
    received = [h["value"] for h in detail["headers"] if h["name"].lower() == "received"]
    assert any("relay.postfix.test (Postfix" in v for v in received), received


async def test_s3_sse_c_the_object_needs_the_tenant_key(tmp_path: Path, dns_server: DnsServer,
                                                        localstack: Any) -> None:
    """Received over SMTP into a real S3 server that enforces SSE-C: the object cannot be read
    without the organization's key (nor with another's); the API returns it with the key."""
    import boto3
    import botocore.exceptions

    publish_sender(dns_server)
    s3 = {"S3_ENDPOINT": localstack.endpoint, "S3_BUCKET": "inbound-e2e",
          "S3_ACCESS_KEY_ID": "test", "S3_SECRET_ACCESS_KEY": "test"}
    async with inbound_stack(tmp_path, dns_server, **s3) as ib:
        code, reply = await send(ib.port, message("to s3"), ["info@rcpt.test"])
        assert code == 250, reply
        [row] = await listed(ib)
        detail = (await ib.stack.api(DETAIL, {"id": row["id"]}, key=ib.key)
                  )["data"]["inboundMessage"]
        assert base64.b64decode(detail["raw"]).endswith(b"this is a test.\r\n")
        stored = await ib.stack.services.mailstore.get(ib.org, row["id"])
        client = boto3.client("s3", endpoint_url=localstack.endpoint, region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
        key = stored["blob_key"]
        assert key.startswith(f"msg/{ib.org}/{ib.mailbox}/")
        with pytest.raises(botocore.exceptions.ClientError) as no_key:
            await asyncio.to_thread(client.get_object, Bucket="inbound-e2e", Key=key)
        assert no_key.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        with pytest.raises(botocore.exceptions.ClientError) as wrong_key:
            await asyncio.to_thread(client.get_object, Bucket="inbound-e2e", Key=key,
                                    SSECustomerAlgorithm="AES256", SSECustomerKey=b"w" * 32)
        assert wrong_key.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        org_key = await ib.stack.services.org_keys.storage_key(ib.org)
        got = await asyncio.to_thread(client.get_object, Bucket="inbound-e2e", Key=key,
                                      SSECustomerAlgorithm="AES256", SSECustomerKey=org_key)
        assert got["Body"].read() == base64.b64decode(detail["raw"])


def _decrypt(tmp_path: Path, *args: str) -> Any:
    """`inbox decrypt ARGS` as a tenant would run it (no inbox settings in its environment)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "inbox", "decrypt", *args],
                          capture_output=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "INBOX_DATA_DIR": str(tmp_path / "cli")})


async def test_e2ee_tenant_gets_ciphertext_that_only_its_key_opens(
        inbound: Inbound, tmp_path: Path) -> None:
    """Over SMTP into an e2ee domain: the index has no subject, the API returns ciphertext and
    the wrapped key, and `inbox decrypt` with the tenant's private key gives the message."""
    from inbox.storage.envelope import generate_keypair
    from inbox.tenancy.orgkeys import set_e2ee_public_key

    private, public = generate_keypair()
    db = inbound.stack.services.db
    await set_e2ee_public_key(db, inbound.org, public)
    await set_inbound_settings(db, inbound.org, "rcpt.test", {"enc_mode": "e2ee"})
    att = ("--B\r\nContent-Type: text/plain\r\n\r\nsecret body text\r\n--B\r\n"
           "Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf\r\n"
           "\r\nPDFDATA\r\n--B--\r\n")
    raw = (f"From: Alice <alice@{SENDER}>\r\nTo: info@rcpt.test\r\nSubject: top secret\r\n"
           f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n{att}"
           ).encode()
    code, reply = await send(inbound.port, raw, ["info@rcpt.test"])
    assert code == 250, reply
    row = await inbound.stack.services.mailstore.get(inbound.org,
                                                     (await listed(inbound))[0]["id"])
    assert "subject" not in row and "snippet" not in row and row["parts"] == []
    assert row["auth"]["spf"] == "pass"  # verdicts are metadata and stay readable
    q = """query D($id: ID!) { inboundMessage(id: $id) { subject text raw wrappedKey e2eeAad
           attachments { partId filename content e2eeAad } } }"""
    detail = (await inbound.stack.api(q, {"id": row["id"]}, key=inbound.key)
              )["data"]["inboundMessage"]
    assert detail["subject"] is None and detail["text"] is None
    ciphertext = base64.b64decode(detail["raw"])
    assert b"top secret" not in ciphertext and b"secret body" not in ciphertext
    keyfile = tmp_path / "private.key"
    keyfile.write_text(private)
    (tmp_path / "msg.b64").write_text(detail["raw"])
    done = await asyncio.to_thread(_decrypt, tmp_path, str(tmp_path / "msg.b64"), "--base64",
         "--wrapped-key", detail["wrappedKey"], "--message-id", row["id"],
         "--key-file", str(keyfile))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(b"Authentication-Results: ")
    assert done.stdout.endswith(raw)
    [attachment] = detail["attachments"]
    assert attachment["filename"] is None
    (tmp_path / "att.b64").write_text(attachment["content"])
    done = await asyncio.to_thread(_decrypt, tmp_path, str(tmp_path / "att.b64"), "--base64",
         "--wrapped-key", detail["wrappedKey"], "--message-id", row["id"],
         "--part", attachment["partId"], "--key-file", str(keyfile))
    assert done.returncode == 0 and done.stdout == b"PDFDATA", done.stderr.decode()
    # Another private key opens nothing.
    other, _ = generate_keypair()
    keyfile.write_text(other)
    done = await asyncio.to_thread(_decrypt, tmp_path, str(tmp_path / "msg.b64"), "--base64",
         "--wrapped-key", detail["wrappedKey"], "--message-id", row["id"],
         "--key-file", str(keyfile))
    assert done.returncode == 1 and b"private key" in done.stderr, done.stderr


async def test_a_thousand_recipients_and_a_dropped_connection(inbound: Inbound) -> None:
    """RCPT beyond SMTP_INBOUND_MAX_RCPT_TO gets 452 4.5.3 and the message is stored once for
    the accepted ones; a client that vanishes mid-DATA leaves nothing; others keep being
    served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", inbound.port)

    async def reply() -> bytes:
        lines = []
        while True:
            line = await asyncio.wait_for(reader.readline(), 20)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    await reply()
    writer.write(f"EHLO mail.{SENDER}\r\nMAIL FROM:<alice@{SENDER}>\r\n".encode())
    await reply()
    await reply()
    writer.write(b"".join(f"RCPT TO:<info+{i}@rcpt.test>\r\n".encode() for i in range(1000)))
    codes = [(await reply())[:9] for _ in range(1000)]
    assert codes[:100] == [b"250 2.1.5"] * 100, codes[:3]
    assert set(codes[100:]) == {b"452 4.5.3"}
    writer.write(b"DATA\r\n")
    assert (await reply()).startswith(b"354")
    writer.write(message("many").replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
    assert (await reply()).startswith(b"250 2.0.0")
    writer.write(b"QUIT\r\n")
    writer.close()
    rows = await inbound.stack.services.db.one("SELECT rcpt_to FROM inbound_message")
    assert len(rows) == 1 and len(rows[0]["rcpt_to"]) == 100

    # Dropped in the middle of DATA: nothing is stored.
    reader, writer = await asyncio.open_connection("127.0.0.1", inbound.port)
    await reply()
    writer.write(f"EHLO x\r\nMAIL FROM:<alice@{SENDER}>\r\nRCPT TO:<info@rcpt.test>\r\n"
                 "DATA\r\n".encode())
    for _ in range(4):
        await reply()
    writer.write(message("half")[:200])
    await writer.drain()
    writer.transport.abort()
    code, reply_text = await send(inbound.port, message("next"), ["info@rcpt.test"])
    assert code == 250, reply_text
    subjects = sorted(r["subject"] for r in await listed(inbound))
    assert subjects == ["many", "next"]


async def test_parsed_parts_are_stored_when_enabled(tmp_path: Path,
                                                    dns_server: DnsServer) -> None:
    publish_sender(dns_server)
    async with inbound_stack(tmp_path, dns_server, INBOX_STORE_PARSED_PARTS="true") as ib:
        raw = (f"From: alice@{SENDER}\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/alternative; boundary=Z\r\n\r\n--Z\r\n"
               "Content-Type: text/plain\r\n\r\nplain part\r\n--Z\r\nContent-Type: text/html\r\n"
               "\r\n<p>html part</p>\r\n--Z--\r\n").encode()
        code, reply = await send(ib.port, raw, ["info@rcpt.test"])
        assert code == 250, reply
        [row] = await listed(ib)
        stored = await ib.stack.services.mailstore.get(ib.org, row["id"])
        assert [p["path"] for p in stored["parts"]] == ["1.1", "1.2"]
        key = await ib.stack.services.org_keys.storage_key(ib.org)
        part = stored["parts"][1]
        assert part["key"] == f"part/{ib.org}/{ib.mailbox}/{row['id']}/1.2"
        assert await ib.stack.services.blobs.get(part["key"], tenant_key=key) == \
            b"<p>html part</p>"


@pytest.mark.parametrize(("fail_open", "expected"), [(True, 250), (False, 421)],
                         ids=["fail-open", "fail-closed"])
async def test_rate_limit_store_outage(tmp_path: Path, dns_server: DnsServer, fail_open: bool,
                                       expected: int) -> None:
    """SMTP_RATE_LIMIT_FAIL_OPEN_ON_DB_ERROR decides what an unreachable rate-limit store
    does (here: a real database connection that has gone away)."""
    from dataclasses import replace

    from inbox.app import build_inbound
    from inbox.storage import Database
    from inbox.storage.ratelimits import RateLimiter

    publish_sender(dns_server)
    gone = Database("mem://", namespace="t", database="t")
    await gone.connect()
    await gone.close()
    values = {"SMTP_RATE_LIMIT_FAIL_OPEN_ON_DB_ERROR": str(fail_open).lower()}
    async with inbound_stack(tmp_path, dns_server, **values) as ib:
        services = replace(ib.stack.services, limiter=RateLimiter(gone))
        async with running_transfer(replace(services, inbound=build_inbound(services)),
                                    port=0) as server:
            try:
                client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, timeout=10,
                                         start_tls=False)
                await client.connect()
                code = 250
                await client.quit()
            except aiosmtplib.SMTPConnectResponseError as exc:
                code = exc.code
                assert "4.7.0" in exc.message
    assert code == expected


async def test_concurrent_messages_are_group_committed_and_one_bad_one_fails_alone(
        inbound: Inbound) -> None:
    await inbound.stack.services.db.run(
        "DEFINE FIELD OVERWRITE subject ON inbound_message ASSERT $value != 'poison'")
    subjects = [f"c{i}" for i in range(7)] + ["poison"]
    results = await asyncio.gather(*(send(inbound.port, message(s), ["info@rcpt.test"])
                                      for s in subjects))
    codes = dict(zip(subjects, (c for c, _ in results), strict=True))
    assert codes.pop("poison") == 451
    assert set(codes.values()) == {250}, results
    assert sorted(r["subject"] for r in await listed(inbound)) == sorted(codes)
    # Exactly the stored messages' blobs remain: the poisoned one left none behind.
    assert len(blob_files(inbound)) == len(codes)


# ---- registration of the e2ee key: only keys that every message can be wrapped to ----------

SET_KEY = """mutation K($k: String!) { setE2eePublicKey(publicKey: $k) {
  publicKey errors { code field message } } }"""


def set_inbound(domain: str, args: str) -> str:
    """A setDomainInbound mutation with literal arguments (an omitted one stays unchanged)."""
    return (f'mutation {{ setDomainInbound(domain: "{domain}", {args}) {{ settings {{ encMode '
            "requireDmarcPass } errors { code field message } } }")


async def test_e2ee_key_registration_refuses_a_low_order_key(inbound: Inbound) -> None:
    """The all-zero and order-1 points pass a length check but give an all-zero shared
    secret; registered, they would defer that domain's mail forever (451 4.3.0)."""
    from inbox.storage.envelope import generate_keypair, unwrap_data_key

    api, key = inbound.stack.api, inbound.key
    for raw in (bytes(32), b"\x01" + bytes(31)):
        data = await api(SET_KEY, {"k": base64.b64encode(raw).decode()}, key=key)
        payload = data["data"]["setE2eePublicKey"]
        assert payload["publicKey"] is None, payload
        [error] = payload["errors"]
        assert (error["code"], error["field"]) == ("VALIDATION", ["publicKey"]), error
    assert (await api("{ e2eePublicKey }", key=key))["data"]["e2eePublicKey"] is None
    data = await api(set_inbound("rcpt.test", "encMode: E2EE"), key=key)
    assert data["data"]["setDomainInbound"]["errors"][0]["field"] == ["encMode"], data
    # A real key registers, and mail to the domain is then sealed to it.
    private, public = generate_keypair()
    data = await api(SET_KEY, {"k": public}, key=key)
    assert data["data"]["setE2eePublicKey"] == {"publicKey": public, "errors": []}
    data = await api(set_inbound("rcpt.test", "encMode: E2EE"), key=key)
    assert data["data"]["setDomainInbound"]["errors"] == [], data
    code, reply = await send(inbound.port, message("sealed"), ["info@rcpt.test"])
    assert code == 250, reply
    [row] = await inbound.stack.services.db.one("SELECT * FROM inbound_message")
    assert row["enc_mode"] == "e2ee"
    assert len(unwrap_data_key(private, bytes(row["wrapped_key"]))) == 32


# ---- SMTP_REQUIRE_DMARC_PASS, globally and per domain ----------------------------------------

RELAY = "relay.example"


def publish_dmarc_failure(dns: DnsServer, dmarc: str | None = "v=DMARC1; p=none") -> None:
    """Mail from alice@sender.example sent through relay.example, unsigned: SPF passes for
    relay.example but does not align with the From domain, so DMARC fails; sender.example
    publishes p=none, so its own policy asks for nothing and nothing else marks it spam."""
    publish_sender(dns, spf="v=spf1 ip4:192.0.2.1 -all", dmarc=dmarc)
    dns.add_txt(RELAY, "v=spf1 ip4:127.0.0.1 -all")


async def send_via_relay(port: int, subject: str, *, sign: bool = False) -> tuple[int, str]:
    return await send(port, message(subject, sign=sign), ["info@rcpt.test"],
                      sender=f"bounces@{RELAY}")


@pytest.mark.parametrize(("require", "sign", "dmarc_record", "outcome"), [
    ("false", False, True, "accepted"),
    ("true", False, True, "refused"),
    ("true", True, True, "accepted"),  # DKIM aligns: DMARC passes
    ("true", False, False, "refused"),  # no DMARC record: DMARC does not pass either
], ids=["off-by-default", "on-fails", "on-passes", "on-no-record"])
async def test_require_dmarc_pass_setting(tmp_path: Path, dns_server: DnsServer, require: str,
                                          sign: bool, dmarc_record: bool,
                                          outcome: str) -> None:
    publish_dmarc_failure(dns_server, "v=DMARC1; p=none" if dmarc_record else None)
    settings = {"SMTP_REQUIRE_DMARC_PASS": require} if require == "true" else {}
    async with inbound_stack(tmp_path, dns_server, **settings) as ib:
        code, reply = await send_via_relay(ib.port, "dmarc req", sign=sign)
        if outcome == "refused":
            assert (code, reply[:5]) == (550, "5.7.1"), (code, reply)
            assert "DMARC" in reply, reply
            assert await stored_count(ib) == 0
            return
        assert code == 250, reply
        [row] = await listed(ib)
        assert row["folder"] == "INBOX"
        auth = (await ib.stack.api(DETAIL, {"id": row["id"]}, key=ib.key)
                )["data"]["inboundMessage"]["authentication"]
        assert (auth["spf"], auth["dmarc"]) == ("pass", "pass" if sign else "fail"), auth


@pytest.mark.parametrize("global_on", [False, True], ids=["global-off", "global-on"])
async def test_require_dmarc_pass_per_domain(tmp_path: Path, dns_server: DnsServer,
                                             global_on: bool) -> None:
    """setDomainInbound(requireDmarcPass) turns the requirement on or off for one domain;
    null goes back to SMTP_REQUIRE_DMARC_PASS."""
    publish_dmarc_failure(dns_server)
    # Domain settings are reused for INBOX_CACHE_SECS; 0 makes each change immediate.
    async with inbound_stack(tmp_path, dns_server, INBOX_CACHE_SECS="0",
                             SMTP_REQUIRE_DMARC_PASS=str(global_on).lower()) as ib:
        expected = []
        for i, override in enumerate((None, not global_on, None)):
            if i:
                literal = "null" if override is None else str(override).lower()
                data = await ib.stack.api(set_inbound("rcpt.test",
                                                      f"requireDmarcPass: {literal}"), key=ib.key)
                payload = data["data"]["setDomainInbound"]
                assert payload["errors"] == [], payload
                assert payload["settings"]["requireDmarcPass"] is override
            required = global_on if override is None else override
            code, reply = await send_via_relay(ib.port, f"m{i}")
            if required:
                assert (code, reply[:5]) == (550, "5.7.1") and "DMARC" in reply, (i, reply)
            else:
                assert code == 250, (i, reply)
                expected.append(f"m{i}")
        assert sorted(r["subject"] for r in await listed(ib)) == expected


# ---- the subscription sees mail that arrived on port 25 --------------------------------------

SUBSCRIBE = """subscription($m: ID!) { inboundMessageReceived(mailbox: $m) {
  id mailbox subject from folder } }"""


@contextlib.asynccontextmanager
async def subscribed(stack: Stack, api_key: str, mailbox: str, sub_id: str = "1"
                     ) -> AsyncIterator[Any]:
    """A graphql-transport-ws session (key in connection_init) subscribed to `mailbox`."""
    import json

    from websockets.asyncio.client import connect

    url = stack.base_url.replace("http://", "ws://") + "/graphql"
    async with connect(url, subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                       open_timeout=5) as ws:
        await ws.send(json.dumps({"type": "connection_init",
                                  "payload": {"Authorization": f"Bearer {api_key}"}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "connection_ack"
        await ws.send(json.dumps({"id": sub_id, "type": "subscribe", "payload": {
            "query": SUBSCRIBE, "variables": {"m": mailbox}}}))
        yield ws


async def next_event(ws: Any, timeout: float = 10) -> dict[str, Any]:
    import json

    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def wait_subscribers(stack: Stack, topic: str) -> None:
    for _ in range(500):
        if stack.services.pubsub.subscribers(topic):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no subscriber on {topic}")


async def test_subscription_receives_mail_that_arrived_on_port_25(inbound: Inbound) -> None:
    from inbox.smtp.receiving import inbound_topic

    stack = inbound.stack
    other = await make_tenant(stack.services, stack.dns, "other.test", name="B")
    other_box = await create_mailbox(stack.services.db, other.org, "other.test", "info",
                                     stack.services.clock())
    async with (subscribed(stack, inbound.key, inbound.mailbox) as ours,
                subscribed(stack, other.key, other_box["id"]) as theirs,
                subscribed(stack, other.key, inbound.mailbox, "7") as prying):
        # Another organization cannot subscribe to our mailbox.
        refused = await next_event(prying)
        assert refused["type"] in ("error", "next"), refused
        errors = refused["payload"] if refused["type"] == "error" else \
            refused["payload"]["errors"]
        assert errors[0]["extensions"]["code"] == "NOT_FOUND", refused
        await wait_subscribers(stack, inbound_topic(inbound.org, inbound.mailbox))
        await wait_subscribers(stack, inbound_topic(other.org, other_box["id"]))
        assert stack.services.pubsub.subscribers(
            inbound_topic(inbound.org, inbound.mailbox)) == 1  # ours only

        code, reply = await send(inbound.port, message("live"), ["info@rcpt.test"])
        assert code == 250, reply
        event = await next_event(ours)
        assert (event["type"], event["id"]) == ("next", "1"), event
        [row] = await listed(inbound)
        assert event["payload"]["data"]["inboundMessageReceived"] == {
            "id": row["id"], "mailbox": inbound.mailbox, "subject": "live",
            "from": f"alice@{SENDER}", "folder": "INBOX"}
        # The other organization's subscriber heard nothing of it...
        with pytest.raises(TimeoutError):
            await next_event(theirs, timeout=0.5)
        # ...and hears its own mail, which ours does not.
        code, reply = await send(inbound.port, message("theirs", to="info@other.test"),
                                 ["info@other.test"])
        assert code == 250, reply
        event = await next_event(theirs)
        assert event["payload"]["data"]["inboundMessageReceived"]["subject"] == "theirs"
        assert event["payload"]["data"]["inboundMessageReceived"]["mailbox"] == other_box["id"]
        with pytest.raises(TimeoutError):
            await next_event(ours, timeout=0.5)


# ---- only verified domains are hosted ----------------------------------------------------

ADD_DOMAIN = """mutation A($d: String!) { addDomain(domain: $d) {
  domain { domain verified records { type name value } } errors { code message } } }"""
VERIFY_DOMAIN = """mutation V($d: String!) { verifyDomain(domain: $d) {
  domain { verified } errors { code message } } }"""


async def test_an_unverified_domain_receives_nothing_until_verified(inbound: Inbound) -> None:
    """Domains are unique across organizations, so claiming one (addDomain) must not be enough
    to receive its mail: until verifyDomain succeeds it is relay-denied like any domain we do
    not host; right after, it receives (no refusal is remembered)."""
    stack, key = inbound.stack, inbound.key
    added = (await stack.api(ADD_DOMAIN, {"d": "late.test"}, key=key))["data"]["addDomain"]
    assert added["errors"] == [] and added["domain"]["verified"] is False, added
    await create_mailbox(stack.services.db, inbound.org, "late.test", "info",
                         stack.services.clock())
    for _ in range(2):  # the refusal is the same when asked again
        code, reply = await send(inbound.port, message("early", to="info@late.test"),
                                 ["info@late.test"])
        assert (code, reply[:5]) == (550, "5.7.1"), (code, reply)
        assert "not hosted" in reply, reply
    for record in added["domain"]["records"]:
        stack.dns.add_txt(record["name"], record["value"])
    verified = (await stack.api(VERIFY_DOMAIN, {"d": "late.test"}, key=key)
                )["data"]["verifyDomain"]
    assert verified["errors"] == [] and verified["domain"]["verified"] is True, verified
    # INBOX_CACHE_SECS is the default 5 here: the domain receives at once all the same.
    code, reply = await send(inbound.port, message("on time", to="info@late.test"),
                             ["info@late.test"])
    assert code == 250, reply
    assert await stored_count(inbound) == 1
