"""Stored inbound mail: writing blobs and index rows together, and every tenant-scoped read,
flag, move and delete. Does not check SMTP input or authentication; callers pass verdicts in.

Write order (so a crash or failure never shows half a message): every blob is put (and is
durable) first, then all index rows go in one transaction. If a put fails, the blobs already
written are deleted; if the transaction fails, all blobs are deleted. A blob without an index
row is never visible through any read here.

`standard` tenants: blobs are stored under the organization's key (SSE-C on S3, AES-GCM on the
local backend). `e2ee` tenants: the raw message and each attachment are first encrypted with a
fresh data key wrapped to the tenant's X25519 public key; the index keeps no subject, snippet,
names or parts, and the server cannot read the mail afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from inbox.errors import NotFound, StorageUnavailable, ValidationError
from inbox.storage import envelope
from inbox.storage.blobs import attachment_key, message_key, message_prefixes, part_key
from inbox.storage.db import Database, new_id
from inbox.storage.mimeparse import ParsedMessage, summary
from inbox.storage.schema import list_key

log = logging.getLogger(__name__)

FOLDERS = ("INBOX", "SPAM", "TRASH")
MAX_BATCH = 64  # messages per group commit


def e2ee_aad(message_id: str, part_id: str | None = None) -> str:
    """What an e2ee blob is bound to: our message id (and the attachment's part id), so a
    blob moved to another message or part fails to decrypt. Tenants pass it when decrypting."""
    return message_id if part_id is None else f"{message_id}/{part_id}"


@dataclass
class Delivery:
    """One copy of an inbound message for one mailbox."""

    org: str
    mailbox: str
    rcpt_to: list[str]
    folder: str
    enc_mode: str = "standard"
    e2ee_public_key: str | None = None


@dataclass
class InboundMeta:
    peer_ip: str
    helo: str
    mail_from: str
    tls: bool
    auth: dict[str, Any] = field(default_factory=dict)
    spam: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    raw: bytes
    parsed: ParsedMessage
    deliveries: list[Delivery]
    meta: InboundMeta
    now: datetime
    done: asyncio.Future[list[dict[str, Any]]]


def _unavailable(exc: BaseException) -> BaseException:
    if isinstance(exc, StorageUnavailable):
        return exc
    if isinstance(exc, Exception):
        log.error("storing an inbound message failed", exc_info=exc)
    return StorageUnavailable("could not store the message; try again later")


def list_query(org: str, mailbox: str, *, folder: str = "INBOX", unread: bool | None = None,
               starred: bool | None = None, from_address: str | None = None,
               search: str | None = None, first: int = 50, after: str | None = None
               ) -> tuple[str, dict[str, Any]]:
    """The SELECT (and its parameters) of one page of `MailStore.list_messages`.

    An index range (inbound_folder) in list order, newest first, that stops at the LIMIT: no
    ORDER BY, which would read and sort the whole folder. So every filter is a plain
    comparison (`=`, `CONTAINS`) ANDed to the range: with a function call or an OR at the top
    of a condition the planner drops the index for a forward scan of the whole table
    (EXPLAIN: "Iterate Table"), which is record id order, oldest first; the LIMIT then kept
    the OLDEST matches and paging from the last of them skipped the rest. On strings
    CONTAINS is a substring test; the search's OR is an array of per-field tests.
    """
    if folder not in FOLDERS:
        raise ValidationError(f"folder must be one of {', '.join(FOLDERS)}", field=["folder"])
    where = ["org = $org", "mailbox = $mailbox", "folder = $folder", "list_key > $key",
             "deleting = false"]
    params: dict[str, Any] = {"org": org, "mailbox": mailbox, "folder": folder,
                              "limit": first + 1, "key": list_key(after) if after else ""}
    if unread is not None:
        where.append("read = $read")
        params["read"] = not unread
    if starred is not None:
        where.append("starred = $starred")
        params["starred"] = starred
    if from_address:
        where.append("(from_address ?? '') CONTAINS $from")
        params["from"] = from_address.lower()
    if search:
        where.append("[string::lowercase(subject ?? '') CONTAINS $q,"
                     " string::lowercase(snippet ?? '') CONTAINS $q,"
                     " (from_address ?? '') CONTAINS $q] CONTAINS true")
        params["q"] = search.lower()
    return f"SELECT * FROM inbound_message WHERE {' AND '.join(where)} LIMIT $limit", params


class MailStore:
    def __init__(self, db: Database, blobs: Any, org_keys: Any, *, keep_parts: bool = False
                 ) -> None:
        self.db = db
        self.blobs = blobs
        self.org_keys = org_keys
        self.keep_parts = keep_parts
        self._pending: list[_Job] = []
        self._flusher: asyncio.Future[None] | None = None

    # ---- writing -------------------------------------------------------------------------

    async def store(self, raw: bytes, parsed: ParsedMessage, deliveries: list[Delivery],
                    meta: InboundMeta, now: datetime) -> list[dict[str, Any]]:
        """Store one message for each delivery; all or nothing. Returns the index rows.

        Concurrent calls are group-committed: while one batch is being written, new calls
        queue up and go together in the next (one blob-store hop, one fsync per directory,
        one database transaction). A batch that fails is retried message by message, so one
        bad message never fails the others.
        """
        job = _Job(raw, parsed, deliveries, meta, now,
                   asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await job.done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                await self._commit(batch)
            except BaseException as exc:  # cancelled mid-batch: nobody may wait forever
                for job in batch:
                    if not job.done.done():
                        job.done.set_exception(_unavailable(exc))
                raise

    async def _commit(self, batch: list[_Job]) -> None:
        ready: list[tuple[_Job, list[dict[str, Any]], list[tuple[str, bytes, bytes]]]] = []
        for job in batch:
            try:
                rows, blobs = await self._prepare_job(job)
                ready.append((job, rows, blobs))
            except Exception as exc:  # noqa: BLE001 - reported to that message's sender
                job.done.set_exception(_unavailable(exc))
        if not ready:
            return
        try:
            await self._write([b for _, _, bl in ready for b in bl],
                              [r for _, rows, _ in ready for r in rows])
        except Exception as exc:  # noqa: BLE001
            if len(ready) == 1:
                ready[0][0].done.set_exception(_unavailable(exc))
                return
            for job, rows, blobs in ready:  # one by one: only the bad one fails
                try:
                    await self._write(blobs, rows)
                except Exception as one:  # noqa: BLE001
                    job.done.set_exception(_unavailable(one))
                else:
                    job.done.set_result(rows)
            return
        for job, rows, _ in ready:
            job.done.set_result(rows)

    async def _prepare_job(self, job: _Job
                           ) -> tuple[list[dict[str, Any]], list[tuple[str, bytes, bytes]]]:
        rows: list[dict[str, Any]] = []
        blobs: list[tuple[str, bytes, bytes]] = []
        for d in job.deliveries:
            key = await self.org_keys.storage_key(d.org)
            row, data = self._prepare(job.raw, job.parsed, d, job.meta, job.now)
            rows.append(row)
            blobs.extend((k, v, key) for k, v in data)
        await self._thread(rows, job.parsed)
        return rows, blobs

    async def _write(self, blobs: list[tuple[str, bytes, bytes]],
                     rows: list[dict[str, Any]]) -> None:
        """Blobs (durable) first, then every index row in one transaction; on failure no
        blob of these rows is left behind."""
        try:
            await self.blobs.put_many(blobs)
            await self.db.run(
                "BEGIN TRANSACTION; FOR $r IN $rows {"
                " CREATE type::thing('inbound_message', $r.id) CONTENT $r.content };"
                " COMMIT TRANSACTION;",
                {"rows": [{"id": r["id"], "content": {k: v for k, v in r.items() if k != "id"}}
                          for r in rows]},
            )
        except BaseException:
            await self._discard([k for k, _, _ in blobs])
            raise

    def _prepare(self, raw: bytes, parsed: ParsedMessage, d: Delivery, meta: InboundMeta,
                 now: datetime) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        mid = new_id("im")
        msg_key = message_key(d.org, d.mailbox, mid)
        e2ee = d.enc_mode == "e2ee"
        data_key = envelope.new_data_key() if e2ee else b""

        def seal(aad: str, data: bytes) -> bytes:
            return envelope.encrypt_part(data_key, data, aad=aad.encode()) if e2ee else data

        blobs = [(msg_key, seal(e2ee_aad(mid), raw))]
        attachments = []
        for att in parsed.attachments:
            akey = attachment_key(d.org, d.mailbox, mid, att.part_id)
            blobs.append((akey, seal(e2ee_aad(mid, att.part_id), att.data)))
            info: dict[str, Any] = {"part_id": att.part_id, "size": att.size, "key": akey}
            if not e2ee:
                info.update(filename=att.filename, content_type=att.content_type,
                            content_id=att.content_id, inline=att.inline,
                            mime_path=att.mime_path)
            attachments.append(info)
        parts = []
        if self.keep_parts and not e2ee:
            for path, ctype, data in parsed.parts:
                pkey = part_key(d.org, d.mailbox, mid, path)
                blobs.append((pkey, data))
                parts.append({"path": path, "content_type": ctype, "size": len(data),
                              "key": pkey})
        row: dict[str, Any] = {
            "id": mid, "org": d.org, "mailbox": d.mailbox, "folder": d.folder,
            "prev_folder": None, "read": False, "starred": False, "deleting": False,
            "received_at": now, "list_key": list_key(mid), "size": len(raw),
            "rcpt_to": d.rcpt_to,
            "mail_from": meta.mail_from, "helo": meta.helo, "peer_ip": meta.peer_ip,
            "tls": meta.tls, "enc_mode": d.enc_mode, "blob_key": msg_key,
            "attachments": attachments, "parts": parts,
            "message_id_header": parsed.message_id, "in_reply_to": parsed.in_reply_to,
            "references": parsed.references, "thread": mid, "auth": meta.auth,
            "spam": meta.spam, "from_address": parsed.from_address.lower(), "to": parsed.to,
            "cc": parsed.cc, "date": parsed.date,
        }
        if e2ee:
            assert d.e2ee_public_key, "e2ee delivery without a public key"
            row["wrapped_key"] = envelope.wrap_data_key(d.e2ee_public_key, data_key)
        else:
            row.update(summary(parsed))
            row["from_address"] = parsed.from_address.lower()
        return row, blobs

    async def _thread(self, rows: list[dict[str, Any]], parsed: ParsedMessage) -> None:
        """RFC 5322 §3.6.4: a reply joins the thread of a message it names in In-Reply-To or
        References (the nearest one found in the same mailbox)."""
        wanted = [i for i in [parsed.in_reply_to, *reversed(parsed.references)] if i]
        if not wanted:
            return
        for row in rows:
            found = await self.db.one(
                "SELECT message_id_header, thread FROM inbound_message WHERE org = $org AND"
                " mailbox = $mb AND message_id_header IN $ids",
                {"org": row["org"], "mb": row["mailbox"], "ids": wanted})
            threads = {f["message_id_header"]: f["thread"] for f in found or []}
            for mid in wanted:
                if mid in threads:
                    row["thread"] = threads[mid]
                    break

    async def _discard(self, keys: list[str]) -> None:
        for key in keys:
            try:
                await self.blobs.delete(key)
            except Exception:  # noqa: BLE001 - best effort; the blob has no index row
                log.warning("could not delete orphan blob %s", key, exc_info=True)

    # ---- reading (every call is scoped to the caller's organization) ----------------------

    async def get(self, org: str, message_id: str) -> dict[str, Any]:
        row = await self.db.one(
            "SELECT * FROM inbound_message WHERE id = type::thing('inbound_message', $id)"
            " AND org = $org AND deleting = false", {"id": message_id, "org": org})
        if not row:
            raise NotFound(f"message {message_id} not found", field=["id"])
        return row[0]

    async def list_messages(self, org: str, mailbox: str, *, folder: str = "INBOX",
                   unread: bool | None = None, starred: bool | None = None,
                   from_address: str | None = None, search: str | None = None,
                   first: int = 50, after: str | None = None) -> list[dict[str, Any]]:
        """Newest first; `after` is the id of the last row of the previous page."""
        sql, params = list_query(org, mailbox, folder=folder, unread=unread, starred=starred,
                                 from_address=from_address, search=search, first=first,
                                 after=after)
        rows = await self.db.one(sql, params) or []
        rows.sort(key=lambda r: r["list_key"])  # already so: the index's order
        return rows

    async def thread(self, org: str, thread: str) -> list[dict[str, Any]]:
        return await self.db.one(
            "SELECT * FROM inbound_message WHERE org = $org AND thread = $t AND deleting = false"
            " ORDER BY id", {"org": org, "t": thread}) or []

    async def raw(self, org: str, row: dict[str, Any]) -> bytes:
        """The stored bytes of the message (ciphertext for e2ee tenants)."""
        assert row["org"] == org
        return await self.blobs.get(row["blob_key"],
                                    tenant_key=await self.org_keys.storage_key(org))

    async def attachment(self, org: str, row: dict[str, Any], part_id: str) -> bytes:
        for att in row.get("attachments") or []:
            if att["part_id"] == part_id:
                return await self.blobs.get(att["key"],
                                            tenant_key=await self.org_keys.storage_key(org))
        raise NotFound(f"attachment {part_id} not found", field=["partId"])

    # ---- changing ------------------------------------------------------------------------

    async def set_flags(self, org: str, message_id: str, *, read: bool | None = None,
                        starred: bool | None = None) -> dict[str, Any]:
        changes = {k: v for k, v in (("read", read), ("starred", starred)) if v is not None}
        await self.get(org, message_id)
        rows = await self.db.one(
            "UPDATE type::thing('inbound_message', $id) MERGE $changes WHERE org = $org",
            {"id": message_id, "changes": changes, "org": org})
        return rows[0]

    async def move(self, org: str, message_id: str, folder: str) -> dict[str, Any]:
        if folder not in FOLDERS:
            raise ValidationError(f"folder must be one of {', '.join(FOLDERS)}",
                                  field=["folder"])
        row = await self.get(org, message_id)
        prev = row["folder"] if folder == "TRASH" and row["folder"] != "TRASH" else None
        rows = await self.db.one(
            "UPDATE type::thing('inbound_message', $id) SET folder = $folder,"
            " prev_folder = $prev WHERE org = $org",
            {"id": message_id, "folder": folder, "prev": prev, "org": org})
        return rows[0]

    async def restore(self, org: str, message_id: str) -> dict[str, Any]:
        row = await self.get(org, message_id)
        if row["folder"] != "TRASH":
            raise ValidationError("only a message in the Trash can be restored", field=["id"])
        return await self.move(org, message_id, row.get("prev_folder") or "INBOX")

    async def delete_forever(self, org: str, message_id: str) -> None:
        """Hide the row, remove every blob of the message, then the row itself."""
        row = await self.get(org, message_id)
        await self.db.run("UPDATE type::thing('inbound_message', $id) SET deleting = true"
                          " WHERE org = $org", {"id": message_id, "org": org})
        for prefix in message_prefixes(org, row["mailbox"], message_id):
            await self.blobs.delete_prefix(prefix)
        await self.db.run("DELETE type::thing('inbound_message', $id) WHERE org = $org",
                          {"id": message_id, "org": org})
