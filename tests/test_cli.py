"""The CLI as an operator runs it: `python -m inbox …` in a subprocess on a temporary data dir.

INBOX_MASTER_KEY is unset throughout, so these tests also cover the development key that the
first command generates (with a warning) and later commands reuse.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import stat
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.dnsserver import DnsServer
from tests.support.procs import Service, free_port, inbox_env, run_cli, run_cli_json

MASTER_KEY_WARNING = "INBOX_MASTER_KEY is not set"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return inbox_env(tmp_path / "data", INBOX_LOG_LEVEL="INFO")


def test_tenant_setup_prints_json_and_generates_a_dev_master_key(
        env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "data" / "master.key"
    created = run_cli(env, "org", "create", "Acme Corp", "--json", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    org = json.loads(created.stdout)
    assert set(org) == {"id", "name"} and org["name"] == "Acme Corp"
    assert org["id"].startswith("org_")
    # The development key: generated once with a warning naming the variable, owner-only.
    assert MASTER_KEY_WARNING in created.stderr and str(key_file) in created.stderr
    assert "Traceback" not in created.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    first_key = key_file.read_text()
    assert len(base64.b64decode(first_key.strip())) == 32

    domain = run_cli(env, "domain", "add", org["id"], "example.test", "--verified", "--json",
                     cwd=tmp_path)
    assert domain.returncode == 0, domain.stderr
    assert MASTER_KEY_WARNING not in domain.stderr  # reused, not generated again
    assert key_file.read_text() == first_key
    added = json.loads(domain.stdout)
    assert set(added) == {"domain", "verified", "records"}
    assert added["domain"] == "example.test" and added["verified"] is True
    records = added["records"]
    assert all(set(r) == {"type", "name", "value"} and r["type"] == "TXT" for r in records)
    kinds = {}
    for record in records:
        assert re.fullmatch(r"[a-z0-9]+\._domainkey\.example\.test", record["name"]), record
        tags = dict(part.strip().split("=", 1) for part in record["value"].split(";"))
        assert tags["v"] == "DKIM1" and base64.b64decode(tags["p"], validate=True)
        kinds[tags["k"]] = record["name"]
    assert sorted(kinds) == ["ed25519", "rsa"] and len(set(kinds.values())) == 2

    key = run_cli_json(env, "apikey", "create", org["id"], "--scope", "send", "--json")
    assert key["key"].startswith("ibx_") and key["scopes"] == ["send"]


def test_global_json_flag_before_the_command(env: dict[str, str], tmp_path: Path) -> None:
    done = run_cli(env, "--json", "org", "create", "Acme", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("{"), done.stdout


@pytest.mark.parametrize("args", [
    ("domain", "add", "org_doesnotexist", "example.test", "--verified"),
    ("apikey", "create", "org_doesnotexist", "--scope", "send"),
    ("domain", "verify", "org_doesnotexist", "example.test", "--force"),
], ids=["domain-add", "apikey-create", "domain-verify"])
def test_unknown_organization_is_a_clear_error(env: dict[str, str], tmp_path: Path,
                                               args: tuple[str, ...]) -> None:
    done = run_cli(env, *args, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("inbox: ")]
    assert errors == ["inbox: organization org_doesnotexist not found"], done.stderr


def _org_with_domain(env: dict[str, str], domain: str) -> tuple[str, list[dict[str, str]]]:
    """A new organization with `domain` added, not verified; its id and the DNS records."""
    org = run_cli_json(env, "org", "create", "Acme", "--json")["id"]
    added = run_cli_json(env, "domain", "add", org, domain, "--json")
    assert added["verified"] is False
    return org, added["records"]


def test_domain_verify_force_marks_it_verified_without_dns(env: dict[str, str],
                                                          tmp_path: Path) -> None:
    org, _ = _org_with_domain(env, "example.test")
    done = run_cli(env, "domain", "verify", org, "example.test", "--force", "--json",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"domain": "example.test", "verified": True, "checks": []}
    warnings = [line for line in done.stderr.splitlines() if line.startswith("inbox: ")]
    assert len(warnings) == 1 and "warning" in warnings[0], done.stderr
    assert "without looking at DNS" in warnings[0]
    # It stays verified, as after verifyDomain: a later DNS check (nothing published, no
    # nameserver answering) reports the records missing but does not take it back.
    again = run_cli({**env, "INBOX_DNS_NAMESERVERS": "127.0.0.1:9", "INBOX_DNS_TIMEOUT_SECS": "1"},
                    "domain", "verify", org, "example.test", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["verified"] is True and not any(c["ok"] for c in result["checks"])


def test_domain_verify_checks_the_dkim_records_in_dns(env: dict[str, str], tmp_path: Path,
                                                     dns_server: DnsServer) -> None:
    env = {**env, "INBOX_DNS_NAMESERVERS": dns_server.address, "INBOX_DNS_TIMEOUT_SECS": "2"}
    org, records = _org_with_domain(env, "example.test")
    before = run_cli(env, "domain", "verify", org, "example.test", "--json", cwd=tmp_path)
    assert before.returncode == 1, before.stderr
    result = json.loads(before.stdout)
    assert result["verified"] is False
    assert [(c["name"], c["ok"], c["error"]) for c in result["checks"]] == [
        (r["name"], False, "no TXT record found") for r in records]
    assert before.stderr.splitlines()[-1] == (
        "inbox: domain example.test is not verified: publish its TXT records and run this again")

    for record in records:
        dns_server.add_txt(record["name"], record["value"])
    after = run_cli(env, "domain", "verify", org, "example.test", cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert after.stdout.splitlines() == ["domain example.test verified: True"] + [
        f"  ok: {r['name']} TXT" for r in records]
    assert "Traceback" not in after.stderr


def test_bad_setting_exits_2_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    done = run_cli({**env, "INBOX_HTTP_PORT": "abc"}, "org", "create", "Acme", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "INBOX_HTTP_PORT" in lines[0] and "'abc'" in lines[0]
    assert done.stdout == ""
    assert not (tmp_path / "data").exists()  # nothing was opened or created


BAD_SETTINGS = {
    "INBOX_MASTER_KEY": ("c2hvcnQ=", "32 bytes"),
    "SMTP_OUTBOUND_RELAY": ("relay.example", "host:port"),
    "INBOX_DNS_NAMESERVERS": ("127.0.0.1, not-an-ip", "not an IP address"),
}


def _one_error_line(done: subprocess.CompletedProcess[str], name: str) -> str:
    """The single line `inbox` printed on stderr, which names the variable."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("inbox: ") and f"{name}:" in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [("serve",), ("worker",), ("org", "create", "Acme")],
                         ids=["serve", "worker", "org-create"])
