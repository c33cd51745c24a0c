"""kapbit.otel with the OpenTelemetry SDK's in-memory exporters: spans, their parents,
attributes and statuses, a trace continued by the instance that resumes a workflow, and
the metrics; and that without it the engine loads nothing of OpenTelemetry."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import kapbit
from kapbit import (
    Backoff,
    CheckpointPolicy,
    DeadLettered,
    Definition,
    Failure,
    Kapbit,
    Progress,
    Step,
    StepRetry,
    Success,
    WillRetryLater,
)
from kapbit.events import WorkflowCreated
from kapbit.otel import OpenTelemetry
from kapbit.repository import MemRepository
from tests.helpers import LogCapture, fast_options, log_events, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass
class Telemetry:
    """An SDK tracer and meter provider that keep what they get in memory."""

    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider
    instrumentation: OpenTelemetry

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        spans = self.spans.get_finished_spans()
        return [s for s in spans if name is None or s.name == name]

    def points(self, metric: str) -> list[Any]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for m in scope.metrics
            if m.name == metric
            for point in m.data.data_points
        ]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Telemetry(spans, reader, tracer_provider, OpenTelemetry(tracer_provider, meter_provider))
    tracer_provider.shutdown()
    meter_provider.shutdown()


def order_saga(charge_behaviour: dict[str, Any]) -> Definition[dict[str, int], str, str]:
    """reserve (compensated by release), then charge, as ``charge_behaviour`` says."""

    async def reserve(order: dict[str, int], _: Progress) -> Success[str]:
        return Success("reserved")

    async def release(order: dict[str, int], _: Progress) -> Success[str]:
        return Success("released")

    async def charge(order: dict[str, int], _: Progress) -> Success[str] | Failure[str]:
        gate = charge_behaviour.get("gate")
        if gate is not None:
            charge_behaviour["entered"].set()
            await gate.wait()
        if kapbit.context().attempt <= charge_behaviour.get("raise_attempts", 0):
            raise ConnectionError("provider busy")
        if charge_behaviour.get("always_raise"):
            raise ConnectionError("provider down")
        if order["amount"] > 1_000:
            return Failure("declined")
        return Success("charged")

    retry = charge_behaviour.get("retry")
    return Definition(
        "order",
        steps=[
            Step(reserve, release, name="reserve"),
            Step(charge, name="charge", retry=retry),
        ],
        result=lambda order, progress: "compensated" if progress.failed else "charged",
        input_type=dict[str, int],
        outcome_type=str,
        result_type=str,
    )


async def test_a_workflow_and_its_steps_are_spans_under_the_callers_span(
    telemetry: Telemetry,
) -> None:
    definition = order_saga({})
    options = fast_options(instrumentation=telemetry.instrumentation)
    tracer = telemetry.tracer_provider.get_tracer("test")
    repository = MemRepository()
    async with Kapbit([definition], repository, options=options) as kbit:
        with tracer.start_as_current_span("POST /orders") as request:
            assert await kbit.exec_workflow(definition, "o-1", {"amount": 5_000}) == "compensated"

    (workflow,) = telemetry.finished("workflow order")
    assert workflow.parent is not None
    assert workflow.parent.span_id == request.get_span_context().span_id
    assert workflow.context.trace_id == request.get_span_context().trace_id
    assert workflow.attributes == {
        "kapbit.workflow.id": "o-1",
        "kapbit.workflow.type": "order",
        "kapbit.workflow.partition": 0,
        "kapbit.workflow.resumed": False,
        "kapbit.workflow.outcome": "compensated",
    }
    assert workflow.status.status_code is StatusCode.UNSET  # compensating is a normal end

    steps = [s for s in telemetry.finished() if s.name not in ("workflow order", "POST /orders")]
    assert [s.name for s in steps] == ["execute reserve", "execute charge", "compensate reserve"]
    for span in steps:
        assert span.parent is not None and span.parent.span_id == workflow.context.span_id
        assert span.context.trace_id == workflow.context.trace_id
    charge = steps[1]
    assert charge.attributes == {
        "kapbit.workflow.id": "o-1",
        "kapbit.workflow.type": "order",
        "kapbit.step.name": "charge",
        "kapbit.step.index": 1,
        "kapbit.step.phase": "execute",
        "kapbit.attempt": 1,
        "kapbit.step.outcome": "failure",
        "error.type": "kapbit.Failure",
    }
    assert charge.status.status_code is StatusCode.ERROR
    assert steps[0].status.status_code is StatusCode.UNSET
    assert steps[2].attributes is not None
    assert steps[2].attributes["kapbit.step.phase"] == "compensate"

    # The trace context of the workflow's span is what its WorkflowCreated stored.
    created = [e for _, _, e in log_events(repository) if isinstance(e, WorkflowCreated)]
    assert created[0].trace is not None
    trace_id, span_id = created[0].trace["traceparent"].split("-")[1:3]
    assert int(trace_id, 16) == workflow.context.trace_id
    assert int(span_id, 16) == workflow.context.span_id


async def test_a_span_a_user_starts_in_a_step_is_a_child_of_the_steps_span(
    telemetry: Telemetry,
) -> None:
    tracer = telemetry.tracer_provider.get_tracer("test")

    def call_provider(order: dict[str, int], _: Progress) -> Success[str]:  # in a thread
        with tracer.start_as_current_span("HTTP POST"):
            return Success("ok")

    definition = Definition("call", [Step(call_provider, name="call")], result=lambda i, p: 1)
    options = fast_options(instrumentation=telemetry.instrumentation)
    async with Kapbit([definition], MemRepository(), options=options) as kbit:
        await kbit.exec_workflow(definition, "c-1", {})
    (inner,) = telemetry.finished("HTTP POST")
    (step,) = telemetry.finished("execute call")
    assert inner.parent is not None and inner.parent.span_id == step.context.span_id


async def test_a_step_retried_in_place_has_a_span_per_attempt_with_its_error(
    telemetry: Telemetry,
) -> None:
    definition = order_saga(
        {"raise_attempts": 2, "retry": StepRetry(3, Backoff(0.001, 0.002, 0.001))}
    )
    options = fast_options(instrumentation=telemetry.instrumentation)
    async with Kapbit([definition], MemRepository(), options=options) as kbit:
        assert await kbit.exec_workflow(definition, "o-2", {"amount": 10}) == "charged"

    charges = telemetry.finished("execute charge")
    assert [s.attributes["kapbit.attempt"] for s in charges if s.attributes] == [1, 2, 3]
    for failed in charges[:2]:
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.attributes is not None
        assert failed.attributes["error.type"] == "ConnectionError"
        assert failed.attributes["kapbit.step.outcome"] == "raised"
        (event,) = failed.events
        assert event.name == "exception"
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "ConnectionError"
        assert event.attributes["exception.message"] == "provider busy"
    assert charges[2].status.status_code is StatusCode.UNSET
    (workflow,) = telemetry.finished("workflow order")
    retries = [e for e in workflow.events if e.name == "kapbit.retry"]
    assert [e.attributes["kapbit.attempt"] for e in retries if e.attributes] == [1, 2]

    (retried,) = telemetry.points("kapbit.workflow.retries")
    assert retried.value == 2
    assert dict(retried.attributes) == {
        "kapbit.workflow.type": "order",
        "kapbit.retry.kind": "in_place",
    }


async def test_a_dead_lettered_workflow_is_an_error_span_and_counted(
    telemetry: Telemetry,
) -> None:
    definition = order_saga({"always_raise": True})
    options = fast_options(max_attempts=2, instrumentation=telemetry.instrumentation)
    async with Kapbit([definition], MemRepository(), options=options) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow(definition, "o-3", {"amount": 10})
        with pytest.raises(DeadLettered):
            await kbit.wait_result("o-3", timeout=5)

    (workflow,) = telemetry.finished("workflow order")
    assert workflow.status.status_code is StatusCode.ERROR
    assert workflow.attributes is not None
    assert workflow.attributes["kapbit.workflow.outcome"] == "dead_lettered"
    assert workflow.attributes["error.type"] == "kapbit.errors.DeadLettered"
    # The first run and the retry worker's two attempts each ran the step once.
    charges = telemetry.finished("execute charge")
    assert [s.attributes["kapbit.attempt"] for s in charges if s.attributes] == [1, 2, 3]
    assert all(s.parent and s.parent.span_id == workflow.context.span_id for s in charges)

    (dead,) = telemetry.points("kapbit.workflow.dead_letters")
    assert dead.value == 1
    (retried,) = telemetry.points("kapbit.workflow.retries")
    assert (retried.value, retried.attributes["kapbit.retry.kind"]) == (2, "retry_worker")
    (duration,) = telemetry.points("kapbit.workflow.duration")
    assert duration.count == 1
    assert duration.attributes["kapbit.workflow.outcome"] == "dead_lettered"


async def test_a_workflow_resumed_by_another_instance_continues_its_trace(
    telemetry: Telemetry,
) -> None:
    behaviour: dict[str, Any] = {"gate": asyncio.Event(), "entered": asyncio.Event()}
    definition = order_saga(behaviour)
    repository = MemRepository()
    options = fast_options(instrumentation=telemetry.instrumentation)
    first = Kapbit([definition], repository, options=options)
    await first.start()
    call = asyncio.create_task(first.exec_workflow(definition, "o-4", {"amount": 10}))
    await asyncio.wait_for(behaviour["entered"].wait(), 5)
    first.abort()  # a crash: the charge never finishes there, nothing more is written
    await asyncio.gather(call, return_exceptions=True)
    assert telemetry.finished("workflow order") == []  # the crashed run's span never ended
    (reserve,) = telemetry.finished("execute reserve")
    assert reserve.parent is not None
    original = reserve.parent  # the first run's workflow span

    behaviour["gate"].set()
    async with Kapbit([definition], repository, options=options) as second:
        assert await second.wait_result("o-4", timeout=5) == "charged"

    (resumed,) = telemetry.finished("workflow order")
    assert resumed.context.trace_id == original.trace_id
    assert resumed.parent is not None and resumed.parent.span_id == original.span_id
    assert resumed.attributes is not None and resumed.attributes["kapbit.workflow.resumed"]
    charges = telemetry.finished("execute charge")
    done = [s for s in charges if s.attributes and s.attributes.get("kapbit.step.outcome")]
    assert done[-1].parent is not None and done[-1].parent.span_id == resumed.context.span_id
    assert done[-1].context.trace_id == original.trace_id


async def test_a_workflow_created_without_tracing_is_resumed_in_a_trace_of_its_own(
    telemetry: Telemetry,
) -> None:
    behaviour: dict[str, Any] = {"gate": asyncio.Event(), "entered": asyncio.Event()}
    definition = order_saga(behaviour)
    repository = MemRepository()
    first = Kapbit([definition], repository, options=fast_options())
    await first.start()
    call = asyncio.create_task(first.exec_workflow(definition, "o-5", {"amount": 10}))
    await asyncio.wait_for(behaviour["entered"].wait(), 5)
    first.abort()
    await asyncio.gather(call, return_exceptions=True)
    (created,) = [e for _, _, e in log_events(repository) if isinstance(e, WorkflowCreated)]
    assert created.trace is None
    assert b"trace" not in repository.records()[1].value  # nothing written without tracing

    behaviour["gate"].set()
    tracer = telemetry.tracer_provider.get_tracer("test")
    options = fast_options(instrumentation=telemetry.instrumentation)
    with tracer.start_as_current_span("unrelated"):  # not the parent of a resumed workflow
        second = Kapbit([definition], repository, options=options)
        await second.start()
    try:
        assert await second.wait_result("o-5", timeout=5) == "charged"
    finally:
        await second.close()
    (resumed,) = telemetry.finished("workflow order")
    assert resumed.parent is None


async def test_metrics_histograms_counters_and_gauges(telemetry: Telemetry) -> None:
    behaviour: dict[str, Any] = {"gate": asyncio.Event(), "entered": asyncio.Event()}
    definition = order_saga(behaviour)
    options = fast_options(
        instrumentation=telemetry.instrumentation,
        node_id="node-a",
        # snapshot_after=0: a snapshot at every save, so the size gauge has one to show
        checkpoints=CheckpointPolicy(every=1, interval=3600.0, snapshot_after=0),
    )
    async with Kapbit([definition], MemRepository(), options=options) as kbit:
        call = asyncio.create_task(kbit.exec_workflow(definition, "o-6", {"amount": 10}))
        await asyncio.wait_for(behaviour["entered"].wait(), 5)
        (in_flight,) = telemetry.points("kapbit.workflow.in_flight")
        (gate,) = telemetry.points("kapbit.gate.open")
        assert (in_flight.value, gate.value) == (1, 1)
        assert dict(in_flight.attributes) == {"kapbit.node.id": "node-a"}
        kbit.gate.close("test")
        (gate,) = telemetry.points("kapbit.gate.open")
        assert gate.value == 0
        behaviour["gate"].set()
        assert await call == "charged"
        await kbit.exec_workflow(definition, "o-7", {"amount": 5_000})
        (in_flight,) = telemetry.points("kapbit.workflow.in_flight")
        (gate,) = telemetry.points("kapbit.gate.open")
        assert (in_flight.value, gate.value) == (0, 1)
        await wait_until(lambda: kbit.stats.snapshot_bytes > 0)  # saved after a termination
        (snapshot,) = telemetry.points("kapbit.checkpoint.snapshot_size")
        assert snapshot.value == kbit.stats.snapshot_bytes

    steps = {
        tuple(
            p.attributes[k]
            for k in ("kapbit.step.name", "kapbit.step.phase", "kapbit.step.outcome")
        ): p.count
        for p in telemetry.points("kapbit.step.duration")
    }
    assert steps == {
        ("reserve", "execute", "success"): 2,
        ("charge", "execute", "success"): 1,
        ("charge", "execute", "failure"): 1,
        ("reserve", "compensate", "success"): 1,
    }
    workflows = {
        p.attributes["kapbit.workflow.outcome"]: p
        for p in telemetry.points("kapbit.workflow.duration")
    }
    assert {k: p.count for k, p in workflows.items()} == {"succeeded": 1, "compensated": 1}
    assert all(p.sum > 0 for p in workflows.values())
    # A closed instance reports no more gauges.
    assert telemetry.points("kapbit.workflow.in_flight") == []


def test_without_the_extra_the_engine_loads_nothing_of_opentelemetry() -> None:
    code = """
