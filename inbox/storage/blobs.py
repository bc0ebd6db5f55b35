"""Encrypted blob storage for inbound mail: the local-directory store, and choosing it or S3
(`build_blob_store`); every blob is encrypted under its organization's key. Does not build
messages.

The key layout and checks live in `inbox.storage.blobkeys`, the S3 (SSE-C) store in
`inbox.storage.s3blobs`; both are re-exported here (`from inbox.storage.blobs import
S3BlobStore, message_key, ...`).

Key layout (every component is one of our own ids, [A-Za-z0-9._-], never "." and never
containing ".."):

    msg/{org}/{mailbox}/{message_id}.eml            the raw message
    att/{org}/{mailbox}/{message_id}/{part_id}      an attachment
    part/{org}/{mailbox}/{message_id}/{mime_path}   a MIME part, mime_path like "1.2.3"

Every store method takes the organization's 32-byte `tenant_key` where bytes are read or
written. S3 gets it as SSE-C (AWS encrypts with it and keeps only a salted HMAC of it;
LocalStack, used in tests, checks the key but stores plaintext). The local store encrypts with
AES-256-GCM itself (format in `inbox.storage.envelope`), the object key as associated data.
Blocking I/O runs in threads (`asyncio.to_thread`).

Errors: a missing blob -> NotFound; a key that does not open it -> DecryptionFailed; the backend
unreachable or failing (5xx, timeouts, unexpected replies) -> StorageUnavailable (temporary).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from inbox.errors import ConfigError, NotFound, StorageUnavailable
from inbox.storage.blobkeys import (
    BlobStore,
    attachment_key,
    delete_message,
    message_key,
    message_prefixes,
    part_key,
    put_batch,
    validate_key,
    validate_prefix,
)
from inbox.storage.blobkeys import check_tenant_key as _check_tenant_key
from inbox.storage.envelope import DecryptionFailed, decrypt_at_rest, encrypt_at_rest
from inbox.storage.s3blobs import S3BlobStore

__all__ = ["BlobStore", "DecryptionFailed", "LocalBlobStore", "S3BlobStore", "attachment_key",
           "build_blob_store", "delete_message", "message_key", "message_prefixes",
           "part_key", "validate_key"]

T = TypeVar("T")


# --- local directory ------------------------------------------------------------------------


class LocalBlobStore:
    """Blobs as files under `root_dir` at their key's path, AES-256-GCM encrypted.

    A put writes a temp file under `root_dir/.tmp`, fsyncs it, renames it into place and fsyncs
    the directory (and every directory it had to create), so the blob is durable when put
    returns and a crash leaves the old blob or the new one, never part of one. Directories are
    0700, files 0600.
    """

    def __init__(self, root_dir: str | os.PathLike[str]) -> None:
        self.root = Path(root_dir)
        self.tmp_dir = self.root / ".tmp"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _put(self, key: str, data: bytes, tenant_key: bytes) -> None:
        _fsync_dir(self._write(key, data, tenant_key).parent)

    def _write(self, key: str, data: bytes, tenant_key: bytes) -> Path:
        """Encrypt, write to a temp file, fsync, rename into place; the caller fsyncs the
        directory before calling the blob durable."""
        path = self._path(key)
        sealed = encrypt_at_rest(tenant_key, key, data)
        _make_dirs(path.parent)
        _make_dirs(self.tmp_dir)
        tmp = self.tmp_dir / f"{secrets.token_hex(8)}.tmp"
        try:
            with open(tmp, "xb", opener=lambda p, f: os.open(p, f, 0o600)) as fh:
                fh.write(sealed)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def _get(self, key: str, tenant_key: bytes) -> bytes:
        try:
            sealed = self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {key} not found") from None
        return decrypt_at_rest(tenant_key, key, sealed)

    def _delete(self, key: str) -> int:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        return 1

    def _delete_prefix(self, prefix: str) -> int:
        if validate_prefix(prefix):
            return self._delete(prefix)
        path = self.root.joinpath(*prefix.split("/")[:-1])
        if not path.is_dir():
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        _fsync_dir(path.parent)
        return count

    def _exists(self, key: str, tenant_key: bytes | None) -> bool:
        if tenant_key is None:
            return self._path(key).is_file()
        try:
            self._get(key, tenant_key)
        except NotFound:
            return False
        return True

    def _remove_stale_temp(self) -> int:
        paths = list(self.tmp_dir.iterdir()) if self.tmp_dir.is_dir() else []
        for path in paths:
            path.unlink(missing_ok=True)
        return len(paths)

    async def put(self, key: str, data: bytes, *, tenant_key: bytes) -> None:
        await _local(self._put, key, bytes(data), _check_tenant_key(tenant_key))

    async def put_many(self, items: list[tuple[str, bytes, bytes]]) -> None:
        """Put several (key, data, tenant_key) blobs; all durable when it returns. If it
        raises, every write has finished and none of the batch's blobs is left."""
        checked = [(k, bytes(d), _check_tenant_key(t)) for k, d, t in items]
        keys = [k for k, _, _ in checked]
        if len(checked) == 1:  # write and fsync in one worker-thread hop
            await put_batch(keys, [_local(self._put, *checked[0])], self.delete)
            return
        # Writes in parallel threads: concurrent fsyncs share one ext4 journal commit. Then
        # each directory once (a group commit for blobs); a failure there undoes them all.
        paths = await put_batch(keys, [_local(self._write, k, d, t) for k, d, t in checked],
                                self.delete)
        await put_batch(keys, [_local(_fsync_dir, p) for p in {p.parent for p in paths}],
                        self.delete)

    async def get(self, key: str, *, tenant_key: bytes) -> bytes:
        return await _local(self._get, key, _check_tenant_key(tenant_key))

    async def delete(self, key: str) -> None:
        await _local(self._delete, key)

    async def delete_prefix(self, prefix: str) -> int:
        return await _local(self._delete_prefix, prefix)

    async def exists(self, key: str, *, tenant_key: bytes | None = None) -> bool:
        """Whether `key` is stored; with `tenant_key`, also that this key opens it."""
        if tenant_key is not None:
            _check_tenant_key(tenant_key)
        return await _local(self._exists, key, tenant_key)

    async def remove_stale_temp(self) -> int:
        """Remove temp files a crash left mid-put (call at start-up, before any put); they
        were never visible as blobs. Returns how many."""
        return await _local(self._remove_stale_temp)

    async def close(self) -> None:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing the parent of each directory made: a new file in a new directory
    survives a power loss only when the directory's own entry does."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        _fsync_dir(directory.parent)


