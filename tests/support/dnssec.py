"""DNSSEC for tests: really signed zones, an authoritative server that serves their RRSIGs and
NSEC proofs, and a real validating resolver (Debian's `unbound`) in front of it.

    key = ZoneKey.generate()
    zone = sign_zone("dane.test", ZONE_TEXT, key)       # RRSIG over every RRset, NSEC chain
    forge(zone, "_25._tcp.mx.dane.test", "TLSA", "3 1 1 00...")   # data changed, RRSIG kept
    server = SignedDnsServer().start(); server.load_signed_zone(zone)
    server.load_zone_text("plain.test", ...)            # unsigned data, served as before
    with Unbound(server, anchors=[key.trust_anchor("dane.test")],
                 stub_zones=["dane.test", "plain.test"], workdir=tmp) as unbound:
        Resolver([unbound.address], cache=False)        # AD bit = unbound validated it

Why unbound and not in-process validation: the product trusts the AD bit of a validating
resolver on a trusted path (RFC 6698 §4.1 / RFC 7672 §2.1, as Postfix and mox do), so the proof
has to be that a real validator sets AD for our signed data and refuses (SERVFAIL) a forgery.

Signing is done here with `cryptography` (ECDSA P-256, algorithm 13, RFC 6605), not with
dnspython's `sign_zone`: dnspython 2.9.2's DNSSEC features require cryptography >= 50 (see
ENGINE-NOTES). The signed data follows RFC 4034 §3.1.8.1 (canonical RRset, §6).
"""

from __future__ import annotations

import datetime
import shutil
import struct
import subprocess
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY
import dns.rdtypes.ANY.RRSIG
import dns.rrset
import dns.zone
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.support.dnsserver import HOST, DnsServer, _name
from tests.support.procs import free_port

ECDSAP256SHA256 = 13  # RFC 6605
ZONE_KEY_SEP = 257  # DNSKEY flags: Zone Key + Secure Entry Point (RFC 4034 §2.1.1)
IN = dns.rdataclass.IN


