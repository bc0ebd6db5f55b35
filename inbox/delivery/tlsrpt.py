"""SMTP TLS Reporting (RFC 8460): per-attempt TLS outcome counters and the daily JSON report.

Owns the `tlsrpt_counter` table, the report structure (§4.4) and the `_smtp._tls` TXT record
syntax (§3). Delivering reports (mailto / https, once per domain and day) is in
`inbox.delivery.tlsrpt_report`. Does no network I/O: the database is passed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlsplit

from inbox.errors import ValidationError

# RFC 8460 §4.3 (and the IANA "STARTTLS Validation Result Types" registry).
RESULT_TYPES = (
    # §4.3.1 negotiation failures
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure",
    # §4.3.2 policy failures: DANE
    "tlsa-invalid", "dnssec-invalid", "dane-required",
    # §4.3.2 policy failures: MTA-STS
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)
# RFC 8460 §4.4 "policy-type".
POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
# Keeps one odd peer from growing a counter key (and the report) without bound.
MAX_FIELD_CHARS = 255
# RFC 8460 §3: the TXT record lives at this prefix of the policy domain.
TXT_PREFIX = "_smtp._tls."

# Adds each item's `n` to its counter; an item is `counter`'s id and columns plus `n`. The
# completion's transaction runs it for a batch of deliveries (queue.py), `record` for one.
COUNT = """FOR $t IN $tlsrpt {
  UPSERT type::thing('tlsrpt_counter', $t.id) SET n += $t.n, day = $t.day,
    policy_domain = $t.policy_domain, policy_type = $t.policy_type,
    policy_strings = $t.policy_strings, mx_host = $t.mx_host, success = $t.success,
    result_type = $t.result_type, sending_ip = $t.sending_ip, receiving_ip = $t.receiving_ip,
    receiving_mx_helo = $t.receiving_mx_helo, failure_reason = $t.failure_reason
    RETURN NONE;
};
"""


def _domain(name: str, what: str) -> str:
    text = (name or "").strip().rstrip(".").lower()
    if not text or len(text) > 253 or any(c.isspace() or c in "/@!\\" for c in text):
        raise ValidationError(f"{what} {name!r} is not a domain name", field=[what])
    return text


def _short(value: str) -> str:
    text = " ".join((value or "").split())  # no line breaks or runs of spaces in the report
    return text[:MAX_FIELD_CHARS]


async def record(db: Any, *, day: date, policy_domain: str, policy_type: str,
                 policy_strings: list[str], mx_host: str, success: bool,
                 result_type: str | None = None, sending_ip: str = "",
                 receiving_ip: str = "", receiving_mx_helo: str = "",
                 failure_reason: str = "") -> None:
    """Count one delivery attempt's TLS outcome (one UPSERT; concurrent calls add up).
    Deliveries count theirs in the transaction that records their results instead
    (`counter` here, `JobOutcome.tlsrpt` in queue.py)."""
    counter_id, row = counter(
        day=day, policy_domain=policy_domain, policy_type=policy_type,
        policy_strings=policy_strings, mx_host=mx_host, success=success,
        result_type=result_type, sending_ip=sending_ip, receiving_ip=receiving_ip,
        receiving_mx_helo=receiving_mx_helo, failure_reason=failure_reason)
    await db.run(COUNT, {"tlsrpt": [{"id": counter_id, "n": 1, **row}]})


def counter(*, day: date, policy_domain: str, policy_type: str, policy_strings: list[str],
            mx_host: str, success: bool, result_type: str | None = None,
            sending_ip: str = "", receiving_ip: str = "", receiving_mx_helo: str = "",
            failure_reason: str = "") -> tuple[str, dict[str, Any]]:
    """The counter one TLS outcome adds 1 to: its id and its columns (all but `n`).

    The counter key is (day, policy domain, policy type + strings, MX host, outcome); a failure's
    outcome also holds its result type, IPs, HELO name and reason code (RFC 8460 §4.4
    failure-details). A failure without `result_type` counts as "validation-failure", the
    §4.3.1 catch-all. Raises `ValidationError` on an unknown policy or result type.
    """
    domain = _domain(policy_domain, "policy_domain")
    if policy_type not in POLICY_TYPES:
        raise ValidationError(f"policy_type must be one of {', '.join(POLICY_TYPES)}",
                              field=["policy_type"])
    strings = [_short(s) for s in policy_strings or []]
    mx = (mx_host or "").strip().rstrip(".").lower()[:MAX_FIELD_CHARS]
    if success:
        if result_type is not None:
            raise ValidationError("a successful session has no result_type",
                                  field=["result_type"])
        # Successes are only summed (§4.4 summary): peer details would just split the counter.
        outcome: dict[str, Any] = {"result_type": None, "sending_ip": "", "receiving_ip": "",
                                   "receiving_mx_helo": "", "failure_reason": ""}
    else:
        kind = result_type or "validation-failure"
        if kind not in RESULT_TYPES:
            raise ValidationError(f"unknown result_type {result_type!r} (RFC 8460 §4.3)",
                                  field=["result_type"])
        outcome = {"result_type": kind, "sending_ip": _short(sending_ip),
                   "receiving_ip": _short(receiving_ip),
                   "receiving_mx_helo": _short(receiving_mx_helo),
                   "failure_reason": _short(failure_reason)}
    day_text = day.isoformat()
    key = json.dumps([day_text, domain, policy_type, strings, mx, success, outcome],
                     sort_keys=True, separators=(",", ":"))
    # The id carries the day first so a day's counters are easy to find and prune by eye.
    counter_id = f"{day_text}_{hashlib.sha256(key.encode()).hexdigest()[:40]}"
    return counter_id, {"day": day_text, "policy_domain": domain, "policy_type": policy_type,
                        "policy_strings": strings, "mx_host": mx, "success": bool(success),
                        **outcome}


async def counters(db: Any, *, day: date, policy_domain: str | None = None
                   ) -> list[dict[str, Any]]:
    """The raw counter rows of a day (optionally of one policy domain)."""
    if policy_domain is None:
        return await db.one("SELECT * FROM tlsrpt_counter WHERE day = $day",
                            {"day": day.isoformat()}) or []
    return await db.one(
        "SELECT * FROM tlsrpt_counter WHERE day = $day AND policy_domain = $domain",
        {"day": day.isoformat(), "domain": _domain(policy_domain, "policy_domain")}) or []


async def policy_domains(db: Any, *, day: date) -> list[str]:
    """Policy domains that have counters on `day`, sorted."""
    rows = await db.one("SELECT VALUE policy_domain FROM tlsrpt_counter WHERE day = $day",
                        {"day": day.isoformat()}) or []
    return sorted(set(rows))


async def prune(db: Any, *, before: date) -> None:
    """Forget counters and send claims of days before `before`."""
    await db.run("DELETE tlsrpt_counter WHERE day < $day; DELETE tlsrpt_sent WHERE day < $day;",
                 {"day": before.isoformat()})


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # RFC 3339 §5.6, in UTC


def day_range(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day: the report's period (RFC 8460 §4.1: one day, UTC)."""
    start = datetime.combine(day, time(0, 0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def _mx_patterns(policy_strings: Sequence[str]) -> list[str]:
    # RFC 8461 §3.2: an MTA-STS policy lists its MX patterns as "mx: <pattern>" lines.
    out = []
    for line in policy_strings:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "mx" and value.strip():
            out.append(value.strip())
    return out


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Counter rows → the §4.4 "policies" array, in a stable order."""
    groups: dict[tuple[str, str, tuple[str, ...]], dict[str, Any]] = {}
    for row in rows:
        strings = tuple(row.get("policy_strings") or ())
        key = (row["policy_domain"], row["policy_type"], strings)
        group = groups.setdefault(key, {"ok": 0, "failed": 0, "hosts": set(), "details": {}})
        n = int(row.get("n") or 0)
        if row.get("mx_host"):
            group["hosts"].add(row["mx_host"])
        if row.get("success"):
            group["ok"] += n
            continue
        group["failed"] += n
        detail_key = (row["result_type"], row.get("sending_ip") or "",
                      row.get("receiving_ip") or "", row.get("mx_host") or "",
                      row.get("receiving_mx_helo") or "", row.get("failure_reason") or "")
        group["details"][detail_key] = group["details"].get(detail_key, 0) + n
    policies = []
    for (domain, ptype, strings), group in sorted(groups.items()):
        policy: dict[str, Any] = {"policy-type": ptype}
        if strings:
            policy["policy-string"] = list(strings)
        policy["policy-domain"] = domain
        # §4.4 mx-host (an array per erratum 6241): the policy's MX patterns for MTA-STS,
        # otherwise the MX hosts the sessions went to.
        hosts = _mx_patterns(strings) if ptype == "sts" else []
        hosts = hosts or sorted(group["hosts"])
        if hosts:
            policy["mx-host"] = hosts
        result: dict[str, Any] = {
            "policy": policy,
            "summary": {"total-successful-session-count": group["ok"],
                        "total-failure-session-count": group["failed"]},
        }
        details = []
        for (kind, sending, receiving, mx, helo, reason), count in sorted(
                group["details"].items()):
            item: dict[str, Any] = {"result-type": kind}
            if sending:
                item["sending-mta-ip"] = sending
            if mx:
                item["receiving-mx-hostname"] = mx
            if helo:
                item["receiving-mx-helo"] = helo
            if receiving:
                item["receiving-ip"] = receiving
            item["failed-session-count"] = count
            if reason:
                item["failure-reason-code"] = reason
            details.append(item)
        if details:
            result["failure-details"] = details
        policies.append(result)
    return policies


async def build_report(db: Any, *, policy_domain: str, day: date, organization_name: str,
                       contact_info: str, report_id: str) -> dict[str, Any]:
    """The RFC 8460 §4.4 aggregate report of one policy domain for one UTC day."""
    rows = await counters(db, day=day, policy_domain=policy_domain)
    start, end = day_range(day)
    return {
        "organization-name": organization_name,
        # §4.4: the RFC's own example ends the day at 23:59:59Z.
        "date-range": {"start-datetime": _rfc3339(start),
                       "end-datetime": _rfc3339(end - timedelta(seconds=1))},
        "contact-info": contact_info,
        "report-id": report_id,
        "policies": aggregate(rows),
    }


def parse_record(text: str) -> list[str]:
    """The rua URIs of one `_smtp._tls` TXT record (RFC 8460 §3); ValueError if it is not one.

    tlsrpt-record = "v=TLSRPTv1" 1*(field-delim tlsrpt-field) [field-delim], field-delim =
    *WSP ";" *WSP; rua = "rua=" URI *(*WSP "," *WSP URI). Unknown fields are extensions and
    are ignored; only mailto: and https: URIs are kept (§3: the two defined schemes).
    """
    fields = [f.strip(" \t") for f in text.split(";")]
    if not fields or fields[0] != "v=TLSRPTv1":
        raise ValueError("the record does not start with v=TLSRPTv1")
    ruas: list[str] | None = None
    for i, field in enumerate(fields[1:], start=1):
        if not field:
            if i == len(fields) - 1:
                continue  # a trailing field-delim
            raise ValueError("empty field")
        name, sep, value = field.partition("=")
        if not sep or not name or any(c.isspace() for c in name):
            raise ValueError(f"bad field {field!r}")
        if name != "rua":
            continue
        if ruas is not None:
            raise ValueError("more than one rua field")
        ruas = []
        for uri in value.split(","):
            uri = uri.strip(" \t")
            if not uri or any(c.isspace() for c in uri):
                raise ValueError(f"bad rua URI {uri!r}")
            scheme = urlsplit(uri).scheme.lower()
            if scheme in ("mailto", "https"):
                ruas.append(uri)
    if ruas is None:
        raise ValueError("the record has no rua field")
    return ruas


def select_record(texts: Sequence[str]) -> list[str] | None:
    """RFC 8460 §3: of the TXT records, keep those starting "v=TLSRPTv1;"; exactly one must
    remain and parse, else the domain does not do TLSRPT (None)."""
    candidates = [t for t in texts if t.startswith("v=TLSRPTv1") and
                  t[len("v=TLSRPTv1"):].lstrip(" \t")[:1] in (";", "")]
    if len(candidates) != 1:
        return None
    try:
        return parse_record(candidates[0])
    except ValueError:
        return None
