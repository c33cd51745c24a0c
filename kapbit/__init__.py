"""kapbit: a log-oriented saga orchestrator.

Define workflows as ordered steps with compensations, start a :class:`Kapbit` instance on
a repository (in memory for tests, Kafka in production) and ``await
kbit.exec_workflow(DEFINITION, id, input)``. Every state change is an event in an append-only,
partitioned log; a crash, a restart or a second instance taking over loses nothing.

The API comes in layers: ``kapbit`` is the engine (instance, definitions, outcomes, options,
errors); :mod:`kapbit.repository` the storage (``MemRepository``, ``KafkaRepository``);
:mod:`kapbit.projection` the read side (``Projector``, ``StatusModel``); :mod:`kapbit.testing`
fault injection and test helpers. See docs/ARCHITECTURE.md.
"""

import importlib as _importlib
import warnings as _warnings
from typing import Any as _Any

from kapbit import errors as _errors
from kapbit.codecs import Codec, JsonCodec, MsgpackCodec
from kapbit.errors import *  # noqa: F403  (every error, listed once: kapbit.errors.__all__)
from kapbit.events import EventKind
from kapbit.handles import OnDuplicate, WorkflowHandle, WorkflowState
from kapbit.instance import Kapbit
from kapbit.options import (
    Backoff,
    BreakerPolicy,
    CheckpointPolicy,
    Options,
    RetryPolicy,
    StepRetry,
)
from kapbit.partitioner import partition_for
from kapbit.placement import GroupOptions, Owner, Placement
from kapbit.stats import Stats
from kapbit.step_context import StepContext, context
from kapbit.timers import Sleep, SleepUntil
from kapbit.workflow import Definition, Failure, Outcome, Progress, Step, Success

__all__ = [
    "Backoff",
    "BreakerPolicy",
    "CheckpointPolicy",
    "Codec",
    "Definition",
    "EventKind",
    "Failure",
    "GroupOptions",
    "JsonCodec",
    "Kapbit",
    "OnDuplicate",
    "MsgpackCodec",
    "Options",
    "Outcome",
    "Owner",
    "Placement",
    "Progress",
    "RetryPolicy",
    "Stats",
    "Step",
    "StepContext",
    "Sleep",
    "SleepUntil",
    "StepRetry",
    "Success",
    "WorkflowHandle",
    "WorkflowState",
    "context",
    "partition_for",
]
__all__ += _errors.__all__

# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.1.0"

#: Names that moved to their layer; still importable from ``kapbit`` with a warning.
_MOVED = {
    "Checkpoint": "kapbit.repository",
    "MemRepository": "kapbit.repository",
    "Record": "kapbit.repository",
    "Repository": "kapbit.repository",
    "Position": "kapbit.projection",
    "ProjectedEvent": "kapbit.projection",
    "Projector": "kapbit.projection",
    "ReadModel": "kapbit.projection",
    "StatusModel": "kapbit.projection",
    "WorkflowRow": "kapbit.projection",
    "WorkflowStatus": "kapbit.projection",
}


def __getattr__(name: str) -> _Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'kapbit' has no attribute {name!r}")
    _warnings.warn(
        f"kapbit.{name} moved: import it from {module}", DeprecationWarning, stacklevel=2
    )
    return getattr(_importlib.import_module(module), name)
