"""Blob stores: the key layout, and the same behaviours from the local directory store and from
S3 with SSE-C against a real LocalStack on 127.0.0.1 (which enforces SSE-C; moto does not)."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.errors import ConfigError, NotFound, StorageUnavailable, ValidationError
from inbox.storage.blobs import (
    DecryptionFailed,
    LocalBlobStore,
    S3BlobStore,
    attachment_key,
    build_blob_store,
    delete_message,
    message_key,
    message_prefixes,
    part_key,
    validate_key,
    validate_prefix,
)
from inbox.storage.db import new_id
from inbox.storage.mimeparse import parse_inbound
from tests.support.fixtures_smtp import refused_port
from tests.support.localstack import LocalStack

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
RAW = b"Subject: hello\r\n\r\nthe PLAINTEXT-MARKER body\r\n"

# --- key layout -------------------------------------------------------------------------------

GOOD_KEYS = [
    ("message", message_key, ("org_1", "mb-2", "im.3"), "msg/org_1/mb-2/im.3.eml"),
    ("attachment", attachment_key, ("o", "m", "id", "p1"), "att/o/m/id/p1"),
    ("part", part_key, ("o", "m", "id", "1.2.3"), "part/o/m/id/1.2.3"),
    ("single dots inside", part_key, ("o", "m", "a.b", ".1.2-"), "part/o/m/a.b/.1.2-"),
]


@pytest.mark.parametrize(("build", "args", "want"), [g[1:] for g in GOOD_KEYS],
                         ids=[g[0] for g in GOOD_KEYS])
def test_key_layout(build, args: tuple[str, ...], want: str) -> None:
    assert build(*args) == want
    assert validate_key(want) == want


# No component may contain ".." (issue 3), not only be it: "a..b" and "..." were accepted.
BAD_COMPONENTS = ["", ".", "..", "a..b", "...", "..a", "a..", "a/b", "/", "a\\b", "a\x00b",
                  "a\nb", "a\tb", "a b", "é", "a:b", "%2e%2e", "x" * 201, None]


@pytest.mark.parametrize("bad", BAD_COMPONENTS, ids=[repr(b)[:12] for b in BAD_COMPONENTS])
@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_bad_component_rejected(bad: Any, position: int) -> None:
    args = ["org", "mb", "mid", "p1"]
    args[position] = bad
    with pytest.raises(ValidationError):
        attachment_key(*args)
    with pytest.raises(ValidationError):
        part_key(*args)
    if position < 3:
        with pytest.raises(ValidationError):
            message_key(*args[:3])
        with pytest.raises(ValidationError):
            message_prefixes(*args[:3])


BAD_KEYS = ["", "msg", "msg/o/m/x", "msg/o/m/x.eml/y", "att/o/m/x", "part/o/m/x/1/2",
            "other/o/m/x.eml", "msg/../m/x.eml", "msg/o//x.eml", "/msg/o/m/x.eml",
            "att/o/m/x/..", "msg/o/m/x.eml/", "att/o/m/a..b/p", "part/o/m/x/1..2",
            "msg/o/m/x..eml", "msg/o/m/...eml", "att/o..p/m/x/p"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=BAD_KEYS)
def test_bad_key_shape_rejected(key: str) -> None:
    with pytest.raises(ValidationError):
        validate_key(key)


PREFIXES = [("att/o/m/x/", False), ("msg/o/", False), ("part/o/m/", False),
            ("msg/o/m/x.eml", True), ("att/o/m/x/p", True)]
BAD_PREFIXES = ["", "/", "msg/", "msg", "msg/o", "att/o/m/x/p/", "zzz/o/", "msg/../",
                "msg/o/m/x", "att/o/a..b/", "msg/..o/", "att/o/m/x/p..q"]


@pytest.mark.parametrize(("prefix", "exact"), PREFIXES, ids=[p for p, _ in PREFIXES])
def test_prefixes(prefix: str, exact: bool) -> None:
    assert validate_prefix(prefix) is exact


@pytest.mark.parametrize("prefix", BAD_PREFIXES, ids=[repr(p) for p in BAD_PREFIXES])
def test_bad_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ValidationError):
        validate_prefix(prefix)


def test_message_id_may_not_end_in_a_dot() -> None:
    # Its key's last component would be "x..eml".
    with pytest.raises(ValidationError):
        message_key("o", "m", "x.")
    with pytest.raises(ValidationError):
        message_prefixes("o", "m", "x.")


def test_our_own_ids_make_valid_keys() -> None:
    """What goes into keys is ours: organization, mailbox and message ids from new_id (no dots
    at all), part ids "a<n>" and MIME paths "1.2.3" from the parser (single dots), never a
    sender's Message-ID or filename."""
    ids = [new_id(prefix) for prefix in ("org", "mbx", "im") for _ in range(50)]
    assert all(re.fullmatch(r"[a-z]+_[0-9a-z]+", i) for i in ids)
    nested = EmailMessage()
    nested["From"] = "a@example.com"
    nested["Message-ID"] = "<../../etc/passwd@x..y>"
    nested.set_content("body")
    nested.add_alternative("<p>body</p>", subtype="html")
    for n in range(12):
        nested.add_attachment(b"x" * n, maintype="application", subtype="octet-stream",
                              filename=f"../../{n}..pdf")
    inner = EmailMessage()
    inner.set_content("inner")
    inner.add_attachment(b"deep", maintype="application", subtype="pdf", filename="..")
    nested.attach(inner)
    parsed = parse_inbound(bytes(nested), keep_parts=True)
    org, mailbox, mid = ids[0], ids[50], ids[100]
    paths = [path for path, _, _ in parsed.parts]
    assert len(parsed.attachments) == 13 and "1.14.2" in paths
    keys = [message_key(org, mailbox, mid)]
    keys += [attachment_key(org, mailbox, mid, a.part_id) for a in parsed.attachments]
    keys += [part_key(org, mailbox, mid, path) for path in paths]
    for key in keys:
        assert validate_key(key) == key and ".." not in key


