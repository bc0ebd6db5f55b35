"""Encrypted blob storage for inbound mail: the key layout, and S3 (SSE-C) and local-directory
stores that keep every blob encrypted under its organization's key. Does not build messages.

Key layout (every component is one of our own ids, [A-Za-z0-9._-], never "." or ".."):

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
import ipaddress
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from inbox.errors import ConfigError, NotFound, StorageUnavailable, ValidationError
from inbox.storage.envelope import KEY_LEN, DecryptionFailed, decrypt_at_rest, encrypt_at_rest

__all__ = ["BlobStore", "DecryptionFailed", "LocalBlobStore", "S3BlobStore", "attachment_key",
           "build_blob_store", "delete_message", "message_key", "message_prefixes",
           "part_key", "validate_key"]

_COMPONENT = re.compile(r"[A-Za-z0-9._-]{1,200}")
# kind -> number of path segments after the kind; the last segment of msg keys ends ".eml".
_SHAPES = {"msg": 3, "att": 4, "part": 4}
T = TypeVar("T")


def _component(value: object, what: str) -> str:
    if (not isinstance(value, str) or not _COMPONENT.fullmatch(value)
            or value in (".", "..")):
        raise ValidationError(f"invalid {what} for a blob key: {value!r}", field=[what])
    return value


def message_key(org: str, mailbox: str, message_id: str) -> str:
    """`msg/{org}/{mailbox}/{message_id}.eml`."""
    return (f"msg/{_component(org, 'org')}/{_component(mailbox, 'mailbox')}/"
            f"{_component(message_id, 'message_id')}.eml")


def attachment_key(org: str, mailbox: str, message_id: str, part_id: str) -> str:
    """`att/{org}/{mailbox}/{message_id}/{part_id}`."""
    return (f"att/{_component(org, 'org')}/{_component(mailbox, 'mailbox')}/"
            f"{_component(message_id, 'message_id')}/{_component(part_id, 'part_id')}")


def part_key(org: str, mailbox: str, message_id: str, mime_path: str) -> str:
    """`part/{org}/{mailbox}/{message_id}/{mime_path}`."""
    return (f"part/{_component(org, 'org')}/{_component(mailbox, 'mailbox')}/"
            f"{_component(message_id, 'message_id')}/{_component(mime_path, 'mime_path')}")


def message_prefixes(org: str, mailbox: str, message_id: str) -> list[str]:
    """Everything stored for one message, each for `delete_prefix`: the message key itself
    (exact: "id.eml" must not match "id.emlx.eml"), then the attachment and part prefixes."""
    key = message_key(org, mailbox, message_id)
    rest = f"{org}/{mailbox}/{message_id}/"
    return [key, f"att/{rest}", f"part/{rest}"]


async def delete_message(store: BlobStore, org: str, mailbox: str, message_id: str) -> int:
    """Delete the message and its attachments and parts; returns how many blobs went."""
    count = 0
    for prefix in message_prefixes(org, mailbox, message_id):
        count += await store.delete_prefix(prefix)
    return count


def validate_key(key: str) -> str:
    """`key` if it has exactly one of the layout's shapes; ValidationError otherwise."""
    parts = key.split("/") if isinstance(key, str) else []
    want = _SHAPES.get(parts[0]) if parts else None
    if want is None or len(parts) != want + 1 or (parts[0] == "msg"
                                                 and not parts[-1].endswith(".eml")):
        raise ValidationError(f"not a blob key: {key!r}", field=["key"])
    for part in parts[1:]:
        _component(part, "key")
    return key


def validate_prefix(prefix: str) -> bool:
    """Whether `prefix` is one exact key (True) or a directory-like prefix of whole components
    ending in "/", at least `{kind}/{org}/` (False); ValidationError if it is neither."""
    parts = prefix.split("/") if isinstance(prefix, str) else []
    if parts and parts[-1] != "":
        validate_key(prefix)
        return True
    if len(parts) < 3 or parts[0] not in _SHAPES or len(parts) - 1 > _SHAPES[parts[0]]:
        raise ValidationError(f"not a blob key or prefix (kind/org/.../): {prefix!r}",
                              field=["prefix"])
    for part in parts[1:-1]:
        _component(part, "prefix")
    return False


def _check_tenant_key(tenant_key: bytes) -> bytes:
    if not isinstance(tenant_key, bytes) or len(tenant_key) != KEY_LEN:
        raise ValidationError(f"tenant key must be {KEY_LEN} bytes")
    return tenant_key


