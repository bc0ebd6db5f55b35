"""Inbound benchmark: messages/s accepted on our port 25 with every check on, against Postfix.

Starts on 127.0.0.1: the test DNS server (a thread here) serving SPF, DKIM and DMARC for the
sending domain, and `python -m inbox serve --no-workers` with durable settings
(INBOX_DB_SYNC=true, local encrypted blob storage) on a fresh data dir; the tenant, domain and
mailbox are made with the CLI. A small pipelining SMTP client (raw asyncio, so the load
generator costs little CPU) sends DKIM-signed messages of 1 KB and 100 KB over 1, 8 and 32
concurrent sessions; each accepted message went through SPF, DKIM, ARC, DMARC, MIME parsing,
AES-GCM encryption, a durable blob write and the index transaction before its 250.
The same load then goes to a private Postfix smtpd (tests/support/postfix.py; it queues each
message durably, then discards it) for a ratio.

Run: python bench/inbound.py [--messages N] [--sizes 1024,102400] [--sessions 1,8,32]
                             [--no-postfix] [--keep] [--profile FILE]

Prints one JSON line on stdout (progress on stderr): for each size and session count,
`inbox_<size>_c<S>` and `postfix_<size>_c<S>` in messages/s, `ratio_<size>_c<S>`
(inbox / postfix), `cpu_ms_per_msg_<size>_c<S>` (the service's CPU per accepted message, which
varies less than the rate on a shared VM), `errors`, `peak_rss_mb` of the service.
Target (issue 3): >= 200 messages/s of 1 KB with every check on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Profiler,
    cli,
    cpu_reference_ms,
    cpu_seconds,
    cpu_times,
    free_port,
    inbox_env,
    log,
    peak_rss_mb,
    steal_pct,
    stop,
    wait_port,
)
from bench.common import smtp_reply as _reply  # noqa: E402
from tests.support.dnsserver import DnsServer  # noqa: E402

MASTER_KEY = base64.b64encode(b"i" * 32).decode()
SENDER = "sender.test"
RCPT = "info@rcpt.test"


def make_message(size: int, pem: bytes) -> bytes:
    line = "Your order has shipped. Tracking details and the invoice follow below, thanks.\r\n"
    body = (line * (size // len(line) + 1))[:size].rsplit("\r\n", 1)[0] + "\r\n"
    raw = (f"From: Shop <orders@{SENDER}>\r\nTo: {RCPT}\r\nSubject: Your order\r\n"
           f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench-{size}@{SENDER}>\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           f"{body}").encode()
    sig = dkim.sign(raw, b"s1", SENDER.encode(), pem,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + raw


def dot_stuff(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


class Counter:
    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.samples: list[str] = []

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(text[:200])


async def session(port: int, data: bytes, count: int, counter: Counter) -> None:
    """One SMTP session sending `count` messages with PIPELINING (RFC 2920)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        code, text = await _reply(reader)
        if code != 220:
            counter.error(text)
            return
        writer.write(f"EHLO mail.{SENDER}\r\n".encode())
        await _reply(reader)
        envelope = f"MAIL FROM:<orders@{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
        payload = data + b"\r\n.\r\n"
        for _ in range(count):
            writer.write(envelope)
            replies = [await _reply(reader) for _ in range(3)]
            if [c for c, _ in replies] != [250, 250, 354]:
                counter.error(" | ".join(t for _, t in replies))
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(payload)
            code, text = await _reply(reader)
            if code == 250:
                counter.ok += 1
            else:
                counter.error(text)
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_load(port: int, data: bytes, total: int, sessions: int) -> tuple[float, Counter]:
    counter = Counter()
    per = [total // sessions + (1 if i < total % sessions else 0) for i in range(sessions)]
    started = time.perf_counter()
    await asyncio.gather(*(session(port, data, n, counter) for n in per if n))
    elapsed = time.perf_counter() - started
    return counter.ok / elapsed if elapsed else 0.0, counter


def service_env(data_dir: Path, dns: DnsServer, smtp_port: int) -> dict[str, str]:
    env = inbox_env()
    env.update({
        "INBOX_DATA_DIR": str(data_dir), "INBOX_MASTER_KEY": MASTER_KEY,
        "INBOX_DB_SYNC": os.environ.get("BENCH_DB_SYNC", "true"),
        "INBOX_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
        "INBOX_HTTP_PORT": str(free_port()), "SMTP_TRANSFER_PORT": str(smtp_port),
        "SERVER_HOSTNAME": "mx.bench.test", "INBOX_DNS_NAMESERVERS": dns.address,
        # One source address sends everything: per-IP limits would measure themselves.
        "SMTP_RATE_LIMIT_CONNECTIONS_PER_MINUTE": "0",
        "SMTP_RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
    })
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=1500,
                    help="per run (100 KB runs: a quarter); short runs measure warm-up")
    ap.add_argument("--sizes", default="1024,102400")
    ap.add_argument("--sessions", default="1,8,32")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--profile", metavar="FILE",
                    help="py-spy record the service (GIL-holding stacks, collapsed format) "
                         "during the measured runs")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    session_counts = [int(s) for s in args.sessions.split(",")]

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    messages = {size: dot_stuff(make_message(size, pem)) for size in sizes}

    tmp = Path(tempfile.mkdtemp(prefix="inbox-bench-inbound-"))
    dns = DnsServer().start()
    dns.add_txt(SENDER, "v=spf1 ip4:127.0.0.1 -all")
    dns.add_txt(f"s1._domainkey.{SENDER}", f"v=DKIM1; k=rsa; p={pub}")
    dns.add_txt(f"_dmarc.{SENDER}", "v=DMARC1; p=reject")
    result: dict[str, Any] = {"target_1k_per_s": 200}
    errors = 0
    samples: list[str] = []
    proc = None
    try:
        port = free_port()
        env = service_env(tmp / "data", dns, port)
        org = cli(env, "org", "create", "Bench")["id"]
        cli(env, "domain", "add", org, "rcpt.test", "--verified")
        cli(env, "mailbox", "create", org, "rcpt.test", "info")
        log_file = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "inbox", "serve", "--no-workers"],
                                env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        wait_port(port, proc, "inbox serve")
        asyncio.run(run_load(port, messages[sizes[0]], 20, 2))  # warm-up
        profiler = Profiler(proc.pid, args.profile, tmp) if args.profile else None
        result["cpu_ref_ms"] = cpu_reference_ms()
        times0 = cpu_times()
        for size in sizes:
            total = args.messages if size <= 4096 else max(20, args.messages // 4)
            for count in session_counts:
                cpu = cpu_seconds(proc.pid)
                rate, counter = asyncio.run(run_load(port, messages[size], total, count))
                cpu = cpu_seconds(proc.pid) - cpu
                name = f"{size // 1024}k_c{count}"
                result[f"inbox_{name}"] = round(rate, 1)
                result[f"cpu_ms_per_msg_{name}"] = round(cpu * 1000 / max(1, counter.ok), 2)
                errors += counter.errors
                samples += counter.samples
                log(f"inbox   {name}: {rate:7.1f} msg/s ({counter.ok} ok, "
                    f"{counter.errors} errors)")
        result["steal_pct"] = steal_pct(times0, cpu_times())
        if profiler is not None:
            profiler.stop()
        result["peak_rss_mb"] = peak_rss_mb(proc.pid)
        stop(proc)
        proc = None
        if not args.no_postfix:
            run_postfix(sizes, session_counts, messages, args.messages, result)
    finally:
        stop(proc)
        dns.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["errors"] = errors
    if samples:
        log("error samples: " + " || ".join(samples[:3]))
    print(json.dumps(result))


def run_postfix(sizes: list[int], session_counts: list[int], messages: dict[int, bytes],
                per_run: int, result: dict[str, Any]) -> None:
    from tests.support.postfix import PostfixInstance, make_root, remove_root, unavailable

    reason = unavailable()
    if reason:
        log(f"postfix comparison skipped: {reason}")
        return
    root = make_root()
    instance = PostfixInstance(root, relay_port=None, listen_port=0)
    try:
        instance.start()
        port = instance.listen_port
        assert port is not None
        for size in sizes:
            total = per_run if size <= 4096 else max(20, per_run // 4)
            for count in session_counts:
                rate, counter = asyncio.run(run_load(port, messages[size], total, count))
                name = f"{size // 1024}k_c{count}"
                result[f"postfix_{name}"] = round(rate, 1)
                if result.get(f"inbox_{name}") and rate:
                    result[f"ratio_{name}"] = round(result[f"inbox_{name}"] / rate, 2)
                log(f"postfix {name}: {rate:7.1f} msg/s ({counter.errors} errors)")
                with contextlib.suppress(Exception):
                    instance.wait_empty(60)
    finally:
        instance.stop()
        remove_root(root)


if __name__ == "__main__":
    main()