def test_message_prefixes_cover_one_message_only() -> None:
    assert message_prefixes("o", "m", "x") == ["msg/o/m/x.eml", "att/o/m/x/", "part/o/m/x/"]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(st.text(min_size=0, max_size=12),
                                 st.text(alphabet="ab._-/", max_size=8)),
                       min_size=4, max_size=4))
def test_built_keys_never_escape(parts: list[str]) -> None:
    for kind, build, args in (("msg", message_key, parts[:3]),
                              ("att", attachment_key, parts), ("part", part_key, parts)):
        try:
            key = build(*args)
        except ValidationError:
            continue
        segments = key.split("/")
        assert segments[0] == kind and len(segments) == (4 if kind == "msg" else 5)
        assert not {".", "..", ""} & set(segments) and ".." not in key
        assert "\\" not in key and "\x00" not in key and key.isascii() and key.isprintable()
        assert validate_key(key) == key
        base = os.path.realpath("/srv/blobs")
        assert os.path.realpath(os.path.join(base, key)).startswith(base + "/")
        try:  # an id may make a valid attachment key but no message key ("0." + ".eml")
            prefixes = message_prefixes(*parts[:3])
        except ValidationError:
            continue
        for prefix in prefixes:
            assert prefix.startswith(("msg/", "att/", "part/"))
            validate_prefix(prefix)


# --- both stores ------------------------------------------------------------------------------


def s3_store(server: LocalStack, **options: Any) -> S3BlobStore:
    return S3BlobStore(server.endpoint, f"t-{uuid.uuid4().hex[:12]}", "test", "test",
                       "us-east-1", True, **options)


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "local":
        made: Any = LocalBlobStore(tmp_path / "blobs")
    else:
        made = s3_store(request.getfixturevalue("localstack"))
    try:
        yield made
    finally:
        await made.close()


async def test_put_get_round_trip(store: Any) -> None:
    key = message_key("o", "m", "x")
    await store.put(key, RAW, tenant_key=KEY_A)
    assert await store.get(key, tenant_key=KEY_A) == RAW
    assert await store.exists(key) and await store.exists(key, tenant_key=KEY_A)
    await store.put(key, b"replaced", tenant_key=KEY_A)
    assert await store.get(key, tenant_key=KEY_A) == b"replaced"


async def test_large_and_empty_blobs(store: Any) -> None:
    big = os.urandom(3 * 1024 * 1024 + 7)
    await store.put(attachment_key("o", "m", "x", "big"), big, tenant_key=KEY_A)
    await store.put(attachment_key("o", "m", "x", "empty"), b"", tenant_key=KEY_A)
    assert await store.get(attachment_key("o", "m", "x", "big"), tenant_key=KEY_A) == big
    assert await store.get(attachment_key("o", "m", "x", "empty"), tenant_key=KEY_A) == b""


