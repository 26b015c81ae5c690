"""The detokenizer process: token ids in, text increments out (stop strings trimmed, partial UTF-8
and possible stop-string prefixes held back while streaming)."""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

import zmq

from radixserve import ipc_codec
from radixserve.detokenize import IncrementalDetokenizer, StopRegexTimeout, find_stop, find_stop_regex
from radixserve.ipc import PortArgs, pull_socket, push_socket
from radixserve.messages import BatchOut, ReqOutput
from radixserve.server_args import ServerArgs
from radixserve.utils.logging import configure_logging
from radixserve.utils.process import die_with_parent, ignore_sigterm

logger = logging.getLogger("radixserve.detokenizer")
# characters of a stream held back while a stop_regex could still match them (a longer match that
# starts earlier may already have been sent when it completes)
REGEX_HOLDBACK = 32


@dataclass
class DetokState:
    decoder: IncrementalDetokenizer
    emitted: int = 0  # characters already sent
    ids_added: int = 0
    stop_floor: int = 0  # characters no stop string may end in (the tokens under min_new_tokens)


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, DetokState] = {}

    def process(self, out: ReqOutput) -> ReqOutput:
        if self.tokenizer is None:  # a config-only model (dummy weights): token ids, no text
            return out
        state = self.states.get(out.rid)
        if state is None:
            state = DetokState(IncrementalDetokenizer(
                self.tokenizer, None, out.skip_special_tokens, out.spaces_between_special_tokens
            ))
            self.states[out.rid] = state
        ids = out.new_token_ids
        reason = out.finish_reason or {}
        matched = reason.get("matched")
        if isinstance(matched, int) and not out.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]  # a matched stop token is not part of the text
        floor_tokens = out.min_new_tokens - 1  # as the scheduler's StopChecker counts them
        if (out.stop_strings or out.stop_regexes) and state.ids_added < floor_tokens and ids:
            under = ids[: floor_tokens - state.ids_added]
            state.decoder.add(under)
            state.ids_added += len(under)
            ids = ids[len(under):]
            if state.ids_added >= floor_tokens:
                state.stop_floor = len(state.decoder.text)
        if ids:
            state.decoder.add(ids)
            state.ids_added += len(ids)
        if out.finish_reason is not None:
            # the request's whole text: a trailing incomplete character decodes as U+FFFD, as
            # tokenizer.decode(output_ids) gives, streaming or not
            state.decoder.flush()
        text = state.decoder.text
        if out.finish_reason is not None:
            if isinstance(matched, str) and not out.no_stop_trim:
                if matched in out.stop_regexes:
                    try:
                        hit = find_stop_regex(text, [matched], end_after=state.stop_floor)
                    except StopRegexTimeout:  # the scheduler's search of this text ended in time
                        hit = None
                else:
                    hit = find_stop(text, out.stop_strings, end_after=state.stop_floor)
                if hit is not None:
                    text = text[: hit[0]]
            end = len(text)
            del self.states[out.rid]
        else:
            end = len(text)
            if out.stop_strings:
                hit = find_stop(text, out.stop_strings, state.emitted, state.stop_floor)
                # hold back what could be the start of a stop string (none can end before the floor)
                held = max(end - (max(map(len, out.stop_strings)) - 1), min(end, state.stop_floor))
                end = hit[0] if hit is not None else held
            if out.stop_regexes:
                # a regex has no prefix test: a non-streaming request's text waits for its end (it
                # is sent only then anyway); a stream holds back its last REGEX_HOLDBACK characters
                end = min(end, end - REGEX_HOLDBACK if out.stream else state.emitted)
        out.text = text[state.emitted : max(end, state.emitted)]
        state.emitted = max(end, state.emitted)
        return out


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
        while True:
            batch = ipc_codec.recv(recv)
            if isinstance(batch, BatchOut):
                ipc_codec.send(send, BatchOut([detok.process(o) for o in batch.outputs]))
            elif batch is not None:
                logger.error("unexpected message %s", type(batch).__name__)
    except Exception:
        logger.error("detokenizer crashed:\n%s", traceback.format_exc())
        raise SystemExit(1) from None
