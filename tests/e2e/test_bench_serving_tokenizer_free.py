"""bench_serving --tokenize-prompt against a real server on a config-only model (tiny-llama, dummy
weights, no tokenizer): token-id prompts in, token ids and empty text out."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from radixserve.bench import serving_dataset
from radixserve.bench.bench_serving import main
from radixserve.bench.serving_dataset import sample_random_token_requests
from tests.e2e.server_utils import REPO, start_server

TINY = os.path.join(REPO, "radixserve", "configs", "tiny-llama")
VOCAB = 512  # tiny-llama's config.json


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = str(tmp_path_factory.mktemp("server") / "server.log")
    srv = start_server(["--model-path", TINY, "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
                        "--max-total-tokens", "4096"], log)
    yield srv
    assert srv.stop() == 0, srv.log()


def test_server_streams_ids_without_text(server):
    """The format the bench relies on: cumulative output_ids and completion_tokens, empty text."""
    chunks = []
    body = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}, "stream": True}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    assert chunks and all(c["text"] == "" for c in chunks)
    assert chunks[-1]["meta_info"]["completion_tokens"] == len(chunks[-1]["output_ids"]) == 4
    assert httpx.get(server.url + "/get_server_info", timeout=30).json()["vocab_size"] == VOCAB


def test_bench_serving_tokenize_prompt_end_to_end(server, tmp_path, monkeypatch):
    def no_tokenizer(name: str | None) -> None:
        raise AssertionError("--tokenize-prompt must load no tokenizer")

    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", no_tokenizer)
    out_file = tmp_path / "serving.jsonl"
    argv = ["--base-url", server.url, "--backend", "radixserve", "--tokenize-prompt", "--num-prompts", "8",
            "--random-input-len", "48", "--random-output-len", "8", "--random-range-ratio", "0.5",
            "--max-concurrency", "4", "--disable-tqdm", "--output-file", str(out_file)]
    assert main(argv) == 0
    record = json.loads(out_file.read_text())
    rows = sample_random_token_requests(VOCAB, 8, 48, 8, 0.5, seed=1)
    assert (record["completed"], record["failed"], record["errors"]) == (8, 0, [])
    assert record["vocab_size"] == VOCAB and record["tokenize_prompt"] is True
    assert record["input_lens"] == [r.prompt_len for r in rows]
    assert record["output_lens"] == [r.output_len for r in rows]  # ignore_eos: every output as long as asked
    assert 0 < record["mean_ttft_ms"] <= record["mean_e2e_ms"]
    # the mean, not the median: SSE events that share one network read are timed microseconds apart, so
    # on a loaded machine most gaps can round to 0.00 ms while the waits between reads still count
    assert record["mean_itl_ms"] > 0 and record["output_throughput"] > 0


def test_bench_serving_shared_prefix_hits_the_radix_cache(server, tmp_path, monkeypatch):
    """A few generated-shared-prefix requests, one at a time: every prompt after its group's first finds
    the group's system prompt in the radix cache, and the bench reads that from meta_info.cached_tokens."""

    def no_tokenizer(name: str | None) -> None:
        raise AssertionError("--tokenize-prompt must load no tokenizer")

    monkeypatch.setattr(serving_dataset, "load_bench_tokenizer", no_tokenizer)
    out_file = tmp_path / "serving.jsonl"
    argv = ["--base-url", server.url, "--backend", "radixserve", "--tokenize-prompt",
            "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2",
            "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "32", "--gsp-question-len", "4",
            "--gsp-output-len", "2", "--max-concurrency", "1", "--disable-tqdm",
            "--output-file", str(out_file)]
    assert main(argv) == 0
    record = json.loads(out_file.read_text())
    assert (record["completed"], record["failed"], record["input_lens"]) == (6, 0, [36] * 6)
    # 2 groups x 2 later prompts x 32 system-prompt tokens; a first prompt may match a stray token or two
    assert 4 * 32 <= record["total_cached_tokens"] <= 4 * 32 + 4
    assert record["cache_hit_rate"] == pytest.approx(record["total_cached_tokens"] / (6 * 36))
