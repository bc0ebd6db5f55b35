"""LocalStack's S3 as a real S3-compatible server for tests: launcher, process handling, fixture.

LocalStack (PyPI `localstack-core`, no Docker) enforces SSE-C like AWS does (GET/HEAD without the
key -> 400, with another key -> 403), which moto does not (ENGINE-NOTES "S3-compatible servers
here"). It lives in its own venv, `${INBOX_LOCALSTACK_VENV:-/opt/inbox-localstack}`, made by
`tests/support/install_localstack.sh`; a missing venv fails the fixture with that name in the
message (it is never skipped silently).

Its Twisted gateway ignores the host part of GATEWAY_LISTEN and binds every interface, so the
launcher below (run with the venv's interpreter) pins every TCP listener to 127.0.0.1 before it
calls LocalStack's own `main`. Each instance gets a private FILESYSTEM_ROOT, TMPDIR and S3 storage
directory under the test's tmp dir (LocalStack's default S3 directory is a shared /tmp path).

Import the fixture into a test module (the name must stay as imported):

    from tests.support.localstack import localstack  # noqa: F401
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import free_port

INSTALL_SCRIPT = "tests/support/install_localstack.sh"

_LAUNCHER = r'''
import os, sys
host = os.environ["INBOX_LOCALSTACK_HOST"]

from twisted.internet import endpoints

_tcp4 = endpoints.TCP4ServerEndpoint

def _bound(reactor, port, backlog=50, interface=""):
    # LocalStack passes no interface (it would listen on 0.0.0.0): listen on `host` only.
    return _tcp4(reactor, port, backlog, host)

endpoints.TCP4ServerEndpoint = _bound

# The S3 provider keeps objects under a hard-coded, machine-wide /tmp directory: use ours.
import localstack.services.s3.provider as s3_provider
s3_provider.DEFAULT_S3_TMP_DIR = os.environ["INBOX_LOCALSTACK_S3_DIR"]

from localstack.runtime.main import main
sys.exit(main())
'''


def venv_dir() -> Path:
    return Path(os.environ.get("INBOX_LOCALSTACK_VENV", "/opt/inbox-localstack"))


class LocalStack:
    """One LocalStack process serving S3 on 127.0.0.1:`port`, files under `workdir`.

    `start()` waits until /_localstack/health reports s3 "running"; `stop()` sends SIGTERM (then
    SIGKILL if it is ignored) and reaps the process.
    """

    def __init__(self, workdir: Path, *, venv: Path | None = None, host: str = "127.0.0.1"
                 ) -> None:
        self.venv = venv or venv_dir()
        self.workdir = workdir
        self.host = host
        self.port = free_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.https_endpoint = f"https://{host}:{self.port}"
        self.s3_dir = workdir / "s3-storage"
        self.log_path = workdir / "localstack.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_secs: float | None = None

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "SSL_CERT_FILE")
        env = {k: v for k, v in os.environ.items() if k in keep}
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env.update({
            "SERVICES": "s3",
            "EAGER_SERVICE_LOADING": "1",
            "GATEWAY_LISTEN": f"{self.host}:{self.port}",
            "OVERRIDE_IN_DOCKER": "0",
            "FILESYSTEM_ROOT": str(self.workdir / "fs"),
            "TMPDIR": str(tmp),
            "DNS_ADDRESS": "0",
            "DISABLE_EVENTS": "1",
            "SKIP_SSL_CERT_DOWNLOAD": "1",
            "LOCALSTACK_TELEMETRY_DISABLED": "1",
            "INBOX_LOCALSTACK_HOST": self.host,
            "INBOX_LOCALSTACK_S3_DIR": str(self.s3_dir),
        })
        return env

    def start(self, timeout: float = 90) -> LocalStack:
        if not self.python.exists():
            raise AssertionError(
                f"LocalStack is not installed: {self.python} is missing. Run {INSTALL_SCRIPT} "
                f"(INBOX_LOCALSTACK_VENV chooses the venv; default /opt/inbox-localstack).")
        self.workdir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([str(self.python), "-c", _LAUNCHER], env=self.env(),
                                         cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = began + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise AssertionError(f"LocalStack exited with {code} while starting:\n"
                                     f"{self.log_tail()}")
            if self.s3_running():
                self.startup_secs = time.monotonic() - began
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"LocalStack S3 not running after {timeout}s "
                                     f"(health: {self.health()}):\n{self.log_tail()}")
            time.sleep(0.2)

    def health(self) -> dict[str, object] | None:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/_localstack/health",
                                        timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def s3_running(self) -> bool:
        health = self.health() or {}
        services = health.get("services")
        return isinstance(services, dict) and services.get("s3") == "running"

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM and reap; SIGKILL if it is still running after `timeout` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def localstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A running LocalStack (S3 only) on 127.0.0.1; `.endpoint` is its http:// URL."""
    with LocalStack(tmp_path_factory.mktemp("localstack")) as server:
        yield server
