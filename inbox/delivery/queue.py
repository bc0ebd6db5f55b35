"""The delivery queue in SurrealDB: leasing due jobs, completing, retrying, releasing, cleanup.

A lease is one conditional UPDATE that re-checks the claim condition, so two workers cannot
both take a job (with the serialised gateway embedded, with transactions on a server). A lease
that expires (crashed worker) is taken over by the next worker that leases.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from surrealdb import RecordID

from inbox.delivery import tlsrpt
from inbox.storage import Database, new_id
from inbox.storage.db import DbThrow

# A job's `due` is when it may next be claimed: for a queued job, its (next) attempt; for a
# leased one ('processing'), the end of the lease (also kept in lease_until), after which
# another worker takes it over. So one index (job_due: status, due) serves both scans; a
# second index on the lease end cost the engine three more index writes per delivery.
# (lease_until is checked too, so a lease taken by an older instance that did not move `due`
# is not taken over early while both versions share the database.)
_CLAIMABLE = ("(status = 'queued' AND due <= $now)"
              " OR (status = 'processing' AND due < $now"
              " AND (lease_until = NONE OR lease_until < $now))")

# Two index range scans of job_due rather than one OR, which would scan the table. Each yields
# the oldest first and stops at $limit; an ORDER BY would make the engine read and sort the
# whole due backlog first (57 ms instead of 17 ms with 1000 due).
_LEASE = f"""
LET $stale = (SELECT VALUE id FROM job WHERE status = 'processing' AND due < $now
              LIMIT $limit);
LET $due = (SELECT VALUE id FROM job WHERE status = 'queued' AND due <= $now
            LIMIT $limit);
UPDATE array::slice(array::concat($stale, $due), 0, $limit)
  SET status = 'processing', owner = $owner, lease_until = $until, due = $until,
      attempts = attempts + 1, last_attempt_at = $now
  WHERE {_CLAIMABLE}
  RETURN AFTER;
"""


# Many jobs' results in one transaction (one commit, one fsync), as whole-batch statements: a
# statement costs the embedded engine far more than a row, so rows are gathered per kind. If a
# lease was lost (another worker took the job over after expiry) nothing is written; the caller
# learns which jobs and writes the others again.
_COMPLETE = """
BEGIN TRANSACTION;
LET $lost = (SELECT VALUE meta::id(id) FROM $job_ids
             WHERE owner != $owner OR status != 'processing');
IF array::len($lost) > 0 { THROW 'LOST|' + array::join($lost, ',') };
FOR $u IN $updates {
  UPDATE $u.ids SET status = $u.status, attempts = attempts + 1,
    last_response = $u.response, next_attempt_at = $u.next, final_event = $u.final,
    updated_at = $now RETURN NONE;
};
FOR $s IN $suppressions {
  UPSERT type::thing('suppression', $s.key) CONTENT $s.row RETURN NONE;
};
IF array::len($events) > 0 { INSERT INTO event $events RETURN NONE };
FOR $j IN $requeue {
  UPDATE type::thing('job', $j.id) SET status = 'queued', due = $j.next, owner = NONE,
    lease_until = NONE RETURN NONE;
};
IF array::len($done) > 0 {
  UPDATE $done SET status = 'done', owner = NONE, lease_until = NONE, finished_at = $now
    RETURN NONE;
};
IF array::len($dead) > 0 {
  UPDATE $dead SET status = 'dead', owner = NONE, lease_until = NONE, finished_at = $now
    RETURN NONE;
};
FOR $q IN $unqueue {
  UPSERT type::thing('quota_counter', [$q.domain, 'send']) SET queued = (queued OR 0) - $q.n
    RETURN NONE;
};
""" + tlsrpt.COUNT + """FOR $m IN $known {
  UPDATE $m.ids SET status = $m.status, updated_at = $now RETURN NONE;
};
FOR $m IN $messages {
  LET $statuses = (SELECT VALUE status FROM recipient WHERE message = $m);
  UPDATE type::thing('message', $m) SET status = fn::message_status($statuses),
    updated_at = $now RETURN NONE;
};
COMMIT TRANSACTION;
"""


def _tls_key(tls: dict[str, Any] | None) -> Any:
    """A hashable stand-in for an attempt's TLS outcome, equal for equal outcomes."""
    if tls is None:
        return None
    try:
        return tuple(sorted(tls.items()))
    except TypeError:  # an unhashable value: compare by the text
        return json.dumps(tls, sort_keys=True, default=str)


