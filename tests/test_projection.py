"""The projector: zombie writes, second copies, restarts, following, decoding."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import pytest

from kapbit import CorruptRecord, Definition, Kapbit, Progress, Step, Success, TransientStorageError
from kapbit.events import ActiveWriter, EventKind, StepOutcome, WorkflowCreated, WorkflowResult
from kapbit.projection import Position, ProjectedEvent, Projector, ReadModel, positions_at_end
from kapbit.repository import MemRepository, Record
from tests.projection_logs import (
    CODEC,
    EXPECTED,
    append,
    build_mixed_log,
    created,
    outcome,
    raw,
    result,
    retry,
    writer,
)


class ListModel:
    """A read model in memory: applied events and positions, committed together.

    ``fail_at`` makes the n-th ``apply`` raise before committing anything (a crash).
    """

    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list[ProjectedEvent] = []
        self.positions: dict[int, Position] = {}
        self.applies = 0
        self.fail_at = fail_at
        self.applied = asyncio.Event()

    async def load_positions(self) -> dict[int, Position]:
        return dict(self.positions)

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        self.applies += 1
        if self.applies == self.fail_at:
            raise RuntimeError(f"crash in apply {self.applies}")
        assert all(e.partition == partition for e in events)
        self.events.extend(events)
        self.positions[partition] = position
        self.applied.set()

    def where(self) -> list[tuple[int, int]]:
        return [(e.partition, e.offset) for e in self.events]


def _sorted(model: ListModel) -> list[tuple[int, int]]:
    return sorted(model.where())


async def test_list_model_is_a_read_model() -> None:
    assert isinstance(ListModel(), ReadModel)


async def test_mixed_log_zombie_writes_are_skipped() -> None:
    log = await build_mixed_log()
    model = ListModel()
    async with Projector(log.repo, model) as projector:
        applied = await projector.catch_up()
    records = log.repo.records()
    assert applied == len(records) - len(log.zombie_offsets)
    assert projector.skipped_zombies == len(log.zombie_offsets)
    delivered = set(model.where())
    for zombie in log.zombie_offsets:
        assert zombie not in delivered
    # In each partition events arrive in log order, each once.
    for p in range(2):
        offsets = [e.offset for e in model.events if e.partition == p]
        assert offsets == sorted(set(offsets))
    ids = {e.workflow_id for e in model.events} - {None}
    assert ids == set(EXPECTED)


async def test_hand_made_zombies_are_skipped_and_owner_changes_delivered() -> None:
    repo = MemRepository()
    await append(repo, 0, "a", writer("a"))  # 0
    await append(repo, 0, "a", created("w1"))  # 1
    await append(repo, 0, "b", writer("b"))  # 2
    await append(repo, 0, "a", outcome("w1", 0))  # 3 zombie
    await append(repo, 0, "b", outcome("w1", 0))  # 4
    await append(repo, 0, "stranger", created("w2"))  # 5 zombie (never owned)
    await append(repo, 0, "a", writer("a"))  # 6 a claims again
    await append(repo, 0, "b", result("w1"))  # 7 zombie of b now
    await append(repo, 0, "a", result("w1", "a-result"))  # 8
    model = ListModel()
    await Projector(repo, model).catch_up()
    assert model.where() == [(0, 0), (0, 1), (0, 2), (0, 4), (0, 6), (0, 8)]
    assert [e.node for e in model.events] == ["a", "a", "b", "b", "a", "a"]
    assert model.events[-1].value == "a-result"
    # w1 (created at 1) is in the idempotency window: a restart re-reads from there to
    # recognise late copies; a's claim names no window: the projector's default is used.
    assert model.positions[0] == Position(9, "a", 1, "a", 10_000)


async def test_second_copies_are_ignored() -> None:
    repo = MemRepository()
    for event in [
        writer("n"),  # 0
        writer("n"),  # 1 copy of the claim
        created("w"),  # 2
        created("w"),  # 3 copy
        outcome("w", 0),  # 4
        outcome("w", 0),  # 5 copy
        retry("w", 1),  # 6
        retry("w", 1),  # 7 copy
        retry("w", 2),  # 8
        outcome("w", 1, success=False),  # 9
        outcome("w", 0, "compensate"),  # 10
        outcome("w", 0, "compensate"),  # 11 copy
        result("w", compensated=True),  # 12
        result("w", compensated=True),  # 13 copy
        outcome("w", 2),  # 14 after the end: ignored
        created("w"),  # 15 late copy of the creation
    ]:
        await append(repo, 0, "n", event)
    model = ListModel()
    async with Projector(repo, model) as projector:
        await projector.catch_up()
    assert [o for _, o in model.where()] == [0, 2, 4, 6, 8, 9, 10, 12]
    assert projector.skipped_copies == 8
    assert projector.skipped_zombies == 0


async def test_copies_are_recognised_across_restarts_at_every_point() -> None:
    repo = MemRepository()
    events = [
        writer("n"),
        created("w1"),
        created("w2"),
        outcome("w1", 0),
        outcome("w2", 0),
        outcome("w1", 0),  # copy
        result("w1"),
        created("w2"),  # copy
        result("w1"),  # copy after the end
        outcome("w2", 1),
        outcome("w2", 1),  # copy
        result("w2"),
        outcome("w2", 1),  # copy after the end
        created("w3"),
        created("w1"),  # late copy of a terminated workflow's creation
    ]
    for event in events:
        await append(repo, 0, "n", event)
    reference = ListModel()
    await Projector(repo, reference).catch_up()
    assert [o for _, o in reference.where()] == [0, 1, 2, 3, 4, 6, 9, 11, 13]
    for stop_after in range(1, len(events)):
        model = ListModel(fail_at=stop_after + 1)
        with pytest.raises(RuntimeError):
            await Projector(repo, model, batch_size=1).catch_up()
        # The restarted projector rebuilds what it applied from the stored horizon.
        await Projector(repo, model, batch_size=1).catch_up()
        assert model.where() == reference.where(), f"restart after {stop_after} records"


async def test_restart_mid_stream_of_the_mixed_log_neither_loses_nor_repeats() -> None:
    log = await build_mixed_log()
    reference = ListModel()
    await Projector(log.repo, reference, batch_size=2).catch_up()
    total = reference.applies
    for crash in range(1, total + 1):
        model = ListModel(fail_at=crash)
        with pytest.raises(RuntimeError):
            await Projector(log.repo, model, batch_size=2).catch_up()
        await Projector(log.repo, model, batch_size=2).catch_up()
        assert _sorted(model) == _sorted(reference), f"crash in apply {crash}"
        assert len(model.events) == len(reference.events)


async def test_a_failed_apply_is_retried_by_the_same_projector() -> None:
    repo = MemRepository()
    for event in [writer("n"), created("w"), outcome("w", 0), result("w")]:
        await append(repo, 0, "n", event)
    model = ListModel(fail_at=2)
    projector = Projector(repo, model, batch_size=2)
    with pytest.raises(RuntimeError):
        await projector.catch_up()
    assert model.where() == [(0, 0), (0, 1)]
    assert await projector.catch_up() == 2
    assert model.where() == [(0, 0), (0, 1), (0, 2), (0, 3)]


async def test_catch_up_twice_applies_nothing_new() -> None:
    log = await build_mixed_log()
    model = ListModel()
    async with Projector(log.repo, model) as projector:
        first = await projector.catch_up()
        assert first > 0
        assert await projector.catch_up() == 0
    assert len(model.events) == first
    assert set(projector.positions) == {0, 1}


async def test_values_are_decoded_with_declared_types_or_generically() -> None:
    class Item(msgspec.Struct):
        sku: str
        qty: int

    def reserve(item: Item, _progress: Progress) -> Success[Item]:
        return Success(Item(item.sku, item.qty * 2))

    definition = Definition(
        "typed",
        steps=[Step(reserve)],
        result=lambda item, progress: progress.value(0),
        input_type=Item,
        outcome_type=Item,
        result_type=Item,
    )
    repo = MemRepository()
    async with Kapbit([definition], repo) as kbit:
        await kbit.exec_workflow("t1", "typed", Item("book", 2))

    typed = ListModel()
    await Projector(repo, typed, definitions=[definition]).catch_up()
    by_kind = {e.kind: e for e in typed.events}
    assert by_kind[EventKind.WORKFLOW_CREATED].value == Item("book", 2)
    assert by_kind[EventKind.STEP_OUTCOME].value == Item("book", 4)
    assert by_kind[EventKind.WORKFLOW_RESULT].value == Item("book", 4)
    assert by_kind[EventKind.STEP_OUTCOME].workflow_type == "typed"
    assert by_kind[EventKind.ACTIVE_WRITER].value is None
    assert isinstance(by_kind[EventKind.ACTIVE_WRITER].event, ActiveWriter)

    generic = ListModel()
    await Projector(repo, generic).catch_up()
    values = {e.kind: e.value for e in generic.events}
    assert values[EventKind.WORKFLOW_CREATED] == {"sku": "book", "qty": 2}
    assert values[EventKind.WORKFLOW_RESULT] == {"sku": "book", "qty": 4}


async def test_values_that_do_not_match_the_declared_type_are_corrupt() -> None:
    definition = Definition("typed", steps=[Step(lambda i, p: Success(1))], input_type=int)
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    await append(repo, 0, "n", created("w", type="typed", input="not a number"))
    with pytest.raises(CorruptRecord, match="offset 1"):
        await Projector(repo, ListModel(), definitions=[definition]).catch_up()


async def test_undecodable_record_raises_corrupt_record() -> None:
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    await repo.append(0, EventKind.STEP_OUTCOME, "w", "n", b"{not json")
    model = ListModel()
    with pytest.raises(CorruptRecord, match="offset 1"):
        await Projector(repo, model).catch_up()
    assert model.where() == []


async def test_run_follows_new_records_and_stop_returns() -> None:
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    model = ListModel()
    projector = Projector(repo, model)
    await projector.start()
    running = asyncio.create_task(projector.run())
    await projector.wait_caught_up(timeout=5)
    assert model.where() == [(0, 0)]
    await append(repo, 0, "n", created("w"))
    await append(repo, 0, "zombie", outcome("w", 0))
    await append(repo, 0, "n", outcome("w", 0))
    await projector.wait_caught_up(timeout=5)
    assert model.where() == [(0, 0), (0, 1), (0, 3)]
    assert model.positions[0].offset == 4
    await projector.close()
    await asyncio.wait_for(running, 5)  # run() returns once stopped
    assert running.exception() is None


async def test_run_is_cancellable() -> None:
    repo = MemRepository(partitions=3)
    model = ListModel()
    projector = Projector(repo, model)
    running = asyncio.create_task(projector.run())
    await asyncio.wait_for(projector.wait_caught_up(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    # The projector can be used again after a cancelled run.
    await append(repo, 1, "n", writer("n"))
    assert await projector.catch_up() == 1


async def test_stop_while_run_is_starting() -> None:
    connecting = asyncio.Event()
    connected = asyncio.Event()

    class SlowStart(MemRepository):
        async def start(self) -> None:
            connecting.set()
            await connected.wait()

    repo = SlowStart()
    await append(repo, 0, "n", writer("n"))
    model = ListModel()
    projector = Projector(repo, model)
    running = asyncio.create_task(projector.run())
    await asyncio.wait_for(connecting.wait(), 5)
    await projector.close()  # while run() is still connecting
    connected.set()
    await asyncio.wait_for(running, 5)
    assert model.events == []
    assert await projector.catch_up() == 1  # usable afterwards


async def test_stop_before_a_run_task_begins() -> None:
    """``create_task(projector.run())`` then ``stop()`` at once (a service shut down right
    after it started): the run must still end, and the projector stays usable."""
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    model = ListModel()
    projector = Projector(repo, model)
    await projector.start()
    running = asyncio.create_task(projector.run())
    catching = asyncio.create_task(projector.catch_up())
    await projector.close()  # before either task ran a single step
    await asyncio.wait_for(running, 5)
    assert await asyncio.wait_for(catching, 5) == 0
    assert model.events == []
    assert await projector.catch_up() == 1


async def test_only_one_projection_at_a_time() -> None:
    projector = Projector(MemRepository(), ListModel())
    running = asyncio.create_task(projector.run())
    await asyncio.wait_for(projector.wait_caught_up(), 5)
    with pytest.raises(RuntimeError, match="already"):
        await projector.catch_up()
    await projector.close()
    await asyncio.wait_for(running, 5)


async def test_projector_alongside_a_running_instance() -> None:
    def step(_input: Any, _progress: Progress) -> Success[str]:
        return Success("done")

    definition = Definition("one", steps=[Step(step)])
    repo = MemRepository(partitions=4)
    model = ListModel()
    async with Kapbit([definition], repo) as kbit, Projector(repo, model) as projector:
        running = asyncio.create_task(projector.run())
        await asyncio.gather(*(kbit.exec_workflow(f"w{i}", "one", i) for i in range(40)))
        await projector.wait_caught_up(timeout=5)
        results = [e for e in model.events if isinstance(e.event, WorkflowResult)]
        assert sorted(e.workflow_id or "" for e in results) == sorted(f"w{i}" for i in range(40))
        await projector.close()
        await running
    created_inputs = sorted(e.value for e in model.events if isinstance(e.event, WorkflowCreated))
    assert created_inputs == list(range(40))


async def test_positions_at_end_follow_only_new_events_and_still_know_the_owner() -> None:
    repo = MemRepository()
    await append(repo, 0, "a", writer("a"))
    await append(repo, 0, "a", created("old"))
    await append(repo, 0, "b", writer("b"))
    await append(repo, 0, "b", created("w"))
    await append(repo, 0, "b", outcome("w", 0))
    start = await positions_at_end(repo)
    assert start[0].offset == 5
    model = ListModel()
    projector = Projector(repo, model, start_positions=start)
    await projector.catch_up()
    assert model.events == []
    await append(repo, 0, "a", outcome("old", 0))  # zombie: b owns the partition
    await append(repo, 0, "b", outcome("w", 0))  # a copy of an event before the start
    await append(repo, 0, "b", outcome("w", 1))
    assert await projector.catch_up() == 1
    assert model.where() == [(0, 7)]


async def test_positions_at_end_start_from_the_checkpoint() -> None:
    repo = MemRepository()
    for event in [writer("n"), created("w"), result("w"), created("v")]:
        await append(repo, 0, "n", event)
    from kapbit.repository import Checkpoint

    await repo.save_checkpoint(0, Checkpoint(offset=3, owner="n"))
    assert (await positions_at_end(repo))[0] == Position(4, "n", 3, "n")


class _FlakyRepository(MemRepository):
    """Its tail breaks once, after the first batch, with a transient error."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = 0

    async def tail(self, partition: int, start: int) -> AsyncIterator[Sequence[Record]]:
        async for batch in super().tail(partition, start):
            yield batch
            if self.broken == 0:
                self.broken += 1
                raise TransientStorageError("connection reset")


