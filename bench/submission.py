"""Submission benchmark: messages/s accepted over port 587 with STARTTLS + AUTH PLAIN.

Starts `python -m inbox serve --no-workers` on a fresh data dir with durable settings
(INBOX_DB_SYNC=true: every accepted message is fsynced before its 250), the transfer server
off, per-IP/credential rate limits off (one client address sends everything) and the quotas
raised. The organization, the verified domain `sender.test` and an SMTP credential are made
with the CLI. A small pipelining SMTP client (raw asyncio, so the load generator costs little
CPU) opens C sessions, each doing EHLO, STARTTLS, EHLO, AUTH PLAIN once, then sending its share
of ~1 KB messages (MAIL, RCPT, DATA pipelined per RFC 2920). Each 250 means submit() stored
the message, its recipient and its job durably.

Run: python bench/submission.py [--messages N] [--sessions 1,8,32] [--keep]

Prints one JSON line on stdout (progress on stderr): `accepted_per_s_c<C>` for each session
count, `errors`, `peak_rss_mb` of the service, `target_c8_per_s` (issue 4: >= 300).
`delivered_per_s_dane` is null: TODO, the end-to-end part (delivered to a TLS sink with DANE
on) comes with the DANE delivery work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inbox.config import setting_names  # noqa: E402

MASTER_KEY = base64.b64encode(b"s" * 32).decode()
SENDER = "sender.test"
BIG = "100000000"
_start = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - _start:7.1f}s] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"inbox serve exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"inbox serve did not listen on {port} within {timeout:.0f}s")


def peak_rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def cpu_secs(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def make_message(size: int = 1024) -> bytes:
    line = "Your order has shipped. Tracking details and the invoice follow below, thanks.\r\n"
    body = (line * (size // len(line) + 1))[:size].rsplit("\r\n", 1)[0] + "\r\n"
    return (f"From: Shop <orders@{SENDER}>\r\nTo: customer@rcpt.test\r\nSubject: Your order"
            "\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}").encode()


class Counter:
    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.samples: list[str] = []

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(text[:200])


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = (await reader.readuntil(b"\r\n")).decode("latin-1")
        lines.append(line.rstrip())
        if len(line) < 4 or line[3] != "-":
            return int(line[:3]), "\n".join(lines)


async def session(port: int, auth: bytes, data: bytes, count: int, counter: Counter) -> None:
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
        envelope = f"MAIL FROM:<orders@{SENDER}>\r\nRCPT TO:<customer@rcpt.test>\r\nDATA\r\n"
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


async def run_load(port: int, auth: bytes, data: bytes, total: int, sessions: int
                   ) -> tuple[float, Counter]:
    counter = Counter()
    per = [total // sessions + (1 if i < total % sessions else 0) for i in range(sessions)]
    started = time.perf_counter()
    await asyncio.gather(*(session(port, auth, data, n, counter) for n in per if n))
    elapsed = time.perf_counter() - started
    return counter.ok / elapsed if elapsed else 0.0, counter


def service_env(data_dir: Path, port: int) -> dict[str, str]:
    names = set(setting_names())
    env = {k: v for k, v in os.environ.items() if k not in names}
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


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "inbox", *args, "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--messages", type=int, default=1000, help="per session count")
    ap.add_argument("--sessions", default="1,8,32")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
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
        wait_port(port, proc)
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
    finally:
        stop(proc)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["errors"] = errors
    # TODO(issue 4, part 2): delivered/s end to end to a TLS sink with DANE on.
    result["delivered_per_s_dane"] = None
    if samples:
        log("error samples: " + " || ".join(samples[:3]))
    print(json.dumps(result))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
