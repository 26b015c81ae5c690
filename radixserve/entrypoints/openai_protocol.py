"""Pydantic schemas of the OpenAI-compatible API (the fields radixserve honours) and the native /generate."""

from __future__ import annotations

import types
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from radixserve.entrypoints.requests import Bootstrap
from radixserve.sampling_params import INT64_MAX
from radixserve.utils.text import lone_surrogate_at

# Numbers must be JSON numbers: lax pydantic would take `true` as 1 (a token id!) and "0.7" as 0.7.
# A StrictFloat still takes an integer.
Int = StrictInt
Float = StrictFloat


def _expect(description: str) -> WrapValidator:
    """One error saying what a union field takes, instead of pydantic's one per union member."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", "must be {expected}", {"expected": description}) from None

    return WrapValidator(check)


TokenIds = Annotated[list[Int], _expect("a list of token ids (integers)")]
Prompt = Annotated[
    str | list[str] | list[Int] | list[list[Int]],
    _expect("a string, a list of strings, a list of token ids (integers) or a list of such lists"),
]
InputIds = Annotated[list[Int] | list[list[Int]], _expect("a list of token ids (integers) or a list of such lists")]


class InvalidText(ValueError):
    """A string of the request is not valid Unicode; `param` is its path in the body."""

    def __init__(self, path: list[str | int], char: str, in_key: bool = False) -> None:
        self.param = ".".join(str(p) for p in path) or "body"
        where = "an object key of " if in_key else ""
        super().__init__(
            f"{where}{self.param} has a lone UTF-16 surrogate ({char!r}), which is not valid Unicode text"
        )


def _lone_surrogate(s: str) -> str | None:
    at = lone_surrogate_at(s)
    return None if at is None else s[at]


def check_unicode(data: Any) -> None:
    """Raise InvalidText for the first string or object key holding a lone surrogate (JSON "\\ud800"
    parses to one): the tokenizer, grammar compiler and stop checker cannot take such text."""
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]  # no recursion: nesting depth is the client's
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            char = _lone_surrogate(value)
            if char is not None:
                raise InvalidText(path, char)
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                char = _lone_surrogate(key) if isinstance(key, str) else None
                if char is not None:
                    raise InvalidText(path, char, in_key=True)
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, i]) for i, item in reversed(list(enumerate(value))))


def _accepts_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return _accepts_none(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return any(_accepts_none(a) for a in get_args(annotation))
    return False


@cache
def _defaulted(cls: type[BaseModel]) -> frozenset[str]:
    """The keys (aliases) of cls's optional fields that do not take null themselves: for those a null
    stands for the default. Fields typed `X | None` keep their null (completions' max_tokens: null is
    "up to the context length", as in vLLM, not the default 16)."""
    return frozenset(
        f.alias or name for name, f in cls.model_fields.items()
        if not f.is_required() and not _accepts_none(f.annotation)
    )


class _Lenient(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do; known fields are type-checked.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        # The OpenAI spec lets clients send null for optional fields (SDKs do): null means "not
        # given", i.e. the default. A required field stays required.
        if not isinstance(data, dict):
            return data
        defaulted = _defaulted(cls)
        return {k: v for k, v in data.items() if v is not None or k not in defaulted}


class _Request(_Lenient):
    """A whole request body."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk too (with include_usage)


class JsonSchemaFormat(_Lenient):
    name: str = "schema"
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    # structural_tag (SGLang's extension, xgrammar's format): the whole object goes to xgrammar
    format: dict[str, Any] | None = None
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class _Bootstrapped(_Request):
    """The fields a PD router adds (SGLang's): where the decode server finds the request's prefill.
    One value each, or lists with one entry per prompt (or per sample of chat's n)."""

    bootstrap_host: str | list[str] | None = None
    bootstrap_port: Int | list[Int | None] | None = None
    bootstrap_room: Int | list[Int] | None = None

    def bootstrap(self) -> Bootstrap | None:
        if self.bootstrap_host is None and self.bootstrap_room is None and self.bootstrap_port is None:
            return None
        return Bootstrap(self.bootstrap_host, self.bootstrap_port, self.bootstrap_room)


class SamplingExtras(_Bootstrapped):
    """Fields shared by completions and chat: OpenAI's, plus the extras vLLM and SGLang accept."""

    model: str | None = None
    n: Int = 1
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = None
    min_p: Float | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    repetition_penalty: Float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_regex: str | list[str] | None = None  # SGLang's
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool = False
    min_tokens: Int = 0
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, Float] | None = None  # JSON object keys are strings; SamplingParams parses them


class CompletionRequest(SamplingExtras):
    prompt: Prompt
    max_tokens: Int | None = 16
    echo: bool = False
    logprobs: Int | None = None
    suffix: str | None = None
    best_of: Int | None = None


class ContentPart(_Lenient):
    type: str
    text: str | None = None  # required for type "text" (openai_serving says so, with the path)


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingExtras):
    messages: list[ChatMessage]
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Tool calling needs a tool-call parser, which radixserve does not have: named so that a request
    # asking for tools is refused rather than answered as if it had not asked (openai_serving.py).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


class GenerateRequest(_Bootstrapped):
    """Native /generate (SGLang's schema)."""

    text: str | list[str] | None = None
    input_ids: InputIds | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    # one value for every prompt, or a list with one per prompt (SGLang's)
    return_logprob: bool | list[bool] = False
    top_logprobs_num: Int | list[Int] = 0
    logprob_start_len: Int | list[Int | None] | None = None
    return_text_in_logprobs: bool = False
    # SGLang's logprobs of chosen token ids at every position: not computed by radixserve, so refused
    token_ids_logprob: list[Int] | list[list[Int]] | None = None
    rid: str | list[str] | None = None


class TokenizeRequest(_Request):
    model: str | None = None
    text: str | list[str] | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: InputIds
    skip_special_tokens: bool = True


class AbortRequest(_Request):
    rid: str = ""  # "" (or abort_all) aborts every request
    abort_all: bool = False


class ProfileRequest(_Request):
    """/start_profile (SGLang's ProfileReqInput); scheduler/profiler.py says what each field does."""

    output_dir: str | None = None
    num_steps: Annotated[Int, Field(le=INT64_MAX)] | None = None  # the message to the scheduler holds 64 bits
    activities: list[str] | None = None
    with_stack: bool | None = None
    record_shapes: bool | None = None
    profile_prefix: str | None = None
    # SGLang's, not built: refused when set
    start_step: Int | None = None
    profile_by_stage: bool = False
    merge_profiles: bool = False


# Names of the schema classes: pydantic puts a union member's name into an error's location
# (prompt.list[str].0), which the error reply leaves out (http_server.py).
MODEL_NAMES: frozenset[str] = frozenset(
    name for name, obj in list(globals().items()) if isinstance(obj, type) and issubclass(obj, BaseModel)
)
