"""JSON codec (msgspec): readable records, the default."""

from __future__ import annotations

from typing import Any

import msgspec

from kapbit.codecs.base import MsgspecCodec


class JsonCodec(MsgspecCodec):
    """Encodes with ``msgspec.json``; Structs, dataclasses, primitives and containers."""

    name = "json"

    def __init__(self) -> None:
        super().__init__(msgspec.json.Encoder(), _decoder)


def _decoder(type: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type)
