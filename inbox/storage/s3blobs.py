"""S3 blob store: blobs in a bucket under SSE-C, so each object is encrypted with its
organization's key (AWS keeps only a salted HMAC of it; LocalStack, used in tests, checks the key
but stores plaintext). boto3 errors are mapped onto ours. Key layout: inbox.storage.blobkeys.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from inbox.errors import ConfigError, NotFound, StorageUnavailable
from inbox.storage.blobkeys import check_tenant_key, put_batch, validate_key, validate_prefix
from inbox.storage.envelope import DecryptionFailed

__all__ = ["S3BlobStore"]


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
                "SSECustomerKey": check_tenant_key(tenant_key)}

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
        """Put several (key, data, tenant_key) blobs concurrently (within max_concurrency). If
        it raises, every put has finished and none of the batch's objects is left."""
        await put_batch([k for k, _, _ in items],
                        [self.put(k, d, tenant_key=t) for k, d, t in items], self.delete)

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
