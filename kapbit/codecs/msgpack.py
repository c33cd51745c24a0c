"""MessagePack codec (msgspec): smaller records, faster than JSON."""

from __future__ import annotations

from typing import Any

import msgspec

from kapbit.codecs.base import MsgspecCodec


class MsgpackCodec(MsgspecCodec):
    """Encodes with ``msgspec.msgpack``; Structs, dataclasses, primitives and containers."""

    name = "msgpack"

    def __init__(self) -> None:
        super().__init__(msgspec.msgpack.Encoder(), _decoder)


def _decoder(type: Any) -> msgspec.msgpack.Decoder[Any]:
    return msgspec.msgpack.Decoder(type)
