"""Which partition a workflow's events go to: Kafka's default partitioner (murmur2).

Using the same function as Kafka's keyed producer keeps every keyed tool in agreement.
The hash is Kafka's murmur2 (as ``aiokafka.partitioner.murmur2``, against which
``tests/test_partitioner.py`` checks it), computed a 32-bit word at a time: it runs once per
workflow, and aiokafka's byte-at-a-time version costs twice as much.
"""

from __future__ import annotations

import struct

_words = struct.Struct("<I").iter_unpack
_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of ``data`` (``org.apache.kafka.common.utils.Utils.murmur2``)."""
    length = len(data)
    h = _SEED ^ length
    whole = length & ~3
    for (k,) in _words(data[:whole]):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    left = length & 3
    if left:
        if left == 3:
            h ^= data[whole + 2] << 16
        if left >= 2:
            h ^= data[whole + 1] << 8
        h = ((h ^ data[whole]) * _M) & _MASK
    h = ((h ^ (h >> 13)) * _M) & _MASK
    return h ^ (h >> 15)


def partition_for(workflow_id: str, partitions: int) -> int:
    """``murmur2(id) % partitions``, with the sign bit masked as Kafka does."""
    return (murmur2(workflow_id.encode()) & 0x7FFFFFFF) % partitions
