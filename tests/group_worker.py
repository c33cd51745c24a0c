"""A kapbit worker process for the multi-instance proofs, the harness that runs several of
them on one topic, and the audit of what they did.

Run from the repository root as ``python -m tests.group_worker BOOTSTRAP TOPIC --label A``.
The worker starts a :class:`~kapbit.Kapbit` on the topic (a member of consumer group
``--group`` when given, else the single instance that claims every partition) and keeps
``--concurrency`` calls of ``exec_workflow`` in flight for fresh ids ``<label><run>-<n>`` of
the ``crash`` saga (:mod:`tests.kafka_worker`), each step awaiting ``--step-delay`` seconds
first (the I/O of a real step), until told to stop. ``--base`` is the first ``n`` (distinct
bases keep every saga number, hence every result, unique to one id); ``--mix`` makes the
mixed load of :class:`Mixer` instead (start, exec, get, attach, duplicate and unknown ids,
mostly owned by other instances); ``--forward`` gives the instance the request log, so calls
for ids owned elsewhere are forwarded to their owner. It reports on stdout, one line each:

- ``started <writer id> <recovered>`` once the instance runs;
- ``owns <partitions>`` whenever the set of partitions it owns changes (``-`` for none);
  ``busy <n>`` whenever the number of workflows it runs does;
- ``call <t0> <t1> <id> result <json>`` / ``call <t0> <t1> <id> error <class> <refusal>
  <message>`` per call that returned (``refusal`` is 1 for a :class:`~kapbit.WorkflowRefused`:
  nothing was written), with wall-clock times; ``call ... crash <class> <message>`` for an
  exception that is not a :class:`~kapbit.KapbitError` (always a defect); the mixed load
  prints ``op <t0> <t1> <op> <route> <id> ...`` with the same tail;
- ``drained`` after SIGUSR1 (stop calling, wait for the calls in flight; the instance keeps
  running its partitions); after SIGTERM the same, then ``closing <time>`` as it closes the
  instance (which hands its partitions over), ``closed`` and exit status 0. With
  ``--close-now`` SIGTERM closes the instance at once, under the calls and workflows in
  flight (``--close-timeout`` bounds how long it lets them run before handing over);
- ``hung <task>`` for a call still unanswered two minutes after the stop (a defect).

Every step action appends ``<time> <id> <step> <phase> <pid> <seen>`` to the shared
execution journal (``--journal``) before it returns; ``seen`` is how many outcomes its
``progress`` held, i.e. which persisted outcomes it acted on. One ``write`` per line on an
``O_APPEND`` file: lines of concurrent processes never interleave and a SIGKILL never splits
one (the page cache keeps what was written; only a machine crash would need an fsync).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kapbit import (
    CheckpointPolicy,
    Definition,
    Failure,
    Fenced,
    GroupOptions,
    InstanceClosed,
    Kapbit,
    KapbitError,
    Options,
    Progress,
    Success,
    WorkflowHandle,
    WorkflowRefused,
)
from kapbit.repository.kafka import KafkaRepository, KafkaRequestLog
from tests.kafka_worker import (
    STEPS,
    WORKFLOW,
    Entry,
    Log,
    expected_path,
    expected_result,
    fails,
    read_log,
    saga_of,
)

_ROOT = Path(__file__).resolve().parent.parent  # where ``python -m tests.group_worker`` runs
#: How long a worker's call slot waits after a refusal before the next call.
REFUSAL_BACKOFF = 0.01


# --- the saga -------------------------------------------------------------------------------


class Journal:
    """Appends one line per call with a single ``write`` (atomic on an O_APPEND file)."""

    def __init__(self, path: str | None) -> None:
        self._fd = (
            None if path is None else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        )

    def write(self, line: str) -> None:
        if self._fd is not None:
            os.write(self._fd, (line + "\n").encode())


def group_saga(executions: Journal, step_delay: float) -> Definition:
    """The ``crash`` saga of :mod:`tests.kafka_worker` (same outcomes and results), whose
    actions wait ``step_delay`` seconds and journal what they saw before they return."""
    pid = os.getpid()

    def action(step: int, phase: str) -> Any:
        async def act(input: dict[str, Any], progress: Progress) -> Any:
            n = input["n"]
            if step_delay > 0:
                await asyncio.sleep(step_delay)  # the step's own work, not synchronisation
            seen = len(progress.executions) + len(progress.compensations)
            executions.write(f"{time.time():.6f} {input['id']} {step} {phase} {pid} {seen}")
            if phase == "execute" and step == STEPS - 1 and fails(n):
                return Failure(f"no-{n}")
            return Success(f"{phase[0]}{step}-{n}")

        return act

    return saga_of(action)


def workflow_number(workflow_id: str) -> int:
    """The saga number ``n`` of a worker's id ``<label><run>-<n>``."""
    return int(workflow_id.rsplit("-", 1)[1])


def pid_of(node: str) -> int:
    """The process id in a worker's writer id (``gw-<label><run>-<pid>/<start id>``)."""
    return int(node.split("/", 1)[0].rsplit("-", 1)[1])


# --- the worker -----------------------------------------------------------------------------


def _instance(args: argparse.Namespace, definition: Definition) -> Kapbit:
    node = f"gw-{args.label}{args.run}-{os.getpid()}"
    repository = KafkaRepository(args.bootstrap, args.topic, partitions=args.partitions)
    options = Options(
        node_id=node,
        max_workflows=10 * args.concurrency + 1_000,
        # Checkpoints move often, so every takeover recovers from one.
        checkpoints=CheckpointPolicy(every=50, interval=0.5),
        close_timeout=args.close_timeout,
        forward_timeout=args.forward_timeout,
    )
    if args.group is None:
        return Kapbit([definition], repository, options=options)
    return group_instance(args, definition, repository, options)


