"""Any instance accepts any workflow: calls for ids whose partition another instance owns go
through a request log co-partitioned with the workflow log, and are answered by the owner.

The request log (``<log>-requests`` on Kafka, :class:`~kapbit.request_log.MemRequestLog`
in tests) has the log's partition count and partitioner, so a request keyed by the
workflow id lands in the request partition numbered as the id's log partition. Three
kinds of record live there:

- ``request_claim`` (:class:`RequestClaim`): an owner starts serving the partition (a
  *session*). Written after the owner has claimed and recovered the log partition.
- ``request`` (:class:`Request`): a caller asks the owner to ``start``, ``exec``,
  ``describe`` or wait for the ``result`` of a workflow.
- ``answer`` (:class:`Answer`): the owner's answer, naming the session it was given in.

**Which answers count.** A session reads its request partition in order and stops at the
first later claim, so it only ever answers requests that follow no foreign claim. An answer
at offset ``o`` to the request at ``q`` counts exactly when the latest claim between ``q``
and ``o`` is the answer's session, or, if there is none, the session began before ``q``.
Callers and the next owner apply the same rule (:class:`AnswerRule`), so an answer given by
an instance that lost the partition meanwhile is ignored by both, and the next owner serves
the request again.

**The same answer twice.** A request served twice (the owner stopped after creating the
workflow and before its answer counted) is answered the same way: ``WorkflowCreated``
carries the request id, and an owner that finds the id taken by a workflow its request
created answers as if it had just created it. Refusals write nothing, and a refusal
counts only while its session is the latest, so no later owner creates what was refused.

**Where an owner resumes.** Each session saves, per partition, the offset below which every
request has a counting final answer (its *progress*), computed only from answers it read
back under the rule above, so any saved progress is safe whoever saved it last. A new
session reads from there to its own claim before serving what is still open.

**Results.** An ``ended`` answer carries the encoded result, decoded by the caller with
its own definition; an ``error`` answer the typed error (class, message, fields).
``describe`` names where the workflow's ``WorkflowCreated`` lies and the caller reads its
state from the log (:func:`kapbit.handles.read_workflow`). See docs/ARCHITECTURE.md,
"Any instance accepts any workflow".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from kapbit._lifecycle import CANCEL_GRACE, TaskHost
from kapbit.codecs import Codec
from kapbit.errors import (
    DeadLettered,
    DuplicateWorkflow,
    Fenced,
    GateClosed,
    InstanceClosed,
    InvalidInput,
    InvalidReturnValue,
    InvalidWorkflowId,
    KapbitError,
    PayloadTooLarge,
    RecordRejected,
    RequestTimedOut,
    StorageError,
    TooManyWorkflows,
    TransientStorageError,
    UnknownWorkflowType,
    WillRetryLater,
    WorkflowNotFound,
    WorkflowRefused,
    WorkflowRejected,
    describe_error,
)
from kapbit.handles import WorkflowHandle, WorkflowState, read_workflow
from kapbit.partitioner import partition_for
from kapbit.projection.status import WorkflowStatus
from kapbit.repository import Repository
from kapbit.request_log import (
    ANSWER,
    REQUEST,
    REQUEST_CLAIM,
    RequestLog,
    RequestRecord,
)
from kapbit.workflow import Definition

logger = logging.getLogger("kapbit.forwarding")

#: What a caller asks: create (``start``), create and wait for the end (``exec``), the
#: workflow's place in the log (``describe``), or wait for its end (``result``).
Op = Literal["start", "exec", "describe", "result"]
#: ``created``: this request created the workflow; ``found``: the id is taken (attach,
#: describe), ``ended``: the workflow has ended (its terminal event is in the log);
#: ``error``: the typed error the owner's call raised (nothing written for a refusal).
Outcome = Literal["created", "found", "ended", "error"]

#: Backoff of an answer whose append failed transiently (retried while the session lasts).
_ANSWER_BACKOFF = wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05)
#: Save a partition's progress after this many requests were finished (and at the end).
_PROGRESS_EVERY = 100


# --- the records --------------------------------------------------------------------------


class Request(msgspec.Struct, frozen=True, omit_defaults=True):
    """A call forwarded to the owner of ``workflow_id``'s partition.

    ``id`` is the request's unique id; ``input`` the input encoded with the log's codec
    (``start`` and ``exec``); ``deadline`` the caller's wall clock after which it no longer
    waits for the first answer (an owner that reads the request later ignores it, unless a
    counting ``created`` answer acknowledged it: then the caller waits for the end).
    """

    id: str
    op: Op
    workflow_id: str
    workflow_type: str = ""
    input: msgspec.Raw = msgspec.Raw(b"null")
    on_duplicate: str = "raise"
    deadline: float = 0.0
    at: float = 0.0


class Answer(msgspec.Struct, frozen=True, omit_defaults=True):
    """The owner's answer to request ``request``, given in the session whose claim is at
    offset ``session``. ``final`` is false only for ``created`` of an ``exec`` (the end
    follows). ``created_offset`` is where the workflow's ``WorkflowCreated`` lies (``-1``:
    not acknowledged yet); ``error`` / ``message`` / ``detail`` describe the typed error;
    ``result`` is the encoded result of an ``ended`` workflow (so the caller need not read
    the log for it)."""

    request: str
    session: int
    outcome: Outcome
    final: bool = True
    created_offset: int = -1
    workflow_type: str = ""
    error: str = ""
    message: str = ""
    detail: dict[str, str | int | None] = {}
    result: msgspec.Raw = msgspec.Raw(b"")
    at: float = 0.0


class RequestClaim(msgspec.Struct, frozen=True):
    """``node`` serves the partition from here on (its session is this record's offset)."""

    node: str
    at: float


# --- the typed errors an answer carries --------------------------------------------------

#: Errors an owner's answer may carry, by name; any other is sent as a KapbitError.
_ANSWER_ERRORS: dict[str, type[KapbitError]] = {
    cls.__name__: cls
    for cls in (
        GateClosed,
        UnknownWorkflowType,
        InvalidWorkflowId,
        DuplicateWorkflow,
        TooManyWorkflows,
        InvalidInput,
        WorkflowRefused,
        RecordRejected,
        PayloadTooLarge,
        WillRetryLater,
        WorkflowNotFound,
        WorkflowRejected,
        InvalidReturnValue,
        DeadLettered,
        KapbitError,
    )
}
_DETAIL_FIELDS = (
    "workflow_id",
    "workflow_type",
    "limit",
    "declared",
    "actual",
    "size",
    "reason",
    "step",
    "phase",
    "attempts",
    "error",
)


def error_answer(request: str, session: int, error: KapbitError) -> Answer:
    """The answer that carries ``error`` (its class, message and attributes)."""
    name = type(error).__name__
    if name not in _ANSWER_ERRORS:
        name = next(
            (cls.__name__ for cls in type(error).__mro__ if cls.__name__ in _ANSWER_ERRORS),
            "KapbitError",
        )
    detail: dict[str, str | int | None] = {}
    for attribute in _DETAIL_FIELDS:
        value = getattr(error, attribute, None)
        if isinstance(value, (str, int)) or (value is None and hasattr(error, attribute)):
            detail[attribute] = value
    return Answer(
        request, session, "error", error=name, message=str(error), detail=detail, at=time.time()
    )


def answer_error(answer: Answer) -> KapbitError:
    """The typed error ``answer`` carries, as the owner raised it: same class, message and
    attributes."""
    cls = _ANSWER_ERRORS.get(answer.error, KapbitError)
    error = cls.__new__(cls)
    Exception.__init__(error, answer.message)
    for attribute, value in answer.detail.items():
        if attribute in _DETAIL_FIELDS:
            setattr(error, attribute, value)
    return error


# --- the answer rule -------------------------------------------------------------------------


class AnswerRule:
    """Which answers of one request partition count, for a reader that reads it in order
    from some offset on: the claims seen, and where each request was read."""

    __slots__ = ("_claims", "_requests")

    def __init__(self) -> None:
        self._claims: list[int] = []  # offsets of every claim read, ascending
        self._requests: dict[str, int] = {}  # request id -> offset of its first copy

    def claim(self, offset: int) -> None:
        """A ``request_claim`` was read at ``offset``."""
        self._claims.append(offset)

    def request(self, request_id: str, offset: int) -> None:
        """A request was read at ``offset`` (a second copy keeps the first)."""
        self._requests.setdefault(request_id, offset)

    def forget(self, request_id: str) -> None:
        """Nothing more is expected for ``request_id``."""
        self._requests.pop(request_id, None)

    def counts(self, answer: Answer, offset: int) -> bool:
        """Whether ``answer``, read at ``offset``, counts: its session is the latest claim
        read before it (or, none read, the session began before its request)."""
        asked = self._requests.get(answer.request)
        if asked is None:
            return False  # its request was not read: not one of this reader's
        latest = None
        for claim in reversed(self._claims):
            if claim < offset:
                latest = claim
                break
        if latest is not None:
            return latest == answer.session
        # No claim read before it: this reader started after the session's claim, and a
        # session answers only requests that follow no later claim.
        return answer.session < asked


# --- the caller's side -------------------------------------------------------------------


@dataclass
class _Waiter:
    """Answers that counted for one request, in order."""

    answers: asyncio.Queue[Answer | BaseException] = field(default_factory=asyncio.Queue)


class _Follower:
    """Follows one request partition for the answers the caller waits for."""

    def __init__(self, log: RequestLog, codec: Codec, partition: int) -> None:
        self._log = log
        self._codec = codec
        self.partition = partition
        self._rule = AnswerRule()
        self.waiters: dict[str, _Waiter] = {}
        self.ready = asyncio.Event()
        self.failure: BaseException | None = None

    async def run(self) -> None:
        try:
            start = await self._log.end_offset(self.partition)
            self.ready.set()
            async for batch in self._log.tail(self.partition, start):
                for record in batch:
                    self._take(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the waiters learn it; the next call starts afresh
            logger.warning("following request partition %d failed: %r", self.partition, exc)
            self.failure = exc
            self.ready.set()
            for waiter in self.waiters.values():
                waiter.answers.put_nowait(TransientStorageError(f"request log: {exc!r}"))

    def _take(self, record: RequestRecord) -> None:
        kind = record.kind
        if kind == REQUEST_CLAIM:
            self._rule.claim(record.offset)
        elif kind == REQUEST:
            request_id = self._decode(record, _RequestHead)
            if request_id is not None and request_id.id in self.waiters:
                self._rule.request(request_id.id, record.offset)
        elif kind == ANSWER:
            answer = self._decode(record, Answer)
            if answer is None:
                return
            waiter = self.waiters.get(answer.request)
            if waiter is not None and self._rule.counts(answer, record.offset):
                waiter.answers.put_nowait(answer)

    def _decode(self, record: RequestRecord, cls: type[Any]) -> Any:
        try:
            return self._codec.decode(record.value, cls)
        except KapbitError as exc:
            logger.warning(
                "request partition %d offset %d unreadable: %s",
                record.partition,
                record.offset,
                exc,
            )
            return None

    def done(self, request_id: str) -> None:
        self.waiters.pop(request_id, None)
        self._rule.forget(request_id)


def _answer_or_raise(got: Answer | BaseException) -> Answer:
    if isinstance(got, BaseException):
        raise got  # the follower or the forwarder stopped
    return got


class _RequestHead(msgspec.Struct, frozen=True):
    """The part of a request a follower needs."""

    id: str


class Forwarder:
    """The caller's side: forwards calls to the owner through the request log and waits for
    the answers that count. ``timeout`` bounds the wait for the first answer (the owner may
    be taking over the partition: failover takes a session timeout and a recovery);
    :class:`~kapbit.errors.RequestTimedOut` after it."""

    def __init__(
        self,
        requests: RequestLog,
        repository: Repository,
        codec: Codec,
        definitions: Mapping[str, Definition],
        node: str,
        timeout: float,
    ) -> None:
        self._requests = requests
        self._repository = repository
        self._codec = codec
        self._definitions = definitions
        self.node = node
        self.timeout = timeout
        self._followers: dict[int, tuple[_Follower, asyncio.Task[None]]] = {}
        self._host = TaskHost("kapbit-forwarder")
        self._started = False

    async def start(self) -> None:
        """Start the task host the followers run in."""
        if not self._started:
            await self._host.start()
            self._started = True

    async def close(self) -> None:
        """Stop following; callers still waiting get InstanceClosed."""
        for follower, _ in self._followers.values():
            for waiter in follower.waiters.values():
                waiter.answers.put_nowait(InstanceClosed("the forwarder closed"))
        self._followers.clear()
        await self._host.close(CANCEL_GRACE)

    def abort(self) -> None:
        """Stop at once (a crash)."""
        self._followers.clear()
        self._host.abort()

    async def _follower(self, partition: int) -> _Follower:
        entry = self._followers.get(partition)
        if entry is not None and entry[0].failure is None and not entry[1].done():
            follower = entry[0]
        else:
            follower = _Follower(self._requests, self._codec, partition)
            task = self._host.spawn(follower.run(), name=f"kapbit-forward-{partition}")
            self._followers[partition] = (follower, task)
        await follower.ready.wait()
        if follower.failure is not None:
            raise TransientStorageError(f"request log: {follower.failure!r}")
        return follower

    async def ask(
        self,
        op: Op,
        partition: int,
        workflow_id: str,
        workflow_type: str = "",
        input: bytes = b"null",
        on_duplicate: str = "raise",
    ) -> Answer:
        """Send a request and return its first final answer (a non-final one, ``created``
        of an ``exec``, is passed over). RequestTimedOut if no answer counts
        within the timeout; a non-final one lifts the timeout."""
        follower = await self._follower(partition)
        request_id = uuid.uuid4().hex
        waiter = follower.waiters[request_id] = _Waiter()
        deadline = time.time() + self.timeout
        request = Request(
            request_id,
            op,
            workflow_id,
            workflow_type,
            msgspec.Raw(input),
            on_duplicate,
            deadline,
            time.time(),
        )
        try:
            await self._requests.append(
                partition, REQUEST, workflow_id, self.node, self._codec.encode(request)
            )
            try:
                async with asyncio.timeout(self.timeout):
                    answer = _answer_or_raise(await waiter.answers.get())
            except TimeoutError:
                raise RequestTimedOut(workflow_id, op, partition, self.timeout) from None
            while not answer.final:
                answer = _answer_or_raise(await waiter.answers.get())
            return answer
        finally:
            follower.done(request_id)

    async def read(self, workflow_id: str, partition: int, offset: int) -> WorkflowState:
        """The workflow as the log shows it, read from its ``WorkflowCreated``."""
        return await read_workflow(
            self._repository, self._codec, self._definitions, workflow_id, partition, offset
        )

    def ended(self, answer: Answer) -> Any:
        """The result an ``ended`` (or ``error``) answer carries, decoded with the
        definition's result type; the workflow's error raised as exec_workflow does."""
        if answer.outcome == "error":
            raise answer_error(answer)
        if not answer.result:
            raise StorageError(f"answer {answer.request} is {answer.outcome!r}, not a result")
        definition = self._definitions.get(answer.workflow_type)
        target: Any = Any if definition is None else definition.result_type
        return self._codec.decode(answer.result, target)


# --- the owner's side ----------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    """What the owner's admission did with a ``start`` / ``exec`` request.

    ``created``: this request created the workflow (now, or in an earlier session);
    ``created_offset``: where its ``WorkflowCreated`` lies (``-1``: not acknowledged yet);
    ``outcome``: the end of a workflow created by this call (``None`` otherwise), as the
    local ``exec_workflow`` would return it: ``(result, error)``.
    """

    created: bool
    created_offset: int
    workflow_type: str
    outcome: asyncio.Future[tuple[Any, BaseException | None]] | None = None


class Owner(Protocol):
    """What a serving session asks the instance: its one admission path and its workflows."""

    @property
    def writer_id(self) -> str:
        """The writer id the owner writes as."""
        ...

    async def accept(self, request: Request) -> Accepted:
        """Admit ``request`` as a local call with its ``on_duplicate`` would (raising the
        same refusals), writing its id into ``WorkflowCreated``."""
        ...

    def locate(self, workflow_id: str) -> tuple[int, str] | None:
        """``(created offset, type)`` of a workflow this owner knows (offset ``-1``: not
        acknowledged yet), else ``None``."""
        ...

    async def wait_end(self, workflow_id: str) -> tuple[int, str, Any]:
        """Wait for the end of a workflow this owner knows (through retries): its created
        offset, type and result; its error (DeadLettered, WorkflowRejected,
        InvalidReturnValue) raised. WorkflowNotFound for an unknown id; InstanceClosed /
        Fenced when this owner stops running it."""
        ...


class _Stopped(Exception):
    """The owner stopped or lost the partition: leave the request to the next owner."""


class RequestServer:
    """The owner's side: serves the request partitions of the log partitions it owns, one
    session per partition (:meth:`serve` after the partition is claimed and recovered,
    :meth:`release` when it is revoked or the instance stops)."""

    def __init__(self, requests: RequestLog, codec: Codec, owner: Owner) -> None:
        self._requests = requests
        self._codec = codec
        self._owner = owner
        self._host = TaskHost("kapbit-requests")
        self._sessions: dict[int, asyncio.Task[None]] = {}
        self._running: dict[int, _Session] = {}
        self._progress: dict[int, int] | None = None

    async def start(self) -> None:
        """Load the stored progress and start the task host."""
        self._progress = await self._requests.load_progress()
        await self._host.start()

    def serve(self, partition: int) -> None:
        """Start a session on ``partition`` (a no-op when one runs)."""
        task = self._sessions.get(partition)
        if task is None or task.done():
            self._sessions[partition] = self._host.spawn(
                self._session(partition), name=f"kapbit-requests-{partition}"
            )

    async def release(self, partition: int) -> None:
        """End the session on ``partition``; its unanswered requests go to the next owner."""
        task = self._sessions.pop(partition, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the requests being served to be answered (on a
        graceful close, after the workflows drained: their callers get the end)."""
        tasks = [task for session in self._running.values() for task in session.serving()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    @property
    def serving(self) -> frozenset[int]:
        """The partitions with a running session."""
        return frozenset(p for p, task in self._sessions.items() if not task.done())

    def abort(self) -> None:
        """Stop at once (a crash): nothing more is answered."""
        for task in self._sessions.values():
            task.cancel()
        self._sessions.clear()
        self._host.abort()

    async def close(self) -> None:
        """End every session."""
        for partition in list(self._sessions):
            await self.release(partition)
        await self._host.close(CANCEL_GRACE)

    async def _session(self, partition: int) -> None:
        """Serve ``partition`` until released or claimed by another; a session that fails
        (storage unreachable) is followed by a new one, after a pause."""
        pause = 0.1
        while True:
            resume = (self._progress or {}).get(partition, 0)
            with contextlib.suppress(Exception):
                resume = max(resume, (await self._requests.load_progress()).get(partition, 0))
            session = _Session(self._requests, self._codec, self._owner, partition, resume)
            self._running[partition] = session
            try:
                await session.run()
            except _Stopped as stop:
                logger.info("request partition %d: session ended: %s", partition, stop)
                return
            except Exception:
                logger.exception("request partition %d: session failed; starting again", partition)
            finally:
                self._running.pop(partition, None)
                await session.stop()
            await asyncio.sleep(pause)  # a storage outage: do not spin
            pause = min(pause * 2, 5.0)


class _Session:
    """One owner's service of one request partition, from its claim to its end."""

    def __init__(
        self, requests: RequestLog, codec: Codec, owner: Owner, partition: int, resume: int
    ) -> None:
        self._requests = requests
        self._codec = codec
        self._owner = owner
        self.partition = partition
        self._resume = resume
        self._rule = AnswerRule()
        self._claim = -1
        self._open: dict[str, tuple[int, Request | None]] = {}  # read, not finished
        #: Open requests a counting non-final answer acknowledged (``created`` of an
        #: ``exec``): their callers wait for the end without a deadline.
        self._acknowledged: set[str] = set()
        self._finished = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._saved = resume
        self._read_to = resume  # every record below has been taken

    async def run(self) -> None:
        claim = RequestClaim(self._owner.writer_id, time.time())
        self._claim = await self._requests.append(
            self.partition,
            REQUEST_CLAIM,
            self._owner.writer_id,
            self._owner.writer_id,
            self._codec.encode(claim),
        )
        logger.info(
            "request partition %d: serving from offset %d (claim at %d)",
            self.partition,
            self._resume,
            self._claim,
        )
        async for batch in self._requests.tail(self.partition, self._resume):
            for record in batch:
                self._take(record)
                self._read_to = record.offset + 1
            await self._save_progress(_PROGRESS_EVERY)

    def _take(self, record: RequestRecord) -> None:
        kind, offset = record.kind, record.offset
        if kind == REQUEST_CLAIM:
            self._rule.claim(offset)
            if offset > self._claim:
                raise _Stopped(f"claimed by {record.node!r} at offset {offset}")
            if offset == self._claim:  # caught up: serve every request still open
                for request_id, (_, request) in list(self._open.items()):
                    if request is not None:
                        self._spawn(request_id, request)
            return
        if kind == REQUEST:
            request = self._decode(record, Request)
            if request is None or request.id in self._open:
                return
            self._rule.request(request.id, offset)
            self._open[request.id] = (offset, request)
            if offset > self._claim:
                self._spawn(request.id, request)
        elif kind == ANSWER:
            answer = self._decode(record, Answer)
            if answer is None or answer.request not in self._open:
                return
            if self._rule.counts(answer, offset):
                if answer.final:
                    self._finish(answer.request)
                else:
                    self._acknowledged.add(answer.request)

    def _decode(self, record: RequestRecord, cls: type[Any]) -> Any:
        try:
            return self._codec.decode(record.value, cls)
        except KapbitError as exc:
            logger.warning(
                "request partition %d offset %d unreadable, skipped: %s",
                record.partition,
                record.offset,
                exc,
            )
            return None

    def _finish(self, request_id: str) -> None:
        self._open.pop(request_id, None)
        self._acknowledged.discard(request_id)
        self._rule.forget(request_id)
        self._finished += 1
        task = self._tasks.pop(request_id, None)
        if task is not None and not task.done():
            task.cancel()  # answered by this session already (read back): nothing to do

    def _spawn(self, request_id: str, request: Request) -> None:
        offset, _ = self._open[request_id]
        expired = request.deadline and request.deadline < time.time()
        if expired and request_id not in self._acknowledged:  # its caller gave up waiting
            logger.info(
                "request %s (%s %r) expired before it was served; skipped",
                request_id,
                request.op,
                request.workflow_id,
            )
            self._open[request_id] = (offset, None)  # no answer; counted as finished
            self._finish(request_id)
            return
        self._tasks[request_id] = asyncio.create_task(
            self._serve(request), name=f"kapbit-request-{request_id}"
        )

    def serving(self) -> list[asyncio.Task[None]]:
        """The requests being served now."""
        return [task for task in self._tasks.values() if not task.done()]

    async def _answer(self, answer: Answer) -> None:
        """Append ``answer``, retrying transient storage errors while the session lasts."""
        value = self._codec.encode(answer)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientStorageError),
            wait=_ANSWER_BACKOFF,
            reraise=True,
        ):
            with attempt:
                await self._requests.append(
                    self.partition, ANSWER, "", self._owner.writer_id, value
                )

    async def _serve(self, request: Request) -> None:
        try:
            await self._answer(await self._respond(request))
        except (_Stopped, InstanceClosed, Fenced, asyncio.CancelledError):
            return  # the next owner serves it
        except Exception:
            logger.exception("request %s (%s) could not be answered", request.id, request.op)

    async def _respond(self, request: Request) -> Answer:
        owner, session = self._owner, self._claim
        try:
            if request.op in ("start", "exec"):
                accepted = await owner.accept(request)
                if request.op == "exec" and not accepted.created:  # attached
                    return await self._ended(request, session)
                if request.op == "start":
                    outcome: Outcome = "created" if accepted.created else "found"
                    return Answer(
                        request.id,
                        session,
                        outcome,
                        created_offset=accepted.created_offset,
                        workflow_type=accepted.workflow_type,
                        at=time.time(),
                    )
                await self._answer(
                    Answer(
                        request.id,
                        session,
                        "created",
                        final=False,
                        created_offset=accepted.created_offset,
                        workflow_type=accepted.workflow_type,
                        at=time.time(),
                    )
                )
                if accepted.outcome is None:  # created in an earlier session
                    return await self._ended(request, session)
                result, error = await asyncio.shield(accepted.outcome)
                if isinstance(error, (InstanceClosed, Fenced)) or (
                    error is not None and not isinstance(error, KapbitError)
                ):
                    raise _Stopped(describe_error(error, str))
                if error is not None:  # WillRetryLater, or it ended with an error
                    return error_answer(request.id, session, error)
                return self._result(
                    request, session, accepted.created_offset, accepted.workflow_type, result
                )
            if request.op == "describe":
                known = owner.locate(request.workflow_id)
                if known is None:
                    raise WorkflowNotFound(request.workflow_id)
                return Answer(
                    request.id,
                    session,
                    "found",
                    created_offset=known[0],
                    workflow_type=known[1],
                    at=time.time(),
                )
            return await self._ended(request, session)
        except (InstanceClosed, Fenced, StorageError) as stopped:
            if isinstance(stopped, RecordRejected):
                return error_answer(request.id, session, stopped)
            raise _Stopped(str(stopped)) from stopped
        except KapbitError as error:
            return error_answer(request.id, session, error)

    async def _ended(self, request: Request, session: int) -> Answer:
        offset, workflow_type, result = await self._owner.wait_end(request.workflow_id)
        return self._result(request, session, offset, workflow_type, result)

    def _result(
        self, request: Request, session: int, offset: int, workflow_type: str, result: Any
    ) -> Answer:
        return Answer(
            request.id,
            session,
            "ended",
            created_offset=offset,
            workflow_type=workflow_type,
            result=msgspec.Raw(self._codec.encode(result)),
            at=time.time(),
        )

    def progress(self) -> int:
        """Below this offset every request read has a final answer that counted."""
        if not self._open:
            return self._read_to
        return min(offset for offset, _ in self._open.values())

    async def _save_progress(self, every: int) -> None:
        if self._finished < every:
            return
        self._finished = 0
        low = self.progress()
        if low > self._saved:
            try:
                await self._requests.save_progress(self.partition, low)
                self._saved = low
            except KapbitError as exc:
                logger.warning("request partition %d: progress not saved: %s", self.partition, exc)

    async def stop(self) -> None:
        """Cancel the requests being served; save progress."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        with contextlib.suppress(Exception):
            await self._save_progress(0)


# --- handles of workflows owned elsewhere ------------------------------------------------


class RemoteWorkflows:
    """Handles of workflows whose partition another instance owns: their status and result
    come from the owner's answers and the log (what :class:`~kapbit.WorkflowHandle` asks,
    through :class:`~kapbit.handles.RunningWorkflows` and
    :class:`~kapbit.handles.WorkflowLookup`)."""

    def __init__(self, forwarder: Forwarder, partitions: int) -> None:
        self._forwarder = forwarder
        self._partitions = partitions

    def handle(self, workflow_id: str) -> WorkflowHandle[Any]:
        """A handle of ``workflow_id``; WorkflowNotFound is raised by its calls when the
        owner does not know the id."""
        return WorkflowHandle(workflow_id, self, self)

    def locate(self, workflow_id: str) -> tuple[int, int | None]:
        return partition_for(workflow_id, self._partitions), None

    def running_type(self, workflow_id: str) -> str | None:
        return None  # it runs elsewhere

    async def wait_result(self, workflow_id: str, timeout: float | None) -> Any:
        partition = partition_for(workflow_id, self._partitions)
        async with asyncio.timeout(timeout):
            answer = await self._forwarder.ask("result", partition, workflow_id)
        return self._forwarder.ended(answer)

    async def read(self, workflow_id: str) -> WorkflowState:
        partition = partition_for(workflow_id, self._partitions)
        answer = await self._forwarder.ask("describe", partition, workflow_id)
        if answer.outcome == "error":
            raise answer_error(answer)
        if answer.created_offset < 0:  # running on the owner, not acknowledged yet
            return WorkflowState(
                workflow_id, answer.workflow_type, partition, -1, WorkflowStatus.RUNNING
            )
        return await self._forwarder.read(workflow_id, partition, answer.created_offset)

    async def start(
        self, workflow_id: str, workflow_type: str, input: bytes, on_duplicate: str
    ) -> WorkflowHandle[Any]:
        """Forward a ``start_workflow``: the handle once the owner created the workflow (or
        found it, attaching); the owner's refusal otherwise."""
        partition = partition_for(workflow_id, self._partitions)
        answer = await self._forwarder.ask(
            "start", partition, workflow_id, workflow_type, input, on_duplicate
        )
        if answer.outcome == "error":
            raise answer_error(answer)
        return self.handle(workflow_id)

    async def exec(
        self, workflow_id: str, workflow_type: str, input: bytes, on_duplicate: str
    ) -> Any:
        """Forward an ``exec_workflow``: its result, or the error the owner's call raised."""
        partition = partition_for(workflow_id, self._partitions)
        answer = await self._forwarder.ask(
            "exec", partition, workflow_id, workflow_type, input, on_duplicate
        )
        return self._forwarder.ended(answer)
