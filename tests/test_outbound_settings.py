"""Per-domain outbound TLS settings over GraphQL, and the delivery worker reading them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack, make_tenant

SET = """
mutation S($d: String!, $v: Boolean) {
  setDomainOutboundTls(domain: $d, dnssecValidate: $v) {
    domain dnssecValidate errors { code field message }
  }
}"""


@pytest.mark.parametrize(("default", "override", "expected"), [
    ("true", None, True), ("true", False, False), ("false", True, True), ("false", None, False),
], ids=["default-on", "off-for-domain", "on-for-domain", "default-off"])
async def test_dnssec_override_reaches_the_worker(tmp_path: Any, dns_server: Any, default: str,
                                                  override: bool | None,
                                                  expected: bool) -> None:
    from tests.conftest import make_settings, run_stack

    settings = make_settings(tmp_path, dns_server, INBOX_DB_SYNC="false",
                             SMTP_OUTBOUND_DNSSEC_VALIDATE=default)
    async with run_stack(settings, dns_server, workers=False) as stack:
        tenant = await make_tenant(stack.services, dns_server)
        data = await stack.api(SET, {"d": tenant.domain, "v": override}, key=tenant.key)
        payload = data["data"]["setDomainOutboundTls"]
        assert payload["errors"] == [] and payload["dnssecValidate"] is override
        worker = stack.services.worker()
        job = {"org": tenant.org, "sending_domain": tenant.domain}
        assert await worker._dnssec(job) is expected


async def test_only_admins_of_the_owning_org(stack: Stack) -> None:
    a = await make_tenant(stack.services, stack.dns, "a.test", name="A")
    b = await make_tenant(stack.services, stack.dns, "b.test", name="B")
    reader = await make_tenant(stack.services, stack.dns, "c.test", name="C",
                               scopes=("send", "read"))
    crossed = await stack.api(SET, {"d": "a.test", "v": False}, key=b.key)
    assert [e["code"] for e in crossed["data"]["setDomainOutboundTls"]["errors"]] == ["NOT_FOUND"]
    denied = await stack.api(SET, {"d": "c.test", "v": False}, key=reader.key)
    assert denied["data"]["setDomainOutboundTls"]["errors"][0]["code"] == "FORBIDDEN"
    row = await stack.services.db.one("SELECT outbound_dnssec_validate FROM has_domain WHERE"
                                      " domain = 'a.test'")
    assert row[0].get("outbound_dnssec_validate") is None
    assert a.org != b.org
