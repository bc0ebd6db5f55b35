"""The queue on the real engine: leases are exclusive, expire and are taken over, are released
on shutdown; many workers deliver many jobs exactly once."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from inbox.app import build_services
from inbox.delivery.queue import backoff
from inbox.message import OutboundMessage
from inbox.submission import SubmitOptions, submit
from inbox.tenancy import Principal
from tests.conftest import make_settings, make_tenant, route_to_sink


@pytest.fixture
async def open_services(tmp_path: Any, dns_server: Any) -> AsyncIterator[Any]:
    """A factory: services on the real engine with test settings; closed after the test."""
    opened: list[Any] = []

    async def make(**kw: Any) -> Any:
        settings = make_settings(
            tmp_path,
            dns_server,
            INBOX_DB_SYNC="false",
            INBOX_QUOTA_HOURLY_SEND_LIMIT=100000,
            INBOX_QUOTA_DAILY_SEND_LIMIT=100000,
            **kw,
        )
        opened.append(await build_services(settings))
        return opened[-1]

    yield make
    for services in opened:
        await services.db.close()


async def _submit_many(services: Any, tenant: Any, n: int) -> list[str]:
    principal = Principal(tenant.org, "key_test", frozenset({"send"}))
    ids = []
    for i in range(n):
        msg = OutboundMessage(
            from_=f"a@{tenant.domain}", to=[f"u{i}@dest.test"], subject=f"n{i}", text_body="x"
        )
        ids.append(
            (
                await submit(
                    services.db,
                    principal,
                    msg,
                    SubmitOptions(),
                    settings=services.settings,
                    now=services.clock(),
                )
            )["id"]
        )
    return ids


async def test_leases_are_exclusive_and_expire(open_services: Any, dns_server: Any) -> None:
    services = await open_services()
    tenant = await make_tenant(services, dns_server)
    await _submit_many(services, tenant, 5)
    now = services.clock()
    first = await services.queue.lease("w1", 10, 30, now)
    second = await services.queue.lease("w2", 10, 30, now)
    assert len(first) == 5 and second == []
    # w1 "crashes": once its leases expire, w2 takes the jobs over.
    later = now + timedelta(seconds=31)
    taken = await services.queue.lease("w2", 10, 30, later)
    assert sorted(j["id"] for j in taken) == sorted(j["id"] for j in first)
    assert all(j["owner"] == "w2" and j["attempts"] == 2 for j in taken)
    # Shutdown releases: the jobs are due again for anyone.
    assert await services.queue.release("w2") == 5
    again = await services.queue.lease("w3", 10, 30, later)
    assert len(again) == 5 and all(j["attempts"] == 2 for j in again)


async def test_concurrent_leasing_never_double_claims(open_services: Any, dns_server: Any) -> None:
    services = await open_services()
    tenant = await make_tenant(services, dns_server)
    await _submit_many(services, tenant, 60)
    now = services.clock()
    batches = await asyncio.gather(*(services.queue.lease(f"w{i}", 7, 30, now) for i in range(12)))
    claimed = [j["id"] for batch in batches for j in batch]
    assert len(claimed) == 60 and len(set(claimed)) == 60


async def test_many_workers_deliver_each_job_once(
    open_services: Any, dns_server: Any, smtp_sink: Any
) -> None:
    services = await open_services(
        SMTP_OUTBOUND_PORT=smtp_sink.port,
        SMTP_OUTBOUND_QUEUE_BATCH_SIZE=5,
        SMTP_OUTBOUND_CONCURRENCY=4,
    )
    tenant = await make_tenant(services, dns_server)
    route_to_sink(dns_server, "dest.test")
    n = 120
    await _submit_many(services, tenant, n)
    stop = asyncio.Event()
    workers = [asyncio.create_task(services.worker(f"w{i}").run(stop)) for i in range(6)]
    try:
        await smtp_sink.wait_for(n, timeout=60)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    counts = Counter(r for m in smtp_sink.messages for r in m.rcpt_tos)
    assert len(counts) == n and set(counts.values()) == {1}
    statuses = await services.db.one("SELECT VALUE status FROM message")
    assert set(statuses) == {"DELIVERED"}
    owners = await services.db.one("SELECT VALUE owner FROM job WHERE owner != NONE")
    assert owners == []


def test_backoff_grows_and_is_capped() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff(a, 10, 100, rng) for a in range(1, 8)]
    assert 5 <= delays[0] <= 10 and 10 <= delays[1] <= 20 and 20 <= delays[2] <= 40
    assert all(50 <= d <= 100 for d in delays[4:])


async def test_cleanup_removes_old_finished_work(
    open_services: Any, dns_server: Any, smtp_sink: Any
) -> None:
    services = await open_services(SMTP_OUTBOUND_PORT=smtp_sink.port)
    tenant = await make_tenant(services, dns_server)
    route_to_sink(dns_server, "dest.test")
    ids = await _submit_many(services, tenant, 3)
    stop = asyncio.Event()
    worker = asyncio.create_task(services.worker("w").run(stop))
    await smtp_sink.wait_for(3, timeout=20)
    for _ in range(100):
        statuses = await services.db.one("SELECT VALUE status FROM message")
        if set(statuses) == {"DELIVERED"}:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await worker
    # A still-queued message must survive cleanup however old it is.
    pending = await _submit_many(services, tenant, 1)
    now = services.clock()
    removed = await services.queue.cleanup(now + timedelta(days=1), 3600, 3600)
    assert removed == 3
    left = await services.db.one("SELECT VALUE meta::id(id) FROM message")
    assert left == pending
    assert (
        await services.db.one(
            "SELECT VALUE id FROM message_raw WHERE meta::id(id) IN $ids", {"ids": ids}
        )
        == []
    )
    assert (
        await services.db.one("SELECT VALUE id FROM event WHERE message IN $ids", {"ids": ids})
        == []
    )
    # Too recent: nothing more goes.
    assert await services.queue.cleanup(now, 3600, 3600) == 0


async def test_completion_after_losing_the_lease_changes_nothing(
    open_services: Any, dns_server: Any
) -> None:
    from inbox.delivery.queue import JobOutcome, RecipientOutcome

    services = await open_services()
    tenant = await make_tenant(services, dns_server)
    [msg_id] = await _submit_many(services, tenant, 1)
    now = services.clock()
    [job] = await services.queue.lease("w1", 1, 30, now)
    [taken] = await services.queue.lease("w2", 1, 30, now + timedelta(seconds=31))
    rcpt = (await services.queue.load(job))[2][0]
    late = JobOutcome(job, [RecipientOutcome(rcpt["id"], rcpt["address"], "DELIVERED", "250 ok")])
    assert await services.queue.complete(late, "w1", now) is False
    status = await services.db.one(
        "SELECT VALUE status FROM recipient WHERE message = $m", {"m": msg_id}
    )
    assert status == ["QUEUED"]
    good = JobOutcome(taken, [RecipientOutcome(rcpt["id"], rcpt["address"], "DELIVERED", "250 ok")])
    assert await services.queue.complete(good, "w2", now) is True
    row = await services.db.one("SELECT status FROM ONLY type::thing('message', $m)", {"m": msg_id})
    assert row["status"] == "DELIVERED"


async def test_python_message_status_matches_the_database_function(open_services: Any) -> None:
    """Completion computes a whole job's message status in Python; it must agree with
    fn::message_status, which the other completions use, for every mix of statuses."""
    from itertools import combinations

    from inbox.delivery.queue import message_status

    services = await open_services()
    names = ["QUEUED", "DEFERRED", "DELIVERED", "BOUNCED", "EXPIRED", "SUPPRESSED"]
    mixes = [list(c) for n in range(1, len(names) + 1) for c in combinations(names, n)]
    results = await services.db.run(";".join(
        f"RETURN fn::message_status($s{i})" for i in range(len(mixes))),
        {f"s{i}": mix for i, mix in enumerate(mixes)})
    assert len(results) == len(mixes) == 63
    assert [message_status(mix) for mix in mixes] == results
    assert len(set(results)) == 7  # every outcome of the function is reached


async def test_lease_takes_the_oldest_due_jobs_first(open_services: Any, dns_server: Any) -> None:
    services = await open_services()
    tenant = await make_tenant(services, dns_server)
    await _submit_many(services, tenant, 6)
    now = services.clock()
    jobs = await services.db.one("SELECT VALUE meta::id(id) FROM job")
    # Due times in an order unrelated to the ids; one is not due yet.
    offsets = [-5, -50, 30, -20, -1, -40]
    for job_id, offset in zip(sorted(jobs), offsets, strict=True):
        await services.db.run("UPDATE type::thing('job', $id) SET due = $due",
                              {"id": job_id, "due": now + timedelta(seconds=offset)})
    order = [j for _, j in sorted(zip(offsets, sorted(jobs), strict=True)) if _ <= 0]
    first = await services.queue.lease("w1", 2, 30, now)
    second = await services.queue.lease("w1", 10, 30, now)
    assert [j["id"] for j in first] == order[:2]
    assert [j["id"] for j in second] == order[2:]


async def test_unread_indexes_are_dropped_and_release_still_uses_one(open_services: Any) -> None:
    from inbox.storage.schema import migrate

    services = await open_services()
    db = services.db
    # A database from before: the indexes nothing reads.
    await db.run("DEFINE INDEX job_owner ON job FIELDS owner;"
                 " DEFINE INDEX job_lease ON job FIELDS status, lease_until;"
                 " DEFINE INDEX event_at ON event FIELDS at;")
    await migrate(db)
    assert set((await db.one("INFO FOR TABLE job"))["indexes"]) == {"job_due", "job_message"}
    assert set((await db.one("INFO FOR TABLE event"))["indexes"]) == {"event_message"}
    # Releasing a worker's leases reads the 'processing' range of an index, not the table.
    plan = await db.one("SELECT id FROM job WHERE owner = $owner AND status = 'processing'"
                        " EXPLAIN", {"owner": "w1"})
    assert plan[0]["operation"] == "Iterate Index", plan
    await db.run("CREATE job:a SET status = 'processing', owner = 'w1', attempts = 1;"
                 " CREATE job:b SET status = 'processing', owner = 'w2', attempts = 1;")
    assert await services.queue.release("w1") == 1
    assert await db.one("SELECT VALUE status FROM [job:a, job:b]") == ["queued", "processing"]


async def test_expired_leases_are_found_through_job_due(open_services: Any,
                                                         dns_server: Any) -> None:
    from inbox.delivery.queue import _LEASE
    from inbox.storage.schema import migrate

    services = await open_services()
    db = services.db
    tenant = await make_tenant(services, dns_server)
    await _submit_many(services, tenant, 3)
    now = services.clock()
    leased = await services.queue.lease("w1", 10, 30, now)
    ids = [j["id"] for j in leased]
    # The lease's end is the job's next due time, kept beside lease_until.
    assert len(ids) == 3
    assert all(j["due"] == j["lease_until"] == now + timedelta(seconds=30) for j in leased)
    # Both scans of the lease are index ranges of job_due.
    stale, due = _LEASE.split(";")[:2]
    for scan in (stale, due):
        sql = scan.split("= (", 1)[1].rsplit(")", 1)[0] + " EXPLAIN"
        plan = await db.one(sql, {"now": now, "limit": 10})
        assert plan[0]["operation"] == "Iterate Index" and plan[0]["detail"]["plan"][
            "index"] == "job_due", plan
    # A lease taken by an older version (due not moved) keeps its job until lease_until ...
    old = ids[0]
    await db.run("UPDATE type::thing('job', $id) SET due = $past", {"id": old, "past": now})
    assert await services.queue.lease("w2", 10, 30, now + timedelta(seconds=5)) == []
    # ... and start-up moves its due to the lease's end.
    await migrate(db)
    assert await db.one("SELECT VALUE due FROM ONLY type::thing('job', $id)", {"id": old}) == (
        now + timedelta(seconds=30))
    taken = await services.queue.lease("w2", 10, 30, now + timedelta(seconds=31))
    assert sorted(j["id"] for j in taken) == sorted(ids)
    # Released jobs are due at once, not at their lease's end.
    assert await services.queue.release("w2", now + timedelta(seconds=32)) == 3
    again = await services.queue.lease("w3", 10, 30, now + timedelta(seconds=32))
    assert len(again) == 3


async def test_one_completion_updates_alike_recipients_together_and_each_as_told(
    open_services: Any, dns_server: Any
) -> None:
    from inbox.delivery.queue import JobOutcome, Queue, RecipientOutcome

    services = await open_services()
    tenant = await make_tenant(services, dns_server)
    ids = await _submit_many(services, tenant, 5)
    now = services.clock()
    jobs = sorted(await services.queue.lease("w1", 5, 30, now), key=lambda j: j["message"])
    assert [j["message"] for j in jobs] == sorted(ids)
    plain_tls = {"used": False, "policy": "opportunistic", "reason": "STARTTLS not offered"}
    tls = {"used": True, "version": "TLSv1.3", "policy": "opportunistic", "mx": "mx.dest.test"}
    told = [("DELIVERED", "250 ok", plain_tls), ("DELIVERED", "250 ok", {**plain_tls}),
            ("DELIVERED", "250 ok", tls), ("BOUNCED", "550 5.1.1 no such user", plain_tls),
            ("DEFERRED", "451 4.3.0 try later", plain_tls)]
    outcomes = []
    for job, (status, reply, job_tls) in zip(jobs, told, strict=True):
        rcpt = (await services.queue.load(job))[2][0]
        outcomes.append(JobOutcome(
            job, [RecipientOutcome(rcpt["id"], rcpt["address"], status, reply)],
            next_due=now + timedelta(minutes=5) if status == "DEFERRED" else None,
            tls=job_tls))
    # Equal values share one update; a different TLS outcome or status gets its own.
    batch = Queue._batch(outcomes, "w1", now)
    assert sorted(len(u["ids"]) for u in batch["updates"]) == [1, 1, 1, 2]
    assert {k["status"]: len(k["ids"]) for k in batch["known"]} == {
        "DELIVERED": 3, "FAILED": 1, "DEFERRED": 1}
    assert await services.queue.complete_many(outcomes, "w1", now) == set()
    for job, (status, reply, job_tls) in zip(jobs, told, strict=True):
        row = await services.db.one(
            "SELECT * FROM ONLY recipient WHERE message = $m LIMIT 1", {"m": job["message"]})
        assert (row["status"], row["last_response"], row["attempts"]) == (status, reply, 1)
        message = await services.db.one(
            "SELECT VALUE status FROM ONLY type::thing('message', $m)", {"m": job["message"]})
        assert message == {"DELIVERED": "DELIVERED", "BOUNCED": "FAILED",
                           "DEFERRED": "DEFERRED"}[status]
        if status == "DEFERRED":
            assert row.get("final_event") is None and row["next_attempt_at"] is not None
        else:
            assert row["final_event"]["type"] == status
            assert row["final_event"]["detail"] == reply
            assert row["final_event"]["tls"] == {k: v for k, v in job_tls.items()}


async def test_tls_report_counts_are_written_with_the_results_they_belong_to(
    open_services: Any, dns_server: Any
) -> None:
    # TLS-RPT counters (RFC 8460) go into the completion's transaction, summed per counter:
    # three successes at one MX make n = 3 with one write; a failure is its own counter; the
    # counts of an attempt whose lease was lost are not written (its result is not either).
    from inbox.delivery import tlsrpt
    from inbox.delivery.queue import JobOutcome, RecipientOutcome

    services = await open_services()
    tenant = await make_tenant(services, dns_server)
    await tlsrpt.record(services.db, day=services.clock().date(), policy_domain="dest.test",
                        policy_type="no-policy-found", policy_strings=[],
                        mx_host="mx.dest.test", success=True)  # counted before: n adds up
    await _submit_many(services, tenant, 5)
    now = services.clock()
    day = now.date()
    jobs = sorted(await services.queue.lease("w1", 5, 30, now), key=lambda j: j["message"])
    ok = tlsrpt.counter(day=day, policy_domain="dest.test", policy_type="no-policy-found",
                        policy_strings=[], mx_host="MX.dest.test.", success=True)
    bad = tlsrpt.counter(day=day, policy_domain="dest.test", policy_type="no-policy-found",
                         policy_strings=[], mx_host="mx.dest.test", success=False,
                         result_type="starttls-not-supported", receiving_ip="127.0.0.1")
    outcomes = []
    for job, counts in zip(jobs, [[ok], [ok], [ok, bad], [], [ok]], strict=True):
        rcpt = (await services.queue.load(job))[2][0]
        outcomes.append(JobOutcome(
            job, [RecipientOutcome(rcpt["id"], rcpt["address"], "DELIVERED", "250 ok")],
            tlsrpt=counts))
    # The last job's lease is taken over by another worker before we complete.
    await services.db.run("UPDATE type::thing('job', $id) SET owner = 'w2'",
                          {"id": jobs[-1]["id"]})
    assert await services.queue.complete_many(outcomes, "w1", now) == {jobs[-1]["id"]}
    rows = await tlsrpt.counters(services.db, day=day, policy_domain="dest.test")
    got = sorted((r["success"], r.get("result_type"), r["mx_host"], r["n"]) for r in rows)
    assert got == [(False, "starttls-not-supported", "mx.dest.test", 1),
                   (True, None, "mx.dest.test", 4)]


async def test_graceful_shutdown_gives_back_the_leases_of_deliveries_held_at_a_stalled_mx(
    open_services: Any, dns_server: Any, smtp_sink: Any
) -> None:
    # Leases of 5 minutes: a job left leased would wait that long. The MX holds every DATA
    # unanswered, longer than the worker waits for deliveries in flight when it stops, so the
    # stop must cancel them and release their jobs. In-process transport: a cancelled session
    # closes its socket, so none of the held DATAs is ever answered with a 250.
    services = await open_services(
        SMTP_OUTBOUND_PORT=smtp_sink.port,
        SMTP_OUTBOUND_QUEUE_LEASE_SECS=300,
        SMTP_OUTBOUND_TIMEOUT_SECS=120,
        SMTP_OUTBOUND_PROCESS="off",
    )
    tenant = await make_tenant(services, dns_server)
    route_to_sink(dns_server, "dest.test")
    principal = Principal(tenant.org, "key_test", frozenset({"send"}))
    hold = smtp_sink.hold_data = threading.Event()
    queued = await _submit_many(services, tenant, 2)  # leased by the worker when it starts
    first = services.worker("w1")
    stop = asyncio.Event()
    run = asyncio.create_task(first.run(stop))
    try:
        for _ in range(200):  # the start-up lease took the queued jobs
            if not first._backlog:
                break
            await asyncio.sleep(0.05)
        # The default path: stored already leased to the running worker (direct handoff).
        handed = []
        for i in range(2):
            msg = OutboundMessage(from_=f"a@{tenant.domain}", to=[f"h{i}@dest.test"],
                                  subject=f"h{i}", text_body="x")
            handed.append((await submit(services.db, principal, msg, SubmitOptions(),
                                        settings=services.settings, now=services.clock(),
                                        handoff=services.handoff))["id"])
        assert services.handoff.handed == 2
        ids = queued + handed
        jobs = await services.db.one("SELECT * FROM job WHERE message IN $ids", {"ids": ids})
        assert {(j["status"], j["owner"]) for j in jobs} == {("processing", "w1")}
        assert len(jobs) == 4
        assert await asyncio.to_thread(smtp_sink.data_held.wait, 20), "no DATA reached the MX"
        stopped_at = services.clock()
        stop.set()
        await asyncio.wait_for(run, 60)  # waits out the deliveries' grace, then cancels them
    finally:
        stop.set()
        if not run.done():
            run.cancel()
        # The cancelled sessions are gone (their DATAs cancelled with them) before the MX may
        # answer again.
        for _ in range(500):
            if not smtp_sink.open_sessions:
                break
            await asyncio.sleep(0.02)
        hold.set()
    assert smtp_sink.open_sessions == 0
    released_at = services.clock()
    jobs = await services.db.one("SELECT * FROM job WHERE message IN $ids", {"ids": ids})
    # Back in the queue and due now, not at the end of the 5-minute lease; the attempt that
    # was cut short is not counted.
    assert {(j["status"], j.get("owner"), j.get("lease_until")) for j in jobs} == {
        ("queued", None, None)}
    assert all(stopped_at <= j["due"] <= released_at for j in jobs), jobs
    assert {j["attempts"] for j in jobs} == {0}
    assert await services.db.one(
        "SELECT VALUE status FROM recipient WHERE message IN $ids", {"ids": ids}
    ) == ["QUEUED"] * 4
    assert smtp_sink.messages == []

    # Another worker takes them at once (its first lease) and delivers each once.
    second = services.worker("w2")
    stop = asyncio.Event()
    run = asyncio.create_task(second.run(stop))
    try:
        await smtp_sink.wait_for(4, timeout=30)
        for _ in range(200):
            statuses = await services.db.one(
                "SELECT VALUE status FROM message WHERE meta::id(id) IN $ids", {"ids": ids})
            if statuses == ["DELIVERED"] * 4:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await run
    assert statuses == ["DELIVERED"] * 4
    counts = Counter(r for m in smtp_sink.messages for r in m.rcpt_tos)
    assert counts == Counter({"u0@dest.test": 1, "u1@dest.test": 1, "h0@dest.test": 1,
                              "h1@dest.test": 1})
    jobs = await services.db.one("SELECT * FROM job WHERE message IN $ids", {"ids": ids})
    assert {(j["status"], j["attempts"]) for j in jobs} == {("done", 1)}