import asyncio, sys
import kapbit, kapbit.cli, kapbit.testing
from kapbit import Definition, Kapbit, Step, Success
from kapbit.repository import MemRepository

async def step(input, progress):
    return Success(1)

async def main():
    definition = Definition("d", [Step(step)], result=lambda i, p: 1)
    async with Kapbit([definition], MemRepository()) as kbit:
        assert await kbit.exec_workflow(definition, "w", None) == 1

asyncio.run(main())
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_the_retrying_gauge_counts_workflows_in_the_retry_worker(
    telemetry: Telemetry,
) -> None:
    definition = order_saga({"always_raise": True})
    options = fast_options(max_attempts=1000, instrumentation=telemetry.instrumentation)
    async with Kapbit([definition], MemRepository(), options=options) as kbit:
        with pytest.raises(WillRetryLater):
            await kbit.exec_workflow(definition, "o-8", {"amount": 10})
        await wait_until(lambda: kbit.stats.retrying == 1)
        (retrying,) = telemetry.points("kapbit.workflow.retrying")
        assert retrying.value == 1


def test_the_prometheus_example_serves_kapbits_metrics() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "otel_prometheus.py"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "results: ['charged', 'charged', 'compensated', 'charged']" in out
    assert out.count("span 'workflow order'") == 4
    assert "span 'execute charge'" in out and "status=ERROR attempt=1" in out
    series = {line.split("{")[0]: line for line in out.splitlines() if line.startswith("kapbit_")}
    assert series.keys() >= {
        "kapbit_step_duration_seconds_count",
        "kapbit_workflow_duration_seconds_count",
        "kapbit_workflow_retries_total",
        "kapbit_workflow_in_flight",
        "kapbit_gate_open",
    }
    assert series["kapbit_workflow_retries_total"].endswith(" 1.0")
    assert series["kapbit_gate_open"].endswith(" 1.0")


