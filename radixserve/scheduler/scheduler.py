"""The scheduler: receives requests, picks batches, runs them and streams token ids onward."""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq

from radixserve.cache.chunk import ChunkCache
from radixserve.cache.radix import RadixCache
from radixserve.constrained import GrammarBackend, GrammarError, allocate_bitmask, apply_bitmask
from radixserve.detokenize import StopChecker
from radixserve.distributed.parallel_state import (
    check_same_setup,
    init_tensor_parallel,
    setup_fingerprint,
    tp_broadcast_objects,
    tp_broadcast_tensor,
)
from radixserve.ipc import PortArgs, pull_socket, push_socket
from radixserve.layers.sampler import Sampler
from radixserve.loader import config as cfgutil
from radixserve.loader.source import resolve_model_source
from radixserve.loader.tokenizer import load_tokenizer
from radixserve.messages import (
    AbortReq,
    BatchOut,
    FlushCacheReply,
    FlushCacheReq,
    GenerateBatch,
    GetStateReq,
    LoadReport,
    ReqOutput,
    SchedulerState,
    TokenizedGenerateReq,
)
from radixserve.model_executor.model_runner import ModelRunner, resolve_device
from radixserve.request_limits import RequestLimits
from radixserve.sampling_batch import SamplingBatch
from radixserve.sampling_params import SamplingParams
from radixserve.scheduler.batch import OutOfKVError, build_decode_batch, build_extend_batch, record_sampled
from radixserve.scheduler.decode import decode_tokens_needed, free_kv_of, retract_for_decode
from radixserve.scheduler.inflight import InFlightBatch
from radixserve.scheduler.output import SampledTokens, append_token, record_prompt_logprobs, take_output
from radixserve.scheduler.policy import order_waiting
from radixserve.scheduler.prefill import PrefillPlanner
from radixserve.scheduler.req import Req, ReqStage
from radixserve.server_args import ServerArgs, resolved_defaults

logger = logging.getLogger("radixserve.scheduler")

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
RETRACT_DECODE_STEPS = 20


