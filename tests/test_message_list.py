"""The messages list: newest first, paged by an index range that stops at its LIMIT."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from inbox.app import build_services
from inbox.delivery.suppressions import add_suppression
from inbox.graphql.schema import message_list_sql
from inbox.message import OutboundMessage
from inbox.storage.schema import list_key, migrate
from inbox.submission import SubmitOptions, submit
from inbox.tenancy import Principal
from tests.conftest import Stack, make_settings, make_tenant, route_to_sink


@pytest.fixture
async def services(tmp_path: Any, dns_server: Any) -> AsyncIterator[Any]:
    settings = make_settings(tmp_path, dns_server, INBOX_DB_SYNC="false",
                             INBOX_QUOTA_HOURLY_SEND_LIMIT=100000,
                             INBOX_QUOTA_DAILY_SEND_LIMIT=100000)
    opened = await build_services(settings)
    yield opened
    await opened.db.close()


def test_list_key_reverses_id_order() -> None:
    from inbox.storage import new_id

    ids = [new_id("msg") for _ in range(200)]
    assert sorted(ids, key=list_key) == sorted(ids, reverse=True)


async def test_pages_come_from_an_index_range_not_a_sort(services: Any) -> None:
    for by_status in (False, True):
        plan = await services.db.one(message_list_sql(by_status) + " EXPLAIN", {
            "org": "org_x", "key": "", "limit": 5, "status": "QUEUED"})
        detail = plan[0]["detail"]
        assert plan[0]["operation"] == "Iterate Index" and detail["plan"]["index"] == \
            "message_list" and detail["plan"]["ranges"], plan
        assert all("Ordered" not in str(step["detail"]) for step in plan), plan


async def test_listing_walks_newest_first_with_and_without_status(stack: Stack) -> None:
    services = stack.services
    tenant = await make_tenant(services, stack.dns)
    other = await make_tenant(services, stack.dns, "other.test")
    route_to_sink(stack.dns, "dest.test")  # delivered, not bounced (a bounce suppresses)
    principal = Principal(tenant.org, "key_test", frozenset({"send"}))
    # Two of them go to suppressed addresses: SUPPRESSED, a status delivery never changes.
    for n in (3, 20):
        await add_suppression(services.db, tenant.org, "ADDRESS", f"u{n}@dest.test", "test",
                              datetime.now(UTC))
    sent = []
    for i in range(25):
        msg = OutboundMessage(from_=f"a@{tenant.domain}", to=[f"u{i}@dest.test"],
                              subject=f"m{i}", text_body="x")
        sent.append((await submit(services.db, principal, msg, SubmitOptions(),
                                  settings=services.settings, now=datetime.now(UTC)))["id"])
    # As with a frozen clock: the order is creation order, whatever created_at says.
    await services.db.run("UPDATE message SET created_at = $t", {"t": datetime.now(UTC)})
    query = ("query($a: String, $s: MessageStatus) { messages(first: 4, after: $a, status: $s)"
             " { edges { node { id } } pageInfo { hasNextPage endCursor } } }")

    async def walk(status: str | None, key: str) -> list[str]:
        seen: list[str] = []
        after = None
        for _ in range(20):
            data = await stack.api(query, {"a": after, "s": status}, key=key)
            conn = data["data"]["messages"]
            seen += [e["node"]["id"] for e in conn["edges"]]
            if not conn["pageInfo"]["hasNextPage"]:
                break
            after = conn["pageInfo"]["endCursor"]
        return seen

    assert await walk(None, tenant.key) == list(reversed(sent))
    assert await walk("SUPPRESSED", tenant.key) == [sent[20], sent[3]]
    assert await walk(None, other.key) == []  # another organization sees none of them


async def test_inbound_folder_pages_come_from_an_index_range(services: Any) -> None:
    # The shape MailStore.list sends (storage/mailstore.py), without optional filters.
    plan = await services.db.one(
        "SELECT * FROM inbound_message WHERE org = $org AND mailbox = $mailbox AND"
        " folder = $folder AND list_key > $key AND deleting = false LIMIT $limit EXPLAIN",
        {"org": "o", "mailbox": "m", "folder": "INBOX", "key": "", "limit": 5})
    assert plan[0]["detail"]["plan"]["index"] == "inbound_folder", plan
    assert plan[0]["detail"]["plan"]["ranges"], plan
    assert all("Ordered" not in str(step["detail"]) for step in plan), plan


async def test_rows_from_before_get_their_list_key(services: Any) -> None:
    db = services.db
    await db.run("CREATE message:msg_old1 SET org = 'o', created_at = time::now();"
                 " CREATE message:msg_old2 SET org = 'o', created_at = time::now();"
                 " CREATE inbound_message:im_old1 SET org = 'o', folder = 'INBOX';"
                 " DELETE inbox_meta:migrations;")
    await migrate(db)
    keys = await db.one("SELECT VALUE list_key FROM [message:msg_old1, message:msg_old2]")
    assert keys == [list_key("msg_old1"), list_key("msg_old2")]
    assert await db.one("SELECT VALUE list_key FROM ONLY inbound_message:im_old1") == \
        list_key("im_old1")
    # Once done, start-up does not scan the tables again.
    await db.run("CREATE message:msg_late SET org = 'o';")
    await migrate(db)
    assert await db.one("SELECT VALUE list_key FROM ONLY message:msg_late") is None
