"""End-to-end send benchmark: GraphQL `sendEmail` → durable queue → DKIM → SMTP sink.

Starts everything on 127.0.0.1: the test DNS server (a thread in this process), an SMTP sink
(Postfix `smtp-sink`, or aiosmtpd in its own process) and `python -m inbox serve` with durable
settings (INBOX_DB_SYNC=true) on a fresh data dir. The tenant is made with the CLI. Then C
concurrent clients send N one-recipient messages (~1 KB text) and the benchmark waits until all
are DELIVERED, reading each message's `updatedAt` (when it became DELIVERED) from the API.

Run: python bench/send.py [--messages N] [--concurrency C] [--sink postfix|aiosmtpd]
                          [--client raw|httpx] [--timeout SECS] [--profile FILE] [--keep]
                          [--tlsrpt]

Prints one JSON line on stdout (progress goes to stderr):
  accepted_per_s   N / (last API acceptance − first send)
  delivered_per_s  N / (last delivery − first send), end to end
  api_p50_ms, api_p99_ms    sendEmail request latency seen by the client
  e2e_p50_ms, e2e_p99_ms    acceptance (client got the reply) → DELIVERED (message updatedAt)
  peak_rss_mb      VmHWM of the server process (plus any children)
  errors           non-success sendEmail responses (HTTP error, GraphQL or payload errors)
  delivered        how many of the N were DELIVERED before --timeout
  server_cpu_cores / client_cpu_cores  CPU used per wall second during the measured run
                   (client: this process — load generator, DNS server thread, polling)
  cpu_ms_per_msg_main_thread / _other_threads / _children  server CPU per delivered message:
                   the event loop's thread, the rest of the process (the embedded database
                   engine's threads above all), the delivery child (DKIM signing, SMTP)
Target (issue): ≥ 300/s accepted and delivered, api_p99 < 100 ms at C=16 on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    Profiler,
    cli,
    cpu_parts,
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
from tests.support.dnsserver import DnsServer  # noqa: E402

POSTFIX_SINK = "/usr/sbin/smtp-sink"
MASTER_KEY = base64.b64encode(b"b" * 32).decode()
SENDER_DOMAIN = "sender.test"
RCPT_DOMAIN = "rcpt.test"
BIG = "100000000"
WARMUP = 20
REQUEST_TIMEOUT = 30.0
PENDING = {"QUEUED", "SENDING", "DEFERRED"}

SEND = """
mutation Send($from: String!, $to: [String!], $subject: String!, $text: String) {
  sendEmail(from: $from, to: $to, subject: $subject, textBody: $text) {
    message { id status }
    errors { code message }
  }
}
"""

STATUS = "query S($id: ID!) { message(id: $id) { id status updatedAt } }"

DELIVERED_PAGE = """
query P($after: String) {
  messages(first: 100, status: DELIVERED, after: $after) {
    edges { node { id updatedAt } }
    pageInfo { hasNextPage endCursor }
  }
}
"""



def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def body_text(size: int = 1024) -> str:
    line = "Thank you for your order. Your receipt and delivery details follow below.\n"
    return (line * (size // len(line) + 1))[:size]


# --- processes ---------------------------------------------------------------------------------


def service_env(data_dir: Path, **values: str) -> dict[str, str]:
    """The parent environment without any inbox setting, plus ours."""
    env = inbox_env()
    env.update({
        "INBOX_DATA_DIR": str(data_dir),
        "INBOX_MASTER_KEY": MASTER_KEY,
        "INBOX_DB_SYNC": os.environ.get("BENCH_DB_SYNC", "true"),  # durable: fsync every commit
        "INBOX_LOG_LEVEL": "WARNING",
        "OTEL_TRACES_EXPORTER": "none",
        "PYTHONUNBUFFERED": "1",
        "INBOX_SMTP_TRANSFER_ENABLED": "false",  # this benchmark measures sending only
        "SMTP_SUBMISSION_PORT": "0", "SMTP_SUBMISSIONS_PORT": "0",  # never 587/465
    })
    env.update(values)
    return env


def start_sink(kind: str, port: int, log_path: Path) -> subprocess.Popen[Any]:
    if kind == "postfix":
        # Accepts every command and discards the mail; -m: concurrent sessions, last arg: backlog.
        cmd = [POSTFIX_SINK, "-m", "512"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # required when started as root
        cmd += [f"127.0.0.1:{port}", "256"]
    else:
        # Separate process so the sink does not share this process's CPU (GIL) with the clients.
        cmd = [sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink",
               "-l", f"127.0.0.1:{port}"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    wait_port(port, proc, f"{kind} sink")
    return proc


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- the load -----------------------------------------------------------------------------------


class Api:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def query(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        resp = await self.client.post("/graphql", json={"query": query, "variables": variables})
        resp.raise_for_status()
        data = resp.json()
        if data.get("errors"):
            raise RuntimeError(f"GraphQL errors: {data['errors']}")
        return data["data"]


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on one connection, for the measured sends.

    httpx spends ~3 ms of CPU per request here (`--client httpx` to compare): at the target
    rate that is a whole core of a 2-core machine, taken from the server being measured.
    """

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    def post_to(self, path: str) -> Post:
        return lambda body: self.post(path, body)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await self._exchange(path, body)
        except BaseException:
            await self.close()  # unknown state: never reuse the connection
            raise

    async def _exchange(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write((f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                           f"{self.head}Content-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        if "content-length" in fields:
            data = await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding") == "chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")  # no trailers from our server
            data = b"".join(parts)
        else:
            data = await self.reader.read()
            fields["connection"] = "close"
        if fields.get("connection") == "close":
            await self.close()
        return status, data


class Load:
    """Results of the send phase."""

    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, successful sends
        self.accepted: dict[str, float] = {}  # message id -> wall time the reply arrived
        self.errors = 0
        self.error_samples: list[str] = []

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:300])


Post = Callable[[bytes], Awaitable[tuple[int, bytes]]]


def httpx_post(client: httpx.AsyncClient) -> Post:
    async def post(body: bytes) -> tuple[int, bytes]:
        resp = await client.post("/graphql", content=body,
                                 headers={"Content-Type": "application/json"})
        return resp.status_code, resp.content

    return post


async def send_one(post: Post, load: Load, i: int, tag: str, text: str) -> None:
    variables = {"from": f"Bench <bench@{SENDER_DOMAIN}>", "to": [f"user{i}@{RCPT_DOMAIN}"],
                 "subject": f"bench {tag} #{i}", "text": text}
    body = json.dumps({"query": SEND, "variables": variables}).encode()
    started = time.perf_counter()
    try:
        status, content = await asyncio.wait_for(post(body), REQUEST_TIMEOUT)
    except (TimeoutError, OSError, EOFError, ValueError, asyncio.LimitOverrunError,
            httpx.HTTPError) as exc:
        load.error(f"{type(exc).__name__}: {exc}")
        return
    elapsed = time.perf_counter() - started
    wall = time.time()
    if status != 200:
        load.error(f"HTTP {status}: {content[:300]!r}")
        return
    try:
        data = json.loads(content)
    except ValueError:
        load.error(f"not JSON: {content[:300]!r}")
        return
    payload = (data.get("data") or {}).get("sendEmail")
    if data.get("errors") or not payload or payload.get("errors") or not payload["message"]:
        load.error(json.dumps(data))
        return
    load.latencies.append(elapsed)
    load.accepted[payload["message"]["id"]] = wall


async def run_load(posts: list[Post], n: int, first: int, tag: str, text: str
                   ) -> tuple[Load, float, float]:
    """Send messages first..first+n-1, one worker per `posts` entry (each its connection)."""
    load = Load()
    counter = itertools.count(first)

    async def worker(post: Post) -> None:
        while (i := next(counter)) < first + n:
            await send_one(post, load, i, tag, text)

    async def progress() -> None:
        while True:
            await asyncio.sleep(2)
            done = len(load.accepted) + load.errors
            log(f"sent {done}/{n} ({done / max(1e-9, time.time() - t0):.0f}/s, "
                f"{load.errors} errors)")

    t0 = time.time()
    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(worker(post) for post in posts))
    finally:
        reporter.cancel()
    t1 = max(load.accepted.values(), default=time.time())
    return load, t0, t1


