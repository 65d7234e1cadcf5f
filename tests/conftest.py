"""Shared fixtures: the tiny offline Qwen2-Audio, built once per test session."""

import logging
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is a folder of scripts, not a package

import model as M  # noqa: E402
import train  # noqa: E402
from data import Sample  # noqa: E402
from workshop.demo import build_tiny, make_synthetic  # noqa: E402

# Two threads for one pytest process on the 2-core machine the suite is sized for; one each under pytest-xdist
# (-n 2), where two workers with two threads each would oversubscribe the cores.
torch.set_num_threads(1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else 2)


class LoggedDeprecations(logging.Handler):
    """transformers announces some deprecations only through its logger (reading `output.past_key_values`,
    for one): each becomes a FutureWarning, which pytest.ini's filters turn into the calling test's error."""

    def emit(self, record):
        if re.search(r"deprecat|will be removed", record.getMessage(), re.I):
            warnings.warn(record.getMessage(), FutureWarning, stacklevel=2)


logging.getLogger("transformers").addHandler(LoggedDeprecations(logging.WARNING))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2-Audio with a 10 s mel window."""
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0, window_seconds=10)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, processor) in fp32 and eval mode. Tests must not change its weights."""
    model, processor = M.load(tiny_dir, dtype=torch.float32)
    return model.eval(), processor


def pitch_samples(n):
    """n synthetic questions and their noise clips of 1 to 3 s (different lengths, so padding matters)."""
    rng = np.random.default_rng(0)
    choices = ["very low", "low", "high", "very high"]
    samples = [Sample(f"clip{i}.wav", "What is the pitch of the tone in the audio?", choices, choices[i % 4], {})
               for i in range(n)]
    audios = [(0.1 * rng.standard_normal(16000 * (1 + i % 3))).astype(np.float32) for i in range(n)]
    return samples, audios


@pytest.fixture(scope="session")
def tiny2_dir(tmp_path_factory):
    """A tiny Qwen2-Audio with a 2 s mel window, as the demo uses (faster than 10 s)."""
    return build_tiny(tmp_path_factory.mktemp("tiny2") / "model", seed=0, window_seconds=2)


@pytest.fixture(scope="session")
def pitch_task(tmp_path_factory):
    """A small synthetic pitch task: (train.jsonl, test.jsonl) with 32 and 8 questions."""
    return make_synthetic(tmp_path_factory.mktemp("pitch"), n_train=32, n_test=8, seed=0)


def quick_args(model_dir, pitch_task, out, *extra):
    """train.py flags for a run of seconds: 4 prompts x 4 completions of up to 12 tokens, fp32."""
    train_jsonl, _ = pitch_task
    return ["--model", str(model_dir), "--data", str(train_jsonl), "--out", str(out), "--max-steps", "2",
            "--prompts-per-step", "4", "--micro-batch", "2", "--group-size", "4", "--max-new-tokens", "12",
            "--lr", "1e-3", "--dtype", "float32", "--seed", "0", "--no-gradient-checkpointing", *extra]


@pytest.fixture(scope="session")
def warm_dir(tiny2_dir, pitch_task, tmp_path_factory):
    """The tiny model after a short format warm start (max_steps 0: warm start, checkpoint-0, stop).
    It answers in the right format some of the time, so rewards differ within groups."""
    out = tmp_path_factory.mktemp("warm")
    train.main(quick_args(tiny2_dir, pitch_task, out, "--max-steps", "0", "--warm-start-steps", "15",
                          "--warm-start-lr", "1e-2"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return out / "checkpoint-0"
