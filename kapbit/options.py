"""Configuration of a kapbit instance, grouped by the component each part tunes."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tenacity import wait_exponential, wait_random
from tenacity.wait import wait_base

from kapbit.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from kapbit.instrumentation import Instrumentation


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: ``initial * 2**n`` up to ``maximum``."""

    initial: float = 0.05
    maximum: float = 5.0
    jitter: float = 0.05

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial or self.jitter < 0:
            raise ValueError(f"invalid backoff {self!r}")

    def wait(self) -> wait_base:
        """This backoff as a tenacity wait strategy."""
        return wait_exponential(multiplier=self.initial, max=self.maximum) + wait_random(
            0, self.jitter
        )


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The storage circuit breaker: opens after ``fail_max`` consecutive failures and lets
    one probe through after ``reset_timeout`` seconds."""

    fail_max: int = 5
    reset_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.fail_max < 1 or self.reset_timeout <= 0:
            raise ValueError(f"invalid breaker policy {self!r}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retry worker: fast backoff for blips, a slow probe while the gate is closed,
    and ``max_attempts`` attempts before the workflow is dead-lettered."""

    fast: Backoff = field(default_factory=lambda: Backoff(initial=0.1, maximum=10.0, jitter=0.1))
    slow_interval: float = 30.0
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.slow_interval <= 0:
            raise ValueError(f"invalid retry policy {self!r}")


@dataclass(frozen=True, slots=True)
class StepRetry:
    """A step's own retry policy: retry the action in place, then fail the step.

    When the action raises, it runs again after ``backoff`` until it has run
    ``max_attempts`` times in all; then the step fails for good with a ``Failure`` whose
    value is the text of the last error, and the saga compensates. Each retry is first
    recorded in the log (a ``WorkflowRetry`` event, as the retry worker writes), so attempts
    are counted across restarts: a step never runs more than ``max_attempts`` times. (A
    resumed workflow counts conservatively: every retry it recorded, those of earlier
    steps too, so it may give up sooner than a run that was not interrupted.) These count
    towards
    the retry worker's ``RetryPolicy.max_attempts`` too, should the workflow reach it
    later. An exception of a ``non_retryable`` type (and
    :class:`kapbit.NonRetryable`, with or without a policy) fails the step at once.
    ``pybreaker.CircuitBreakerError`` / :class:`kapbit.CircuitBreakerOpen` are not retried
    in place: they close the entry gate and go to the retry worker, as without a policy.
    """

    max_attempts: int = 3
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.1, maximum=5.0, jitter=0.1))
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not isinstance(self.backoff, Backoff):
            raise ValueError(f"backoff must be a Backoff, got {self.backoff!r}")
        if not all(
            isinstance(kind, type) and issubclass(kind, BaseException)
            for kind in self.non_retryable
        ):
            raise ValueError(f"non_retryable must be exception types, got {self.non_retryable!r}")


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """Save checkpoints after ``every`` terminated workflows or ``interval`` seconds.

    With ``snapshots`` a checkpoint carries a snapshot of the open workflows and the
    idempotency window, so recovery reads the log only from where it was taken (see
    :mod:`kapbit.snapshots`); it is stored in chunks of ``snapshot_chunk`` bytes, and one
    over ``snapshot_limit`` bytes is not written (the checkpoint keeps the previous
    snapshot, or its offsets only, and a warning is logged). Snapshots are taken only of a
    partition whose oldest open workflow lies ``snapshot_after`` records or more behind
    its end (a workflow sleeping or stuck); below that the offsets bound recovery as well,
    and the partition costs no snapshot work (``0``: always take them). The default,
    10,000 records, is above what 1,000 workflows in flight on one partition span, and a
    full read of it costs a restart less than refilling the default window of 10,000 ids.
    """

    every: int = 10_000
    interval: float = 5.0
    snapshots: bool = True
    snapshot_limit: int = 64 * 1024 * 1024
    snapshot_chunk: int = 256 * 1024
    snapshot_after: int = 10_000

    def __post_init__(self) -> None:
        if (
            self.every < 1
            or self.interval <= 0
            or self.snapshot_limit < 1
            or self.snapshot_chunk < 1
            or self.snapshot_after < 0
        ):
            raise ValueError(f"invalid checkpoint policy {self!r}")


@dataclass(frozen=True, slots=True)
class Options:
    """Everything tunable on :class:`kapbit.Kapbit`; the defaults suit a production service.

    ``idempotency_window`` is the number of recent workflow ids kept *per partition*.
    ``node_id`` names the instance (host name and process id by default); it may repeat
    across starts, e.g. a pod name: each start writes as ``node_id`` plus a random start id.
    ``start_timeout`` bounds ``start()``, transient storage errors included (retried).

    Sync (plain ``def``) actions run in a thread pool so that a blocking call never stalls
    other workflows; async actions run on the event loop. By default kapbit starts its own
    pool of ``action_threads`` threads at the first sync action and shuts it down at
    close. ``action_executor`` replaces it with an executor of your own (kapbit does not
    shut that one down).

    ``forward_timeout`` bounds how long a call forwarded to another instance (the owner of
    the id's partition, through the request log) waits for the owner's first answer; it
    should exceed a failover (the group's session timeout plus a recovery).

    ``instrumentation`` reports workflows and steps to traces and metrics, e.g.
    :class:`kapbit.otel.OpenTelemetry` (the ``otel`` extra); ``None`` (the default) costs
    nothing.

    ``max_workflows`` bounds the workflows *running* (from acceptance or wake-up until they
    sleep or end); ``max_sleeping`` bounds the running and sleeping ones together (a
    workflow waiting on a durable timer costs no task, only a small entry). ``clock``
    stamps every event and times every wait, timers and schedules included; tests pass
    :class:`kapbit.testing.ManualClock`.
    """

    max_workflows: int = 10_000
    idempotency_window: int = 10_000
    close_timeout: float = 10.0
    result_cache: int = 1_000
    emit_backoff: Backoff = field(default_factory=Backoff)
    storage_breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    node_id: str | None = None
    start_timeout: float = 120.0
    action_threads: int = 32
    action_executor: Executor | None = None
    instrumentation: Instrumentation | None = None
    max_sleeping: int = 1_000_000
    clock: Clock = SYSTEM_CLOCK
    forward_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.forward_timeout > 0:
            raise ValueError(f"forward_timeout must be positive, got {self.forward_timeout}")
        if self.max_sleeping < self.max_workflows:
            raise ValueError(
                f"max_sleeping ({self.max_sleeping}) must be at least max_workflows "
                f"({self.max_workflows}): it bounds running and sleeping workflows together"
            )
        if self.start_timeout <= 0:
            raise ValueError(f"start_timeout must be positive, got {self.start_timeout}")
        if self.action_threads < 1:
            raise ValueError(f"action_threads must be at least 1, got {self.action_threads}")
        if self.max_workflows < 1:
            raise ValueError(f"max_workflows must be at least 1, got {self.max_workflows}")
        if self.idempotency_window < 1:
            raise ValueError(
                f"idempotency_window must be at least 1, got {self.idempotency_window}"
            )
