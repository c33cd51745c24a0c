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


@dataclasses.dataclass
class _Reading:
    value: float


class _Sample(msgspec.Struct):
    label: str
    readings: list[float]
    extra: Any = None


_NAN = float("nan")


@pytest.mark.parametrize(
    "value",
    [
        _NAN,
        float("inf"),
        [1, "a", None, float("-inf")],
        {"k": (1.0, {"deep": [_NAN]})},
        _Sample("s", [1.0, _NAN]),
        _Sample("s", [], extra=_Reading(float("inf"))),
        {"nested": {frozenset({_NAN})}},
        StepOutcome("w", 0, "execute", True, msgspec.Raw(b"1"), at=_NAN),
    ],
)
def test_json_refuses_non_finite_floats_wherever_they_sit(value: Any) -> None:
    """NaN and infinity are found in Structs, dataclasses, dicts, sets and tuples."""
    with pytest.raises(EncodeError, match="NaN or infinity"):
        JsonCodec().encode(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        _Sample("s", [1.0, 2.5], extra={"x": None, "y": [True, b"b"]}),
        StepOutcome("w", 0, "execute", True, msgspec.Raw(b"null"), at=1.0),
    ],
)
def test_json_encodes_finite_values_holding_null(value: Any) -> None:
    """A value whose encoding contains ``null`` but no non-finite float encodes."""
    assert b"null" in JsonCodec().encode(value)
