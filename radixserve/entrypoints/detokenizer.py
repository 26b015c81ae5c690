"""The detokenizer process: token ids in, text increments out. Stop strings and stop regexes are
found here, where the text is (request_text.py); partial UTF-8 and possible stop-string prefixes are
held back while streaming."""

from __future__ import annotations

import logging
import traceback

import zmq

from radixserve import ipc_codec
from radixserve.ipc import PortArgs, pull_socket, push_socket
from radixserve.messages import AbortReq, BatchOut, ReqOutput
from radixserve.request_text import RequestText
from radixserve.server_args import ServerArgs
from radixserve.utils.logging import configure_logging
from radixserve.utils.process import die_with_parent, ignore_sigterm

logger = logging.getLogger("radixserve.detokenizer")


class Detokenizer:
    """Token ids in, text out. A request that a stop string or stop regex ends is ended here: its
    output is cut at the stop's token, and the scheduler (which decodes no text) is told to stop it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[str, RequestText] = {}
        # ended here while the scheduler still ran them: their later outputs are dropped, and their
        # last one (the scheduler letting go) is reported in BatchOut.released
        self.ended: set[str] = set()

    def process_batch(self, batch: BatchOut) -> tuple[BatchOut, list[str]]:
        """The batch with its text, and the requests the scheduler must stop."""
        outputs: list[ReqOutput] = []
        released: list[str] = []
        for out in batch.outputs:
            if out.rid in self.ended:
                if out.finish_reason is not None:
                    self.ended.discard(out.rid)
                    released.append(out.rid)
                continue
            outputs.append(self.process(out))
        to_stop = [out.rid for out in outputs if out.scheduler_holds]
        self.ended.update(to_stop)
        return BatchOut(outputs, released + batch.released), to_stop

    def process(self, out: ReqOutput) -> ReqOutput:
        if self.tokenizer is None:  # a config-only model (dummy weights): token ids, no text
            return out
        text = self.texts.get(out.rid)
        if text is None:
            text = self.texts[out.rid] = RequestText(self.tokenizer, out)
        ids = out.new_token_ids
        matched = (out.finish_reason or {}).get("matched")
        if isinstance(matched, int) and not text.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]  # a matched stop token is not part of the text
        kept = text.add(ids)
        if text.hit is not None or text.error is not None:
            self._end_here(out, text, kept)
        else:
            out.text = text.take(final=out.finish_reason is not None)
        if out.finish_reason is not None:
            del self.texts[out.rid]
        return out

    @staticmethod
    def _end_here(out: ReqOutput, text: RequestText, kept: int) -> None:
        """The request ends at the kept-th of this output's tokens: the rest are not its output."""
        dropped = len(out.new_token_ids) - kept
        if dropped > 0:
            out.new_token_ids = out.new_token_ids[:kept]
            out.completion_tokens -= dropped
            n = len(out.output_token_logprobs)
            out.output_token_logprobs = out.output_token_logprobs[: max(n - dropped, 0)]
            out.output_top_logprobs = out.output_top_logprobs[: max(n - dropped, 0)]
        out.scheduler_holds = out.finish_reason is None
        if text.error is not None:  # the client's pattern: its error
            out.finish_reason = {"type": "abort", "message": text.error, "status_code": 400}
        else:
            assert text.hit is not None
            out.finish_reason = {"type": "stop", "matched": text.hit.matched}
        out.text = text.take(final=True)


def run_detokenizer_process(args: ServerArgs, ports: PortArgs, tokenizer_source) -> None:
    die_with_parent()
    ignore_sigterm()
    configure_logging(args.log_level, "detokenizer")
    try:
        from radixserve.loader.tokenizer import load_tokenizer

        detok = Detokenizer(load_tokenizer(tokenizer_source, trust_remote_code=args.trust_remote_code))
        ctx = zmq.Context.instance()
        recv = pull_socket(ctx, ports.detokenizer_input)
        send = push_socket(ctx, ports.tokenizer_input)
        to_scheduler = push_socket(ctx, ports.scheduler_input)
        while True:
            batch = ipc_codec.recv(recv)
            if isinstance(batch, BatchOut):
                done, to_stop = detok.process_batch(batch)
                if to_stop:  # first, so that the scheduler lets them go as early as it can
                    ipc_codec.send(to_scheduler, AbortReq(to_stop, message="ended by a stop string"))
                ipc_codec.send(send, done)
            elif batch is not None:
                logger.error("unexpected message %s", type(batch).__name__)
    except Exception:
        logger.error("detokenizer crashed:\n%s", traceback.format_exc())
        raise SystemExit(1) from None
