"""Tracer provider: spans are recorded only when something can read them."""

from __future__ import annotations

import pytest

from inbox.config import load_settings
from inbox.telemetry import make_provider, recording


def _recording(exporter: str, **env: str) -> bool:
    provider = make_provider(load_settings(env={"OTEL_TRACES_EXPORTER": exporter, **env}))
    try:
        with provider.get_tracer("t").start_as_current_span("s") as span:
            return span.is_recording()
    finally:
        provider.shutdown()


def test_no_exporter_records_nothing() -> None:
    assert _recording("none") is False
    assert _recording("console") is True


def test_a_processor_added_later_turns_recording_on() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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


def test_an_explicit_sampler_wins() -> None:
    assert _recording("none", OTEL_TRACES_SAMPLER="always_on") is True
    assert _recording("console", OTEL_TRACES_SAMPLER="always_off") is False
    assert _recording("none", OTEL_TRACES_SAMPLER="traceidratio",
                      OTEL_TRACES_SAMPLER_ARG="1") is True
    assert _recording("none", OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                      OTEL_TRACES_SAMPLER_ARG="0") is False


def test_the_sampler_comes_from_settings_not_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings are the only reader of the environment: a variable the settings were not
    built from changes nothing (the SDK would otherwise read OTEL_TRACES_SAMPLER itself)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    assert _recording("none") is False
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert _recording("console") is True


@pytest.mark.parametrize(("name", "value"), [
    ("OTEL_TRACES_SAMPLER", "sometimes"),
    ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
])
def test_a_bad_sampler_setting_names_the_variable(name: str, value: str) -> None:
    from inbox.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{name}: "):
        load_settings(env={name: value})
