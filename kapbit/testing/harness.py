"""Start, crash and restart kapbit instances in tests of your own workflows.

:class:`KapbitFactory` starts instances on one shared repository (the log survives every
instance, as a Kafka topic would), crashes one with the public :meth:`kapbit.Kapbit.abort`
and starts the next on the same log, which resumes what the crashed one left open. It
closes whatever is still running when the factory closes. :func:`fast_options` keeps
retries and breakers in milliseconds so a test of a failing step does not wait for
production backoffs. The pytest plugin (:mod:`kapbit.testing.pytest_plugin`) hands both
out as fixtures; neither needs pytest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kapbit._lifecycle import Closing
from kapbit.codecs import Codec
from kapbit.instance import Kapbit
from kapbit.options import Backoff, BreakerPolicy, Options, RetryPolicy
from kapbit.repository import Repository
from kapbit.schedules import Schedule
from kapbit.workflow import Definition

__all__ = ["KapbitFactory", "fast_options"]


def fast_options(
    *,
    max_attempts: int = 5,
    slow_interval: float = 0.01,
    fail_max: int = 3,
    reset_timeout: float = 0.05,
    close_timeout: float = 1.0,
    **kwargs: Any,
) -> Options:
    """:class:`~kapbit.Options` with millisecond backoffs for tests.

    Storage retries back off 1-4 ms, the retry worker retries a failed workflow after 1-4
    ms and then every ``slow_interval`` seconds, up to ``max_attempts``; the storage breaker
    opens after ``fail_max`` failures and probes after ``reset_timeout`` seconds. Other
    :class:`~kapbit.Options` fields pass through ``kwargs``.
    """
    tiny = Backoff(initial=0.001, maximum=0.004, jitter=0.001)
    return Options(
        emit_backoff=tiny,
        retry=RetryPolicy(fast=tiny, slow_interval=slow_interval, max_attempts=max_attempts),
        storage_breaker=BreakerPolicy(fail_max=fail_max, reset_timeout=reset_timeout),
        close_timeout=close_timeout,
        **kwargs,
    )


@dataclass(frozen=True, slots=True)
class _Recipe:
    """What an instance was started with, so a restart can start its successor."""

    definitions: tuple[Definition, ...]
    repository: Repository
    codec: Codec | None
    options: Options
    schedules: tuple[Schedule, ...] = ()


class KapbitFactory(Closing):
    """Starts :class:`~kapbit.Kapbit` instances on ``repository`` and cleans up after them.

    Use as ``async with KapbitFactory(repo) as factory`` or call :meth:`close` yourself.
    Meant for :class:`~kapbit.repository.MemRepository` (or a wrapper of it such as
    :class:`~kapbit.testing.FaultyRepository`), whose log outlives an instance in memory.
    """

    def __init__(
        self,
        repository: Repository,
        *,
        options: Options | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.repository = repository
        self.options = options if options is not None else fast_options()
        self.codec = codec
        self._running: dict[Kapbit, _Recipe] = {}  # in start order

    async def start(
        self,
        definitions: Sequence[Definition],
        *,
        repository: Repository | None = None,
        options: Options | None = None,
        codec: Codec | None = None,
        schedules: Sequence[Schedule] = (),
    ) -> Kapbit:
        """Start an instance running ``definitions`` and ``schedules`` (on the factory's
        repository, options and codec unless given) and return it; it resumes whatever the
        log holds open."""
        recipe = _Recipe(
            tuple(definitions),
            repository if repository is not None else self.repository,
            codec if codec is not None else self.codec,
            options if options is not None else self.options,
            tuple(schedules),
        )
        return await self._start(recipe)

    async def crash_and_restart(self, kbit: Kapbit) -> Kapbit:
        """Crash ``kbit`` as a SIGKILL would (:meth:`~kapbit.Kapbit.abort`: nothing more is
        written, no checkpoint saved) and start a new instance with the same definitions and
        schedules on the same repository; the new one resumes the crashed one's open workflows."""
        recipe = self._running.get(kbit)
        if recipe is None:
            raise ValueError(f"instance {kbit.node_id!r} is not running in this factory")
        self.crash(kbit)
        # a node id names one start of an instance: the successor never reuses it
        options = dataclasses.replace(recipe.options, node_id=None)
        return await self._start(dataclasses.replace(recipe, options=options))

    def crash(self, kbit: Kapbit) -> None:
        """Crash ``kbit`` (:meth:`~kapbit.Kapbit.abort`) without starting a successor."""
        kbit.abort()
        self._running.pop(kbit, None)

    async def close(self) -> None:
        """Close every instance this factory started that is still running."""
        running, self._running = list(self._running), {}
        for kbit in reversed(running):
            await kbit.close()

    async def _start(self, recipe: _Recipe) -> Kapbit:
        kbit = Kapbit(
            recipe.definitions,
            recipe.repository,
            recipe.codec,
            options=recipe.options,
            schedules=recipe.schedules,
        )
        await kbit.start()
        self._running[kbit] = recipe
        return kbit
