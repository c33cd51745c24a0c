"""How a kapbit record sits in a Kafka record: key = workflow id, value = encoded event,
headers = event kind and writer node."""

from __future__ import annotations

from typing import Any

from kapbit.events import EventKind
from kapbit.repository.base import Record

KIND_HEADER = "kapbit-kind"
NODE_HEADER = "kapbit-node"
ACTIVE_WRITER = EventKind.ACTIVE_WRITER.value
#: Every kind a kapbit record may carry in its kind header.
KINDS = frozenset(kind.value for kind in EventKind)


def headers(kind: str, node: str) -> list[tuple[str, bytes]]:
    """The headers of a record of ``kind`` written by ``node``."""
    return [(KIND_HEADER, kind.encode()), (NODE_HEADER, node.encode())]


def to_record(partition: int, message: Any) -> Record:
    """The kapbit record of an aiokafka ``ConsumerRecord``."""
    kind = node = ""
    for name, value in message.headers or ():
        if name == KIND_HEADER:
            kind = value.decode()
        elif name == NODE_HEADER:
            node = value.decode()
    key = message.key.decode() if message.key is not None else ""
    return Record(partition, message.offset, kind, key, node, message.value or b"")
