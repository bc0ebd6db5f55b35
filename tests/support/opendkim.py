"""OpenDKIM's `opendkim-testmsg` as an independent DKIM verifier for tests.

opendkim-testmsg always asks the system resolver, so it runs inside a private user+mount+net
namespace with 127.0.0.1 bind-mounted over /etc/resolv.conf and a tiny DNS server serving the
given TXT records. Nothing outside the namespace is touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_CHILD = r'''
import fcntl, json, socket, struct, subprocess, sys, threading
import dns.message, dns.rcode, dns.rdatatype, dns.rrset

def loopback_up():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS IFF_UP

def serve(sock, records):
    while True:
        data, peer = sock.recvfrom(4096)
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        question = query.question[0]
        txt = records.get(question.name.to_text().lower())
        if txt is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT:
            strings = " ".join('"%s"' % txt[i:i + 255] for i in range(0, len(txt), 255))
            reply.answer.append(dns.rrset.from_text(question.name, 60, "IN", "TXT", strings))
        sock.sendto(reply.to_wire(), peer)

records_path, resolv_conf, binary, *messages = sys.argv[1:]
loopback_up()
subprocess.run(["mount", "--bind", resolv_conf, "/etc/resolv.conf"], check=True)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 53))
with open(records_path) as fh:
    threading.Thread(target=serve, args=(sock, json.load(fh)), daemon=True).start()
results = []
for path in messages:
    with open(path, "rb") as fh:
        done = subprocess.run([binary], stdin=fh, capture_output=True, timeout=30)
    results.append({"rc": done.returncode, "stderr": done.stderr.decode(errors="replace")})
print(json.dumps(results))
'''

_NAMESPACE = ["unshare", "--user", "--map-root-user", "--mount", "--net"]


def _opendkim_testmsg() -> str:
    binary = shutil.which("opendkim-testmsg") or shutil.which("opendkim-testmsg",
                                                              path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.skip("opendkim-testmsg is not installed (apt-get install opendkim-tools)")
    probe = subprocess.run([*_NAMESPACE, "mount", "--bind", "/dev/null", "/dev/null"],
                           capture_output=True, timeout=30) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip() if probe else "no unshare"
        pytest.skip(f"opendkim-testmsg needs a private user+net namespace here: {reason}")
    return binary


def opendkim_testmsg() -> str:
    """The binary, or skip (with the reason) where it or namespaces are unavailable."""
    return _opendkim_testmsg()


def opendkim_verify(tmp_path: Path, records: dict[str, str], messages: list[bytes]
                    ) -> list[dict[str, Any]]:
    """Verify each message; `records` maps 'name.' (with the dot) to TXT text.
    Returns per message {"rc": exit code, "stderr": text} (rc 0 and no stderr = pass)."""
    binary = opendkim_testmsg()
    paths = []
    for i, data in enumerate(messages):
        paths.append(tmp_path / f"opendkim-{i}.eml")
        paths[-1].write_bytes(data)
    (tmp_path / "records.json").write_text(json.dumps({k.lower(): v for k, v in records.items()}))
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    (tmp_path / "child.py").write_text(_CHILD)
    done = subprocess.run(
        [*_NAMESPACE, sys.executable, str(tmp_path / "child.py"), str(tmp_path / "records.json"),
         str(tmp_path / "resolv.conf"), binary, *map(str, paths)],
        capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)
