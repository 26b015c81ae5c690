"""The scheduler's request state machine: the moves it has, the ones it refuses, and a debug line
for each move."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from radixserve.scheduler.state import TRANSITIONS, InvalidTransition, ReqState, move

S = ReqState


@dataclass
class Tracked:
    rid: str
    state: ReqState = ReqState.WAITING


PATHS = {
    "normal": [S.PREFILLING, S.DECODING, S.FINISHED],
    "retracted and readmitted": [S.PREFILLING, S.DECODING, S.WAITING, S.PREFILLING, S.DECODING, S.FINISHED],
    "aborted while waiting": [S.FINISHED],
    "prompt logprobs only": [S.PREFILLING, S.FINISHED],
    "pd prefill side": [S.BOOTSTRAP, S.WAITING, S.PREFILLING, S.PREFILL_INFLIGHT, S.FINISHED],
    "pd decode side": [S.BOOTSTRAP, S.PREALLOC, S.TRANSFER, S.DECODING, S.FINISHED],
}


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_the_paths_a_request_takes_are_moves_of_the_table(path, caplog):
    req = Tracked("r1")
    with caplog.at_level(logging.DEBUG, logger="radixserve.scheduler"):
        for state in path:
            move(req, state)
    assert req.state is S.FINISHED
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(path) and lines[-1].endswith("-> finished") and all("r1" in m for m in lines)


def test_every_state_can_finish_and_nothing_leaves_finished():
    assert set(TRANSITIONS) == set(ReqState)
    for state, targets in TRANSITIONS.items():
        assert (S.FINISHED in targets) == (state is not S.FINISHED)
    for state in ReqState:
        req = Tracked("done", S.FINISHED)
        with pytest.raises(InvalidTransition, match="finished ->"):
            move(req, state)


@pytest.mark.parametrize("start,to", [(S.WAITING, S.DECODING), (S.DECODING, S.PREFILLING),
                                      (S.PREFILLING, S.WAITING), (S.TRANSFER, S.WAITING),
                                      (S.PREFILL_INFLIGHT, S.DECODING), (S.WAITING, S.WAITING)])
def test_moves_outside_the_table_are_refused_and_leave_the_state(start, to):
    req = Tracked("x", start)
    with pytest.raises(InvalidTransition):
        move(req, to)
    assert req.state is start
