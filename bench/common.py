"""What the benchmarks share: logging, ports, child processes, the inbox CLI, /proc figures,
and reading SMTP replies. Importable as `bench.common` once the repository root is on
sys.path (each benchmark puts it there)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_start = time.monotonic()


def log(text: str) -> None:
    """A progress line on stderr (stdout carries the one JSON line)."""
    print(f"[{time.monotonic() - _start:7.1f}s] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any] | None, what: str,
              timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f}s")


def stop(proc: subprocess.Popen[Any] | None, what: str = "process", grace: float = 20) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log(f"{what} did not stop in {grace:.0f}s; killing it")
        proc.kill()
        proc.wait(5)


def inbox_env(**values: str) -> dict[str, str]:
    """The parent environment without any inbox setting, plus `values`."""
    from inbox.config import setting_names

    names = set(setting_names())
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(values)
    return env


def cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    """`python -m inbox ARGS --json`, which must succeed; its JSON output."""
    # `--json` after the subcommand: the subparsers' own `--json` must not reset it.
    done = subprocess.run([sys.executable, "-m", "inbox", *args, "--json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return out


def peak_rss_mb(pid: int) -> float:
    """VmHWM of `pid` and its descendants, in MB."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])  # kB
    return round(total / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its descendants so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def cpu_parts(pid: int) -> dict[str, float]:
    """CPU seconds so far of `pid`'s main thread, of its other threads (the database engine's,
    the resolver's, blob writers), and of its descendants (the delivery child)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parts = {"main_thread": 0.0, "other_threads": 0.0, "children": 0.0}
    for p in descendants(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / ticks
                part = ("children" if p != pid else
                        "main_thread" if task.name == str(pid) else "other_threads")
                parts[part] += used
    return parts


def cpu_reference_ms() -> float:
    """How fast this machine runs Python right now: the best of three runs of a fixed piece of
    work (50,000 small dicts built, through json and back, summed; interpreter, allocator and
    caches, like the service), in ms. Shared VMs vary: on our 2-core VM the service's CPU per
    message moved by up to 1.8x within a day, mostly without any steal time. So each benchmark
    line carries this figure: compare results only at like speeds."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        rows = [{"id": f"msg_{i:08d}", "n": i, "tags": ["a", "b"]} for i in range(50_000)]
        total = 0
        for row in json.loads(json.dumps(rows)):
            total += row["n"]
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 1)


def cpu_times() -> tuple[int, int]:
    """(all, steal) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the machine's CPU time the hypervisor gave to others between two cpu_times()
    readings, in percent: time this VM wanted to run but could not."""
    total = after[0] - before[0]
    return round(100 * (after[1] - before[1]) / total, 1) if total > 0 else 0.0


class Profiler:
    """`py-spy record` of a running server (GIL-holding stacks, raw collapsed format) until
    `stop()`; a no-op, with a note, when py-spy is not installed."""

    def __init__(self, pid: int, path: str, log_dir: Path) -> None:
        self.path, self.log_path = path, log_dir / "py-spy.log"
        self.proc: subprocess.Popen[Any] | None = None
        exe = shutil.which("py-spy")
        if exe is None:
            log("--profile: py-spy not found (pip install py-spy); not profiling")
            return
        cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--output", path,
               "--rate", "100", "--nonblocking", "--threads", "--gil"]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        out = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        log(f"py-spy exited with {self.proc.returncode}: {' '.join(out) or 'no output'}; "
            f"profile: {self.path}")
        self.proc = None


async def smtp_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One (possibly multi-line) SMTP reply: (code, text)."""
    lines = []
    while True:
        line = (await reader.readuntil(b"\r\n")).decode("latin-1")
        lines.append(line.rstrip())
        if len(line) < 4 or line[3] != "-":
            return int(line[:3]), "\n".join(lines)
