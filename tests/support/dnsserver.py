"""A real, authoritative DNS server for tests: UDP and TCP on one 127.0.0.1 port, mutable zone.

It runs in its own thread, so it keeps answering while a test's event loop is blocked in an
`await`. Records live in memory and can be changed between (or during) lookups:

    server = DnsServer().start()
    server.add("example.test", "MX", "10 mx1.example.test.")
    server.add("mx1.example.test", "A", "127.0.0.1")
    server.add_txt("sel._domainkey.example.test", "v=DKIM1; k=rsa; p=" + key)
    ...
    server.stop()

Behaviour (RFC 1034 §4.3.2, RFC 1035, RFC 6891):
* answers with AA; NXDOMAIN when nothing exists at or below the name, NOERROR with an empty
  answer (and the enclosing SOA, if one was added) when the name exists without the type;
* a CNAME at the name is returned, followed by the target's records when they are in the store;
* UDP answers bigger than 512 bytes (no EDNS) or the client's EDNS payload size are truncated
  with TC set, so clients retry over TCP (RFC 7766); TCP answers up to 64 KiB;
* `set_servfail(name)` answers SERVFAIL, `set_silent(name)` never answers (client timeouts);
  `set_silent(name, missing_only=True)` stays silent only for types with no records there
  (the RFC 7208 test suite's "TIMEOUT" entries);
* `add_txt(..., rtype="SPF")` serves the same data as type SPF (99, RFC 4408 §3.1.1), and a
  list of strings is served as exactly those character-strings;
* `authenticated = True` sets the AD bit when the query had DO or AD, as a validating resolver
  would (RFC 6840 §5.7);
* `queries` records (transport, name, type) of every query received; `errors` holds the
  tracebacks of any bug hit while answering (the client got SERVFAIL).
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import textwrap
import threading
import traceback
from collections.abc import Iterable, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rrset
import dns.tokenizer
import dns.zone

HOST = "127.0.0.1"
MAX_UDP_NO_EDNS = 512  # RFC 1035 §4.2.1
MAX_STRING = 255  # RFC 1035 §3.3: a <character-string> holds at most 255 octets
CNAME_LIMIT = 8


def _name(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, dns.name.Name):
        return name.canonicalize()
    return dns.name.from_text(name, origin=dns.name.root).canonicalize()


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + MAX_STRING] for i in range(0, len(data), MAX_STRING)] or [b""]


def txt_rdata(text: str | bytes | Sequence[str | bytes], rtype: str = "TXT") -> dns.rdata.Rdata:
    """A TXT (or SPF) rdata for one logical text, split into 255-octet character-strings.
    A list or tuple is taken as the character-strings themselves (each at most 255 octets)."""
    if isinstance(text, str | bytes):
        data = text.encode("utf-8") if isinstance(text, str) else text
        strings = _chunks(data)
    else:
        strings = [s.encode("utf-8") if isinstance(s, str) else s for s in text]
    if rtype.upper() == "SPF":
        return dns.rdtypes.ANY.SPF.SPF(dns.rdataclass.IN, dns.rdatatype.SPF, strings)
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)


def _txt_from_value(value: str) -> dns.rdata.Rdata:
    """TXT presentation text. Quoted strings ('"a" "b"') are parsed as presentation format and
    any string over 255 octets is split; an unquoted value is taken literally as one text."""
    if not value.lstrip().startswith('"'):
        return txt_rdata(value)
    tokens = dns.tokenizer.Tokenizer(value)
    strings: list[bytes] = []
    for token in tokens.get_remaining():
        if not (token.is_quoted_string() or token.is_identifier()):
            raise dns.exception.SyntaxError(f"bad TXT value {value!r}")
        strings.extend(_chunks(token.unescape_to_bytes().value))
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)


class DnsServer:
    """See the module docstring. Use as `DnsServer().start()` … `stop()`, or `with`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._zone: dict[dns.name.Name, dict[int, dns.rdataset.Rdataset]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._silent: set[dns.name.Name] = set()
        self._silent_missing: set[dns.name.Name] = set()
        self.authenticated = False
        self.queries: list[tuple[str, str, str]] = []
        # Tracebacks of bugs hit while answering (answered SERVFAIL); fixtures check it's empty.
        self.errors: list[str] = []
        self.port = 0
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> DnsServer:
        self._udp, self._tcp = self._bind_pair()
        self.port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"dns-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # pragma: no cover - would be a bug in _serve
            raise RuntimeError("DNS server thread did not stop")
        self._thread = None
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _bind_pair(attempts: int = 50) -> tuple[socket.socket, socket.socket]:
        """UDP on an ephemeral port, then TCP on the same one; retry if TCP's is taken."""
        for _ in range(attempts):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((HOST, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((HOST, udp.getsockname()[1]))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            tcp.listen(16)
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    # -- the zone --------------------------------------------------------------------------

    def add(self, name: str, rtype: str, value: str, ttl: int = 60) -> None:
        """Add one record in presentation format, e.g. add("example.test", "MX", "10 mx.").
        Names in `value` without a trailing dot are taken as absolute. For TXT, see
        `_txt_from_value`: long quoted strings are split, unquoted text is one literal."""
        rdtype = dns.rdatatype.from_text(rtype)
        if rdtype == dns.rdatatype.TXT:
            rdata = _txt_from_value(value)
        else:
            rdata = dns.rdata.from_text(
                dns.rdataclass.IN, rdtype, value, origin=dns.name.root, relativize=False
            )
        self._add_rdata(_name(name), rdata, ttl)

    def add_txt(
        self,
        name: str,
        text: str | bytes | Sequence[str | bytes],
        ttl: int = 60,
        *,
        rtype: str = "TXT",
    ) -> None:
        """Add one TXT record holding `text`, split into 255-octet strings as needed (a list
        gives the strings themselves). `rtype="SPF"` adds a type SPF (99) record instead."""
        self._add_rdata(_name(name), txt_rdata(text, rtype), ttl)

    def _add_rdata(self, name: dns.name.Name, rdata: dns.rdata.Rdata, ttl: int) -> None:
        with self._lock:
            types = self._zone.setdefault(name, {})
            rdataset = types.get(rdata.rdtype)
            if rdataset is None:
                rdataset = types[rdata.rdtype] = dns.rdataset.Rdataset(
                    dns.rdataclass.IN, rdata.rdtype
                )
            rdataset.add(rdata, ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove all records of `rtype` at `name` (all types if None) and its fault flags."""
        key = _name(name)
        with self._lock:
            if rtype is None:
                self._zone.pop(key, None)
                self._servfail.discard(key)
                self._silent.discard(key)
                self._silent_missing.discard(key)
                return
            types = self._zone.get(key, {})
            types.pop(dns.rdatatype.from_text(rtype), None)
            if not types:
                self._zone.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._zone.clear()
            self._servfail.clear()
            self._silent.clear()
            self._silent_missing.clear()
            self.queries.clear()

    def set_servfail(self, name: str, on: bool = True) -> None:
        """Answer SERVFAIL for every query about `name`."""
        with self._lock:
            (self._servfail.add if on else self._servfail.discard)(_name(name))

    def set_silent(self, name: str, on: bool = True, *, missing_only: bool = False) -> None:
        """Never answer queries about `name`, so clients time out. With `missing_only`, stay
        silent only when asked for a type that has no records at `name`."""
        silent = self._silent_missing if missing_only else self._silent
        with self._lock:
            (silent.add if on else silent.discard)(_name(name))

    def load_zone_text(self, origin: str, text: str) -> None:
        """Merge zone-file text (RFC 1035 §5); relative names are relative to `origin`.
        The text is dedented first, so an indented triple-quoted string works."""
        zone = dns.zone.from_text(
            textwrap.dedent(text), origin=origin, relativize=False, check_origin=False
        )
        for name, rdataset in zone.iterate_rdatasets():
            for rdata in rdataset:
                self._add_rdata(_name(name), rdata, rdataset.ttl)

    def transports(self, name: str, rtype: str) -> list[str]:
        """Transports ("udp"/"tcp") of the queries received for `name`/`rtype`, in order."""
        qname, qtype = _name(name).to_text(), rtype.upper()
        with self._lock:
            return [t for t, n, q in self.queries if n == qname and q == qtype]

    # -- answering -------------------------------------------------------------------------

    def _exists(self, name: dns.name.Name) -> bool:
        # RFC 8020: a name with nothing at it but names below it (an empty non-terminal)
        # exists; only a name with nothing at or below it is NXDOMAIN.
        return any(stored.is_subdomain(name) for stored in self._zone)

    def _soa_for(self, name: dns.name.Name) -> dns.rrset.RRset | None:
        while True:
            rdataset = self._zone.get(name, {}).get(dns.rdatatype.SOA)
            if rdataset is not None:
                rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.SOA)
                rrset.update(rdataset)
                return rrset
            if name == dns.name.root:
                return None
            name = name.parent()

    def answer(self, query: dns.message.Message, transport: str) -> dns.message.Message | None:
        """The response to `query`, or None to stay silent."""
        response = dns.message.make_response(query)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname, qtype = question.name.canonicalize(), question.rdtype
        with self._lock:
            self.queries.append((transport, qname.to_text(), dns.rdatatype.to_text(qtype)))
            if qname in self._silent:
                return None
            if qname in self._silent_missing and qtype not in self._zone.get(qname, {}):
                return None
            if qname in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response
            if question.rdclass != dns.rdataclass.IN:
                response.set_rcode(dns.rcode.REFUSED)
                return response
            response.flags |= dns.flags.AA
            wants_ad = query.flags & dns.flags.AD or query.ednsflags & dns.flags.DO
            if self.authenticated and wants_ad:
                response.flags |= dns.flags.AD
            name = qname
            for _ in range(CNAME_LIMIT):  # RFC 1034 §4.3.2 step 3a: follow CNAMEs in-zone
                types = self._zone.get(name, {})
                rdataset = types.get(qtype)
                cname = types.get(dns.rdatatype.CNAME)
                if rdataset is None and cname is not None and qtype != dns.rdatatype.CNAME:
                    rdataset = cname
                if rdataset is None:
                    break
                rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdataset.rdtype)
                rrset.update(rdataset)
                response.answer.append(rrset)
                if rdataset.rdtype != dns.rdatatype.CNAME or qtype == dns.rdatatype.CNAME:
                    break
                name = rdataset[0].target.canonicalize()
            if not response.answer or response.answer[-1].rdtype == dns.rdatatype.CNAME:
                if not response.answer and not self._exists(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                soa = self._soa_for(name)
                if soa is not None:
                    response.authority.append(soa)
        return response

    def _respond(self, data: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            if len(data) < 12:
                return None
            # RFC 1035 §4.1.1: FORMERR, echoing the id; header only.
            flags = int(dns.flags.QR) | int(dns.rcode.FORMERR)
            return data[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)
        if query.flags & dns.flags.QR:
            return None  # a response, not a query: never answer it
        try:
            response = self.answer(query, transport)
        except Exception:  # a bug here must not kill the server thread
            self.errors.append(traceback.format_exc())
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        if response is None:
            return None
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = MAX_UDP_NO_EDNS if query.edns < 0 else max(MAX_UDP_NO_EDNS, query.payload)
        return response.to_wire(max_size=limit, prefer_truncation=True)

    # -- the network loop (server thread) --------------------------------------------------

    def _serve(self) -> None:
        assert self._udp and self._tcp and self._wake_r
        buffers: dict[socket.socket, bytearray] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self._udp, selectors.EVENT_READ)
            selector.register(self._tcp, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stopping:
                    for key, _ in selector.select():
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if sock is self._udp:
                            self._serve_udp()
                        elif sock is self._tcp:
                            conn, _ = self._tcp.accept()
                            conn.settimeout(2.0)
                            buffers[conn] = bytearray()
                            selector.register(conn, selectors.EVENT_READ)
                        elif sock is not self._wake_r and not self._serve_tcp(sock, buffers):
                            selector.unregister(sock)
                            buffers.pop(sock)
                            sock.close()
            finally:
                self._close_all(buffers)

    @staticmethod
    def _close_all(conns: Iterable[socket.socket]) -> None:
        for conn in list(conns):
            conn.close()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        try:
            data, peer = self._udp.recvfrom(65535)
        except OSError:
            return
        reply = self._respond(data, "udp")
        if reply is not None:
            self._udp.sendto(reply, peer)

    def _serve_tcp(self, conn: socket.socket, buffers: dict[socket.socket, bytearray]) -> bool:
        """Read what is there; answer every complete message (RFC 1035 §4.2.2: two-octet
        length prefix). False when the connection is finished."""
        try:
            data = conn.recv(65535)
        except OSError:
            return False
        if not data:
            return False
        buffer = buffers[conn]
        buffer += data
        while len(buffer) >= 2:
            size = int.from_bytes(buffer[:2], "big")
            if len(buffer) < 2 + size:
                break
            message, buffer[:] = bytes(buffer[2 : 2 + size]), buffer[2 + size :]
            reply = self._respond(message, "tcp")
            if reply is not None:
                try:
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
                except OSError:
                    return False
        return True
