"""Read models: projecting the event log into queryable state.

:class:`Projector` reads a repository from stored positions, skips zombie writes and second
copies of events, decodes the events and hands them to a :class:`ReadModel`;
:class:`StatusModel` is a ready SQLite read model of every workflow's status.
"""

from kapbit.projection.projector import (
    Position,
    ProjectedEvent,
    Projector,
    ReadModel,
    positions_at_end,
    step_label,
)
from kapbit.projection.status import StatusModel, WorkflowRow, WorkflowStatus

__all__ = [
    "Position",
    "ProjectedEvent",
    "Projector",
    "ReadModel",
    "StatusModel",
    "WorkflowRow",
    "WorkflowStatus",
    "positions_at_end",
    "step_label",
]