@dataclass(frozen=True)
class ZoneKey:
    """One ECDSA P-256 key signing a whole zone (a combined KSK/ZSK) and its DNSKEY."""

    private: ec.EllipticCurvePrivateKey
    dnskey: dns.rdtypes.ANY.DNSKEY.DNSKEY

    @classmethod
    def generate(cls) -> ZoneKey:
        private = ec.generate_private_key(ec.SECP256R1())
        numbers = private.public_key().public_numbers()
        # RFC 6605 §4: the public key is Q = x | y, 32 octets each.
        public = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
        dnskey = dns.rdtypes.ANY.DNSKEY.DNSKEY(IN, dns.rdatatype.DNSKEY, ZONE_KEY_SEP, 3,
                                               ECDSAP256SHA256, public)
        return cls(private, dnskey)

    def trust_anchor(self, origin: str) -> str:
        """The key as a trust anchor line, e.g. for unbound's `trust-anchor:`."""
        return f"{_name(origin).to_text()} DNSKEY {self.dnskey.to_text()}"

    def sign(self, name: dns.name.Name, rdataset: dns.rdataset.Rdataset, signer: dns.name.Name,
             inception: int, expiration: int) -> dns.rdtypes.ANY.RRSIG.RRSIG:
        """An RRSIG over (name, rdataset) (RFC 4034 §3.1.8.1: RRSIG RDATA without the
        signature, then the RRset in canonical form and order)."""
        template = dns.rdtypes.ANY.RRSIG.RRSIG(
            IN, dns.rdatatype.RRSIG, rdataset.rdtype, ECDSAP256SHA256,
            len(name) - 1,  # labels, not counting the root (no wildcards here)
            rdataset.ttl, expiration, inception, self.dnskey.key_id(), signer, b"")
        wire = template.to_wire()
        assert wire is not None
        data = wire[:18] + signer.to_digestable()
        owner = name.to_digestable()
        fixed = struct.pack("!HHI", rdataset.rdtype, IN, rdataset.ttl)
        for rdata in sorted(rd.to_digestable() for rd in rdataset):
            data += owner + fixed + struct.pack("!H", len(rdata)) + rdata
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
        signed = template.replace(signature=r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        assert isinstance(signed, dns.rdtypes.ANY.RRSIG.RRSIG)
        return signed


def sign_zone(origin: str, text: str, key: ZoneKey, *,
              valid_for: datetime.timedelta = datetime.timedelta(days=1)) -> dns.zone.Zone:
    """Parse zone-file `text` (names relative to `origin`), add the DNSKEY and an NSEC chain
    (RFC 4034 §4), and sign every RRset. Signatures start an hour ago (clock skew)."""
    apex = _name(origin)
    zone = dns.zone.from_text(textwrap.dedent(text), origin=apex, relativize=False)
    soa = zone.get_rdataset(apex, dns.rdatatype.SOA)
    assert soa is not None, "a signed zone needs an SOA at its apex"
    zone.find_rdataset(apex, dns.rdatatype.DNSKEY, create=True).add(key.dnskey, soa.ttl)
    names = sorted(zone.nodes)  # dnspython orders names canonically (RFC 4034 §6.1)
    # RFC 4034 §4.1.2, RFC 4035 §2.3: each name points at the next; the last at the apex.
    for index, name in enumerate(names):
        following = names[(index + 1) % len(names)]
        types = sorted({dns.rdatatype.to_text(rds.rdtype) for rds in zone.nodes[name]}
                       | {"NSEC", "RRSIG"})
        nsec = dns.rdata.from_text(IN, dns.rdatatype.NSEC, f"{following} {' '.join(types)}")
        zone.find_rdataset(name, dns.rdatatype.NSEC, create=True).add(nsec, soa[0].minimum)
    now = int(time.time())
    inception, expiration = now - 3600, now + int(valid_for.total_seconds())
    for name in names:
        for rdataset in list(zone.nodes[name]):
            rrsig = key.sign(name, rdataset, apex, inception, expiration)
            zone.find_rdataset(name, dns.rdatatype.RRSIG, rdataset.rdtype, create=True).add(
                rrsig, rdataset.ttl)
    return zone


def forge(zone: dns.zone.Zone, name: str, rtype: str, value: str) -> None:
    """Replace the data of an RRset after signing, keeping its (now wrong) RRSIG: what an
    attacker on the path without the zone's key could serve."""
    rdtype = dns.rdatatype.from_text(rtype)
    rdataset = zone.find_rdataset(_name(name), rdtype)
    ttl = rdataset.ttl
    rdataset.clear()
    rdataset.add(dns.rdata.from_text(IN, rdtype, value), ttl)


class SignedDnsServer(DnsServer):
    """`DnsServer` that also serves signed zones: when the query has the DO bit (RFC 3225),
    RRSIGs go with each RRset of a signed zone, and negative answers carry the NSEC records
    proving them (RFC 4035 §3.1.3: the NSEC matching the name for NODATA, the NSEC covering
    the name and the one covering the wildcard for NXDOMAIN). No AD bit: it is authoritative.
    """

    def __init__(self) -> None:
        super().__init__()
        # name -> covered type -> RRSIGs; and the apex names of the signed zones.
        self._sigs: dict[dns.name.Name, dict[int, dns.rdataset.Rdataset]] = {}
        self._signed: list[dns.name.Name] = []

    def load_signed_zone(self, zone: dns.zone.Zone) -> None:
        """Serve a zone made by `sign_zone` (its RRSIGs are kept apart, sent with DO)."""
        assert zone.origin is not None
        with self._lock:
            self._signed.append(zone.origin.canonicalize())
        for name, rdataset in zone.iterate_rdatasets():
            if rdataset.rdtype == dns.rdatatype.RRSIG:
                with self._lock:
                    self._sigs.setdefault(_name(name), {})[rdataset.covers] = rdataset
                continue
            for rdata in rdataset:
                self._add_rdata(_name(name), rdata, rdataset.ttl)

    def _apex_of(self, name: dns.name.Name) -> dns.name.Name | None:
        matches = [apex for apex in self._signed if name.is_subdomain(apex)]
        return max(matches, key=len) if matches else None

    def _rrset(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        rdataset = self._zone.get(name, {}).get(rdtype)
        if rdataset is None:
            return None
        rrset = dns.rrset.RRset(name, IN, dns.rdatatype.RdataType.make(rdtype))
        rrset.update(rdataset)
        return rrset

    def _sig_for(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        rdataset = self._sigs.get(name, {}).get(rdtype)
        if rdataset is None:
            return None
        rrset = dns.rrset.RRset(name, IN, dns.rdatatype.RRSIG,
                                dns.rdatatype.RdataType.make(rdtype))
        rrset.update(rdataset)
        return rrset

    def _covering_nsec(self, name: dns.name.Name, apex: dns.name.Name) -> dns.name.Name | None:
        """The NSEC owner equal to `name` or the last one before it, canonically."""
        owners = [owner for owner, types in self._zone.items()
                  if dns.rdatatype.NSEC in types and owner.is_subdomain(apex) and owner <= name]
        return max(owners) if owners else None

    def answer(self, query: dns.message.Message, transport: str) -> dns.message.Message | None:
        response = super().answer(query, transport)
        if response is None or not query.ednsflags & dns.flags.DO:
            return response
        if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return response
        with self._lock:
            self._add_proofs(query, response)
        return response

    def _add_proofs(self, query: dns.message.Message, response: dns.message.Message) -> None:
        qname = query.question[0].name.canonicalize()
        for section in (response.answer, response.authority):
            for rrset in list(section):
                if self._apex_of(rrset.name) is not None:
                    sig = self._sig_for(rrset.name, rrset.rdtype)
                    if sig is not None:
                        section.append(sig)
        if response.answer and response.answer[-1].rdtype != dns.rdatatype.CNAME:
            return
        final = response.answer[-1][0].target.canonicalize() if response.answer else qname
        apex = self._apex_of(final)
        if apex is None:
            return
        owners = [self._covering_nsec(final, apex)]
        if response.rcode() == dns.rcode.NXDOMAIN:
            encloser = final.parent()
            while encloser != apex and not self._exists(encloser):
                encloser = encloser.parent()
            owners.append(self._covering_nsec(dns.name.Name(("*", *encloser.labels)), apex))
        for owner in dict.fromkeys(o for o in owners if o is not None):
            nsec, sig = self._rrset(owner, dns.rdatatype.NSEC), self._sig_for(
                owner, dns.rdatatype.NSEC)
            response.authority.extend(r for r in (nsec, sig) if r is not None)

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self._sigs.clear()
            self._signed.clear()


class Unbound:
    """A real validating resolver: `unbound` on 127.0.0.1:<port>, asking only `upstream`
    (stub zones) and trusting only the given anchors. Started with `start()` or `with`."""

    def __init__(self, upstream: DnsServer, *, anchors: Sequence[str],
                 stub_zones: Sequence[str], workdir: Path) -> None:
        self.upstream = upstream
        self.anchors = list(anchors)
        self.stub_zones = list(stub_zones)
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("unbound") is not None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "unbound.log"

    def _config(self) -> str:
        lines = [
            "server:",
            f"  interface: {HOST}", f"  port: {self.port}",
            "  do-daemonize: no", '  username: ""', '  chroot: ""',
            f'  directory: "{self.workdir}"', f'  logfile: "{self.log_path}"',
            "  use-syslog: no", '  pidfile: ""', "  verbosity: 1", "  val-log-level: 2",
            "  num-threads: 1", "  do-ip6: no", "  so-reuseport: no",
            "  outgoing-range: 64", "  num-queries-per-thread: 32",
            # Our upstream is on 127.0.0.1; "test." is a reserved name unbound blocks by default.
            "  do-not-query-localhost: no", '  local-zone: "test." nodefault',
            "  qname-minimisation: no", "  harden-dnssec-stripped: yes",
            '  module-config: "validator iterator"', "  ede: yes",
        ]
        lines += [f'  trust-anchor: "{anchor}"' for anchor in self.anchors]
        lines += ["remote-control:", "  control-enable: no"]
        for zone in self.stub_zones:
            lines += ["stub-zone:", f'  name: "{_name(zone).to_text()}"',
                      f"  stub-addr: {HOST}@{self.upstream.port}"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10) -> Unbound:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the port was free a moment ago; retry if someone took it
            self.port = free_port()
            config = self.workdir / "unbound.conf"
            config.write_text(self._config())
            self.proc = subprocess.Popen(["unbound", "-d", "-c", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"unbound did not start:\n{self.log()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        probe = dns.message.make_query("localhost.", "A")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                dns.query.udp(probe, HOST, port=self.port, timeout=0.2)
                return True
            except (dns.exception.Timeout, OSError):
                time.sleep(0.05)
        return False

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if self.proc is not None and self.proc.stderr is not None and self.proc.poll() is not None:
            text += self.proc.stderr.read().decode(errors="replace")
        return text

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> Unbound:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


__all__ = ["SignedDnsServer", "Unbound", "ZoneKey", "forge", "sign_zone"]
