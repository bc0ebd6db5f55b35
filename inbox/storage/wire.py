"""The SurrealDB RPC wire format (CBOR with SurrealDB's tags), by cbor2's C extension.

The SDK encodes and decodes CBOR with a vendored pure-Python copy of cbor2, and validates every
query payload with pydantic on the way: ~10% of all server CPU in the send benchmark, spent while
the event loop could do nothing else. The same bytes come from cbor2's C extension for a fraction
of that. What SurrealDB's variant needs on top of plain CBOR (https://surrealdb.com/docs/surrealdb/
integration/cbor) is done here:

* Python None is NONE, tag 6 around null (plain null would be NULL, a different value: `$x !=
  NONE` is true for NULL). The C encoder writes None natively as null and consults no hook for
  it, so values are walked once and None replaced by the tag first.
* RecordID is tag 8 `[table, id]`; Decimal tag 10 (string). Datetimes go as tag 0 (RFC 3339
  string; naive ones are taken as UTC), which SurrealDB accepts.
* Decoding: tag 6 → None, tag 8 → RecordID, tag 12 → datetime from [seconds, nanoseconds];
  every other SurrealDB tag goes to the SDK's own tag decoder. Tag 0 datetimes and tag 37 UUIDs
  are decoded by cbor2 itself.

tests/test_wire.py checks both directions against the SDK's encoder and decoder.
"""

from __future__ import annotations

import decimal
import io
import itertools
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
from surrealdb import RecordID
from surrealdb.cbor import CBORTag as SdkTag
from surrealdb.data.cbor import tag_decoder as sdk_tag_decoder

TAG_NONE = 6
TAG_RECORD_ID = 8
TAG_DECIMAL = 10
TAG_DATETIME_COMPACT = 12
_NONE = cbor2.CBORTag(TAG_NONE, None)
_ids = itertools.count(1)
_local = threading.local()


def unencodable(value: Any) -> list[str] | None:
    """Where in `value` (a str, or lists and dicts of them, as JSON gives) is text that cannot be
    encoded as UTF-8, which is what the wire sends: a lone surrogate, as JSON's "\\ud800" or
    Python's surrogateescape give. None if there is none; else the path to the first such
    string: list indexes and dict keys as text, and no step for a dict key that is itself
    bad. Other values (numbers, datetimes, enums) are not looked into.

    Cheap on ordinary text: `str.isascii()` reads a flag the string keeps, so only non-ASCII
    text is encoded to be sure."""
    kind = type(value)
    if kind is str:
        if value.isascii():
            return None
        try:
            value.encode()
        except UnicodeEncodeError:
            return []
        return None
    if kind is list or kind is tuple:
        for index, item in enumerate(value):
            if type(item) is str and item.isascii():
                continue
            inner = unencodable(item)
            if inner is not None:
                return [str(index), *inner]
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is str and not key.isascii() and unencodable(key) is not None:
                return []
            if type(item) is str and item.isascii():
                continue
            inner = unencodable(item)
            if inner is not None:
                return [str(key), *inner]
    return None


def _prepare(value: Any) -> Any:
    """`value` with None as the NONE tag and Decimal as tag 10, recursively."""
    kind = type(value)
    if kind is dict:
        return {k: _prepare(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_prepare(v) for v in value]
    if value is None:
        return _NONE
    if kind is RecordID:  # here rather than in `default`, a callback from C per value
        return cbor2.CBORTag(TAG_RECORD_ID, [value.table_name, _prepare(value.id)])
    if kind is decimal.Decimal:  # cbor2 would write tag 4 (a decimal fraction) itself
        return cbor2.CBORTag(TAG_DECIMAL, str(value))
    return value


def _default(encoder: Any, value: Any) -> None:
    if isinstance(value, RecordID):
        encoder.encode(cbor2.CBORTag(TAG_RECORD_ID, [value.table_name, _prepare(value.id)]))
    else:
        raise cbor2.CBOREncodeTypeError(f"cannot send a {type(value).__name__} to the database")


def encode(value: Any) -> bytes:
    # One encoder per thread, reused: `cbor2.dumps` sets up a new one each call, ~6 µs, more
    # than encoding a whole small request.
    encoder = getattr(_local, "encoder", None)
    if encoder is None:
        encoder = _local.encoder = cbor2.CBOREncoder(io.BytesIO(), default=_default,
                                                     timezone=UTC)
    return encoder.encode_to_bytes(_prepare(value))  # type: ignore[no-any-return]


def query_request(sql: str, params: dict[str, Any]) -> bytes:
    """One `query` RPC request, as the SDK's RequestMessage(QUERY) would encode it."""
    return encode({"id": str(next(_ids)), "method": "query", "params": [sql, params]})


def map_pairs(params: dict[str, Any]) -> bytes:
    """The key/value pairs of `params` encoded as a CBOR map, without the map's header: maps
    encoded apart and joined under one header (`query_request_pairs`) make one map."""
    encoded = encode(params)
    return encoded[_header_size(encoded[0]):]


def query_request_pairs(sql: str, pairs: list[bytes], count: int) -> bytes:
    """`query_request(sql, params)` where `params` is given as encoded pairs (`map_pairs`),
    `count` of them in all."""
    return b"".join([_REQUEST_HEAD, cbor2.dumps(str(next(_ids))), _METHOD_QUERY,
                     b"\x82", cbor2.dumps(sql), _map_header(count), *pairs])


def _header_size(initial: int) -> int:
    """Bytes in a CBOR map or array header from its initial byte (lengths are minimal)."""
    info = initial & 0x1F
    return 1 if info < 24 else 1 + (1 << (info - 24))


def _map_header(count: int) -> bytes:
    if count < 24:
        return bytes([0xA0 | count])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if count < 1 << (8 * size):
            return bytes([0xA0 | info]) + count.to_bytes(size, "big")
    raise ValueError(f"too many parameters: {count}")


_REQUEST_HEAD = b"\xa3" + cbor2.dumps("id")  # a map of three: id, method, params
_METHOD_QUERY = cbor2.dumps("method") + cbor2.dumps("query") + cbor2.dumps("params")


def _tag_hook(decoder: Any, tag: cbor2.CBORTag) -> Any:
    if tag.tag == TAG_NONE:
        return None
    if tag.tag == TAG_RECORD_ID:
        return RecordID(tag.value[0], tag.value[1])
    if tag.tag == TAG_DATETIME_COMPACT:
        seconds, nanos = (list(tag.value) + [0])[:2]
        return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=nanos // 1000)
    return sdk_tag_decoder(decoder, SdkTag(tag.tag, tag.value))


def decode(data: bytes) -> Any:
    return cbor2.loads(data, tag_hook=_tag_hook)