STEP_FIELDS = ("step", "step_index", "phase", "attempt")


async def test_log_records_about_a_step_name_it_and_carry_its_attempt() -> None:
    behaviour: dict[str, Any] = {"always_raise": True}
    definition = order_saga(behaviour)

    async def refuse(order: dict[str, int], _: Progress) -> Failure[str]:
        return Failure("still held")

    held = Definition(
        "held",
        [Step(lambda o, p: Success("ok"), refuse, name="hold"), Step(lambda o, p: Failure("no"))],
        result=lambda o, p: "done",
    )
    options = fast_options(max_attempts=2)
    with LogCapture() as logs:
        async with Kapbit([definition, held], MemRepository(), options=options) as kbit:
            with pytest.raises(WillRetryLater):
                await kbit.exec_workflow(definition, "o-9", {"amount": 10})
            with pytest.raises(DeadLettered):
                await kbit.wait_result("o-9", timeout=5)
            assert await kbit.exec_workflow(held, "h-1", {}) == "done"

    raised = [r for r in logs.records if r.getMessage().startswith("workflow 'o-9': step")]
    assert len(raised) == 3  # the first run, and the retry worker's two attempts
    assert [(r.step, r.step_index, r.phase) for r in raised] == [("charge", 1, "execute")] * 3  # type: ignore[attr-defined]
    assert [r.attempt for r in raised] == [1, 2, 3]  # type: ignore[attr-defined]
    (retry,) = [r for r in logs.of("kapbit.retry") if "attempt 1 of 2 failed" in r.getMessage()]
    assert (retry.step, retry.attempt) == ("charge", 2)  # type: ignore[attr-defined]
    (compensation,) = [r for r in logs.records if "compensation of step" in r.getMessage()]
    assert "step 'hold' (0)" in compensation.getMessage()
    assert (compensation.step, compensation.step_index, compensation.phase) == (  # type: ignore[attr-defined]
        "hold",
        0,
        "compensate",
    )
    # Every record has the fields (None where it is not about a step): a formatter may rely
    # on them.
    formatter = logging.Formatter("%(step)s %(step_index)s %(phase)s %(attempt)s %(message)s")
    for record in logs.records:
        assert all(hasattr(record, name) for name in STEP_FIELDS), record.getMessage()
        formatter.format(record)


