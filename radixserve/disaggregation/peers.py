"""PUSH sockets to a PD server's peers, one per endpoint, that never block the scheduler: a message
to a peer that is gone (its queue full) is dropped and logged; the peer's side times out."""

from __future__ import annotations

import logging

import zmq

from radixserve import ipc_codec
from radixserve.messages import Message

logger = logging.getLogger("radixserve.disaggregation")


class PeerSockets:
    """enabled=False (a TP rank other than 0): sends nothing; rank 0 speaks for the server."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.socks: dict[str, zmq.Socket] = {}

    def send(self, endpoint: str, msg: Message) -> bool:
        if not self.enabled:
            return False
        sock = self.socks.get(endpoint)
        if sock is None:
            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            try:
                sock.connect(endpoint)  # a peer's word: a malformed endpoint must not stop the scheduler
            except zmq.ZMQError as e:
                sock.close(0)
                logger.warning("peer endpoint %r unusable (%s): %s dropped", endpoint, e, type(msg).__name__)
                return False
            self.socks[endpoint] = sock
        try:
            sock.send(ipc_codec.encode(msg), zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            logger.warning("peer %s is not taking messages: %s dropped", endpoint, type(msg).__name__)
            return False

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(0)
        self.socks.clear()
