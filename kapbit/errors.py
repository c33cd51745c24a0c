"""Every exception kapbit raises, grouped under :class:`KapbitError`.

Callers of :meth:`kapbit.Kapbit.exec_workflow` can tell each refusal apart by type;
none of the refusals raised before ``WorkflowCreated`` is written leaves anything in the log.
"""

from __future__ import annotations

from collections.abc import Callable


class KapbitError(Exception):
    """Base class of every kapbit error."""


# --- refusals of exec_workflow (nothing written) -------------------------------------------


class InstanceClosed(KapbitError):
    """The instance is not started, is closing, or has been closed."""


class GateClosed(KapbitError):
    """The entry gate is closed because a circuit breaker opened; try again later."""


class UnknownWorkflowType(KapbitError):
    """No definition is registered under the requested workflow type."""

    def __init__(self, workflow_type: str, known: list[str], where: str = "") -> None:
        super().__init__(
            f"unknown workflow type {workflow_type!r}{where}; "
            f"registered: {', '.join(known) or 'none'}"
        )
        self.workflow_type = workflow_type


class DuplicateWorkflow(KapbitError):
    """A workflow with this id was already started (in flight or in the idempotency window)."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id!r} was already started")
        self.workflow_id = workflow_id


class TooManyWorkflows(KapbitError):
    """``max_workflows`` workflows are already in flight on this instance."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"max_workflows ({limit}) workflows already in flight")
        self.limit = limit


class EncodeError(KapbitError):
    """A value could not be encoded by the codec."""


class DecodeError(KapbitError):
    """Bytes could not be decoded into the expected type."""


class InvalidDefinition(KapbitError):
    """A workflow definition is malformed (no steps, duplicate type, non-callable action...)."""


class InvalidWorkflowId(KapbitError):
    """A workflow id is empty, not a string, or not valid UTF-8 text."""


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
    """A step action returned neither ``Success``, ``Failure`` nor ``None``.

    A programming error, not a business answer: the workflow is terminated at once (an
    ``InvalidReturn`` event, no compensation) and the action is never run again.
    ``step`` is the step's index, ``phase`` ``"execute"`` or ``"compensate"``, ``reason``
    names the step and the type it returned.
    """

    def __init__(self, workflow_id: str, step: int, phase: str, reason: str) -> None:
        super().__init__(f"workflow {workflow_id!r} ended: {reason}")
        self.workflow_id = workflow_id
        self.step = step
        self.phase = phase
        self.reason = reason


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


class CircuitBreakerOpen(KapbitError):
    """Raise from a step when a downstream dependency's breaker is open.

    kapbit treats it like ``pybreaker.CircuitBreakerError``: the entry gate closes and
    the workflow goes to the retry worker's slow mode.
    """


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
