"""kapbit: a log-oriented saga orchestrator.

Define workflows as ordered steps with compensations, start a :class:`Kapbit` instance on
a repository (in memory for tests, Kafka in production) and ``await
kbit.exec_workflow(DEFINITION, id, input)``. Every state change is an event in an append-only,
partitioned log; a crash, a restart or a second instance taking over loses nothing.
"""

from kapbit.codecs import Codec, JsonCodec, MsgpackCodec
from kapbit.errors import (
    CircuitBreakerOpen,
    CodecMismatch,
    CorruptRecord,
    DeadLettered,
    DecodeError,
    DuplicateWorkflow,
    EncodeError,
    Fenced,
    GateClosed,
    InstanceClosed,
    InvalidDefinition,
    InvalidInput,
    InvalidReturnValue,
    InvalidWorkflowId,
    KapbitError,
    LogLost,
    NonRetryable,
    NoStepContext,
    PayloadTooLarge,
    RecordRejected,
    StartupError,
    StepTimedOut,
    StorageError,
    TooManyWorkflows,
    TransientStorageError,
    UnknownWorkflowType,
    WillRetryLater,
    WorkflowNotFound,
    WorkflowRefused,
    WorkflowRejected,
)
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
from kapbit.projection import (
    Position,
    ProjectedEvent,
    Projector,
    ReadModel,
    StatusModel,
    WorkflowRow,
    WorkflowStatus,
)
from kapbit.repository import Checkpoint, MemRepository, Record, Repository
from kapbit.stats import Stats
from kapbit.step_context import StepContext, context
from kapbit.workflow import Definition, Failure, Outcome, Progress, Step, Success

__all__ = [
    "Backoff",
    "BreakerPolicy",
    "Checkpoint",
    "CheckpointPolicy",
    "CircuitBreakerOpen",
    "CodecMismatch",
    "Codec",
    "CorruptRecord",
    "DeadLettered",
    "DecodeError",
    "Definition",
    "DuplicateWorkflow",
    "EncodeError",
    "EventKind",
    "Failure",
    "Fenced",
    "GateClosed",
    "InstanceClosed",
    "InvalidDefinition",
    "InvalidInput",
    "InvalidReturnValue",
    "InvalidWorkflowId",
    "JsonCodec",
    "Kapbit",
    "OnDuplicate",
    "KapbitError",
    "LogLost",
    "MemRepository",
    "MsgpackCodec",
    "NoStepContext",
    "NonRetryable",
    "Options",
    "Outcome",
    "PayloadTooLarge",
    "Position",
    "Progress",
    "ProjectedEvent",
    "Projector",
    "ReadModel",
    "Record",
    "RecordRejected",
    "Repository",
    "RetryPolicy",
    "StartupError",
    "Stats",
    "StatusModel",
    "Step",
    "StepContext",
    "StepRetry",
    "StepTimedOut",
    "StorageError",
    "Success",
    "TooManyWorkflows",
    "TransientStorageError",
    "UnknownWorkflowType",
    "WillRetryLater",
    "WorkflowHandle",
    "WorkflowNotFound",
    "WorkflowRefused",
    "WorkflowRejected",
    "WorkflowRow",
    "WorkflowState",
    "WorkflowStatus",
    "context",
    "partition_for",
]

# The one place the version is written: pyproject.toml reads it (dynamic version).
__version__ = "0.1.0"
