"""JSON codec (msgspec): readable records, the default."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from kapbit.codecs.base import ENCODE_ERRORS, MsgspecCodec
from kapbit.errors import EncodeError


class JsonCodec(MsgspecCodec):
    """Encodes with ``msgspec.json``; Structs, dataclasses, primitives and containers.

    JSON has no NaN or infinity (msgspec would write ``null``, which then fails to decode
    as a float): a value holding one is refused with :class:`~kapbit.errors.EncodeError`.
    """

    name = "json"

    def __init__(self) -> None:
        super().__init__(msgspec.json.Encoder(), _decoder)

    def encode(self, value: Any) -> bytes:
        # The base's encode, inlined: one Python call per encode on the hot path.
        try:
            data: bytes = self._encode(value)
        except ENCODE_ERRORS as exc:
            raise self._encode_error(value, exc) from exc
        # A non-finite float is written as null: only then is the value walked. A scalar
        # holding no float (a str outcome) needs no search. (find, not `in`:
        # bytes.__contains__ first tries the operand as an int and raises inside.)
        if type(value) not in _NO_FLOAT and data.find(b"null") >= 0 and _has_non_finite(value):
            raise EncodeError(
                f"{self.name} codec cannot encode {type(value).__name__}: "
                "NaN or infinity has no JSON form (use MsgpackCodec to store them)"
            )
        return data


def _raw_as_none(obj: Any) -> Any:
    if isinstance(obj, msgspec.Raw):  # already encoded, and checked when it was
        return None
    raise TypeError(f"unsupported type {type(obj).__name__}")


#: Types whose values hold no float; ``Raw`` is already encoded, and checked when it was.
_NO_FLOAT = frozenset({str, int, bool, type(None), bytes, msgspec.Raw, type(msgspec.UNSET)})
_fields_of = msgspec.structs.astuple  # a Struct's field values, in one C call


def _has_non_finite(value: Any) -> bool:
    """Whether ``value`` holds a float that is NaN or infinite (walked without recursion).

    Structs (kapbit's own events among them) are walked field by field and scalars are
    passed over by their exact type; anything else is turned into builtins first.
    """
    pending = [value]
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind in _NO_FLOAT:
            continue
        if kind is float or isinstance(item, float):
            if not math.isfinite(item):
                return True
        elif isinstance(item, msgspec.Struct):
            pending.extend(_fields_of(item))
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        else:
            pending.append(msgspec.to_builtins(item, enc_hook=_raw_as_none))
    return False


def _decoder(type: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type)
