"""Which partition a workflow's events go to: Kafka's default partitioner (murmur2).

Using the same function as Kafka's keyed producer keeps every keyed tool in agreement.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(workflow_id: str, partitions: int) -> int:
    """``murmur2(id) % partitions``, with the sign bit masked as Kafka does."""
    hashed: int = murmur2(workflow_id.encode())
    return (hashed & 0x7FFFFFFF) % partitions
