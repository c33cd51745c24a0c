"""Which partitions this instance owns, and where a call for a workflow id goes.

Alone, an instance owns every partition of the log. In group mode it owns the share the
group assigned it, once claimed and recovered: :class:`GroupMember` is the placement task
that applies each :class:`~kapbit.placement.PlacementChange` in order (revoked first, then
assigned), and :class:`OwnedPartitions` is the one place that decides whether a call for an
id runs here, is forwarded to the owner of its partition (:mod:`kapbit.forwarding`), or is
refused with :class:`~kapbit.errors.NotOwner`. See docs/ARCHITECTURE.md, "Group mode".
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from kapbit._lifecycle import TaskHost
from kapbit._log import fields
from kapbit.checkpoints import Checkpointer
from kapbit.errors import (
    Fenced,
    GroupNotSupported,
    InstanceClosed,
    InvalidWorkflowId,
    NotOwner,
)
from kapbit.fencing import Fence
from kapbit.forwarding import RemoteWorkflows
from kapbit.handles import RunningWorkflows, WorkflowLookup, WorkflowState
from kapbit.idempotency import IdempotencyWindow
from kapbit.ownership import Ownership
from kapbit.partitioner import partition_for
from kapbit.placement import GroupOptions, Owner, Placement, PlacementChange, SupportsGroups
from kapbit.recovery import Recovery
from kapbit.repository import Repository
from kapbit.serving import Serving
from kapbit.supervisor import Supervisor

logger = logging.getLogger("kapbit")


def placement_of(
    group: GroupOptions | Placement | None, repository: Repository
) -> Placement | None:
    """The placement group mode uses: built by the repository from ``GroupOptions``, or
    given; GroupNotSupported when the repository cannot share its log."""
    if group is None or isinstance(group, Placement):
        return group
    if not isinstance(group, GroupOptions):
        raise TypeError(f"group must be GroupOptions or a Placement, got {group!r}")
    if not isinstance(repository, SupportsGroups):
        raise GroupNotSupported(
            f"{type(repository).__name__} cannot share its log through a group: group mode "
            "needs a repository with group_placement() (KafkaRepository)"
        )
    return repository.group_placement(group)


def check_workflow_id(workflow_id: object) -> None:
    """Refuse an id that is not a non-empty string of valid UTF-8 text (a lone surrogate
    cannot be a record key) with InvalidWorkflowId."""
    if not isinstance(workflow_id, str) or not workflow_id:
        raise InvalidWorkflowId(f"workflow id must be a non-empty string, got {workflow_id!r}")
    try:
        workflow_id.encode()
    except UnicodeEncodeError as exc:
        raise InvalidWorkflowId(
            f"workflow id {workflow_id!r} is not valid UTF-8 text: {exc.reason} at {exc.start}"
        ) from None


class OwnedPartitions:
    """The partitions this instance owns: every one, unless a group shares them (then
    those claimed and recovered, which :class:`GroupMember` adds and drops)."""

    __slots__ = ("_placement", "_shared", "endpoint", "partitions")

    def __init__(self, placement: Placement | None) -> None:
        self._placement = placement
        #: The endpoint this instance advertises in group mode (``None`` outside it).
        self.endpoint = None if placement is None else placement.endpoint
        #: The log's partition count: 0 until the repository has started.
        self.partitions = 0
        self._shared: set[int] | None = None if placement is None else set()

    @property
    def grouped(self) -> bool:
        """Whether a group shares the partitions (the owned set changes as it rebalances)."""
        return self._shared is not None

    def current(self) -> frozenset[int]:
        """The partitions owned now."""
        shared = self._shared
        return frozenset(range(self.partitions)) if shared is None else frozenset(shared)

    def owns(self, partition: int) -> bool:
        """Whether this instance owns ``partition`` (admission open)."""
        shared = self._shared
        if shared is None:
            return 0 <= partition < self.partitions
        return partition in shared

    def gain(self, partition: int) -> None:
        """Group mode: ``partition`` is claimed and recovered; calls for it are taken."""
        assert self._shared is not None
        self._shared.add(partition)

    def drop(self, partition: int) -> bool:
        """Group mode: ``partition`` is given up; whether it was owned."""
        shared = self._shared
        assert shared is not None
        if partition not in shared:
            return False
        shared.discard(partition)
        return True

    def forwards(self, workflow_id: str) -> bool:
        """The one place that decides: a call for ``workflow_id`` runs here, or (given a
        request log) is forwarded to the owner of its partition."""
        if not isinstance(workflow_id, str) or not workflow_id:
            return False
        return not self.owns(partition_for(workflow_id, self.partitions))

    def partition_of(self, workflow_id: str) -> int:
        """The partition of ``workflow_id`` (InvalidWorkflowId); the partitions are known."""
        check_workflow_id(workflow_id)
        return partition_for(workflow_id, self.partitions)

    def owner_of(self, workflow_id: str) -> Owner:
        """Who owns ``workflow_id`` (see :meth:`kapbit.Kapbit.owner_of`)."""
        partition = self.partition_of(workflow_id)
        if self.owns(partition):
            return Owner(partition, True, self.endpoint)
        assert self._placement is not None
        return Owner(partition, False, self._placement.owner_endpoint(partition))

    def refuse_unless_owned(self, workflow_id: str) -> int:
        """The partition of ``workflow_id`` if this instance owns it; else NotOwner (the
        one place that decides whether a call is taken here; no :class:`Owner` is built for
        the common local case)."""
        partition = self.partition_of(workflow_id)
        if not self.owns(partition):
            owner = self.owner_of(workflow_id)
            raise NotOwner(workflow_id, owner.partition, owner.endpoint)
        return partition


class Runs(Protocol):
    """Whether the instance accepts workflows (what a routed handle asks of it)."""

    @property
    def is_running(self) -> bool: ...


class Routed:
    """What a group-mode handle asks (:class:`~kapbit.handles.RunningWorkflows`,
    :class:`~kapbit.handles.WorkflowLookup`), sent per call to whoever owns the id's
    partition then: a handle kept while the partition moved follows the workflow. Here
    while this instance owns it (or no longer runs); else to the owner through the request
    log (``remote``), or NotOwner without one."""

    __slots__ = ("_instance", "_log", "_owned", "_remote", "_running")

    def __init__(
        self,
        owned: OwnedPartitions,
        running: RunningWorkflows,
        log: WorkflowLookup,
        remote: RemoteWorkflows | None,
        instance: Runs,
    ) -> None:
        self._owned = owned
        self._running = running
        self._log = log
        self._remote = remote
        self._instance = instance

    def _handled_by(self, workflow_id: str) -> tuple[RunningWorkflows, WorkflowLookup]:
        owned = self._owned
        if not self._instance.is_running or owned.owns(
            partition_for(workflow_id, owned.partitions)
        ):
            return self._running, self._log
        if self._remote is not None:
            return self._remote, self._remote
        owned.refuse_unless_owned(workflow_id)  # raises NotOwner
        return self._running, self._log

    def running_type(self, workflow_id: str) -> str | None:
        return self._handled_by(workflow_id)[0].running_type(workflow_id)

    async def wait_result(self, workflow_id: str, timeout: float | None) -> Any:
        running, _ = self._handled_by(workflow_id)
        return await running.wait_result(workflow_id, timeout)

    def locate(self, workflow_id: str) -> tuple[int, int | None]:
        return self._handled_by(workflow_id)[1].locate(workflow_id)

    async def read(self, workflow_id: str) -> WorkflowState:
        return await self._handled_by(workflow_id)[1].read(workflow_id)


class GroupMember:
    """Group mode's placement task: applies each change of the group in order, and gives
    up a partition another writer claimed (the log fenced this instance there).

    Works on the instance's parts, set to work on no partition at first: a revoked
    partition stops being written and driven (its callers get Fenced) and its state is
    dropped; an assigned one is claimed, recovered and resumed, then calls for it are
    taken. :meth:`run` returns once the placement closed and raises when the group cannot
    be used any more (the instance then stops).
    """

    def __init__(
        self,
        placement: Placement,
        owned: OwnedPartitions,
        fence: Fence,
        recovery: Recovery,
        ownership: Ownership,
        supervisor: Supervisor,
        checkpointer: Checkpointer,
        windows: list[IdempotencyWindow],
        window_size: int,
        serving: Serving | None,
        background: TaskHost,
        node_id: str,
    ) -> None:
        self._placement = placement
        self._owned = owned
        self._fence = fence
        self._recovery = recovery
        self._ownership = ownership
        self._supervisor = supervisor
        self._checkpointer = checkpointer
        #: The instance's windows by partition (shared with its parts): replaced per
        #: partition as it is assigned or revoked.
        self._windows = windows
        self._window_size = window_size
        self._serving = serving
        self._background = background
        self._node_id = node_id

    async def run(self, placed: asyncio.Future[None]) -> None:
        """Apply the group's changes until the placement closes; ``placed`` is set once
        the first change is applied."""
        taken = self._fence.taken
        try:
            while True:
                change = asyncio.ensure_future(self._placement.next_change())
                lost = asyncio.ensure_future(taken.get())
                try:
                    await asyncio.wait([change, lost], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for pending in (change, lost):
                        if not pending.done():
                            pending.cancel()
                if lost.done() and not lost.cancelled():
                    partition = lost.result()
                    self._revoke(partition, self._fence.lost[partition])
                if change.done() and not change.cancelled():
                    await self._apply(change.result())
                    if not placed.done():
                        placed.set_result(None)
        except InstanceClosed:
            return

    async def _apply(self, change: PlacementChange) -> None:
        """Revoked first (stop writing, drop), then assigned (claim, recover, resume);
        retained partitions are left alone (claimed again only if the log took them)."""
        for partition in sorted(change.revoked):
            self._revoke(
                partition,
                Fenced(
                    f"partition {partition} was handed to another instance; it resumes the "
                    "partition's workflows from the log"
                ),
            )
        owned = self._owned.current()
        assigned = change.assigned | (change.retained - owned)
        await asyncio.gather(*(self._assign(p) for p in sorted(assigned)))
        owned = self._owned.current()
        logger.info(
            "kapbit node %s owns partitions %s (assigned %s, revoked %s, retained %s)",
            self._node_id,
            sorted(owned),
            sorted(assigned),
            sorted(change.revoked),
            sorted(change.retained & owned),
            extra=fields(),
        )

    def _revoke(self, partition: int, error: Fenced) -> None:
        """Give ``partition`` up: close its admission, stop writing to it, stop driving its
        workflows (their callers get ``error``), drop its state."""
        self._fence.lose(partition, error)
        if not self._owned.drop(partition):
            return
        serving = self._serving
        if serving is not None and serving.running:  # its unanswered requests: the new owner's
            self._background.spawn(serving.release(partition), name=f"kapbit-release-{partition}")
        dropped = self._supervisor.drop_partition(partition, error)
        self._checkpointer.drop(partition)
        self._windows[partition] = IdempotencyWindow(self._window_size)
        logger.info(
            "kapbit node %s gave up partition %d (%d workflows left to the new owner): %s",
            self._node_id,
            partition,
            dropped,
            error,
            extra=fields(partition=partition),
        )

    async def _assign(self, partition: int) -> None:
        """Claim and recover ``partition``, resume its open workflows, then admit calls."""
        self._fence.regain(partition)
        ownership = self._ownership
        part = await self._recovery.recover_partition(
            partition, ownership.writer_id, ownership.claim
        )
        self._windows[partition] = part.window
        self._checkpointer.adopt(partition, part.owners, part.checkpoint, part.state)
        self._supervisor.adopt(part.executions)
        self._owned.gain(partition)
        if self._serving is not None:
            self._serving.serve(partition)  # forwarded calls for it: answered here
        logger.info(
            "kapbit node %s claimed partition %d: %d workflows resumed, %d records read",
            self._node_id,
            partition,
            len(part.executions),
            part.records_read,
            extra=fields(partition=partition),
        )
