"""The real `python -m inbox` as a subprocess for tests: CLI runs and a service, always reaped.

Every wait is bounded. The environment is built from scratch for inbox's own settings (any
INBOX_*/SMTP_*/… variable of the caller's environment is dropped), so a test says exactly
which settings the process sees.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from inbox.config import setting_names


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def inbox_env(data_dir: Path, **settings: object) -> dict[str, str]:
    """The caller's environment without inbox settings, plus INBOX_DATA_DIR and `settings`."""
    names = set(setting_names())
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["INBOX_DATA_DIR"] = str(data_dir)
    env["SMTP_TRANSFER_PORT"] = "0"  # never port 25 in tests; a test that needs it picks one
    env["SMTP_SUBMISSION_PORT"] = "0"  # nor 587/465: a free port, and no implicit TLS
    env["SMTP_SUBMISSIONS_PORT"] = "0"
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_cli(env: dict[str, str], *args: str, cwd: Path | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m inbox ARGS` to completion and return what it printed."""
    return subprocess.run([sys.executable, "-m", "inbox", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_cli_json(env: dict[str, str], *args: str, cwd: Path | None = None) -> Any:
    """`run_cli` for a command that must succeed; its stdout parsed as JSON."""
    done = run_cli(env, *args, cwd=cwd)
    assert done.returncode == 0, f"inbox {' '.join(args)} failed:\n{done.stderr}"
    return json.loads(done.stdout)


class Service:
    """`python -m inbox serve …` on a free port, output to files under `log_dir`.

    Use as a context manager (or call `kill()` in a finally): the process never outlives it.
    """

    def __init__(self, env: dict[str, str], log_dir: Path, *args: str, name: str = "serve"
                 ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "INBOX_HTTP_PORT": str(self.port)}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}-{self.port}.out"
        self.stderr_path = log_dir / f"{name}-{self.port}.err"
        self.args = ["serve", *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> Service:
        """Start and wait until GET /healthz answers 200 (fails early if the process exits)."""
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "inbox", *self.args],
                                         env=self.env, cwd=self.stdout_path.parent,
                                         stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise AssertionError(f"inbox serve exited with {code}:\n{self.stderr()}")
                try:
                    if client.get("/healthz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"inbox serve not healthy after {timeout}s:\n"
                                         f"{self.stderr()}")
                time.sleep(0.05)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap; a no-op when it already exited."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait for the exit code; SIGKILL (and fail) if it does not stop in time."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"inbox serve ignored SIGTERM for {timeout}s:\n"
                                 f"{self.stderr()}") from None

    def __enter__(self) -> Service:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
