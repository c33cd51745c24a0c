"""Repositories: the :class:`Repository` protocol, the in-memory log, and (in
``kapbit.repository.kafka``) the Kafka log."""

from kapbit.repository.base import Checkpoint, Record, Repository
from kapbit.repository.mem import MemRepository

__all__ = ["Checkpoint", "MemRepository", "Record", "Repository"]
