"""The torch profiler inside a scheduler process (SGLang's /start_profile and /stop_profile).

It starts and stops between scheduler steps, so a trace holds whole steps. Every TP rank profiles
itself and writes its own gzipped Chrome trace, named as SGLang names them:
`[<prefix>-]<profile id>-TP-<rank>[-DP-<rank>].trace.json.gz` in the output folder (the request's,
else $SGLANG_TORCH_PROFILER_DIR, else $RADIXSERVE_TORCH_PROFILER_DIR, else /tmp).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile

from radixserve.messages import ProfileReply, ProfileReq

logger = logging.getLogger("radixserve.scheduler")

# where traces go when a request names no folder: SGLang's variable first (its recipes set it)
DIR_ENV_NAMES = ("SGLANG_TORCH_PROFILER_DIR", "RADIXSERVE_TORCH_PROFILER_DIR")
ACTIVITIES = {"CPU": ProfilerActivity.CPU, "GPU": ProfilerActivity.CUDA}


def default_output_dir() -> str:
    return next((os.environ[name] for name in DIR_ENV_NAMES if os.environ.get(name)), "/tmp")


class BadProfileRequest(ValueError):
    """A start's arguments that cannot be honoured: its message goes back as the 400's."""


@dataclass
class _Run:
    prof: profile
    path: str  # the trace file this rank writes
    steps_left: int | None  # None: until stop


class SchedulerProfiler:
    """One rank's profiler: at most one profile at a time."""

    def __init__(self, tp_rank: int, dp_rank: int | None, cuda: bool) -> None:
        self.tp_rank = tp_rank
        self.dp_rank = dp_rank  # None: a single DP group, left out of the file name
        self.cuda = cuda
        self.run: _Run | None = None

    @property
    def running(self) -> bool:
        return self.run is not None

    def start(self, req: ProfileReq) -> ProfileReply:
        if self.run is not None:
            return ProfileReply(False, "a profile is already running; stop it first (/stop_profile)")
        try:
            activities = self._activities(req.activities)
            if req.num_steps is not None and req.num_steps < 1:
                raise BadProfileRequest(f"num_steps must be at least 1 (got {req.num_steps})")
            if req.profile_prefix and os.sep in req.profile_prefix:  # a file name's start, not a path
                raise BadProfileRequest(f"profile_prefix may not contain {os.sep!r}")
            for name, value in (("output_dir", req.output_dir), ("profile_prefix", req.profile_prefix)):
                if value and "\0" in value:  # no path can hold one: os calls raise ValueError
                    raise BadProfileRequest(f"{name} may not contain a NUL character")
            out_dir = req.output_dir or default_output_dir()
            os.makedirs(out_dir, exist_ok=True)
            if not os.access(out_dir, os.W_OK):  # found now, not after the profile ran
                raise BadProfileRequest(f"output_dir {out_dir!r} is not writable")
        except (ValueError, OSError) as e:  # BadProfileRequest is a ValueError; none may end the scheduler
            return ProfileReply(False, str(e))
        path = os.path.join(out_dir, self._file_name(req.profile_id or str(time.time()), req.profile_prefix))
        # SGLang's defaults: call stacks on, input shapes off
        prof = profile(activities=activities, with_stack=req.with_stack is not False,
                       record_shapes=bool(req.record_shapes))
        prof.start()
        self.run = _Run(prof, path, req.num_steps)
        logger.info("Profiling starts (%s%s); the trace goes to %s", "+".join(a.name for a in activities),
                    f", {req.num_steps} steps" if req.num_steps else "", path)
        return ProfileReply(True, path)

    def count_step(self) -> bool:
        """A step that ran a batch: True when it was the last of num_steps (the caller stops now)."""
        run = self.run
        if run is None or run.steps_left is None:
            return False
        run.steps_left -= 1
        return run.steps_left <= 0

    def stop(self) -> ProfileReply:
        """Stop and write the trace (this takes a while: seconds for a busy profile)."""
        run, self.run = self.run, None
        if run is None:
            return ProfileReply(False, "no profile is running; start one first (/start_profile)")
        run.prof.stop()
        try:
            run.prof.export_chrome_trace(run.path)  # gzipped, the name ending in .gz
        except (OSError, RuntimeError) as e:
            logger.error("the trace could not be written to %s: %s", run.path, e)
            return ProfileReply(False, f"the trace could not be written to {run.path}: {e}")
        logger.info("Profiling done: trace written to %s", run.path)
        return ProfileReply(True, run.path)

    def cancel(self) -> None:
        """Stop without writing (another rank could not start)."""
        run, self.run = self.run, None
        if run is not None:
            run.prof.stop()

    def _activities(self, names: list[str] | None) -> list[ProfilerActivity]:
        if names is None:
            return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        unknown = [n for n in names if n not in ACTIVITIES]
        if unknown:
            raise BadProfileRequest(f"activities: {', '.join(map(repr, unknown))} not supported "
                                    f"(radixserve records {' and '.join(ACTIVITIES)})")
        if "GPU" in names and not self.cuda:
            # dropped, not refused: SGLang's clients ask for CPU and GPU by default
            logger.warning("profile: no CUDA device here, the GPU activity is left out")
            names = [n for n in names if n != "GPU"]
        if not names:
            raise BadProfileRequest("activities: nothing to record (GPU needs a CUDA device; this server has none)")
        return [ACTIVITIES[n] for n in dict.fromkeys(names)]

    def _file_name(self, profile_id: str, prefix: str | None) -> str:
        name = f"{prefix}-{profile_id}" if prefix else profile_id
        name += f"-TP-{self.tp_rank}"
        if self.dp_rank is not None:
            name += f"-DP-{self.dp_rank}"
        return name + ".trace.json.gz"
