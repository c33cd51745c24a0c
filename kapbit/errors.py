"""Every exception kapbit raises, grouped under :class:`KapbitError`.

Callers of :meth:`kapbit.Kapbit.exec_workflow` can tell each refusal apart by type; a
:class:`WorkflowRefused` guarantees that nothing of the workflow was written. The tree::

    KapbitError
    ├── WorkflowRefused            exec_workflow refused; nothing was written
    │   ├── GateClosed             a circuit breaker is open
    │   ├── UnknownWorkflowType    no such definition registered (also: start, for the log)
    │   ├── InvalidWorkflowId      empty or not a string
    │   ├── DuplicateWorkflow      the id is running or in the idempotency window
    │   ├── TooManyWorkflows       max_workflows in flight
    │   └── InvalidInput           the input is not of the declared input type (an EncodeError too)
    ├── InstanceClosed             not started / closing / closed (a refusal if raised at the call)
    ├── WillRetryLater             a step raised; the retry worker resumes the workflow
    ├── WorkflowRejected           storage refused one of the workflow's events; terminated
    ├── InvalidReturnValue         an action returned a wrong value or type; terminated
    ├── DeadLettered               the retry worker gave up; terminated
    ├── WorkflowNotFound           wait_result: this instance does not know the id
    ├── RequestTimedOut            a forwarded call got no answer from the id's owner in time
    ├── InvalidDefinition          a malformed definition (at definition or instance creation)
    ├── NoStepContext              kapbit.context() called outside a step action
    ├── StepTimedOut               an action overran its step's timeout (counts as raised)
    ├── NonRetryable               raise it from an action: the step fails, the saga compensates
    ├── CircuitBreakerOpen         raise it from an action: a dependency's breaker is open
    ├── InvalidTimer               a Sleep / SleepUntil with a bad delay or moment
    ├── InvalidSchedule            a Schedule with a bad cron expression, interval or field
    ├── EncodeError                a value the codec cannot encode
    ├── DecodeError                bytes that do not decode as the expected type
    ├── InvalidAppend              an ActiveWriter given to Repository.append, not claim()
    └── StorageError
        ├── TransientStorageError  unreachable or timed out; retried
        ├── RecordRejected         refused for good (at exec_workflow: nothing was written)
        │   └── PayloadTooLarge
        ├── Fenced                 another instance took over the log
        ├── CorruptRecord          a record in the log cannot be decoded
        └── StartupError           the repository cannot be used
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Every kapbit error; :mod:`kapbit` re-exports them all.
__all__ = [
    "CircuitBreakerOpen",
    "CodecMismatch",
    "CorruptRecord",
    "DeadLettered",
    "DecodeError",
    "DuplicateWorkflow",
    "EncodeError",
    "Fenced",
    "GateClosed",
    "InstanceClosed",
    "InvalidAppend",
    "InvalidDefinition",
    "InvalidInput",
    "InvalidReturnValue",
    "InvalidSchedule",
    "InvalidTimer",
    "InvalidWorkflowId",
    "KapbitError",
    "LogLost",
    "NoStepContext",
    "NonRetryable",
    "PayloadTooLarge",
    "RecordRejected",
    "RequestTimedOut",
    "StartupError",
    "StepTimedOut",
    "StorageError",
    "TooManyWorkflows",
    "TransientStorageError",
    "UnknownWorkflowType",
    "WillRetryLater",
    "WorkflowNotFound",
    "WorkflowRefused",
    "WorkflowRejected",
]


class KapbitError(Exception):
    """Base class of every kapbit error."""


# --- refusals of exec_workflow (nothing written) -------------------------------------------


class WorkflowRefused(KapbitError):
    """``exec_workflow`` refused the workflow before writing anything: nothing of it is in
    the log, and calling again (once the cause is gone) is safe."""


class InstanceClosed(KapbitError):
    """The instance is not started, is closing, or has been closed."""


class GateClosed(WorkflowRefused):
    """The entry gate is closed because a circuit breaker opened; try again later."""


class UnknownWorkflowType(WorkflowRefused):
    """No definition is registered under the requested workflow type."""

    def __init__(self, workflow_type: str, known: list[str], where: str = "") -> None:
        super().__init__(
            f"unknown workflow type {workflow_type!r}{where}; "
            f"registered: {', '.join(known) or 'none'}"
        )
        self.workflow_type = workflow_type


class DuplicateWorkflow(WorkflowRefused):
    """A workflow with this id was already started (in flight or in the idempotency window)."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id!r} was already started")
        self.workflow_id = workflow_id


