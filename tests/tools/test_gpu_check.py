"""tools/gpu_check.py on a machine without a GPU: it exits at once, its arithmetic is right by hand, and
every section runs end to end on the CPU with tiny models and the CUDA calls stood in (the figures mean
nothing there: this finds broken code, not slow kernels).

Run: python -m pytest -q tests/tools/test_gpu_check.py
"""

import itertools
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

import model as M
from engine import attention
from recipes import omni
from tools import gpu_check, plan
from workshop import demo


def sdpa_on_mask_mod(query, key, value, block_mask, scale):
    """A stand-in for the flex kernel with a backward on the CPU: sdpa over the BlockMask's own mask_mod."""
    B, _, L, _ = query.shape
    mask = create_mask(block_mask.mask_mod, B, 1, L, L, device=query.device)  # [B, 1, L, L]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          enable_gqa=query.size(1) != key.size(1))


def test_without_cuda_one_line_and_exit_0(monkeypatch, capsys):
    """No CUDA: one line, status 0, nothing checked (check would raise) and no process group."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "check", lambda *a, **k: pytest.fail("checked without CUDA"))
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
    fc2 5120 * 1280 + 1280: 19,676,160 each) fewer than the 7B's 8,397,094,912: 1,734,940,672. The tiny
    tokenizer's <|AUDIO|> id. Without full_vocab the vocabulary is the tokenizer's. Omni's thinker builds too,
    with its own widths (3584, 28 heads, 4 KV heads) and the tokenizer's ids for its multimodal tokens."""
    tokenizer = demo.build_tokenizer()
    config = gpu_check.few_layer_config("qwen2-audio", tokenizer)
    big = plan.config_7b()
    assert config.text_config.num_hidden_layers == 2 and len(config.text_config.layer_types) == 2
    assert config.audio_config.encoder_layers == 2
    assert config.audio_token_index == tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(config.text_config, name) == getattr(big.text_config, name)
    assert config.audio_config.d_model == big.audio_config.d_model
    counts, _ = plan.count_model(config)
    assert counts["total"] == 8_397_094_912 - 30 * 202_395_648 - 30 * 19_676_160 == 1_734_940_672
    small = gpu_check.few_layer_config("qwen2-audio", tokenizer, full_vocab=False)
    assert small.text_config.vocab_size == len(tokenizer) and small.text_config.hidden_size == 4096
    omni_tok = demo.build_tokenizer(special_tokens=omni.OMNI.special_tokens, named_tokens=omni.OMNI.named_tokens)
    thinker = gpu_check.few_layer_config("omni", omni_tok, full_vocab=False)
    text = thinker.text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers,
            thinker.audio_config.encoder_layers) == (3584, 28, 4, 2, 2)
    assert thinker.audio_token_id == omni_tok.convert_tokens_to_ids("<|AUDIO|>")
    assert plan.count_model(thinker)[0]["lm_layers"] == 2 * plan.count_model(plan.config_7b("omni"))[0]["lm_layer"]


def test_the_advice_arithmetic_by_hand():
    """A save of 6 GB in 30 s scales to the 7B's 117,543,968,768 bytes as 30 * 117.54 / 6 = 587.7 s = 9.8 min;
    the timeout keeps twice that, rounded up (20), but never less than the one given (30). The largest
    setting that fits: 4 of {1: 10, 2: 20, 4: 40, 8: 80} in 50; none in 5."""
    minutes, timeout = gpu_check.timeout_minutes(30, 6e9, 117_543_968_768, 30)
    assert minutes == pytest.approx(30 * 117.543968768 / 6 / 60) and timeout == 30
    assert gpu_check.timeout_minutes(30, 6e9, 117_543_968_768, 10)[1] == 20
    assert gpu_check.largest_fit({1: 10, 2: 20, 4: 40, 8: 80}, 50) == 4
    assert gpu_check.largest_fit({1: 10, 2: 20}, 5) is None


def test_packed_flops_count_only_visible_pairs():
    """Against the dense count, the useful FLOPs miss exactly 4 * hidden * layers * (L^2 - visible):
    at P = 850, G = 8, T = 256, L = 2898, visible = 850^2 / 2 + 8 * (256 * 850 + 256^2 / 2) = 361,250 + 8 * 250,368
    = 2,364,194: 4 * 4096 * 32 * (8,398,404 - 2,364,194) = 3,163,663,892,480."""
    counts, sizes = plan.count_model(plan.config_7b())
    useful = gpu_check.packed_flops(counts, sizes, 8, 850, 256)
    dense = sum(plan.pass_flops(counts, sizes, 8, 850, 256, packed=True, attention="dense"))
    assert dense - useful == 4 * 4096 * 32 * (2898**2 - 2_364_194) == 3_163_663_892_480


def test_every_section_runs_on_the_cpu(monkeypatch, capsys, tmp_path):
    """Every section main runs (gpu_check.SECTIONS, in order) on tiny models of both families (2 s windows), with
    the CUDA calls stood in (no-ops, fixed memory figures, an H100's name and 80 GiB), every timing a single
    call, a stand-in flex kernel (the CPU has no flex backward) and the flex compile's backend stood in by
    dynamo's eager one (a compiled CPU kernel takes ~20 s a shape). Sanity only, no figure means anything: every
    section passes its own criteria, the table lists them all, the work folder is gone and the advice names the
    three settings."""
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 1),
                        ("max_memory_allocated", 2), ("get_device_name", "NVIDIA H100 80GB HBM3"),
                        ("get_device_properties", SimpleNamespace(total_memory=80 * 2**30))]:
        monkeypatch.setattr(torch.cuda, name, lambda *a, v=value, **k: v)
    ticks = itertools.count(1)  # a "time" that grows, so that differences of times are not 0
    monkeypatch.setattr(gpu_check, "seconds", lambda fn, *args, repeats=0: (fn(*args), float(next(ticks)))[1])
    monkeypatch.setattr(attention, "flex_kernel", sdpa_on_mask_mod)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(
        fn, **kwargs, **({"backend": "eager"} if fn is flex_attention else {})))
    attention.compiled_flex.cache_clear()
    args = gpu_check.parse(["--out", str(tmp_path), "--group-size", "2", "--new-tokens", "8"])
    M.init_distributed(always=True)
    try:
        results = gpu_check.check(args, "cpu", lambda family, tok, full: demo.TINY_CONFIGS[family](tok, window_seconds=2),
                                  seconds=2)
    finally:
        attention.compiled_flex.cache_clear()
        dist.destroy_process_group()
    out = capsys.readouterr().out
    assert [r.name for r in results] == [name for name, _ in gpu_check.SECTIONS]
    assert [(r.name, r.detail) for r in results if not r.passed] == []
    assert all(re.search(rf"^{name} +PASS ", out, re.M) for name, _ in gpu_check.SECTIONS)
    assert "--micro-batch 2: the plan x 1.00" in out and "--keep-last" in out and "--dist-timeout-minutes" in out
    assert not (tmp_path / "gpu-check").exists()