async def wait_delivered(api: Api, accepted: dict[str, float], limit_secs: float
                         ) -> dict[str, float]:
    """Message id -> wall time it became DELIVERED, for the ids in `accepted`."""
    deadline = time.monotonic() + limit_secs
    delivered: dict[str, float] = {}
    if not accepted:
        return delivered
    last = max(accepted, key=accepted.__getitem__)
    # Cheap poll first (one record): mail goes out roughly in order, so once the last accepted
    # message is no longer pending, nearly everything is delivered.
    status = "?"
    next_log = 0.0
    while time.monotonic() < deadline:
        msg = (await api.query(STATUS, {"id": last}))["message"]
        status = msg["status"] if msg else "MISSING"
        if status not in PENDING:
            break
        if time.monotonic() >= next_log:
            log(f"waiting for delivery: last accepted message is {status}")
            next_log = time.monotonic() + 2
        await asyncio.sleep(0.2)
    # Then page through DELIVERED (newest first) until every accepted id is found.
    while True:
        after = None
        while True:
            page = (await api.query(DELIVERED_PAGE, {"after": after}))["messages"]
            for edge in page["edges"]:
                node = edge["node"]
                if node["id"] in accepted:
                    delivered[node["id"]] = datetime.fromisoformat(node["updatedAt"]).timestamp()
            if len(delivered) == len(accepted) or not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
        if len(delivered) == len(accepted) or time.monotonic() >= deadline:
            break
        log(f"delivered {len(delivered)}/{len(accepted)}")
        await asyncio.sleep(1)
    missing = [m for m in accepted if m not in delivered]
    if missing:
        statuses: dict[str, int] = {}
        for m in missing[:50]:
            msg = (await api.query(STATUS, {"id": m}))["message"]
            s = msg["status"] if msg else "MISSING"
            statuses[s] = statuses.get(s, 0) + 1
        log(f"{len(missing)} message(s) not delivered within {limit_secs:.0f}s; "
            f"statuses of up to 50: {statuses}")
    return delivered


