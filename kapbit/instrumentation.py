"""The seam through which the engine reports what it does to traces and metrics.

The engine knows only these protocols; :class:`kapbit.otel.OpenTelemetry` implements them
with OpenTelemetry (the ``otel`` extra). Without an instrumentation
(``Options.instrumentation`` is ``None``, the default) the engine checks ``None`` and calls
nothing, so tracing costs nothing when it is off, and nothing here imports OpenTelemetry.

A workflow run on an instance gets one :class:`WorkflowObserver` (from its start, or its
resumption by a later instance, to its terminal event or the instance's end); each run of
a step action gets one :class:`StepObserver`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from kapbit.stats import Stats
from kapbit.workflow import Phase

#: The outcome a workflow ended with, as the engine counts it (``kbit.stats``).
WORKFLOW_OUTCOMES = (
    "succeeded",
    "compensated",
    "dead_lettered",
    "rejected",
    "invalid_return",
)


class StepObserver(Protocol):
    """One run (attempt) of a step action; exactly one of its methods is called, once."""

    def returned(self, returned: object) -> None:
        """The action returned ``returned`` (a ``Success``, a ``Failure``, ``None``, or
        something else: an invalid return)."""

    def raised(self, error: BaseException) -> None:
        """The action raised ``error`` (also a timeout, or a cancellation of its own)."""

    def cancelled(self) -> None:
        """The action was stopped from outside (the instance closed or was fenced)."""


class WorkflowObserver(Protocol):
    """One workflow's run on this instance."""

    #: The trace context to store in the workflow's ``WorkflowCreated`` (W3C
    #: ``traceparent`` / ``tracestate``), or ``None``.
    trace: dict[str, str] | None

    def step(self, name: str, index: int, phase: Phase, attempt: int) -> StepObserver:
        """A run of step ``index`` (``name``) in ``phase`` starts, its ``attempt``-th."""
        ...

    def retried(self, attempt: int, error: str, in_place: bool) -> None:
        """Retry ``attempt`` of the workflow was recorded (``WorkflowRetry``): by the step's
        own policy (``in_place``) or by the retry worker, after ``error``."""

    def ended(self, outcome: str, error: BaseException | None) -> None:
        """The workflow's terminal event is durable: ``outcome`` is one of
        :data:`WORKFLOW_OUTCOMES`, ``error`` what its callers get (``None`` on success)."""

    def interrupted(self, reason: str) -> None:
        """This instance stops running the workflow before its end (it closed, was
        fenced, or storage refused its creation); another instance may finish it."""


class Instrumentation(Protocol):
    """Creates the observers of an instance's workflows and watches its gauges."""

    def workflow(
        self,
        workflow_id: str,
        workflow_type: str,
        partition: int,
        resumed_from: Mapping[str, str] | None,
    ) -> WorkflowObserver:
        """A workflow starts on this instance: new (``resumed_from`` is ``None``) or
        resumed after a restart or takeover, with the trace context its
        ``WorkflowCreated`` stored (empty if it stored none)."""
        ...

    def watch(self, node_id: str, stats: Callable[[], Stats]) -> Callable[[], None]:
        """Report an instance's current state (``stats()``: in flight, retrying, gate)
        until the returned function is called."""
        ...
