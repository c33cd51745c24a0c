"""OpenTelemetry traces and metrics for kapbit (the ``otel`` extra: ``opentelemetry-api``).

``Kapbit(..., options=Options(instrumentation=OpenTelemetry()))`` reports to the global
tracer and meter providers (or the ones given). There are no OpenTelemetry semantic
conventions for workflows, so kapbit's own attributes live in the ``kapbit.*`` namespace;
the general conventions are followed where they apply (``error.type``, span status
``ERROR`` and recorded exceptions for failures, durations in seconds).

Spans (all ``INTERNAL``):

- ``workflow {type}``: one per workflow run on an instance, from ``exec_workflow`` (a child
  of the caller's current span) or from its resumption by a later instance, to its
  terminal event. Its W3C trace context (``traceparent``, ``tracestate``) is stored in the
  workflow's ``WorkflowCreated`` event; a workflow resumed after a crash or a takeover gets
  a new ``workflow {type}`` span whose *parent* is that stored context, so every run of a
  workflow, on any instance, is one trace under the same parent span id.
- ``{phase} {step name}`` (``execute charge``, ``compensate reserve``): one per run of a
  step action, a child of its workflow's span, current while the action runs (spans the
  action starts are its children, in threads too).

This module is the only one of kapbit that imports OpenTelemetry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kapbit import __version__
from kapbit.stats import Stats
from kapbit.workflow import Failure, Phase, Success

__all__ = ["DURATION_BUCKETS", "OpenTelemetry"]

#: Histogram bucket boundaries (seconds) for step and workflow durations.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

_PROPAGATOR = TraceContextTextMapPropagator()
_ERROR_OUTCOMES = {"dead_lettered", "rejected", "invalid_return"}


def _error_type(error: BaseException) -> str:
    """``error.type`` of an exception: its fully qualified class name."""
    kind = type(error)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


class _StepRun:
    """The span of one step action run, current while the action runs."""

    __slots__ = ("_attributes", "_metrics", "_span", "_started", "_token")

    def __init__(self, span: Span, attributes: dict[str, str], metrics: _Instruments) -> None:
        self._span = span
        self._attributes = attributes
        self._metrics = metrics
        self._started = time.perf_counter()
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def _end(self, outcome: str, error_type: str | None = None) -> None:
        otel_context.detach(self._token)
        span = self._span
        span.set_attribute("kapbit.step.outcome", outcome)
        attributes = {**self._attributes, "kapbit.step.outcome": outcome}
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            attributes["error.type"] = error_type
        span.end()
        self._metrics.step_duration.record(time.perf_counter() - self._started, attributes)

    def returned(self, returned: object) -> None:
        if returned is None or isinstance(returned, Success):
            self._end("success")
        elif isinstance(returned, Failure):
            self._span.set_status(Status(StatusCode.ERROR, "the step returned Failure"))
            self._end("failure", "kapbit.Failure")
        else:
            description = f"the step returned {type(returned).__qualname__}"
            self._span.set_status(Status(StatusCode.ERROR, description))
            self._end("invalid_return", "kapbit.InvalidReturnValue")

    def raised(self, error: BaseException) -> None:
        span = self._span
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self._end("raised", _error_type(error))

    def cancelled(self) -> None:
        self._end("cancelled")


class _WorkflowRun:
    """The span of one workflow run on this instance, parent of its step spans."""

    __slots__ = (
        "_context",
        "_id",
        "_instruments",
        "_span",
        "_started",
        "_tracer",
        "_type",
        "trace",
    )

    def __init__(
        self,
        span: Span,
        workflow_id: str,
        workflow_type: str,
        tracer: trace.Tracer,
        instruments: _Instruments,
        resumed: bool,
    ) -> None:
        self._span = span
        self._id = workflow_id
        self._type = workflow_type
        self._tracer = tracer
        self._instruments = instruments
        self._started = time.perf_counter()
        self._context = trace.set_span_in_context(span)
        if resumed:
            self.trace: dict[str, str] | None = None  # the stored one stays as it was
        else:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, self._context)
            self.trace = carrier or None

    def step(self, name: str, index: int, phase: Phase, attempt: int) -> _StepRun:
        span_attributes: dict[str, str | int] = {
            "kapbit.workflow.id": self._id,
            "kapbit.workflow.type": self._type,
            "kapbit.step.name": name,
            "kapbit.step.index": index,
            "kapbit.step.phase": phase,
            "kapbit.attempt": attempt,
        }
        span = self._tracer.start_span(
            f"{phase} {name}", context=self._context, attributes=span_attributes
        )
        metric_attributes = {
            "kapbit.workflow.type": self._type,
            "kapbit.step.name": name,
            "kapbit.step.phase": phase,
        }
        return _StepRun(span, metric_attributes, self._instruments)

    def retried(self, attempt: int, error: str, in_place: bool) -> None:
        kind = "in_place" if in_place else "retry_worker"
        self._span.add_event(
            "kapbit.retry",
            {"kapbit.attempt": attempt, "kapbit.retry.kind": kind, "kapbit.retry.error": error},
        )
        self._instruments.retries.add(
            1, {"kapbit.workflow.type": self._type, "kapbit.retry.kind": kind}
        )

    def ended(self, outcome: str, error: BaseException | None) -> None:
        span = self._span
        attributes = {"kapbit.workflow.type": self._type, "kapbit.workflow.outcome": outcome}
        span.set_attribute("kapbit.workflow.outcome", outcome)
        if error is not None and outcome in _ERROR_OUTCOMES:
            error_type = _error_type(error)
            attributes["error.type"] = error_type
            span.set_attribute("error.type", error_type)
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        if outcome == "dead_lettered":
            self._instruments.dead_letters.add(1, {"kapbit.workflow.type": self._type})
        span.end()
        self._instruments.workflow_duration.record(time.perf_counter() - self._started, attributes)

    def interrupted(self, reason: str) -> None:
        span = self._span
        span.set_attribute("kapbit.workflow.outcome", "interrupted")
        span.add_event("kapbit.interrupted", {"kapbit.reason": reason})
        span.end()


class _Instruments:
    """The synchronous instruments of one meter."""

    __slots__ = ("dead_letters", "retries", "step_duration", "workflow_duration")

    def __init__(self, meter: metrics.Meter) -> None:
        self.step_duration = meter.create_histogram(
            "kapbit.step.duration",
            unit="s",
            description="Duration of step action runs (one per attempt).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.workflow_duration = meter.create_histogram(
            "kapbit.workflow.duration",
            unit="s",
            description="Duration of workflow runs on this instance, to their terminal event.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.retries = meter.create_counter(
            "kapbit.workflow.retries",
            unit="{retry}",
            description="Retries recorded (WorkflowRetry events): in place and by the worker.",
        )
        self.dead_letters = meter.create_counter(
            "kapbit.workflow.dead_letters",
            unit="{workflow}",
            description="Workflows dead-lettered after their last retry.",
        )


class OpenTelemetry:
    """kapbit's :class:`~kapbit.instrumentation.Instrumentation` on OpenTelemetry.

    ``tracer_provider`` and ``meter_provider`` default to the global ones (set by your
    SDK set-up). One object may serve several instances of a process: each reports its
    gauges under its own ``kapbit.node.id``.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("kapbit", __version__, tracer_provider)
        meter = metrics.get_meter("kapbit", __version__, meter_provider)
        self._instruments = _Instruments(meter)
        self._watched: dict[object, tuple[str, Callable[[], Stats]]] = {}
        meter.create_observable_up_down_counter(
            "kapbit.workflow.in_flight",
            callbacks=[self._observe(lambda stats: stats.in_flight)],
            unit="{workflow}",
            description="Workflows in flight on the instance (new, resumed and retrying).",
        )
        meter.create_observable_up_down_counter(
            "kapbit.workflow.retrying",
            callbacks=[self._observe(lambda stats: stats.retrying)],
            unit="{workflow}",
            description="Workflows waiting in the retry worker.",
        )
        meter.create_observable_gauge(
            "kapbit.gate.open",
            callbacks=[self._observe(lambda stats: int(stats.gate_open))],
            unit="1",
            description="The entry gate: 1 open, 0 closed (a circuit breaker is open).",
        )
        meter.create_observable_gauge(
            "kapbit.checkpoint.snapshot_size",
            callbacks=[self._observe(lambda stats: stats.snapshot_bytes)],
            unit="By",
            description="Bytes of the latest snapshot checkpoints, over the partitions.",
        )

    def _observe(
        self, value: Callable[[Stats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(value(stats()), {"kapbit.node.id": node_id})
                for node_id, stats in list(self._watched.values())
            ]

        return callback

    def workflow(
        self,
        workflow_id: str,
        workflow_type: str,
        partition: int,
        resumed_from: Mapping[str, str] | None,
    ) -> _WorkflowRun:
        parent = None if resumed_from is None else _PROPAGATOR.extract(resumed_from)
        if resumed_from is not None and not resumed_from:
            parent = otel_context.Context()  # stored none: a new trace, not the caller's
        span = self._tracer.start_span(
            f"workflow {workflow_type}",
            context=parent,
            attributes={
                "kapbit.workflow.id": workflow_id,
                "kapbit.workflow.type": workflow_type,
                "kapbit.workflow.partition": partition,
                "kapbit.workflow.resumed": resumed_from is not None,
            },
        )
        return _WorkflowRun(
            span,
            workflow_id,
            workflow_type,
            self._tracer,
            self._instruments,
            resumed_from is not None,
        )

    def watch(self, node_id: str, stats: Callable[[], Stats]) -> Callable[[], None]:
        key = object()
        self._watched[key] = (node_id, stats)

        def unwatch() -> None:
            self._watched.pop(key, None)

        return unwatch
