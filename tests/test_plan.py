"""Tests for plan.py: the 7B's parameter count, hand-derived memory rows, the fits verdict, FLOPs.

Run: python -m pytest -q tests/test_plan.py
"""

import pytest

import model as qwen
import plan

P7B = 8_397_094_912


@pytest.fixture(scope="module")
def config():
    return qwen.config_7b()


@pytest.fixture(scope="module")
def rows(config):
    """The default plan (8 GPUs, 1 prompt x G=8, 850 + 256 tokens, beta 0.04), by row name."""
    return {r.name: r.bytes for r in plan.memory_plan(config).rows}


def test_7b_parameter_count(config):
    """The meta model has the 7B's 8,397,094,912 parameters: audio 0.637e9 + projector 5.2e6 +
    LM 7.116e9 + lm_head 0.639e9."""
    counts = plan.param_counts(qwen.meta_model(config))
    assert counts["total"] == P7B == plan.PARAMS_7B
    assert counts["lm_head"] == 4096 * 156032 == 639_107_072
    assert counts["lm_layers"] == 32 * counts["lm_layer"]


def test_sharded_state_rows(rows):
    """fp32 master and gradient shards: 8,397,094,912 * 4 / 8 = 4,198,547,456 bytes each;
    AdamW twice that; the bf16 reference shard half of it: 8,397,094,912 * 2 / 8 = 2,099,273,728."""
    assert rows["master weights fp32 (shard)"] == 4_198_547_456
    assert rows["gradients fp32 (shard)"] == 4_198_547_456
    assert rows["AdamW exp_avg + exp_avg_sq"] == 8_397_094_912
    assert rows["reference weights bf16 (shard)"] == 2_099_273_728


def test_rollout_rows(rows):
    """bf16 weights: 8,397,094,912 * 2 = 16,794,189,824. KV cache: 2 (k, v) * 32 layers
    * (32 kv heads * 128) * (850 + 256) tokens * 8 completions * 1 prompt * 2 bytes
    = 262,144 * 1106 * 16 = 4,638,900,224."""
    assert rows["weights bf16, gathered for sampling"] == 16_794_189_824
    assert rows["KV cache"] == 4_638_900_224


def test_logit_rows(rows):
    """fp32 logits only at completion positions: 8 completions * 256 tokens * 156,032 vocab * 4 bytes
    = 1,278,214,144; the log_softmax copy and the gradient are the same size."""
    assert rows["logits fp32 (completion positions)"] == 1_278_214_144
    assert rows["log_softmax copy (saved)"] == 1_278_214_144
    assert rows["LM checkpoints"] == 32 * (850 + 8 * 256) * 4096 * 2  # layers * packed tokens * hidden * bf16


def test_no_reference_without_kl(config):
    """beta = 0 needs no reference model: its row is 0 and the step has no reference pass."""
    no_kl = {r.name: r.bytes for r in plan.memory_plan(config, beta=0).rows}
    assert no_kl["reference weights bf16 (shard)"] == 0
    assert plan.step_flops(config, beta=0)["reference"] == 0


def test_fits_on_8_gpus_not_on_1(config):
    """8 x 80 GiB fits (about 38 GiB per GPU); 1 GPU cannot even hold the unsharded optimizer state
    (8.4e9 * (4 + 4 + 8 + 2) bytes = 141 GiB)."""
    assert plan.memory_plan(config, gpus=8, gpu_mem_gb=80).fits
    assert not plan.memory_plan(config, gpus=1, gpu_mem_gb=80).fits


def test_total_is_state_plus_larger_phase(config):
    """total = state + max(rollout, train), and the verdict flips exactly at the total."""
    p = plan.memory_plan(config)
    phase = lambda name: sum(r.bytes for r in p.rows if r.phase == name)
    assert p.total == phase("state") + max(phase("rollout"), phase("train"))
    assert plan.memory_plan(config, gpu_mem_gb=p.total / plan.GIB).fits
    assert not plan.memory_plan(config, gpu_mem_gb=p.total / plan.GIB - 0.01).fits
    assert "fits in 80 GiB" in plan.format_plan(p)


def test_lm_flops_per_token(config):
    """One token, no attention, no logits: 2 FLOPs per decoder parameter = 2 * 6,476,660,736."""
    p, s = plan.param_counts(qwen.meta_model(config)), plan.shapes(config)
    assert plan.lm_flops(p, s, tokens=1, pairs=0, logit_positions=0) == 2 * 6_476_660_736


def test_step_flops(config):
    """Policy = 4 passes with checkpointing, 3 without; packing costs less than G separate sequences;
    the 7B step at R1-AQA settings is a few PFLOP."""
    ours = plan.step_flops(config)
    assert ours["policy"] == 4 * ours["rollout"] == 4 * ours["reference"]
    assert plan.step_flops(config, checkpointing=False)["policy"] == 3 * ours["rollout"]
    assert ours["total"] < plan.step_flops(config, packed=False)["total"]
    assert 3e15 < ours["total"] < 6e15