class BlobStore(Protocol):
    """put (and put_many) is durable when it returns; get raises NotFound or DecryptionFailed;
    delete is idempotent; delete_prefix takes a "/"-ended prefix or one exact key and returns
    the count removed; exists with `tenant_key` also checks that the key opens the blob."""

    async def put(self, key: str, data: bytes, *, tenant_key: bytes) -> None: ...
    async def put_many(self, items: list[tuple[str, bytes, bytes]]) -> None: ...
    async def get(self, key: str, *, tenant_key: bytes) -> bytes: ...
    async def delete(self, key: str) -> None: ...
    async def delete_prefix(self, prefix: str) -> int: ...
    async def exists(self, key: str, *, tenant_key: bytes | None = None) -> bool: ...
    async def close(self) -> None: ...


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

    def _put_many(self, items: list[tuple[str, bytes, bytes]]) -> None:
        """Write every blob, then fsync each directory once (a group commit for blobs)."""
        parents = {self._write(key, data, tenant_key).parent for key, data, tenant_key in items}
        for parent in parents:
            _fsync_dir(parent)

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
        """Put several (key, data, tenant_key) blobs in one worker-thread hop; all durable
        when it returns. On failure some may be written: the caller deletes them."""
        checked = [(k, bytes(d), _check_tenant_key(t)) for k, d, t in items]
        if len(checked) <= 1:
            await _local(self._put_many, checked)
            return
        # Writes in parallel threads: concurrent fsyncs share one ext4 journal commit.
        paths = await asyncio.gather(*(_local(self._write, k, d, t) for k, d, t in checked))
        await asyncio.gather(*(_local(_fsync_dir, p) for p in {p.parent for p in paths}))

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


# --- S3 -------------------------------------------------------------------------------------


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class S3BlobStore:
    """Blobs in an S3 bucket with SSE-C: the tenant key goes with every put, get and head.

    boto3 (blocking) runs in threads, at most `max_concurrency` at once. The client is made on
    first use. A plain http:// endpoint is refused unless it is loopback or `allow_http` is set
    (the tenant key travels in the request headers; AWS itself demands HTTPS for SSE-C).
    A put into a missing bucket creates the bucket and retries once.
    """

    def __init__(self, endpoint: str, bucket: str, access_key_id: str, secret_access_key: str,
                 region: str = "us-east-1", force_path_style: bool = False, *,
                 verify: bool | str | None = None, allow_http: bool = False,
                 connect_timeout: float = 5, read_timeout: float = 30, max_attempts: int = 3,
                 max_concurrency: int = 16) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"S3_ENDPOINT must be an http(s) URL, got {endpoint!r}")
        if parts.scheme == "http" and not (allow_http or _is_loopback(parts.hostname)):
            raise ConfigError("S3_ENDPOINT must be https:// (SSE-C sends the tenant key with "
                              f"each request), got {endpoint!r}")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self._credentials = (access_key_id, secret_access_key)
        self._force_path_style = force_path_style
        self._verify = verify
        self._timeouts = (connect_timeout, read_timeout)
        self._max_attempts = max_attempts
        self._max_concurrency = max_concurrency
        self._limit = asyncio.Semaphore(max_concurrency)
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region, signature_version="s3v4",
            s3={"addressing_style": "path" if self._force_path_style else "auto"},
            connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
            retries={"max_attempts": self._max_attempts, "mode": "standard"},
            max_pool_connections=self._max_concurrency)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self._credentials[0],
            aws_secret_access_key=self._credentials[1], config=config, verify=self._verify)

    async def _call(self, op: str, **kwargs: Any) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await asyncio.to_thread(self._make_client)
        async with self._limit:
            return await asyncio.to_thread(_call_s3, self._client, op, kwargs)

    def _sse(self, tenant_key: bytes) -> dict[str, Any]:
        # boto3 base64-encodes the key and adds SSECustomerKeyMD5 itself.
        return {"SSECustomerAlgorithm": "AES256",
                "SSECustomerKey": _check_tenant_key(tenant_key)}

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        try:
            await self._call("head_bucket", Bucket=self.bucket)
            return
        except NotFound:
            pass
        args: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self._call("create_bucket", **args)
        except _BucketExists:
            pass

    async def put_many(self, items: list[tuple[str, bytes, bytes]]) -> None:
        """Put several (key, data, tenant_key) blobs concurrently (within max_concurrency)."""
        await asyncio.gather(*(self.put(k, d, tenant_key=t) for k, d, t in items))

    async def put(self, key: str, data: bytes, *, tenant_key: bytes) -> None:
        args = {"Bucket": self.bucket, "Key": validate_key(key), "Body": bytes(data),
                **self._sse(tenant_key)}
        try:
            await self._call("put_object", **args)
        except _NoSuchBucket:
            await self.ensure_bucket()
            await self._call("put_object", **args)

    async def get(self, key: str, *, tenant_key: bytes) -> bytes:
        return await self._call("get_object", Bucket=self.bucket, Key=validate_key(key),
                                **self._sse(tenant_key))

    async def delete(self, key: str) -> None:
        try:
            await self._call("delete_object", Bucket=self.bucket, Key=validate_key(key))
        except NotFound:
            return

    async def delete_prefix(self, prefix: str) -> int:
        exact = validate_prefix(prefix)
        count = 0
        while True:  # list from the start each round: what was listed is then deleted
            try:
                page = await self._call("list_objects_v2", Bucket=self.bucket, Prefix=prefix,
                                        MaxKeys=1 if exact else 1000)
            except NotFound:
                return count
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])
                    if not exact or obj["Key"] == prefix]
            if not keys:
                return count
            done = await self._call("delete_objects", Bucket=self.bucket,
                                    Delete={"Objects": keys, "Quiet": True})
            if done.get("Errors"):
                first = done["Errors"][0]
                raise StorageUnavailable(f"S3 could not delete {first.get('Key')}: "
                                         f"{first.get('Code')} {first.get('Message')}")
            count += len(keys)
            if exact or not page.get("IsTruncated"):
                return count

    async def exists(self, key: str, *, tenant_key: bytes | None = None) -> bool:
        """Whether `key` is stored. With `tenant_key`: a HEAD with SSE-C, so a key that does
        not open it raises DecryptionFailed. Without: a listing (a HEAD without the SSE-C key
        of an SSE-C object is an error, not an answer)."""
        validate_key(key)
        if tenant_key is not None:
            try:
                await self._call("head_object", Bucket=self.bucket, Key=key,
                                 **self._sse(tenant_key))
            except NotFound:
                return False
            return True
        try:
            page = await self._call("list_objects_v2", Bucket=self.bucket, Prefix=key,
                                    MaxKeys=1)
        except NotFound:
            return False
        # Keys list in UTF-8 order, so an exact match comes before longer keys.
        contents = page.get("Contents", [])
        return bool(contents) and contents[0]["Key"] == key

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