@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_a_bad_setting_checked_elsewhere_stops_every_command_before_it_opens_anything(
        env: dict[str, str], tmp_path: Path, name: str, command: tuple[str, ...]) -> None:
    """Values that the master key, relay and resolver code judge are checked with the settings:
    one line, exit 2, and no database opened nor development key generated."""
    value, reason = BAD_SETTINGS[name]
    done = run_cli({**env, name: value}, *command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert reason in _one_error_line(done, name)
    assert done.stdout == ""
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", ["INBOX_HTTP_PORT", "SMTP_TRANSFER_PORT", "SMTP_SUBMISSION_PORT",
                                  "SMTP_SUBMISSIONS_PORT"])
def test_serve_with_a_port_in_use_says_which_in_one_line(env: dict[str, str], tmp_path: Path,
                                                         name: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli({**env, "INBOX_HTTP_PORT": str(free_port()), name: str(port)}, "serve",
                       cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done, name)
    assert f"127.0.0.1:{port}" in line and "in use" in line
    assert not (tmp_path / "data").exists()  # checked before anything was opened


def test_worker_refuses_a_data_dir_the_server_holds(env: dict[str, str],
                                                    tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with Service(env, tmp_path / "logs") as service:
        done = run_cli(env, "worker", cwd=tmp_path)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        assert "INBOX_DATA_DIR" in done.stderr and str(data_dir) in done.stderr
        assert "SurrealDB server" in done.stderr and "ws://" in done.stderr
        assert f"pid {service.proc.pid}" in done.stderr  # type: ignore[union-attr]
        # A second server says the same in one line (building services, before uvicorn).
        second = run_cli({**env, "INBOX_HTTP_PORT": str(free_port())}, "serve", cwd=tmp_path)
        assert second.returncode == 2
        assert str(data_dir) in _one_error_line(second, "INBOX_DATA_DIR")
        # The server is unaffected and stops cleanly on SIGTERM.
        assert httpx.get(f"{service.base_url}/healthz", timeout=5).status_code == 200
        code = service.terminate()
        # uvicorn shuts down gracefully, then re-raises the captured SIGTERM, so the status
        # is "terminated by SIGTERM" (shell: 143), which supervisors treat as a clean stop.
        assert code in (0, -signal.SIGTERM), service.stderr()
        log = service.stderr()
        assert "Traceback" not in log and " ERROR " not in log
        assert "Application shutdown complete" in log and "Finished server process" in log
    # Once it is gone the data dir is free again.
    assert run_cli_json(env, "org", "create", "After", "--json")["name"] == "After"


ROOT = Path(__file__).resolve().parent.parent
SMTP_PORTS = ("SMTP_TRANSFER_PORT", "SMTP_SUBMISSION_PORT", "SMTP_SUBMISSIONS_PORT")


def _make_run(tmp_path: Path, *make_args: str, **env: str) -> list[str]:
    """`make run` with PY= a stand-in that prints the SMTP ports `inbox serve` would get."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "-m inbox" ] || exit 0\n'
                    + "".join(f'echo "{n}=${{{n}-unset}}"\n' for n in SMTP_PORTS))
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in SMTP_PORTS and k != "LOW_PORTS"}
    done = subprocess.run(["make", "-s", "run", f"PY={fake}", *make_args],
                          env={**base, **env}, cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_make_run_moves_smtp_to_unprivileged_ports_when_it_cannot_bind_low_ones(
        tmp_path: Path) -> None:
    notice, *ports = _make_run(tmp_path, "LOW_PORTS=no")
    assert notice == ("make run: not root, so SMTP listens on unprivileged ports: "
                      "SMTP_TRANSFER_PORT=2525 SMTP_SUBMISSION_PORT=2587 "
                      "SMTP_SUBMISSIONS_PORT=2465 (set them to choose others)")
    assert ports == ["SMTP_TRANSFER_PORT=2525", "SMTP_SUBMISSION_PORT=2587",
                     "SMTP_SUBMISSIONS_PORT=2465"]
    # A port set in the environment is the operator's choice: kept, and not mentioned.
    notice, *ports = _make_run(tmp_path, "LOW_PORTS=no", SMTP_TRANSFER_PORT="2600")
    assert "SMTP_TRANSFER_PORT" not in notice and "SMTP_SUBMISSION_PORT=2587" in notice
    assert ports == ["SMTP_TRANSFER_PORT=2600", "SMTP_SUBMISSION_PORT=2587",
                     "SMTP_SUBMISSIONS_PORT=2465"]
    assert _make_run(tmp_path, "LOW_PORTS=no", **{n: "0" for n in SMTP_PORTS}) == [
        f"{n}=0" for n in SMTP_PORTS]


def test_make_run_keeps_the_default_ports_when_it_can_bind_them(tmp_path: Path) -> None:
    assert _make_run(tmp_path, "LOW_PORTS=yes") == [f"{n}=unset" for n in SMTP_PORTS]
    # Without LOW_PORTS the Makefile decides: root, or a kernel that lets anyone bind 25.
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    can_bind = os.geteuid() == 0 or (start.exists() and int(start.read_text()) <= 25)
    lines = _make_run(tmp_path)
    assert (lines == [f"{n}=unset" for n in SMTP_PORTS]) is can_bind, lines
