"""Tenancy over the real stack: walls between organizations, scopes, domain verification,
and bad GraphQL input getting typed errors (never a 500)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from inbox.errors import ConfigError
from inbox.tenancy import create_api_key
from inbox.tenancy.keys import SecretBox
from tests.conftest import MASTER_KEY, SEND, Stack, make_tenant, route_to_sink, wait_status

GET = "query($id: ID!) { message(id: $id) { id subject } }"
LIST = "{ messages(first: 50) { edges { node { id } } } }"


async def _sent(stack: Stack, tenant: Any) -> str:
    route_to_sink(stack.dns, "dest.test")
    r = await stack.api(SEND, {"from": f"a@{tenant.domain}", "to": ["x@dest.test"],
                               "subject": "secret", "text": "t"}, key=tenant.key)
    return r["data"]["sendEmail"]["message"]["id"]


async def test_organizations_cannot_see_or_touch_each_other(stack: Stack, smtp_sink: Any
                                                             ) -> None:
    a = await make_tenant(stack.services, stack.dns, "a.test", name="A")
    b = await make_tenant(stack.services, stack.dns, "b.test", name="B")
    msg_a = await _sent(stack, a)
    await wait_status(stack.api, a.key, msg_a, {"DELIVERED"})

    assert (await stack.api(GET, {"id": msg_a}, key=b.key))["data"]["message"] is None
    assert (await stack.api(LIST, key=b.key))["data"]["messages"]["edges"] == []
    assert (await stack.api(GET, {"id": msg_a}, key=a.key))["data"]["message"]["id"] == msg_a

    # B sends as A's domain: refused, naming the field.
    r = await stack.api(SEND, {"from": f"ceo@{a.domain}", "to": ["x@dest.test"],
                               "subject": "s", "text": "t"}, key=b.key)
    err = r["data"]["sendEmail"]["errors"][0]
    assert err["code"] == "FORBIDDEN" and err["field"] == ["from"]

    # B cannot claim, verify or re-quota A's domain, nor revoke A's keys.
    r = await stack.api('mutation($d: String!) { addDomain(domain: $d) { errors { code } } }',
                        {"d": a.domain}, key=b.key)
    assert r["data"]["addDomain"]["errors"][0]["code"] == "CONFLICT"
    r = await stack.api('mutation($d: String!) { verifyDomain(domain: $d) '
                        '{ errors { code } } }', {"d": a.domain}, key=b.key)
    assert r["data"]["verifyDomain"]["errors"][0]["code"] == "NOT_FOUND"
    r = await stack.api('mutation($d: String!) { setDomainQuotas(domain: $d, hourlySendLimit: 0)'
                        ' { errors { code } } }', {"d": a.domain}, key=b.key)
    assert r["data"]["setDomainQuotas"]["errors"][0]["code"] == "NOT_FOUND"
    a_key_id = "key_" + a.key.split("_")[1]
    r = await stack.api('mutation($id: ID!) { revokeApiKey(id: $id) { errors { code } } }',
                        {"id": a_key_id}, key=b.key)
    assert r["data"]["revokeApiKey"]["errors"][0]["code"] == "NOT_FOUND"
    assert (await stack.api(GET, {"id": msg_a}, key=a.key))["data"]["message"]

    # Suppressions are per organization.
    await stack.api('mutation { addSuppression(scope: ADDRESS, value: "x@dest.test") '
                    '{ errors { code } } }', key=b.key)
    listing = await stack.api("{ suppressions { edges { node { value } } } }", key=a.key)
    assert listing["data"]["suppressions"]["edges"] == []
    r = await stack.api('mutation { removeSuppression(scope: ADDRESS, value: "x@dest.test") '
                        '{ removed errors { code } } }', key=a.key)
    assert r["data"]["removeSuppression"]["errors"][0]["code"] == "NOT_FOUND"
    domains = await stack.api("{ domains { domain } }", key=b.key)
    assert domains["data"]["domains"] == [{"domain": "b.test"}]


@pytest.mark.parametrize(("scopes", "op", "allowed"), [
    (("send",), "send", True), (("send",), "read", False), (("send",), "admin", False),
    (("read",), "send", False), (("read",), "read", True), (("read",), "admin", False),
    (("admin",), "send", True), (("admin",), "read", True), (("admin",), "admin", True),
], ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
async def test_scopes(stack: Stack, smtp_sink: Any, scopes: tuple[str, ...], op: str,
                      allowed: bool) -> None:
    owner = await make_tenant(stack.services, stack.dns)
    _, key = await create_api_key(stack.services.db, owner.org, list(scopes),
                                  stack.services.clock())
    route_to_sink(stack.dns, "dest.test")
    if op == "send":
        r = await stack.api(SEND, {"from": f"a@{owner.domain}", "to": ["x@dest.test"],
                                   "subject": "s", "text": "t"}, key=key)
        errors = r["data"]["sendEmail"]["errors"]
        assert (errors == []) is allowed
        if not allowed:
            assert errors[0]["code"] == "FORBIDDEN"
    elif op == "read":
        r = await stack.api(LIST, key=key)
        assert ("errors" not in r) is allowed
        if not allowed:
            assert r["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    else:
        r = await stack.api('mutation { createApiKey(scopes: [READ]) { key errors { code } } }',
                            key=key)
        payload = r["data"]["createApiKey"]
        assert (payload["key"] is not None) is allowed


@pytest.mark.parametrize("header", [None, "Bearer nonsense", "Bearer ibx_abc_def", "Basic x"],
                         ids=["missing", "malformed", "unknown", "wrong-scheme"])
async def test_unauthenticated(stack: Stack, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    resp = await stack.api.client.post("/graphql", json={"query": LIST}, headers=headers)
    assert resp.status_code == 200
    assert resp.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_revoked_key_stops_working(stack: Stack) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    r = await stack.api('mutation { createApiKey(scopes: [SEND], name: "ci") '
                        '{ key apiKey { id scopes } errors { code } } }', key=tenant.key)
    created = r["data"]["createApiKey"]
    assert created["apiKey"]["scopes"] == ["SEND"] and created["key"].startswith("ibx_")
    assert "errors" not in await stack.api(
        "{ domains { domain } }", key=tenant.key)
    r = await stack.api('mutation($id: ID!) { revokeApiKey(id: $id) '
                        '{ apiKey { revokedAt } errors { code } } }',
                        {"id": created["apiKey"]["id"]}, key=tenant.key)
    assert r["data"]["revokeApiKey"]["apiKey"]["revokedAt"]
    r = await stack.api(SEND, {"from": f"a@{tenant.domain}", "to": ["x@dest.test"],
                               "subject": "s", "text": "t"}, key=created["key"])
    assert r["data"]["sendEmail"]["errors"][0]["code"] == "UNAUTHENTICATED"
    keys = await stack.api("{ apiKeys { id revokedAt } }", key=tenant.key)
    assert any(k["revokedAt"] for k in keys["data"]["apiKeys"])


async def test_add_and_verify_domain_through_dns(stack: Stack) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    r = await stack.api('mutation { addDomain(domain: "Mail.Example.TEST") { domain { domain '
                        'verified records { type name value } } errors { code } } }',
                        key=tenant.key)
    domain = r["data"]["addDomain"]["domain"]
    assert domain["domain"] == "mail.example.test" and domain["verified"] is False
    assert {rec["value"].split(";")[1].strip() for rec in domain["records"]} == {
        "k=rsa", "k=ed25519"}
    verify = ('mutation { verifyDomain(domain: "mail.example.test") { domain { verified } '
              'checks { name ok error found } errors { code } } }')
    r = await stack.api(verify, key=tenant.key)
    payload = r["data"]["verifyDomain"]
    assert payload["domain"]["verified"] is False
    assert all(not c["ok"] and c["error"] == "no TXT record found" for c in payload["checks"])
    # Unverified domains cannot send.
    s = await stack.api(SEND, {"from": "a@mail.example.test", "to": ["x@dest.test"],
                               "subject": "s", "text": "t"}, key=tenant.key)
    assert s["data"]["sendEmail"]["errors"][0]["code"] == "DOMAIN_NOT_VERIFIED"
    # Publish only the RSA record: still not verified, per-record report says which.
    stack.dns.add_txt(domain["records"][0]["name"], domain["records"][0]["value"])
    payload = (await stack.api(verify, key=tenant.key))["data"]["verifyDomain"]
    assert [c["ok"] for c in payload["checks"]] == [True, False]
    assert payload["domain"]["verified"] is False
    stack.dns.add_txt(domain["records"][1]["name"], domain["records"][1]["value"])
    payload = (await stack.api(verify, key=tenant.key))["data"]["verifyDomain"]
    assert payload["domain"]["verified"] is True and all(c["ok"] for c in payload["checks"])


async def test_only_a_hash_of_an_api_key_is_stored(stack: Stack) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    r = await stack.api('mutation { createApiKey(scopes: [SEND, READ], name: "ci") '
                        '{ key apiKey { id } errors { code } } }', key=tenant.key)
    created = r["data"]["createApiKey"]
    key, key_id = created["key"], created["apiKey"]["id"]
    prefix, short_id, secret = key.split("_", 2)
    assert (prefix, f"key_{short_id}") == ("ibx", key_id) and len(secret) >= 43  # 256 bits
    row = await stack.services.db.one("SELECT * FROM ONLY type::thing('api_key', $id)",
                                      {"id": key_id})
    assert row["hash"] == hashlib.sha256(secret.encode()).hexdigest()
    stored = repr(row)
    assert secret not in stored and key not in stored
    for value in row.values():  # nor any part of it long enough to matter, in any encoding
        text = value if isinstance(value, str) else repr(value)
        assert not any(secret[i:i + 12] in text for i in range(len(secret) - 11))
    # The hash is what authenticates: the key works, the same key with another secret not.
    assert "errors" not in await stack.api("{ viewer { scopes } }", key=key)
    forged = f"{prefix}_{short_id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    r = await stack.api("{ viewer { scopes } }", key=forged)
    assert r["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_dkim_private_keys_are_encrypted_at_rest(stack: Stack) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    r = await stack.api('mutation { addDomain(domain: "keys.example.test") { domain { records '
                        '{ name value } } errors { code } } }', key=tenant.key)
    records = r["data"]["addDomain"]["domain"]["records"]
    for record in records:  # published as the tenant would
        stack.dns.add_txt(record["name"], record["value"])
    row = await stack.services.db.one(
        "SELECT * FROM has_domain WHERE domain = 'keys.example.test'")
    [row] = row
    sealed_rsa, sealed_ed = row["dkim_rsa_private"], row["dkim_ed25519_private"]
    stored = repr(row)
    assert "PRIVATE KEY" not in stored and "BEGIN" not in stored

    box = SecretBox.from_b64(MASTER_KEY)
    aad = b"keys.example.test"
    rsa_pem = box.open(sealed_rsa, aad)
    ed_seed_b64 = box.open(sealed_ed, aad)
    with pytest.raises(ConfigError):  # bound to its domain
        box.open(sealed_rsa, b"other.example.test")
    with pytest.raises(ConfigError):  # and to the master key
        SecretBox(b"x" * 32).open(sealed_rsa, aad)
    # No private part of the key material is in the row in the clear, raw or as text.
    rsa_key = serialization.load_pem_private_key(rsa_pem, password=None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    numbers = rsa_key.private_numbers()
    pem_body = b"".join(rsa_pem.splitlines()[1:-1])
    ed_seed = base64.b64decode(ed_seed_b64)
    secrets = [n.to_bytes((n.bit_length() + 7) // 8, "big")[:32]
               for n in (numbers.d, numbers.p, numbers.q)]
    secrets += [pem_body[-120:-60], ed_seed, ed_seed_b64, base64.b64encode(ed_seed[:24])]
    for value in row.values():
        blob = value if isinstance(value, bytes) else str(value).encode()
        for secret in secrets:
            assert secret not in blob

    # The opened keys are the ones whose public halves are published in DNS.
    published = {}
    for record in records:
        [txt] = await stack.services.verify_resolver.txt(record["name"])
        tags = dict(part.strip().split("=", 1) for part in txt.split(";") if "=" in part)
        published[tags["k"]] = tags["p"]
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert base64.b64encode(rsa_public).decode() == published["rsa"]
    ed_public = ed25519.Ed25519PrivateKey.from_private_bytes(ed_seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64encode(ed_public).decode() == published["ed25519"]


BAD_SENDS = [
    ({"subject": "hi\r\nBcc: victim@x.test"}, "HEADER_INJECTION", ["subject"]),
    ({"to": ["a@dest.test\r\nX: y"]}, "HEADER_INJECTION", ["to", "0"]),
    ({"to": ["not-an-address"]}, "INVALID_ADDRESS", ["to", "0"]),
    ({"to": ["ok@dest.test", "a@@b"]}, "INVALID_ADDRESS", ["to", "1"]),
    ({"from": "nobody"}, "INVALID_ADDRESS", ["from"]),
    ({"to": []}, "VALIDATION", None),
    ({"headers": [{"name": "X-Ok", "value": "a\nb"}]}, "HEADER_INJECTION", ["headers", "X-Ok"]),
    ({"headers": [{"name": "From", "value": "x@y.z"}]}, "VALIDATION", ["headers", "From"]),
    ({"attachments": [{"filename": "a.txt", "content": "!!not base64!!"}]}, "VALIDATION",
     ["attachments", "0", "content"]),
    ({"attachments": [{"filename": "big.bin",
                       "content": base64.b64encode(b"\0" * (18 * 1024 * 1024 + 1)).decode()}]},
     "MESSAGE_TOO_LARGE", ["attachments", "0"]),
    ({"metadata": {"nested": {"x": 1}}}, "VALIDATION", ["metadata"]),
    ({"tags": [""]}, "VALIDATION", ["tags", "0"]),
    ({"key": ""}, "VALIDATION", ["idempotencyKey"]),
]


@pytest.mark.parametrize(("override", "code", "field"), BAD_SENDS,
                         ids=["subject-crlf", "to-crlf", "to-no-at", "to-double-at",
                              "from-invalid", "no-recipients", "header-lf", "header-structural",
                              "attachment-b64", "attachment-18mb", "metadata-nested",
                              "tag-empty", "idem-empty"])
async def test_bad_input_gets_typed_error(stack: Stack, override: dict[str, Any], code: str,
                                          field: list[str] | None) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    variables = {"from": f"a@{tenant.domain}", "to": ["ok@dest.test"], "subject": "s",
                 "text": "t", **override}
    resp = await stack.api.client.post(
        "/graphql", json={"query": SEND, "variables": variables},
        headers={"Authorization": f"Bearer {tenant.key}"})
    assert resp.status_code == 200
    payload = resp.json()["data"]["sendEmail"]
    assert payload["message"] is None
    err = payload["errors"][0]
    assert err["code"] == code, err
    if field is not None:
        assert err["field"] == field, err
    assert await stack.services.db.one("SELECT VALUE id FROM message") == []


async def test_graphql_type_errors_are_reported_not_500(stack: Stack) -> None:
    tenant = await make_tenant(stack.services, stack.dns)
    resp = await stack.api.client.post(
        "/graphql", json={"query": "mutation { sendEmail(from: 5) { errors { code } } }"},
        headers={"Authorization": f"Bearer {tenant.key}"})
    assert resp.status_code in (200, 400)
    assert resp.json()["errors"]
    resp = await stack.api.client.post("/graphql", content=b"{not json",
                                       headers={"Content-Type": "application/json"})
    assert resp.status_code == 400


async def test_graphiql_on_get_and_health(stack: Stack) -> None:
    resp = await stack.api.client.get("/graphql", headers={"Accept": "text/html"})
    assert resp.status_code == 200 and "graphiql" in resp.text.lower()
    assert (await stack.api.client.get("/healthz")).json() == {"status": "ok"}
