"""Database schema: tables, indexes and functions, applied idempotently at start-up.

`fn::message_status` derives a message's status from its recipients' statuses, inside the
same transaction that changes them, so concurrent jobs of one message cannot race it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inbox.storage.db import Database

# Tenant data carries `org` (our organization id); every tenant query filters on it.
SCHEMA = """
DEFINE TABLE IF NOT EXISTS organization SCHEMALESS;
DEFINE TABLE IF NOT EXISTS domain SCHEMALESS;
DEFINE TABLE IF NOT EXISTS has_domain TYPE RELATION IN organization OUT domain SCHEMALESS;
DEFINE INDEX IF NOT EXISTS has_domain_out ON has_domain FIELDS out UNIQUE;
DEFINE INDEX IF NOT EXISTS has_domain_org ON has_domain FIELDS org;
DEFINE TABLE IF NOT EXISTS api_key SCHEMALESS;
DEFINE INDEX IF NOT EXISTS api_key_org ON api_key FIELDS org;
DEFINE TABLE IF NOT EXISTS message SCHEMALESS;
-- Listing newest first: (org, list_key) ascending is message ids descending, so a page is an
-- index range that stops at its LIMIT; ORDER BY created_at DESC read and sorted every message
-- of the organization (217 ms for 10,000), holding the serialised engine meanwhile.
DEFINE INDEX IF NOT EXISTS message_list ON message FIELDS org, list_key;
REMOVE INDEX IF EXISTS message_org ON message;
DEFINE TABLE IF NOT EXISTS message_raw SCHEMALESS;
DEFINE TABLE IF NOT EXISTS recipient SCHEMALESS;
DEFINE INDEX IF NOT EXISTS recipient_message ON recipient FIELDS message;
DEFINE INDEX IF NOT EXISTS recipient_job ON recipient FIELDS job;
DEFINE TABLE IF NOT EXISTS job SCHEMALESS;
DEFINE INDEX IF NOT EXISTS job_due ON job FIELDS status, due;
DEFINE INDEX IF NOT EXISTS job_message ON job FIELDS message;
DEFINE TABLE IF NOT EXISTS event SCHEMALESS;
DEFINE INDEX IF NOT EXISTS event_message ON event FIELDS message;
-- Unread indexes only cost writes (a job's owner changes twice per delivery; releasing a
-- worker's leases scans job_due's 'processing' prefix instead). Dropped from older databases.
REMOVE INDEX IF EXISTS job_owner ON job;
-- A leased job's `due` is its lease's end, so job_due also finds expired leases
-- (delivery/queue.py); leases taken before that are given the same `due` here.
UPDATE job SET due = lease_until WHERE status = 'processing' AND lease_until != NONE
  AND due != lease_until;