async def test_another_tenants_key_fails(store: Any) -> None:
    key = message_key("o", "m", "x")
    await store.put(key, RAW, tenant_key=KEY_A)
    with pytest.raises(DecryptionFailed):
        await store.get(key, tenant_key=KEY_B)
    with pytest.raises(DecryptionFailed):
        await store.exists(key, tenant_key=KEY_B)


async def test_missing_blob_is_not_found(store: Any) -> None:
    key = message_key("o", "m", "absent")
    with pytest.raises(NotFound):
        await store.get(key, tenant_key=KEY_A)
    assert not await store.exists(key)
    assert not await store.exists(key, tenant_key=KEY_A)
    await store.delete(key)  # idempotent
    assert await store.delete_prefix("att/o/m/absent/") == 0


async def test_delete_and_delete_prefix(store: Any) -> None:
    keys = [message_key("o", "m", "x"), attachment_key("o", "m", "x", "a1"),
            attachment_key("o", "m", "x", "a2"), part_key("o", "m", "x", "1.2")]
    # Neighbours that a sloppy prefix would also hit: x.emlx, xy, another mailbox.
    others = [message_key("o", "m", "x.emlx"), attachment_key("o", "m", "xy", "a1"),
              message_key("o", "m2", "x"), part_key("o2", "m", "x", "1.2")]
    await asyncio.gather(*(store.put(k, RAW, tenant_key=KEY_A) for k in keys + others))
    assert await delete_message(store, "o", "m", "x") == 4
    for key in keys:
        assert not await store.exists(key)
    for key in others:
        assert await store.get(key, tenant_key=KEY_A) == RAW
    assert await delete_message(store, "o", "m", "x") == 0
    await store.delete(others[0])
    await store.delete(others[0])
    assert not await store.exists(others[0])
    assert await store.delete_prefix("msg/o/") == 1  # x.emlx was deleted; m2/x.eml remains


async def test_many_concurrent_puts(store: Any) -> None:
    keys = [attachment_key("o", "m", "x", f"p{i}") for i in range(24)]
    await asyncio.gather(*(store.put(k, k.encode(), tenant_key=KEY_A) for k in keys))
    got = await asyncio.gather(*(store.get(k, tenant_key=KEY_A) for k in keys))
    assert got == [k.encode() for k in keys]
    assert await store.delete_prefix("att/o/m/") == 24


SLOW_SECS = 0.4


def inject_faults(store: Any) -> None:
    """Fault injection on a real store: a put of a key ending "fail" fails at once, one ending
    "slow" is written (for real) only after SLOW_SECS."""
    if isinstance(store, LocalBlobStore):
        write = store._write  # runs in a worker thread, as a real write does

        def faulty_write(key: str, data: bytes, tenant_key: bytes) -> Path:
            if key.endswith("fail"):
                raise OSError(5, "Input/output error")
            if key.endswith("slow"):
                time.sleep(SLOW_SECS)
            return write(key, data, tenant_key)

        store._write = faulty_write  # type: ignore[method-assign]
    else:
        put = store.put

        async def faulty_put(key: str, data: bytes, *, tenant_key: bytes) -> None:
            if key.endswith("fail"):
                raise StorageUnavailable("S3 put_object: InternalError")
            if key.endswith("slow"):
                await asyncio.sleep(SLOW_SECS)
            await put(key, data, tenant_key=tenant_key)

        store.put = faulty_put


async def test_failed_put_many_leaves_no_blob(store: Any) -> None:
    """One write of a batch fails at once while another is still being written: put_many
    raises only after every write has finished, and leaves none of the batch behind, even
    when the caller deletes the batch's keys right away (as MailStore does)."""
    inject_faults(store)
    keys = [attachment_key("o", "m", "x", p) for p in ("slow", "ok", "fail", "ok2")]
    with pytest.raises(StorageUnavailable):
        await store.put_many([(k, RAW, KEY_A) for k in keys])
    assert [await store.exists(k) for k in keys] == [False] * 4
    for key in keys:  # the caller's clean-up
        await store.delete(key)
    await asyncio.sleep(SLOW_SECS + 0.3)  # a write still running would land by now
    assert [await store.exists(k) for k in keys] == [False] * 4
    if isinstance(store, LocalBlobStore):
        assert files_under(store.root) == []
    # The store keeps working.
    await store.put_many([(attachment_key("o", "m", "y", "p1"), RAW, KEY_A)])
    assert await store.get(attachment_key("o", "m", "y", "p1"), tenant_key=KEY_A) == RAW