class TooManyWorkflows(WorkflowRefused):
    """``max_workflows`` workflows are already running on this instance, or, with
    ``name="max_sleeping"``, running and sleeping ones together reached ``max_sleeping``.
    ``limit`` is the limit reached and ``name`` its option's name."""

    def __init__(self, limit: int, name: str = "max_workflows") -> None:
        what = "running" if name == "max_workflows" else "running or sleeping"
        super().__init__(f"{name} ({limit}) workflows already {what}")
        self.limit = limit
        self.name = name


class EncodeError(KapbitError):
    """A value could not be encoded by the codec."""


class DecodeError(KapbitError):
    """Bytes could not be decoded into the expected type."""


class InvalidDefinition(KapbitError):
    """A workflow definition is malformed (no steps, duplicate type, non-callable action...)."""


class InvalidWorkflowId(WorkflowRefused):
    """A workflow id is empty, not a string, or not valid UTF-8 text."""


class InvalidInput(WorkflowRefused, EncodeError):
    """The input of ``exec_workflow`` does not encode, or is not of the definition's
    ``input_type``. ``declared`` and ``actual`` name the two types."""

    def __init__(self, workflow_type: str, declared: str, actual: str, detail: str) -> None:
        super().__init__(
            f"input of workflow type {workflow_type!r} must be {declared}, got {actual}: {detail}"
        )
        self.workflow_type = workflow_type
        self.declared = declared
        self.actual = actual


# --- outcomes of an accepted workflow ------------------------------------------------------


