"""Tracer provider: spans are recorded only when something can read them."""

from __future__ import annotations

import pytest

from inbox.config import load_settings
from inbox.telemetry import make_provider, recording


def _recording(exporter: str) -> bool:
    provider = make_provider(load_settings(env={"OTEL_TRACES_EXPORTER": exporter}))
    try:
        with provider.get_tracer("t").start_as_current_span("s") as span:
            return span.is_recording()
    finally:
        provider.shutdown()


def test_no_exporter_records_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    assert _recording("none") is False
    assert _recording("console") is True


def test_a_processor_added_later_turns_recording_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    provider = make_provider(load_settings(env={}))
    tracer = provider.get_tracer("t")  # obtained before the processor, as modules do
    with tracer.start_as_current_span("before") as span:
        assert not span.is_recording()
    assert recording(provider) is False  # hot paths skip their spans altogether
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert recording(provider) is True
    with tracer.start_as_current_span("after") as span:
        assert span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["after"]
    provider.shutdown()


def test_an_explicit_sampler_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    assert _recording("none") is True