async def test_cancelled_put_many_waits_for_its_writes(tmp_path: Path) -> None:
    """Cancelled mid-batch (a write still in its thread, which cannot be stopped), put_many
    re-raises the cancellation only after that write has finished and been removed."""
    store = LocalBlobStore(tmp_path)
    inject_faults(store)
    keys = [attachment_key("o", "m", "x", p) for p in ("slow", "ok")]
    task = asyncio.ensure_future(store.put_many([(k, RAW, KEY_A) for k in keys]))
    await asyncio.sleep(SLOW_SECS / 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(tmp_path) == []
    await asyncio.sleep(SLOW_SECS)
    assert files_under(tmp_path) == []


BAD_CALLS = [
    ("bad key", lambda s: s.put("msg/../x.eml", b"", tenant_key=KEY_A)),
    ("short tenant key", lambda s: s.put(message_key("o", "m", "x"), b"", tenant_key=b"k")),
    ("str tenant key", lambda s: s.get(message_key("o", "m", "x"), tenant_key="k" * 32)),
    ("empty prefix", lambda s: s.delete_prefix("")),
    ("kind-wide prefix", lambda s: s.delete_prefix("msg/")),
]


@pytest.mark.parametrize("call", [c for _, c in BAD_CALLS], ids=[i for i, _ in BAD_CALLS])
async def test_bad_arguments_rejected(store: Any, call) -> None:
    with pytest.raises(ValidationError):
        await call(store)


# --- local only -------------------------------------------------------------------------------


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def test_local_files_are_encrypted_private_and_atomic(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    keys = [message_key("o", "m", f"x{i}") for i in range(10)]
    await asyncio.gather(*(store.put(k, RAW, tenant_key=KEY_A) for k in keys))
    files = files_under(tmp_path / "blobs")
    assert sorted(str(p.relative_to(tmp_path / "blobs")) for p in files) == sorted(keys)
    for path in files:
        content = path.read_bytes()
        assert b"PLAINTEXT-MARKER" not in content and content[:4] == b"IXB\x01"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "blobs" / "msg" / "o").stat().st_mode) == 0o700
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


async def test_local_blob_moved_to_another_key_fails(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    await store.put(message_key("o", "m", "x"), RAW, tenant_key=KEY_A)
    target = tmp_path / "msg" / "o" / "m" / "y.eml"
    target.write_bytes((tmp_path / "msg" / "o" / "m" / "x.eml").read_bytes())
    with pytest.raises(DecryptionFailed):
        await store.get(message_key("o", "m", "y"), tenant_key=KEY_A)


async def test_local_crash_leftovers_are_never_blobs(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    await store.put(message_key("o", "m", "x"), RAW, tenant_key=KEY_A)
    (tmp_path / ".tmp" / "dead.tmp").write_bytes(b"half a blob")  # as a crash mid-put leaves
    assert not await store.exists(message_key("o", "m", "dead"))
    assert await store.remove_stale_temp() == 1
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert await store.get(message_key("o", "m", "x"), tenant_key=KEY_A) == RAW


async def test_local_failed_put_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    (tmp_path / "msg").write_bytes(b"not a directory")
    with pytest.raises(StorageUnavailable):
        await store.put(message_key("o", "m", "x"), RAW, tenant_key=KEY_A)
    assert [p.name for p in files_under(tmp_path)] == ["msg"]
    assert not (tmp_path / ".tmp").exists() or list((tmp_path / ".tmp").iterdir()) == []


# --- S3 only ----------------------------------------------------------------------------------


def raw_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test",
                        config=Config(s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}))


def sse(key: bytes) -> dict[str, Any]:
    return {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}


RAW_READS = [
    ("get without key", "get_object", {}, 400),
    ("get with another key", "get_object", sse(KEY_B), 403),
    ("head without key", "head_object", {}, 400),
    ("head with another key", "head_object", sse(KEY_B), 403),
    ("get with the key", "get_object", sse(KEY_A), 200),
    ("head with the key", "head_object", sse(KEY_A), 200),
]


@pytest.mark.parametrize(("op", "extra", "status"), [r[1:] for r in RAW_READS],
                         ids=[r[0] for r in RAW_READS])
