from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from radixserve.constrained import (
    GrammarBackend,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    allocate_bitmask,
    apply_bitmask,
    validate_spec,
)
from radixserve.loader import config as cfgutil
from radixserve.loader.source import resolve_model_source
from radixserve.loader.tokenizer import load_tokenizer

V = 49152
MAX_STEPS = 200
# maxLength: a model of random logits almost never picks the closing quote out of ~49k allowed tokens.
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
SCHEMA_SPEC = GrammarSpec("json_schema", json.dumps(SCHEMA))
REGEX = "[0-9]{3}-[a-z]{2}"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_source(None))


@pytest.fixture(scope="module")
def eos_ids(tokenizer) -> list[int]:
    return cfgutil.eos_token_ids(resolve_model_source(None).hf_config, tokenizer)


@pytest.fixture(scope="module")
def backend(tokenizer, eos_ids) -> GrammarBackend:
    return GrammarBackend(tokenizer, V, eos_ids)


def allowed_ids(bitmask: torch.Tensor, row: int, vocab: int = V) -> set[int]:
    words = bitmask[row].to(torch.int64) & 0xFFFFFFFF
    bits = (words.unsqueeze(1) >> torch.arange(32)) & 1
    return set(bits.flatten()[:vocab].nonzero().flatten().tolist())


