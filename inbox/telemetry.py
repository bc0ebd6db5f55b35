"""OpenTelemetry set-up: a tracer provider named after OTEL_SERVICE_NAME, optional exporter.

Spans are recorded only once something can read them: until a span processor is added (the
console exporter, or one added in code, as the tests do) the sampler drops every span. Trace
ids still propagate, but the per-span bookkeeping (ids, attributes, timing: ~0.1 ms of the event
loop per request in the send benchmark) is skipped when `OTEL_TRACES_EXPORTER=none`. The standard
`OTEL_TRACES_SAMPLER` (with `OTEL_TRACES_SAMPLER_ARG`), when set, decides instead; both are
read by Settings like every other variable, never here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)

_configured = False

# OTEL_TRACES_SAMPLER values without an argument (config.py lists every accepted value).
_FIXED_SAMPLERS: dict[str, Sampler] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": ParentBased(ALWAYS_ON),
    "parentbased_always_off": ParentBased(ALWAYS_OFF),
}


class _WhenRead(Sampler):
    """The SDK's default sampler (parent-based, always on) once spans have a reader;
    dropping every span before."""

    def __init__(self) -> None:
        self.read = False
        self._inner = ParentBased(ALWAYS_ON)

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Sequence[Any] | None = None,
                      trace_state: Any = None) -> SamplingResult:
        sampler = self._inner if self.read else ALWAYS_OFF
        return sampler.should_sample(parent_context, trace_id, name, kind, attributes, links,
                                     trace_state)

    def get_description(self) -> str:
        return f"WhenRead{{{self._inner.get_description()}}}"


class _Provider(TracerProvider):
    def __init__(self, resource: Resource) -> None:
        self._when_read = _WhenRead()
        super().__init__(resource=resource, sampler=self._when_read)

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self._when_read.read = True


def recording(provider: Any = None) -> bool:
    """Whether spans would be recorded: hot paths skip creating spans when not (a
    non-recording span still costs ids, a context switch-in and -out: ~3% of the event loop
    in the send benchmark)."""
    provider = provider or trace.get_tracer_provider()
    when_read = getattr(provider, "_when_read", None)
    return when_read is None or when_read.read


def configured_sampler(settings: Any) -> Sampler | None:
    """The sampler OTEL_TRACES_SAMPLER names (its standard meaning; the ratio samplers take
    OTEL_TRACES_SAMPLER_ARG), or None when it is not set."""
    name, ratio = settings.OTEL_TRACES_SAMPLER, settings.OTEL_TRACES_SAMPLER_ARG
    if name == "traceidratio":
        return TraceIdRatioBased(ratio)
    if name == "parentbased_traceidratio":
        return ParentBasedTraceIdRatio(ratio)
    return _FIXED_SAMPLERS.get(name)


def make_provider(settings: Any) -> TracerProvider:
    """The tracer provider for these settings (not installed)."""
    resource = Resource.create({"service.name": settings.OTEL_SERVICE_NAME})
    sampler = configured_sampler(settings)
    # An explicit sampler, so the SDK never reads OTEL_TRACES_SAMPLER from the environment.
    provider = (TracerProvider(resource=resource, sampler=sampler) if sampler is not None
                else _Provider(resource))
    if settings.OTEL_TRACES_EXPORTER == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


def setup_telemetry(settings: Any) -> None:
    """Install a global tracer provider once per process (idempotent)."""
    global _configured
    if _configured:
        return
    trace.set_tracer_provider(make_provider(settings))
    _configured = True
