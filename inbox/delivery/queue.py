"""The delivery queue in SurrealDB: leasing due jobs, completing, retrying, releasing, cleanup.

A lease is one conditional UPDATE that re-checks the claim condition, so two workers cannot
both take a job (with the serialised gateway embedded, with transactions on a server). A lease
that expires (crashed worker) is taken over by the next worker that leases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from surrealdb import RecordID

from inbox.storage import Database, new_id

_CLAIMABLE = ("(status = 'queued' AND due <= $now)"
              " OR (status = 'processing' AND lease_until < $now)")

# Two index range scans (job_due, job_lease) rather than one OR, which would scan the table.
_LEASE = f"""
LET $stale = (SELECT id, lease_until FROM job WHERE status = 'processing'
              AND lease_until < $now LIMIT $limit).id;
LET $due = (SELECT id, due FROM job WHERE status = 'queued' AND due <= $now
            ORDER BY due LIMIT $limit).id;
UPDATE array::slice(array::concat($stale, $due), 0, $limit)
  SET status = 'processing', owner = $owner, lease_until = $until,
      attempts = attempts + 1, last_attempt_at = $now
  WHERE {_CLAIMABLE}
  RETURN AFTER;
"""


# Many jobs' results in one transaction (one commit, one fsync). A job whose lease we lost
# (another worker took it over after expiry) is skipped and reported back.
_COMPLETE = """
BEGIN TRANSACTION;
LET $lost = (SELECT VALUE meta::id(id) FROM $job_ids
             WHERE owner != $owner OR status != 'processing');
