"""The instance's side of the request log (:mod:`kapbit.forwarding`).

:class:`Serving` starts and stops both sides for one instance: a
:class:`~kapbit.forwarding.RequestServer` answering the requests of the partitions it owns,
and a :class:`~kapbit.forwarding.Forwarder` (with its
:class:`~kapbit.forwarding.RemoteWorkflows`) for calls whose ids another instance owns
(each a :class:`Forward`).
:class:`Served` is the instance as a serving session sees it: a forwarded start or exec is
admitted through the instance's own admission path, exactly as a local call with its
arguments would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, NamedTuple

from kapbit.codecs import Codec
from kapbit.errors import (
    CorruptRecord,
    DuplicateWorkflow,
    InstanceClosed,
    InvalidInput,
    StartupError,
)
from kapbit.events import WorkflowCreated
from kapbit.execution import WorkflowExecution
from kapbit.forwarding import Accepted, Forwarder, Owner, RemoteWorkflows, Request, RequestServer
from kapbit.handles import OnDuplicate, RunningWorkflows, WorkflowHandle, WorkflowLookup
from kapbit.log_reader import decode_event, decode_input
from kapbit.repository import Repository
from kapbit.request_log import RequestLog
from kapbit.supervisor import Ended
from kapbit.workflow import Definition


class Forward(NamedTuple):
    """A call to forward to the owner of its id's partition."""

    workflow_id: str
    workflow_type: str
    input: bytes
    on_duplicate: str


#: What the instance's admission made of a call: the execution it created and the future
#: of how its first run ends, the handle of the workflow it attached to, or what to forward.
Submitted = tuple[WorkflowExecution, asyncio.Future[Ended]] | WorkflowHandle[Any] | Forward


