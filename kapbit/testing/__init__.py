"""Test and development helpers (Kafka-protocol broker, fault-injecting TCP proxy).

Not part of the kapbit runtime: nothing in the engine may import this package.
"""

from kapbit.testing.broker import BrokerUnavailable, LocalBroker, ProxiedBroker, local_broker
from kapbit.testing.faults import FaultyRepository as FaultyRepository
from kapbit.testing.proxy import TcpProxy

__all__ = ["BrokerUnavailable", "LocalBroker", "ProxiedBroker", "TcpProxy", "local_broker"]
