"""A PD server's TP ranks as its peers see them: each rank's transfer engine and KV buffers (with
the KV heads it holds), gathered to every rank at start-up, and the address peers reach it at."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from radixserve.disaggregation.kv_runs import BufferSpec
from radixserve.disaggregation.settings import reachable_host
from radixserve.distributed.parallel_state import tp_all_gather_object
from radixserve.layers.linear import kv_heads_of_rank
from radixserve.loader import config as cfgutil
from radixserve.messages import PeerRank

if TYPE_CHECKING:
    from radixserve.cache.memory import MemoryPools
    from radixserve.disaggregation.transfer import TransferEngine
    from radixserve.server_args import ServerArgs


def kv_share(cfg: Any, tp_size: int, tp_rank: int) -> tuple[int, int, int]:
    """(first KV head, heads, the model's KV heads) of this rank's KV pool. An MLA model (DeepSeek:
    kv_lora_rank) caches one latent that every rank holds whole: one "head", replicated on all ranks
    (rank 0 sends it, as for any replicated KV head)."""
    if getattr(cfgutil.text_config(cfg), "kv_lora_rank", None):
        return 0, 1, 1
    total = cfgutil.num_kv_heads(cfg)
    first, count = kv_heads_of_rank(total, cfgutil.num_attention_heads(cfg), tp_size, tp_rank)
    return first, count, total


def local_host(args: ServerArgs) -> str:
    """The address this rank's peers reach it at: --host, or on a multi-node group with a wildcard
    --host, the address this node reaches node 0 from."""
    host = reachable_host(args.host)
    if args.nnodes > 1 and args.dist_init_addr and host == "127.0.0.1":
        node0 = args.dist_init_addr.rsplit(":", 1)[0].strip("[]")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((node0, 9))  # UDP: nothing is sent, the route is chosen
            return probe.getsockname()[0]
    return host


def register_ranks(engine: TransferEngine, pools: MemoryPools, first_head: int, num_heads: int
                   ) -> tuple[list[BufferSpec], list[PeerRank]]:
    """Register this rank's KV buffers with its engine; (its buffers, every rank's PeerRank)."""
    layout = [BufferSpec.of(b, first_head, num_heads) for b in pools.kv.layout()]
    engine.register([(b.data_ptr, b.nbytes) for b in layout])
    mine = (engine.session_id, [[b.data_ptr, b.bytes_per_slot, b.num_slots, b.head_start, b.num_heads]
                                for b in layout])
    return layout, [PeerRank(session, rows) for session, rows in tp_all_gather_object(mine)]


def specs(rank: PeerRank) -> list[BufferSpec]:
    return [BufferSpec(*row) for row in rank.layout]