async def test_a_workflow_still_running_at_close_ends_its_span_as_interrupted(
    telemetry: Telemetry,
) -> None:
    behaviour: dict[str, Any] = {"gate": asyncio.Event(), "entered": asyncio.Event()}
    definition = order_saga(behaviour)
    options = fast_options(instrumentation=telemetry.instrumentation)
    kbit = Kapbit([definition], MemRepository(), options=options)
    await kbit.start()
    call = asyncio.create_task(kbit.exec_workflow(definition, "o-10", {"amount": 10}))
    await asyncio.wait_for(behaviour["entered"].wait(), 5)
    await kbit.close(timeout=0)  # the charge is cancelled; the workflow stays open in the log
    await asyncio.gather(call, return_exceptions=True)

    (workflow,) = telemetry.finished("workflow order")
    assert workflow.attributes is not None
    assert workflow.attributes["kapbit.workflow.outcome"] == "interrupted"
    assert workflow.status.status_code is StatusCode.UNSET
    assert [e.name for e in workflow.events] == ["kapbit.interrupted"]
    (charge,) = telemetry.finished("execute charge")
    assert charge.attributes is not None
    assert charge.attributes["kapbit.step.outcome"] == "cancelled"
    assert telemetry.points("kapbit.workflow.duration") == []  # it did not end
