"""Fixtures shared by the whole suite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kapbit.testing.broker import local_broker


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """One Kafka-protocol broker for the session: ``KAPBIT_TEST_BOOTSTRAP``, else a Docker
    Kafka, else a local tansu broker started here. Failing to get one fails the tests."""
    with local_broker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def topic() -> str:
    """A fresh topic name per test."""
    return f"kapbit-test-{uuid.uuid4().hex[:12]}"
