"""Prompts for bench_serving: the tokenizer that measures them and the datasets that make them.

Only the `random` dataset exists today; another (sharegpt, ...) is one more DatasetFn in DATASETS plus
the flags it reads. A dataset gets a PromptSource: a tokenizer (text prompts), or under --tokenize-prompt
a TokenVocab (token-id prompts, no tokenizer anywhere).
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable
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


def random_prompt(tokenizer: Tokenizer, target: int, ids: list[int], rng: random.Random) -> tuple[str, int]:
    """Text that re-encodes to `target` tokens or as close as MAX_LENGTH_ROUNDS gets; returns it and its
    real token count.

    Decoding random ids and encoding the text again rarely gives the same ids (neighbours merge or split),
    so each round trims the re-encoding to `target` or pads it with fresh random ids and tries again.
    """
    draft = rng.choices(ids, k=target)
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


def _random_dataset(args: argparse.Namespace, source: PromptSource, num_prompts: int, seed: int) -> list[DatasetRow]:
    lengths = (num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio, seed)
    if isinstance(source, TokenVocab):
        return sample_random_token_requests(source.size, *lengths)
    return sample_random_requests(source, *lengths)


DatasetFn = Callable[[argparse.Namespace, PromptSource, int, int], list[DatasetRow]]
DATASETS: dict[str, DatasetFn] = {"random": _random_dataset}


def get_dataset(args: argparse.Namespace, source: PromptSource, num_prompts: int, seed: int) -> list[DatasetRow]:
    """`num_prompts` rows of dataset `args.dataset_name`, drawn with `seed`: text rows from a tokenizer,
    token-id rows from a TokenVocab."""
    return DATASETS[args.dataset_name](args, source, num_prompts, seed)
