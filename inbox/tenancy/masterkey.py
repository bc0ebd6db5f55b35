"""The master key that wraps tenant secrets (DKIM private keys, later storage keys)."""

from __future__ import annotations

import base64
import logging
import os
import secrets
from pathlib import Path

from inbox.errors import ConfigError
from inbox.tenancy.keys import SecretBox

log = logging.getLogger(__name__)


def load_master_box(master_key_b64: str, data_dir: Path) -> SecretBox:
    """INBOX_MASTER_KEY when set; in development a key generated once into the data dir."""
    if master_key_b64:
        try:
            return SecretBox.from_b64(master_key_b64)
        except ValueError as exc:
            raise ConfigError(f"INBOX_MASTER_KEY: {exc}") from None
    path = data_dir / "master.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        log.warning("INBOX_MASTER_KEY is not set: generated a development key at %s. "
                    "Set INBOX_MASTER_KEY in production and keep it safe.", path)
    try:
        return SecretBox.from_b64(path.read_text().strip())
    except ValueError as exc:
        raise ConfigError(f"INBOX_MASTER_KEY: {path}: {exc}") from None
