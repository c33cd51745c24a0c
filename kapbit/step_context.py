"""What a running step knows about itself: :func:`context`.

Inside a step action (sync or async) ``kapbit.context()`` returns a :class:`StepContext`:
the workflow's id and type, the step's name and index, the phase, the attempt number and
the node id of the instance running it. It is what a step needs for its logs and for
idempotency keys towards other services, e.g. ``f"{ctx.workflow_id}/{ctx.step_name}"``:
the same key on every attempt and after a restart, so the provider deduplicates a step
that kapbit runs again.

The context lives in a :mod:`contextvars` variable; kapbit copies it into the thread a sync
action runs in. Around each action kapbit sets only the context's fields (a tuple), and
:func:`context` builds the :class:`StepContext` when asked: most actions never ask.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Literal, TypeAlias

import msgspec

from kapbit.errors import NoStepContext


class StepContext(msgspec.Struct, frozen=True):
    """The step action being run.

    ``step_name`` is the step's ``name`` (or its execute action's function name);
    ``attempt`` counts this step's recorded attempts, 1 on the first run: every retry
    (in place or by the retry worker) is a ``WorkflowRetry`` event in the log, so it goes
    on counting after a restart. A step resumed after a crash without such an event runs
    again with the same number; an idempotency key should not include it. (A msgspec
    Struct: one is built for every action run, and that is ten times cheaper.)
    """

    workflow_id: str
    workflow_type: str
    step_name: str
    step_index: int
    phase: Literal["execute", "compensate"]
    attempt: int
    node_id: str


#: The fields of a :class:`StepContext`, in its order.
StepFields: TypeAlias = tuple[str, str, str, int, Literal["execute", "compensate"], int, str]

#: The context of the step action running in this task or thread, as its fields; kapbit
#: sets it around each action (read it with :func:`context`).
CURRENT_STEP: ContextVar[StepFields] = ContextVar("kapbit_step_context")


def context() -> StepContext:
    """The context of the step action running in this task or thread.

    Raises :class:`~kapbit.errors.NoStepContext` outside a step action (the result builder
    has none either).
    """
    try:
        fields = CURRENT_STEP.get()
    except LookupError:
        raise NoStepContext("kapbit.context() is only available inside a step action") from None
    return StepContext(*fields)
