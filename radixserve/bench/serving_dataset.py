"""Prompts for bench_serving: the tokenizer that measures them and the datasets that make them.

Datasets: `random` (independent random prompts) and `generated-shared-prefix` (groups of prompts that
share a random system prompt, SGLang's). Another (sharegpt, ...) is one more DatasetFn in DATASETS plus
the flags it reads. A dataset gets a PromptSource: a tokenizer (text prompts), or under --tokenize-prompt
a TokenVocab (token-id prompts, no tokenizer anywhere).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Rounds of decode -> re-encode -> trim/pad. With the bundled SmolLM2 tokenizer, 500 random prompts of
# 1..512 tokens all re-encode to exactly the target after at most 2 rounds; more rounds are a safety net.
MAX_LENGTH_ROUNDS = 8


class Tokenizer(Protocol):
    """The slice of a transformers tokenizer the bench uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class TokenVocab:
    """What --tokenize-prompt draws prompts from instead of a tokenizer: ids in [0, size)."""

    size: int


PromptSource = Tokenizer | TokenVocab


@dataclass
class DatasetRow:
    prompt: str  # "" for a token-id row
    prompt_len: int  # tokens of `prompt` re-encoded by the bench tokenizer (or len(input_ids)), no specials
    output_len: int  # tokens asked for (max_tokens / max_new_tokens)
    input_ids: list[int] | None = None  # the prompt as token ids (--tokenize-prompt); sent instead of text
    group: int | None = None  # generated-shared-prefix: the index of the system prompt the row starts with
    prefix_len: int = 0  # leading tokens shared with the other rows of its group (the system prompt's)


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def load_bench_tokenizer(name: str | None) -> Any:
    """None or the bundled model's name -> the bundled SmolLM2 tokenizer; a .gguf file -> its embedded
    tokenizer; anything else -> transformers AutoTokenizer (a folder with tokenizer files)."""
    from radixserve.loader.bundled import is_bundled_name
    from radixserve.loader.tokenizer import load_gguf_tokenizer, load_tokenizer

    if is_bundled_name(name):
        from radixserve.loader.source import resolve_model_source

        return load_tokenizer(resolve_model_source(None))
    assert name is not None
    if os.path.isfile(name) and name.lower().endswith(".gguf"):
        return load_gguf_tokenizer(name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def sampling_ids(tokenizer: Tokenizer) -> list[int]:
    """Token ids a random prompt may use: the whole vocabulary but special and added tokens, so no
    prompt carries an EOS or a chat marker the server would treat specially."""
    excluded = set(getattr(tokenizer, "all_special_ids", None) or [])
    excluded.update(getattr(tokenizer, "added_tokens_decoder", None) or {})
    ids = [i for i in range(len(tokenizer)) if i not in excluded]
    if not ids:
        raise ValueError("the tokenizer has no ordinary token ids to build random prompts from")
    return ids


def random_lengths(num: int, length: int, range_ratio: float, rng: random.Random) -> list[int]:
    """Lengths uniform over the integers in [length * range_ratio, length] (SGLang's --random-range-ratio;
    1.0 means every length is exactly `length`), never below 1."""
    low = max(1, int(length * range_ratio))
    return [rng.randint(low, length) for _ in range(num)]


def random_prompt(
    tokenizer: Tokenizer, target: int, ids: list[int], rng: random.Random, first: int | None = None
) -> tuple[str, int]:
    """Text that re-encodes to `target` tokens or as close as MAX_LENGTH_ROUNDS gets; returns it and its
    real token count. `first`, if given, is the first id of the draft (the re-encoding may still change it).

    Decoding random ids and encoding the text again rarely gives the same ids (neighbours merge or split),
    so each round trims the re-encoding to `target` or pads it with fresh random ids and tries again.
    """
    draft = rng.choices(ids, k=target)
    if first is not None and draft:
        draft[0] = first
    best_text, best_len = "", -1
    for _ in range(MAX_LENGTH_ROUNDS):
        text = tokenizer.decode(draft)
        got = tokenizer.encode(text, add_special_tokens=False)
        if best_len < 0 or abs(len(got) - target) < abs(best_len - target):
            best_text, best_len = text, len(got)
        if len(got) == target:
            break
        draft = got[:target] if len(got) > target else got + rng.choices(ids, k=target - len(got))
    return best_text, best_len


def sample_random_requests(
    tokenizer: Tokenizer,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
) -> list[DatasetRow]:
    """`num_prompts` random-token prompts; the same arguments (and tokenizer) give the same rows."""
    rng = random.Random(seed)
    input_lens = random_lengths(num_prompts, input_len, range_ratio, rng)
    output_lens = random_lengths(num_prompts, output_len, range_ratio, rng)
    ids = sampling_ids(tokenizer)
    rows = []
    for n_in, n_out in zip(input_lens, output_lens):
        prompt, prompt_len = random_prompt(tokenizer, n_in, ids, rng)
        rows.append(DatasetRow(prompt, prompt_len, n_out))
    return rows


def sample_random_token_requests(
    vocab_size: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
) -> list[DatasetRow]:
    """`num_prompts` prompts of uniform random ids in [0, vocab_size), each exactly as long as drawn (no
    text round trip). Lengths come from the rng first, as in sample_random_requests, so one seed gives
    both modes the same lengths."""
    if vocab_size < 1:
        raise ValueError(f"the vocabulary size must be >= 1; got {vocab_size}")
    rng = random.Random(seed)
    input_lens = random_lengths(num_prompts, input_len, range_ratio, rng)
    output_lens = random_lengths(num_prompts, output_len, range_ratio, rng)
    # no special ids are left out: a prompt id is never decoded or parsed as a chat marker on the server
    ids = range(vocab_size)
    return [DatasetRow("", n_in, n_out, rng.choices(ids, k=n_in)) for n_in, n_out in zip(input_lens, output_lens)]


# ---- generated-shared-prefix ---------------------------------------------------------------------
GSP_SEPARATOR = "\n\n"  # between a text system prompt and its question, as SGLang joins them
MAX_PREFIX_ROUNDS = 8  # draws of a text group whose prompts must all keep the system prompt's tokens


@dataclass(frozen=True)
class SharedPrefixShape:
    """SGLang's generated-shared-prefix workload (its --gsp-* flags and defaults): `num_groups` random
    system prompts, each followed by `prompts_per_group` random questions of their own. `range_ratio`
    spreads every length as --random-range-ratio does (1.0, the default, makes them exact)."""

    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    range_ratio: float = 1.0

    @property
    def num_requests(self) -> int:
        return self.num_groups * self.prompts_per_group


@dataclass
class _GroupPlan:
    count: int  # rows to return
    system_lens: list[int]  # per group
    question_lens: list[list[int]]  # per group, per row
    output_lens: list[list[int]]


def _plan_groups(shape: SharedPrefixShape, num_prompts: int | None, rng: random.Random) -> _GroupPlan:
    """Lengths for the groups that `num_prompts` rows need (all of them when None): the warm-up asks for a
    few rows and should not pay for drawing the whole workload."""
    count = shape.num_requests if num_prompts is None else min(num_prompts, shape.num_requests)
    per = shape.prompts_per_group
    groups = -(-count // per)
    # an empty system prompt is allowed (SGLang's PD recipe uses one); random_lengths never gives 0
    system_lens = [0] * groups
    if shape.system_prompt_len > 0:
        system_lens = random_lengths(groups, shape.system_prompt_len, shape.range_ratio, rng)
    questions = random_lengths(groups * per, shape.question_len, shape.range_ratio, rng)
    outputs = random_lengths(groups * per, shape.output_len, shape.range_ratio, rng)
    split = [slice(g * per, (g + 1) * per) for g in range(groups)]
    return _GroupPlan(count, system_lens, [questions[s] for s in split], [outputs[s] for s in split])


def _distinct_firsts(ids: Sequence[int], k: int, rng: random.Random) -> list[int]:
    """First ids for a group's `k` questions, all different while the vocabulary allows, so the prompts
    share the system prompt (and, as text, the separator) and nothing of the questions."""
    firsts = rng.sample(ids, min(k, len(ids)))
    return firsts + rng.choices(ids, k=k - len(firsts))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_many(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`texts` encoded without special tokens; a transformers tokenizer takes them as one batch (a fast one
    spreads it over the cores: the whole default workload is 1024 prompts of ~2200 tokens)."""
    if callable(tokenizer):
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _text_group(
    tokenizer: Tokenizer, group: int, system_len: int, question_lens: list[int], output_lens: list[int],
    ids: list[int], rng: random.Random,
) -> list[DatasetRow]:
    """One group's text rows: system prompt, GSP_SEPARATOR, question.

    The server encodes each prompt whole, so the system prompt's tokens must survive what follows them
    (in some tokenizers trailing punctuation or spaces merge with the newlines); a group where they do
    not is drawn again, up to MAX_PREFIX_ROUNDS times. `prefix_len` is what really survived."""
    rows: list[DatasetRow] = []
    for _ in range(MAX_PREFIX_ROUNDS):
        system = random_prompt(tokenizer, system_len, ids, rng)[0] if system_len else ""
        system_ids = tokenizer.encode(system, add_special_tokens=False) if system else []
        firsts = _distinct_firsts(ids, len(question_lens), rng)
        questions = [random_prompt(tokenizer, n, ids, rng, f)[0] for n, f in zip(question_lens, firsts)]
        prompts = [f"{system}{GSP_SEPARATOR}{q}" if system else q for q in questions]
        rows = [
            DatasetRow(prompt, len(got), out_len, group=group, prefix_len=common_prefix(got, system_ids))
            for prompt, got, out_len in zip(prompts, encode_many(tokenizer, prompts), output_lens)
        ]
        if all(r.prefix_len == len(system_ids) for r in rows):
            break
    return rows


def sample_shared_prefix_requests(
    tokenizer: Tokenizer, shape: SharedPrefixShape, seed: int, num_prompts: int | None = None
) -> list[DatasetRow]:
    """The generated-shared-prefix rows as text, shuffled (as SGLang does) with the rng of `seed`: the same
    arguments (and tokenizer) give the same rows. `num_prompts` (default: all of them) takes that many
    rows from only the groups they need."""
    rng = random.Random(seed)
    plan = _plan_groups(shape, num_prompts, rng)
    ids = sampling_ids(tokenizer)
    rows: list[DatasetRow] = []
    for g, system_len in enumerate(plan.system_lens):
        rows += _text_group(tokenizer, g, system_len, plan.question_lens[g], plan.output_lens[g], ids, rng)
    rng.shuffle(rows)
    return rows[: plan.count]


def sample_shared_prefix_token_requests(
    vocab_size: int, shape: SharedPrefixShape, seed: int, num_prompts: int | None = None
) -> list[DatasetRow]:
    """sample_shared_prefix_requests as token ids in [0, vocab_size): every length exact, each prompt the
    group's system prompt ids followed by its question ids."""
    if vocab_size < 1:
        raise ValueError(f"the vocabulary size must be >= 1; got {vocab_size}")
    rng = random.Random(seed)
    plan = _plan_groups(shape, num_prompts, rng)
    ids = range(vocab_size)
    rows: list[DatasetRow] = []
    for g, system_len in enumerate(plan.system_lens):
        system = rng.choices(ids, k=system_len)
        firsts = _distinct_firsts(ids, len(plan.question_lens[g]), rng)
        for q_len, out_len, first in zip(plan.question_lens[g], plan.output_lens[g], firsts):
            prompt = system + [first, *rng.choices(ids, k=q_len - 1)]
            rows.append(DatasetRow("", len(prompt), out_len, prompt, group=g, prefix_len=system_len))
    rng.shuffle(rows)
    return rows[: plan.count]


def shared_prefix_shape(args: argparse.Namespace) -> SharedPrefixShape:
    return SharedPrefixShape(args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
                             args.gsp_question_len, args.gsp_output_len, args.gsp_range_ratio)


def _shared_prefix_dataset(
    args: argparse.Namespace, source: PromptSource, num_prompts: int, seed: int
) -> list[DatasetRow]:
    shape = shared_prefix_shape(args)
    if isinstance(source, TokenVocab):
        return sample_shared_prefix_token_requests(source.size, shape, seed, num_prompts)
    return sample_shared_prefix_requests(source, shape, seed, num_prompts)


def _random_dataset(args: argparse.Namespace, source: PromptSource, num_prompts: int, seed: int) -> list[DatasetRow]:
    lengths = (num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, seed)
    if isinstance(source, TokenVocab):
        return sample_random_token_requests(source.size, *lengths)
    return sample_random_requests(source, *lengths)


DatasetFn = Callable[[argparse.Namespace, PromptSource, int, int], list[DatasetRow]]
DATASETS: dict[str, DatasetFn] = {
    "random": _random_dataset,
    "generated-shared-prefix": _shared_prefix_dataset,
}


def get_dataset(args: argparse.Namespace, source: PromptSource, num_prompts: int, seed: int) -> list[DatasetRow]:
    """`num_prompts` rows of dataset `args.dataset_name`, drawn with `seed`: text rows from a tokenizer,
    token-id rows from a TokenVocab."""
    return DATASETS[args.dataset_name](args, source, num_prompts, seed)
