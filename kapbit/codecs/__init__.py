"""Codecs: the :class:`Codec` protocol and the JSON and MessagePack codecs."""

from kapbit.codecs.base import Codec
from kapbit.codecs.json import JsonCodec
from kapbit.codecs.msgpack import MsgpackCodec

__all__ = ["Codec", "JsonCodec", "MsgpackCodec"]
