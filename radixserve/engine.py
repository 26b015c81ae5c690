"""Engine: the offline API (shaped like sglang.Engine). It starts the scheduler and detokenizer
processes, keeps a TokenizerManager on a private event loop thread, and owns their lifetime."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import multiprocessing as mp
import queue
import socket
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

from radixserve.entrypoints.detokenizer import run_detokenizer_process
from radixserve.entrypoints.requests import expand_requests
from radixserve.entrypoints.tokenizer_manager import TokenizerManager, collect
from radixserve.ipc import PortArgs
from radixserve.loader.source import resolve_model_source
from radixserve.loader.tokenizer import load_tokenizer
from radixserve.messages import GenerateReq, ProfileReq
from radixserve.scheduler.dp_controller import run_dp_controller_process
from radixserve.scheduler.process import run_scheduler_process
from radixserve.server_args import ServerArgs, ServerArgsError
from radixserve.utils.process import kill_process_trees

logger = logging.getLogger("radixserve.engine")


class EngineStartError(RuntimeError):
    pass


def launch_backend(args: ServerArgs) -> tuple[PortArgs, list[mp.Process], dict[str, Any], Any, Any]:
    """Start scheduler + detokenizer; return once the model is loaded (or raise one clear line)."""
    unbuilt = args.unbuilt_feature()
    if unbuilt:
        raise ServerArgsError(unbuilt)
    logger.info("resolving the model %s", args.model_path or "(the bundled SmolLM2-135M-Instruct)")
    source = resolve_model_source(args.model_path, args.load_format, args.tokenizer_path,
                                  trust_remote_code=args.trust_remote_code)
    # also warms the on-disk tokenizer cache for the children
    tokenizer = load_tokenizer(source, trust_remote_code=args.trust_remote_code)
    ports = PortArgs.new()
    ctx = mp.get_context("spawn")
    procs: list[mp.Process] = []
    readers = []
    if args.dp_size > 1:
        procs.append(ctx.Process(target=run_dp_controller_process, args=(args, ports),
                                 name="radixserve-dp-controller", daemon=True))
    for dp_rank, rank, dist_init in scheduler_ranks(args):
        group_ports = ports.for_dp_group(dp_rank) if args.dp_size > 1 else ports
        reader, writer = ctx.Pipe(duplex=False)
        name = "radixserve-scheduler" + (f"-dp{dp_rank}" if args.dp_size > 1 else "") + (
            f"-tp{rank}" if args.tp_size > 1 else "")
        procs.append(ctx.Process(target=run_scheduler_process,
                                 args=(args, group_ports, writer, rank, dist_init, dp_rank),
                                 name=name, daemon=True))
        readers.append((reader, procs[-1]))
    if args.node_rank == 0:  # other nodes run scheduler ranks only
        procs.append(ctx.Process(target=run_detokenizer_process, args=(args, ports, source),
                                 name="radixserve-detokenizer", daemon=True))
    for p in procs:
        p.start()
    logger.info("started %d scheduler process(es) and the detokenizer; each scheduler loads the model",
                len(readers))
    try:
        infos = [wait_ready(reader, proc) for reader, proc in readers]
    except BaseException:
        stop_backend(ports, procs)
        raise
    failed = [i for i in infos if i.get("status") != "ready"]
    if failed:
        stop_backend(ports, procs)
        raise EngineStartError(failed[0].get("message", "scheduler failed to start"))
    info = infos[0]
    return ports, procs, info, tokenizer, source


def stop_backend(ports: PortArgs, procs: list[mp.Process]) -> None:
    """Kill the backend's process trees, then delete their socket folder."""
    kill_process_trees([p.pid for p in procs])
    for p in procs:
        p.join(timeout=5)
    ports.remove()


