"""The scheduler's event loops, one per server mode (--disaggregation-mode): a prefill-only and a
decode-only loop go beside the normal one."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from radixserve.messages import AbortReq

if TYPE_CHECKING:
    from radixserve.scheduler.scheduler import Scheduler

logger = logging.getLogger("radixserve.scheduler")


def normal_loop(scheduler: Scheduler) -> None:
    """Prefill and decode in one server: take messages, run a step, report the load; sleep on the
    socket (up to a second at a time) while there is nothing to do."""
    profile_steps = int(os.environ.get("RADIXSERVE_PROFILE_STEPS", "0"))
    while True:
        scheduler.recv_requests(block=not scheduler.has_work())
        if profile_steps and scheduler.has_work():
            profile(scheduler, profile_steps)
            profile_steps = 0
        scheduler.step()
        scheduler.report_load()


def profile(scheduler: Scheduler, steps: int) -> None:
    """Developer aid (RADIXSERVE_PROFILE_STEPS=N): cProfile the next N busy steps into the log."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        scheduler.recv_requests(block=False)
        scheduler.step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    logger.info("profile of %d steps (%.2f ms/step):\n%s", steps, (time.perf_counter() - start) / steps * 1e3,
                out.getvalue())


def prefill_loop(scheduler: Scheduler) -> None:
    """A PD prefill server: the normal loop, plus requests whose decode server has claimed them
    joining the waiting queue (those never claimed, or cancelled by it, ending), and requests whose
    KV has been written releasing it."""
    handoff = scheduler.handoff
    assert handoff is not None
    while True:
        idle = not scheduler.has_work()
        if not idle and not (scheduler.prefill.waiting or scheduler.decode.running or scheduler.inflight):
            handoff.handoff.poll(5)  # only requests waiting for their decode server or a write: wait
        scheduler.recv_requests(block=idle)
        ready, late, cancelled = handoff.poll()
        for req in ready:
            scheduler.prefill.add(req)
        scheduler.finish(late)
        if cancelled:
            scheduler.abort(AbortReq(rids=cancelled, message="cancelled by the decode server", status_code=503))
        scheduler.finish(handoff.poll_sent(), send=False)
        scheduler.step()
        scheduler.report_load()


def decode_loop(scheduler: Scheduler) -> None:
    """A PD decode server: the normal loop, plus requests whose prompt KV arrived joining the
    running batch at their first token."""
    receiver = scheduler.receiver
    assert receiver is not None
    while True:
        idle = not scheduler.has_work()
        if not idle and not (scheduler.prefill.waiting or scheduler.decode.running or scheduler.inflight):
            receiver.inbox.poll(5)  # only requests waiting for their KV: wait for some
        scheduler.recv_requests(block=idle)
        ready, failed = receiver.step()
        scheduler.finish(failed + [r for r in ready if r.finished])
        started = [r for r in ready if not r.finished]
        scheduler.send_outputs(started)  # their first token
        scheduler.decode.add(started)
        scheduler.step()
        scheduler.report_load()


# --disaggregation-mode -> loop
EVENT_LOOPS: dict[str, Callable[[Scheduler], None]] = {"null": normal_loop, "prefill": prefill_loop,
                                                      "decode": decode_loop}
