"""Settings: the only place inbox reads the environment. Names follow the system we succeed.

`load_settings()` reads the process environment once, at start-up; a bad value raises
`ConfigError` naming the variable, before anything is opened or generated (values that only
another module can judge, such as the master key, the relay and the nameservers, are checked
here with that module's own parser). Nothing here runs at import time.

A `.env` file is not read: export its variables first (`set -a; . ./.env; set +a`). The
OpenTelemetry SDK still honours the standard variables inbox does not interpret itself
(`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, span limits, `OTEL_SDK_DISABLED`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from inbox.errors import ConfigError

# The settings' own docs live in `.env.example`; a test checks both lists are the same.
DEFAULT_DKIM_HEADERS = "From,To,Cc,Subject,Date,Message-ID,Reply-To,MIME-Version,Content-Type"


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# Settings that take one of a few words (checked by Settings._choice).
_CHOICES: dict[str, tuple[str, ...]] = {
    "SMTP_OUTBOUND_TLS_MODE": ("opportunistic", "required"),
    "SMTP_OUTBOUND_DANE_MODE": ("off", "prefer", "require"),
    "SMTP_OUTBOUND_PROCESS": ("auto", "on", "off"),
    "OTEL_TRACES_EXPORTER": ("none", "console"),
    # The standard OpenTelemetry sampler names ("" = inbox's default: record once read).
    "OTEL_TRACES_SAMPLER": ("", "always_on", "always_off", "parentbased_always_on",
                            "parentbased_always_off", "traceidratio",
                            "parentbased_traceidratio"),
}

# Settings whose value a configuration error never repeats (keys, passwords, URLs with them).
_SECRET = frozenset({"INBOX_MASTER_KEY", "DATABASE_PASSWORD", "S3_SECRET_ACCESS_KEY",
                     "SMTP_OUTBOUND_RELAY", "INBOX_DATABASE_URL"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=None, case_sensitive=True, extra="ignore", frozen=True
    )

    # --- server ---
    SERVER_HOSTNAME: str = "localhost"
    SERVER_BIND_ADDR: str = "127.0.0.1"
    INBOX_HTTP_PORT: int = Field(3000, ge=0, le=65535)
    INBOX_LOG_LEVEL: str = "INFO"

    # --- data ---
    INBOX_DATA_DIR: Path = Path("./data")
    INBOX_DATABASE_URL: str = ""
    DATABASE_NAMESPACE: str = "inbox"
    DATABASE_DATABASE: str = "inbox"
    DATABASE_USERNAME: str = ""
    DATABASE_PASSWORD: str = ""
    INBOX_DB_SYNC: bool = True
    INBOX_MASTER_KEY: str = ""

    # --- DNS ---
    INBOX_DNS_NAMESERVERS: Annotated[list[str], NoDecode] = []
    INBOX_DNS_TIMEOUT_SECS: float = Field(5.0, gt=0)

    # --- outbound ---
    SMTP_OUTBOUND_PORT: int = Field(25, ge=1, le=65535)
    SMTP_OUTBOUND_RELAY: str = ""
    SMTP_OUTBOUND_RELAY_STARTTLS: bool = True
    SMTP_OUTBOUND_QUEUE_BATCH_SIZE: int = Field(50, ge=1, le=1000)
    SMTP_OUTBOUND_QUEUE_LEASE_SECS: int = Field(300, ge=1)
    SMTP_OUTBOUND_QUEUE_POLL_SECS: float = Field(1.0, gt=0)
    SMTP_OUTBOUND_CONCURRENCY: int = Field(64, ge=1, le=1024)
    SMTP_OUTBOUND_MAX_SESSIONS_PER_HOST: int = Field(20, ge=1, le=1024)
    SMTP_OUTBOUND_PROCESS: str = "auto"
    SMTP_OUTBOUND_TIMEOUT_SECS: float = Field(60.0, gt=0)
    SMTP_OUTBOUND_RETRY_BASE_DELAY_SECS: float = Field(60.0, ge=0)
    SMTP_OUTBOUND_RETRY_MAX_DELAY_SECS: float = Field(3600.0, ge=0)
    SMTP_OUTBOUND_MAX_ATTEMPTS: int = Field(20, ge=1)
    SMTP_OUTBOUND_TTL_SECS: int = Field(5 * 86400, ge=1)
    SMTP_OUTBOUND_DEAD_JOB_RETENTION_SECS: int = Field(7 * 86400, ge=0)
    SMTP_OUTBOUND_DELIVERY_RETENTION_SECS: int = Field(30 * 86400, ge=0)
    SMTP_MAX_MESSAGE_BYTES: int = Field(25 * 1024 * 1024, ge=1024)
    SMTP_DKIM_HEADERS: Annotated[list[str], NoDecode] = _split_list(DEFAULT_DKIM_HEADERS)  # type: ignore[assignment]
    SMTP_DKIM_ED25519: bool = True

    # --- outbound TLS policy (DANE, MTA-STS, TLS-RPT, REQUIRETLS) ---
    SMTP_OUTBOUND_TLS_MODE: str = "opportunistic"
    SMTP_OUTBOUND_REQUIRE_STARTTLS: bool = False
    SMTP_OUTBOUND_ALLOW_PLAINTEXT_FALLBACK: bool = True
    SMTP_OUTBOUND_ALLOW_INVALID_CERTS: bool = True
    SMTP_OUTBOUND_CA_FILE: str = ""
    SMTP_OUTBOUND_DANE_MODE: str = "prefer"
    SMTP_OUTBOUND_DNSSEC_VALIDATE: bool = True
    SMTP_OUTBOUND_MTA_STS_ENFORCE: bool = True
    SMTP_TLS_REPORT_DIR: str = ""
    SMTP_TLS_REPORT_FROM: str = ""
    SMTP_TLS_REPORT_ORG: str = ""
    SMTP_TLS_REPORT_ORGANIZATION_NAME: str = ""
    SMTP_TLS_REPORT_CONTACT: str = ""

    # --- inbound (SMTP transfer, port 25) ---
    SMTP_TRANSFER_PORT: int = Field(25, ge=0, le=65535)
    INBOX_SMTP_TRANSFER_ENABLED: bool = True
    SMTP_TLS_CERT_FILE: str = ""
    SMTP_TLS_KEY_FILE: str = ""
    SMTP_INBOUND_MAX_RCPT_TO: int = Field(100, ge=1)
    SERVER_MAX_CONNECTIONS: int = Field(1000, ge=1)
    SMTP_COMMAND_TIMEOUT_SECS: float = Field(300.0, gt=0)
    SMTP_DATA_TIMEOUT_SECS: float = Field(600.0, gt=0)
    SMTP_RATE_LIMIT_CONNECTIONS_PER_MINUTE: int = Field(60, ge=0)
    SMTP_RATE_LIMIT_MESSAGES_PER_MINUTE: int = Field(120, ge=0)
    SMTP_RATE_LIMIT_FAIL_OPEN_ON_DB_ERROR: bool = True
    SMTP_REQUIRE_SPF_PASS: bool = False
    SMTP_REQUIRE_DKIM_PASS: bool = False
    SMTP_REQUIRE_DMARC_PASS: bool = False
    INBOX_STORE_PARSED_PARTS: bool = False
    INBOX_INCOMING_DIR: Path = Path("")
    S3_ENDPOINT: str = ""
    S3_BUCKET: str = ""
    S3_ACCESS_KEY_ID: str = ""
    S3_SECRET_ACCESS_KEY: str = ""
    S3_REGION: str = "us-east-1"
    S3_FORCE_PATH_STYLE: bool = True

    # --- SMTP submission (587 STARTTLS, 465 implicit TLS) ---
    SMTP_SUBMISSION_PORT: int = Field(587, ge=0, le=65535)
    SMTP_SUBMISSIONS_PORT: int = Field(465, ge=0, le=65535)
    INBOX_SMTP_SUBMISSION_ENABLED: bool = True
    SMTP_RATE_LIMIT_SUBMISSION_CONNECTIONS_PER_MINUTE: int = Field(120, ge=0)
    SMTP_RATE_LIMIT_SUBMISSION_MESSAGES_PER_MINUTE: int = Field(600, ge=0)
    SMTP_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE: int = Field(10, ge=0)

    # --- tenancy defaults (per-domain overrides live on has_domain) ---
    INBOX_QUOTA_MAX_RECIPIENTS_PER_MESSAGE: int = Field(50, ge=1)
    INBOX_QUOTA_HOURLY_SEND_LIMIT: int = Field(1000, ge=0)
    INBOX_QUOTA_DAILY_SEND_LIMIT: int = Field(10000, ge=0)
    INBOX_QUOTA_MAX_QUEUED_JOBS: int = Field(10000, ge=0)
    INBOX_IDEMPOTENCY_TTL_SECS: int = Field(86400, ge=60)
    INBOX_CACHE_SECS: float = Field(5.0, ge=0)

    # --- telemetry ---
    OTEL_SERVICE_NAME: str = "inbox"
    OTEL_TRACES_EXPORTER: str = "none"
    OTEL_TRACES_SAMPLER: str = ""
    OTEL_TRACES_SAMPLER_ARG: float = Field(1.0, ge=0, le=1)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,  # type: ignore[no-untyped-def, override]
                                   dotenv_settings, file_secret_settings):
        # load_settings() reads the environment itself, so an explicit env dict is the
        # whole truth (tests, embedding) and nothing leaks in from os.environ.
        return (init_settings,)

    @field_validator("INBOX_DNS_NAMESERVERS", "SMTP_DKIM_HEADERS", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator(*_CHOICES)
    @classmethod
    def _choice(cls, value: str, info: ValidationInfo) -> str:
        allowed = _CHOICES[info.field_name or ""]
        if value not in allowed:
            quoted = [f"'{a}'" for a in allowed]
            raise ValueError(f"must be {', '.join(quoted[:-1])} or {quoted[-1]}")
        return value

    @field_validator("INBOX_MASTER_KEY")
    @classmethod
    def _master_key(cls, value: str) -> str:
        if value:
            from inbox.tenancy.keys import SecretBox

            SecretBox.from_b64(value)  # its ValueError says what is wrong, never the key
        return value

    @field_validator("SMTP_OUTBOUND_RELAY")
    @classmethod
    def _relay(cls, value: str) -> str:
        if value.strip():
            from inbox.delivery.relay import RelayConfig

            RelayConfig.parse(value)  # its ValueError never shows the password
        return value

    @field_validator("SMTP_OUTBOUND_RELAY_STARTTLS")
    @classmethod
    def _relay_starttls(cls, value: bool, info: ValidationInfo) -> bool:
        relay = info.data.get("SMTP_OUTBOUND_RELAY", "")
        if not value and relay.strip():
            import ipaddress

            from inbox.delivery.relay import RelayConfig

            config = RelayConfig.parse(relay)
            try:
                loopback = ipaddress.ip_address(config.host).is_loopback
            except ValueError:
                loopback = config.host == "localhost"
            if config.username is not None and not loopback:
                raise ValueError("false would send the relay's password in the clear; "
                                 "allowed only for a relay on a loopback address")
        return value

    @field_validator("INBOX_DNS_NAMESERVERS")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        if value:
            from inbox.resolver import parse_nameserver

            for spec in value:
                try:
                    parse_nameserver(spec)
                except ConfigError as exc:
                    raise ValueError(exc.message) from None
        return value

    @property
    def outbound_process(self) -> bool:
        """Sign and send in a child process (inbox/delivery/outproc.py): `auto` = when this
        machine has a second core for it."""
        if self.SMTP_OUTBOUND_PROCESS == "auto":
            return (os.cpu_count() or 1) >= 2
        return self.SMTP_OUTBOUND_PROCESS == "on"

    @field_validator("INBOX_DATABASE_URL")
    @classmethod
    def _db_url(cls, value: str) -> str:
        allowed = ("surrealkv://", "file://", "mem://", "memory://", "ws://", "wss://",
                   "http://", "https://")
        if value and not value.startswith(allowed):
            raise ValueError(f"must start with one of {', '.join(allowed)}")
        return value

    @property
    def database_url(self) -> str:
        """The URL the database client uses; embedded on disk under the data dir by default."""
        if self.INBOX_DATABASE_URL:
            return self.INBOX_DATABASE_URL
        return f"surrealkv://{(self.INBOX_DATA_DIR / 'db').resolve()}"

    @property
    def incoming_dir(self) -> Path:
        """Local blob storage root: INBOX_INCOMING_DIR, or <data dir>/incoming by default."""
        if str(self.INBOX_INCOMING_DIR) not in ("", "."):
            return self.INBOX_INCOMING_DIR
        return self.INBOX_DATA_DIR / "incoming"

    @property
    def s3_configured(self) -> bool:
        return all((self.S3_ENDPOINT, self.S3_BUCKET, self.S3_ACCESS_KEY_ID,
                    self.S3_SECRET_ACCESS_KEY))

    @property
    def database_is_embedded(self) -> bool:
        return not self.database_url.startswith(("ws://", "wss://", "http://", "https://"))


def setting_names() -> list[str]:
    return list(Settings.model_fields)


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from `env` (default: the process environment) plus explicit overrides.

    Raises ConfigError with one line naming the first bad variable.
    """
    source = dict(os.environ if env is None else env)
    known = {k: v for k, v in source.items() if k in Settings.model_fields}
    known.update({k: v for k, v in overrides.items()})  # type: ignore[misc]
    try:
        return Settings(**known)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "settings"
        message = err["msg"].removeprefix("Value error, ")
        got = "" if name in _SECRET else f" (got {known.get(name)!r})"
        raise ConfigError(f"{name}: {message}{got}") from None
