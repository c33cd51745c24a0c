"""A kapbit worker process for the Kafka crash and takeover tests, and what they share.

Run from the repository root as ``python -m tests.kafka_worker BOOTSTRAP TOPIC [options]``.
The worker starts a :class:`~kapbit.Kapbit` on the topic, prints ``started <node>
<recovered>``, then runs workflows ``w0`` .. ``w<count-1>`` of the ``crash`` saga (ids
already in the log are skipped; those still in flight are awaited), waits for every
workflow it recovered, closes and prints ``finished``. Exit status 0. If the instance is
fenced it prints ``fenced <reason>`` and exits with status :data:`EXIT_FENCED`.

Every step execution is journaled *before* the step returns (one line ``wid step phase
pid``, appended, flushed and fsynced), so after a SIGKILL the journal says exactly which
steps ran, and in which process. ``--results`` journals each result ``exec_workflow``
returned (``wid <json>``). ``--hold-every K`` makes workflow ``n`` with ``n % K == K - 1``
block in step 1 forever (it stays in flight until another instance takes over).

The module also holds the log reader the Kafka fault tests check the topic with: it
skips zombie writes exactly like recovery does (:class:`~kapbit.fencing.OwnerTracker`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kapbit import (
    CheckpointPolicy,
    Definition,
    DuplicateWorkflow,
    Failure,
    Fenced,
    JsonCodec,
    Kapbit,
    Options,
    Progress,
    Step,
    Success,
    WorkflowNotFound,
)
from kapbit.events import StepOutcome, WorkflowCreated, WorkflowResult
from kapbit.fencing import OwnerTracker
from kapbit.repository.kafka import KafkaRepository
from kapbit.restore import decode_event

EXIT_FENCED = 3
_ROOT = Path(__file__).resolve().parent.parent  # where ``python -m tests.kafka_worker`` runs
WORKFLOW = "crash"
STEPS = 3

# --- the saga -----------------------------------------------------------------------------


def fails(n: int) -> bool:
    """Workflow ``n`` fails at its last step and compensates the two before it."""
    return n % 3 == 0


def expected_path(n: int) -> list[tuple[int, str]]:
    """The ``(step, phase)`` outcomes workflow ``n`` persists, in order."""
    path = [(i, "execute") for i in range(STEPS)]
    if fails(n):
        path += [(i, "compensate") for i in reversed(range(STEPS - 1))]
    return path


def expected_result(n: int) -> dict[str, Any]:
    """The result of workflow ``n``."""
    done = STEPS - 1 if fails(n) else STEPS
    return {
        "n": n,
        "values": [f"e{i}-{n}" for i in range(done)],
        "compensated": list(reversed(range(STEPS - 1))) if fails(n) else [],
    }


class Journal:
    """Appends one line per call, flushed and fsynced before returning."""

    def __init__(self, path: str | None) -> None:
        self._fd = (
            None if path is None else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        )

    def write(self, line: str) -> None:
        if self._fd is not None:
            os.write(self._fd, (line + "\n").encode())  # one write: a kill never splits it
            os.fsync(self._fd)


def crash_saga(executions: Journal, hold_every: int = 0) -> Definition:
    """The saga of the crash and takeover tests; every execution is journaled first."""
    pid = os.getpid()
    never = asyncio.Event()

    def action(step: int, phase: str) -> Any:
        async def act(input: dict[str, Any], progress: Progress) -> Any:
            n = input["n"]
            if phase == "execute" and step == 1 and _held(n, hold_every):
                await never.wait()
            executions.write(f"w{n} {step} {phase} {pid}")
            if phase == "execute" and step == STEPS - 1 and fails(n):
                return Failure(f"no-{n}")
            return Success(f"{phase[0]}{step}-{n}")

        return act

    return saga_of(action)


def saga_result(input: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """The result of the ``crash`` saga (:func:`expected_result` says what it must be)."""
    return {
        "n": input["n"],
        "values": progress.values(),
        "compensated": [i for i, _ in progress.compensations],
    }


def saga_of(action: Callable[[int, str], Any]) -> Definition:
    """The ``crash`` saga whose step ``i`` runs ``action(i, phase)`` in either phase."""
    return Definition(
        WORKFLOW,
        steps=[Step(action(i, "execute"), action(i, "compensate")) for i in range(STEPS)],
        result=saga_result,
        input_type=dict[str, Any],
        outcome_type=str,
    )


# --- the worker ---------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    node = f"worker-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    results = Journal(args.results)
    repository = KafkaRepository(args.bootstrap, args.topic, partitions=args.partitions)
    kbit = Kapbit(
        [crash_saga(Journal(args.executions), args.hold_every)],
        repository,
        options=Options(
            node_id=node,
            # Checkpoints move often, so every restart recovers from one.
            checkpoints=CheckpointPolicy(every=20, interval=0.2),
        ),
    )
    try:
        await kbit.start()
    except Fenced as exc:
        print(f"fenced {exc}", flush=True)
        return EXIT_FENCED
    recovered = kbit.in_flight()
    print(f"started {node} {len(recovered)}", flush=True)
    slots = asyncio.Semaphore(args.concurrency)
    fenced: list[Fenced] = []

    async def finish(workflow_id: str) -> None:
        try:
            result = await kbit.wait_result(workflow_id)
        except WorkflowNotFound:
            return  # finished by an earlier process
        results.write(f"{workflow_id} {json.dumps(result)}")

    async def one(n: int) -> None:
        workflow_id = f"w{n}"
        try:
            try:
                result = await kbit.exec_workflow(workflow_id, WORKFLOW, {"n": n})
            except DuplicateWorkflow:
                await finish(workflow_id)
                return
            results.write(f"{workflow_id} {json.dumps(result)}")
        except Fenced as exc:
            fenced.append(exc)
        finally:
            if not _held(n, args.hold_every):
                slots.release()

    waiting = [asyncio.create_task(finish(workflow_id)) for workflow_id in recovered]
    running: list[asyncio.Task[None]] = []
    held: list[asyncio.Task[None]] = []  # referenced, never awaited
    for n in range(args.count):
        await slots.acquire()
        if fenced:
            break
        if _held(n, args.hold_every):
            slots.release()  # a held workflow never frees its slot in this process
        task = asyncio.create_task(one(n))
        (held if _held(n, args.hold_every) else running).append(task)
    try:
        await asyncio.gather(*waiting, *running)
    except Fenced as exc:
        fenced.append(exc)
    if fenced:
        print(f"fenced {fenced[0]}", flush=True)
        await kbit.close()
        return EXIT_FENCED
    await kbit.close()
    print("finished", flush=True)
    return 0


def _held(n: int, hold_every: int) -> bool:
    return bool(hold_every) and n % hold_every == hold_every - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kafka_worker")
    parser.add_argument("bootstrap")
    parser.add_argument("topic")
    parser.add_argument("--partitions", type=int, default=None)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--executions", default=None)
    parser.add_argument("--results", default=None)
    parser.add_argument("--hold-every", type=int, default=0)
    return asyncio.run(_run(parser.parse_args(argv)))


# --- driving a worker from a test ---------------------------------------------------------


class WorkerProcess:
    """A worker started by a test: its output lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, bootstrap: str, topic: str, *args: str) -> WorkerProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.kafka_worker",
            bootstrap,
            topic,
            *args,
            cwd=_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def line(self, prefix: str, timeout: float = 30.0) -> str:
        """The first output line starting with ``prefix``, waiting for it if need be."""

        async def find() -> str:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if self._reader.done():
                    raise AssertionError(
                        f"worker {self.pid} ended without printing {prefix!r}:\n{self.output}"
                    )
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"worker {self.pid} printed no {prefix!r} in {timeout} s:\n{self.output}"
            ) from None

    async def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit (and its output to be read); its exit status."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
            await asyncio.wait_for(self._reader, 5.0)
        except TimeoutError:
            self.kill()
            await self.process.wait()
            raise AssertionError(
                f"worker {self.pid} did not exit in {timeout} s:\n{self.output}"
            ) from None
        return code

    def kill(self) -> None:
        """SIGKILL, unless it has exited already."""
        if self.process.returncode is None:
            self.process.kill()


