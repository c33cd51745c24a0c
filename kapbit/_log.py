"""The fields every kapbit log record carries, so handlers can format them uniformly.

Each record has ``workflow_id``, ``workflow_type`` and ``partition`` attributes (``None``
where the record is not about one workflow or partition), and ``step`` (the step's name),
``step_index``, ``phase`` and ``attempt`` (``None`` where it is not about one step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kapbit.execution import WorkflowExecution


def fields(
    workflow_id: str | None = None,
    workflow_type: str | None = None,
    partition: int | None = None,
    step: str | None = None,
    step_index: int | None = None,
    phase: str | None = None,
    attempt: int | None = None,
) -> dict[str, object]:
    """``extra=`` for a log call."""
    return {
        "workflow_id": workflow_id,
        "workflow_type": workflow_type,
        "partition": partition,
        "step": step,
        "step_index": step_index,
        "phase": phase,
        "attempt": attempt,
    }


def execution_fields(execution: WorkflowExecution) -> dict[str, object]:
    """``extra=`` for a log call about one workflow execution."""
    return fields(execution.id, execution.definition.type, execution.partition)


def step_fields(
    execution: WorkflowExecution, index: int | None, phase: str, attempt: int
) -> dict[str, object]:
    """``extra=`` for a log call about a step of ``execution`` (``index`` ``None``: its
    result builder, named ``"result"``)."""
    name = "result" if index is None else execution.definition.steps[index].label
    return fields(
        execution.id,
        execution.definition.type,
        execution.partition,
        name,
        index,
        phase,
        attempt,
    )


def raised_fields(execution: WorkflowExecution, error: BaseException | None) -> dict[str, object]:
    """``extra=`` for a log call about ``error``: the step's fields when it is a
    :class:`~kapbit.execution.StepRaised`, else the workflow's."""
    from kapbit.execution import StepRaised  # imports this module

    if not isinstance(error, StepRaised):
        return execution_fields(execution)
    return step_fields(execution, error.step, error.phase, error.attempt)
