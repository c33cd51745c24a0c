"""Values checked against their declared types: the one rule for what may enter the log.

A value is encoded with the codec and, when its declared type is not ``Any``, decoded back
as that type. The decoded value is what kapbit keeps (in the progress, or as the input it
passes to actions), so a workflow sees the same values on its first run as after a
restart, and a value the next instance could not decode never enters the log. The decode
costs well under a microsecond for small values (``benchmarks/bench_mem.py``).
"""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec

from kapbit.codecs.base import Codec
from kapbit.errors import DecodeError


class TypeMismatch(Exception):
    """A value encoded but did not decode as its declared type (internal: callers turn it
    into the typed error of their situation)."""

    def __init__(self, declared: str, value: object, cause: DecodeError) -> None:
        self.declared = declared
        self.actual = type(value).__qualname__
        self.detail = str(cause)
        super().__init__(f"expected {self.declared}, got {self.actual} ({self.detail})")


class Declared:
    """A declared type, prepared once for the hot path: the type, its readable name, whether
    it is ``Any``, and the plain types among it whose values need no read-back
    (:func:`plain_types`)."""

    __slots__ = ("any", "name", "plain", "type")

    def __init__(self, declared: Any) -> None:
        self.type = declared
        self.any = declared is Any
        self.name = type_name(declared)
        self.plain = plain_types(declared)

    def __repr__(self) -> str:
        return f"Declared({self.name})"


#: Types whose values read back unchanged as themselves once they encode.
_PLAIN = frozenset({str, int, float, bool, type(None)})


def plain_types(declared: Any) -> frozenset[type]:
    """The types among ``declared`` (a class or a union) whose values need no read-back:
    a value of exactly such a type that encodes is valid and reads back equal."""
    members = typing.get_args(declared) if _is_union(declared) else (declared,)
    return frozenset(member for member in members if member in _PLAIN)


def _is_union(declared: Any) -> bool:
    return typing.get_origin(declared) in (typing.Union, types.UnionType)


def encode_checked(codec: Codec, value: Any, declared: Declared) -> tuple[bytes, Any]:
    """``(encoded, value as read back)``: ``value`` encoded and checked against ``declared``.

    A value of one of ``declared.plain`` types, or any value when the type is ``Any``, is
    not read back. Raises :class:`~kapbit.errors.EncodeError` if the codec cannot encode
    the value and :class:`TypeMismatch` if the encoding does not decode as the type.
    """
    data = codec.encode(value)
    if declared.any or type(value) in declared.plain:
        return data, value
    try:
        return data, codec.decode(data, declared.type)
    except DecodeError as exc:
        raise TypeMismatch(declared.name, value, exc) from exc


def unsupported(declared: Any) -> str | None:
    """Why msgspec (both shipped codecs) cannot decode ``declared``, or ``None`` if it can.

    Classes msgspec knows nothing about (they would need a decode hook) count as
    unsupported: a value of such a type could be written but never read back.
    """
    try:
        info = msgspec.inspect.type_info(declared)
    except (TypeError, ValueError) as exc:
        return str(exc)
    seen: set[int] = set()
    pending: list[Any] = [info]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, msgspec.inspect.CustomType) and node.cls is not object:
            return f"{type_name(node.cls)} is not a type msgspec can decode"
        if isinstance(node, msgspec.inspect.Field):
            pending.append(node.type)
        elif isinstance(node, msgspec.inspect.Type):
            for name in getattr(node, "__struct_fields__", ()):
                child = getattr(node, name)
                if isinstance(child, tuple):
                    pending.extend(child)
                elif isinstance(child, msgspec.inspect.Type | msgspec.inspect.Field):
                    pending.append(child)
    return None


def type_name(declared: Any) -> str:
    """A readable name of a declared type: ``Order``, ``list[int]``, ``str | None``."""
    if declared is type(None):
        return "None"
    if isinstance(declared, type) and not getattr(declared, "__args__", None):
        return declared.__qualname__
    if _is_union(declared):
        return " | ".join(type_name(arg) for arg in typing.get_args(declared))
    return repr(declared).replace("typing.", "")