async def test_transient_errors_while_following_are_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kapbit import Backoff

    caplog.set_level(logging.WARNING, "kapbit.projection")

    repo = _FlakyRepository()
    await append(repo, 0, "n", writer("n"))
    model = ListModel()
    projector = Projector(
        repo, model, retry_backoff=Backoff(initial=0.001, maximum=0.001, jitter=0.0)
    )
    running = asyncio.create_task(projector.run())
    await projector.wait_caught_up(timeout=5)
    await append(repo, 0, "n", created("w"))
    await projector.wait_caught_up(timeout=5)
    assert repo.broken == 1
    assert model.where() == [(0, 0), (0, 1)]
    await projector.close()
    await running
    # the retry is logged with the structured fields every kapbit log record carries
    [retry] = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retry.__dict__.get("partition") == 0
    assert "workflow_id" in retry.__dict__ and retry.__dict__["workflow_id"] is None


async def test_a_failing_model_stops_run_and_wakes_waiters() -> None:
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    model = ListModel(fail_at=1)
    projector = Projector(repo, model)
    running = asyncio.create_task(projector.run())
    with pytest.raises(RuntimeError, match="crash"):
        await projector.wait_caught_up(timeout=5)
    with pytest.raises(RuntimeError, match="crash"):
        await running


async def test_partition_subset() -> None:
    repo = MemRepository(partitions=3)
    for p in range(3):
        await append(repo, p, "n", writer("n"))
    model = ListModel()
    await Projector(repo, model, partitions=[2]).catch_up()
    assert model.where() == [(2, 0)]
    with pytest.raises(ValueError, match="partition 3"):
        await Projector(repo, model, partitions=[3]).start()


