"""MTA-STS (RFC 8461): policy parsing, TXT discovery, the HTTPS fetch and the database cache,
against a real loopback DNS server and a real HTTPS server with a test CA."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inbox.delivery.mtasts import (
    MtaStsResolver,
    StsPolicy,
    parse_policy,
    parse_sts_record,
)
from inbox.errors import StorageUnavailable
from inbox.resolver import Resolver
from inbox.storage import Database
from tests.support.dnsserver import DnsServer
from tests.support.https_server import HttpsServer
from tests.support.testca import CertAuthority

DOMAIN = "example.test"
HOST = f"mta-sts.{DOMAIN}"
PATH = "/.well-known/mta-sts.txt"
T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
GOOD = ("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.backup.test\r\n"
        "max_age: 86400\r\n")
TESTING = "version: STSv1\nmode: testing\nmx: mx2.example.test\nmax_age: 3600\n"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    """Leaves are signed by an intermediate, which the server sends with them."""
    return CertAuthority.create(intermediate=True)


@pytest.fixture
def https(ca: CertAuthority) -> Iterator[HttpsServer]:
    server = HttpsServer(ca, [HOST, "mta-sts.other.test"]).start()
    try:
        yield server
    finally:
        server.close()
    assert not server.errors, "HTTPS server errors:\n" + "\n".join(server.errors)


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    database = Database("mem://", namespace="t", database="t")
    await database.connect()  # applies the schema
    yield database
    await database.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(db: Database, dns_server: DnsServer, https: HttpsServer, ca: CertAuthority,
         clock: Clock, tmp_path: Any) -> Any:
    """A factory for resolvers on the shared database, DNS server and HTTPS server; they
    trust only the test root."""
    ca_file = str(tmp_path / "root.pem")
    (tmp_path / "root.pem").write_bytes(ca.root.cert_pem)
    # No DNS cache: a changed TXT record must be seen at once.
    lookup = Resolver([dns_server.address], timeout=2, cache=False)

    def factory(**kw: Any) -> MtaStsResolver:
        options: dict[str, Any] = {"https_port": https.port, "ca_file": ca_file, "timeout": 2}
        options.update(kw)
        return MtaStsResolver(db, lookup, clock=clock, **options)

    return factory


def publish(dns: DnsServer, policy_id: str, domain: str = DOMAIN) -> None:
    dns.remove(f"_mta-sts.{domain}", "TXT")
    dns.add_txt(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id};")
    dns.remove(f"mta-sts.{domain}", "A")
    dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")


# -- discovery, fetch and cache -------------------------------------------------------------


async def test_policy_fetched_parsed_and_cached(make: Any, dns_server: DnsServer,
                                                https: HttpsServer, clock: Clock) -> None:
    publish(dns_server, "20261122T1")
    https.route(PATH, GOOD, content_type="text/plain; charset=utf-8")
    first = make()
    policy = await first.policy("Example.TEST.")
    assert policy == StsPolicy(
        id="20261122T1", mode="enforce", mx=("mx1.example.test", "*.backup.test"),
        max_age=86400, fetched_at=T0, expires_at=T0 + timedelta(days=1),
    )
    # One request, for the right name: SNI and Host are mta-sts.<domain>.
    assert [(r.sni, r.host, r.path) for r in https.requests] == [(HOST, HOST, PATH)]
    clock.advance(60)
    assert await first.policy(DOMAIN) == policy
    # Another resolver on the same database uses the cache without fetching.
    assert await make().policy(DOMAIN) == policy
    assert https.count(PATH) == 1


async def test_new_txt_id_refetches(make: Any, dns_server: DnsServer,
                                    https: HttpsServer) -> None:
    publish(dns_server, "one")
    https.route(PATH, GOOD)
    resolver = make()
    assert (await resolver.policy(DOMAIN)).mode == "enforce"  # type: ignore[union-attr]
    publish(dns_server, "two")
    https.route(PATH, TESTING)
    policy = await make().policy(DOMAIN)
    assert policy is not None and (policy.id, policy.mode) == ("two", "testing")
    assert policy.mx == ("mx2.example.test",) and https.count(PATH) == 2
    # The first resolver sees the new policy from the shared cache.
    assert await resolver.policy(DOMAIN) == policy and https.count(PATH) == 2


async def test_concurrent_lookups_share_one_fetch(make: Any, dns_server: DnsServer,
                                                  https: HttpsServer) -> None:
    publish(dns_server, "c1")
    https.route(PATH, GOOD, delay=0.2)
    resolver = make()
    policies = await asyncio.gather(*(resolver.policy(DOMAIN) for _ in range(5)))
    assert len({p.id for p in policies if p}) == 1 and https.count(PATH) == 1


BIG = GOOD + "ext: " + "x" * 70_000 + "\n"
FAILURES: list[tuple[str, dict[str, Any]]] = [
    ("server-down", {"down": True}),
    ("status-500", {"status": 500}),
    ("status-204", {"status": 204, "body": ""}),
    ("redirect-301", {"status": 301, "headers": [("Location", f"https://{HOST}{PATH}")]}),
    ("wrong-cert-name", {"cert": ["mta-sts.other.test"]}),
    ("wrong-cert-wildcard-too-deep", {"cert": ["*.test"]}),
    ("expired-cert", {"cert": [HOST], "expired": True}),
    ("untrusted-ca", {"cert": [HOST], "ca": "other"}),
    ("too-big", {"body": BIG}),
    ("too-big-chunked", {"body": BIG, "chunked": True}),
    ("too-big-no-length", {"body": BIG, "send_length": False}),
    ("truncated", {"content_length": len(GOOD) + 10}),
    ("content-type-html", {"content_type": "text/html"}),
    ("content-type-missing", {"content_type": None}),
    ("bad-policy-text", {"body": "version: STSv1\nmode: enforce\nmax_age: 60\n"}),
    ("max-age-too-big", {"body": "version: STSv1\nmode: none\nmax_age: 31557601\n"}),
    ("not-utf8", {"body": b"version: STSv1\nmode: none\nmax_age: 60\next: \xff\n"}),
    ("slow", {"delay": 1.5}),
    ("no-address", {"no_address": True}),
]


def _break(dns: DnsServer, https: HttpsServer, how: dict[str, Any]) -> None:
    how = dict(how)
    if how.pop("down", False):
        https.stop()
    if how.pop("no_address", False):
        dns.remove(HOST, "A")
    if "cert" in how:
        other = CertAuthority.create("Someone Else") if how.pop("ca", None) else None
        https.set_certificate(how.pop("cert"), ca=other, expired=how.pop("expired", False))
    if how:
        https.route(PATH, how.pop("body", GOOD), **how)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("how", [h for _, h in FAILURES], ids=[i for i, _ in FAILURES])
async def test_fetch_failure_uses_cache_or_none(make: Any, dns_server: DnsServer,
                                                https: HttpsServer, clock: Clock,
                                                how: dict[str, Any], cached: bool) -> None:
    resolver = make(timeout=0.5)
    good = None
    if cached:
        publish(dns_server, "old")
        https.route(PATH, GOOD)
        # Cached through a resolver with the normal timeout (0.5 s is for the failures; a
        # loaded 2-core CI machine can take longer for a good first fetch). The cache is in
        # the shared database, so the short-timeout resolver below starts from it.
        good = await make().policy(DOMAIN)
        assert good is not None
        clock.advance(3600)
    publish(dns_server, "new")
    _break(dns_server, https, how)
    assert await resolver.policy(DOMAIN) == good
    assert await make(timeout=0.5).policy(DOMAIN) == good  # and nothing bad was cached


async def test_chunked_and_close_delimited_bodies(make: Any, dns_server: DnsServer,
                                                  https: HttpsServer) -> None:
    https.set_certificate(["*.example.test"])  # a wildcard certificate is fine (RFC 6125)
    long_ok = GOOD + "ext: " + "y" * 60_000 + "\n"  # many chunks; over the stream's limit
    bodies: list[dict[str, Any]] = [{"chunked": True}, {"send_length": False}, {}]
    for n, options in enumerate(bodies):
        publish(dns_server, f"b{n}")
        https.route(PATH, long_ok, **options)
        policy = await make().policy(DOMAIN)
        assert policy is not None and policy.id == f"b{n}" and policy.mode == "enforce"


async def test_expiry_by_max_age(make: Any, dns_server: DnsServer, https: HttpsServer,
                                 clock: Clock) -> None:
    publish(dns_server, "e1")
    https.route(PATH, "version: STSv1\nmode: enforce\nmx: mx1.example.test\nmax_age: 100\n")
    resolver = make()
    first = await resolver.policy(DOMAIN)
    assert first is not None and first.expires_at == T0 + timedelta(seconds=100)
    clock.advance(99)
    assert await resolver.policy(DOMAIN) == first and https.count() == 1
    clock.advance(1)  # max_age reached: the same id is fetched again
    again = await resolver.policy(DOMAIN)
    assert again is not None and again.fetched_at == T0 + timedelta(seconds=100)
    assert https.count() == 2
    # Expired and the fetch fails: an expired policy is not used.
    clock.advance(100)
    https.route(PATH, "", status=500)
    assert await resolver.policy(DOMAIN) is None
    # Expired policies can be pruned; they would never be used.
    assert await resolver.prune() == 1


@pytest.mark.parametrize("fault", ["servfail", "nxdomain", "invalid", "two-records"])
async def test_txt_failure_uses_cache(make: Any, dns_server: DnsServer, https: HttpsServer,
                                      fault: str) -> None:
    publish(dns_server, "t1")
    https.route(PATH, TESTING)
    resolver = make()
    cached = await resolver.policy(DOMAIN)
    assert cached is not None and cached.mode == "testing"
    name = f"_mta-sts.{DOMAIN}"
    if fault == "servfail":
        dns_server.set_servfail(name)
    elif fault == "nxdomain":
        dns_server.remove(name)
    elif fault == "invalid":
        dns_server.remove(name)
        dns_server.add_txt(name, "v=STSv1; id=bad-id!;")
    else:
        dns_server.add_txt(name, "v=STSv1; id=t2;")
    https.route(PATH, "", status=500)  # a fetch (which must not happen) would fail
    assert await make().policy(DOMAIN) == cached and https.count() == 1


TXT_CASES: list[tuple[str, list[str], bool]] = [
    ("one-record", ["v=STSv1; id=abc123"], True),
    ("other-txt-ignored", ["v=spf1 -all", "v=STSv1; id=abc123;", "hello"], True),
    ("two-sts-records", ["v=STSv1; id=abc123;", "v=STSv1; id=def456;"], False),
    ("no-sts-record", ["v=spf1 -all"], False),
    ("bad-id", ["v=STSv1; id=abc_123;"], False),
    ("no-separator", ["v=STSv1 id=abc123"], False),
]


@pytest.mark.parametrize(("records", "found"), [(r, f) for _, r, f in TXT_CASES],
                         ids=[i for i, _, _ in TXT_CASES])
async def test_txt_discovery_without_cache(make: Any, dns_server: DnsServer,
                                           https: HttpsServer, records: list[str],
                                           found: bool) -> None:
    publish(dns_server, "unused")
    dns_server.remove(f"_mta-sts.{DOMAIN}", "TXT")
    for record in records:
        dns_server.add_txt(f"_mta-sts.{DOMAIN}", record)
    https.route(PATH, GOOD)
    policy = await make().policy(DOMAIN)
    assert (policy is not None) == found
    assert https.count() == (1 if found else 0)


async def test_no_policy_for_impossible_domains(make: Any) -> None:
    resolver = make()
    for domain in ["", "localhost", "a..b", "-x.test", "x" * 64 + ".test"]:
        assert await resolver.policy(domain) is None


async def test_unreadable_cache(make: Any, db: Database, dns_server: DnsServer,
                                https: HttpsServer) -> None:
    resolver = make()
    await db.close()
    # A live policy is still found (and not stored) ...
    publish(dns_server, "u1")
    https.route(PATH, GOOD)
    assert (await resolver.policy(DOMAIN)) is not None
    # ... but without one we cannot tell whether the cache held one: a temporary error.
    https.route(PATH, "", status=500)
    publish(dns_server, "u2")
    with pytest.raises(StorageUnavailable):
        await resolver.policy(DOMAIN)


# -- parsing --------------------------------------------------------------------------------

POLICIES: list[tuple[str, str, dict[str, Any] | str]] = [
    ("crlf-enforce", GOOD,
     {"mode": "enforce", "mx": ["mx1.example.test", "*.backup.test"], "max_age": 86400}),
    ("lf-testing", TESTING, {"mode": "testing", "mx": ["mx2.example.test"], "max_age": 3600}),
    ("none-without-mx", "version: STSv1\nmode: none\nmax_age: 0",
     {"mode": "none", "mx": [], "max_age": 0}),
    ("spaces-and-extensions", "version:STSv1 \nmode:\t testing\nfoo-bar: a=b;c\n\n"
     "mx: MX.Example.TEST.\nmax_age: 31557600\n",
     {"mode": "testing", "mx": ["mx.example.test"], "max_age": 31557600}),
    ("byte-order-mark", "\ufeffversion: STSv1\nmode: none\nmax_age: 1\n",
     {"mode": "none", "mx": [], "max_age": 1}),
    ("first-wins", "version: STSv1\nmode: testing\nmode: enforce\nmx: a.test\nmax_age: 5\n"
     "max_age: 6\n", {"mode": "testing", "mx": ["a.test"], "max_age": 5}),
    ("missing-version", "mode: enforce\nmx: a.test\nmax_age: 5\n", "version"),
    ("wrong-version", "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 5\n", "version"),
    ("field-names-are-case-sensitive", "version: STSv1\nMode: enforce\nmx: a.test\n"
     "max_age: 5\n", "mode"),
    ("mode-value-case-sensitive", "version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 5\n",
     "mode"),
    ("max-age-over-limit", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
     "max_age"),
    ("max-age-negative", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "max_age"),
    ("max-age-11-digits", "version: STSv1\nmode: none\nmax_age: 00000000001\n", "max_age"),
    ("enforce-without-mx", "version: STSv1\nmode: enforce\nmax_age: 5\n", "mx"),
    ("mx-bad-wildcard", "version: STSv1\nmode: enforce\nmx: mail.*.test\nmax_age: 5\n", "mx"),
    ("mx-bare-star", "version: STSv1\nmode: enforce\nmx: *\nmax_age: 5\n", "mx"),
    ("mx-empty-label", "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 5\n", "mx"),
    ("no-colon", "version: STSv1\nmode enforce\nmx: a.test\nmax_age: 5\n", "line 2"),
    ("html", "<html><body>hello</body></html>", "line 1"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in POLICIES],
                         ids=[i for i, _, _ in POLICIES])
def test_parse_policy(text: str, expected: dict[str, Any] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            parse_policy(text)
    else:
        assert parse_policy(text) == {"version": "STSv1", **expected}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("versionmdxa_gfc:STv1 \t\r\n.*-0925")), max_size=200))
def test_parse_policy_fuzz(text: str) -> None:
    try:
        result = parse_policy(text)
    except ValueError:
        return
    assert result["mode"] in {"enforce", "testing", "none"}
    assert 0 <= result["max_age"] <= 31557600


@pytest.mark.parametrize(("text", "expected"), [
    ("v=STSv1; id=20160831085700Z;", "20160831085700Z"),
    ("v=STSv1;id=a", "a"),
    ("v=STSv1 ; id=a ; ext=1", "a"),
    ("v=STSv1; id=a; id=b", "a"),
    ("v=STSv1;", ValueError),
    ("v=STSv1; id=", ValueError),
    ("v=STSv1; id=" + "a" * 33, ValueError),
    ("v=STSv1; id=a; ext=x=y", ValueError),
    ("v=STSv1; id=a;;", ValueError),
    ("v=STSv2; id=a", ValueError),
], ids=["rfc-example", "no-space", "spaces-ext", "first-id", "no-id", "empty-id", "id-too-long",
        "bad-ext", "double-sep", "v2"])
def test_parse_sts_record(text: str, expected: str | type[Exception]) -> None:
    if isinstance(expected, str):
        assert parse_sts_record(text) == expected
    else:
        with pytest.raises(expected):
            parse_sts_record(text)


MX_CASES = [
    ("mail.example.com", True),
    ("MAIL.Example.COM.", True),
    ("a.example.net", True),
    ("example.net", False),
    ("a.b.example.net", False),
    ("example.com", False),
    ("x.mail.example.com", False),
    ("mail.example.com.evil", False),
    ("aexample.net", False),
    ("", False),
]


@pytest.mark.parametrize(("host", "allowed"), MX_CASES, ids=[h or "empty" for h, _ in MX_CASES])
def test_mx_matches(host: str, allowed: bool) -> None:
    policy = StsPolicy(id="x", mode="enforce", mx=("mail.example.com", "*.Example.NET."),
                       max_age=60, fetched_at=T0, expires_at=T0)
    assert policy.mx_matches(host) is allowed
