"""A blob write that fails while another of the same message is still being written: the
sender gets 451 4.3.0 and nothing is left, on disk or in the index, once every write is done.
Real port-25 server, real embedded database, real files; the fault is injected into one
LocalBlobStore write."""

from __future__ import annotations

import asyncio
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

from inbox.app import running_transfer
from inbox.storage.blobs import LocalBlobStore
from inbox.tenancy.mailboxes import create_mailbox
from tests.conftest import make_settings, make_tenant, run_stack
from tests.support.dnsserver import DnsServer
from tests.test_inbound_e2e import HOSTNAME, SENDER, publish_sender, send

SLOW_SECS = 0.5


class FailingAttachmentStore(LocalBlobStore):
    """Attachment writes fail at once (an I/O error); the message's own blob is written,
    for real, only after SLOW_SECS."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.landed: list[str] = []

    def _write(self, key: str, data: bytes, tenant_key: bytes) -> Path:
        if key.startswith("att/"):
            raise OSError(5, "Input/output error")
        time.sleep(SLOW_SECS)
        path = super()._write(key, data, tenant_key)
        self.landed.append(key)
        return path


def with_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Alice <alice@{SENDER}>"
    msg["To"] = "info@rcpt.test"
    msg["Subject"] = "report attached"
    msg["Date"] = "Sun, 22 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<report@{SENDER}>"
    msg.set_content("The report is attached.\n")
    msg.add_attachment(b"%PDF-1.4 numbers", maintype="application", subtype="pdf",
                       filename="report.pdf")
    return msg.as_bytes(policy=SMTP)


async def test_failed_blob_write_leaves_no_orphan_and_defers(tmp_path: Path,
                                                             dns_server: DnsServer) -> None:
    publish_sender(dns_server)
    settings = make_settings(tmp_path, dns_server, SERVER_HOSTNAME=HOSTNAME,
                             INBOX_DB_SYNC="false")
    blobs = FailingAttachmentStore(settings.incoming_dir)
    async with run_stack(settings, dns_server, workers=False, blobs=blobs) as stack:
        tenant = await make_tenant(stack.services, dns_server, "rcpt.test")
        await create_mailbox(stack.services.db, tenant.org, "rcpt.test", "info",
                             stack.services.clock())
        async with running_transfer(stack.services, port=0) as server:
            code, reply = await send(server.port, with_attachment(), ["info@rcpt.test"])
        assert (code, reply[:5]) == (451, "4.3.0"), (code, reply)
        await asyncio.sleep(SLOW_SECS + 0.5)  # a write still running would have landed
        assert [k for k in blobs.landed if k.startswith("msg/")], "the slow write never ran"
        root = settings.incoming_dir
        assert [p for p in root.rglob("*") if p.is_file()] == []
        rows = await stack.services.db.one("SELECT count() AS n FROM inbound_message GROUP ALL")
        assert not rows or rows[0]["n"] == 0
