"""Storage: the :class:`Repository` protocol and its records, the in-memory log
(:class:`MemRepository`) and the Kafka log (:class:`KafkaRepository`)."""

from kapbit.repository.base import Checkpoint, Record, Repository, SnapshotStore
from kapbit.repository.kafka import KafkaRepository
from kapbit.repository.mem import MemRepository

__all__ = [
    "Checkpoint",
    "KafkaRepository",
    "MemRepository",
    "Record",
    "Repository",
    "SnapshotStore",
]