class Serving:
    """Serves the requests of the partitions this instance owns, and forwards calls for
    the others through ``forwarder``, on ``requests`` (co-partitioned with the log)."""

    def __init__(self, requests: RequestLog, codec: Codec, forwarder: Forwarder) -> None:
        self._requests = requests
        self._codec = codec
        self._forwarder: Forwarder | None = forwarder
        self._server: RequestServer | None = None

    async def start(self, partitions: int, owner: Owner, owned: Iterable[int]) -> RemoteWorkflows:
        """Serve ``owned`` partitions' requests for ``owner``; the handles of workflows
        owned elsewhere. StartupError when the request log is not co-partitioned."""
        requests = self._requests
        await requests.start()
        if requests.partitions != partitions:
            await requests.close()
            raise StartupError(
                f"the request log has {requests.partitions} partitions, the log "
                f"{partitions}: they must be co-partitioned"
            )
        server = self._server = RequestServer(requests, self._codec, owner)
        await server.start()
        forwarder = self._forwarder
        assert forwarder is not None
        await forwarder.start()
        remote = RemoteWorkflows(forwarder, partitions)
        for partition in owned:
            server.serve(partition)
        return remote

    @property
    def running(self) -> bool:
        """Whether requests are served (started, not stopped)."""
        return self._server is not None

    def serve(self, partition: int) -> None:
        """Answer the requests of ``partition``, claimed and recovered here."""
        if self._server is not None:
            self._server.serve(partition)

    async def release(self, partition: int) -> None:
        """Stop answering ``partition``'s requests: its unanswered ones go to the new owner."""
        if self._server is not None:
            await self._server.release(partition)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the requests being served to be answered."""
        if self._server is not None:
            await self._server.drain(timeout)

    async def stop(self) -> None:
        """Stop serving and forwarding (requests left unanswered go to the next owner)."""
        server, self._server = self._server, None
        forwarder, self._forwarder = self._forwarder, None
        if server is not None:
            await server.close()
        if forwarder is not None:
            await forwarder.close()
        if server is not None:
            await self._requests.close()

    def abort(self) -> None:
        """Stop at once (a crash): nothing more is answered or forwarded."""
        if self._server is not None:
            self._server.abort()
        if self._forwarder is not None:
            self._forwarder.abort()


class Served:
    """The instance as a serving session sees it (:class:`kapbit.forwarding.Owner`).

    ``submit`` is the instance's admission of a call (arguments, keyword arguments,
    ``on_duplicate``, the request id written into ``WorkflowCreated``); ``answer`` what its
    ``exec_workflow`` answers for an execution it created; ``until_created`` returns once
    that execution's ``WorkflowCreated`` is durable; ``handle`` its ``get_workflow``.
    """

    __slots__ = (
        "_answer",
        "_codec",
        "_definitions",
        "_handle",
        "_log",
        "_repository",
        "_running",
        "_submit",
        "_until_created",
        "writer_id",
    )

    def __init__(
        self,
        writer_id: str,
        codec: Codec,
        definitions: Mapping[str, Definition],
        repository: Repository,
        running: RunningWorkflows,
        log: WorkflowLookup,
        *,
        submit: Callable[
            [tuple[Any, ...], dict[str, Any], OnDuplicate, str | None], Awaitable[Submitted]
        ],
        answer: Callable[[WorkflowExecution, asyncio.Future[Ended]], Coroutine[Any, Any, Ended]],
        until_created: Callable[[WorkflowExecution, asyncio.Future[Ended]], Awaitable[None]],
        handle: Callable[[str], WorkflowHandle[Any]],
    ) -> None:
        #: The writer id the owner writes as.
        self.writer_id = writer_id
        self._codec = codec
        self._definitions = definitions
        self._repository = repository
        self._running = running
        self._log = log
        self._submit = submit
        self._answer = answer
        self._until_created = until_created
        self._handle = handle

    async def accept(self, request: Request) -> Accepted:
        """Admit a forwarded start or exec exactly as a local call with its arguments."""
        definition = self._definitions.get(request.workflow_type)
        input: Any = None
        if definition is not None:
            try:
                input = decode_input(self._codec, definition, request.input, -1, -1)
            except CorruptRecord as exc:
                raise InvalidInput(
                    request.workflow_type, definition.input_check.name, "undecodable", str(exc)
                ) from exc
        on_duplicate: OnDuplicate = "attach" if request.on_duplicate == "attach" else "raise"
        call = (request.workflow_id, request.workflow_type, input)
        try:
            submitted = await self._submit(call, {}, on_duplicate, request.id)
        except DuplicateWorkflow:
            offset = await self._created_by(request)
            if offset is None:
                raise
            return Accepted(True, offset, request.workflow_type)
        if isinstance(submitted, Forward):  # the partition moved meanwhile
            raise InstanceClosed(f"partition of {request.workflow_id!r} is no longer owned here")
        if isinstance(submitted, WorkflowHandle):
            offset = await self._created_by(request)
            if offset is not None:
                return Accepted(True, offset, request.workflow_type)
            known = self.locate(request.workflow_id)
            return Accepted(False, -1 if known is None else known[0], request.workflow_type)
        execution, outcome = submitted
        answer = (
            asyncio.ensure_future(self._answer(execution, outcome))
            if request.op == "exec"
            else outcome
        )
        await self._until_created(execution, outcome)
        return Accepted(True, execution.created_offset, request.workflow_type, answer)

    async def _created_by(self, request: Request) -> int | None:
        """The offset of the workflow ``request`` created, if the id's workflow in the
        window is that one (the request was served before, its answer did not count)."""
        partition, offset = self._log.locate(request.workflow_id)
        if offset is None:
            return None
        async for batch in self._repository.read(partition, offset, offset + 1):
            for record in batch:
                event = decode_event(self._codec, record)
                if isinstance(event, WorkflowCreated) and event.request == request.id:
                    return offset
        return None

    def locate(self, workflow_id: str) -> tuple[int, str] | None:
        """``(created offset, type)`` of a workflow this instance knows (``-1``: not
        acknowledged yet; the type is ``""`` once it no longer runs here)."""
        _, offset = self._log.locate(workflow_id)
        running = self._running.running_type(workflow_id)
        if offset is None:
            return None if running is None else (-1, running)
        return offset, running or ""

    async def wait_end(self, workflow_id: str) -> tuple[int, str, Any]:
        """Wait for the end of a workflow this instance knows: its created offset, type and
        result (its error raised)."""
        handle = self._handle(workflow_id)
        result = await handle.result()
        state = await handle.describe()
        return state.created_offset, state.type, result
