"""Entry point of the scheduler process."""

from __future__ import annotations

import faulthandler
import logging
import traceback
from multiprocessing.connection import Connection

from radixserve.ipc import PortArgs
from radixserve.server_args import ServerArgs
from radixserve.utils.logging import configure_logging
from radixserve.utils.process import die_with_parent, ignore_sigterm


def run_scheduler_process(args: ServerArgs, ports: PortArgs, ready: Connection, tp_rank: int = 0,
                          dist_init_method: str | None = None, dp_rank: int = 0) -> None:
    die_with_parent()
    ignore_sigterm()
    faulthandler.enable()
    # rank 0 (of each DP attention group) logs the batches; the other ranks only warnings and errors
    group_rank = tp_rank % (args.tp_size // args.dp_size) if args.enable_dp_attention else tp_rank
    level = args.log_level if group_rank == 0 else "warning"
    name = "scheduler" + (f" DP{dp_rank}" if args.dp_size > 1 else "") + (f" TP{tp_rank}" if args.tp_size > 1 else "")
    configure_logging(level, name)
    logger = logging.getLogger("radixserve.scheduler")
    try:
        from radixserve.scheduler.scheduler import Scheduler

        scheduler = Scheduler(args, ports, tp_rank, dist_init_method, dp_rank)
    except Exception as e:  # report the start-up failure to the parent as one clear line
        logger.debug("%s", traceback.format_exc())
        ready.send({"status": "error", "message": f"{type(e).__name__}: {e}" if not isinstance(e, ValueError)
                    else str(e)})
        return
    info = scheduler.info()
    logger.info(
        "KV cache: %d tokens (page size %d) as %s, %d bytes a token, max running requests %d, context length %d, "
        "dtype %s, device %s", info["max_total_num_tokens"], args.page_size, info["kv_dtype"],
        info["kv_bytes_per_token"], info["max_running_requests"], info["context_length"], info["dtype"],
        info["device"],
    )
    ready.send({"status": "ready", **info})
    try:
        scheduler.event_loop()
    except Exception:
        logger.error("scheduler crashed:\n%s", traceback.format_exc())
        raise SystemExit(1) from None
