"""Blob key layout for inbound mail, the argument checks every blob store shares (keys,
prefixes, tenant keys) and how a batch put settles when part of it fails (`put_batch`). Does
no I/O itself; the stores are in inbox.storage.blobs (local directory) and
inbox.storage.s3blobs (S3).

Key layout (every component is one of our own ids, [A-Za-z0-9._-], never "." and never
containing ".."; our ids have no dots at all, MIME paths single ones):

    msg/{org}/{mailbox}/{message_id}.eml            the raw message
    att/{org}/{mailbox}/{message_id}/{part_id}      an attachment
    part/{org}/{mailbox}/{message_id}/{mime_path}   a MIME part, mime_path like "1.2.3"
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from inbox.errors import ValidationError
from inbox.storage.envelope import KEY_LEN

log = logging.getLogger(__name__)

_COMPONENT = re.compile(r"[A-Za-z0-9._-]{1,200}")
# kind -> number of path segments after the kind; the last segment of msg keys ends ".eml".
_SHAPES = {"msg": 3, "att": 4, "part": 4}


def _component(value: object, what: str) -> str:
    """`value` if it is a key component: [A-Za-z0-9._-]{1,200}, not "." and without "..";
    ValidationError otherwise. No separator, no parent reference, nothing a path or an S3
    console would read as one."""
    if (not isinstance(value, str) or not _COMPONENT.fullmatch(value) or value == "."
            or ".." in value):
        raise ValidationError(f"invalid {what} for a blob key: {value!r}", field=[what])
    return value


def message_key(org: str, mailbox: str, message_id: str) -> str:
    """`msg/{org}/{mailbox}/{message_id}.eml`."""
    # The last component is checked with its ".eml" ("x." would make "x..eml").
    last = _component(f"{_component(message_id, 'message_id')}.eml", "message_id")
    return f"msg/{_component(org, 'org')}/{_component(mailbox, 'mailbox')}/{last}"


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


def check_tenant_key(tenant_key: bytes) -> bytes:
    """`tenant_key` if it is a 32-byte key; ValidationError otherwise."""
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


async def delete_message(store: BlobStore, org: str, mailbox: str, message_id: str) -> int:
    """Delete the message and its attachments and parts; returns how many blobs went."""
    count = 0
    for prefix in message_prefixes(org, mailbox, message_id):
        count += await store.delete_prefix(prefix)
    return count


async def finish_all(aws: list[Awaitable[Any]]) -> tuple[list[Any], bool]:
    """Run `aws` concurrently and return only once every one has finished: each one's result
    or exception, in order, and whether the caller was cancelled meanwhile (it then re-raises
    the cancellation itself, after its clean-up).

    Not asyncio.gather: that returns at the first exception (or cancellation) while the others
    run on, and a blocking call in a worker thread cannot be cancelled at all, so a failed
    batch put went on writing blobs after its caller had deleted the batch's keys.
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    cancelled = False
    while tasks:
        try:
            await asyncio.wait(tasks)  # never cancels the tasks, even when cancelled itself
            break
        except asyncio.CancelledError:
            cancelled = True
    return [asyncio.CancelledError() if t.cancelled() else t.exception() or t.result()
            for t in tasks], cancelled


async def put_batch(keys: list[str], puts: list[Awaitable[Any]],
                    delete: Callable[[str], Awaitable[Any]]) -> list[Any]:
    """Await `puts` (concurrently) that write the blobs `keys`; their results if every one
    succeeded.

    Otherwise, once every put has finished, every one of `keys` is deleted (a failed put may
    still have stored its object, e.g. an S3 reply lost to a timeout) and the first error is
    raised (the cancellation, if the caller was cancelled). So when this raises, nothing of
    the batch is stored and nothing is still being written.
    """
    results, cancelled = await finish_all(puts)
    failed = [r for r in results if isinstance(r, BaseException)]
    if not failed and not cancelled:
        return results
    await remove_all(keys, delete)
    if cancelled:
        raise asyncio.CancelledError
    raise failed[0]


async def remove_all(keys: list[str], delete: Callable[[str], Awaitable[Any]]) -> None:
    """Delete `keys` concurrently and wait for all; a delete that fails is logged (the caller
    may try again), not raised."""
    results, cancelled = await finish_all([delete(k) for k in keys])
    for key, result in zip(keys, results, strict=True):
        if isinstance(result, Exception):
            log.warning("could not delete blob %s of a failed put", key, exc_info=result)
    if cancelled:
        raise asyncio.CancelledError