def make_bitmask(rows: list[set[int]], vocab: int) -> torch.Tensor:
    mask = allocate_bitmask(len(rows), vocab)
    mask.zero_()
    for r, ids in enumerate(rows):
        for tid in ids:
            word = int(mask[r, tid // 32]) & 0xFFFFFFFF | (1 << (tid % 32))
            mask[r, tid // 32] = word - (1 << 32) if word >= 1 << 31 else word
    return mask


def generate(
    matcher: GrammarMatcher, seed: int, bias: dict[int, float] | None = None
) -> tuple[list[int], set[int]]:
    """Greedy decoding of a 'model' whose logits are seeded noise (plus an optional per-token bias).

    Returns the tokens and the allowed set at the last step."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = allocate_bitmask(1, V)
    ids: list[int] = []
    allowed: set[int] = set()
    for _ in range(MAX_STEPS):
        if matcher.is_terminated():
            break
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.randn(1, V, generator=gen)
        for tid, b in (bias or {}).items():
            logits[0, tid] += b
        apply_bitmask(logits, bitmask)
        token = int(logits.argmax())
        allowed = allowed_ids(bitmask, 0)
        assert token in allowed
        assert matcher.accept_token(token)
        ids.append(token)
    assert matcher.is_terminated(), f"not terminated after {MAX_STEPS} steps"
    return ids, allowed


def finish(tokenizer, eos_ids: list[int], ids: list[int], last_allowed: set[int]) -> str:
    """The text before the final EOS, which must be the only thing the complete grammar allowed."""
    assert ids[-1] in eos_ids
    assert last_allowed == set(eos_ids)
    return tokenizer.decode(ids[:-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_generation_validates(backend, tokenizer, eos_ids, seed):
    ids, last = generate(backend.new_matcher(SCHEMA_SPEC), seed)
    value = json.loads(finish(tokenizer, eos_ids, ids, last))
    jsonschema.validate(value, SCHEMA)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regex_generation_matches(backend, tokenizer, eos_ids, seed):
    ids, last = generate(backend.new_matcher(GrammarSpec("regex", REGEX)), seed)
    assert re.fullmatch(REGEX, finish(tokenizer, eos_ids, ids, last))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_generation_is_an_object(backend, tokenizer, eos_ids, seed):
    # a model that likes to close strings and objects; pure noise would write one endless key
    closers = {tokenizer.convert_tokens_to_ids(t): 3.0 for t in ('"', "}")}
    ids, last = generate(backend.new_matcher(GrammarSpec("json_object", "")), seed, closers)
    assert isinstance(json.loads(finish(tokenizer, eos_ids, ids, last)), dict)


def test_json_object_forbids_top_level_array(backend, tokenizer):
    bitmask = allocate_bitmask(1, V)
    backend.new_matcher(GrammarSpec("json_object", "")).fill_bitmask(bitmask, 0)
    allowed = allowed_ids(bitmask, 0)
    assert tokenizer.convert_tokens_to_ids("{") in allowed
    assert tokenizer.convert_tokens_to_ids("[") not in allowed


def test_ebnf_and_rejected_token(backend, tokenizer, eos_ids):
    matcher = backend.new_matcher(GrammarSpec("ebnf", 'root ::= "yes" | "no"'))
    assert not matcher.accept_token(tokenizer.convert_tokens_to_ids("{"))
    for tid in tokenizer.encode("no", add_special_tokens=False):
        assert matcher.accept_token(tid)
    assert not matcher.is_terminated()
    assert matcher.accept_token(eos_ids[0])
    assert matcher.is_terminated()
    assert not matcher.accept_token(eos_ids[0])
    bitmask = allocate_bitmask(1, V)
    matcher.fill_bitmask(bitmask, 0)  # after termination: only a stop token
    assert allowed_ids(bitmask, 0) == set(eos_ids)


@pytest.mark.parametrize(
    "spec, field",
    [
        (GrammarSpec("json_schema", '{"type": 5}'), "json_schema"),
        (GrammarSpec("json_schema", '{"type": "object", "properties": 3}'), "json_schema"),
        (GrammarSpec("json_schema", "{not json"), "json_schema"),
        (GrammarSpec("json_schema", "[1]"), "json_schema"),
        (GrammarSpec("regex", "[0-9"), "regex"),
        (GrammarSpec("regex", "(a"), "regex"),
        (GrammarSpec("ebnf", "root ::= foo"), "ebnf"),
        (GrammarSpec("json_object", "{}"), "json_object"),
    ],
)
def test_invalid_spec_raises_naming_field(backend, spec, field):
    for check in (validate_spec, backend.compile):
        with pytest.raises(GrammarError, match=rf"^{field}: ") as info:
            check(spec)
        assert ".cc:" not in str(info.value)  # no C++ source location for clients


def test_unknown_kind():
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        validate_spec(GrammarSpec("xml", "<a/>"))


def test_validate_accepts_valid_specs():
    for spec in (SCHEMA_SPEC, GrammarSpec("json_object", ""), GrammarSpec("regex", REGEX),
                 GrammarSpec("ebnf", 'root ::= "a"+')):
        validate_spec(spec)


def test_from_fields():
    assert GrammarSpec.from_fields() is None
    assert GrammarSpec.from_fields(regex="a+") == GrammarSpec("regex", "a+")
    assert GrammarSpec.from_fields(json_schema={"type": "integer"}) == GrammarSpec(
        "json_schema", '{"type": "integer"}'
    )
    assert GrammarSpec.from_fields(json_object=True) == GrammarSpec("json_object", "")
    with pytest.raises(GrammarError, match="only one of"):
        GrammarSpec.from_fields(regex="a", ebnf='root ::= "a"')


def test_compile_cache_and_lru(tokenizer, eos_ids, backend):
    assert backend.compile(SCHEMA_SPEC) is backend.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    small = GrammarBackend(tokenizer, V + 64, eos_ids, cache_size=2)  # padded model vocab too
    a, b, c = (GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))
    first_a = small.compile(a)
    small.compile(b)
    assert small.compile(a) is first_a  # a is now the most recent: b goes next
    small.compile(c)
    assert small.compile(a) is first_a
    assert small.compile(b) is not None  # recompiled after eviction
    # ids past the tokenizer's vocabulary are never allowed
    bitmask = allocate_bitmask(1, V + 64)
    small.new_matcher(GrammarSpec("json_object", "")).fill_bitmask(bitmask, 0)
    assert max(allowed_ids(bitmask, 0, V + 64)) < V


def test_apply_bitmask_rows():
    vocab = 100
    allowed = [{0, 31, 32, 99}, {5}, {1, 63, 64}]
    bitmask = make_bitmask(allowed, vocab)
    logits = torch.randn(3, vocab)
    before = logits.clone()
    apply_bitmask(logits, bitmask, rows=[0, 2])
    for r in (0, 2):
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[list(allowed[r])] = True
        assert torch.equal(logits[r, keep], before[r, keep])
        assert torch.isneginf(logits[r, ~keep]).all()
    assert torch.equal(logits[1], before[1])  # not in rows: untouched

    apply_bitmask(logits, bitmask, rows=[])  # no constrained rows: no-op
    assert torch.isfinite(logits[1]).all()
    apply_bitmask(logits, bitmask)  # every row
    assert torch.isfinite(logits[1]).sum() == 1 and torch.isfinite(logits[1, 5])


def test_apply_bitmask_full_vocab_matches_matcher(backend):
    bitmask = allocate_bitmask(2, V)
    backend.new_matcher(SCHEMA_SPEC).fill_bitmask(bitmask, 1)
    logits = torch.zeros(2, V)
    apply_bitmask(logits, bitmask, rows=[1])
    assert torch.isfinite(logits[0]).all()
    assert set(torch.isfinite(logits[1]).nonzero().flatten().tolist()) == allowed_ids(bitmask, 1)


def test_apply_bitmask_too_narrow():
    with pytest.raises(ValueError, match="covers"):
        apply_bitmask(torch.zeros(1, 100), allocate_bitmask(1, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_bitmask_cuda():
    vocab = 1000
    allowed = [{0, 31, 999}, {7}]
    bitmask = make_bitmask(allowed, vocab)
    for logits in (torch.randn(2, vocab, device="cuda"), torch.randn(vocab, 2, device="cuda").t()):
        before = logits.clone()
        apply_bitmask(logits, bitmask, rows=[0])
        assert torch.equal(logits[1], before[1])
        finite = set(torch.isfinite(logits[0]).nonzero().flatten().tolist())
        assert finite == allowed[0]


# ---- nesting bound -----------------------------------------------------------------------------
def _nested(levels: int) -> str:
    return '{"type": "object", "properties": {"a": ' * levels + '{"type": "string"}' + "}}" * levels


def test_schemas_nested_past_the_bound_are_refused_before_any_compiler_sees_them():
    from radixserve.constrained.schema import MAX_SCHEMA_DEPTH, json_depth, parse_schema, schema_text
    from radixserve.sampling_params import SamplingParams, SamplingParamsError

    assert json_depth(json.loads(_nested(3))) == 7 and json_depth("x") == 0
    deepest_ok = (MAX_SCHEMA_DEPTH - 1) // 2
    assert json_depth(parse_schema(_nested(deepest_ok))) <= MAX_SCHEMA_DEPTH
    validate_spec(GrammarSpec("json_schema", _nested(deepest_ok)))
    for text in (_nested(deepest_ok + 1), _nested(5000)):  # 5000: json.loads itself would recurse too deep
        with pytest.raises(GrammarError, match="levels"):
            validate_spec(GrammarSpec("json_schema", text))
    deep_object = json.loads(_nested(100))
    with pytest.raises(GrammarError, match="response_format: .*levels"):
        schema_text(deep_object, "response_format")
    with pytest.raises(SamplingParamsError, match="levels") as info:
        SamplingParams(json_schema=deep_object)
    assert info.value.param == "json_schema"