async def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError):
        Projector(MemRepository(), ListModel(), batch_size=0)
    with pytest.raises(ValueError):
        Projector(MemRepository(), ListModel(), idempotency_window=0)


async def test_a_projector_closes_the_repository_it_started_once() -> None:
    """Whoever starts a repository closes it: one close per start, also after close()
    is called again, and a start that fails closes what it started."""
    calls: list[str] = []

    class Repo(MemRepository):
        async def start(self) -> None:
            calls.append("start")

        async def close(self) -> None:
            calls.append("close")

    async with Projector(Repo(), ListModel()) as projector:
        pass
    await projector.close()
    assert calls == ["start", "close"]
    calls.clear()
    with pytest.raises(ValueError):
        await Projector(Repo(), ListModel(), partitions=[5]).start()
    assert calls == ["start", "close"]


async def test_projected_event_properties() -> None:
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    await append(repo, 0, "n", StepOutcome("w", 0, "execute", True, raw([1, 2])))
    model = ListModel()
    await Projector(repo, model).catch_up()
    claim, step = model.events
    assert (claim.kind, claim.workflow_id, claim.workflow_type) == (
        EventKind.ACTIVE_WRITER,
        None,
        None,
    )
    assert (step.kind, step.workflow_id, step.value) == (EventKind.STEP_OUTCOME, "w", [1, 2])
    assert CODEC.decode(step.event.value) == [1, 2]  # type: ignore[union-attr]


