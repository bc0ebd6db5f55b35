"""Generated contracts stay current: schema.graphql and .env.example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inbox.config import load_settings, setting_names
from inbox.errors import ConfigError
from inbox.graphql import build_schema

ROOT = Path(__file__).resolve().parent.parent


def test_schema_file_matches_served_schema() -> None:
    served = build_schema().as_str().strip()
    on_disk = (ROOT / "schema.graphql").read_text().strip()
    assert on_disk == served, "stale: run `python -m inbox schema > schema.graphql`"


def test_env_example_lists_every_setting_with_a_comment() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    names = []
    for i, line in enumerate(lines):
        match = re.match(r"^([A-Z][A-Z0-9_]*)=", line)
        if match:
            names.append(match.group(1))
            assert lines[i - 1].startswith("# "), f"{match.group(1)} has no comment line"
    assert sorted(names) == sorted(setting_names())


def test_env_example_defaults_load() -> None:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if re.match(r"^[A-Z]", line):
            name, _, value = line.partition("=")
            values[name] = value
    defaults = load_settings(env={})
    loaded = load_settings(env=values)
    for name in setting_names():
        assert getattr(loaded, name) == getattr(defaults, name), name


@pytest.mark.parametrize(("name", "value"), [
    ("INBOX_HTTP_PORT", "http"),
    ("INBOX_HTTP_PORT", "70000"),
    ("SMTP_OUTBOUND_MAX_ATTEMPTS", "0"),
    ("INBOX_DATABASE_URL", "postgres://x"),
    ("INBOX_DB_SYNC", "maybe"),
    ("OTEL_TRACES_EXPORTER", "jaeger"),
    ("SMTP_OUTBOUND_PROCESS", "yes"),
    ("SMTP_OUTBOUND_MAX_SESSIONS_PER_HOST", "0"),
    ("INBOX_MASTER_KEY", "not base64!"),
    ("INBOX_MASTER_KEY", "c2hvcnQ="),
    ("SMTP_OUTBOUND_RELAY", "relay.example"),
    ("SMTP_OUTBOUND_RELAY", "user@relay.example:587"),
    ("INBOX_DNS_NAMESERVERS", "127.0.0.1, not-an-ip"),
    ("INBOX_DNS_NAMESERVERS", "127.0.0.1:99999"),
    ("OTEL_TRACES_SAMPLER", "sometimes"),
    ("OTEL_TRACES_SAMPLER_ARG", "2"),
], ids=["port-text", "port-range", "attempts-zero", "db-scheme", "bool", "exporter",
        "outbound-process", "sessions-per-host-zero", "master-key-base64",
        "master-key-length", "relay-no-port", "relay-no-password", "nameserver-not-ip",
        "nameserver-port", "sampler", "sampler-arg"])
def test_bad_setting_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={name: value})
    assert str(info.value).startswith(f"{name}:")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "value", "secret"), [
    ("INBOX_MASTER_KEY", "c2VjcmV0LWtleQ==", "c2VjcmV0LWtleQ"),
    ("SMTP_OUTBOUND_RELAY", "user:s3cret@relay.example", "s3cret"),
    ("INBOX_DATABASE_URL", "postgres://user:s3cret@db", "s3cret"),
], ids=["master-key", "relay-password", "database-url"])
def test_a_bad_secret_is_not_repeated(name: str, value: str, secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={name: value})
    assert str(info.value).startswith(f"{name}:") and secret not in str(info.value)


def test_only_config_reads_the_environment() -> None:
    """Every variable goes through Settings (and so into .env.example and its checks)."""
    reads = re.compile(r"\bgetenv\b|\benviron\b(?!\[[^]]*\]\s*=[^=])")  # a write is no read
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sorted((ROOT / "inbox").rglob("*.py")) if path.name != "config.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if reads.search(line.split("#", 1)[0])]
    assert found == []
