"""The scheduler's event loops, one per server mode (--disaggregation-mode): a prefill-only and a
decode-only loop go beside the normal one."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixserve.scheduler.scheduler import Scheduler

logger = logging.getLogger("radixserve.scheduler")
# DP attention: how long an idle scheduler waits for requests before the groups' next step sync (a
# request arriving at one group waits at most this for the others)
DP_ATTENTION_IDLE_POLL_MS = 20


def normal_loop(scheduler: Scheduler) -> None:
    """Prefill and decode in one server: take messages, run a step, report the load; sleep on the
    socket (up to a second at a time) while there is nothing to do."""
    profile_steps = int(os.environ.get("RADIXSERVE_PROFILE_STEPS", "0"))
    while True:
        if scheduler.dp_attention:  # the groups step together: never sleep long while any has work
            busy = scheduler.has_work() or scheduler.peers_busy
            scheduler.recv_requests(timeout_ms=0 if busy else DP_ATTENTION_IDLE_POLL_MS)
        else:
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


def pd_loop(scheduler: Scheduler) -> None:
    """A PD server (prefill or decode side): the normal loop, with the peer's messages and rank 0's
    PD decisions (timeouts, claims) arriving among the requests, and (prefill) requests whose KV
    has been written releasing it. While it only waits on its peer it polls every few ms. Under DP
    attention rank 0 is the group's, and an idle group polls briefly (as in normal_loop): the other
    groups' forwards wait for its step sync."""
    side = scheduler.handoff or scheduler.receiver
    assert side is not None
    handoff = scheduler.handoff
    rank0 = scheduler.tp_rank == 0
    while True:
        if rank0:
            scheduler.transport.inject(side.decide())
        if scheduler.dp_attention and scheduler.peers_busy:
            timeout = 0
        elif not scheduler.has_work():
            timeout = DP_ATTENTION_IDLE_POLL_MS if scheduler.dp_attention else 1000
        elif scheduler.prefill.waiting or scheduler.prefill.chunked or scheduler.decode.running or scheduler.inflight:
            timeout = 0
        else:
            timeout = 5  # only requests waiting on the peer
        scheduler.recv_requests(timeout_ms=timeout)
        if handoff is not None:
            scheduler.finish(handoff.poll_sent(), send=False)
        scheduler.step()
        scheduler.report_load()


# --disaggregation-mode -> loop
EVENT_LOOPS: dict[str, Callable[[Scheduler], None]] = {"null": normal_loop, "prefill": pd_loop, "decode": pd_loop}
