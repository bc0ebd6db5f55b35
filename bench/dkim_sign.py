"""Micro-benchmark: DKIM signatures per second for a 2 KB message (RSA-2048, Ed25519, both).

Run: python bench/dkim_sign.py [seconds per case]. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inbox.delivery.signing import DkimSigner  # noqa: E402
from inbox.tenancy.keys import generate_dkim_keys  # noqa: E402


def message(size: int = 2048) -> bytes:
    head = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
            b"Subject: Your receipt\r\nDate: Mon, 06 May 2024 07:08:09 +0000\r\n"
            b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=\"utf-8\"\r\n\r\n")
    line = b"Thank you for your order. Your receipt follows below.\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[:size - len(head) - 2] + b"\r\n"


def per_second(signer: DkimSigner, raw: bytes, seconds: float) -> float:
    signer.sign(raw)  # warm up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            signer.sign(raw)
        count += 20
    return round(count / elapsed, 1)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    keys = generate_dkim_keys()
    raw = message()
    rsa = DkimSigner("example.com", "rsa1", keys.rsa_private_pem)
    ed = DkimSigner("example.com", None, None, "ed1", keys.ed25519_private_b64)
    both = DkimSigner("example.com", "rsa1", keys.rsa_private_pem, "ed1",
                      keys.ed25519_private_b64)
    print(json.dumps({"rsa_per_s": per_second(rsa, raw, seconds),
                      "ed25519_per_s": per_second(ed, raw, seconds),
                      "dual_per_s": per_second(both, raw, seconds)}))


if __name__ == "__main__":
    main()
