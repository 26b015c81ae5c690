"""A request's state in the scheduler, and the one place where it changes.

Each state has one queue, owned by the manager that moves requests out of it:

    WAITING          PrefillManager.waiting   new requests, and retracted ones (tokens kept)
    PREFILLING       PrefillManager           admitted; prompt being computed (a chunked one is held)
    DECODING         DecodeManager.running    generating, one token per decode step
    FINISHED         nobody                   KV and row given back; output sent

and the states of prefill/decode disaggregation, whose managers come with it:

    BOOTSTRAP        waiting for the peer server's handshake
    PREALLOC         decode side: waiting for KV room to receive into
    TRANSFER         decode side: the prompt's KV is arriving
    PREFILL_INFLIGHT prefill side: prompt computed, its KV on its way to the decode server
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Protocol

logger = logging.getLogger("radixserve.scheduler")


class ReqState(Enum):
    WAITING = "waiting"
    BOOTSTRAP = "bootstrap"
    PREALLOC = "prealloc"
    TRANSFER = "transfer"
    PREFILLING = "prefilling"
    PREFILL_INFLIGHT = "prefill_inflight"
    DECODING = "decoding"
    FINISHED = "finished"


S = ReqState
# Every move a request may make. Anything may finish (an abort, an error); nothing leaves FINISHED.
TRANSITIONS: dict[ReqState, frozenset[ReqState]] = {
    S.WAITING: frozenset({S.PREFILLING, S.BOOTSTRAP, S.FINISHED}),
    S.BOOTSTRAP: frozenset({S.WAITING, S.PREALLOC, S.FINISHED}),
    S.PREALLOC: frozenset({S.TRANSFER, S.FINISHED}),
    S.TRANSFER: frozenset({S.DECODING, S.FINISHED}),
    S.PREFILLING: frozenset({S.DECODING, S.PREFILL_INFLIGHT, S.FINISHED}),
    S.PREFILL_INFLIGHT: frozenset({S.FINISHED}),
    # WAITING: retracted when KV runs short; PREFILL_INFLIGHT: a prefill server's request whose one
    # token came from a batch processed after it joined the running batch (overlap scheduling)
    S.DECODING: frozenset({S.WAITING, S.PREFILL_INFLIGHT, S.FINISHED}),
    S.FINISHED: frozenset(),
}


class HasState(Protocol):
    rid: str
    state: ReqState


class InvalidTransition(RuntimeError):
    """A move the state machine does not have: a scheduler bug."""


def move(req: HasState, to: ReqState) -> None:
    """Move req to state `to`; every state change of a request goes through here."""
    if to not in TRANSITIONS[req.state]:
        raise InvalidTransition(f"request {req.rid}: {req.state.value} -> {to.value} is not a transition")
    logger.debug("request %s: %s -> %s", req.rid, req.state.value, to.value)
    req.state = to
