"""Pytest fixtures for SMTP: real local SMTP servers (`SmtpSink`) started per test.

Import them into a test module (the names must stay as imported):

    from tests.support.fixtures_smtp import smtp_sink, smtp_sink_tls  # noqa: F401

Also: `make_smtp_sink` (several sinks in one test), `refused_port` (nothing listening).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.smtpsink import SmtpSink, make_self_signed_context


def quiet_aiosmtpd() -> None:
    # aiosmtpd logs a deprecation warning on every AUTH (ENGINE-NOTES) and every session event.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


# Each fixture stands alone, so a test module can import just the ones it uses.


@pytest.fixture
def make_smtp_sink() -> Iterator[Callable[..., SmtpSink]]:
    """Start extra sinks: `make_smtp_sink(**SmtpSink kwargs)`; all stopped after the test."""
    quiet_aiosmtpd()
    sinks: list[SmtpSink] = []

    def make(**kwargs: Any) -> SmtpSink:
        sink = SmtpSink(**kwargs).start()
        sinks.append(sink)
        return sink

    try:
        yield make
    finally:
        for sink in sinks:
            sink.stop()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A started plaintext `SmtpSink` on 127.0.0.1 (SMTPUTF8, 8BITMIME, SIZE; no STARTTLS)."""
    quiet_aiosmtpd()
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def smtp_sink_tls() -> Iterator[SmtpSink]:
    """A started `SmtpSink` offering STARTTLS with a throwaway self-signed certificate."""
    quiet_aiosmtpd()
    with SmtpSink(tls_context=make_self_signed_context("sink.test")) as sink:
        yield sink


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A localhost port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
