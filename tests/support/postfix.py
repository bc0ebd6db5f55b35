"""A private, real Postfix MTA on loopback for tests: its own config, queue, data dir and log.

`PostfixInstance` writes a main.cf and master.cf under `root`, starts it with
`postfix -c <root>/etc start` and stops it again. It listens only on 127.0.0.1 (an smtpd only
when `listen_port` is given) and relays everything to `[127.0.0.1]:relay_port`, or, with
`relay_port=None`, discards everything after queueing it (a "receiving" Postfix to compare our
own SMTP server with). The system instance (/etc/postfix, /var/spool/postfix, port 25 on other
interfaces) is never touched; several instances run side by side with different roots and ports.

Postfix must run as root (its master drops to `mail_owner` per daemon), so `unavailable()` says
why an instance cannot run here; tests skip with that reason.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from tests.support.procs import free_port

POSTFIX = Path("/usr/sbin/postfix")
SENDMAIL = Path("/usr/sbin/sendmail")
POSTQUEUE = Path("/usr/sbin/postqueue")
POSTCONF = Path("/usr/sbin/postconf")
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"

# Every service runs unchrooted (5th column "n"), so no copies of /etc files are needed in the
# queue directory. No "local"/"virtual" delivery: nothing is a final destination here.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixFailure(RuntimeError):
    """Postfix did not start, stop, accept or deliver in time; the message carries its log."""


def unavailable() -> str | None:
    """Why a private Postfix cannot run here (a skip reason), or None when it can."""
    for binary in (POSTFIX, SENDMAIL, POSTQUEUE, POSTCONF):
        if not binary.exists():
            return f"{binary} is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "a Postfix instance must be started as root (its master drops privileges)"
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError as exc:
        return f"the Postfix account is missing: {exc}"
    return None


def _unsearchable_parent(path: Path) -> Path | None:
    """The first existing ancestor of `path` that others may not search (o+x), if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return parent
    return None


def _clean_env() -> dict[str, str]:
    # A MAIL_CONFIG or MAIL_DEBUG of the caller must not redirect or slow our commands.
    return {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "MAIL_DEBUG")}


