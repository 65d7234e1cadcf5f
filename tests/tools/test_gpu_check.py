"""tools/gpu_check.py on a machine without a GPU: it exits at once, its arithmetic is right by hand, and
its checks run end to end on the CPU with the tiny model (the figures mean nothing there: this finds
broken code, not slow kernels).

Run: python -m pytest -q tests/tools/test_gpu_check.py
"""

import itertools
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import model as M
from engine import attention
from tools import gpu_check, plan
from workshop import demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))  # tests/engine/, for its helper below
from test_attention import sdpa_on_mask_mod  # noqa: E402


def test_without_cuda_one_line_and_exit_0(monkeypatch, capsys):
    """No CUDA: one line, status 0, and nothing built (Run would raise) and no process group."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "Run", lambda *a, **k: pytest.fail("built a model without CUDA"))
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out
    assert not dist.is_initialized()


def test_gpu_figures_by_name(monkeypatch):
    """Vendor figures by device name, first match wins (H100 PCIe before H100, the 40 GB A100 before
    A100); an unknown GPU needs both flags."""
    assert gpu_check.gpu_spec("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert gpu_check.gpu_spec("NVIDIA H100 PCIe") == (2.0e12, 756e12)
    assert gpu_check.gpu_spec("NVIDIA H200") == (4.8e12, 989e12)
    assert gpu_check.gpu_spec("NVIDIA A100-SXM4-40GB") == (1.555e12, 312e12)
    assert gpu_check.gpu_spec("NVIDIA A100-SXM4-80GB") == (2.0e12, 312e12)
    assert gpu_check.gpu_spec("Tesla T4") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(M.UsageError, match="--hbm-tbps and --peak-tflops"):
        gpu_check.hardware(gpu_check.parse([]), "cuda")
    assert gpu_check.hardware(gpu_check.parse(["--hbm-tbps", "0.3", "--peak-tflops", "65"]), "cuda") == (0.3e12, 65e12)


def test_decode_bound_by_hand():
    """The 7B at R1-AQA's lengths, 8 rows, a cache of 850 + 256 slots, on 3.35 TB/s.
    A decoder layer: q, k, v 3 * (4096^2 + 4096) + o 4096^2 + MLP 3 * 4096 * 11008 + 2 norms * 4096
    = 202,395,648; 32 of them + lm_head 156032 * 4096 = 639,107,072, in bf16:
    (6,476,660,736 + 639,107,072) * 2 = 14,231,535,616 bytes.
    KV cache: 2 * 32 layers * 4096 * 1106 slots * 8 rows * 2 bytes = 4,638,900,224 bytes.
    Bound: 8 * 3.35e12 / 18,870,435,840 = 1420.2 tokens/s."""
    counts, sizes = plan.count_model(plan.config_7b())
    assert counts["lm_layer"] == 202_395_648
    weights, cache = gpu_check.decode_bytes(counts, sizes, rows=8, cache_len=850 + 256)
    assert (weights, cache) == (14_231_535_616, 4_638_900_224)
    assert abs(gpu_check.decode_bound(weights, cache, 8, 3.35e12) - 1420.21) < 0.01


def test_bus_bandwidth_by_hand():
    """1 GB in 10 ms over 8 GPUs: 100 GB/s of algorithm bandwidth, 7/8 of it on each link: 87.5 GB/s."""
    assert gpu_check.bus_bandwidth(1e9, 0.01, 8) == pytest.approx(87.5e9)


def test_few_layers_keep_the_7b_widths():
    """2 + 2 layers: the 7B's widths, heads and vocabulary; 30 decoder layers (202,395,648 each) and
    30 audio layers (q, v, out 1280^2 + 1280, k 1280^2, 2 layer norms 2 * 1280, fc1 1280 * 5120 + 5120,
    fc2 5120 * 1280 + 1280: 19,676,160 each) fewer than the 7B's 8,397,094,912: 1,734,940,672."""
    config = gpu_check.few_layer_config(2, 2, audio_token_id=7)
    big = plan.config_7b()
    assert config.text_config.num_hidden_layers == 2 and len(config.text_config.layer_types) == 2
    assert config.audio_config.encoder_layers == 2 and config.audio_token_index == 7
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(config.text_config, name) == getattr(big.text_config, name)
    assert config.audio_config.d_model == big.audio_config.d_model
    counts, _ = plan.count_model(config)
    assert counts["total"] == 8_397_094_912 - 30 * 202_395_648 - 30 * 19_676_160 == 1_734_940_672


def test_packed_flops_count_only_visible_pairs():
    """Against the dense count, the useful FLOPs miss exactly 4 * hidden * layers * (L^2 - visible):
    at P = 850, G = 8, T = 256, L = 2898, visible = 850^2 / 2 + 8 * (256 * 850 + 256^2 / 2) = 361,250 + 8 * 250,368
    = 2,364,194: 4 * 4096 * 32 * (8,398,404 - 2,364,194) = 3,163,663,892,480."""
    counts, sizes = plan.count_model(plan.config_7b())
    useful = gpu_check.packed_flops(counts, sizes, 8, 850, 256)
    dense = sum(plan.pass_flops(counts, sizes, 8, 850, 256, packed=True, attention="dense"))
    assert dense - useful == 4 * 4096 * 32 * (2898**2 - 2_364_194) == 3_163_663_892_480


def test_checks_run_on_the_cpu(monkeypatch):
    """Every single-GPU check on the tiny model (2 s window), with the CUDA calls made no-ops, every
    timing a single call, and a stand-in flex kernel (the CPU has no flex backward). Sanity only: the
    sections print, the byte counts are decode_bytes', and flex and dense agree as they must."""
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 1),
                        ("max_memory_allocated", 2)]:
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value, **k: v)
    ticks = itertools.count(1)  # a "time" that grows, so that differences of times are not 0
    monkeypatch.setattr(gpu_check, "seconds", lambda fn, *args, repeats=0: (fn(*args), float(next(ticks)))[1])
    monkeypatch.setattr(attention, "flex_kernel", sdpa_on_mask_mod([]))
    tokenizer = demo.build_tokenizer()
    config = demo.tiny_config(tokenizer, window_seconds=2)
    M.init_distributed(always=True)
    try:
        args = gpu_check.parse(["--group-size", "2", "--new-tokens", "4"])
        run = gpu_check.Run(args, "cpu", config, tokenizer, seconds=2)
        memory, r = gpu_check.check_memory(run, world=1)
        out = "\n".join([memory, gpu_check.check_decode(run, r, 1e12), gpu_check.check_forward(run, r, 1e12),
                         gpu_check.check_attention(run, r), gpu_check.check_packing(run, r)])
    finally:
        dist.destroy_process_group()
    assert all(re.search(rf"^  {phase} ", out, re.M) for phase in ("rollout", "reference", "policy", "optimizer"))
    weights, cache = gpu_check.decode_bytes(*plan.count_model(config), 2, len(r.prompt_ids[0]) + 4)
    assert f"{weights / 1e9:.2f} GB of weights + {cache / 1e9:.2f} GB of KV cache" in out
    logp_diff, grad_diff = map(float, re.search(r"max \|d logp\| (\S+), max \|d grad\| (\S+)", out).groups())
    assert logp_diff < 0.05 and grad_diff < 1e-2  # bf16 reference, fp32 master through bf16 compute
    assert float(re.search(r"separate forwards, max \|d logp\| (\S+)", out).group(1)) < 0.1