def group_instance(
    args: argparse.Namespace, definition: Definition, repository: KafkaRepository, options: Options
) -> Kapbit:
    """A member of consumer group ``args.group`` (the engine's group mode); with
    ``--forward`` it serves and forwards calls through the request log."""
    group = GroupOptions(
        name=args.group,
        endpoint=f"{args.label}{args.run}:{os.getpid()}",
        session_timeout=args.session,
        heartbeat_interval=args.heartbeat,
    )
    requests = (
        KafkaRequestLog(args.bootstrap, args.topic, partitions=args.partitions)
        if args.forward
        else None
    )
    return Kapbit([definition], repository, options=options, group=group, requests=requests)


def owned_partitions(kbit: Kapbit) -> frozenset[int]:
    """The partitions ``kbit`` owns now (a single instance: every one while it runs)."""
    return kbit.owned_partitions


async def _run(args: argparse.Namespace) -> int:
    executions = Journal(args.journal)
    kbit = _instance(args, group_saga(executions, args.step_delay))
    await kbit.start()
    print(f"started {kbit.writer_id} {len(kbit.in_flight())}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    closing = asyncio.Event()

    def drain() -> None:
        stop.set()

    def terminate() -> None:
        stop.set()
        closing.set()

    loop.add_signal_handler(signal.SIGUSR1, drain)
    loop.add_signal_handler(signal.SIGTERM, terminate)
    watcher = asyncio.create_task(_report_ownership(kbit, closing))
    slots = asyncio.Semaphore(args.concurrency)
    calls: set[asyncio.Task[None]] = set()
    mixer = Mixer(kbit, f"{args.label}{args.run}", args.base)

    async def one(k: int) -> None:
        try:
            if args.mix:
                line = await mixer.call(k)
            else:
                line = await _exec_call(kbit, f"{args.label}{args.run}-{args.base + k}")
            print(line.text, flush=True)
            if line.refused:
                await asyncio.sleep(REFUSAL_BACKOFF)  # a client backs off; no busy loop
            if line.stopped and not kbit.is_running:
                stop.set()  # this instance takes no more calls (in group mode a
                # Fenced may cost one partition only: the others go on)
        finally:
            slots.release()

    k = 0
    while not stop.is_set() and (args.count == 0 or k < args.count):
        acquire = asyncio.ensure_future(slots.acquire())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acquire.done():
            acquire.cancel()
            break
        if stop.is_set():
            slots.release()
            break
        task = asyncio.create_task(one(k))
        calls.add(task)
        task.add_done_callback(calls.discard)
        k += 1
    if args.close_now and closing.is_set():
        # Stop with calls and workflows in flight: the instance closes under them.
        watcher.cancel()
        print(f"closing {time.time():.6f}", flush=True)
        await kbit.close()
        await _wait_calls(calls)
        print("closed", flush=True)
        return 0
    await _wait_calls(calls)
    print("drained", flush=True)
    await closing.wait()
    watcher.cancel()
    print(f"closing {time.time():.6f}", flush=True)
    await kbit.close()
    print("closed", flush=True)
    return 0


async def _wait_calls(calls: set[asyncio.Task[None]], timeout: float = 120.0) -> None:
    """Wait for the calls in flight; report any still hanging (the audit fails on them)."""
    if not calls:
        return
    _, hanging = await asyncio.wait(set(calls), timeout=timeout)
    for task in hanging:
        print(f"hung {task.get_name()}", flush=True)
        task.cancel()


@dataclass(frozen=True, slots=True)
class CallLine:
    """One returned call as the worker prints it, and how the worker reacts to it."""

    text: str
    refused: bool = False
    stopped: bool = False


def _call_line(
    started: float, workflow_id: str, outcome: Any, op: str = "", route: str = ""
) -> CallLine:
    """The line reporting a call that returned ``outcome`` (a result or what it raised):
    ``call <t0> <t1> <id> ...`` for the exec-only load, ``op <t0> <t1> <op> <route> <id>
    ...`` for the mixed one."""
    refused = stopped = False
    if isinstance(outcome, KapbitError):
        refused = isinstance(outcome, WorkflowRefused)
        stopped = isinstance(outcome, Fenced | InstanceClosed)
        text = f"error {type(outcome).__name__} {int(refused)} {_line(outcome)}"
    elif isinstance(outcome, BaseException):  # reported, so that the audit fails on it
        text = f"crash {type(outcome).__name__} {_line(outcome)}"
    else:
        text = f"result {json.dumps(outcome, separators=(',', ':'))}"
    times = f"{started:.6f} {time.time():.6f}"
    if op:
        return CallLine(f"op {times} {op} {route} {workflow_id} {text}", refused, stopped)
    return CallLine(f"call {times} {workflow_id} {text}", refused, stopped)


async def _exec_call(kbit: Kapbit, workflow_id: str) -> CallLine:
    """``exec_workflow`` of a fresh id, reported as a ``call`` line."""
    started = time.time()
    outcome: Any
    try:
        n = workflow_number(workflow_id)
        outcome = await kbit.exec_workflow(workflow_id, WORKFLOW, {"n": n, "id": workflow_id})
    except Exception as exc:
        outcome = exc
    return _call_line(started, workflow_id, outcome)


#: What a mixed load does, in turn (see :class:`Mixer`).
MIX = (
    *("exec", "start", "exec", "get", "handle", "start", "attach"),
    *("exec", "dup", "status", "unknown"),
)
#: Fresh ids a mixed load gives to partitions this instance owns: one in this many.
LOCAL_SHARE = 4
#: Numbers of the ids a mixed load asks for without ever creating them (above any fresh one).
UNKNOWN_BASE = 500_000


class Mixer:
    """A mixed load of calls, mostly for ids owned by other instances (forwarded through
    the request log when the instance has one): ``exec`` and ``start`` (then the handle's
    ``result()``) of fresh ids; ``get_workflow(id).result()``, ``exec`` with
    ``on_duplicate="attach"`` and with ``"raise"`` (``dup``) of ids whose creation was
    acknowledged before the call; ``result()`` of a handle an earlier ``start`` returned,
    kept meanwhile (``handle``: its partition may have moved since); ``status()`` of an id
    whose result this caller was given (``status``: the log must say it ended);
    ``get_workflow`` of ids never created (``unknown``).

    Each call is reported as ``op <t0> <t1> <op> <route> <id> <status> <detail>``:
    ``route`` is ``local`` when this instance owned the id's partition as the call began,
    else ``remote``; a ``start`` whose handle came back is reported as ``started``."""

    def __init__(self, kbit: Kapbit, prefix: str, base: int) -> None:
        self._kbit = kbit
        self._prefix = prefix
        self._next = base
        self._unknown = base + UNKNOWN_BASE
        self._known: list[str] = []  # ids whose creation was acknowledged
        self._handles: list[WorkflowHandle[Any]] = []  # handles start_workflow returned
        self._ended: list[str] = []  # ids whose result this caller was given
        self._random = random.Random(os.getpid())

    def _fresh(self) -> str:
        """A new id; three in four on partitions another instance owns (while any does)."""
        for _ in range(4 * LOCAL_SHARE):
            workflow_id = f"{self._prefix}-{self._next}"
            self._next += 1
            if self._next % LOCAL_SHARE == 0 or not self._local(workflow_id):
                return workflow_id
        return workflow_id

    def _local(self, workflow_id: str) -> bool:
        try:
            return self._kbit.owner_of(workflow_id).local
        except KapbitError:
            return False

    def _pick_known(self) -> str | None:
        recent = self._known[-64:]
        return self._random.choice(recent) if recent else None

    async def call(self, k: int) -> CallLine:
        op = MIX[k % len(MIX)]
        held = self._random.choice(self._handles[-64:]) if self._handles else None
        if op == "handle" and held is not None:
            workflow_id: str | None = held.id
        elif op == "status" and self._ended:
            workflow_id = self._random.choice(self._ended[-64:])
        else:
            op = "get" if op in ("handle", "status") else op
            workflow_id = self._pick_known() if op in ("get", "attach", "dup") else None
        if workflow_id is None:
            op = op if op in ("exec", "start", "unknown") else "exec"
            if op == "unknown":
                workflow_id = f"{self._prefix}-{self._unknown}"
                self._unknown += 1
            else:
                workflow_id = self._fresh()
        route = "local" if self._local(workflow_id) else "remote"
        started = time.time()
        task = asyncio.current_task()
        if task is not None:  # named for the report of a call that never returns
            task.set_name(f"{op} {route} {workflow_id} since {started:.6f}")
        if op == "handle":
            assert held is not None
            op, outcome = await self._held(held)
        else:
            op, outcome = await self._perform(op, workflow_id)
        if not isinstance(outcome, BaseException) and op != "status":
            if op == "exec":
                self._known.append(workflow_id)
            self._ended.append(workflow_id)
        return _call_line(started, workflow_id, outcome, op, route)

    async def _perform(self, op: str, workflow_id: str) -> tuple[str, Any]:
        """Make call ``op``: what it returned or raised, and ``started`` for a ``start``
        whose handle came back (then the outcome is its ``result()``'s)."""
        kbit = self._kbit
        input = {"n": workflow_number(workflow_id), "id": workflow_id}
        try:
            if op == "exec":
                return op, await kbit.exec_workflow(workflow_id, WORKFLOW, input)
            if op in ("attach", "dup"):
                duplicate: Any = "attach" if op == "attach" else "raise"
                result = await kbit.exec_workflow(
                    workflow_id, WORKFLOW, input, on_duplicate=duplicate
                )
                return op, result
            if op == "start":
                handle = await kbit.start_workflow(workflow_id, WORKFLOW, input)
                op = "started"
                self._known.append(workflow_id)  # acknowledged: later calls may ask for it
                self._handles.append(handle)
                return op, await handle.result()
            if op == "status":
                return op, str(await kbit.get_workflow(workflow_id).status())
            return op, await kbit.get_workflow(workflow_id).result()  # get, unknown
        except Exception as exc:
            return op, exc

    async def _held(self, handle: WorkflowHandle[Any]) -> tuple[str, Any]:
        try:
            return "handle", await handle.result()
        except Exception as exc:
            return "handle", exc


async def _report_ownership(kbit: Kapbit, closing: asyncio.Event) -> None:
    """Print ``owns`` each time the set of owned partitions changes, ``busy <n>`` each time
    the number of workflows the instance runs does."""
    last: frozenset[int] | None = None
    busy = -1
    while not closing.is_set():
        owned = owned_partitions(kbit)
        if owned != last:
            last = owned
            print(f"owns {','.join(map(str, sorted(owned))) or '-'}", flush=True)
        running = len(kbit.in_flight())
        if running != busy:
            busy = running
            print(f"busy {running}", flush=True)
        await asyncio.sleep(0.05)  # sampling the instance's state, not synchronisation


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.group_worker")
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("--label", required=True, help="names the worker's ids and node")
    parser.add_argument("--run", type=int, default=0, help="which start of this label")
    parser.add_argument("--group", default=None, help="consumer group (omit: single instance)")
    parser.add_argument("--session", type=float, default=2.0, help="group session timeout, s")
    parser.add_argument("--heartbeat", type=float, default=0.1, help="group heartbeat, s")
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--count", type=int, default=0, help="calls to make (0: until told)")
    parser.add_argument("--step-delay", type=float, default=0.01)
    parser.add_argument("--journal", default=None, help="the shared execution journal")
    parser.add_argument("--base", type=int, default=0, help="the first saga number of its ids")
    parser.add_argument("--mix", action="store_true", help="the mixed load (Mixer)")
    parser.add_argument("--forward", action="store_true", help="serve and forward (request log)")
    parser.add_argument("--forward-timeout", type=float, default=30.0)
    parser.add_argument("--close-timeout", type=float, default=10.0)
    parser.add_argument(
        "--close-now", action="store_true", help="SIGTERM closes with the calls in flight"
    )
    return asyncio.run(_run(parser.parse_args(argv)))


# --- driving workers from a test ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """One call a worker made and how it returned: ``exec_workflow`` of a fresh id, or an
    ``op`` of the mixed load (see :class:`Mixer`) whose id's partition was owned here or
    elsewhere (``route``) as it began."""

    worker: str
    pid: int
    started: float
    ended: float
    workflow_id: str
    status: str  # result, error or crash
    detail: str  # the result's JSON, or "<class> <refusal> <message>"
    op: str = "exec"
    route: str = ""

    @property
    def error(self) -> str:
        return self.detail.split(" ", 1)[0] if self.status != "result" else ""

    @property
    def refused(self) -> bool:
        """A refusal: the caller was told nothing was written."""
        return self.status == "error" and self.detail.split(" ", 2)[1] == "1"


class Worker:
    """A worker process started by a test; its output is parsed as it comes."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.lines: list[str] = []
        self.calls: list[Call] = []
        self.owned: frozenset[int] = frozenset()
        self.busy = 0  # workflows the instance runs, as last reported
        self.ownership: list[tuple[float, frozenset[int]]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, bootstrap: str, topic: str, label: str, run: int, *args: str) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.group_worker",
            bootstrap,
            topic,
            "--label",
            label,
            "--run",
            str(run),
            *args,
            cwd=_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(f"{label}{run}", process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while raw := await self.process.stdout.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("call "):
                _, t0, t1, wid, status, detail = [*line.split(" ", 5), ""][:6]
                self.calls.append(
                    Call(self.name, self.pid, float(t0), float(t1), wid, status, detail)
                )
            elif line.startswith("op "):
                _, t0, t1, op, route, wid, status, detail = [*line.split(" ", 7), ""][:8]
                self.calls.append(
                    Call(self.name, self.pid, float(t0), float(t1), wid, status, detail, op, route)
                )
            else:
                if line.startswith("busy "):
                    self.busy = int(line.split()[1])
                self.lines.append(line)
                if line.startswith("owns "):
                    owned = line.split()[1]
                    self.owned = (
                        frozenset() if owned == "-" else frozenset(int(p) for p in owned.split(","))
                    )
                    self.ownership.append((time.time(), self.owned))
            self._changed.set()
        self._changed.set()

    async def changed(self) -> None:
        """Return at the worker's next output line (or its end)."""
        if self._reader.done():
            return
        self._changed.clear()
        await self._changed.wait()

    @property
    def running(self) -> bool:
        return self.process.returncode is None and not self._reader.done()

    @property
    def output(self) -> str:
        tail = self.lines[-40:]
        return f"worker {self.name} (pid {self.pid}), last lines:\n" + "\n".join(tail)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until ``condition()`` holds, re-checked after each output line."""

        async def check() -> None:
            while not condition():
                if self._reader.done():
                    raise AssertionError(f"{self.name} ended before {what}:\n{self.output}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {what} in {timeout} s:\n{self.output}") from None

    async def line(self, text: str, timeout: float = 60.0) -> str:
        """The first line starting with ``text``."""
        await self.until(
            lambda: any(line.startswith(text) for line in self.lines), repr(text), timeout
        )
        return next(line for line in self.lines if line.startswith(text))

    async def results(self, count: int, timeout: float = 60.0) -> None:
        """Wait until the worker has ``count`` calls answered with a result in all."""
        await self.until(
            lambda: sum(call.status == "result" for call in self.calls) >= count,
            f"{count} results",
            timeout,
        )

    def signal(self, number: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(number)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit and its output to be read; its exit status."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
            await asyncio.wait_for(self._reader, 10.0)
        except TimeoutError:
            self.kill()
            await self.process.wait()
            raise AssertionError(
                f"{self.name} did not exit in {timeout} s:\n{self.output}"
            ) from None
        return code


@dataclass
class Cluster:
    """Worker processes on one topic (one group), started, killed and stopped by a test,
    with the wall-clock time of every kill and stop."""

    bootstrap: str
    topic: str
    journal: Path
    partitions: int
    group: str | None = None
    concurrency: int = 8
    step_delay: float = 0.01
    session: float = 2.0
    #: Further worker options (e.g. ``--mix``, ``--forward``), given to every start.
    options: tuple[str, ...] = ()
    workers: dict[str, Worker] = field(default_factory=dict)
    retired: list[Worker] = field(default_factory=list)
    killed: dict[int, float] = field(default_factory=dict)  # pid -> time of the SIGKILL
    stopped: dict[int, float] = field(default_factory=dict)  # pid -> time of the SIGTERM
    runs: dict[str, int] = field(default_factory=dict)
    #: (from, to): from a start, kill or stop until the live workers owned every partition.
    rebalances: list[tuple[float, float]] = field(default_factory=list)
    _since: float | None = None

    def _fault(self) -> None:
        if self._since is None:
            self._since = time.time()

    async def start(self, label: str, timeout: float = 60.0) -> Worker:
        run = self.runs.get(label, -1) + 1
        self.runs[label] = run
        args = [
            "--partitions",
            str(self.partitions),
            "--concurrency",
            str(self.concurrency),
            "--step-delay",
            str(self.step_delay),
            "--journal",
            str(self.journal),
            "--base",  # each start its own saga numbers: a result names its one id
            str(sum(self.runs.values(), len(self.runs)) * 1_000_000),
            *self.options,
        ]
        if self.group is not None:
            args += ["--group", self.group, "--session", str(self.session)]
        self._fault()
        worker = await Worker.start(self.bootstrap, self.topic, label, run, *args)
        self.workers[label] = worker
        await worker.line("started", timeout)
        return worker

    def live(self) -> list[Worker]:
        return [worker for worker in self.workers.values() if worker.running]

    def all_workers(self) -> list[Worker]:
        return [*self.retired, *self.workers.values()]

    async def kill(self, label: str) -> Worker:
        worker = self.workers.pop(label)
        self._fault()
        self.killed[worker.pid] = time.time()
        worker.kill()
        assert await worker.wait() == -signal.SIGKILL, worker.output
        self.retired.append(worker)
        return worker

    async def stop(self, label: str, timeout: float = 60.0) -> Worker:
        """SIGTERM: the worker stops calling, waits for its calls, closes its instance and
        exits 0; :attr:`stopped` holds the time it began to close."""
        worker = self.workers.pop(label)
        self._fault()
        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout) == 0, worker.output
        assert "closed" in worker.lines, worker.output
        closing = next(line for line in worker.lines if line.startswith("closing "))
        self.stopped[worker.pid] = float(closing.split()[1])
        self.retired.append(worker)
        return worker

    async def busy(self, label: str, workflows: int, timeout: float) -> None:
        """Wait until worker ``label`` runs at least ``workflows`` workflows."""
        worker = self.workers[label]
        await worker.until(lambda: worker.busy >= workflows, f"{workflows} in flight", timeout)

    async def owned_by_live(self, timeout: float) -> float:
        """Wait until the live workers own every partition between them, each once, and
        each of them some; how long it took since the last start, kill or stop."""
        live = self.live()

        def settled() -> bool:
            shares = [worker.owned for worker in live]
            union = frozenset[int]().union(*shares)
            return (
                union == frozenset(range(self.partitions))
                and sum(map(len, shares)) == len(union)
                and all(shares)
            )

        await _until_any(live, settled, "every partition owned once by the live workers", timeout)
        now = time.time()
        since, self._since = self._since if self._since is not None else now, None
        self.rebalances.append((since, now))
        return now - since

    def during_rebalances(self) -> list[Call]:
        """The calls that were in flight while the group was rebalancing."""
        return [
            call
            for call in self.calls()
            if any(call.started < end and call.ended > start for start, end in self.rebalances)
        ]

    async def progress(self, results: int, timeout: float = 60.0) -> None:
        """Wait until every live worker has ``results`` more results than now."""
        await asyncio.gather(
            *(
                worker.results(sum(c.status == "result" for c in worker.calls) + results, timeout)
                for worker in self.live()
            )
        )

    async def drain(self, timeout: float = 120.0) -> None:
        """Every live worker stops calling and waits for its calls in flight."""
        for worker in self.live():
            worker.signal(signal.SIGUSR1)
        await asyncio.gather(*(worker.line("drained", timeout) for worker in self.live()))

    async def close(self) -> None:
        """Stop every live worker gracefully (tests call it last); kill any left over."""
        for label in list(self.workers):
            worker = self.workers[label]
            if worker.running:
                await self.stop(label)
            else:
                self.retired.append(self.workers.pop(label))

    def abort(self) -> None:
        """Kill whatever still runs (after a failed test)."""
        for worker in self.workers.values():
            worker.kill()

    def calls(self) -> list[Call]:
        return [call for worker in self.all_workers() for call in worker.calls]


async def _until_any(
    workers: list[Worker], condition: Callable[[], bool], what: str, timeout: float
) -> None:
    """Wait until ``condition()`` holds, re-checked whenever any of ``workers`` prints."""

    async def check() -> None:
        while not condition():
            for worker in workers:
                if not worker.running:
                    raise AssertionError(f"{worker.name} ended before {what}:\n{worker.output}")
            waits = [asyncio.ensure_future(worker.changed()) for worker in workers]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    try:
        await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        outputs = "\n".join(worker.output for worker in workers)
        raise AssertionError(f"no {what} in {timeout} s:\n{outputs}") from None


async def settled_log(bootstrap: str, topic: str, timeout: float = 120.0) -> Log:
    """Read the topic back until every workflow created in it has ended; that log.

    Workflows whose callers died are finished by their partition's owner on its own, with
    nobody to tell: the log is the only place that says when.
    """
    deadline = time.monotonic() + timeout
    while True:
        log = await read_log(bootstrap, topic)
        open_ = sorted(set(log.created()) - set(log.terminals()))
        if not open_:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(open_)} workflows still open after {timeout} s: {open_[:10]}"
            )
        await asyncio.sleep(0.5)  # polling the log: nothing to wait on


# --- the scenarios of issue 13 ---------------------------------------------------------------


@dataclass
class ScenarioReport:
    """A scenario's audit, and how fast the instances took over from each other.

    ``failovers``: per SIGKILL. ``handovers``: per graceful stop during the run (not the
    final ones). ``settled``: seconds from each start, kill or stop until the live workers
    owned every partition. ``during_rebalance``: calls in flight while the group rebalanced.
    """

    audit: GroupAudit
    failovers: list[Handover]
    handovers: list[Handover]
    settled: list[float]
    during_rebalance: list[Call]
    answers: AnswerAudit

    def summary(self) -> str:
        def times(takes: list[Handover]) -> str:
            return ", ".join(
                f"{t.claimed:.2f} s claimed / {t.resumed:.2f} s resumed ({t.workflows} in "
                f"flight resumed by others; of {t.open} open, {t.finished} ended by it, all "
                f"ended after {t.ended:.2f} s)"
                for t in takes
            )

        refusals = sum(call.refused for call in self.during_rebalance)
        answers = self.answers
        mixed = f"; {answers.summary()}" if answers.count() > answers.count(op="exec") else ""
        return (
            f"{self.audit.summary()}; failover (kill -> claimed / in-flight resumed): "
            f"{times(self.failovers)}; graceful hand-over (close -> claimed / resumed): "
            f"{times(self.handovers)}; group settled after each change in "
            f"{', '.join(f'{t:.2f}' for t in self.settled)} s; {len(self.during_rebalance)} "
            f"calls during rebalances ({refusals} refused){mixed}"
        )


async def kill_restart_stop(
    cluster: Cluster, rounds: int, load: int, settle: float
) -> ScenarioReport:
    """Three workers under load; per round: SIGKILL B, start it again, stop C gracefully,
    start it again; each time the survivors own every partition and make progress."""
    settled = []
    for label in "ABC":
        await cluster.start(label)
    settled.append(await cluster.owned_by_live(settle))
    await cluster.progress(load)
    for _ in range(rounds):
        steps: list[tuple[Callable[[str], Awaitable[Worker]], str]] = [
            (cluster.kill, "B"),
            (cluster.start, "B"),
            (cluster.stop, "C"),
            (cluster.start, "C"),
        ]
        for change, label in steps:
            await change(label)
            settled.append(await cluster.owned_by_live(settle))
            await cluster.progress(load)
    return await finish(cluster, settled)


async def rolling_restart(cluster: Cluster, load: int, settle: float) -> ScenarioReport:
    """Three workers under load; each in turn is stopped gracefully and started again."""
    settled = []
    for label in "ABC":
        await cluster.start(label)
    settled.append(await cluster.owned_by_live(settle))
    await cluster.progress(load)
    for label in "ABC":
        await cluster.stop(label)
        settled.append(await cluster.owned_by_live(settle))
        await cluster.progress(load)
        await cluster.start(label)
        settled.append(await cluster.owned_by_live(settle))
        await cluster.progress(load)
    return await finish(cluster, settled)


async def forward_under_rebalance(
    cluster: Cluster, rounds: int, load: int, settle: float, busy: int
) -> ScenarioReport:
    """Three workers making the mixed load, mostly for ids owned by the others (forwarded);
    per round: SIGKILL B, start it again, then stop C gracefully while it runs at least
    ``busy`` workflows (it closes under them: ``--close-now``), and start C again but after
    the last round; each time the survivors own every partition and make progress."""
    settled = []
    for label in "ABC":
        await cluster.start(label)
    settled.append(await cluster.owned_by_live(settle))
    await cluster.progress(load)
    for round_ in range(rounds):
        await cluster.kill("B")
        settled.append(await cluster.owned_by_live(settle))
        await cluster.progress(load)
        await cluster.start("B")
        settled.append(await cluster.owned_by_live(settle))
        await cluster.progress(load)
        await cluster.busy("C", busy, settle)
        await cluster.stop("C")
        settled.append(await cluster.owned_by_live(settle))
        await cluster.progress(load)
        if round_ < rounds - 1:
            await cluster.start("C")
            settled.append(await cluster.owned_by_live(settle))
            await cluster.progress(load)
    return await finish(cluster, settled)


async def finish(cluster: Cluster, settled: list[float]) -> ScenarioReport:
    """Drain the calls, wait until the log has ended every workflow, stop the workers and
    audit; measure the takeovers of the run's kills and stops."""
    await cluster.drain()
    log = await settled_log(cluster.bootstrap, cluster.topic)
    during = dict(cluster.stopped)
    await cluster.close()
    executions = read_executions(cluster.journal)
    calls = cluster.calls()
    return ScenarioReport(
        audit_run(log, calls, executions),
        [handover(log, executions, pid, at) for pid, at in cluster.killed.items()],
        [handover(log, executions, pid, at) for pid, at in during.items()],
        settled,
        cluster.during_rebalances(),
        audit_answers(log, calls),
    )


# --- the audit ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Execution:
    """One journaled step execution."""

    time: float
    workflow_id: str
    step: int
    phase: str
    pid: int
    seen: int


def read_executions(path: Path) -> list[Execution]:
    """The execution journal, in the order the lines were written."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    executions = []
    for line in text.splitlines():
        t, wid, step, phase, pid, seen = line.split()
        executions.append(Execution(float(t), wid, int(step), phase, int(pid), int(seen)))
    return executions


@dataclass
class GroupAudit:
    """What the log, the calls and the execution journal say about a run.

    ``lost``: created workflows without a terminal record. ``doubled``: created or ended by
    two writers, ended twice, a result other than the saga's, an outcome path other than the
    saga's. ``wrong``: calls answered wrongly (a result unlike the log's, a refusal for a
    workflow that was written, an exception that is no kapbit error). ``reacted``: step
    executions that acted on an outcome twice: one that saw other outcomes than the
    persisted ones before it, or ran again after its outcome was persisted.
    """

    calls: int = 0
    results: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    created: int = 0
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    reacted: list[str] = field(default_factory=list)
    repeated: int = 0
    copies: int = 0

    def summary(self) -> str:
        return (
            f"{self.calls} calls, {self.results} results, refusals {self.refusals}, errors "
            f"{self.errors}, {self.created} created, {len(self.lost)} lost, {len(self.doubled)} "
            f"doubled, {len(self.wrong)} answered wrongly, {len(self.reacted)} outcomes acted "
            f"on twice, {self.repeated} executions repeated after an owner lost its partition, "
            f"{self.copies} duplicate records"
        )

    def assert_clean(self, context: str = "") -> None:
        summary = f"{self.summary()} {context}"
        assert self.lost == [], f"lost {self.lost[:20]}: {summary}"
        assert self.doubled == [], f"doubled {self.doubled[:20]}: {summary}"
        assert self.wrong == [], f"wrong {self.wrong[:20]}: {summary}"
        assert self.reacted == [], f"acted twice {self.reacted[:20]}: {summary}"


def audit_run(log: Log, calls: Iterable[Call], executions: list[Execution]) -> GroupAudit:
    """Check a run of :class:`Cluster` workers against the log read back."""
    report = GroupAudit()
    codec_results = log.results()
    created = log.created()
    terminals = log.terminals()
    outcomes = log.outcomes()
    report.created = len(created)

    def distinct(entries: list[Any], key: Callable[[Any], Any]) -> list[Any]:
        seen: dict[Any, Any] = {}
        for entry in entries:
            if key(entry) in seen:
                report.copies += 1
            else:
                seen[key(entry)] = entry
        return list(seen.values())

    for wid, entries in sorted(created.items()):
        n = workflow_number(wid)
        if len(distinct(entries, lambda e: e.node)) > 1:
            report.doubled.append(f"{wid}: created by several writers")
        ends = distinct(terminals.get(wid, []), lambda e: (e.node, e.kind))
        if not ends:
            report.lost.append(wid)
            continue
        if len(ends) > 1:
            report.doubled.append(f"{wid}: {len(ends)} terminal records")
        if [repr(r) for r in codec_results.get(wid, [])][:1] != [repr(expected_result(n))]:
            report.doubled.append(f"{wid}: result {codec_results.get(wid)}")
        persisted = distinct(outcomes.get(wid, []), lambda e: (e.event.step, e.event.phase))
        path = [(e.event.step, e.event.phase) for e in persisted]
        if path != expected_path(n):
            report.doubled.append(f"{wid}: outcome path {path}")

    for call in calls:
        if call.op != "exec":
            continue  # the mixed load's other calls: audit_answers
        report.calls += 1
        in_log = call.workflow_id in created
        if call.status == "result":
            report.results += 1
            answer = json.loads(call.detail)
            if answer != expected_result(workflow_number(call.workflow_id)) or not in_log:
                report.wrong.append(f"{call.workflow_id}: answered {answer}, in log: {in_log}")
        elif call.status == "crash":
            report.wrong.append(f"{call.workflow_id}: untyped {call.detail}")
        elif call.refused:
            report.refusals[call.error] = report.refusals.get(call.error, 0) + 1
            if in_log:
                report.wrong.append(f"{call.workflow_id}: refused ({call.error}) yet created")
        else:
            report.errors[call.error] = report.errors.get(call.error, 0) + 1

    writers = {
        (wid, e.event.step, e.event.phase): pid_of(e.node)
        for wid, entries in outcomes.items()
        for e in entries
    }
    runs: dict[tuple[str, int, str], list[Execution]] = defaultdict(list)
    for execution in executions:
        runs[(execution.workflow_id, execution.step, execution.phase)].append(execution)
    for key, done in runs.items():
        wid, step, phase = key
        path = expected_path(workflow_number(wid))
        if (step, phase) not in path:
            report.reacted.append(f"{key}: not on the saga's path")
            continue
        position = path.index((step, phase))
        for execution in done:
            if execution.seen != position:
                report.reacted.append(f"{key}: ran having seen {execution.seen} outcomes")
        # The persisted outcome is the last execution's: nobody ran the step after it.
        if key in writers and writers[key] != done[-1].pid:
            report.reacted.append(
                f"{key}: persisted by {writers[key]}, then run by {[e.pid for e in done]}"
            )
        report.repeated += len(done) - 1
    for key in set(writers) - set(runs):
        report.reacted.append(f"{key}: persisted, never executed")
    return report


@dataclass(frozen=True)
class Handover:
    """How long the instances took to take over from ``pid`` after ``since``.

    ``claimed``: until the last of its partitions was claimed by another writer.
    ``resumed``: until the last of its in-flight workflows ran a step (or wrote a record)
    on another process. ``workflows``: how many of them the others resumed. ``open``: the
    workflows of its partitions it had written to and not ended at ``since``; ``finished``:
    how many of those it ended itself after ``since`` (a graceful close drains); ``ended``:
    until the last of the ``open`` ones ended.
    """

    pid: int
    partitions: int
    workflows: int
    claimed: float
    resumed: float
    open: int = 0
    finished: int = 0
    ended: float = 0.0


_TERMINAL = ("workflow_result", "dead_letter", "rejected")


def handover(log: Log, executions: list[Execution], pid: int, since: float) -> Handover:
    """Measure the takeover from worker ``pid`` (SIGKILLed or stopped at ``since``)."""
    claims: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for entry in log.claims():
        claims[entry.partition].append((entry.event.at, pid_of(entry.node)))
    mine: set[int] = set()  # the partitions it owned at ``since``
    claimed = 0.0
    for partition, made in claims.items():
        before = [who for t, who in sorted(made) if t < since]
        if not before or before[-1] != pid:
            continue
        mine.add(partition)
        after = [t for t, who in sorted(made) if t >= since and who != pid]
        if after:
            claimed = max(claimed, after[0] - since)
    by_workflow = log.by_workflow()
    first_other: dict[str, float] = {}
    for execution in executions:
        if execution.pid != pid and execution.time >= since:
            first_other.setdefault(execution.workflow_id, execution.time)
    resumed = ended = 0.0
    workflows = open_ = finished = 0
    for wid, entries in by_workflow.items():
        if entries[0].partition not in mine or not any(pid_of(e.node) == pid for e in entries):
            continue
        ends = [e for e in entries if e.kind in _TERMINAL]
        if any(e.event.at < since for e in ends):
            continue
        open_ += 1
        if ends:
            ended = max(ended, ends[0].event.at - since)
            finished += pid_of(ends[0].node) == pid
        later = [e.event.at for e in entries if pid_of(e.node) != pid and e.event.at >= since]
        if wid in first_other:
            later.append(first_other[wid])
        if later:
            workflows += 1
            resumed = max(resumed, min(later) - since)
    return Handover(pid, len(mine), workflows, claimed, resumed, open_, finished, ended)


# --- the audit of answers (the mixed load) ---------------------------------------------------


@dataclass
class AnswerAudit:
    """Every answer of the mixed load against the log.

    ``counts``: answers by ``"<op> <route> <kind>"`` (kind: ``result`` or the error class).
    ``wrong``: answers the log contradicts: a result other than the log's result for that
    id (or before the log had it, or none in the log), a result where only a refusal is
    right (``dup``, ``unknown``), a refusal of a workflow the log has (or whose creation
    was acknowledged), ``WorkflowNotFound`` for an acknowledged one, ``DuplicateWorkflow``
    for a fresh id, an id never created found in the log, a status other than the end of
    a workflow whose result the caller was given, an untyped exception.
    """

    counts: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)

    def count(self, *, op: str | None = None, route: str | None = None, kind: str = "") -> int:
        """How many answers match ``op``, ``route`` and ``kind`` (``""``: any)."""
        total = 0
        for key, number in self.counts.items():
            op_, route_, kind_ = key.split(" ")
            if op not in (None, op_) or route not in (None, route_) or kind not in ("", kind_):
                continue
            total += number
        return total

    def summary(self) -> str:
        rows = ", ".join(f"{key}: {number}" for key, number in sorted(self.counts.items()))
        return f"{sum(self.counts.values())} answers ({rows}); {len(self.wrong)} wrong"


#: Ops whose id's creation was acknowledged before the call began.
_ACKNOWLEDGED = ("started", "get", "handle", "attach", "dup", "status")


def audit_answers(log: Log, calls: Iterable[Call]) -> AnswerAudit:
    """Check every answer of the calls against the log read back (see :class:`AnswerAudit`)."""
    report = AnswerAudit()
    created = log.created()
    results = log.results()
    terminals = log.terminals()
    for call in calls:
        kind = "result" if call.status == "result" else call.error or call.status
        key = f"{call.op} {call.route or '-'} {kind}"
        report.counts[key] = report.counts.get(key, 0) + 1
        problem = _wrong_answer(call, call.workflow_id in created, results, terminals)
        if problem is not None:
            report.wrong.append(
                f"{call.worker} {call.op} ({call.route}) {call.workflow_id}: {problem}"
            )
    return report


def _wrong_answer(
    call: Call, in_log: bool, results: dict[str, list[Any]], terminals: dict[str, list[Entry]]
) -> str | None:
    """Why the log contradicts ``call``'s answer (``None``: it does not)."""
    op, wid = call.op, call.workflow_id
    if call.status == "crash":
        return f"untyped {call.detail}"
    if op == "unknown" and in_log:
        return "an id never asked to be created is in the log"
    if op in _ACKNOWLEDGED and not in_log:
        return "its creation was acknowledged, the log has no such workflow"
    if call.status == "result" and op == "status":
        ended = "compensated" if fails(workflow_number(wid)) else "succeeded"
        status = json.loads(call.detail)
        return None if status == ended else f"status {status} of a workflow that {ended}"
    if call.status == "result":
        answer = json.loads(call.detail)
        logged = results.get(wid, [])
        if op in ("dup", "unknown"):
            return f"answered {answer} where only a refusal is right"
        if not logged:
            return f"answered {answer}; the log has no result"
        if answer != logged[0] or answer != expected_result(workflow_number(wid)):
            return f"answered {answer}; the log says {logged[0]}"
        end = terminals[wid][0].event.at
        if end > call.ended:
            return f"answered {end - call.ended:.3f} s before the log ended the workflow"
        return None
    error = call.error
    if error == "WorkflowNotFound" and op != "unknown":
        return "WorkflowNotFound for an id asked to be created" + (" (it is)" if in_log else "")
    if error == "DuplicateWorkflow" and op != "dup":
        return "DuplicateWorkflow for a fresh id" if op != "attach" else "attach refused"
    if call.refused and in_log and op != "dup":
        return f"refused ({error}) yet the workflow is in the log"
    return None


if __name__ == "__main__":
    sys.exit(main())