class PostfixInstance:
    """A private Postfix (own config_directory, queue_directory, data_directory under a temp
    dir; own master.cf) that listens only on 127.0.0.1:<port> and relays everything it gets to
    relayhost [127.0.0.1]:<relay_port>. Never touches the system's /etc/postfix instance or
    port 25 on other interfaces.

    `listen_port=None` runs no smtpd (mail enters through `inject`); `listen_port=0` picks a
    free port (read it back from `listen_port`). `relay_port=None` discards every message once
    it is queued. `extra_main_cf` overrides or adds main.cf settings.

    `root` must be traversable by the `postfix` user (pytest's `tmp_path` is not: its base is
    0700); see `make_root`.
    """

    def __init__(self, root: Path, *, relay_port: int | None, listen_port: int | None = None,
                 myhostname: str = "relay.postfix.test",
                 extra_main_cf: Mapping[str, str] = {}) -> None:  # noqa: B006 (never mutated)
        self.root = root.resolve()
        self.relay_port = relay_port
        self.listen_port = free_port() if listen_port == 0 else listen_port
        self.myhostname = myhostname
        self.extra_main_cf = dict(extra_main_cf)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "lib"
        self.maillog = self.root / "maillog"
        self._started = False

    # -- configuration -------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings this instance runs with (`extra_main_cf` applied last)."""
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            # Postfix >= 3.4: log to a file through postlogd (the "postlog" service).
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "syslog_name": f"postfix-{self.root.name}",
            "myhostname": self.myhostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "append_dot_mydomain": "no",
            "biff": "no",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_peername_lookup": "no",  # no reverse DNS for 127.0.0.1
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            # No DNS at all: the relayhost is a bracketed IP address.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            # Deliver and retry fast; a test waits seconds, not minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "delay_warning_time": "0",
        }
        if self.relay_port is None:
            settings.update({"relayhost": "", "default_transport": "discard:discarded",
                             "relay_transport": "discard:discarded"})
        else:
            settings["relayhost"] = f"[127.0.0.1]:{self.relay_port}"
        settings.update(self.extra_main_cf)
        return settings

    def master_cf(self) -> str:
        """The master.cf: the standard services, unchrooted, plus smtpd on the listen port."""
        text = _MASTER_CF
        if self.listen_port is not None:
            text = (f"127.0.0.1:{self.listen_port} inet n - n - - smtpd\n") + text
        return text

    def _write_config(self) -> None:
        for directory in (self.root, self.config_dir):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        lines = [f"{name} = {value}" for name, value in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf())
        # Postfix rereads a config file modified in the last two seconds (an editor may still
        # be writing it), sleeping 300 ms per try: ~2 s per command. Ours is complete: age it.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _make_directories(self) -> bool:
        """Create the queue and data directories with the owners and modes Postfix's own
        postfix-files table gives them (what `post-install create-missing` does, in ms instead
        of seconds). False when that table cannot be read: then `postfix start` checks and
        creates them itself."""
        meta = self._run(str(POSTCONF), "-c", str(self.config_dir), "-h", "meta_directory")
        table = Path(meta.stdout.decode().strip() or "/nonexistent", "postfix-files")
        if meta.returncode != 0 or not table.is_file():
            return False
        names = {"$queue_directory": str(self.queue_dir), "$data_directory": str(self.data_dir)}
        ids = {"root": 0, "-": -1, "$mail_owner": pwd.getpwnam(MAIL_OWNER).pw_uid,
               "$setgid_group": grp.getgrnam(SETGID_GROUP).gr_gid}
        for line in table.read_text().splitlines():
            fields = line.split(":")
            top = fields[0].split("/", 1)[0]
            if top not in names or len(fields) < 5 or fields[1] != "d":
                continue
            path = Path(names[top] + fields[0][len(top):])
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, ids.get(fields[2], -1), ids.get(fields[3], -1))
            path.chmod(int(fields[4], 8))
        return self.queue_dir.is_dir() and self.data_dir.is_dir()

    # -- life cycle ----------------------------------------------------------------------

    def _run(self, *argv: str, input: bytes | None = None, timeout: float = 30
             ) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(argv, input=input, capture_output=True, env=_clean_env(),
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PostfixFailure(f"{' '.join(argv)} did not finish in {timeout}s\n"
                                 f"{self._log_tail()}") from exc

    def start(self, timeout: float = 30) -> PostfixInstance:
        """Write the configuration, start the master and wait until it (and the smtpd, if
        any) is ready. Raises `PostfixFailure` with Postfix's output and log otherwise."""
        reason = unavailable()
        if reason is not None:
            raise PostfixFailure(reason)
        blocked = _unsearchable_parent(self.root)
        if blocked is not None:
            raise PostfixFailure(f"{blocked} is not searchable by other users (mode "
                                 f"{blocked.stat().st_mode & 0o777:o}), so Postfix's daemons "
                                 f"(user {MAIL_OWNER}) cannot reach {self.root}; use make_root()")
        self._write_config()
        if self._make_directories():
            # Skips postfix-script's integrity checks (seconds of find(1) over system dirs);
            # the directories were just made as they should be.
            (self.queue_dir / "quick-start").touch()
        deadline = time.monotonic() + timeout
        self._started = True  # from here on, stop() has something to clean up
        done = self._run(str(POSTFIX), "-c", str(self.config_dir), "start", timeout=timeout)
        if done.returncode != 0:
            raise PostfixFailure(f"postfix start exited {done.returncode}:\n"
                                 f"{done.stderr.decode(errors='replace')}{self._log_tail()}")
        if self.listen_port is not None:
            self._wait_for_greeting(deadline)
        return self

    def _wait_for_greeting(self, deadline: float) -> None:
        assert self.listen_port is not None
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.listen_port), timeout=2) as conn:
                    conn.settimeout(2)
                    if conn.recv(512).startswith(b"220"):  # RFC 5321 §4.2: the greeting
                        conn.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PostfixFailure(f"no SMTP greeting on 127.0.0.1:{self.listen_port}\n"
                                     f"{self._log_tail()}")
            time.sleep(0.05)

    def master_pid(self) -> int | None:
        """The master's pid from its pid file, when there is one."""
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """`postfix -c DIR stop`, then SIGKILL any process still working in our queue directory
        (every Postfix daemon's cwd). Safe to call twice, or after a failed start."""
        if not self._started:
            return
        self._started = False
        if self.master_pid() in self.processes():  # else `stop` would log a fatal
            try:
                self._run(str(POSTFIX), "-c", str(self.config_dir), "stop", timeout=15)
            except PostfixFailure:
                pass  # the leftovers are killed below
        deadline = time.monotonic() + 10
        while pids := self.processes():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise PostfixFailure(f"Postfix processes {pids} survived SIGKILL")
            time.sleep(0.05)

    def processes(self) -> list[int]:
        """This instance's running processes: every Postfix daemon, the master included,
        works (cwd) in the queue directory, which no other instance shares."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd == str(self.queue_dir):
                pids.append(int(entry.name))
        return pids

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- mail ----------------------------------------------------------------------------

    def inject(self, raw: bytes, sender: str, recipients: list[str]) -> None:
        """Submit `raw` like a local program: `sendmail -C DIR -f SENDER -i -- RCPT...`.
        `-i`: a line with a single dot is message content, not the end of input."""
        if not recipients:
            raise ValueError("at least one recipient")
        done = self._run(str(SENDMAIL), "-C", str(self.config_dir), "-f", sender or "<>",
                         "-i", "--", *recipients, input=raw)
        if done.returncode != 0:
            raise PostfixFailure(f"sendmail exited {done.returncode}: "
                                 f"{done.stderr.decode(errors='replace')}{self._log_tail()}")

    def queue(self) -> list[dict[str, object]]:
        """The queue as `postqueue -j` reports it: one JSON object per message."""
        done = self._run(str(POSTQUEUE), "-c", str(self.config_dir), "-j")
        if done.returncode != 0:
            raise PostfixFailure(f"postqueue -j exited {done.returncode}: "
                                 f"{done.stderr.decode(errors='replace')}")
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def wait_empty(self, timeout: float = 30) -> None:
        """Wait until the queue is empty (every message delivered, bounced or discarded)."""
        deadline = time.monotonic() + timeout
        while entries := self.queue():
            if time.monotonic() > deadline:
                raise PostfixFailure(f"queue not empty after {timeout}s: {entries}\n"
                                     f"{self._log_tail()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        """Everything Postfix logged so far (maillog_file, written by postlogd)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle: str, timeout: float = 10, *, count: int = 1) -> str:
        """Wait until the log contains `needle` `count` times (postlogd writes asynchronously,
        so a line may lag the event it reports); returns the log."""
        deadline = time.monotonic() + timeout
        while (text := self.log_text()).count(needle) < count:
            if time.monotonic() > deadline:
                raise PostfixFailure(f"{needle!r} not logged {count}x in {timeout}s\n"
                                     f"{self._log_tail()}")
            time.sleep(0.05)
        return text

    def _log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.maillog} (last {len(tail)} lines) ---\n" + "\n".join(tail)


def make_root(prefix: str = "inbox-postfix-") -> Path:
    """A fresh 0755 directory under /tmp for a `PostfixInstance` (remove with `remove_root`)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


def remove_root(root: Path) -> None:
    """Delete a directory made by `make_root` (stop its instances first)."""
    shutil.rmtree(root, ignore_errors=True)
