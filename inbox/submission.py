"""submit(): the one way mail gets in for sending (GraphQL and SMTP submission).

Authorises the principal, checks the From domain (and for SMTP the envelope sender's domain)
belongs to the organization and is verified, validates and builds the MIME (or checks the
client's own MIME, `RawMessage`), applies idempotency, quotas and suppressions, and stores the
message with one job per recipient domain in a single transaction — durable before "ok".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry import trace

from inbox.delivery.handoff import Claim, Handoff
from inbox.delivery.suppressions import SUPPRESSED_SQL, suppression_ids
from inbox.errors import (
    DomainNotVerified,
    Forbidden,
    IdempotencyConflict,
    NotFound,
    QuotaExceeded,
    UnencodableText,
    ValidationError,
)
from inbox.message import (
    Address,
    OutboundMessage,
    PreparedRaw,
    RawMessage,
    build_mime,
    prepare_raw,
    validate,
)
from inbox.storage import Database, DbThrow, new_id
from inbox.storage.schema import list_key
from inbox.storage.wire import unencodable
from inbox.telemetry import recording
from inbox.tenancy import Principal, TenantCache, effective_quotas

tracer = trace.get_tracer("inbox.submission")

MAX_TAGS = 10
MAX_METADATA_KEYS = 50


@dataclass
class SubmitOptions:
    idempotency_key: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "graphql"
    require_tls: bool = False  # RFC 8689 REQUIRETLS: stored on the message and its jobs


def _payload_hash(msg: OutboundMessage | RawMessage, opts: SubmitOptions) -> str:
    if isinstance(msg, RawMessage):  # the client's bytes and envelope, before our additions
        envelope: dict[str, Any] = {
            "raw": hashlib.sha256(msg.data).hexdigest(), "mail_from": msg.mail_from,
            "rcpt_to": [asdict(r) for r in msg.rcpt_to], "ret": msg.dsn_ret,
            "envid": msg.dsn_envid, "require_tls": opts.require_tls, "tags": opts.tags,
            "metadata": opts.metadata}
        return hashlib.sha256(json.dumps(envelope, sort_keys=True).encode()).hexdigest()
    data = asdict(msg)
    for att in data["attachments"]:
        att["content"] = hashlib.sha256(att["content"]).hexdigest()
    data["tags"] = opts.tags
    data["metadata"] = opts.metadata
    if opts.require_tls:  # only when set: hashes of earlier sends stay the same
        data["require_tls"] = True
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _check_options(opts: SubmitOptions) -> None:
    """Tags, metadata and the idempotency key: sizes, and text that can be stored (no lone
    surrogates: GraphQL refuses those at its boundary, but an SMTP Idempotency-Key header is
    decoded with surrogateescape)."""
    idem = opts.idempotency_key
    if idem is not None:
        if not 1 <= len(idem) <= 200:
            raise ValidationError("idempotencyKey must be 1-200 characters",
                                  field=["idempotencyKey"])
        if unencodable(idem) is not None:
            raise UnencodableText("idempotencyKey is not valid Unicode (a lone surrogate)",
                                  field=["idempotencyKey"])
    if len(opts.tags) > MAX_TAGS:
        raise ValidationError(f"at most {MAX_TAGS} tags", field=["tags"])
    for i, tag in enumerate(opts.tags):
        if not tag or len(tag) > 100 or any(ord(c) < 32 for c in tag):
            raise ValidationError("tags are 1-100 printable characters", field=["tags", str(i)])
        if unencodable(tag) is not None:
            raise UnencodableText("a tag is not valid Unicode (a lone surrogate)",
                                  field=["tags", str(i)])
    if len(opts.metadata) > MAX_METADATA_KEYS:
        raise ValidationError(f"at most {MAX_METADATA_KEYS} metadata keys", field=["metadata"])
    for key, value in opts.metadata.items():
        if unencodable(key) is not None:  # not named in `field`: it cannot be shown either
            raise UnencodableText("a metadata key is not valid Unicode (a lone surrogate)",
                                  field=["metadata"])
        if not key or len(key) > 100 or len(str(value)) > 1000:
            raise ValidationError("metadata keys are 1-100 and values up to 1000 characters",
                                  field=["metadata", key])
        if unencodable(value) is not None:
            raise UnencodableText("a metadata value is not valid Unicode (a lone surrogate)",
                                  field=["metadata", key])


def _window_end(now: datetime, hours: int) -> datetime:
    start = now.replace(minute=0, second=0, microsecond=0)
    if hours == 24:
        start = start.replace(hour=0)
    return start + timedelta(hours=hours)


# One transaction: idempotency, quotas (fixed windows, counted in recipients), then the rows.
# THROW 'CODE|detail' rolls everything back and surfaces as DbThrow.
# A domain's counters are one record (one write per send): the current hour and day (keys
# that sort in time, so a caller whose clock is behind counts into the newer window instead
# of resetting it) with their counts, and the jobs still queued (delivery/queue.py subtracts).
# The quota counter: the common case first (the counter is in the current hour and day), which
# costs the engine ~250 instead of ~310 us per store in a group of 16; OR runs the UPSERT only
# when that UPDATE matched nothing (a new window, a new counter, or this clock behind).
_STORE = """
BEGIN TRANSACTION;
IF $idem_id != NONE {
  LET $prev = (SELECT * FROM ONLY type::thing('idempotency', $idem_id));
  IF $prev != NONE AND $prev.expires_at > $now {
    IF $prev.payload_hash = $hash { THROW 'IDEMPOTENT_REPLAY|' + $prev.message }
    ELSE { THROW 'IDEMPOTENCY_CONFLICT|' + $prev.message };
  };
};
IF array::len($supp_ids) > 0 {
  LET $supp = (SELECT VALUE target FROM $supp_ids WHERE expires_at = NONE OR expires_at > $now);
  IF array::len($supp) > 0 { THROW 'SUPPRESSED|' };
};
IF $count > 0 {
  LET $c = (UPDATE type::thing('quota_counter', [$domain, 'send']) SET
      hour_n += $count, day_n += $count, queued = (queued OR 0) + $jobcount
      WHERE hour = $hour AND day = $day RETURN AFTER)[0]
    OR (UPSERT type::thing('quota_counter', [$domain, 'send']) SET
    hour_n = IF hour >= $hour THEN hour_n + $count ELSE $count END,
    hour = IF hour >= $hour THEN hour ELSE $hour END,
    day_n = IF day >= $day THEN day_n + $count ELSE $count END,
    day = IF day >= $day THEN day ELSE $day END,
    queued = (queued OR 0) + $jobcount
    RETURN AFTER)[0];
  IF $hourly_limit != NONE AND $c.hour_n > $hourly_limit { THROW 'QUOTA|hourly_send_limit' };
  IF $daily_limit != NONE AND $c.day_n > $daily_limit { THROW 'QUOTA|daily_send_limit' };
  IF $max_queued != NONE AND $c.queued > $max_queued { THROW 'QUOTA|max_queued_jobs' };
};
CREATE type::thing('message', $message.id) CONTENT $message RETURN NONE;
CREATE type::thing('message_raw', $message.id) SET org = $message.org, raw = $raw
  RETURN NONE;
