"""Tests for tools/bench_step.py's measuring pieces, on a smaller setting than the benchmark.

What must hold whatever the machine's speed: ours, the baseline and the ideal compute the same
log-probs, loss and gradients; per phase ours counts fewer FLOPs than the baseline and no fewer
than the ideal; the FLOP counter sees CPU attention; the memory probe sees torch's allocations.
No wall-time assertions.

Run: python -m pytest -q tests/tools/test_bench.py
"""

import pytest
import torch

from tools import bench_step

G, T = 4, 5  # small group, short completions


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tests count, they do not time, and on a shared 2-core machine two
    threads wait on each other at every op (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tiny2_dir):
    """The tiny model with a 2 s window (50 audio tokens), 2 prompts of different lengths, G = 4, 5 tokens."""
    return bench_step.setup(tiny2_dir, group_size=G, new_tokens=T)


def test_without_a_model_the_tiny_one_is_built(tmp_path, monkeypatch):
    """`python -m tools.bench_step` with no model builds the tiny model with a SECONDS (10 s) window
    in .cache on first use: 50 encoder positions a second, so 500."""
    monkeypatch.setattr(bench_step, "REPO", tmp_path)
    small = bench_step.setup(group_size=2, new_tokens=3)
    assert small.model.config.audio_config.max_source_positions == 50 * bench_step.SECONDS == 500
    assert small.rollout.completion_ids.shape == (2 * 2, 3)
    assert any((tmp_path / ".cache").iterdir())


def test_rollout_has_forced_length(bench):
    """Both samplers emit exactly T tokens per completion, so both sides do the same work."""
    assert bench.rollout.completion_ids.shape == (2 * G, T)
    assert bench.rollout.mask.all()
    prompt_len = bench.batch["input_ids"].size(1)
    assert bench_step.baseline_rollout(bench).shape == (2 * G, prompt_len + T)


def test_logprobs_and_loss_agree(bench):
    """Same reference log-probs, policy log-probs and loss from all three sides (fp32, 5e-6)."""
    assert bench_step.check_agreement(bench) < 5e-6  # measured 4.8e-7 (1 or 2 threads)


def test_gradients_agree(bench):
    """The policy phase of ours and of the baseline leave the same gradient on every parameter."""
    grads = {}
    for side in ("ours", "baseline"):
        bench_step.SIDES[side]["policy"](bench)
        grads[side] = [p.grad.clone() for p in bench.model.parameters() if p.grad is not None]
    assert len(grads["ours"]) == len(grads["baseline"]) > 0
    for a, b in zip(grads["ours"], grads["baseline"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("phase", bench_step.PHASES)
def test_ours_between_ideal_and_baseline(bench, phase):
    """Per phase: ideal <= ours < baseline in counted FLOPs."""
    flops = {side: bench_step.count_flops(bench_step.SIDES[side][phase], bench)[0] for side in bench_step.SIDES}
    assert flops["ideal"] <= flops["ours"] < flops["baseline"]


def test_cpu_attention_is_counted():
    """sdpa on CPU runs a kernel FlopCounterMode has no formula for; the mapping counts it dense:
    2 matmuls (q k^T, then p v) of 2 * (b*h) * s_q * s_k * d FLOPs each = 2 * 2 * 2 * 8 * 8 * 4 = 2048."""
    q = torch.randn(1, 2, 8, 4)  # [b, h, s, d]
    flops, _ = bench_step.count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert flops == 2048


def test_peak_memory_sees_torch_allocations():
    """A 4 MB temporary shows up in the peak even though it is freed before the function returns."""
    peak = bench_step.peak_memory(lambda: torch.ones(1000, 1000).sum())
    assert 4_000_000 <= peak < 5_000_000


def test_attention_pairs_at_r1_aqa_lengths():
    """P = 850, G = 8, T = 256, L = 2898. dense: 2898^2 = 8,398,404. visible: the prompt's triangle
    850 * 851 / 2 = 361,675, each completion 256 * 850 + 256 * 257 / 2 = 250,496, so 361,675 +
    8 * 250,496 = 2,365,643. FlexAttention: 178 blocks (plan.visible_blocks) * 128^2 = 2,916,352."""
    pairs = bench_step.attention_pairs(bench_step.r1_aqa_segments())
    assert pairs == {"dense": 8_398_404, "flex": 2_916_352, "visible": 2_365_643}