class _NoSuchBucket(NotFound):
    pass


class _BucketExists(StorageUnavailable):
    pass


def _call_s3(client: Any, op: str, kwargs: dict[str, Any]) -> Any:
    """One boto3 call (in a worker thread), its errors mapped onto ours."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        result = getattr(client, op)(**kwargs)
        if op == "get_object":
            with result["Body"] as body:
                return body.read()
        return result
    except ClientError as exc:
        raise _map_client_error(exc, op, kwargs) from exc
    except BotoCoreError as exc:
        # Connection refused/reset, timeouts, bad checksums, truncated bodies.
        raise StorageUnavailable(f"S3 {op} failed: {exc}") from exc


def _map_client_error(exc: Any, op: str, kwargs: dict[str, Any]) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    what = f"{kwargs.get('Bucket')}/{kwargs.get('Key', '')}"
    message = f"S3 {op} {what}: {code} {error.get('Message', '')}".strip()
    if code == "NoSuchBucket" or (op == "head_bucket" and status == 404):
        return _NoSuchBucket(message)
    if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
        return _BucketExists(message)
    if code in ("NoSuchKey", "NotFound") or status == 404:
        return NotFound(message)
    if "SSECustomerKey" in kwargs and _sse_key_mismatch(op, status, code, error):
        return DecryptionFailed(f"{message}: the tenant key does not open this object")
    return StorageUnavailable(message)


def _sse_key_mismatch(op: str, status: int, code: str, error: dict[str, Any]) -> bool:
    """Whether an SSE-C read failed because of the key: another key -> 403 AccessDenied, an
    object stored without SSE-C -> 400 InvalidRequest. HEAD replies have no body, so there the
    status alone decides; a GET says more (an IAM denial, SSE-C over plain HTTP to AWS)."""
    if op == "head_object":
        return status in (400, 403)
    if op != "get_object":
        return False
    text = str(error.get("Message", "")).lower()
    if "secure connection" in text:
        return False
    if status == 403:
        return code == "AccessDenied" and "key" in text
    return status == 400 and code == "InvalidRequest" and "encryption" in text


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