async def test_s3_object_needs_the_tenant_key(localstack: LocalStack, op: str,
                                              extra: dict[str, Any], status: int) -> None:
    store = s3_store(localstack)
    key = message_key("o", "m", "x")
    await store.put(key, RAW, tenant_key=KEY_A)  # also creates the bucket
    await store.close()
    client = raw_client(localstack.endpoint)
    try:
        reply = getattr(client, op)(Bucket=store.bucket, Key=key, **extra)
        got = reply["ResponseMetadata"]["HTTPStatusCode"]
        assert reply["SSECustomerAlgorithm"] == "AES256"
        if op == "get_object":
            assert reply["Body"].read() == RAW
    except ClientError as exc:
        got = exc.response["ResponseMetadata"]["HTTPStatusCode"]
    finally:
        client.close()
    assert got == status


async def test_s3_over_https(localstack: LocalStack) -> None:
    cert = localstack.workdir / "fs/var/lib/localstack/cache/server.test.pem.crt"
    # LocalStack's self-signed certificate names "localhost" (its 127.0.0.1 SAN is malformed).
    store = S3BlobStore(f"https://localhost:{localstack.port}", f"t-{uuid.uuid4().hex[:12]}",
                        "test", "test", force_path_style=True, verify=str(cert))
    try:
        await store.put(message_key("o", "m", "x"), RAW, tenant_key=KEY_A)
        assert await store.get(message_key("o", "m", "x"), tenant_key=KEY_A) == RAW
        with pytest.raises(DecryptionFailed):
            await store.get(message_key("o", "m", "x"), tenant_key=KEY_B)
    finally:
        await store.close()


async def test_s3_unreachable_is_temporary(refused_port: int) -> None:  # noqa: F811
    store = S3BlobStore(f"http://127.0.0.1:{refused_port}", "bucket", "test", "test",
                        force_path_style=True, max_attempts=1, connect_timeout=2)
    try:
        for call in (store.put(message_key("o", "m", "x"), RAW, tenant_key=KEY_A),
                     store.get(message_key("o", "m", "x"), tenant_key=KEY_A),
                     store.delete_prefix("att/o/m/x/"), store.exists(message_key("o", "m", "x"))):
            with pytest.raises(StorageUnavailable) as info:
                await call
            assert info.value.temporary and info.value.smtp_reply().startswith("451 4.")
    finally:
        await store.close()


async def test_s3_ensure_bucket_is_idempotent(localstack: LocalStack) -> None:
    store = s3_store(localstack)
    try:
        await store.ensure_bucket()
        await store.ensure_bucket()
        assert not await store.exists(message_key("o", "m", "x"))
    finally:
        await store.close()


@pytest.mark.parametrize("endpoint", ["http://s3.example.com", "ftp://127.0.0.1", "nonsense"])
def test_s3_refuses_insecure_or_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ConfigError):
        S3BlobStore(endpoint, "b", "k", "s")


def test_s3_plain_http_allowed_when_asked() -> None:
    S3BlobStore("http://minio:9000", "b", "k", "s", allow_http=True)


S3_SETTINGS = {"endpoint": "https://s3.example.com", "bucket": "b", "access_key_id": "k",
               "secret_access_key": "s"}
CHOICES = [
    ("all S3 settings", S3_SETTINGS, S3BlobStore),
    ("no S3 settings", dict.fromkeys(S3_SETTINGS), LocalBlobStore),
    ("empty S3 settings", dict.fromkeys(S3_SETTINGS, ""), LocalBlobStore),
    ("no bucket", {**S3_SETTINGS, "bucket": None}, ConfigError),
    ("no secret", {**S3_SETTINGS, "secret_access_key": ""}, ConfigError),
]


@pytest.mark.parametrize(("values", "want"), [c[1:] for c in CHOICES],
                         ids=[c[0] for c in CHOICES])
def test_build_blob_store(tmp_path: Path, values: dict[str, Any], want: type) -> None:
    def build() -> Any:
        return build_blob_store(**values, region="eu-west-1", force_path_style=False,
                                local_dir=tmp_path)

    if issubclass(want, Exception):
        with pytest.raises(want, match="S3_"):
            build()
    else:
        made = build()
        assert isinstance(made, want)
        if isinstance(made, S3BlobStore):
            assert made.region == "eu-west-1" and made.bucket == "b"