class WillRetryLater(KapbitError):
    """A step raised: the workflow is durable and will be resumed by the retry worker.

    The original exception is chained as ``__cause__``. Use
    :meth:`kapbit.Kapbit.wait_result` to await the final outcome.
    """

    def __init__(self, workflow_id: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else describe_error(error, text=str)
        super().__init__(f"workflow {workflow_id!r} will be retried later: {text}")
        self.workflow_id = workflow_id


class WorkflowRejected(KapbitError):
    """Storage rejected one of the workflow's events; the workflow is terminated."""

    def __init__(self, workflow_id: str, reason: str) -> None:
        super().__init__(f"workflow {workflow_id!r} rejected: {reason}")
        self.workflow_id = workflow_id
        self.reason = reason


class InvalidReturnValue(KapbitError):
    """An action returned neither ``Success``, ``Failure`` nor ``None``, or a value that is
    not of its declared type (the step's outcome type, or the result builder's
    ``result_type``).

    A programming error, not a business answer: the workflow is terminated at once (an
    ``InvalidReturn`` event, no compensation) and the action is never run again.
    ``step`` is the step's index (``-1`` for the result builder), ``phase``
    ``"execute"`` or ``"compensate"``, ``reason`` names the step and the types;
    ``declared`` and ``actual`` are the declared and the returned type's names (``declared``
    is ``None`` when the action returned no ``Success`` / ``Failure`` at all).
    """

    def __init__(
        self,
        workflow_id: str,
        step: int,
        phase: str,
        reason: str,
        declared: str | None = None,
        actual: str | None = None,
    ) -> None:
        super().__init__(f"workflow {workflow_id!r} ended: {reason}")
        self.workflow_id = workflow_id
        self.step = step
        self.phase = phase
        self.reason = reason
        self.declared = declared
        self.actual = actual


class DeadLettered(KapbitError):
    """The retry worker gave up on the workflow after its retry limit."""

    def __init__(self, workflow_id: str, attempts: int, error: str) -> None:
        super().__init__(
            f"workflow {workflow_id!r} dead-lettered after {attempts} attempts: {error}"
        )
        self.workflow_id = workflow_id
        self.attempts = attempts
        self.error = error


class WorkflowNotFound(KapbitError):
    """This instance knows no workflow with that id."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"no workflow {workflow_id!r} is known to this instance")
        self.workflow_id = workflow_id


class RequestTimedOut(KapbitError):
    """A call for an id whose partition another instance owns was forwarded, and no owner
    answered within ``Options.forward_timeout`` (a rebalance or a failover took longer, or
    no instance serves the partition). Not a refusal: the owner may still serve the
    request, so a ``start`` or ``exec`` may yet create the workflow; ask again with
    ``on_duplicate="attach"`` or ``get_workflow(id)``."""

    def __init__(self, workflow_id: str, op: str, partition: int, timeout: float) -> None:
        super().__init__(
            f"no owner of partition {partition} answered the forwarded {op} of workflow "
            f"{workflow_id!r} within {timeout:g} s; a start may still be served: ask again "
            "with on_duplicate='attach'"
        )
        self.workflow_id = workflow_id
        self.op = op
        self.partition = partition
        self.timeout = timeout


class NoStepContext(KapbitError):
    """:func:`kapbit.context` was called outside a step action."""


class StepTimedOut(KapbitError):
    """A step action ran longer than its step's ``timeout`` and was cancelled.

    It counts as a raised error: the step is retried (its own policy or the retry worker),
    and this error's text, naming the step and the timeout, is what the ``WorkflowRetry``
    and ``DeadLetter`` events record. A sync action's thread cannot be stopped; its late
    result is discarded.
    """

    def __init__(self, workflow_id: str, step: str, phase: str, timeout: float) -> None:
        super().__init__(
            f"workflow {workflow_id!r}: step {step!r} ({phase}) timed out after {timeout:g} s"
        )
        self.workflow_id = workflow_id
        self.step = step
        self.phase = phase
        self.timeout = timeout


class NonRetryable(KapbitError):
    """Raise from a step action when retrying cannot help ("card expired").

    The step fails for good: it ends with ``Failure(value)`` (``value`` defaults to the
    message), so the saga compensates what succeeded before, instead of retrying. The value
    must be of the step's outcome type (a ``str`` message needs an outcome type that
    admits ``str``). Raised from a compensation, it fails the compensation, which stops the
    rollback there.
    """

    def __init__(self, message: str, *, value: Any = None) -> None:
        super().__init__(message)
        self.value = message if value is None else value


class CircuitBreakerOpen(KapbitError):
    """Raise from a step when a downstream dependency's breaker is open.

    kapbit treats it like ``pybreaker.CircuitBreakerError``: the entry gate closes and
    the workflow goes to the retry worker's slow mode.
    """


class InvalidTimer(KapbitError):
    """A :class:`kapbit.timers.Sleep` or :class:`~kapbit.timers.SleepUntil` was built with a
    negative delay, a naive datetime or a value of the wrong type."""


class InvalidSchedule(KapbitError):
    """A :class:`kapbit.schedules.Schedule` is malformed; ``schedule`` names it and
    ``expression`` is the offending cron expression or field value."""

    def __init__(self, schedule: str, expression: str, reason: str) -> None:
        super().__init__(f"schedule {schedule!r}: {expression!r} is not valid: {reason}")
        self.schedule = schedule
        self.expression = expression
        self.reason = reason


# --- storage ---------------------------------------------------------------------------------


class StorageError(KapbitError):
    """Base class of repository errors."""


class TransientStorageError(StorageError):
    """The storage is unreachable or timed out; the emitter retries."""


class RecordRejected(StorageError):
    """The storage refused a record for good (too large, invalid); retrying cannot help."""


class PayloadTooLarge(RecordRejected):
    """A record is over the repository's payload limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class InvalidAppend(KapbitError, ValueError):
    """A call of the repository seam with a kind it does not take there: an
    ``ActiveWriter`` goes through ``Repository.claim``, never ``append`` (a programming
    error in a backend's caller; nothing is written)."""


class Fenced(StorageError):
    """Another instance took over the log: this instance may no longer write."""


class LogLost(Fenced):
    """The log no longer holds records this instance had confirmed (the broker lost its
    data, or the topic was deleted and created again). The instance stops as when fenced:
    it fails every caller and writes nothing more; an operator must restore the log."""


class CorruptRecord(StorageError):
    """A record in the log cannot be decoded."""

    def __init__(self, partition: int, offset: int, cause: str) -> None:
        super().__init__(f"corrupt record at partition {partition}, offset {offset}: {cause}")
        self.partition = partition
        self.offset = offset
        self.cause = cause


class StartupError(StorageError):
    """The repository cannot be used (missing topic, wrong partition count, no access), or
    the start did not finish within ``Options.start_timeout``."""


class CodecMismatch(CorruptRecord):
    """The log was written with another codec than this instance's: the start refuses
    before writing anything, so encodings are never mixed."""


def describe_error(error: BaseException, text: Callable[[object], str] = repr) -> str:
    """``repr(error)`` (or ``text(error)``) for logs and events; user exceptions whose
    ``__repr__``/``__str__`` raise are described by their type instead of failing."""
    try:
        return text(error)
    except Exception as exc:
        return f"<{type(error).__qualname__}, unprintable: {type(exc).__name__}>"
