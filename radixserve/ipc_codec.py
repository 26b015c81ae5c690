"""Messages on the wire: MessagePack through msgspec, typed by the tag each message carries.

Decoding checks every field against the message types (messages.py) and builds nothing else, so a
payload from another host (PD disaggregation, a router, multi-node) is data, never code, as a pickle
would be. It is also several times faster than pickle for the scheduler's hot messages
(`python -m radixserve.bench.bench_ipc_codec`; docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from typing import Union

import msgspec
import zmq
import zmq.asyncio

from radixserve.messages import MESSAGE_TYPES, Message

logger = logging.getLogger("radixserve.ipc")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Union[MESSAGE_TYPES])  # noqa: UP007 (a runtime union of the tuple)
_list_decoder = msgspec.msgpack.Decoder(list[Union[MESSAGE_TYPES]])  # noqa: UP007


class BadMessage(ValueError):
    """A payload that is not one of the message types."""


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise BadMessage(f"not a radixserve message: {e}") from None


def encode_list(payloads: list[bytes | memoryview]) -> bytes:
    """Already-encoded messages as one encoded list (the payloads are copied in, not re-encoded)."""
    return _encoder.encode([msgspec.Raw(p) for p in payloads])


def decode_list(data: bytes | memoryview) -> list[Message]:
    try:
        return _list_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise BadMessage(f"not a list of radixserve messages: {e}") from None


def _decoded_or_none(data: bytes | memoryview) -> Message | None:
    try:
        return decode(data)
    except BadMessage as e:  # logged and dropped: one bad payload must not end a server process
        logger.error("dropped a message: %s", e)
        return None


def send(sock: zmq.Socket, msg: Message) -> None:
    sock.send(encode(msg), copy=False)


def recv(sock: zmq.Socket) -> Message | None:
    """The next message, or None for a payload that is not one (logged)."""
    return _decoded_or_none(sock.recv(copy=False).buffer)


def recv_raw(sock: zmq.Socket) -> tuple[Message | None, memoryview]:
    """The next message and its payload as received (to pass on without encoding it again)."""
    data = sock.recv(copy=False).buffer
    return _decoded_or_none(data), data


async def send_async(sock: zmq.asyncio.Socket, msg: Message) -> None:
    await sock.send(encode(msg), copy=False)


async def recv_async(sock: zmq.asyncio.Socket) -> Message | None:
    frame = await sock.recv(copy=False)
    return _decoded_or_none(frame.buffer)
