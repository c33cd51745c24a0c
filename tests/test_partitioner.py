"""kapbit's murmur2 is Kafka's: the same hash as aiokafka's (the Java client's port) for
any bytes, so ids land in the partitions a keyed Kafka producer would choose."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from kapbit.partitioner import murmur2, partition_for


@settings(max_examples=2_000)
@given(st.binary(max_size=80))
def test_murmur2_is_aiokafkas_for_any_bytes(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


@settings(max_examples=500)
@given(st.text(min_size=1, max_size=60), st.integers(min_value=1, max_value=64))
def test_an_id_goes_where_kafkas_default_partitioner_puts_its_key(
    workflow_id: str, partitions: int
) -> None:
    key = workflow_id.encode("utf-8", "surrogatepass")
    expected = DefaultPartitioner()(key, list(range(partitions)), list(range(partitions)))
    try:
        workflow_id.encode()
    except UnicodeEncodeError:
        return  # not a valid id (kapbit refuses it before hashing)
    assert partition_for(workflow_id, partitions) == expected


def test_known_values() -> None:
    # Values of the Java client's Utils.murmur2 (as aiokafka's own tests pin them).
    assert murmur2(b"") == aiokafka_murmur2(b"")
    assert murmur2(b"21") == aiokafka_murmur2(b"21")
    assert partition_for("order-42", 8) == (aiokafka_murmur2(b"order-42") & 0x7FFFFFFF) % 8
