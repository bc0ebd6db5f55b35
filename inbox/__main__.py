"""CLI: `inbox serve | worker | org create | domain add/verify | apikey create | mailbox create |
smtp-credential create/revoke | keygen | decrypt | schema`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from inbox.config import Settings, load_settings
from inbox.errors import InboxError


def _print(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    print(json.dumps(data, default=str) if args.json else human)


async def _with_services(settings: Settings, fn: Callable[[Any], Awaitable[None]]) -> None:
    from inbox.app import build_services

    services = await build_services(settings)
    try:
        await fn(services)
    finally:
        await services.db.close()


def cmd_org_create(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.tenancy import create_organization

    async def run(s: Any) -> None:
        row = await create_organization(s.db, args.name, s.clock())
        _print(args, {"id": row["id"], "name": row["name"]}, f"organization {row['id']}")

    asyncio.run(_with_services(settings, run))


def cmd_domain_add(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.tenancy import add_domain, dns_records, get_organization

    async def run(s: Any) -> None:
        await get_organization(s.db, args.org)
        row = await add_domain(s.db, s.box, args.org, args.domain, s.clock(),
                               verified=args.verified)
        records = dns_records(row)
        lines = [f"domain {row['domain']} added (verified: {row['verified']}); publish:"]
        lines += [f"  {r['name']} {r['type']} \"{r['value']}\"" for r in records]
        if not row["verified"]:
            lines.append(f"then: inbox domain verify {args.org} {row['domain']}"
                         " (or --force, for development, to skip DNS)")
        _print(args, {"domain": row["domain"], "verified": row["verified"], "records": records},
               "\n".join(lines))

    asyncio.run(_with_services(settings, run))


def cmd_domain_verify(args: argparse.Namespace, settings: Settings) -> None:
    """Look up the domain's DKIM TXT records, as the verifyDomain mutation does (the same
    code); `--force` marks it verified without DNS, for development. Exit 1 if not verified."""
    from inbox.errors import DomainNotVerified
    from inbox.tenancy import get_organization, verify_domain
    from inbox.tenancy.domains import force_verified

    async def run(s: Any) -> None:
        await get_organization(s.db, args.org)
        checks: list[dict[str, Any]] = []
        if args.force:
            row = await force_verified(s.db, args.org, args.domain, s.clock())
            print(f"inbox: warning: {row['domain']} marked verified without looking at DNS "
                  "(development only); recipients cannot check its DKIM signatures until its "
                  "TXT records are published", file=sys.stderr)
        else:
            row, checks = await verify_domain(s.db, s.verify_resolver, args.org, args.domain,
                                              s.clock())
        lines = [f"domain {row['domain']} verified: {row['verified']}"]
        lines += [f"  ok: {c['name']} {c['type']}" if c["ok"] else
                  f"  failed: {c['name']} {c['type']} \"{c['value']}\" ({c['error']})"
                  for c in checks]
        _print(args, {"domain": row["domain"], "verified": row["verified"], "checks": checks},
               "\n".join(lines))
        if not row["verified"]:
            raise DomainNotVerified(f"domain {row['domain']} is not verified: publish its TXT "
                                    "records and run this again")

    asyncio.run(_with_services(settings, run))


def cmd_apikey_create(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.tenancy import create_api_key, get_organization

    async def run(s: Any) -> None:
        await get_organization(s.db, args.org)
        row, key = await create_api_key(s.db, args.org, args.scope or ["send", "read"],
                                        s.clock(), args.name or "")
        _print(args, {"id": row["id"], "key": key, "scopes": row["scopes"]},
               f"{key}\n(shown once; scopes: {', '.join(row['scopes'])})")

    asyncio.run(_with_services(settings, run))


def cmd_smtp_credential_create(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.tenancy import get_organization
    from inbox.tenancy.smtpcreds import create_smtp_credential

    async def run(s: Any) -> None:
        await get_organization(s.db, args.org)
        row, password = await create_smtp_credential(s.db, args.org, s.clock(),
                                                     args.name or "")
        _print(args, {"id": row["id"], "username": row["id"], "password": password},
               f"username: {row['id']}\npassword: {password}\n(shown once; AUTH PLAIN or "
               "LOGIN on the submission ports, after TLS)")

    asyncio.run(_with_services(settings, run))


def cmd_smtp_credential_revoke(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.tenancy.smtpcreds import revoke_smtp_credential

    async def run(s: Any) -> None:
        row = await revoke_smtp_credential(s.db, args.org, args.id, s.clock())
        _print(args, {"id": row["id"], "revoked_at": row["revoked_at"]},
               f"SMTP credential {row['id']} revoked")

    asyncio.run(_with_services(settings, run))


def cmd_mailbox_create(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.tenancy import get_organization
    from inbox.tenancy.mailboxes import create_mailbox

    async def run(s: Any) -> None:
        await get_organization(s.db, args.org)
        row = await create_mailbox(s.db, args.org, args.domain, args.local_part, s.clock())
        _print(args, {"id": row["id"], "address": row["address"]},
               f"mailbox {row['id']} <{row['address']}>")

    asyncio.run(_with_services(settings, run))


def cmd_keygen(args: argparse.Namespace, settings: Settings) -> None:
    """An X25519 key pair for end-to-end encrypted mail: register the public key with
    setE2eePublicKey; keep the private key yourself (we never see it)."""
    from inbox.storage.envelope import generate_keypair

    private, public = generate_keypair()
    _print(args, {"private_key": private, "public_key": public},
           f"public key (register it): {public}\nprivate key (keep it secret): {private}")


def cmd_decrypt(args: argparse.Namespace, settings: Settings) -> None:
    """Decrypt an e2ee message (or attachment) as returned by the API: `raw` (base64 or the
    bytes in a file), its `wrappedKey` and the message id (and part id) it is bound to."""
    import base64
    import binascii
    from pathlib import Path

    from inbox.errors import ValidationError
    from inbox.storage.envelope import decrypt_message
    from inbox.storage.mailstore import e2ee_aad

    private = (Path(args.key_file).read_text().strip() if args.key_file
               else sys.stdin.readline().strip())
    data = Path(args.input).read_bytes() if args.input != "-" else sys.stdin.buffer.read()
    try:
        wrapped = base64.b64decode(args.wrapped_key, validate=True)
        if args.base64:
            data = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise ValidationError("--wrapped-key / input is not valid base64") from None
    plain = decrypt_message(private, wrapped, data,
                            aad=e2ee_aad(args.message_id, args.part).encode())
    if args.output in (None, "-"):
        sys.stdout.buffer.write(plain)
    else:
        Path(args.output).write_bytes(plain)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.app import serve

    serve(settings, workers=not args.no_workers)  # start-up errors: ConfigError, before uvicorn


def cmd_worker(args: argparse.Namespace, settings: Settings) -> None:
    from inbox import heap
    from inbox.app import build_services, running_workers

    async def run() -> None:
        services = await build_services(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            # The same workers as `serve` runs (delivery and the daily TLS-RPT job).
            async with running_workers(services, count=args.count):
                heap.settle()
                await stop.wait()
        finally:
            await services.db.close()

    asyncio.run(run())


def cmd_schema(args: argparse.Namespace, settings: Settings) -> None:
    from inbox.graphql import build_schema

    print(build_schema().as_str())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inbox", description="Transactional email service")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the API and delivery workers").add_argument(
        "--no-workers", action="store_true", help="API only")
    w = sub.add_parser("worker", help="run delivery workers only (needs a SurrealDB server)")
    w.add_argument("--count", type=int, default=1)
    sub.add_parser("schema", help="print the GraphQL schema (SDL)")
    org = sub.add_parser("org").add_subparsers(dest="action", required=True)
    oc = org.add_parser("create")
    oc.add_argument("name")
    dom = sub.add_parser("domain").add_subparsers(dest="action", required=True)
    da = dom.add_parser("add")
    da.add_argument("org")
    da.add_argument("domain")
    da.add_argument("--verified", action="store_true", help="mark verified (development)")
    dv = dom.add_parser("verify", help="check the domain's DKIM TXT records in DNS (as the "
                        "verifyDomain mutation does)")
    dv.add_argument("org")
    dv.add_argument("domain")
    dv.add_argument("--force", action="store_true",
                    help="mark verified without looking at DNS (development)")
    key = sub.add_parser("apikey").add_subparsers(dest="action", required=True)
    kc = key.add_parser("create")
    kc.add_argument("org")
    kc.add_argument("--scope", action="append", choices=["send", "read", "admin"])
    kc.add_argument("--name")
    mb = sub.add_parser("mailbox").add_subparsers(dest="action", required=True)
    mc = mb.add_parser("create")
    mc.add_argument("org")
    mc.add_argument("domain")
    mc.add_argument("local_part")
    sc = sub.add_parser("smtp-credential", help="SMTP submission credentials").add_subparsers(
        dest="action", required=True)
    scc = sc.add_parser("create", help="a username/password (the password is shown once)")
    scc.add_argument("org")
    scc.add_argument("--name")
    scr = sc.add_parser("revoke")
    scr.add_argument("org")
    scr.add_argument("id", help="the credential's id (its username)")
    kg = sub.add_parser("keygen", help="make an X25519 key pair for end-to-end encrypted mail")
    dc = sub.add_parser("decrypt", help="decrypt an end-to-end encrypted message or attachment")
    dc.add_argument("input", help="file with the ciphertext ('-' = stdin)")
    dc.add_argument("--wrapped-key", required=True, help="the message's wrappedKey (base64)")
    dc.add_argument("--message-id", required=True, help="the message's id (it is bound to it)")
    dc.add_argument("--part", help="attachment part id, when decrypting an attachment")
    dc.add_argument("--key-file", help="file holding the private key (default: read stdin)")
    dc.add_argument("--base64", action="store_true", help="input is base64 (as the API sends)")
    dc.add_argument("-o", "--output", help="where to write the plaintext (default: stdout)")
    for sp in (oc, da, dv, kc, mc, kg, scc, scr):
        # SUPPRESS: `inbox --json org create` must not be reset by the subcommand's default.
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    return p


COMMANDS = {
    ("serve", None): cmd_serve, ("worker", None): cmd_worker, ("schema", None): cmd_schema,
    ("org", "create"): cmd_org_create, ("domain", "add"): cmd_domain_add,
    ("domain", "verify"): cmd_domain_verify,
    ("apikey", "create"): cmd_apikey_create, ("mailbox", "create"): cmd_mailbox_create,
    ("smtp-credential", "create"): cmd_smtp_credential_create,
    ("smtp-credential", "revoke"): cmd_smtp_credential_revoke,
    ("keygen", None): cmd_keygen, ("decrypt", None): cmd_decrypt,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command and leave the process with its exit status.

    The embedded database engine keeps Rust (tokio) threads that may still call into the
    interpreter while it finalizes; now and then that aborted a finished command with a Rust
    panic ("panic in a function that cannot unwind") and a non-zero status. Everything is
    committed and closed by the time a command returns, so we flush and leave without
    finalizing (`os._exit`)."""
    code = _run(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except InboxError as exc:
        print(f"inbox: configuration error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.INBOX_LOG_LEVEL.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        COMMANDS[(args.command, getattr(args, "action", None))](args, settings)
    except InboxError as exc:
        print(f"inbox: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "CONFIG" else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