INSERT INTO recipient $recipients RETURN NONE;
INSERT INTO job $jobs RETURN NONE;
IF array::len($events) > 0 { INSERT INTO event $events RETURN NONE };
IF $idem_id != NONE {
  UPSERT type::thing('idempotency', $idem_id) CONTENT {
    org: $message.org, key: $idem_key, payload_hash: $hash, message: $message.id,
    created_at: $now, expires_at: $idem_expires } RETURN NONE;
};
COMMIT TRANSACTION;
"""


async def submit(db: Database, principal: Principal, msg: OutboundMessage | RawMessage,
                 opts: SubmitOptions,
                 *, settings: Any, now: datetime | None = None,
                 cache: TenantCache | None = None,
                 handoff: Handoff | None = None) -> dict[str, Any]:
    """Store a message for delivery; returns its row (the first message's on a replay).

    With `handoff` (the local workers), the jobs go straight to a worker with room, else
    they are stored queued and the workers are woken (delivery/handoff.py).
    """
    if not recording():
        return await _submit(db, principal, msg, opts, settings, now or datetime.now(UTC),
                             cache, handoff)
    with tracer.start_as_current_span("submission.submit") as span:
        span.set_attribute("inbox.org", principal.org)
        span.set_attribute("inbox.source", opts.source)
        row = await _submit(db, principal, msg, opts, settings, now or datetime.now(UTC),
                            cache, handoff)
        span.set_attribute("inbox.message", row["id"])
        return row


async def _tenant_rows(db: Database, org: str, domain: str, cache: TenantCache | None
                       ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The sending domain's has_domain row (without keys) and the organization row."""
    if cache is not None and (hit := cache.get(org, domain)) is not None:
        return hit
    domain_rows, org_row = await db.run(
        "SELECT * OMIT dkim_rsa_private, dkim_ed25519_private FROM has_domain"
        " WHERE org = $org AND domain = $domain LIMIT 1;"
        "SELECT * FROM ONLY type::thing('organization', $org);",
        {"org": org, "domain": domain})
    rows = (domain_rows[0] if domain_rows else None, org_row or None)
    if cache is not None and rows[0] is not None and rows[1] is not None:
        cache.put(org, domain, rows)
    return rows


async def sending_limits(db: Database, principal: Principal, domain: str, settings: Any,
                         cache: TenantCache | None = None, *, field: str = "from"
                         ) -> dict[str, Any]:
    """The effective quotas of `domain` for the principal's organization; raises Forbidden
    (not the organization's domain), DomainNotVerified or NotFound."""
    domain_row, org_row = await _tenant_rows(db, principal.org, domain, cache)
    if domain_row is None:
        raise Forbidden(f"{domain} is not a domain of your organization", field=[field])
    if not domain_row["verified"]:
        raise DomainNotVerified(
            f"{domain} is not verified yet: publish its DNS records and call verifyDomain",
            field=[field])
    if not org_row:
        raise NotFound("your organization no longer exists")
    return effective_quotas(settings, org_row, domain_row)


async def _submit(db: Database, principal: Principal, msg: OutboundMessage | RawMessage,
                  opts: SubmitOptions, settings: Any, now: datetime, cache: TenantCache | None,
                  handoff: Handoff | None = None) -> dict[str, Any]:
    principal.require("send")
    prepared: PreparedRaw | None = None
    if isinstance(msg, RawMessage):
        prepared = prepare_raw(msg, now=now, max_bytes=settings.SMTP_MAX_MESSAGE_BYTES)
        if opts.idempotency_key is None and prepared.header_fields.get("idempotency-key"):
            opts = replace(opts, idempotency_key=prepared.header_fields["idempotency-key"])
        _check_options(opts)
        sender: Address = prepared.from_
        recipients = prepared.envelope_recipients
        envelope_from = prepared.envelope_from
        from_header, to, cc = prepared.from_header, list(prepared.to), list(prepared.cc)
        subject, smtputf8 = prepared.subject, prepared.smtputf8
    else:
        _check_options(opts)
        validated = validate(msg, max_bytes=settings.SMTP_MAX_MESSAGE_BYTES)
        sender = envelope_from = validated.from_
        recipients = validated.envelope_recipients
        from_header = validated.from_header
        to, cc = [a.addr_spec for a in validated.to], [a.addr_spec for a in validated.cc]
        subject = msg.subject
        smtputf8 = sender.smtputf8 or any(a.smtputf8 for a in recipients)
    limits = await sending_limits(db, principal, sender.ascii_domain, settings, cache)
    if envelope_from.ascii_domain != sender.ascii_domain:
        await sending_limits(db, principal, envelope_from.ascii_domain, settings, cache,
                             field="mailFrom")
    if len(recipients) > limits["quota_max_recipients_per_message"]:
        raise QuotaExceeded(
            f"{len(recipients)} recipients exceed the limit of "
            f"{limits['quota_max_recipients_per_message']} per message",
            limit="max_recipients_per_message", field=["to"])

    if prepared is not None:
        raw, message_id_header = prepared.data, prepared.message_id
    else:
        raw, message_id_header = build_mime(validated, sender.ascii_domain, now,
                                            max_bytes=settings.SMTP_MAX_MESSAGE_BYTES)
    rcpt_params = prepared.rcpt_params if prepared is not None else {}
    dsn_ret = msg.dsn_ret if isinstance(msg, RawMessage) else None
    dsn_envid = msg.dsn_envid if isinstance(msg, RawMessage) else None
    message_id = new_id("msg")

    def rows(suppressed: dict[str, str]) -> dict[str, Any]:
        job_ids: dict[str, str] = {}  # recipient domain -> job id
        rcpt_rows, events = [], []
        for addr in recipients:
            reason = suppressed.get(addr.addr_spec.lower()) or suppressed.get(addr.ascii_domain)
            job_id = None
            if reason is not None:
                events.append({"id": new_id("evt"), "org": principal.org, "message": message_id,
                               "type": "SUPPRESSED", "at": now, "recipient": addr.addr_spec,
                               "detail": reason})
            else:
                job_id = job_ids.setdefault(
                    addr.ascii_domain, f"job_{message_id.removeprefix('msg_')}_{len(job_ids) + 1}")
            rcpt_rows.append({
                "id": new_id("rcpt"), "org": principal.org, "message": message_id, "job": job_id,
                "address": addr.addr_spec, "domain": addr.ascii_domain,
                "status": "SUPPRESSED" if reason is not None else "QUEUED",
                "attempts": 0, "last_response": None, "next_attempt_at": None, "updated_at": now,
                # RFC 3461 §4.1-4.2, kept for delivery status notifications
                "dsn_notify": getattr(rcpt_params.get(addr.addr_spec), "notify", None),
                "dsn_orcpt": getattr(rcpt_params.get(addr.addr_spec), "orcpt", None),
            })
        jobs = [{
            "id": job_id, "org": principal.org, "message": message_id,
            "sending_domain": sender.ascii_domain, "rcpt_domain": rcpt_domain, "status": "queued",
            "due": now, "attempts": 0, "owner": None, "lease_until": None, "created_at": now,
            "expires_at": now + timedelta(seconds=settings.SMTP_OUTBOUND_TTL_SECS),
            "require_tls": opts.require_tls, "dsn_ret": dsn_ret, "dsn_envid": dsn_envid,
            # The message's only job and all its recipients: completing it knows the
            # message's status without reading the recipients back (delivery/queue.py).
            "whole": len(job_ids) == 1 and not suppressed,
        } for rcpt_domain, job_id in job_ids.items()]
        statuses = [r["status"] for r in rcpt_rows]
        message = {
            "id": message_id, "org": principal.org, "domain": sender.ascii_domain,
            "message_id": message_id_header, "from": from_header,
            "envelope_from": envelope_from.addr_spec, "to": to, "cc": cc, "subject": subject,
            "status": "SUPPRESSED" if "QUEUED" not in statuses else "QUEUED",
            "list_key": list_key(message_id), "created_at": now, "updated_at": now,
            "tags": opts.tags, "metadata": opts.metadata, "source": opts.source, "size": len(raw),
            "smtputf8": smtputf8, "idempotency_key": opts.idempotency_key,
            "require_tls": opts.require_tls, "dsn_ret": dsn_ret, "dsn_envid": dsn_envid,
            # The QUEUED event (at created_at): one row fewer per send than an event row.
            "queued_detail": f"{len(jobs)} delivery job(s) via {opts.source}",
        }
        sent_count = statuses.count("QUEUED")
        hash_ = _payload_hash(msg, opts) if opts.idempotency_key else None
        params = {
            "idem_id": [principal.org, opts.idempotency_key] if opts.idempotency_key else None,
            "idem_key": opts.idempotency_key, "hash": hash_,
            "idem_expires": now + timedelta(seconds=settings.INBOX_IDEMPOTENCY_TTL_SECS),
            "now": now, "count": sent_count, "jobcount": len(jobs),
            "domain": sender.ascii_domain, "hour": now.strftime("%Y%m%d%H"),
            "day": now.strftime("%Y%m%d"),
            "hourly_limit": limits["quota_hourly_send_limit"],
            "daily_limit": limits["quota_daily_send_limit"],
            "max_queued": limits["quota_max_queued_jobs"],
            "message": message, "raw": raw, "recipients": rcpt_rows, "jobs": jobs,
            "events": events,
        }
        return params

    # Optimistic: most sends hit no suppression, so the store checks for one itself (one round
    # trip); only when it finds one do we look them up and store with those recipients skipped.
    claim: Claim | None = None

    def leased(params: dict[str, Any]) -> dict[str, Any]:
        """Claim room on a local worker for these jobs: they are stored leased to it."""
        nonlocal claim
        if claim is not None:
            claim.cancel()
            claim = None
        if handoff is not None and params["jobs"]:
            claim = handoff.claim(len(params["jobs"]))
            if claim is not None:
                for job in params["jobs"]:
                    job.update(claim.lease(now))
        return params

    params = leased(rows({}))
    params["supp_ids"] = suppression_ids(principal.org, recipients)
    try:
        try:
            # Concurrent sends share one engine call, each its own transaction.
            await db.run_grouped(_STORE, params, procedure=True)
        except DbThrow as exc:
            if exc.throw_code != "SUPPRESSED":
                raise
            found = await db.one(SUPPRESSED_SQL, {"ids": params["supp_ids"], "now": now})
            params = leased(rows({r["target"]: r.get("reason") or "suppressed"
                                  for r in found or []}))
            params["supp_ids"] = []
            await db.run(_STORE, params)
    except DbThrow as exc:
        if claim is not None:
            claim.cancel()
        if exc.throw_code == "IDEMPOTENT_REPLAY":
            row = await db.one("SELECT * FROM ONLY type::thing('message', $id) WHERE org = $org",
                               {"id": exc.detail, "org": principal.org})
            if not row:
                raise NotFound("the message of this idempotency key is gone") from None
            return row
        if exc.throw_code == "IDEMPOTENCY_CONFLICT":
            raise IdempotencyConflict(
                f"idempotency key already used with a different payload (message {exc.detail})",
                field=["idempotencyKey"]) from None
        if exc.throw_code == "QUOTA":
            limit = exc.detail
            hours = 1 if limit == "hourly_send_limit" else 24
            resets = _window_end(now, hours).isoformat() if limit != "max_queued_jobs" else None
            when = f"; resets at {resets}" if resets else "; frees up as queued mail is delivered"
            raise QuotaExceeded(f"{limit} of {sender.ascii_domain} reached{when}",
                                limit=limit, resets_at=resets) from None
        raise
    except BaseException:
        if claim is not None:
            claim.cancel()
        raise
    _hand_over(handoff, claim, params)
    return params["message"]


def _hand_over(handoff: Handoff | None, claim: Claim | None, params: dict[str, Any]) -> None:
    """After the commit: the claimed worker starts the jobs, or the workers are woken."""
    if claim is not None:
        by_job: dict[str, list[dict[str, Any]]] = {}
        for row in params["recipients"]:  # one pass, however many recipient domains
            if row["job"] is not None:
                by_job.setdefault(row["job"], []).append(row)
        message, raw = params["message"], params["raw"]
        claim.deliver([(job, (message, raw, by_job.get(job["id"], [])))
                       for job in params["jobs"]])
    elif handoff is not None and params["jobs"]:
        handoff.queued(len(params["jobs"]))