class Scheduler:
    def __init__(self, args: ServerArgs, ports: PortArgs, tp_rank: int = 0,
                 dist_init_method: str | None = None, dp_rank: int = 0) -> None:
        self.args = args
        self.tp_rank = tp_rank
        self.dp_rank = dp_rank
        self.device = resolve_device(args.device)
        if self.device.type == "cuda":
            gpu = dp_rank * args.tp_size + tp_rank % args.ranks_per_node
            self.device = torch.device("cuda", args.base_gpu_id + gpu)
            torch.cuda.set_device(self.device)
        if args.tp_size > 1:
            if self.device.type == "cpu":  # ranks share the cores
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp_size))
            init_tensor_parallel(tp_rank, args.tp_size, dist_init_method, self.device, args.dist_timeout or 600)
            check_same_setup(tp_rank, setup_fingerprint(args))
        source = resolve_model_source(args.model_path, args.load_format, args.tokenizer_path,
                                      trust_remote_code=args.trust_remote_code)
        cfg = source.hf_config
        self.context_len = args.context_length or cfgutil.context_length(cfg)
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) is not False and window < self.context_len:
            logger.warning("sliding window %d < context length: capping the context at %d", window, window)
            self.context_len = window
        self.tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
        self.runner = ModelRunner(args, source, self.device, self.context_len)
        self.eos_ids = set(cfgutil.eos_token_ids(cfg, self.tokenizer))
        self.page_size = args.page_size
        cache_cls = ChunkCache if args.disable_radix_cache else RadixCache
        self.cache = cache_cls(self.runner.req_to_token_pool, self.runner.allocator, self.page_size)
        defaults = resolved_defaults(args, self.device.type == "cuda")
        self.chunked_prefill_size = defaults["chunked_prefill_size"]
        self.planner = PrefillPlanner(
            self.cache, self.runner.allocator, self.runner.req_to_token_pool, self.chunked_prefill_size,
            args.max_prefill_tokens, self.runner.plan.max_running_requests, self.page_size,
        )
        self.sampler = Sampler()
        self.grammar_backend: GrammarBackend | None = None  # built on the first structured request
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        # overlap scheduling: the launched batch whose results are not processed yet
        self.overlap = not args.disable_overlap_schedule
        self.inflight: InFlightBatch | None = None
        self.overlapped_launches = 0
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self.decode_steps = 0
        self.last_log_time = time.perf_counter()
        self.tokens_since_log = 0
        self.last_gen_throughput = 0.0
        # only rank 0 talks to the other processes; the other ranks follow its broadcasts
        self.recv_sock = self.detok_sock = self.reply_sock = self.load_sock = None
        self.last_load: tuple[int, int, int, int] | None = None
        self.num_received = 0
        if tp_rank == 0:
            ctx = zmq.Context.instance()
            self.recv_sock = pull_socket(ctx, ports.scheduler_input)
            self.detok_sock = push_socket(ctx, ports.detokenizer_input)
            self.reply_sock = push_socket(ctx, ports.control_reply or ports.tokenizer_input)
            if ports.load_report:
                self.load_sock = push_socket(ctx, ports.load_report)

    # ---- info -------------------------------------------------------------
    def info(self) -> dict:
        return {
            "max_total_num_tokens": self.runner.allocator.total_tokens,
            "max_running_requests": self.runner.plan.max_running_requests,
            "context_length": self.context_len,
            "vocab_size": self.runner.vocab_size,
            "dtype": str(self.runner.dtype).replace("torch.", ""),
            "device": str(self.device),
            "chunked_prefill_size": self.chunked_prefill_size,
            "eos_token_ids": sorted(self.eos_ids),
        }

    def state(self) -> SchedulerState:
        alloc, pool = self.runner.allocator, self.runner.req_to_token_pool
        return SchedulerState(
            kv_total=alloc.total_tokens, kv_available=alloc.available_size(),
            kv_evictable=self.cache.evictable_size(), kv_protected=self.cache.protected_size(),
            req_rows_total=pool.size, req_rows_available=pool.available_size(),
            num_running=len(self.running) + (self.chunked_req is not None), num_waiting=len(self.waiting),
            new_token_ratio=self.new_token_ratio, num_retractions=self.num_retractions,
            gen_throughput=self.last_gen_throughput, num_tokens=sum(r.seq_len for r in self.running),
            dp_rank=self.dp_rank, overlapped_launches=self.overlapped_launches,
        )

    def report_load(self) -> None:
        """Tell the DP controller our load when it changed (requests in flight, tokens they need)."""
        if self.load_sock is None:
            return
        reqs = self.running + self.waiting + ([self.chunked_req] if self.chunked_req else [])
        load = (len(reqs), len(self.waiting),
                sum(len(r.origin_input_ids) + r.remaining_new_tokens() for r in reqs), self.num_received)
        if load != self.last_load:
            self.last_load = load
            self.load_sock.send_pyobj(LoadReport(self.dp_rank, *load))

    # ---- intake -----------------------------------------------------------
    def recv_requests(self, block: bool) -> None:
        msgs: list[object] = []
        if self.recv_sock is not None:
            timeout = 1000 if block else 0
            while self.recv_sock.poll(timeout):
                msgs.append(self.recv_sock.recv_pyobj())
                timeout = 0
        for msg in tp_broadcast_objects(msgs):  # every rank handles the same messages in order
            self.handle(msg)

    def send_detok(self, batch: BatchOut) -> None:
        if self.detok_sock is not None:
            self.detok_sock.send_pyobj(batch)

    def reply(self, msg: object) -> None:
        if self.reply_sock is not None:
            self.reply_sock.send_pyobj(msg)

    def handle(self, msg: object) -> None:
        if isinstance(msg, GenerateBatch):
            for req in msg.reqs:
                self.add_request(req)
        elif isinstance(msg, TokenizedGenerateReq):
            self.add_request(msg)
        elif isinstance(msg, AbortReq):
            self.abort(msg)
        elif isinstance(msg, FlushCacheReq):
            self.reply(self.flush_cache())
        elif isinstance(msg, GetStateReq):
            self.reply(self.state())
        else:
            logger.error("unknown message %r", type(msg).__name__)

    def reject(self, rid: str, message: str, prompt_tokens: int = 0) -> None:
        logger.info("request %s rejected: %s", rid, message)
        reason = {"type": "abort", "message": message, "status_code": 400}
        self.send_detok(BatchOut([ReqOutput(rid, [], reason, prompt_tokens, 0, 0)]))

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        self.num_received += 1
        n = len(msg.input_ids)
        try:
            params = SamplingParams.from_dict(msg.sampling_params)
        except ValueError as e:
            return self.reject(msg.rid, str(e), n)
        # the API process checks all of this first; these guard the scheduler against any other sender
        if n == 0:
            return self.reject(msg.rid, "the prompt is empty", 0)
        if any(not 0 <= t < self.runner.vocab_size for t in msg.input_ids):
            return self.reject(msg.rid, f"input_ids must be in [0, {self.runner.vocab_size})", n)
        limits = RequestLimits(self.context_len, self.runner.allocator.total_tokens)
        problem = limits.check(n, params.max_new_tokens)
        if problem is not None:
            return self.reject(msg.rid, problem[0], n)
        max_new = limits.max_new_tokens(n, params.max_new_tokens)
        if self.tokenizer is None and (params.stop or params.stop_regex or params.grammar_spec() is not None):
            return self.reject(msg.rid, "stop strings and structured output need a tokenizer; this model has none", n)
        try:
            grammar = self.new_grammar(params)
        except GrammarError as e:
            return self.reject(msg.rid, str(e), n)
        req = Req(
            rid=msg.rid, origin_input_ids=list(msg.input_ids), params=params, eos_ids=self.eos_ids,
            grammar=grammar,
            stop_checker=StopChecker(self.tokenizer, params.stop, regexes=params.stop_regex or ())
            if params.stop or params.stop_regex else None,
            return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
            logprob_start_len=msg.logprob_start_len, stream=msg.stream, max_new_tokens=max_new,
        )
        if max_new == 0 and not req.wants_prompt_logprobs:  # nothing to compute
            req.finish_reason = {"type": "length", "length": 0}
            self.send_outputs([req])
            return None
        self.waiting.append(req)
        return None

    def new_grammar(self, params: SamplingParams):
        spec = params.grammar_spec()
        if spec is None:
            return None
        if self.grammar_backend is None:
            # no free whitespace in JSON (json.dumps spacing only): small models otherwise pad it to the limit
            self.grammar_backend = GrammarBackend(
                self.tokenizer, self.runner.vocab_size, sorted(self.eos_ids), any_whitespace=False
            )
        return self.grammar_backend.new_matcher(spec)  # compiled once per distinct schema (LRU)

    def abort(self, msg: AbortReq) -> None:
        rids = set(msg.rids)  # a call's requests are aborted together: one pass over the queues

        def hit(req: Req) -> bool:
            return msg.abort_all or req.rid in rids

        reason: dict = {"type": "abort", "message": msg.message}
        if msg.status_code is not None:
            reason["status_code"] = msg.status_code
        gone = [r for r in self.waiting if hit(r)]
        if gone:
            self.waiting = [r for r in self.waiting if not hit(r)]
            for req in gone:
                req.finish_reason = dict(reason)
                if req.req_pool_idx is not None:
                    free_kv_of(req, self.cache)
            self.send_outputs(gone)
        for req in self.running + ([self.chunked_req] if self.chunked_req else []):
            if hit(req) and not req.finished:
                req.to_abort = True
                req.abort_reason = dict(reason)

    def flush_cache(self) -> FlushCacheReply:
        self.resolve()
        if self.running or self.waiting or self.chunked_req:
            return FlushCacheReply(False, "requests are in flight; flush when idle")
        self.cache.reset()
        return FlushCacheReply(True)

    # ---- the loop ---------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self.inflight)

    def event_loop(self) -> None:
        profile_steps = int(os.environ.get("RADIXSERVE_PROFILE_STEPS", "0"))
        while True:
            self.recv_requests(block=not self.has_work())
            if profile_steps and self.has_work():
                self.profile(profile_steps)
                profile_steps = 0
            self.step()
            self.report_load()

    def profile(self, steps: int) -> None:
        """Developer aid (RADIXSERVE_PROFILE_STEPS=N): cProfile the next N busy steps into the log."""
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        for _ in range(steps):
            self.recv_requests(block=False)
            self.step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        logger.info("profile of %d steps (%.2f ms/step):\n%s", steps,
                    (time.perf_counter() - start) / steps * 1e3, out.getvalue())

    def step(self) -> None:
        """Launch the next batch, then process the previous one's tokens. With overlap scheduling
        that processing (and the next launch's building) runs while the device computes; without,
        each batch is processed right after its launch."""
        if self.inflight is not None and self.needs_resolved_state():
            self.resolve()
        launched = self.launch_next()
        if launched is not None and self.inflight is not None:
            self.overlapped_launches += 1
        self.resolve()
        self.inflight = launched
        if not self.overlap:
            self.resolve()

    def needs_resolved_state(self) -> bool:
        """Whether the next launch must see the in-flight tokens first: sampling that reads a
        request's tokens (grammar, penalties, min_new_tokens), or a decode that may retract."""
        if any(r.needs_host_tokens for r in self.running):
            return True
        free = self.runner.allocator.available_size() + self.cache.evictable_size()
        return decode_tokens_needed(self.running, self.page_size) > free

    def resolve(self) -> None:
        if self.inflight is not None:
            batch, self.inflight = self.inflight, None
            self.process_batch(batch)

    def launch_next(self) -> InFlightBatch | None:
        self.drop_aborted()
        waiting = order_waiting(
            self.waiting, self.args.schedule_policy, self.cache, not self.args.disable_radix_cache
        )
        plan = self.planner.plan(waiting, self.running, self.chunked_req, self.new_token_ratio)
        if plan.reqs:
            admitted = {id(r) for r in plan.reqs}
            self.waiting = [r for r in self.waiting if id(r) not in admitted]
            self.chunked_req = plan.chunked_req
            self.log_prefill(plan)
            return self.launch_extend(plan.reqs)
        if self.running:
            retracted = retract_for_decode(self.running, self.runner, self.cache)
            if retracted:
                self.on_retract(retracted)
            return self.launch_decode()
        return None

    def drop_aborted(self) -> None:
        gone = [r for r in self.running if r.to_abort]
        if self.chunked_req is not None and self.chunked_req.to_abort:
            gone.append(self.chunked_req)
            self.chunked_req = None
        if not gone:
            return
        self.running = [r for r in self.running if not r.to_abort]
        for req in gone:
            req.finish_reason = req.abort_reason or {"type": "abort", "message": "aborted"}
        self.finish(gone)

    def on_retract(self, retracted: list[Req]) -> None:
        self.num_retractions += len(retracted)
        self.waiting = retracted + self.waiting
        decoded = sum(len(r.output_ids) for r in self.running)
        max_new = sum(r.max_new_tokens for r in self.running) or 1
        estimate = (decoded + RETRACT_DECODE_STEPS * len(self.running)) / max_new
        self.new_token_ratio = min(1.0, max(self.new_token_ratio, estimate))
        logger.info(
            "KV cache is full: retracted %d requests; #new_token_ratio: %.4f",
            len(retracted), self.new_token_ratio,
        )

    # ---- running batches -----------------------------------------------------
    def sample(self, reqs: list[Req], logits: torch.Tensor):
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and r is not self.chunked_req]
        if rows:  # structured output: tokens the grammar forbids get -inf before sampling
            bitmask = allocate_bitmask(len(reqs), self.runner.vocab_size)
            for i in rows:
                reqs[i].grammar.fill_bitmask(bitmask, i)
            apply_bitmask(logits, bitmask, rows)
        seeds = [
            None if r.params.seed is None else (r.params.seed * 1_000_003 + r.num_generated) % (1 << 62)
            for r in reqs
        ]
        batch = SamplingBatch.build(
            [r.params for r in reqs], [r.output_ids for r in reqs], [r.origin_input_ids for r in reqs],
            [[] if r.params.ignore_eos else sorted(r.eos_ids) for r in reqs], seeds,
            self.runner.vocab_size, self.device,
        )
        want_logprob = any(r.return_logprob for r in reqs)
        top_k = max((r.top_logprobs_num for r in reqs if r.return_logprob), default=0)
        out = self.sampler(logits, batch, want_logprob, top_k)
        tp_broadcast_tensor(out.next_token_ids)  # ranks sample alike, but must never diverge
        return out

    def launch_extend(self, reqs: list[Req]) -> InFlightBatch | None:
        try:
            batch = build_extend_batch(reqs, self.runner, self.cache)
        except OutOfKVError as e:  # the planner's budget makes this a bug, but never hang on it
            logger.error("prefill could not get KV: %s", e)
            for r in reqs:
                r.finish_reason = {"type": "abort", "message": f"out of KV memory: {e}", "status_code": 503}
            self.chunked_req = None
            self.finish(reqs)
            return None
        prompt_top_k = max((r.top_logprobs_num for r in reqs if r.wants_prompt_logprobs), default=0)
        out = self.runner.forward(batch, prompt_top_k)
        sampled = self.sample(reqs, out.next_token_logits)
        record_sampled(self.runner, batch, sampled.next_token_ids)
        discarded: set[int] = set()
        scored: list[Req] = []  # max_new_tokens 0: the prompt's logprobs were all it asked for
        for i, req in enumerate(reqs):
            req.kv_committed_len += req.extend_len
            if req.wants_prompt_logprobs:
                record_prompt_logprobs(req, out.prompt_logprobs.get(i))
            if req is self.chunked_req:  # more of its prompt to go: no token yet
                self.cache.cache_unfinished_req(req)
                discarded.add(id(req))
                continue
            if req.wants_prompt_logprobs:
                req.prompt_logprobs_done = True
            if req.max_new_tokens == 0:
                req.finish_reason = {"type": "length", "length": 0}
                discarded.add(id(req))
                scored.append(req)
                continue
            req.stage = ReqStage.DECODING
            req.pending += 1
            self.running.append(req)  # it can decode before its first token reaches the host
        if scored:
            self.finish(scored)
        return InFlightBatch.start_copy(reqs, sampled, discarded)

    def launch_decode(self) -> InFlightBatch | None:
        # a request whose pending token is its last (max_new_tokens) needs no further step
        reqs = [r for r in self.running if r.num_generated < r.max_new_tokens]
        if not reqs:
            return None
        try:
            batch = build_decode_batch(reqs, self.runner, self.cache)
        except OutOfKVError as e:
            # only one request is left and even it does not fit: fail it rather than spin
            for r in reqs:
                if r.kv_committed_len < r.seq_len - 1 or r.req_pool_idx is None:
                    continue
                r.finish_reason = {"type": "abort", "message": f"out of KV memory: {e}", "status_code": 503}
            self.running = [r for r in self.running if not r.finished]
            self.finish([r for r in reqs if r.finished])
            return None
        out = self.runner.forward(batch)
        sampled = self.sample(reqs, out.next_token_logits)
        record_sampled(self.runner, batch, sampled.next_token_ids)
        for req in reqs:
            req.kv_committed_len += 1
            req.pending += 1
        self.decode_steps += 1
        self.tokens_since_log += len(reqs)
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        if self.decode_steps % self.args.decode_log_interval == 0:
            self.log_decode()
        return InFlightBatch.start_copy(reqs, sampled)

    def process_batch(self, batch: InFlightBatch) -> None:
        """Append the batch's tokens, stream them, and release the requests that finished. Requests
        that finished or were aborted after this batch was launched drop their (extra) token."""
        tokens = SampledTokens.of(batch.wait())
        live: list[Req] = []
        for i, req in enumerate(batch.reqs):
            if req.finished or id(req) in batch.discarded:
                continue
            req.pending -= 1
            append_token(req, tokens, i)
            live.append(req)
        self.send_outputs(live)
        done = [r for r in live if r.finished]
        if done:
            gone = {id(r) for r in done}
            self.running = [r for r in self.running if id(r) not in gone]
            self.finish(done, send=False)

    def finish(self, reqs: list[Req], send: bool = True) -> None:
        """Release finished requests' KV (kept in the prefix cache) and rows."""
        for req in reqs:
            if req.req_pool_idx is not None:
                free_kv_of(req, self.cache)
            req.stage = ReqStage.FINISHED
        if send:
            self.send_outputs(reqs)

    # ---- outputs --------------------------------------------------------------
    def send_outputs(self, reqs: list[Req]) -> None:
        outs = [out for out in map(take_output, reqs) if out is not None]
        if outs:
            self.send_detok(BatchOut(outs))

    # ---- logs -------------------------------------------------------------------
    def token_usage(self) -> float:
        alloc = self.runner.allocator
        used = alloc.total_tokens - alloc.available_size() - self.cache.evictable_size()
        return used / max(1, alloc.total_tokens)

    def log_prefill(self, plan) -> None:
        logger.info(
            "Prefill batch, #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d",
            len(plan.reqs), plan.new_tokens, plan.cached_tokens, self.token_usage(), len(self.running),
            len(self.waiting),
        )

    def log_decode(self) -> None:
        now = time.perf_counter()
        throughput = self.tokens_since_log / max(now - self.last_log_time, 1e-9)
        self.last_log_time, self.tokens_since_log = now, 0
        self.last_gen_throughput = throughput
        num_tokens = sum(r.seq_len for r in self.running)
        logger.info(
            "Decode batch, #running-req: %d, #token: %d, token usage: %.2f, cuda graph: %s, "
            "gen throughput (token/s): %.2f, #queue-req: %d",
            len(self.running), num_tokens, self.token_usage(), self.runner.graph_runner is not None, throughput,
            len(self.waiting),
        )
