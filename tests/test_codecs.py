"""Both codecs round-trip user values with their declared types, and refuse clearly."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from kapbit import DecodeError, EncodeError, JsonCodec, MsgpackCodec
from kapbit.codecs import Codec
from kapbit.events import StepOutcome, WorkflowCreated


class Line(msgspec.Struct):
    sku: str
    qty: int


@dataclasses.dataclass
class Order:
    id: str
    lines: list[Line]
    notes: dict[str, str]
    total: float | None = None


CODECS = [JsonCodec(), MsgpackCodec()]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    ("value", "type_"),
    [
        (Order("o1", [Line("a", 2)], {"gift": "yes"}, 9.5), Order),
        (Line("b", 1), Line),
        ([Line("c", 3), Line("d", 4)], list[Line]),
        ({"x": [1, 2], "y": []}, dict[str, list[int]]),
        ("text", str),
        (42, int),
        (None, type(None)),
        (True, bool),
    ],
)
def test_user_values_round_trip_with_their_types(codec: Codec, value: Any, type_: Any) -> None:
    assert isinstance(codec, Codec)
    assert codec.decode(codec.encode(value), type_) == value


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_events_embed_user_values_as_raw(codec: Codec) -> None:
    value = msgspec.Raw(codec.encode(Line("a", 1)))
    event = StepOutcome("w", 0, "execute", True, value)
    decoded = codec.decode(codec.encode(event), StepOutcome)
    assert decoded.id == "w" and decoded.success
    assert codec.decode(decoded.value, Line) == Line("a", 1)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_unencodable_value_raises_encode_error(codec: Codec) -> None:
    with pytest.raises(EncodeError, match="cannot encode"):
        codec.encode({"when": object()})


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_wrong_type_or_garbage_raises_decode_error(codec: Codec) -> None:
    with pytest.raises(DecodeError):
        codec.decode(codec.encode({"sku": 1}), Line)
    with pytest.raises(DecodeError):
        codec.decode(b"\xc1\xff not valid", WorkflowCreated)
