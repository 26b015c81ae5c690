"""The scheduler: receives requests, picks batches, runs them and streams token ids onward.

A thin composition of its parts, each owning its queue and its budget:

    SchedulerTransport  ZMQ in and out, the TP broadcast of incoming messages   (transport.py)
    RequestIntake       a message -> a WAITING request, or a 400                  (intake.py)
    PrefillManager      WAITING and PREFILLING: admission and extend batches      (prefill_manager.py)
    DecodeManager       DECODING: decode steps and retraction                     (decode_manager.py)
    the prefix cache    KV kept after requests finish                             (cache/)
    output functions    tokens onto requests, what goes to the detokenizer        (output.py)

States and their moves are in state.py; the loop that drives a step is in loops.py.
"""

from __future__ import annotations

import logging
import os

import torch

from radixserve.cache.chunk import ChunkCache
from radixserve.cache.radix import RadixCache
from radixserve.disaggregation.decode_side import DecodeReceiver
from radixserve.disaggregation.prefill_side import PrefillHandoff
from radixserve.disaggregation.ranks import kv_share
from radixserve.disaggregation.settings import FAKE_BOOTSTRAP_HOST
from radixserve.distributed.dp_attention import set_dp_attention
from radixserve.distributed.parallel_state import (
    check_same_setup,
    init_dp_attention,
    init_tensor_parallel,
    setup_fingerprint,
    tp_min_int,
)
from radixserve.ipc import PortArgs
from radixserve.loader import config as cfgutil
from radixserve.loader.source import resolve_model_source
from radixserve.loader.tokenizer import load_tokenizer
from radixserve.messages import (
    AbortReq,
    BatchOut,
    FlushCacheReply,
    FlushCacheReq,
    GenerateBatch,
    GenerateReq,
    GetStateReq,
    KVCancel,
    KVDestination,
    KVDone,
    LoadReport,
    Message,
    PDDecision,
    PDStats,
    ProfileReply,
    ProfileReq,
    ReqOutput,
    SchedulerState,
)
from radixserve.model_executor.model_runner import (
    ModelRunner,
    create_memory_pools,
    load_model,
    plan_memory,
    resolve_device,
)
from radixserve.request_limits import RequestLimits
from radixserve.scheduler.decode_manager import DecodeManager
from radixserve.scheduler.inflight import InFlightBatch
from radixserve.scheduler.intake import Rejected, RequestIntake
from radixserve.scheduler.kv import free_kv_of
from radixserve.scheduler.loops import EVENT_LOOPS
from radixserve.scheduler.output import SampledTokens, append_token, take_output
from radixserve.scheduler.prefill import PrefillPlan, PrefillPlanner
from radixserve.scheduler.prefill_manager import PrefillManager
from radixserve.scheduler.profiler import SchedulerProfiler
from radixserve.scheduler.req import Req
from radixserve.scheduler.sampling import BatchSampler
from radixserve.scheduler.state import ReqState, move
from radixserve.scheduler.transport import SchedulerTransport
from radixserve.server_args import ServerArgs, chunked_prefill_size

logger = logging.getLogger("radixserve.scheduler")