async def benchmark(args: argparse.Namespace, base_url: str, key: str, server_pid: int
                    ) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    text = body_text()
    tag = f"{os.getpid()}-{int(time.time())}"
    limits = httpx.Limits(max_connections=args.concurrency,
                          max_keepalive_connections=args.concurrency)
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    raws = [RawHttp(host, int(port), headers) for _ in range(args.concurrency)]
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=REQUEST_TIMEOUT) as client:
        api = Api(client)
        posts = ([httpx_post(client)] * args.concurrency if args.client == "httpx"
                 else [raw.post_to("/graphql") for raw in raws])
        try:
            log(f"warm-up: {WARMUP} sends")
            warm, _, _ = await run_load(posts, WARMUP, -WARMUP, f"{tag}-warm", text)
            if warm.errors:
                raise RuntimeError(f"warm-up sends failed: {warm.error_samples}")
            await wait_delivered(api, warm.accepted, 30)

            log(f"sending {args.messages} messages with {args.concurrency} clients "
                f"({args.client})")
            cpu_ref = cpu_reference_ms()
            cpu0, pcpu0 = cpu_seconds(server_pid), time.process_time()
            parts0, times0 = cpu_parts(server_pid), cpu_times()
            load, t0, t_accepted = await asyncio.wait_for(
                run_load(posts, args.messages, 0, tag, text), timeout=args.send_timeout)
            log(f"accepted {len(load.accepted)} in {t_accepted - t0:.2f}s; {load.errors} errors"
                + (f", e.g. {load.error_samples[0]}" if load.errors else ""))
            delivered = await wait_delivered(api, load.accepted, args.timeout)
            t_end = time.time()
            cpu1, pcpu1 = cpu_seconds(server_pid), time.process_time()
            parts1, times1 = cpu_parts(server_pid), cpu_times()
        finally:
            for raw in raws:
                await raw.close()
    t_delivered = max(delivered.values(), default=float("nan"))
    e2e = [delivered[m] - load.accepted[m] for m in delivered]
    measured = max(1e-9, t_end - t0)
    n_ok = len(load.accepted)
    result = {
        "messages": args.messages,
        "concurrency": args.concurrency,
        "accepted_per_s": round(n_ok / max(1e-9, t_accepted - t0), 1),
        "delivered_per_s": (round(len(delivered) / max(1e-9, t_delivered - t0), 1)
                            if delivered else 0.0),
        "api_p50_ms": round(percentile(load.latencies, 0.50) * 1000, 1),
        "api_p99_ms": round(percentile(load.latencies, 0.99) * 1000, 1),
        "e2e_p50_ms": round(percentile(e2e, 0.50) * 1000, 1),
        "e2e_p99_ms": round(percentile(e2e, 0.99) * 1000, 1),
        "peak_rss_mb": peak_rss_mb(server_pid),
        "errors": load.errors,
        **({"error_samples": load.error_samples[:3]} if load.errors else {}),
        "delivered": len(delivered),
        "sink": args.sink,
        "tlsrpt": args.tlsrpt,
        "client": args.client,
        "server_cpu_cores": round((cpu1 - cpu0) / measured, 2),
        "client_cpu_cores": round((pcpu1 - pcpu0) / measured, 2),
        # Server CPU per delivered message, by part (see cpu_parts).
        **{f"cpu_ms_per_msg_{part}": round((parts1[part] - parts0[part]) * 1000
                                           / max(1, len(delivered)), 2) for part in parts0},
        "cpu_ref_ms": cpu_ref,
        "steal_pct": steal_pct(times0, times1),
    }
    return result


# --- orchestration ------------------------------------------------------------------------------


