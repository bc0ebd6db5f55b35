"""Delivery workers: lease due jobs, DKIM-sign, resolve MX, deliver, record each attempt.

Decides per recipient: 2xx DELIVERED, 4xx / connection trouble DEFERRED with backoff (EXPIRED
past the attempt or TTL limit), 5xx BOUNCED (hard bounces suppress the address or domain).
Our own failures (signing, configuration) defer and never suppress anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from opentelemetry import trace

from inbox.delivery import tlsrpt
from inbox.delivery.bounces import suppression_scope
from inbox.delivery.completer import Completer
from inbox.delivery.handoff import Handed, Handoff
from inbox.delivery.mx import NullMx, mx_hosts
from inbox.delivery.queue import JobOutcome, Loaded, Queue, RecipientOutcome, backoff
from inbox.delivery.results import failed_attempt
from inbox.delivery.signers import SignerCache
from inbox.delivery.transport import AttemptResult, RecipientResult
from inbox.errors import DnsNotFound, DnsTemporary, InboxError
from inbox.telemetry import recording

log = logging.getLogger(__name__)
tracer = trace.get_tracer("inbox.delivery")

CLEANUP_EVERY_SECS = 300.0


@dataclass(frozen=True)
class Target:
    """One address to connect to; `name` is the MX host name (TLS, logs)."""

    host: str
    name: str
    policy: Any = None  # tlspolicy.HostPolicy for this MX host


_TLS_REQUIRED_NO = re.compile(rb"(?im)^TLS-Required:[ \t]*No[ \t]*\r?$")


def _tls_optional(raw: bytes) -> bool:
    """The message's header section says "TLS-Required: No" (RFC 8689 §5)."""
    end = raw.find(b"\r\n\r\n")
    return bool(_TLS_REQUIRED_NO.search(raw[:end if end >= 0 else len(raw)]))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{id(object()):x}"


