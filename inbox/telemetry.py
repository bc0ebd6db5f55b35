"""OpenTelemetry set-up: a tracer provider named after OTEL_SERVICE_NAME, optional exporter."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_configured = False


def setup_telemetry(settings: Any) -> None:
    """Install a global tracer provider once per process (idempotent)."""
    global _configured
    if _configured:
        return
    resource = Resource.create({"service.name": settings.OTEL_SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    if settings.OTEL_TRACES_EXPORTER == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True

