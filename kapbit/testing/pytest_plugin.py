"""pytest fixtures for testing your own workflows; pytest loads this plugin by itself once
kapbit is installed (entry point ``pytest11``).

- ``kapbit_options``: :func:`~kapbit.testing.fast_options` (millisecond retries); override
  the fixture in your ``conftest.py`` to change them.
- ``memory_repository``: a fresh one-partition :class:`~kapbit.repository.MemRepository` per test.
- ``faulty_repository``: a :class:`~kapbit.testing.FaultyRepository` around it; program
  storage faults on it.
- ``kapbit_factory``: a :class:`~kapbit.testing.KapbitFactory` on ``faulty_repository``
  (so faults apply): ``await kapbit_factory.start([definition])`` starts an instance,
  ``await kapbit_factory.crash_and_restart(kbit)`` crashes it and starts its successor on
  the same log; running instances are closed after the test.

``kapbit_factory`` is an async fixture: it needs pytest-asyncio (``pip install
'kapbit[testing]'``) and async tests run by it, either ``asyncio_mode = "auto"`` in your
pytest configuration or ``@pytest.mark.asyncio`` on each test. It runs in the test's event
loop (pytest-asyncio's default, function scope).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from kapbit.options import Options
from kapbit.repository import MemRepository
from kapbit.testing.faults import FaultyRepository
from kapbit.testing.harness import KapbitFactory, fast_options

__all__ = ["faulty_repository", "kapbit_factory", "kapbit_options", "memory_repository"]

MISSING_ASYNCIO = (
    "the kapbit_factory fixture needs pytest-asyncio, which is not installed: "
    "pip install 'kapbit[testing]'"
)


@pytest.fixture
def kapbit_options() -> Options:
    """Options with millisecond backoffs, so a test of a failing step does not wait."""
    return fast_options()


@pytest.fixture
def memory_repository() -> MemRepository:
    """A fresh in-memory log of one partition."""
    return MemRepository(partitions=1)


@pytest.fixture
def faulty_repository(memory_repository: MemRepository) -> FaultyRepository:
    """``memory_repository`` behind a fault injector (no faults until you program one)."""
    return FaultyRepository(memory_repository)


async def _factory(
    faulty_repository: FaultyRepository, kapbit_options: Options
) -> AsyncIterator[KapbitFactory]:
    async with KapbitFactory(faulty_repository, options=kapbit_options) as factory:
        yield factory


def _missing_asyncio() -> None:
    pytest.fail(MISSING_ASYNCIO, pytrace=False)


kapbit_factory: Any
try:
    import pytest_asyncio
except ImportError:  # kapbit is installed without its testing extra: say so when used
    kapbit_factory = pytest.fixture(_missing_asyncio, name="kapbit_factory")
else:
    kapbit_factory = pytest_asyncio.fixture(_factory, name="kapbit_factory")