def wait_healthy(base_url: str, proc: subprocess.Popen[Any], log_path: Path,
                 timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server not healthy within {timeout:.0f}s:\n{tail(log_path)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", "-n", type=int, default=2000)
    p.add_argument("--concurrency", "-c", type=int, default=16)
    p.add_argument("--sink", choices=["postfix", "aiosmtpd"],
                   default="postfix" if os.access(POSTFIX_SINK, os.X_OK) else "aiosmtpd")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="HTTP client for the measured sends (default: a minimal keep-alive "
                        "client; httpx costs ~3 ms CPU per request)")
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds to wait for delivery after the last send (default 120)")
    p.add_argument("--send-timeout", type=float, default=600,
                   help="seconds the send phase may take (default 600)")
    p.add_argument("--profile", metavar="FILE",
                   help="py-spy record the server (GIL-holding stacks, collapsed format) "
                        "from start-up to the end of the run")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--tlsrpt", action="store_true",
                   help="the recipient domain publishes a TLS-RPT record (RFC 8460), as most "
                        "large mailbox providers do: every delivery's TLS outcome is counted")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for the service (repeatable), e.g. SMTP_OUTBOUND_PROCESS=off")
    args = p.parse_args()
    if args.messages < 1 or args.concurrency < 1:
        p.error("--messages and --concurrency must be positive")

    tmp = Path(tempfile.mkdtemp(prefix="inbox-bench-"))
    dns: DnsServer | None = None
    sink: subprocess.Popen[Any] | None = None
    server: subprocess.Popen[Any] | None = None
    profiler: Profiler | None = None
    server_log = tmp / "server.log"
    try:
        dns = DnsServer().start()
        sink_port, http_port = free_port(), free_port()
        sink = start_sink(args.sink, sink_port, tmp / "sink.log")
        log(f"{args.sink} sink on 127.0.0.1:{sink_port}, DNS on {dns.address}, dir {tmp}")

        extra = dict(item.partition("=")[::2] for item in args.set)
        env = service_env(
            tmp / "data",
            SERVER_HOSTNAME="outbound.inbox.test",
            INBOX_HTTP_PORT=str(http_port),
            INBOX_DNS_NAMESERVERS=dns.address,
            INBOX_DNS_TIMEOUT_SECS="2",
            SMTP_OUTBOUND_PORT=str(sink_port),
            SMTP_OUTBOUND_TIMEOUT_SECS="30",
            # A hiccup should retry within the run, not after the default minute.
            SMTP_OUTBOUND_RETRY_BASE_DELAY_SECS="1",
            SMTP_OUTBOUND_RETRY_MAX_DELAY_SECS="5",
            INBOX_QUOTA_HOURLY_SEND_LIMIT=BIG,
            INBOX_QUOTA_DAILY_SEND_LIMIT=BIG,
            INBOX_QUOTA_MAX_QUEUED_JOBS=BIG,
        ) | extra
        org = cli(env, "org", "create", "Bench")["id"]
        domain = cli(env, "domain", "add", org, SENDER_DOMAIN, "--verified")
        for record in domain["records"]:
            if record["type"].upper() == "TXT":
                dns.add_txt(record["name"], record["value"])
            else:
                dns.add(record["name"], record["type"], record["value"])
        dns.add(RCPT_DOMAIN, "MX", f"10 mx.{RCPT_DOMAIN}.")
        dns.add(f"mx.{RCPT_DOMAIN}", "A", "127.0.0.1")
        if args.tlsrpt:  # the recipient domain asks for TLS reports, as the big providers do
            dns.add_txt(f"_smtp._tls.{RCPT_DOMAIN}",
                        f"v=TLSRPTv1; rua=mailto:tls-reports@{RCPT_DOMAIN}")
        key = cli(env, "apikey", "create", org, "--scope", "send", "--scope", "read")["key"]
        log(f"tenant {org}: {SENDER_DOMAIN} verified, {len(domain['records'])} DNS records")

        with open(server_log, "wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "inbox", "serve"], env=env, cwd=ROOT,
                                      stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{http_port}"
        wait_healthy(base_url, server, server_log)
        log(f"server pid {server.pid} at {base_url}")
        if args.profile:
            profiler = Profiler(server.pid, args.profile, tmp)

        result = asyncio.run(benchmark(args, base_url, key, server.pid))
        if server.poll() is not None:
            raise RuntimeError(f"server died during the run:\n{tail(server_log)}")
        if dns.errors:
            log(f"DNS server hit {len(dns.errors)} error(s): {dns.errors[0]}")
        if server_log.stat().st_size:
            log(f"server log (WARNING and up), last lines:\n{tail(server_log, 10)}")
        print(json.dumps(result), flush=True)
        return 0 if result["delivered"] == args.messages and not result["errors"] else 1
    except Exception as exc:  # noqa: BLE001 - report, clean up, non-zero exit
        log(f"benchmark failed: {type(exc).__name__}: {exc}")
        if server is not None:
            log(f"server log tail:\n{tail(server_log)}")
        return 2
    finally:
        if profiler is not None:
            profiler.stop()
        stop(server, "server")
        stop(sink, "sink", grace=5)
        if dns is not None:
            dns.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