class DeliveryWorker:
    def __init__(self, *, queue: Queue, resolver: Any, transport: Any, signers: SignerCache,
                 settings: Any, clock: Callable[[], datetime], wakeup: asyncio.Event | None = None,
                 name: str | None = None, tls_planner: Any = None,
                 handoff: Handoff | None = None) -> None:
        self.queue = queue
        self.resolver = resolver
        self.transport = transport
        self.signers = signers
        self.settings = settings
        self.clock = clock
        self.wakeup = wakeup or asyncio.Event()
        self.name = name or worker_name()
        self._tasks: set[asyncio.Task[None]] = set()
        # Jobs holding a delivery slot: from start until their attempt has a result. Writing
        # the result (group-committed by the Completer) does not hold one, so a slow commit
        # does not keep new mail from going straight out.
        self._delivering: set[asyncio.Task[None]] = set()
        self._completer = Completer(queue, self.name, clock)
        self._next_cleanup = 0.0
        self.tls_planner = tls_planner
        self._dnssec_overrides: dict[tuple[str, str], tuple[float, bool | None]] = {}
        self.handoff = handoff
        self.lease_secs = float(settings.SMTP_OUTBOUND_QUEUE_LEASE_SECS)
        self._stopping = False
        # Due jobs may be waiting in the database (true at start: earlier runs may have left
        # some); cleared when a lease comes back short.
        self._backlog = True
        self._leasing = 0  # jobs being leased and loaded, not yet started

    # -- the handoff's side (delivery/handoff.py): jobs stored already leased to us ---------

    def room(self) -> int:
        """Free delivery slots for new mail. None while stopping. While queued work may be
        waiting, a quarter of the slots (the lease share) is kept for leasing it, so the
        backlog drains even under sustained load; new mail still goes straight out with the
        rest. Storing new mail queued whenever a backlog existed (as before) made a burst
        permanent: leasing and loading back costs the engine more per message than the
        handoff, so under load the queue never drained (measured: after a start-up burst at
        C=32, 2403 of 3000 sends took the queued path, 224/s)."""
        if self._stopping:
            return 0
        free = self.settings.SMTP_OUTBOUND_CONCURRENCY - len(self._delivering) - self._leasing
        if self._backlog:
            free -= self._lease_share()
        return max(0, free)

    def _lease_share(self) -> int:
        """Free slots the run loop waits for before it leases (one lease costs the engine
        about as much for 1 job as for 16)."""
        return max(1, self.settings.SMTP_OUTBOUND_CONCURRENCY // 4)

    def take(self, handed: list[Handed]) -> None:
        """Start jobs committed with our lease. While stopping they are left to the final
        release (or to lease expiry), like any leased job not started."""
        if self._stopping:
            return
        for job, loaded in handed:
            self._start(job, loaded)

    def _start(self, job: dict[str, Any], loaded: Loaded | None) -> None:
        task = asyncio.create_task(self._guarded(job, loaded))
        self._tasks.add(task)
        self._delivering.add(task)
        task.add_done_callback(self._task_done)

    async def run(self, stop: asyncio.Event) -> None:
        """Lease and process jobs until `stop` is set; then release what is unfinished."""
        s = self.settings
        limit = s.SMTP_OUTBOUND_CONCURRENCY
        loop = asyncio.get_running_loop()
        if self.handoff is not None:
            self.handoff.attach(self)
        try:
            while not stop.is_set():
                # Cleared before looking, not after: a wakeup while we lease (a send stored
                # queued meanwhile) then ends the wait below at once instead of being lost
                # until the next poll.
                self.wakeup.clear()
                leased = 0
                free = limit - len(self._delivering) - (
                    self.handoff.reserved(self) if self.handoff is not None else 0)
                asked = min(free, s.SMTP_OUTBOUND_QUEUE_BATCH_SIZE)
                if free <= 0 or (free < self._lease_share() and self._tasks):
                    # Woken or polled without room for a lease: look again when slots free.
                    # (Waiting for the next poll instead was the ~1 s tail of the send
                    # benchmark's accepted-to-delivered latency: a send that lost the last
                    # slot to another was stored queued while a few slots were free.)
                    self._backlog = True
                else:
                    self._leasing = asked  # slots the handoff must not promise meanwhile
                    try:
                        jobs = await self.queue.lease(self.name, asked,
                                                      s.SMTP_OUTBOUND_QUEUE_LEASE_SECS,
                                                      self.clock())
                    except InboxError:
                        log.exception("lease failed; retrying after the poll interval")
                        jobs = []
                    leased = self._leasing = len(jobs)
                    self._backlog = leased == asked
                    try:
                        loaded = await self.queue.load_many(jobs)
                    except InboxError:
                        log.exception("loading leased jobs failed; each job loads on its own")
                        loaded = {}
                    finally:
                        self._leasing = 0
                    for job in jobs:
                        self._start(job, loaded.get(job["id"]))
                if loop.time() >= self._next_cleanup:
                    self._next_cleanup = loop.time() + CLEANUP_EVERY_SECS
                    await self._cleanup()
                if leased and leased == asked:
                    continue  # there may be more due work right now
                waiters = [asyncio.ensure_future(self.wakeup.wait()),
                           asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waiters, timeout=s.SMTP_OUTBOUND_QUEUE_POLL_SECS,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
        finally:
            await self._shutdown()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free(task)

    def _slot_free(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None and task in self._delivering:
            self._delivering.discard(task)
            if self._backlog:
                self.wakeup.set()  # a slot is free and queued work may be waiting

    async def _shutdown(self) -> None:
        self._stopping = True
        if self.handoff is not None:
            self.handoff.detach(self)
            # Sends being stored with our lease settle in a moment; their jobs are then
            # released below with the rest.
            for _ in range(100):
                if not self.handoff.reserved(self):
                    break
                await asyncio.sleep(0.05)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=10)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(InboxError):
            released = await self.queue.release(self.name, self.clock())
            if released:
                log.info("released %d leased job(s) on shutdown", released)

    async def _cleanup(self) -> None:
        s = self.settings
        try:
            await self.queue.cleanup(self.clock(), s.SMTP_OUTBOUND_DEAD_JOB_RETENTION_SECS,
                                     s.SMTP_OUTBOUND_DELIVERY_RETENTION_SECS)
        except InboxError:
            log.exception("cleanup failed")

    async def _guarded(self, job: dict[str, Any], loaded: Loaded | None = None) -> None:
        try:
            await self.process(job, loaded)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - worker loop edge: log, the lease expires and retries
            log.exception("job %s failed unexpectedly; it will be retried after its lease",
                          job.get("id"))

    async def process(self, job: dict[str, Any], loaded: Loaded | None = None) -> None:
        with (tracer.start_as_current_span("delivery.job") if recording()
              else contextlib.nullcontext(trace.INVALID_SPAN)) as span:
            span.set_attribute("inbox.job", job["id"])
            span.set_attribute("inbox.rcpt_domain", job["rcpt_domain"])
            message, raw, rcpts = loaded or await self.queue.load(job)
            if message is None or raw is None or not rcpts:
                await self._completer.complete(JobOutcome(job))
                return
            addresses = [r["address"] for r in rcpts]
            try:
                result = await self._attempt(job, message, raw, addresses)
            finally:
                self._slot_free(asyncio.current_task())
            outcome = self._decide(job, rcpts, result)
            if result.host is not None or result.tls_reports or result.mx is not None:
                # A failed attempt names the host it ended with (and its policy and reason),
                # including failures TLS-RPT does not count (e.g. REQUIRETLS, RFC 8689).
                mx = result.mx or (result.tls_reports[-1].mx_host if result.tls_reports
                                   else result.host)
                outcome.tls = {**result.tls.as_dict(), "mx": mx}
            outcome.tlsrpt = await self._tls_counters(job["rcpt_domain"], result)
            span.set_attribute("inbox.statuses", ",".join(r.status for r in outcome.recipients))
            if not await self._completer.complete(outcome):
                log.warning("lease on %s was lost before completion; another worker owns it",
                            job["id"])

    async def _attempt(self, job: dict[str, Any], message: dict[str, Any], raw: bytes,
                       addresses: list[str]) -> AttemptResult:
        signs = getattr(self.transport, "signs", False)  # signs in its own process
        try:
            signer = await self.signers.get(job["org"], job["sending_domain"])
            signed = raw if signs else await asyncio.to_thread(signer.sign, raw)
        except Exception as exc:  # noqa: BLE001 - our own failure: defer, never suppress
            log.exception("DKIM signing failed for %s", job["id"])
            return failed_attempt(addresses, 451, "4.3.0",
                                  f"local error: DKIM signing failed: {exc}")
        hosts: list[Target] = []
        if self.transport.relay is None:
            require_tls = bool(message.get("require_tls"))
            try:
                hosts = await self._targets(
                    job["rcpt_domain"], job, require_tls=require_tls,
                    # RFC 8689 §5: "TLS-Required: No" asks us to ignore the recipient's
                    # published TLS policy (used e.g. by TLS-RPT reports, RFC 8460 §5.3).
                    tls_policy=require_tls or not _tls_optional(raw))
            except NullMx as exc:
                return failed_attempt(addresses, 556, "5.1.10", exc.message)
            except DnsNotFound as exc:
                return failed_attempt(addresses, 550, "5.1.2",
                                      f"recipient domain: {exc.message}")
            except DnsTemporary as exc:
                return failed_attempt(addresses, 451, "4.4.3", f"DNS: {exc.message}")
        extra = {"sign": signer.spec} if signs else {}
        return await self.transport.deliver(hosts, message["envelope_from"], addresses, signed,
                                            smtputf8=bool(message.get("smtputf8")), **extra)

    async def _targets(self, domain: str, job: dict[str, Any] | None = None, *,
                       require_tls: bool = False, tls_policy: bool = True) -> list[Target]:
        """MX hosts in order, each resolved to its addresses through our resolver, each with
        the TLS policy the transport must apply to it."""
        targets: list[Target] = []
        temporary: DnsTemporary | None = None
        hosts = await mx_hosts(self.resolver, domain)
        policies: dict[str, Any] = {}
        if self.tls_planner is not None and tls_policy:
            dnssec = await self._dnssec(job) if job is not None else True
            policies = await self.tls_planner.plan(domain, hosts, dnssec=dnssec,
                                                   require_tls=require_tls)
        for mx in hosts:
            try:
                ips = await self.resolver.ips(mx.host)
            except DnsNotFound:
                continue  # RFC 5321 §5.1: an MX without addresses is skipped
            except DnsTemporary as exc:
                temporary = exc
                continue
            policy = policies.get(mx.host.rstrip(".").lower())
            targets.extend(Target(ip, mx.host, policy) for ip in ips)
        if not targets:
            if temporary is not None:
                raise temporary
            raise DnsTemporary(f"no MX host of {domain} has an address")
        return targets

    async def _dnssec(self, job: dict[str, Any]) -> bool:
        """SMTP_OUTBOUND_DNSSEC_VALIDATE, unless the sending domain overrides it
        (`outbound_dnssec_validate` on has_domain); cached per instance for a minute."""
        default = bool(self.settings.SMTP_OUTBOUND_DNSSEC_VALIDATE)
        key = (job.get("org", ""), job.get("sending_domain", ""))
        now = asyncio.get_running_loop().time()
        hit = self._dnssec_overrides.get(key)
        if hit is None or hit[0] <= now:
            value = None
            try:
                rows = await self.queue.db.one(
                    "SELECT outbound_dnssec_validate FROM has_domain WHERE org = $org AND"
                    " domain = $domain LIMIT 1", {"org": key[0], "domain": key[1]})
                value = rows[0].get("outbound_dnssec_validate") if rows else None
            except InboxError:
                log.warning("could not read the DNSSEC override of %s", key[1])
            hit = (now + 60.0, value)
            self._dnssec_overrides[key] = hit
        return default if hit[1] is None else bool(hit[1])

    async def _tls_counters(self, domain: str, result: AttemptResult
                            ) -> list[tuple[str, dict[str, Any]]]:
        """The TLS-RPT counters this attempt's TLS outcomes add to, when the domain asks for
        reports (RFC 8460 §3: a `_smtp._tls` TXT record); the daily report job sends them.
        They are written with the attempt's results, in the same transaction: most large
        mailbox providers publish the record, and a write of its own per delivery cost the
        engine a call (and a commit) per message."""
        if not result.tls_reports:
            return []
        try:
            texts = list(await self.resolver.txt(f"_smtp._tls.{domain}"))
        except (DnsNotFound, DnsTemporary):
            return []
        if tlsrpt.select_record(texts) is None:
            return []
        day = self.clock().date()
        counters = []
        for report in result.tls_reports:
            try:
                counters.append(tlsrpt.counter(
                    day=day, policy_domain=domain,
                    policy_type=report.policy_type, policy_strings=list(report.policy_strings),
                    mx_host=report.mx_host, success=report.success,
                    result_type=report.result_type, receiving_ip=report.receiving_ip,
                    failure_reason=report.reason))
            except InboxError:
                log.warning("could not count a TLS-RPT result for %s", domain, exc_info=True)
        return counters

    def _decide(self, job: dict[str, Any], rcpts: list[dict[str, Any]],
                result: AttemptResult) -> JobOutcome:
        s = self.settings
        now = self.clock()
        by_addr = {r.address.lower(): r for r in result.recipients}
        expires = job.get("expires_at")
        out_of_time = job["attempts"] >= s.SMTP_OUTBOUND_MAX_ATTEMPTS or (
            expires is not None and now >= expires)
        outcome = JobOutcome(job)
        for row in rcpts:
            res = by_addr.get(row["address"].lower())
            if res is None:
                res = RecipientResult(row["address"], 451, "4.3.0",
                                      "no reply recorded for this recipient", True, False)
            reply = f"{res.code} {res.enhanced + ' ' if res.enhanced else ''}{res.text}".strip()
            if result.connection_error and not res.delivered:
                reply = f"{reply} ({result.connection_error})" if result.connection_error \
                    not in reply else reply
            if res.delivered:
                status, scope = "DELIVERED", None
            elif res.temporary:
                status, scope = ("EXPIRED" if out_of_time else "DEFERRED"), None
            else:
                status, scope = "BOUNCED", suppression_scope(res)
            value = None
            if scope == "ADDRESS":
                value = row["address"].lower()
            elif scope == "DOMAIN":
                value = row["domain"]
            outcome.recipients.append(RecipientOutcome(
                row["id"], row["address"], status, reply, scope, value))
        if any(r.status == "DEFERRED" for r in outcome.recipients):
            delay = backoff(job["attempts"], s.SMTP_OUTBOUND_RETRY_BASE_DELAY_SECS,
                            s.SMTP_OUTBOUND_RETRY_MAX_DELAY_SECS)
            outcome.next_due = now + timedelta(seconds=delay)
        return outcome
