"""The fields every kapbit log record carries, so handlers can format them uniformly.

Each record has ``workflow_id``, ``workflow_type`` and ``partition`` attributes (``None``
where the record is not about one workflow or partition).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kapbit.execution import WorkflowExecution


def fields(
    workflow_id: str | None = None,
    workflow_type: str | None = None,
    partition: int | None = None,
) -> dict[str, object]:
    """``extra=`` for a log call."""
    return {"workflow_id": workflow_id, "workflow_type": workflow_type, "partition": partition}


def execution_fields(execution: WorkflowExecution) -> dict[str, object]:
    """``extra=`` for a log call about one workflow execution."""
    return fields(execution.id, execution.definition.type, execution.partition)
