"""The scheduler's torch profiler (/start_profile, /stop_profile): one profile at a time, stopping by
itself after num_steps, each rank writing a gzipped Chrome trace named as SGLang names them."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch

from radixserve.messages import ProfileReq
from radixserve.scheduler.profiler import SchedulerProfiler, default_output_dir


def some_work() -> None:
    x = torch.randn(64, 64)
    for _ in range(3):
        x = torch.nn.functional.silu(x @ x.T / 64)


def read_trace(path: str) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def test_profile_of_num_steps_stops_by_itself_and_writes_a_trace(tmp_path):
    prof = SchedulerProfiler(tp_rank=0, dp_rank=None, cuda=False)
    started = prof.start(ProfileReq(True, profile_id="123.5", output_dir=str(tmp_path), num_steps=3))
    assert started.success and prof.running
    due = []
    for _ in range(3):
        some_work()
        due.append(prof.count_step())
    assert due == [False, False, True]  # the caller stops at the third step
    stopped = prof.stop()
    assert stopped.success and not prof.running
    assert os.listdir(tmp_path) == ["123.5-TP-0.trace.json.gz"]
    assert stopped.message == str(tmp_path / "123.5-TP-0.trace.json.gz")
    names = {e.get("name") for e in read_trace(stopped.message)["traceEvents"]}
    assert "aten::mm" in names or "aten::matmul" in names


def test_a_second_start_and_a_stop_without_start_are_refused(tmp_path):
    prof = SchedulerProfiler(tp_rank=1, dp_rank=2, cuda=False)
    assert not prof.stop().success
    assert prof.start(ProfileReq(True, profile_id="7", output_dir=str(tmp_path), profile_prefix="run")).success
    again = prof.start(ProfileReq(True, profile_id="8", output_dir=str(tmp_path)))
    assert not again.success and "already running" in again.message
    assert not prof.count_step()  # no num_steps: runs until stopped
    some_work()
    assert prof.stop().success
    assert os.listdir(tmp_path) == ["run-7-TP-1-DP-2.trace.json.gz"]
    assert read_trace(str(tmp_path / "run-7-TP-1-DP-2.trace.json.gz"))["traceEvents"]
    refused = prof.stop()
    assert not refused.success and "no profile is running" in refused.message


@pytest.mark.parametrize("req, words", [
    (ProfileReq(True, activities=["GPU"]), "GPU needs a CUDA device"),
    (ProfileReq(True, activities=[]), "nothing to record"),
    (ProfileReq(True, activities=["CPU", "MEM"]), "'MEM' not supported"),
    (ProfileReq(True, num_steps=0), "num_steps must be at least 1"),
    (ProfileReq(True, profile_prefix="a/b"), "profile_prefix"),
])
def test_bad_arguments_are_refused_and_start_nothing(tmp_path, req, words):
    req.output_dir = str(tmp_path)
    prof = SchedulerProfiler(0, None, cuda=False)
    reply = prof.start(req)
    assert not reply.success and words in reply.message and not prof.running


def test_gpu_is_dropped_without_cuda_and_cancel_writes_nothing(tmp_path):
    prof = SchedulerProfiler(0, None, cuda=False)
    assert prof.start(ProfileReq(True, activities=["CPU", "GPU"], output_dir=str(tmp_path))).success
    prof.cancel()
    assert not prof.running and os.listdir(tmp_path) == []


def test_an_unwritable_output_dir_is_refused_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    reply = SchedulerProfiler(0, None, cuda=False).start(ProfileReq(True, output_dir=str(blocker / "traces")))
    assert not reply.success


def test_default_output_dir_prefers_sglangs_variable(monkeypatch):
    monkeypatch.delenv("SGLANG_TORCH_PROFILER_DIR", raising=False)
    monkeypatch.delenv("RADIXSERVE_TORCH_PROFILER_DIR", raising=False)
    assert default_output_dir() == "/tmp"
    monkeypatch.setenv("RADIXSERVE_TORCH_PROFILER_DIR", "/ours")
    assert default_output_dir() == "/ours"
    monkeypatch.setenv("SGLANG_TORCH_PROFILER_DIR", "/theirs")
    assert default_output_dir() == "/theirs"