# --- reading the log back -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of the topic, decoded; ``zombie`` if its writer had lost the partition."""

    partition: int
    offset: int
    kind: str
    key: str
    node: str
    zombie: bool
    event: Any


@dataclass
class Log:
    """The whole topic as read back by a zombie-filtering reader."""

    entries: list[Entry] = field(default_factory=list)

    def admitted(self) -> list[Entry]:
        """The records every reader acts on (zombie writes skipped)."""
        return [e for e in self.entries if not e.zombie]

    def zombies(self) -> list[Entry]:
        return [e for e in self.entries if e.zombie]

    def by_workflow(self) -> dict[str, list[Entry]]:
        """Admitted workflow records (no ``ActiveWriter``) by workflow id, in log order."""
        workflows: dict[str, list[Entry]] = defaultdict(list)
        for entry in self.admitted():
            if entry.kind != "active_writer":
                workflows[entry.key].append(entry)
        return dict(workflows)

    def created(self) -> dict[str, list[Entry]]:
        """Admitted ``WorkflowCreated`` records by workflow id."""
        return _group(e for e in self.admitted() if isinstance(e.event, WorkflowCreated))

    def terminals(self) -> dict[str, list[Entry]]:
        """Admitted terminal records (result, dead letter, rejected) by workflow id."""
        return _group(
            e for e in self.admitted() if e.kind in ("workflow_result", "dead_letter", "rejected")
        )

    def results(self) -> dict[str, list[Any]]:
        """The decoded results of the admitted ``WorkflowResult`` records by workflow id."""
        codec = JsonCodec()
        found: dict[str, list[Any]] = defaultdict(list)
        for entry in self.admitted():
            if isinstance(entry.event, WorkflowResult):
                found[entry.key].append(codec.decode(entry.event.result, Any))
        return dict(found)

    def outcomes(self) -> dict[str, list[Entry]]:
        """Admitted ``StepOutcome`` records by workflow id, in log order."""
        return _group(e for e in self.admitted() if isinstance(e.event, StepOutcome))

    def claims(self) -> list[Entry]:
        """Every ``ActiveWriter`` record."""
        return [e for e in self.entries if e.kind == "active_writer"]