def message_status(statuses: list[str]) -> str:
    """A message's status from its recipients' statuses: `fn::message_status` (storage/schema.py)
    in Python, for a completion that holds every recipient of the message."""
    d = set(statuses)
    pending = "QUEUED" in d or "DEFERRED" in d
    failed = "BOUNCED" in d or "EXPIRED" in d
    if not d - {"SUPPRESSED"}:
        return "SUPPRESSED"
    if pending and ("DELIVERED" in d or failed):
        return "SENDING"
    if "DEFERRED" in d:
        return "DEFERRED"
    if pending:
        return "QUEUED"
    if "DELIVERED" in d and failed:
        return "PARTIALLY_DELIVERED"
    return "DELIVERED" if "DELIVERED" in d else "FAILED"


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
    # TLS-RPT counters this attempt adds 1 to (tlsrpt.counter: id, columns), when the
    # recipient domain asks for reports; counted in the same transaction as the results.
    tlsrpt: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


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
        """Record several jobs' attempts in one transaction; returns the ids of lost leases
        (those jobs' results are not written: another worker owns them now)."""
        lost: set[str] = set()
        while outcomes:
            try:
                await self.db.run_grouped(_COMPLETE, self._batch(outcomes, owner, now),
                                        procedure=True)
            except DbThrow as exc:
                if exc.throw_code != "LOST":
                    raise
                gone = set(exc.detail.split(","))
                lost |= gone
                outcomes = [o for o in outcomes if o.job["id"] not in gone]
                continue
            break
        return lost

    @staticmethod
    def _batch(outcomes: list[JobOutcome], owner: str, now: datetime) -> dict[str, Any]:
        """The statement parameters for `outcomes`, gathered per kind of row.

        A recipient's final event (DELIVERED, BOUNCED, EXPIRED) is kept on its recipient row
        (`final_event`, without the address, which the row has), which is written anyway;
        only a DEFERRED attempt, of which a recipient may have many, is an event row. An
        event row costs the engine ~200 us of CPU under its serialising lock;
        `Message.events` merges both (graphql/types.py).

        Recipients given the same values (status, reply, next attempt, final event) are
        updated by one statement over their ids, and so are messages given the same status:
        the engine spent ~250 us per recipient updating them one by one in a FOR loop, whose
        every `$u.field` copies the whole item, and ~50 us per row of one UPDATE over ids."""
        updates: list[dict[str, Any]] = []
        suppressions: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        requeue: list[dict[str, Any]] = []
        done: list[RecordID] = []
        dead: list[RecordID] = []
        unqueue: dict[str, int] = {}
        messages: dict[str, None] = {}
        known: dict[str, list[RecordID]] = {}  # status -> messages
        tlsrpt: dict[str, dict[str, Any]] = {}  # counter id -> its columns and increment
        alike: dict[Any, dict[str, Any]] = {}  # recipients given the same values
        for outcome in outcomes:
            job, recipients = outcome.job, outcome.recipients
            if job.get("whole") and job.get("attempts") == 1 and recipients:
                # The message's only job, first attempt: these are all its recipients.
                status = message_status([r.status for r in recipients])
                known.setdefault(status, []).append(RecordID("message", job["message"]))
            else:
                messages[job["message"]] = None
            for counter_id, columns in outcome.tlsrpt:
                item = tlsrpt.get(counter_id)
                if item is None:
                    item = tlsrpt[counter_id] = {"id": counter_id, "n": 0, **columns}
                item["n"] += 1
            tls_key = _tls_key(outcome.tls)
            for r in recipients:
                final = r.status != "DEFERRED"
                next_due = None if final else outcome.next_due
                key = (r.status, r.response, next_due, tls_key)
                group = alike.get(key)
                if group is None:
                    group = alike[key] = {"ids": [], "status": r.status, "response": r.response,
                                          "next": next_due, "final": None}
                    if final:
                        group["final"] = {"type": r.status, "at": now, "detail": r.response,
                                          "tls": outcome.tls}
                    updates.append(group)
                group["ids"].append(RecordID("recipient", r.recipient_id))
                if not final:
                    events.append({"id": new_id("evt"), "org": job["org"],
                                   "message": job["message"], "type": r.status, "at": now,
                                   "recipient": r.address, "detail": r.response,
                                   "tls": outcome.tls})
                if r.suppress and r.suppress_value:
                    suppressions.append({
                        "key": [job["org"], r.suppress, r.suppress_value],
                        "row": {"org": job["org"], "scope": r.suppress,
                                "target": r.suppress_value, "reason": r.response[:500],
                                "source": "bounce", "created_at": now, "expires_at": None,
                                "message": job["message"]}})
            if any(r.status == "DEFERRED" for r in recipients):
                requeue.append({"id": job["id"], "next": outcome.next_due})
                continue
            failed = any(r.status in ("BOUNCED", "EXPIRED") for r in recipients)
            (dead if failed else done).append(RecordID("job", job["id"]))
            domain = job["sending_domain"]
            unqueue[domain] = unqueue.get(domain, 0) + 1
        return {
            "owner": owner, "now": now,
            "job_ids": [RecordID("job", o.job["id"]) for o in outcomes],
            "updates": updates, "suppressions": suppressions, "events": events,
            "requeue": requeue, "done": done, "dead": dead,
            "unqueue": [{"domain": d, "n": n} for d, n in unqueue.items()],
            "messages": list(messages),
            "known": [{"ids": ids, "status": status} for status, ids in known.items()],
            "tlsrpt": list(tlsrpt.values()),
        }

    async def release(self, owner: str, now: datetime | None = None) -> int:
        """Give back every lease this owner holds (graceful shutdown): due again at `now`."""
        rows = await self.db.one(
            "UPDATE job SET status = 'queued', owner = NONE, lease_until = NONE, due = $now,"
            " attempts = math::max([0, attempts - 1])"
            " WHERE owner = $owner AND status = 'processing' RETURN id",
            {"owner": owner, "now": now or datetime.now(UTC)},
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
