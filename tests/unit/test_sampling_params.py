from __future__ import annotations

import pytest

from radixserve.sampling_params import SamplingParams, SamplingParamsError


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.min_new_tokens == 0
    assert p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == -1 and p.min_p == 0.0
    assert p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 and p.repetition_penalty == 1.0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False and p.n == 1 and p.seed is None
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True
    assert p.no_stop_trim is False
    assert not p.is_greedy
    assert SamplingParams.from_dict(None) == p
    assert SamplingParams.from_dict({}) == p


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("top_k", -2),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", 3.0),
        ("repetition_penalty", 0.0),
        ("max_new_tokens", -1),
        ("min_new_tokens", -1),
        ("n", 0),
        ("stop", [""]),
        ("stop", ""),
        ("stop_token_ids", [-1]),
        ("temperature", float("nan")),
        ("top_p", float("inf")),
    ],
)
def test_range_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams.from_dict({field: value})
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_top_p_message() -> None:
    with pytest.raises(SamplingParamsError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_min_new_tokens_above_max() -> None:
    with pytest.raises(SamplingParamsError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
    assert SamplingParams(max_new_tokens=None, min_new_tokens=500).min_new_tokens == 500
    assert SamplingParams(max_new_tokens=5, min_new_tokens=5).min_new_tokens == 5


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "hot"),
        ("temperature", True),
        ("top_k", True),
        ("top_k", 2.0),
        ("max_new_tokens", "10"),
        ("max_new_tokens", False),
        ("n", 1.5),
        ("seed", "42"),
        ("seed", True),
        ("ignore_eos", 1),
        ("skip_special_tokens", "yes"),
        ("no_stop_trim", 0),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop_token_ids", 7),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", [True]),
    ],
)
def test_type_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams.from_dict({field: value})


@pytest.mark.parametrize("field", ["top_p", "min_new_tokens", "spaces_between_special_tokens", "temperature",
                                   "top_k", "ignore_eos", "n", "repetition_penalty"])
def test_null_from_json_is_the_default(field: str) -> None:
    # SGLang reads a null sampling parameter as "not given"; built in Python, None is still a type error
    assert SamplingParams.from_dict({field: None}) == SamplingParams()
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**{field: None})


def test_null_max_new_tokens_keeps_its_meaning() -> None:
    assert SamplingParams.from_dict({"max_new_tokens": None}).max_new_tokens is None  # up to the context


def test_sglang_spellings() -> None:
    assert SamplingParams.from_dict({"sampling_seed": 7}).seed == 7
    assert SamplingParams.from_dict({"sampling_seed": 7, "seed": 3}).seed == 3
    assert SamplingParams.from_dict({"custom_params": {"a": 1}}) == SamplingParams()
    with pytest.raises(SamplingParamsError, match="custom_params"):
        SamplingParams.from_dict({"custom_params": [1]})
    assert SamplingParams.from_dict({"stream_interval": 4}).stream_interval == 4
    for bad in (0, 1.5, "2", True):
        with pytest.raises(SamplingParamsError, match="stream_interval"):
            SamplingParams.from_dict({"stream_interval": bad})


def test_unknown_key() -> None:
    with pytest.raises(SamplingParamsError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_not_a_dict() -> None:
    with pytest.raises(SamplingParamsError):
        SamplingParams.from_dict([("temperature", 0.5)])  # type: ignore[arg-type]


def test_error_is_value_error() -> None:
    assert issubclass(SamplingParamsError, ValueError)


def test_normalization() -> None:
    p = SamplingParams.from_dict({"temperature": 1, "top_k": 0, "stop": "###", "stop_token_ids": (5, 6)})
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert p.top_k == -1
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 6]
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(max_new_tokens=None).max_new_tokens is None
    assert SamplingParams(max_new_tokens=0).max_new_tokens == 0


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy


def test_to_dict_round_trip() -> None:
    p = SamplingParams(
        max_new_tokens=7,
        temperature=0.5,
        top_k=40,
        stop=["\n\n"],
        stop_token_ids=[3],
        seed=11,
        frequency_penalty=0.5,
    )
    d = p.to_dict()
    assert d["temperature"] == 0.5 and d["stop"] == ["\n\n"] and d["seed"] == 11
    assert SamplingParams.from_dict(d) == p
    d["stop"].append("x")  # the dict holds copies, not the request's lists
    assert p.stop == ["\n\n"]


@pytest.mark.parametrize("field, value", [
    ("stop", "\ud800"),
    ("stop", ["ok", "a\udc80b"]),
    ("regex", "\ud800"),
    ("ebnf", 'root ::= "\ud800"'),
    ("json_schema", '{"enum": ["\ud800"]}'),
])
def test_text_that_is_not_unicode_is_refused(field: str, value: object) -> None:
    # a lone surrogate cannot be encoded to UTF-8: refused here, never sent to the scheduler
    with pytest.raises(SamplingParamsError, match=f"{field} must be valid Unicode text") as info:
        SamplingParams.from_dict({field: value})
    assert info.value.param == field


def test_errors_carry_the_field_as_param() -> None:
    cases = {
        "max_new_tokens": {"max_new_tokens": -1},
        "min_new_tokens": {"max_new_tokens": 2, "min_new_tokens": 3},
        "temperature": {"temperature": "hot"},
        "stop": {"stop": [""]},
        "stop_token_ids": {"stop_token_ids": [-1]},
        "logit_bias": {"logit_bias": {"x": 1}},
        "regex": {"regex": "(("},
    }
    for field, d in cases.items():
        with pytest.raises(SamplingParamsError) as info:
            SamplingParams.from_dict(d)
        assert info.value.param == field, d
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"regex": "a", "ebnf": 'root ::= "a"'})
    assert info.value.param is None  # about two fields


@pytest.mark.parametrize("key", ["+1", " 1", "1_0", "\u0661", "-1", "1.0", True])
def test_logit_bias_keys_are_plain_token_ids(key: object) -> None:
    with pytest.raises(SamplingParamsError, match="logit_bias keys"):
        SamplingParams.from_dict({"logit_bias": {key: 1}})
    assert SamplingParams.from_dict({"logit_bias": {"12": 1, 7: -1}}).logit_bias == {12: 1.0, 7: -1.0}