async def _local(fn: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as exc:
        raise StorageUnavailable(f"local blob store: {exc.strerror or exc}") from exc



def build_blob_store(*, endpoint: str | None, bucket: str | None, access_key_id: str | None,
                     secret_access_key: str | None, region: str | None,
                     force_path_style: bool, local_dir: str | os.PathLike[str],
                     **s3_options: Any) -> BlobStore:
    """S3 when endpoint, bucket and both keys are all given, else the local directory store.

    Values come from S3_ENDPOINT, S3_BUCKET, S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3_REGION,
    S3_FORCE_PATH_STYLE and INBOX_INCOMING_DIR. Half an S3 configuration is a ConfigError, not
    a silent fall back to local disk.
    """
    s3 = {"S3_ENDPOINT": endpoint, "S3_BUCKET": bucket, "S3_ACCESS_KEY_ID": access_key_id,
          "S3_SECRET_ACCESS_KEY": secret_access_key}
    given = [name for name, value in s3.items() if value]
    if not given:
        return LocalBlobStore(local_dir)
    if len(given) != len(s3):
        missing = ", ".join(name for name, value in s3.items() if not value)
        raise ConfigError(f"S3 storage is half configured: set {missing} too, or none of "
                          f"the S3_* settings to use INBOX_INCOMING_DIR")
    assert endpoint and bucket and access_key_id and secret_access_key
    return S3BlobStore(endpoint, bucket, access_key_id, secret_access_key,
                       region or "us-east-1", force_path_style, **s3_options)
