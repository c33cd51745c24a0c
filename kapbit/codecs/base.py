"""The Codec protocol and the msgspec-backed implementation both shipped codecs share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import msgspec

from kapbit.errors import DecodeError, EncodeError

Buffer = bytes | bytearray | memoryview | msgspec.Raw


@runtime_checkable
class Codec(Protocol):
    """Turns events and user values into bytes and back, decoding to a requested type."""

    name: str

    def encode(self, value: Any) -> bytes:
        """Encode ``value``; raise :class:`~kapbit.errors.EncodeError` if it cannot be."""
        ...

    def decode(self, data: Buffer, type: Any = Any) -> Any:
        """Decode ``data`` as ``type``; raise :class:`~kapbit.errors.DecodeError` if invalid."""
        ...


#: What msgspec's encoders raise for a value they cannot encode.
ENCODE_ERRORS = (TypeError, ValueError, OverflowError, msgspec.EncodeError, RecursionError)


class MsgspecCodec:
    """A codec over one msgspec format; decoders are built once per requested type."""

    name = "msgspec"

    def __init__(
        self,
        encoder: Any,
        decoder_factory: Callable[[Any], Any],
    ) -> None:
        self._encode = encoder.encode
        self._decoder_factory = decoder_factory
        self._decoders: dict[Any, Callable[[Any], Any]] = {}

    def encode(self, value: Any) -> bytes:
        try:
            data: bytes = self._encode(value)
        except ENCODE_ERRORS as exc:
            raise self._encode_error(value, exc) from exc
        return data

    def _encode_error(self, value: Any, exc: BaseException) -> EncodeError:
        """The :class:`~kapbit.errors.EncodeError` for one of :data:`ENCODE_ERRORS`."""
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        return EncodeError(f"{self.name} codec cannot encode {type(value).__name__}: {reason}")

    def decode(self, data: Buffer, type: Any = Any) -> Any:
        decode = self._decoders.get(type)
        if decode is None:
            try:
                decode = self._decoder_factory(type).decode
            except TypeError as exc:
                raise DecodeError(f"{self.name} codec cannot decode to {type!r}: {exc}") from exc
            self._decoders[type] = decode
        try:
            return decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"{self.name} codec: {exc}") from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