class _GatedModel(ListModel):
    """Each ``apply`` signals ``entered`` and then waits for ``gate`` before committing."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def apply(
        self, partition: int, events: Sequence[ProjectedEvent], position: Position
    ) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().apply(partition, events, position)


async def test_stop_during_catch_up_returns() -> None:
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    model = _GatedModel()
    projector = Projector(repo, model)
    catching_up = asyncio.create_task(projector.catch_up())
    await asyncio.wait_for(model.entered.wait(), 5)
    stopping = asyncio.create_task(projector.close())
    # stop() cancels the partition task, but waits for the apply it already began.
    done, _ = await asyncio.wait({stopping}, timeout=0.05)
    assert not done
    model.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert await asyncio.wait_for(catching_up, 5) == 1
    assert model.where() == [(0, 0)]
    assert projector.positions[0].offset == 1


async def test_wait_caught_up_waits_for_the_commit() -> None:
    repo = MemRepository()
    await append(repo, 0, "n", writer("n"))
    model = _GatedModel()
    projector = Projector(repo, model)
    running = asyncio.create_task(projector.run())
    await asyncio.wait_for(model.entered.wait(), 5)
    waiting = asyncio.create_task(projector.wait_caught_up(timeout=5))
    done, _ = await asyncio.wait({waiting}, timeout=0.05)
    assert not done  # read to the end, but not committed yet
    assert projector.positions[0].offset == 0
    model.gate.set()
    await waiting
    assert model.where() == [(0, 0)]
    assert projector.positions[0].offset == 1
    await projector.close()
    await running


async def test_empty_log_projects_nothing() -> None:
    model = ListModel()
    assert await Projector(MemRepository(partitions=2), model).catch_up() == 0
    assert model.events == []