def scheduler_ranks(args: ServerArgs) -> list[tuple[int, int, str]]:
    """(DP rank, rank, rendezvous) of each scheduler process this node runs. Plain --dp-size: dp_size
    groups of --tp-size ranks, each group a process group of its own. --enable-dp-attention: --tp-size
    processes in all, one process group (the world the MoE layers span); DP group g is ranks
    g * tp/dp .. (g + 1) * tp/dp - 1."""
    if args.enable_dp_attention:
        dist_init = dist_init_method(args.dist_init_addr, 0)
        per_group = args.tp_size // args.dp_size
        return [(rank // per_group, rank, dist_init) for rank in args.node_ranks()]
    return [(dp_rank, rank, dist_init)
            for dp_rank in range(args.dp_size)
            for dist_init in [dist_init_method(args.dist_init_addr, dp_rank)]
            for rank in args.node_ranks()]


def wait_ready(reader, proc: mp.Process) -> dict[str, Any]:
    while not reader.poll(0.5):
        if not proc.is_alive():
            raise EngineStartError(f"{proc.name} process exited with code {proc.exitcode} while starting")
    return reader.recv()


def dist_init_method(dist_init_addr: str | None, dp_rank: int) -> str:
    """torch.distributed's rendezvous of one DP group's TP ranks: --dist-init-addr's host, at its port
    plus the DP rank (each group is a process group of its own, and needs its own port); a free
    local port without the flag."""
    if not dist_init_addr:
        return f"tcp://127.0.0.1:{free_port()}"
    host, port = dist_init_addr.rsplit(":", 1)
    return f"tcp://{host}:{int(port) + dp_rank}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def liveness_check(procs: list[mp.Process]) -> str | None:
    for p in procs:
        if not p.is_alive():
            return f"{p.name} process died (exit code {p.exitcode}); radixserve cannot serve requests"
    return None


class Engine:
    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        self._procs: list[mp.Process] = []
        self._closed = False
        ports, self._procs, self.info, tokenizer, _ = launch_backend(self.server_args)
        self.tokenizer = tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="radixserve-engine")
        self._thread.start()
        procs = self._procs
        self.tokenizer_manager = TokenizerManager(ports, tokenizer, self.info, lambda: liveness_check(procs),
                                                  self.server_args.max_logprobs)
        self._finalizer = weakref.finalize(self, Engine._cleanup, self._loop, ports, procs,
                                           self.tokenizer_manager)
        atexit.register(self._finalizer)

    # ---- lifetime -------------------------------------------------------------
    @staticmethod
    def _cleanup(loop: asyncio.AbstractEventLoop, ports: PortArgs, procs: list[mp.Process],
                 tm: TokenizerManager) -> None:
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(tm.close(), loop).result(timeout=5)
            except Exception:  # shutting down regardless
                logger.debug("tokenizer manager did not close cleanly", exc_info=True)
        stop_backend(ports, procs)
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- helpers ----------------------------------------------------------------
    def _submit(self, coro) -> concurrent.futures.Future:
        """Run coro on the engine's event loop; after shutdown that loop is gone, so refuse."""
        if self._closed:
            coro.close()
            raise RuntimeError("the engine is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro) -> Any:
        return self._submit(coro).result()

    # ---- public API ---------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        reqs, single = expand_requests(
            prompt, input_ids, sampling_params, return_logprob, top_logprobs_num, logprob_start_len, stream
        )
        if stream:
            if len(reqs) != 1:
                raise ValueError("stream=True takes one prompt with n=1")
            if self._closed:
                raise RuntimeError("the engine is shut down")
            return self._stream_sync(reqs[0])
        outs = self._run(collect(self.tokenizer_manager, reqs))
        return outs[0] if single else outs

    def _stream_sync(self, req: GenerateReq) -> Iterator[dict[str, Any]]:
        q: queue.Queue = queue.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for out in self.tokenizer_manager.generate(req):
                    q.put(out)
                q.put(done)
            except Exception as e:
                q.put(e)

        fut = self._submit(pump())
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not fut.done():
                fut.cancel()  # the consumer stopped early: generate() aborts the request

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int | None = None,
        stream: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        reqs, single = expand_requests(
            prompt, input_ids, sampling_params, return_logprob, top_logprobs_num, logprob_start_len, stream
        )
        if stream:
            if len(reqs) != 1:
                raise ValueError("stream=True takes one prompt with n=1")
            if self._closed:
                raise RuntimeError("the engine is shut down")
            return self._stream_async(reqs[0])
        outs = await asyncio.wrap_future(self._submit(collect(self.tokenizer_manager, reqs)))
        return outs[0] if single else outs

    async def _stream_async(self, req: GenerateReq) -> AsyncIterator[dict[str, Any]]:
        caller = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for out in self.tokenizer_manager.generate(req):
                    caller.call_soon_threadsafe(q.put_nowait, out)
                caller.call_soon_threadsafe(q.put_nowait, done)
            except Exception as e:
                caller.call_soon_threadsafe(q.put_nowait, e)

        fut = self._submit(pump())
        try:
            while True:
                item = await q.get()
                if item is done:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            if not fut.done():
                fut.cancel()

    def flush_cache(self) -> bool:
        return self._run(self.tokenizer_manager.flush_cache()).success

    def get_scheduler_state(self):
        """Pool and queue counts (KV slots, request rows, running/waiting requests)."""
        return self._run(self.tokenizer_manager.get_state())

    def abort_request(self, rid: str = "") -> None:
        self._run(self.tokenizer_manager.abort(rid))

    def start_profile(self, output_dir: str | None = None, num_steps: int | None = None,
                      activities: list[str] | None = None, with_stack: bool | None = None,
                      record_shapes: bool | None = None, profile_prefix: str | None = None) -> None:
        """Start the torch profiler in the scheduler process(es), as /start_profile (SGLang's
        Engine.start_profile). RuntimeError if a profile runs already or an argument is bad."""
        reply = self._run(self.tokenizer_manager.profile(ProfileReq(
            True, output_dir=output_dir, num_steps=num_steps, activities=activities, with_stack=with_stack,
            record_shapes=record_shapes, profile_prefix=profile_prefix)))
        if not reply.success:
            raise RuntimeError(reply.message)

    def stop_profile(self) -> None:
        """Stop the profile and write each rank's trace (returns once written). RuntimeError if none runs."""
        reply = self._run(self.tokenizer_manager.profile(ProfileReq(False)))
        if not reply.success:
            raise RuntimeError(reply.message)
