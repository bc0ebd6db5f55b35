"""Submission benchmark: messages/s accepted over port 587 with STARTTLS + AUTH PLAIN, and
delivered/s end to end to a TLS sink with DANE on (issue 4).

Accepted/s: starts `python -m inbox serve --no-workers` on a fresh data dir with durable
settings (INBOX_DB_SYNC=true: every accepted message is fsynced before its 250), the transfer
server off, per-IP/credential rate limits off (one client address sends everything) and the
quotas raised. The organization, the verified domain `sender.test` and an SMTP credential are
made with the CLI. A small pipelining SMTP client (raw asyncio, so the load generator costs
little CPU) opens C sessions, each doing EHLO, STARTTLS, EHLO, AUTH PLAIN once, then sending its
share of ~1 KB messages (MAIL, RCPT, DATA pipelined per RFC 2920). Each 250 means submit()
stored the message, its recipient and its job durably.

Delivered/s with DANE (after those runs; `--no-dane` skips it): a DNSSEC-signed zone
`dane.test` (MX mx.dane.test, A 127.0.0.1, TLSA 3 1 1 of a self-signed leaf) served by the test
DNS server behind a real validating unbound; a private Postfix (tests/support/postfix.py) on a
free port doing STARTTLS with that leaf and discarding each message once queued; `inbox serve`
WITH workers on another fresh durable data dir, INBOX_DNS_NAMESERVERS = unbound and
SMTP_OUTBOUND_PORT = Postfix's port (DANE mode: the default, prefer). After 8 warm-up messages,
N messages go over 587 at C sessions to rcpt@dane.test; the clock runs from the first
connection until Postfix has logged N more "status=sent (discarded)". Five of the messages are
then read back over GraphQL (an API key made with the CLI): each must be DELIVERED with a TLS
event of policy dane, verified. Needs root (Postfix) and Debian's postfix and unbound.

Run: python bench/submission.py [--messages N] [--sessions 1,8,32] [--keep]
         [--no-dane] [--dane-messages 500] [--dane-sessions 8] [--dane-timeout 180]

Prints one JSON line on stdout (progress on stderr): `accepted_per_s_c<C>` for each session
count, `peak_rss_mb` of the service, `target_c8_per_s` (issue 4: >= 300);
`delivered_per_s_dane`, `dane_accepted_per_s` (587 while the workers deliver),
`dane_verified` (all `dane_checked` sampled messages delivered over DANE-verified TLS),
`sink_tls_sessions` / `sink_sessions` (Postfix's smtpd sessions with TLS / all), `dane_errors`;
on failure `delivered_per_s_dane` is null and `dane_error` says why. `errors` counts refused
submissions plus a failed or unverified DANE phase; the exit status is 1 when it is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    cli,
    free_port,
    inbox_env,
    log,
    peak_rss_mb,
    stop,
    wait_port,
)
from bench.common import cpu_seconds as cpu_secs  # noqa: E402
from bench.common import smtp_reply as _reply  # noqa: E402

MASTER_KEY = base64.b64encode(b"s" * 32).decode()
SENDER = "sender.test"
BIG = "100000000"


def make_message(size: int = 1024, to: str = "customer@rcpt.test") -> bytes:
    line = "Your order has shipped. Tracking details and the invoice follow below, thanks.\r\n"
    body = (line * (size // len(line) + 1))[:size].rsplit("\r\n", 1)[0] + "\r\n"
    return (f"From: Shop <orders@{SENDER}>\r\nTo: {to}\r\nSubject: Your order"
            "\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}").encode()


class Counter:
    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.samples: list[str] = []
        self.ids: list[str] = []  # "250 2.0.0 OK queued as <id>": the stored message ids

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(text[:200])


async def session(port: int, auth: bytes, data: bytes, count: int, counter: Counter,
                  rcpt: str) -> None:
    """One session: STARTTLS, AUTH PLAIN, then `count` pipelined transactions."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        steps: list[tuple[bytes | None, int]] = [(None, 220), (b"EHLO bench.test\r\n", 250),
                                                 (b"STARTTLS\r\n", 220)]
        for command, want in steps:
            if command:
                writer.write(command)
            code, text = await _reply(reader)
            if code != want:
                counter.error(text)
                return
        await writer.start_tls(context)
        for command, want in ((b"EHLO bench.test\r\n", 250), (b"AUTH PLAIN " + auth + b"\r\n",
                                                                235)):
            writer.write(command)
            code, text = await _reply(reader)
            if code != want:
                counter.error(text)
                return
        envelope = f"MAIL FROM:<orders@{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"
        payload = data + b".\r\n"
        for _ in range(count):
            writer.write(envelope.encode())
            replies = [await _reply(reader) for _ in range(3)]
            if [c for c, _ in replies] != [250, 250, 354]:
                counter.error(" | ".join(t for _, t in replies))
                if any(c == 421 for c, _ in replies):
                    return
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(payload)
            code, text = await _reply(reader)
            if code == 250:
                counter.ok += 1
                counter.ids.append(text.rsplit(" ", 1)[-1])
            else:
                counter.error(text)
                if code == 421:
                    return
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def run_load(port: int, auth: bytes, data: bytes, total: int, sessions: int,
                   rcpt: str = "customer@rcpt.test") -> tuple[float, Counter]:
    counter = Counter()
    per = [total // sessions + (1 if i < total % sessions else 0) for i in range(sessions)]
    started = time.perf_counter()
    await asyncio.gather(*(session(port, auth, data, n, counter, rcpt) for n in per if n))
    elapsed = time.perf_counter() - started
    return counter.ok / elapsed if elapsed else 0.0, counter


def service_env(data_dir: Path, port: int) -> dict[str, str]:
    env = inbox_env()
    env.update({
        "INBOX_DATA_DIR": str(data_dir), "INBOX_MASTER_KEY": MASTER_KEY,
        "INBOX_DB_SYNC": os.environ.get("BENCH_DB_SYNC", "true"),
        "INBOX_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
        "INBOX_HTTP_PORT": str(free_port()), "SERVER_HOSTNAME": "submit.bench.test",
        "INBOX_SMTP_TRANSFER_ENABLED": "false", "SMTP_TRANSFER_PORT": "0",
        "SMTP_SUBMISSION_PORT": str(port), "SMTP_SUBMISSIONS_PORT": "0",
        # One source address and one credential send everything: limits would measure
        # themselves (each hit is a durable counter write).
        "SMTP_RATE_LIMIT_SUBMISSION_CONNECTIONS_PER_MINUTE": "0",
        "SMTP_RATE_LIMIT_SUBMISSION_MESSAGES_PER_MINUTE": "0",
        "INBOX_QUOTA_HOURLY_SEND_LIMIT": BIG, "INBOX_QUOTA_DAILY_SEND_LIMIT": BIG,
        "INBOX_QUOTA_MAX_QUEUED_JOBS": BIG,
    })
    return env


# -- end to end with DANE: 587 -> queue -> workers -> DANE-EE STARTTLS -> Postfix ----------

DANE_DOMAIN, DANE_MX = "dane.test", "mx.dane.test"
DANE_ZONE = """
@ 3600 IN SOA ns hostmaster 1 3600 600 86400 60
@ NS ns
ns A 127.0.0.1
@ MX 10 mx
mx A 127.0.0.1
_25._tcp.mx TLSA 3 1 1 {tlsa}
"""
DELIVERED = "status=sent (discarded)"  # Postfix's discard(8), once per recipient
MESSAGE_TLS = ("query M($id: ID!) { message(id: $id) { status "
               "events { type tls { used policy verified } } } }")


def graphql(http_port: int, key: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        data: dict[str, Any] = json.loads(response.read())
    if data.get("errors"):
        raise RuntimeError(f"GraphQL errors: {data['errors']}")
    return data


def wait_sink(postfix: Any, want: int, timeout: float) -> float:
    """Poll the sink's log until it has discarded `want` messages; the monotonic time then."""
    deadline = time.monotonic() + timeout
    while (got := postfix.log_text().count(DELIVERED)) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the TLS sink received {got} of {want} messages within "
                               f"{timeout:.0f}s (see the serve log and Postfix's maillog)")
        time.sleep(0.05)
    return time.monotonic()


def used_dane(http_port: int, key: str, message_id: str, timeout: float = 15) -> bool:
    """Whether the message was delivered over a DANE-verified TLS session (its events)."""
    message_id = message_id.removeprefix("message:").strip("⟨⟩`")
    deadline = time.monotonic() + timeout
    while True:  # the sink may log the message before the worker records the delivery
        msg = graphql(http_port, key, MESSAGE_TLS, {"id": message_id})["data"]["message"]
        if msg and msg["status"] == "DELIVERED" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not msg or msg["status"] != "DELIVERED":
        log(f"message {message_id} not DELIVERED: {msg}")
        return False
    tls = [e["tls"] for e in msg["events"] if e.get("tls")]
    return any(t["used"] and t["policy"] == "dane" and t["verified"] for t in tls)


def dane_phase(tmp: Path, messages: int, sessions: int, timeout: float) -> dict[str, Any]:
    """Delivered/s end to end with DANE on: a signed zone (MX, A, TLSA 3 1 1 of the sink's
    self-signed leaf, RFC 7672 §3.1.1) behind a real validating unbound; a Postfix sink doing
    STARTTLS with that leaf, discarding after queueing; `inbox serve` with workers."""
    from tests.support.dnssec import SignedDnsServer, Unbound, ZoneKey, sign_zone
    from tests.support.postfix import PostfixInstance, make_root, remove_root, unavailable
    from tests.support.testca import self_signed

    reason = unavailable() or (None if Unbound.available() else "unbound is not installed")
    if reason:
        raise RuntimeError(f"DANE phase cannot run: {reason} (or use --no-dane)")
    data = make_message(to=f"rcpt@{DANE_DOMAIN}")
    with contextlib.ExitStack() as stack:  # closes in reverse: serve, Postfix, unbound, DNS
        leaf, zone_key = self_signed(DANE_MX), ZoneKey.generate()
        tlsa = hashlib.sha256(leaf.spki_der).hexdigest()  # selector 1 (SPKI), matching 1
        dns_server = SignedDnsServer()
        dns_server.start()
        stack.callback(dns_server.stop)
        dns_server.load_signed_zone(sign_zone(DANE_DOMAIN, DANE_ZONE.format(tlsa=tlsa),
                                              zone_key))
        unbound = Unbound(dns_server, anchors=[zone_key.trust_anchor(DANE_DOMAIN)],
                          stub_zones=[DANE_DOMAIN], workdir=tmp / "unbound")
        stack.callback(unbound.stop)
        unbound.start()
        root = make_root("inbox-bench-sink-")
        stack.callback(remove_root, root)
        cert_file, key_file = leaf.write(root, "sink")
        postfix = PostfixInstance(root, relay_port=None, listen_port=0, myhostname=DANE_MX,
                                  extra_main_cf={"smtpd_tls_security_level": "may",
                                                 "smtpd_tls_cert_file": str(cert_file),
                                                 "smtpd_tls_key_file": str(key_file),
                                                 "smtpd_tls_loglevel": "1"})
        stack.callback(postfix.stop)
        postfix.start()
        log(f"DANE: unbound {unbound.address}, TLS Postfix sink 127.0.0.1:{postfix.listen_port}")

        port = free_port()
        env = service_env(tmp / "dane-data", port)
        env.update({"INBOX_DNS_NAMESERVERS": unbound.address,
                    "SMTP_OUTBOUND_PORT": str(postfix.listen_port),
                    "SMTP_OUTBOUND_TIMEOUT_SECS": "15"})
        http_port = int(env["INBOX_HTTP_PORT"])
        org = cli(env, "org", "create", "Bench DANE")["id"]
        cli(env, "domain", "add", org, SENDER, "--verified")
        cred = cli(env, "smtp-credential", "create", org, "--name", "bench")
        api_key = cli(env, "apikey", "create", org, "--scope", "read")["key"]
        auth = base64.b64encode(f"\0{cred['username']}\0{cred['password']}".encode())
        log_path = tmp / "serve-dane.log"
        log_file = stack.enter_context(open(log_path, "wb"))  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "inbox", "serve"], env=env, cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT)
        stack.callback(stop, proc)
        try:
            wait_port(port, proc, "inbox serve")
            rcpt = f"rcpt@{DANE_DOMAIN}"
            # Warm-up: the KDF, the worker's DNS/TLSA lookups and connections, Postfix daemons.
            _, warm = asyncio.run(run_load(port, auth, data, 8, 2, rcpt))
            base = warm.ok
            wait_sink(postfix, base, 60)
            log(f"DANE: warm-up delivered ({base}); sending {messages} at c={sessions}")
            started = time.monotonic()
            rate, counter = asyncio.run(run_load(port, auth, data, messages, sessions, rcpt))
            log(f"DANE: {counter.ok} accepted ({rate:.1f}/s, {counter.errors} errors)")
            done = wait_sink(postfix, base + counter.ok, timeout)
        except Exception:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            log("serve log tail:\n" + "\n".join(tail))
            raise
        delivered = counter.ok / (done - started) if counter.ok else 0.0
        log(f"DANE: {counter.ok} delivered to the sink in {done - started:.1f}s "
            f"= {delivered:.1f}/s")
        ids = counter.ids + warm.ids
        sample = [ids[i * (len(ids) - 1) // 4] for i in range(5)] if ids else []
        verified = [used_dane(http_port, api_key, message_id) for message_id in sample]
        text = postfix.log_text()
        return {"delivered_per_s_dane": round(delivered, 1),
                "dane_accepted_per_s": round(rate, 1), "dane_messages": counter.ok,
                "dane_sessions": sessions, "dane_errors": counter.errors,
                "dane_verified": bool(verified) and all(verified),
                "dane_checked": len(verified),
                "sink_tls_sessions": text.count("TLS connection established from"),
                "sink_sessions": text.count("]: connect from") - 1,  # less the start probe
                "dane_peak_rss_mb": peak_rss_mb(proc.pid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--messages", type=int, default=1000, help="per session count")
    ap.add_argument("--sessions", default="1,8,32")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-dane", action="store_true", help="skip the end-to-end DANE phase")
    ap.add_argument("--dane-messages", type=int, default=500)
    ap.add_argument("--dane-sessions", type=int, default=8)
    ap.add_argument("--dane-timeout", type=float, default=180,
                    help="seconds the sink may take to receive them all")
    args = ap.parse_args()
    counts = [int(s) for s in args.sessions.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="inbox-bench-submission-"))
    result: dict[str, Any] = {"messages": args.messages, "target_c8_per_s": 300,
                              "durable": os.environ.get("BENCH_DB_SYNC", "true") == "true"}
    errors = 0
    samples: list[str] = []
    proc = None
    data = make_message()
    try:
        port = free_port()
        env = service_env(tmp / "data", port)
        org = cli(env, "org", "create", "Bench")["id"]
        cli(env, "domain", "add", org, SENDER, "--verified")
        cred = cli(env, "smtp-credential", "create", org, "--name", "bench")
        auth = base64.b64encode(f"\0{cred['username']}\0{cred['password']}".encode())
        log_file = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "inbox", "serve", "--no-workers"],
                                env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        wait_port(port, proc, "inbox serve")
        asyncio.run(run_load(port, auth, data, 40, 2))  # warm-up (and the KDF, once)
        cpu_before, wall_before = cpu_secs(proc.pid), time.monotonic()
        for count in counts:
            rate, counter = asyncio.run(run_load(port, auth, data, args.messages, count))
            result[f"accepted_per_s_c{count}"] = round(rate, 1)
            errors += counter.errors
            samples += counter.samples
            log(f"c={count:3d}: {rate:7.1f} msg/s ({counter.ok} ok, {counter.errors} errors)")
        result["server_cpu_cores"] = round(
            (cpu_secs(proc.pid) - cpu_before) / (time.monotonic() - wall_before), 2)
        result["peak_rss_mb"] = peak_rss_mb(proc.pid)
        stop(proc)
        result["delivered_per_s_dane"] = None
        if not args.no_dane:
            try:
                dane = dane_phase(tmp, args.dane_messages, args.dane_sessions,
                                  args.dane_timeout)
            except Exception as exc:  # the figure is missing; say why in the JSON
                log(f"DANE phase failed: {exc}")
                result["dane_error"] = str(exc)[:500]
                errors += 1
            else:
                result.update(dane)
                errors += dane["dane_errors"] + (not dane["dane_verified"])
    finally:
        stop(proc)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["errors"] = errors
    if samples:
        log("error samples: " + " || ".join(samples[:3]))
    print(json.dumps(result))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
