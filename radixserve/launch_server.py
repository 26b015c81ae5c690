"""python -m radixserve.launch_server: the HTTP server (same flags as sglang.launch_server)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

import uvicorn

from radixserve import __version__
from radixserve.server_args import BUNDLED_MODEL_NAME, ServerArgs
from radixserve.utils.logging import configure_logging

logger = logging.getLogger("radixserve.server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m radixserve.launch_server",
                                     description="Serve a model over HTTP (native and OpenAI-compatible API).")
    parser.add_argument("--version", action="version", version=f"radixserve {__version__}")
    ServerArgs.add_cli_args(parser)
    return parser


def read_chat_template(value: str | None) -> str | None:
    if value is not None and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


class DrainingServer(uvicorn.Server):
    """On SIGTERM: stop taking requests (503), let those in flight finish within the shutdown
    timeout, then exit. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self.drain_started is None:
            logger.info("SIGTERM: draining %d requests in flight (timeout %.0fs)", self.state.inflight,
                        self.state.args.shutdown_timeout)
            self.state.draining = True
            self.drain_started = time.monotonic()
            return
        # not uvicorn's own handler: it would re-raise the signal after shutdown and spoil the exit code
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def monitor(self) -> None:
        tm = self.state.tm
        while not self.should_exit:
            await asyncio.sleep(0.1)
            if tm.dead:
                logger.error("%s; exiting", tm.dead)
                self.exit_code = 1
                self.should_exit = True
            elif self.drain_started is not None:
                waited = time.monotonic() - self.drain_started
                if self.state.inflight == 0 or waited > self.state.args.shutdown_timeout:
                    if self.state.inflight:
                        timeout = self.state.args.shutdown_timeout
                        logger.warning("shutdown timeout: aborting %d requests", self.state.inflight)
                        # an error (503) for each, not a result: OpenAI has no finish_reason for it
                        await tm.abort_all(503, f"the server shut down before the request finished "
                                           f"(--shutdown-timeout {timeout:g} s)")
                    self.should_exit = True


async def warm_up(state, server: DrainingServer) -> None:
    from radixserve.entrypoints.openai_common import collect
    from radixserve.entrypoints.requests import new_rid
    from radixserve.messages import GenerateReq
    from radixserve.sampling_params import SamplingParams

    tm = state.tm
    try:
        # a config-only model (dummy weights) has no tokenizer: any in-vocabulary id will do
        ids = tm.tokenizer.encode("Hello")[:8] if tm.tokenizer is not None else []
        req = GenerateReq("warmup-" + new_rid(), ids or [1], SamplingParams(max_new_tokens=2, temperature=0))
        await collect(tm, [req])
    except Exception as e:
        logger.error("warm-up generation failed: %s", e)
        server.exit_code = 1
        server.should_exit = True
        return
    state.ready = True
    logger.info("The server is fired up and ready to roll! (http://%s:%d)", state.args.host, state.args.port)


def serve_follower(args: ServerArgs) -> int:
    """A node other than node 0: run this node's scheduler ranks and answer /health on --port."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    from radixserve.engine import EngineStartError, launch_backend, liveness_check, stop_backend
    from radixserve.entrypoints.errors import error_response

    try:
        ports, procs, _, _, _ = launch_backend(args)
    except (ValueError, EngineStartError) as e:
        logger.error("%s", e)
        return 1
    app = FastAPI()

    @app.get("/health")
    async def health():
        dead = liveness_check(procs)
        return error_response(503, dead) if dead else Response(status_code=200)

    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False))
    exit_code = 0

    async def watch() -> None:
        nonlocal exit_code
        while not server.should_exit:
            await asyncio.sleep(0.2)
            dead = liveness_check(procs)
            if dead:
                logger.error("%s; exiting", dead)
                exit_code = 1
                server.should_exit = True

    async def run() -> None:
        task = asyncio.ensure_future(watch())
        try:
            await server.serve()
        finally:
            task.cancel()

    try:
        logger.info("node %d of %d: TP ranks %s up; /health on port %d", args.node_rank, args.nnodes,
                    list(args.node_ranks()), args.port)
        asyncio.run(run())
        return exit_code
    finally:
        stop_backend(ports, procs)


def raise_open_files_limit(connections: int) -> None:
    """Each connection holds a file descriptor: lift the soft limit (often 1024) toward the hard one
    so that --http-max-connections, not the OS, is the limit a client meets."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256  # the server's own sockets, pipes and files
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < want:
        logger.warning("open files limit %d is below --http-max-connections %d + 256: connections past it "
                       "will fail (raise it with ulimit -n)", soft, connections)


def serve(args: ServerArgs) -> int:
    if args.node_rank > 0:
        return serve_follower(args)
    from radixserve.engine import EngineStartError, launch_backend, liveness_check, stop_backend
    from radixserve.entrypoints.http_protocol import guarded_protocol
    from radixserve.entrypoints.http_server import ServerState, create_app
    from radixserve.entrypoints.metrics import Metrics
    from radixserve.entrypoints.tokenizer_manager import TokenizerManager

    args.chat_template = read_chat_template(args.chat_template)
    try:
        ports, procs, info, tokenizer, _ = launch_backend(args)
    except (ValueError, EngineStartError) as e:
        logger.error("%s", e)
        return 1
    try:
        name = args.served_model_name or args.model_path or BUNDLED_MODEL_NAME
        tm = TokenizerManager(ports, tokenizer, info, lambda: liveness_check(procs), args.max_logprobs)
        tm.metrics = Metrics(name)
        state = ServerState(args=args, tm=tm, info=info, served_model_name=name, metrics=tm.metrics,
                            api_key=args.api_key, max_body_size=args.max_request_body_size)
        logger.info(
            "model %s, dtype %s, context length %d, KV cache %d tokens (%s), max running requests %d",
            name, info["dtype"], info["context_length"], info["max_total_num_tokens"], info["kv_dtype"],
            info["max_running_requests"],
        )
        raise_open_files_limit(args.http_max_connections)
        config = uvicorn.Config(create_app(state), host=args.host, port=args.port, loop="uvloop",
                                http=guarded_protocol(args.http_header_timeout, args.http_max_connections),
                                timeout_keep_alive=args.timeout_keep_alive, log_level="warning",
                                timeout_graceful_shutdown=5, access_log=False)
        server = DrainingServer(config, state)

        async def run() -> None:
            tm.start()
            tasks = [asyncio.ensure_future(server.monitor()), asyncio.ensure_future(warm_up(state, server))]
            try:
                await server.serve()
            finally:
                for t in tasks:
                    t.cancel()
                await tm.close()

        asyncio.run(run())
        if not server.started and server.exit_code == 0:
            return 1  # could not bind the port (uvicorn logged why)
        return server.exit_code
    finally:
        stop_backend(ports, procs)
        logger.info("radixserve stopped")


def main(argv: list[str] | None = None) -> int:
    server_args = ServerArgs.from_cli_or_exit(build_parser().parse_args(argv))
    configure_logging(server_args.log_level, "server")
    return serve(server_args)


if __name__ == "__main__":
    sys.exit(main())