REMOVE INDEX IF EXISTS job_lease ON job;
REMOVE INDEX IF EXISTS event_at ON event;
DEFINE TABLE IF NOT EXISTS suppression SCHEMALESS;
DEFINE INDEX IF NOT EXISTS suppression_org ON suppression FIELDS org, created_at;
DEFINE TABLE IF NOT EXISTS idempotency SCHEMALESS;
DEFINE INDEX IF NOT EXISTS idempotency_expiry ON idempotency FIELDS expires_at;
DEFINE TABLE IF NOT EXISTS quota_counter SCHEMALESS;
DEFINE INDEX IF NOT EXISTS has_domain_domain ON has_domain FIELDS domain;
DEFINE TABLE IF NOT EXISTS mailbox SCHEMALESS;
DEFINE INDEX IF NOT EXISTS mailbox_address ON mailbox FIELDS address UNIQUE;
DEFINE INDEX IF NOT EXISTS mailbox_org ON mailbox FIELDS org;
DEFINE TABLE IF NOT EXISTS alias SCHEMALESS;
DEFINE INDEX IF NOT EXISTS alias_address ON alias FIELDS address UNIQUE;
DEFINE INDEX IF NOT EXISTS alias_org ON alias FIELDS org;
DEFINE TABLE IF NOT EXISTS inbound_message SCHEMALESS;
-- Newest first by list_key, as message_list (above).
DEFINE INDEX IF NOT EXISTS inbound_folder ON inbound_message FIELDS org, mailbox, folder, list_key;
REMOVE INDEX IF EXISTS inbound_list ON inbound_message;
DEFINE INDEX IF NOT EXISTS inbound_thread ON inbound_message FIELDS org, thread;
DEFINE INDEX IF NOT EXISTS inbound_msgid ON inbound_message FIELDS org, mailbox, message_id_header;
DEFINE TABLE IF NOT EXISTS rate_counter SCHEMALESS;
DEFINE INDEX IF NOT EXISTS rate_counter_expiry ON rate_counter FIELDS expires_at;
DEFINE FUNCTION OVERWRITE fn::message_status($s: array) {
  LET $d = array::distinct($s);
  LET $pending = 'QUEUED' IN $d OR 'DEFERRED' IN $d;
  LET $failed = 'BOUNCED' IN $d OR 'EXPIRED' IN $d;
  IF array::len(array::complement($d, ['SUPPRESSED'])) == 0 { RETURN 'SUPPRESSED' };
  IF $pending AND ('DELIVERED' IN $d OR $failed) { RETURN 'SENDING' };
  IF 'DEFERRED' IN $d { RETURN 'DEFERRED' };
  IF $pending { RETURN 'QUEUED' };
  IF 'DELIVERED' IN $d AND $failed { RETURN 'PARTIALLY_DELIVERED' };
  IF 'DELIVERED' IN $d { RETURN 'DELIVERED' };
  RETURN 'FAILED';
};
DEFINE TABLE IF NOT EXISTS tlsrpt_counter SCHEMALESS;
DEFINE INDEX IF NOT EXISTS tlsrpt_counter_day ON tlsrpt_counter FIELDS day, policy_domain;
DEFINE TABLE IF NOT EXISTS tlsrpt_sent SCHEMALESS;
DEFINE INDEX IF NOT EXISTS tlsrpt_sent_day ON tlsrpt_sent FIELDS day;
DEFINE TABLE IF NOT EXISTS mta_sts_policy SCHEMALESS;
DEFINE INDEX IF NOT EXISTS mta_sts_policy_expiry ON mta_sts_policy FIELDS expires_at;
"""


async def migrate(db: Database) -> None:
    await db.run(SCHEMA)
    await _fold_quota_counters(db)
    await _backfill_list_keys(db)


# Order-reversing map over the characters of our ids: for ids of one length, list_key order
# is id order reversed. Ids start with their creation time (storage/db.py new_id).
_ID_CHARS = "0123456789_abcdefghijklmnopqrstuvwxyz"
_REVERSE = str.maketrans(_ID_CHARS, _ID_CHARS[::-1])


def list_key(message_id: str) -> str:
    """The key of a message (or inbound message) in its newest-first list index."""
    return message_id.translate(_REVERSE)


async def _backfill_list_keys(db: Database) -> None:
    """Rows stored before list_key existed get theirs (one table scan per table, once)."""
    done = await db.one("SELECT * FROM ONLY inbox_meta:migrations") or {}
    for table in ("message", "inbound_message"):
        flag = f"{table}_list_key"
        if done.get(flag):
            continue
        ids = await db.one(f"SELECT VALUE meta::id(id) FROM {table} WHERE list_key = NONE") or []
        for start in range(0, len(ids), 500):
            await db.run(f"FOR $r IN $rows {{ UPDATE type::thing('{table}', $r.id)"
                         " SET list_key = $r.k RETURN NONE };",
                         {"rows": [{"id": i, "k": list_key(i)} for i in ids[start:start + 500]]})
        await db.run(f"UPSERT inbox_meta:migrations SET {flag} = true RETURN NONE;")


# Before session 6 a domain's quota counters were three records per window:
# [domain, 'hour', 'YYYYMMDDHH'], [domain, 'day', 'YYYYMMDD'] and [domain, 'queued', 0].
_FOLD = """
BEGIN TRANSACTION;
FOR $f IN $folds {
  UPSERT type::thing('quota_counter', [$f.domain, 'send']) SET
    hour_n = IF hour > $f.hour THEN hour_n ELSE IF hour = $f.hour THEN hour_n + $f.hour_n
             ELSE $f.hour_n END,
    hour = IF hour > $f.hour THEN hour ELSE $f.hour END,
    day_n = IF day > $f.day THEN day_n ELSE IF day = $f.day THEN day_n + $f.day_n
            ELSE $f.day_n END,
    day = IF day > $f.day THEN day ELSE $f.day END,
    queued = (queued OR 0) + $f.queued
    RETURN NONE;
};
FOR $key IN $old { DELETE type::thing('quota_counter', $key) };
COMMIT TRANSACTION;
"""


async def _fold_quota_counters(db: Database) -> None:
    """Counters of the old three-record form become the one-record form, in one transaction
    (so a second instance migrating at the same time cannot count them twice)."""
    rows = await db.one("SELECT meta::id(id) AS key, n FROM quota_counter"
                        " WHERE array::len(meta::id(id)) = 3")
    if not rows:
        return
    folds: dict[str, dict[str, Any]] = {}
    for row in rows:
        domain, kind, window = row["key"]
        fold = folds.setdefault(domain, {"domain": domain, "hour": "", "hour_n": 0,
                                         "day": "", "day_n": 0, "queued": 0})
        n = int(row.get("n") or 0)
        if kind == "queued":
            fold["queued"] += n
        elif kind in ("hour", "day") and str(window) >= fold[kind]:
            fold[kind], fold[f"{kind}_n"] = str(window), n
    await db.run(_FOLD, {"folds": list(folds.values()), "old": [r["key"] for r in rows]})
