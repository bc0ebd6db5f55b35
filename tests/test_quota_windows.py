"""Quota counters: one record per sending domain; windows roll over by time, a caller whose
clock is behind counts into the newer window, queued jobs free up on delivery, and counters
of the old three-record form are folded in at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from inbox.app import build_services, running_workers
from inbox.errors import QuotaExceeded
from inbox.message import OutboundMessage
from inbox.storage.schema import migrate
from inbox.submission import SubmitOptions, submit
from inbox.tenancy import Principal, set_domain_quotas
from tests.conftest import make_settings, make_tenant, route_to_sink

T0 = datetime(2026, 11, 22, 8, 30, tzinfo=UTC)


@pytest.fixture
async def services(tmp_path: Any, dns_server: Any, smtp_sink: Any) -> AsyncIterator[Any]:
    settings = make_settings(tmp_path, dns_server, INBOX_DB_SYNC="false",
                             SMTP_OUTBOUND_PORT=smtp_sink.port)
    opened = await build_services(settings)
    yield opened
    await opened.db.close()


async def _send(services: Any, tenant: Any, n: int, now: datetime) -> Any:
    principal = Principal(tenant.org, "key_test", frozenset({"send"}))
    msg = OutboundMessage(from_=f"a@{tenant.domain}", to=[f"u{i}@dest.test" for i in range(n)],
                          subject="hi", text_body="x")
    return await submit(services.db, principal, msg, SubmitOptions(),
                        settings=services.settings, now=now)


async def test_hour_and_day_windows(services: Any, dns_server: Any) -> None:
    tenant = await make_tenant(services, dns_server)
    await set_domain_quotas(services.db, tenant.org, tenant.domain, {
        "quota_hourly_send_limit": 3, "quota_daily_send_limit": 5})
    await _send(services, tenant, 3, T0)
    with pytest.raises(QuotaExceeded) as hourly:
        await _send(services, tenant, 1, T0 + timedelta(minutes=20))
    assert hourly.value.limit == "hourly_send_limit"
    # The next hour has room again, but the day only has two left.
    await _send(services, tenant, 2, T0 + timedelta(hours=1))
    # A sender whose clock is still in the earlier hour counts into the newer one: it is
    # refused (that window is full) instead of resetting the counter.
    with pytest.raises(QuotaExceeded) as behind:
        await _send(services, tenant, 2, T0 + timedelta(minutes=50))
    assert behind.value.limit == "hourly_send_limit"
    with pytest.raises(QuotaExceeded) as daily:
        await _send(services, tenant, 1, T0 + timedelta(hours=2))
    assert daily.value.limit == "daily_send_limit"
    await _send(services, tenant, 3, T0 + timedelta(days=1))  # a new day
    counter = await services.db.one(
        "SELECT * FROM ONLY type::thing('quota_counter', [$d, 'send'])", {"d": tenant.domain})
    assert (counter["hour"], counter["hour_n"], counter["day"], counter["day_n"]) == (
        "2026112308", 3, "20261123", 3)


async def test_queued_jobs_free_up_when_delivered(services: Any, dns_server: Any,
                                                  smtp_sink: Any) -> None:
    tenant = await make_tenant(services, dns_server)
    route_to_sink(dns_server, "dest.test")
    await set_domain_quotas(services.db, tenant.org, tenant.domain,
                            {"quota_max_queued_jobs": 2})
    now = datetime.now(UTC)
    await _send(services, tenant, 1, now)
    await _send(services, tenant, 1, now)
    with pytest.raises(QuotaExceeded) as queued:
        await _send(services, tenant, 1, now)
    assert queued.value.limit == "max_queued_jobs"
    async with running_workers(services):
        await asyncio.wait_for(smtp_sink.wait_for(2), 15)
        for _ in range(100):
            counter = await services.db.one(
                "SELECT VALUE queued FROM ONLY type::thing('quota_counter', [$d, 'send'])",
                {"d": tenant.domain})
            if counter == 0:
                break
            await asyncio.sleep(0.05)
        assert counter == 0
        await _send(services, tenant, 1, datetime.now(UTC))  # room again


async def test_old_counters_are_folded_in_once(services: Any) -> None:
    db = services.db
    await db.run("""
        CREATE type::thing('quota_counter', ['a.test', 'hour', '2026112207']) SET n = 50;
        CREATE type::thing('quota_counter', ['a.test', 'hour', '2026112208']) SET n = 7;
        CREATE type::thing('quota_counter', ['a.test', 'day', '20261122']) SET n = 57;
        CREATE type::thing('quota_counter', ['a.test', 'queued', 0]) SET n = 3;
        CREATE type::thing('quota_counter', ['b.test', 'queued', 0]) SET n = 2;""")
    await migrate(db)
    await migrate(db)  # nothing left to fold: counts are not doubled
    rows = {r["id"][0]: r for r in await db.one("SELECT * FROM quota_counter")}
    assert set(rows) == {"a.test", "b.test"}
    a = rows["a.test"]
    assert (a["hour"], a["hour_n"], a["day"], a["day_n"], a["queued"]) == (
        "2026112208", 7, "20261122", 57, 3)
    assert rows["b.test"]["queued"] == 2