FOR $c IN $batch {
  IF $c.job NOT IN $lost {
    FOR $u IN $c.updates {
      UPDATE type::thing('recipient', $u.id) SET status = $u.status,
        attempts = attempts + 1, last_response = $u.response,
        next_attempt_at = $u.next, updated_at = $now RETURN NONE;
    };
    FOR $s IN $c.suppressions {
      UPSERT type::thing('suppression', $s.key) CONTENT $s.row RETURN NONE;
    };
    IF array::len($c.events) > 0 { INSERT INTO event $c.events RETURN NONE };
    IF $c.pending {
      UPDATE type::thing('job', $c.job) SET status = 'queued', due = $c.next,
        owner = NONE, lease_until = NONE RETURN NONE;
    } ELSE {
      UPDATE type::thing('job', $c.job) SET status = $c.final, owner = NONE,
        lease_until = NONE, finished_at = $now RETURN NONE;
      UPSERT type::thing('quota_counter', [$c.domain, 'queued', 0]) SET n -= 1 RETURN NONE;
    };
    LET $statuses = (SELECT VALUE status FROM recipient WHERE message = $c.message);
    UPDATE type::thing('message', $c.message) SET status = fn::message_status($statuses),
      updated_at = $now RETURN NONE;
  };
};
RETURN $lost;
COMMIT TRANSACTION;
"""


def backoff(attempt: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [delay/2, delay] (attempt counts from 1)."""
    delay = min(maximum, base * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(delay / 2, delay)


@dataclass
class RecipientOutcome:
    """What happened to one recipient in one attempt, decided by the worker."""

    recipient_id: str
    address: str
    status: str  # DELIVERED | DEFERRED | BOUNCED | EXPIRED
    response: str
    suppress: str | None = None  # ADDRESS | DOMAIN
    suppress_value: str | None = None


@dataclass
class JobOutcome:
    job: dict[str, Any]
    recipients: list[RecipientOutcome] = field(default_factory=list)
    next_due: datetime | None = None  # set when some recipients are deferred
    detail: str = ""
    tls: dict[str, Any] | None = None  # the attempt's TLS outcome (TlsOutcome.as_dict + mx)


# A job's message row, raw bytes and recipients still to deliver.
Loaded = tuple[dict[str, Any] | None, bytes | None, list[dict[str, Any]]]


class Queue:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def lease(self, owner: str, limit: int, ttl_secs: float, now: datetime
                    ) -> list[dict[str, Any]]:
        rows = await self.db.one(_LEASE, {
            "owner": owner, "limit": limit, "now": now,
            "until": now + timedelta(seconds=ttl_secs),
        })
        return rows or []

    async def load(self, job: dict[str, Any]) -> Loaded:
        """The message row, its raw bytes and this job's recipients still to deliver."""
        message, raw, rcpts = await self.db.run(
            "SELECT * FROM ONLY type::thing('message', $m);"
            "SELECT VALUE raw FROM ONLY type::thing('message_raw', $m);"
            "SELECT * FROM recipient WHERE job = $job AND status IN ['QUEUED', 'DEFERRED'];",
            {"m": job["message"], "job": job["id"]},
        )
        return message, raw, rcpts or []

    async def load_many(self, jobs: list[dict[str, Any]]) -> dict[str, Loaded]:
        """`load` for a whole leased batch in one round trip (direct and indexed lookups)."""
        if not jobs:
            return {}
        message_ids = sorted({j["message"] for j in jobs})
        messages, raws, rcpts = await self.db.run(
            "SELECT * FROM $messages;"
            "SELECT meta::id(id) AS id, raw FROM $raws;"
            "SELECT * FROM recipient WHERE job IN $jobs AND status IN ['QUEUED', 'DEFERRED'];",
            {"messages": [RecordID("message", m) for m in message_ids],
             "raws": [RecordID("message_raw", m) for m in message_ids],
             "jobs": [j["id"] for j in jobs]})
        by_message = {m["id"]: m for m in messages or []}
        raw_by_message = {r["id"]: r["raw"] for r in raws or []}
        by_job: dict[str, list[dict[str, Any]]] = {}
        for row in rcpts or []:
            by_job.setdefault(row["job"], []).append(row)
        return {j["id"]: (by_message.get(j["message"]), raw_by_message.get(j["message"]),
                          by_job.get(j["id"], [])) for j in jobs}

    async def complete(self, outcome: JobOutcome, owner: str, now: datetime) -> bool:
        """Record one attempt's results; returns False when our lease was lost meanwhile."""
        return not await self.complete_many([outcome], owner, now)

    async def complete_many(self, outcomes: list[JobOutcome], owner: str, now: datetime
                            ) -> set[str]:
        """Record several jobs' attempts in one transaction; returns the ids of lost leases."""
        batch = [self._entry(o, now) for o in outcomes]
        results = await self.db.run(_COMPLETE, {
            "batch": batch, "owner": owner, "now": now,
            "job_ids": [RecordID("job", o.job["id"]) for o in outcomes]})
        lost = next((r for r in reversed(results) if isinstance(r, list)), [])
        return set(lost)

    @staticmethod
    def _entry(outcome: JobOutcome, now: datetime) -> dict[str, Any]:
        job = outcome.job
        recipients = outcome.recipients
        return {
            "job": job["id"], "message": job["message"], "domain": job["sending_domain"],
            "pending": any(r.status == "DEFERRED" for r in recipients),
            "final": "dead" if any(r.status in ("BOUNCED", "EXPIRED") for r in recipients)
            else "done",
            "next": outcome.next_due,
            "events": [{
                "id": new_id("evt"), "org": job["org"], "message": job["message"],
                "type": r.status, "at": now, "recipient": r.address, "detail": r.response,
                "tls": outcome.tls,
            } for r in recipients],
            "updates": [{"id": r.recipient_id, "status": r.status, "response": r.response,
                         "next": outcome.next_due if r.status == "DEFERRED" else None}
                        for r in recipients],
            "suppressions": [{
                "key": [job["org"], r.suppress, r.suppress_value],
                "row": {"org": job["org"], "scope": r.suppress, "target": r.suppress_value,
                        "reason": r.response[:500], "source": "bounce", "created_at": now,
                        "expires_at": None, "message": job["message"]},
            } for r in recipients if r.suppress and r.suppress_value],
        }

    async def release(self, owner: str) -> int:
        """Give back every lease this owner holds (graceful shutdown)."""
        rows = await self.db.one(
            "UPDATE job SET status = 'queued', owner = NONE, lease_until = NONE,"
            " attempts = math::max([0, attempts - 1])"
            " WHERE owner = $owner AND status = 'processing' RETURN id",
            {"owner": owner},
        )
        return len(rows or [])

    async def cleanup(self, now: datetime, dead_job_secs: int, delivery_secs: int) -> int:
        """Remove finished jobs and old delivery records past their retention."""
        jobs_before = now - timedelta(seconds=dead_job_secs)
        records_before = now - timedelta(seconds=delivery_secs)
        results = await self.db.run(
            """DELETE job WHERE status IN ['done', 'dead'] AND finished_at < $jobs_before
              RETURN BEFORE;
            LET $old = (SELECT VALUE meta::id(id) FROM message
                        WHERE updated_at < $records_before
                        AND status NOT IN ['QUEUED', 'DEFERRED', 'SENDING']);
            DELETE event WHERE message IN $old;
            DELETE recipient WHERE message IN $old;
            DELETE job WHERE message IN $old;
            FOR $m IN $old {
              DELETE type::thing('message_raw', $m);
              DELETE type::thing('message', $m);
            };""",
            {"jobs_before": jobs_before, "records_before": records_before},
        )
        return len(results[0] or [])
