"""How a kapbit record sits in a Kafka record: key = workflow id, value = encoded event,
headers = event kind (the :class:`~kapbit.events.EventKind` value) and writer node."""

from __future__ import annotations

from typing import Any

from kapbit.errors import CorruptRecord
from kapbit.events import EventKind
from kapbit.repository.base import Record

KIND_HEADER = "kapbit-kind"
NODE_HEADER = "kapbit-node"
_HEADER_OF = {kind: kind.value.encode() for kind in EventKind}
_KIND_OF = {header: kind for kind, header in _HEADER_OF.items()}


def headers(kind: EventKind, node: str) -> list[tuple[str, bytes]]:
    """The headers of a record of ``kind`` written by ``node``."""
    return [(KIND_HEADER, _HEADER_OF[kind]), (NODE_HEADER, node.encode())]


def parse(partition: int, message: Any) -> Record | None:
    """The kapbit record of an aiokafka ``ConsumerRecord``; ``None`` when its kind header
    is missing or names no kapbit event (not a kapbit record)."""
    kind: EventKind | None = None
    node = ""
    for name, value in message.headers or ():
        if name == KIND_HEADER:
            kind = _KIND_OF.get(value)
        elif name == NODE_HEADER:
            node = value.decode()
    if kind is None:
        return None
    key = message.key.decode() if message.key is not None else ""
    return Record(partition, message.offset, kind, key, node, message.value or b"")


def to_record(partition: int, message: Any) -> Record:
    """The kapbit record of an aiokafka ``ConsumerRecord``; a record that is not a kapbit
    record raises :class:`~kapbit.errors.CorruptRecord` naming its partition and offset."""
    record = parse(partition, message)
    if record is None:
        found = [value for name, value in message.headers or () if name == KIND_HEADER]
        raise CorruptRecord(
            partition,
            message.offset,
            f"its {KIND_HEADER!r} header is {found[0]!r}, no kapbit event kind"
            if found
            else f"it has no {KIND_HEADER!r} header: not a kapbit record",
        )
    return record