class Scheduler:
    def __init__(self, args: ServerArgs, ports: PortArgs, tp_rank: int = 0,
                 dist_init_method: str | None = None, dp_rank: int = 0) -> None:
        self.args = args
        self.dp_rank = dp_rank
        self.device = resolve_device(args.device)
        # DP attention: tp_rank is the rank in the world of --tp-size processes (one GPU each); the
        # scheduler works as rank tp_rank % (tp_size / dp_size) of its attention group
        self.dp_attention = args.enable_dp_attention
        tp_size = args.tp_size // args.dp_size if self.dp_attention else args.tp_size
        if self.device.type == "cuda":
            gpu = (0 if self.dp_attention else dp_rank * args.tp_size) + tp_rank % args.ranks_per_node
            self.device = torch.device("cuda", args.base_gpu_id + gpu)
            torch.cuda.set_device(self.device)
        # a trace's TP rank: under DP attention the rank among all --tp-size ranks, as in SGLang
        trace_rank = tp_rank
        if self.device.type == "cpu" and args.tp_size > 1:  # ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp_size))
        if self.dp_attention:
            world_rank = tp_rank
            dp_rank, tp_rank = init_dp_attention(world_rank, args.tp_size, args.dp_size, dist_init_method,
                                                 self.device, args.dist_timeout or 600)
            set_dp_attention(args.dp_size, dp_rank, tp_size, args.enable_dp_lm_head)
            check_same_setup(world_rank, setup_fingerprint(args))
        elif args.tp_size > 1:
            init_tensor_parallel(tp_rank, args.tp_size, dist_init_method, self.device, args.dist_timeout or 600)
            check_same_setup(tp_rank, setup_fingerprint(args))
        self.tp_rank = tp_rank
        self.peers_busy = False  # DP attention: whether another group ran a forward in the last step
        source = resolve_model_source(args.model_path, args.load_format, args.tokenizer_path,
                                      trust_remote_code=args.trust_remote_code)
        cfg = source.hf_config
        self.context_len = args.context_length or cfgutil.context_length(cfg)
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) is not False and window < self.context_len:
            logger.warning("sliding window %d < context length: capping the context at %d", window, window)
            self.context_len = window
        self.tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
        loaded = load_model(args, source, self.device, self.context_len)
        plan = plan_memory(args, loaded, self.device)
        # the KV memory, made once: the runner computes into it, the scheduler and the cache assign it
        self.pools = create_memory_pools(args, loaded, plan, self.device)
        self.runner = ModelRunner(args, loaded, plan, self.pools, self.device)
        self.eos_ids = set(cfgutil.eos_token_ids(cfg, self.tokenizer))
        cache_cls = ChunkCache if args.disable_radix_cache else RadixCache
        self.cache = cache_cls(self.pools.req_to_token, self.pools.allocator, args.page_size)
        self.chunked_prefill_size = chunked_prefill_size(args, self.device.type == "cuda")
        self.sampler = BatchSampler(self.tokenizer, self.runner.vocab_size, self.eos_ids, self.device)
        planner = PrefillPlanner(
            self.cache, self.pools.allocator, self.pools.req_to_token, self.chunked_prefill_size,
            args.max_prefill_tokens, self.runner.plan.max_running_requests, args.page_size,
        )
        self.prefill = PrefillManager(self.runner, self.cache, self.sampler, planner, args.schedule_policy,
                                      not args.disable_radix_cache)
        self.decode = DecodeManager(self.runner, self.cache, self.sampler, args.decode_log_interval)
        limits = RequestLimits(self.context_len, self.pools.allocator.total_tokens)
        self.intake = RequestIntake(limits, self.eos_ids, self.sampler)
        self.transport = SchedulerTransport(ports, tp_rank, tp_size)
        self.profiler = SchedulerProfiler(trace_rank, self.dp_rank if args.dp_size > 1 else None,
                                          self.device.type == "cuda")
        # overlap scheduling: the launched batch whose results are not processed yet
        self.overlap = not args.disable_overlap_schedule
        self.inflight: InFlightBatch | None = None
        self.overlapped_launches = 0
        self.num_received = 0
        # PD disaggregation: the side of the pair this server is, if any (disaggregation/)
        self.handoff: PrefillHandoff | None = None
        self.receiver: DecodeReceiver | None = None
        # the KV heads of this rank's pool: its share of its (attention) TP group's
        kv_heads = kv_share(cfg, tp_size, tp_rank)
        if args.disaggregation_mode == "prefill":
            self.handoff = PrefillHandoff(args, self.pools, kv_heads, tp_rank, dp_rank)
            if self.handoff.handoff is not None:
                self.transport.add_peer_socket(self.handoff.handoff)
        elif args.disaggregation_mode == "decode":
            self.receiver = DecodeReceiver(args, self.pools, self.cache, kv_heads, tp_rank)
            if self.receiver.inbox is not None:
                self.transport.add_peer_socket(self.receiver.inbox)

    # ---- info -------------------------------------------------------------
    def info(self) -> dict:
        return {
            "max_total_num_tokens": self.pools.allocator.total_tokens,
            "kv_dtype": str(self.pools.kv.dtype).replace("torch.", ""),  # float8_e4m3fn with --kv-cache-dtype fp8_e4m3
            "kv_bytes_per_token": self.pools.kv.bytes_per_token(),
            "max_running_requests": self.runner.plan.max_running_requests,
            "context_length": self.context_len,
            "vocab_size": self.runner.vocab_size,
            "dtype": str(self.runner.dtype).replace("torch.", ""),
            "quantization": self.runner.quantization,
            "device": str(self.device),
            "chunked_prefill_size": self.chunked_prefill_size,
            "eos_token_ids": sorted(self.eos_ids),
        }

    def state(self) -> SchedulerState:
        alloc, pool = self.pools.allocator, self.pools.req_to_token
        return SchedulerState(
            kv_total=alloc.total_tokens, kv_available=alloc.available_size(),
            kv_evictable=self.cache.evictable_size(), kv_protected=self.cache.protected_size(),
            req_rows_total=pool.size, req_rows_available=pool.available_size(),
            num_running=len(self.decode.running) + self.prefill.num_in_prefill,
            num_waiting=len(self.prefill.waiting), new_token_ratio=self.decode.new_token_ratio,
            num_retractions=self.decode.num_retractions, gen_throughput=self.decode.last_gen_throughput,
            num_tokens=sum(r.seq_len for r in self.decode.running), dp_rank=self.dp_rank,
            overlapped_launches=self.overlapped_launches, pd=self.pd_stats(),
        )

    def pd_stats(self) -> PDStats | None:
        if self.handoff is not None:
            return self.handoff.stats()
        if self.receiver is not None:
            return self.receiver.stats()
        return None

    def report_load(self) -> None:
        """Tell the DP controller our load (requests in flight, tokens they need) when it changed."""
        if not self.transport.wants_load:
            return
        reqs = self.decode.running + self.prefill.waiting + ([self.prefill.chunked] if self.prefill.chunked else [])
        outstanding = sum(len(r.origin_input_ids) + r.remaining_new_tokens() for r in reqs)
        self.transport.report_load(
            LoadReport(self.dp_rank, len(reqs), len(self.prefill.waiting), outstanding, self.num_received)
        )

    # ---- messages ---------------------------------------------------------
    def recv_requests(self, block: bool = False, timeout_ms: int | None = None) -> None:
        for msg in self.transport.recv(block, timeout_ms):
            self.handle(msg)

    def handle(self, msg: Message) -> None:
        if isinstance(msg, GenerateBatch):
            for req in msg.reqs:
                self.add_request(req)
        elif isinstance(msg, GenerateReq):
            self.add_request(msg)
        elif isinstance(msg, AbortReq):
            self.abort(msg)
        elif isinstance(msg, FlushCacheReq):
            self.transport.reply(self.flush_cache())
        elif isinstance(msg, GetStateReq):
            self.transport.reply(self.state())
        elif isinstance(msg, ProfileReq):
            self.transport.reply(self.profile(msg))
        elif isinstance(msg, (KVDestination, KVCancel, KVDone, PDDecision)):
            self.handle_pd(msg)
        else:
            logger.error("unknown message %r", type(msg).__name__)

    def handle_pd(self, msg: Message) -> None:
        """A PD peer's message, or rank 0's PD decision (every rank, in the broadcast's order)."""
        if self.handoff is not None and isinstance(msg, KVDestination):
            for req in self.handoff.on_destination(msg):
                self.prefill.add(req)
        elif self.handoff is not None and isinstance(msg, KVCancel):
            rid = self.handoff.on_cancel(msg)
            if rid is not None:
                self.abort(AbortReq(rids=[rid], message="cancelled by the decode server", status_code=503))
        elif self.handoff is not None and isinstance(msg, PDDecision):
            self.finish(self.handoff.expire(msg.rooms))
        elif self.receiver is not None and isinstance(msg, KVDone):
            self.kv_arrived(*self.receiver.on_done(msg))
        elif self.receiver is not None and isinstance(msg, PDDecision):
            self.finish(self.receiver.apply(msg))
        else:
            logger.warning("%s ignored: not for a %s server", type(msg).__name__, self.args.disaggregation_mode)

    def kv_arrived(self, ready: list[Req], failed: list[Req]) -> None:
        """Decode server: requests whose prompt's KV landed join the running batch at their first
        token (or end there, when one token was all they wanted)."""
        self.finish(failed + [r for r in ready if r.finished])
        started = [r for r in ready if not r.finished]
        self.send_outputs(started)  # their first token
        self.decode.add(started)

    def add_request(self, msg: GenerateReq) -> None:
        self.num_received += 1
        try:
            req = self.intake.build(msg)
        except Rejected as e:
            logger.info("request %s rejected: %s", msg.rid, e.message)
            if self.handoff is not None and msg.bootstrap_room is not None:
                self.handoff.abandon(msg.bootstrap_room, e.message)  # its decode side must not wait
            reason = {"type": "abort", "message": e.message, "status_code": 400}
            self.transport.send_outputs(BatchOut([ReqOutput(msg.rid, [], reason, e.prompt_tokens, 0, 0)]))
            return
        if req.max_new_tokens == 0 and not req.wants_prompt_logprobs:  # nothing to compute
            req.finish_reason = {"type": "length", "length": 0}
            self.finish([req])
            return
        if msg.bootstrap_room is not None and msg.bootstrap_host != FAKE_BOOTSTRAP_HOST:
            if self.handoff is not None:
                for ready in self.handoff.hold(req):
                    self.prefill.add(ready)
                return
            if self.receiver is not None:
                self.receiver.hold(req)
                return
        self.prefill.add(req)

    def abort(self, msg: AbortReq) -> None:
        rids = set(msg.rids)  # a call's requests are aborted together: one pass over the queues

        def hit(req: Req) -> bool:
            return msg.abort_all or req.rid in rids

        reason: dict = {"type": "abort", "message": msg.message}
        if msg.status_code is not None:
            reason["status_code"] = msg.status_code
        gone = self.prefill.take_aborted(hit)
        if self.handoff is not None:
            gone += self.handoff.take_aborted(hit)
        if self.receiver is not None:
            gone += self.receiver.take_aborted(hit)
        for req in gone:
            req.finish_reason = dict(reason)
        self.finish(gone)
        # those in a batch are dropped before the next launch (drop_aborted)
        for req in self.decode.running + ([self.prefill.chunked] if self.prefill.chunked else []):
            if hit(req) and not req.finished:
                req.to_abort = True
                req.abort_reason = dict(reason)

    def flush_cache(self) -> FlushCacheReply:
        self.resolve()
        if self.has_requests():
            return FlushCacheReply(False, "requests are in flight; flush when idle")
        self.cache.reset()
        return FlushCacheReply(True)

    def profile(self, msg: ProfileReq) -> ProfileReply:
        """Start or stop the torch profiler on every TP rank (each rank handles the message at the
        same point); the reply succeeds only if every rank's did."""
        if msg.start:
            reply = self.profiler.start(msg)
        else:
            self.resolve()  # the in-flight batch's tokens (and device work) inside the trace
            reply = self.profiler.stop()
        # also a barrier: rank 0 replies once every rank has written its trace
        if tp_min_int(int(reply.success)) == 0 and reply.success:
            if msg.start:
                self.profiler.cancel()
            reply = ProfileReply(False, "another TP rank failed (see its log)")
        return reply

    # ---- a step -----------------------------------------------------------------
    def has_requests(self) -> bool:
        return bool(self.prefill.waiting or self.prefill.chunked or self.decode.running) or self.num_pd_held() > 0

    def num_pd_held(self) -> int:
        """Requests a PD server holds outside the prefill and decode queues."""
        side = self.handoff or self.receiver
        return side.num_held if side is not None else 0

    def has_work(self) -> bool:
        return self.has_requests() or self.inflight is not None

    def event_loop(self) -> None:
        EVENT_LOOPS[self.args.disaggregation_mode](self)

    def step(self) -> None:
        """Launch the next batch, then process the previous one's tokens. With overlap scheduling
        that processing (and the next launch's building) runs while the device computes; without,
        each batch is processed right after its launch."""
        if self.inflight is not None and self.decode.needs_resolved_state():
            self.resolve()
        self.runner.forwarded = False
        launched = self.launch_next()
        if self.dp_attention:  # every group steps in lockstep: one that ran nothing joins the others
            self.peers_busy = self.runner.forwarded or self.runner.idle_step()
        if launched is not None and self.inflight is not None:
            self.overlapped_launches += 1
        self.resolve()
        self.inflight = launched
        if not self.overlap:
            self.resolve()
        if launched is not None and self.profiler.count_step():  # the profile's last step (num_steps)
            self.resolve()
            self.profiler.stop()

    def resolve(self) -> None:
        if self.inflight is not None:
            batch, self.inflight = self.inflight, None
            self.process_batch(batch)

    def launch_next(self) -> InFlightBatch | None:
        self.drop_aborted()
        plan = self.prefill.plan(self.decode.running, self.decode.new_token_ratio)
        if plan is not None:
            self.log_prefill(plan)
            extend = self.prefill.launch(plan.reqs)
            self.decode.add(extend.to_decode)
            self.finish(extend.finished)
            return extend.inflight
        if not self.decode.running:
            return None
        step = self.decode.launch()
        self.prefill.requeue(step.retracted)
        self.finish(step.finished)
        if step.inflight is not None and self.decode.log_due():
            self.log_decode()
        return step.inflight

    def drop_aborted(self) -> None:
        gone = self.decode.take_marked()
        chunked = self.prefill.take_marked()
        if chunked is not None:
            gone.append(chunked)
        for req in gone:
            req.finish_reason = req.abort_reason or {"type": "abort", "message": "aborted"}
        self.finish(gone)

    def process_batch(self, batch: InFlightBatch) -> None:
        """Append the batch's tokens, stream them, and release the requests that finished. Requests
        that finished or were aborted after this batch was launched drop their (extra) token."""
        tokens = SampledTokens.of(batch.wait())
        if self.handoff is not None:  # the chunks' KV is computed now: a PD prefill server writes it out
            for req, computed in batch.chunks:
                if not req.finished:
                    self.handoff.send_chunk(req, computed)
        live: list[Req] = []
        for i, req in enumerate(batch.reqs):
            if req.finished or id(req) in batch.discarded:
                continue
            req.pending -= 1
            append_token(req, tokens, i)
            live.append(req)
        self.send_outputs(live)
        done = [r for r in live if r.finished]
        self.decode.remove(done)
        self.finish(done, send=False)

    def finish(self, reqs: list[Req], send: bool = True) -> None:
        """Release finished requests' KV (kept in the prefix cache) and rows; FINISHED. A PD prefill
        server's request keeps its KV while the KV is written to its decode server
        (PREFILL_INFLIGHT); the loop releases it when the write is done."""
        for req in reqs:
            if self.handoff is not None and self.handoff.start_send(req):
                continue
            if req.req_pool_idx is not None:
                free_kv_of(req, self.cache)
            move(req, ReqState.FINISHED)
        if send:
            self.send_outputs(reqs)

    def send_outputs(self, reqs: list[Req]) -> None:
        interval = self.args.stream_interval
        outs = [out for out in (take_output(r, interval) for r in reqs) if out is not None]
        if outs:
            self.transport.send_outputs(BatchOut(outs))

    # ---- logs -------------------------------------------------------------------
    def token_usage(self) -> float:
        alloc = self.pools.allocator
        used = alloc.total_tokens - alloc.available_size() - self.cache.evictable_size()
        return used / max(1, alloc.total_tokens)

    def log_prefill(self, plan: PrefillPlan) -> None:
        logger.info(
            "Prefill batch, #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d%s",
            len(plan.reqs), plan.new_tokens, plan.cached_tokens, self.token_usage(), len(self.decode.running),
            len(self.prefill.waiting), self.pd_log_fields(),
        )

    def pd_log_fields(self) -> str:
        """The PD queues, named as SGLang's PD logs name them."""
        pd = self.pd_stats()
        if pd is None:
            return ""
        if pd.role == "prefill":
            return f", #bootstrap-req: {pd.num_bootstrap}, #inflight-req: {pd.num_inflight}"
        return f", #prealloc-req: {pd.num_prealloc}, #transfer-req: {pd.num_transfer}"

    def log_decode(self) -> None:
        running = self.decode.running
        logger.info(
            "Decode batch, #running-req: %d, #token: %d, token usage: %.2f, cuda graph: %s, "
            "gen throughput (token/s): %.2f, #queue-req: %d%s",
            len(running), sum(r.seq_len for r in running), self.token_usage(),
            self.runner.graph_runner is not None, self.decode.gen_throughput(), len(self.prefill.waiting),
            self.pd_log_fields(),
        )
