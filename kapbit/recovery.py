"""Recovery at start: read the log, claim it, read the rest, and adopt what was open.

Everything that can be checked by reading comes before this node's first write (its
claims): the codec of the log, the checkpoint to trust (and its snapshot, if any), and
each partition up to its current end, with every open workflow rebuilt (a type this
instance lacks or a corrupt record fails the start without fencing the live owner). Then
the partitions are claimed (:class:`~kapbit.ownership.Ownership`) and only what was
written between the first read and the claim is read. See docs/ARCHITECTURE.md, "Recovery".
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from kapbit._start_retries import StartRetries
from kapbit.clock import SYSTEM_CLOCK, Clock
from kapbit.codecs import Codec
from kapbit.errors import UnknownWorkflowType
from kapbit.execution import WorkflowExecution, restore_outcome
from kapbit.fencing import OwnerTracker
from kapbit.idempotency import IdempotencyWindow
from kapbit.log_reader import ReaderState, decode_input, decode_value
from kapbit.ownership import Ownership
from kapbit.repository import Checkpoint, Repository
from kapbit.restore import (
    PartitionRestorer,
    RestoredWorkflow,
    check_codec,
    trusted_checkpoint,
)
from kapbit.snapshots import restorer_from
from kapbit.workflow import Definition


@dataclass(slots=True)
class Recovered:
    """What a start found in the log, per partition, and the workflows to resume."""

    windows: list[IdempotencyWindow]
    #: Who owned each partition where; this node's claim is the latest entry.
    owners: list[OwnerTracker]
    #: The checkpoints recovery started from (a save only moves forward from them).
    checkpoints: list[Checkpoint]
    executions: list[WorkflowExecution]
    records_read: int
    #: Each partition's state at this node's claim, for the snapshots of this start.
    states: list[ReaderState]


@dataclass(slots=True)
class RecoveredPartition:
    """What recovering one partition assigned in group mode found."""

    window: IdempotencyWindow
    owners: OwnerTracker
    checkpoint: Checkpoint
    executions: list[WorkflowExecution]
    records_read: int
    #: The partition's state at this node's claim, for its snapshots.
    state: ReaderState


class Recovery:
    """Runs the reading part of one start on ``repository`` for ``definitions``."""

    def __init__(
        self,
        repository: Repository,
        codec: Codec,
        definitions: Mapping[str, Definition],
        window_size: int,
        retries: StartRetries,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock
        self._repository = repository
        self._codec = codec
        self._definitions = definitions
        self._window_size = window_size
        self._retries = retries

    async def run(self, ownership: Ownership) -> Recovered:
        """Read and check, claim through ``ownership``, recover the rest."""
        repository, retries = self._repository, self._retries
        await retries.run("starting the repository", repository.start)
        partitions = repository.partitions
        loaded = await retries.run("loading checkpoints", repository.load_checkpoints)
        # Read first: nothing is written unless the log can be recovered as it stands.
        restorers = await asyncio.gather(
            *(self._read_before_claiming(p, loaded.get(p)) for p in range(partitions))
        )
        for restorer in restorers:
            for workflow in restorer.open.values():
                self.rebuild(restorer.partition, workflow)  # a type or input it cannot take
        claims = await ownership.claim_all(partitions)
        await asyncio.gather(
            *(
                retries.run(
                    f"recovering partition {restorer.partition}",
                    functools.partial(restorer.read_to, claims[restorer.partition]),
                )
                for restorer in restorers
            )
        )
        states = [restorer.state() for restorer in restorers]
        windows: list[IdempotencyWindow] = []
        owners: list[OwnerTracker] = []
        executions: list[WorkflowExecution] = []
        records_read = 0
        for restorer in restorers:
            part = restorer.result(claims[restorer.partition])
            windows.append(IdempotencyWindow(self._window_size, part.window))
            part.owners.claimed(part.claim_offset, ownership.writer_id)
            owners.append(part.owners)
            executions.extend(self.rebuild(part.partition, w) for w in part.in_flight)
            records_read += part.records_read
        return Recovered(
            windows, owners, [r.checkpoint for r in restorers], executions, records_read, states
        )

    async def recover_partition(
        self, partition: int, writer_id: str, claim: Callable[[int], Awaitable[int]]
    ) -> RecoveredPartition:
        """Group mode: what a start does, for one partition assigned to this instance.

        Read from the trusted checkpoint (checkpoints are keyed by log and partition, so
        the previous owner's is found) up to the end, rebuild its open workflows, claim it
        through ``claim`` (which returns the claim's offset), then read the gap."""
        retries = self._retries
        loaded = await retries.run("loading checkpoints", self._repository.load_checkpoints)
        restorer = await self._read_before_claiming(partition, loaded.get(partition))
        for workflow in restorer.open.values():
            self.rebuild(partition, workflow)  # a type or input it cannot take
        claim_offset = await claim(partition)
        await retries.run(
            f"recovering partition {partition}",
            functools.partial(restorer.read_to, claim_offset),
        )
        state = restorer.state()
        part = restorer.result(claim_offset)
        part.owners.claimed(claim_offset, writer_id)
        return RecoveredPartition(
            IdempotencyWindow(self._window_size, part.window),
            part.owners,
            restorer.checkpoint,
            [self.rebuild(partition, w) for w in part.in_flight],
            part.records_read,
            state,
        )

    async def _read_before_claiming(
        self, partition: int, checkpoint: Checkpoint | None
    ) -> PartitionRestorer:
        """Refuse a log of another codec, pick the checkpoint to recover from (none when
        the stored one is another log's), and recover up to the log's current end."""
        repository, retries = self._repository, self._retries

        async def check() -> tuple[int, Checkpoint]:
            end = await repository.end_offset(partition)
            await check_codec(repository, self._codec, partition, end)
            return end, await trusted_checkpoint(repository, partition, checkpoint, end)

        end, trusted = await retries.run(f"checking partition {partition}", check)
        restorer = await restorer_from(
            repository, self._codec, partition, trusted, self._window_size, retries.run
        )
        await retries.run(
            f"recovering partition {partition}", functools.partial(restorer.read_to, end)
        )
        return restorer

    def rebuild(self, partition: int, workflow: RestoredWorkflow) -> WorkflowExecution:
        """The execution of an open workflow read from ``partition``, its values decoded
        by its definition (as every reader of the log decodes them)."""
        definitions = self._definitions
        definition = definitions.get(workflow.type)
        if definition is None:
            raise UnknownWorkflowType(
                workflow.type,
                sorted(definitions),
                f" for workflow {workflow.id!r} in flight at partition {partition}, "
                f"offset {workflow.created_offset}",
            )
        codec = self._codec
        input = decode_input(codec, definition, workflow.input, partition, workflow.created_offset)
        execution = WorkflowExecution(
            workflow.id,
            definition,
            partition,
            input,
            attempts=workflow.attempts,
            last_error=workflow.last_error,
            trace=workflow.trace,
            clock=self._clock,
        )
        execution.created_offset = workflow.created_offset
        execution.fire_at = workflow.fire_at
        for offset, outcome in workflow.outcomes:
            value = decode_value(codec, definition, outcome, partition, offset)
            execution.progress.record(
                outcome.phase, outcome.step, restore_outcome(outcome.success, value)
            )
        return execution