def _group(entries: Any) -> dict[str, list[Entry]]:
    grouped: dict[str, list[Entry]] = defaultdict(list)
    for entry in entries:
        grouped[entry.key].append(entry)
    return dict(grouped)


async def read_log(bootstrap: str, topic: str, **options: Any) -> Log:
    """Read every partition of ``topic`` from offset 0 and mark the zombie writes."""
    codec = JsonCodec()
    repository = KafkaRepository(bootstrap, topic, create_topic=False, **options)
    await repository.start()
    log = Log()
    try:
        for partition in range(repository.partitions):
            owners = OwnerTracker("")
            end = await repository.end_offset(partition)
            async for batch in repository.read(partition, 0, end):
                for record in batch:
                    admitted = owners.admit(record)
                    log.entries.append(
                        Entry(
                            record.partition,
                            record.offset,
                            record.kind,
                            record.key,
                            record.node,
                            not admitted,
                            decode_event(codec, record),
                        )
                    )
    finally:
        await repository.close()
    return log


@dataclass
class Audit:
    """What the log and the execution journal say about a run of ``crash`` sagas.

    ``lost``: ids expected to finish that have no admitted terminal record (or none created).
    ``doubled``: ids created by two nodes, terminated twice, a step outcome persisted by two
    nodes, or a result other than the saga's. ``reruns``: step executions that cannot be
    explained by a kill before the outcome was persisted (``(wid, step, phase, pids)``).
    ``repeated``: executions repeated because a kill fell before the outcome was persisted
    (allowed). ``copies``: second copies of a record by the same node (a lost ack).
    """

    expected: int
    accepted: int = 0
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    reruns: list[tuple[str, int, str, list[int]]] = field(default_factory=list)
    repeated: int = 0
    copies: int = 0

    def summary(self) -> str:
        return (
            f"{self.expected} workflows, {self.accepted} accepted, {len(self.lost)} lost, "
            f"{len(self.doubled)} doubled, {len(self.reruns)} steps re-run after a persisted "
            f"outcome, {self.repeated} executions repeated after kills, {self.copies} "
            "duplicate records"
        )


def audit(log: Log, journal: Path, killed: set[int], count: int) -> Audit:
    """Check workflows ``w0`` .. ``w<count-1>`` of the ``crash`` saga against ``log`` and the
    execution journal; ``killed`` are the pids of the workers SIGKILLed during the run."""
    report = Audit(count)
    ids = {f"w{n}" for n in range(count)}
    doubled: set[str] = set()

    def distinct(entries: list[Entry], key: Any) -> list[Entry]:
        """The entries with distinct ``key``; the rest are copies of one node's record."""
        seen: dict[Any, Entry] = {}
        for entry in entries:
            if key(entry) in seen:
                report.copies += 1
            else:
                seen[key(entry)] = entry
        return list(seen.values())

    created = log.created()
    report.accepted = len(created)
    results = log.results()
    terminals = log.terminals()
    outcomes = log.outcomes()
    for wid in sorted(ids | set(created)):
        n = int(wid[1:])
        if len(distinct(created.get(wid, []), lambda e: e.node)) > 1:
            doubled.add(wid)
        ends = distinct(terminals.get(wid, []), lambda e: (e.node, e.kind))
        if not ends:
            report.lost.append(wid)
            continue
        if len(ends) > 1 or {repr(r) for r in results.get(wid, [])} != {repr(expected_result(n))}:
            doubled.add(wid)
        persisted = distinct(outcomes.get(wid, []), lambda e: (e.event.step, e.event.phase, e.node))
        path = [(e.event.step, e.event.phase) for e in persisted]
        if path != expected_path(n):
            doubled.add(wid)
    report.doubled = sorted(doubled)

    executors: dict[tuple[str, int, str], list[int]] = defaultdict(list)
    for line in read_lines(journal):
        wid, step, phase, pid = line.split()
        executors[(wid, int(step), phase)].append(int(pid))
    writer = {
        (wid, e.event.step, e.event.phase): pid_of(e.node)
        for wid, entries in outcomes.items()
        for e in entries
    }
    for key, pids in executors.items():
        # Every earlier execution was in a process killed before it persisted the outcome,
        # one process runs a step at most once, and the outcome is the last run's.
        explained = (
            len(set(pids)) == len(pids) and writer.get(key) == pids[-1] and set(pids[:-1]) <= killed
        )
        if not explained:
            report.reruns.append((*key, pids))
        report.repeated += len(pids) - 1
    for key in set(writer) - set(executors):  # persisted but never executed
        report.reruns.append((*key, []))
    return report


def read_lines(path: Path) -> list[str]:
    """The complete lines of a journal (none if it does not exist yet)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return data.decode().splitlines()


def pid_of(node: str) -> int:
    """The process id in a worker's node id (``worker-<pid>-<random>``)."""
    return int(node.split("-")[1])


if __name__ == "__main__":
    sys.exit(main())
