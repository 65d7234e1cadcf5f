"""recipes/lora.py: a fresh adapter is the base model, merging is exact, only adapters train, the adapters-off
switch is the base model, adapter files round-trip in PEFT's layout, and FSDP2 on two processes with a
whole frozen base per rank trains the same adapters as one process."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import AutoConfig

import lora_checks as C
import model as M
from conftest import pitch_samples
from engine import packed
from recipes import lora as L

ROOT = Path(__file__).resolve().parents[2]
ALL_TARGETS = L.LoRASettings(rank=4, alpha=8.0, targets=L.LM_TARGETS + ("lm_head",), audio=True)


def lora_model(model_dir, settings):
    """A fresh fp32 LoRA model with init_adapters' values loaded."""
    model, processor = M.load(model_dir, dtype=torch.float32)
    L.apply_lora(model, settings.rank, settings.alpha, settings.dropout, settings.targets, settings.audio)
    missing = model.load_state_dict(L.init_adapters(model, settings.seed), strict=False).missing_keys
    assert not any(L.is_adapter_key(k) for k in missing)
    return model.eval(), processor


@dataclass
class Trained:
    """The one-process run of lora_checks: the base, the LoRA model after its steps, and its groups."""
    base: nn.Module
    model: nn.Module
    processor: object
    rollouts: list
    with_grad: list

    def logprobs(self, model):
        pad = self.processor.tokenizer.pad_token_id
        with torch.no_grad():
            return torch.cat([packed.completion_logprobs(model, r, pad) for r in self.rollouts])  # [N, T]


@pytest.fixture(scope="module")
def trained(tiny2_dir):
    base, _ = M.load(tiny2_dir, dtype=torch.float32)
    model, processor = lora_model(tiny2_dir, C.SETTINGS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank, so the two-process comparison sees fewer roundings
    try:
        rollouts = [C.sample_group(model, processor, i) for i in range(C.PROMPTS)]
        with_grad = C.train(model, rollouts, processor.tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    return Trained(base.eval(), model.eval(), processor, rollouts, with_grad)


def test_fresh_adapters_are_exactly_the_base_model(tiny, tiny_dir):
    """B starts at zero, so a fresh LoRA model (every kind of target: attention, MLP, lm_head, audio
    encoder) gives bit-identical logits to the base model, although A is not zero."""
    base, processor = tiny
    model, _ = lora_model(tiny_dir, ALL_TARGETS)
    assert model.lm_head.lora_A.abs().min() > 0 and model.model.audio_tower.layers[0].fc1.lora_A.abs().min() > 0
    batch = M.collate(processor, *pitch_samples(2))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)


def test_init_does_not_depend_on_device_or_order(tiny_dir):
    """init_adapters gives the same values for a model on the meta device and on the CPU: A ~ U(-1/sqrt(in),
    1/sqrt(in)) (PEFT's kaiming-uniform, a = sqrt(5)), B = 0; another seed gives another A."""
    meta = M.meta_model(AutoConfig.from_pretrained(tiny_dir))
    names = L.apply_lora(meta, 4, 8.0, audio=True)
    cpu, _ = lora_model(tiny_dir, L.LoRASettings(rank=4, alpha=8.0, audio=True))
    a, b, other = L.init_adapters(meta, 0), cpu.state_dict(), L.init_adapters(meta, 1)
    assert sorted(a) == sorted(f"{n}.{x}" for n in names for x in ("lora_A", "lora_B"))
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
        if key.endswith("lora_A"):
            bound = value.shape[1] ** -0.5  # fan_in = in_features
            assert value.abs().max() <= bound and value.abs().max() > 0.9 * bound
            assert not torch.equal(value, other[key])
        else:
            assert not value.any()


def test_merged_weights_give_the_adapter_logprobs(trained, tmp_path):
    """After training (B != 0), W + (alpha/r) B A saved as a plain Hugging Face checkpoint and reopened
    by from_pretrained gives the adapter path's log-probs within 5e-6 (fp32), while the adapters moved
    the log-probs away from the base by far more than that."""
    merged = L.merged_state_dict(trained.model.state_dict(), C.SETTINGS)
    assert not any(L.is_adapter_key(k) for k in merged) and merged.keys() == trained.base.state_dict().keys()
    trained.model.save_pretrained(tmp_path, state_dict=merged)  # as train.py saves a checkpoint
    trained.processor.save_pretrained(tmp_path)
    reopened, _ = M.load(tmp_path, dtype=torch.float32)
    adapter, merged_logp, base = (trained.logprobs(m) for m in (trained.model, reopened, trained.base))
    assert (adapter - base).abs().max() > 1e-2
    assert (adapter - merged_logp).abs().max() < 5e-6  # measured 4.8e-7: the float sums of W x and B (A x) differ


def test_only_adapters_are_trained(trained):
    """The parameters that require grad, that had a gradient, and so reach an optimizer built from
    requires_grad parameters, are exactly the adapters; every base tensor is unchanged after training."""
    adapters = sorted(k for k in trained.model.state_dict() if L.is_adapter_key(k))
    assert len(adapters) == 2 * (2 * 6 + 2 * 7)  # A and B; 2 encoder layers x 6, 2 decoder layers x 7
    assert sorted(n for n, p in trained.model.named_parameters() if p.requires_grad) == adapters
    assert sorted(trained.with_grad) == adapters
    state = trained.model.state_dict()
    for key, value in trained.base.state_dict().items():
        assert torch.equal(state[key], value), key


def test_adapters_disabled_is_exactly_the_base_model(trained):
    """Inside adapters_disabled the trained model gives the base model's log-probs bit for bit; after it
    the adapters are on again and give the same log-probs as before."""
    before = trained.logprobs(trained.model)
    with L.adapters_disabled(trained.model):
        assert torch.equal(trained.logprobs(trained.model), trained.logprobs(trained.base))
    assert all(m.enabled for _, m in L.lora_modules(trained.model))
    assert torch.equal(trained.logprobs(trained.model), before)
    assert not torch.equal(before, trained.logprobs(trained.base))


def test_bad_settings_raise_clear_errors(tiny_dir):
    """A target that names no linear layer, a rank <= 0, a dropout outside [0, 1) and a second
    apply_lora are ValueErrors that name the problem."""
    model = M.meta_model(AutoConfig.from_pretrained(tiny_dir))
    with pytest.raises(ValueError, match=r"'qkv_proj' matches no linear layer.*q_proj"):
        L.apply_lora(model, 8, 16, targets=("q_proj", "qkv_proj"))
    with pytest.raises(ValueError, match=r"'out_proj' matches no linear layer"):  # an encoder-only name
        L.apply_lora(model, 8, 16, targets=("out_proj",))
    for rank in (0, -4):
        with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank}"):
            L.apply_lora(model, rank, 16)
    with pytest.raises(ValueError, match="dropout must be in"):
        L.apply_lora(model, 8, 16, dropout=1.0)
    assert not L.lora_modules(model)  # nothing was wrapped by the failed calls
    L.apply_lora(model, 8, 16)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        L.apply_lora(model, 8, 16)


def test_dropout_acts_on_the_adapter_input_in_training_only():
    """With dropout p, training-mode outputs are random and differ from eval mode, whose output is
    exactly base(x) + scaling * B A x; with B = 0 dropout changes nothing."""
    torch.manual_seed(0)
    layer = L.LoRALinear(nn.Linear(16, 8), rank=2, alpha=4.0, dropout=0.5)
    x = torch.randn(4, 16)
    assert torch.equal(layer.train()(x), layer.eval()(x))  # B == 0
    nn.init.normal_(layer.lora_B)
    expected = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert torch.allclose(layer.eval()(x), expected, atol=1e-6)
    a, b = layer.train()(x), layer(x)
    assert not torch.equal(a, b) and not torch.allclose(a, expected, atol=1e-3)


def test_adapter_files_round_trip_in_peft_layout(trained, tiny2_dir, tmp_path):
    """save_adapters writes PEFT's layout: keys base_model.model.<module>.lora_{A,B}.weight and a
    target_modules regex that full-matches exactly the wrapped modules (as PEFT selects them) of the
    plain model. load_adapters gives back the same tensors and settings, and loading them into a fresh
    LoRA model gives the trained model's log-probs bit for bit."""
    settings = replace(ALL_TARGETS, targets=("v_proj", "q_proj", "lm_head"))
    model, _ = lora_model(tiny2_dir, settings)
    wrapped = sorted(n for n, _ in L.lora_modules(model))
    L.save_adapters(tmp_path, L.adapter_state_dict(model), settings, base_model=tiny2_dir)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    plain = [n for n, _ in trained.base.named_modules()]
    assert sorted(n for n in plain if re.fullmatch(config["target_modules"], n)) == wrapped
    tensors, loaded = L.load_adapters(tmp_path)
    assert loaded == replace(settings, targets=("q_proj", "v_proj", "lm_head"))  # in LoRASettings' order
    # the trained adapters of the default targets
    L.save_adapters(tmp_path / "trained", L.adapter_state_dict(trained.model), C.SETTINGS)
    tensors, loaded = L.load_adapters(tmp_path / "trained")
    assert loaded == C.SETTINGS
    fresh, _ = lora_model(tiny2_dir, loaded)
    assert fresh.load_state_dict(tensors, strict=False).unexpected_keys == []
    assert torch.equal(trained.logprobs(fresh), trained.logprobs(trained.model))


def test_bad_adapter_file_names_the_file(tmp_path):
    """An adapter_config.json of another PEFT method is refused with the file's path."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: not a plain LoRA adapter \(peft_type 'IA3'\)"):
        L.load_adapters(tmp_path)


def test_two_processes_train_the_same_adapters(trained, tiny2_dir, tmp_path):
    """FSDP2 on two processes (gloo, gradient checkpointing on): each rank all-gathers only the adapters
    during a rollout (gathered bytes == adapter bytes), keeps the frozen base as a plain tensor identical
    on both ranks and to the checkpoint, gets gradients only on adapters, and after STEPS AdamW steps on
    the split batch has the one-process adapters within 1e-6 (fp32)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "recipes" / "lora_checks.py"), str(tiny2_dir), str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=300)
    ranks = torch.load(tmp_path / "checks.pt", weights_only=True)
    reference = trained.base.state_dict()
    adapters = sorted(k for k in trained.model.state_dict() if L.is_adapter_key(k))
    for rank, (result, base) in enumerate(ranks):
        assert result["completions"] == trained.rollouts[rank].completion_ids.tolist()
        assert result["base_plain"] and result["gathered_bytes"] == result["adapter_bytes"]
        assert result["units"] == 5  # 2 encoder + 2 decoder layers and model.model; lm_head has nothing to train
        assert sorted(result["with_grad"]) == adapters
        assert base.keys() == reference.keys() and all(torch.equal(base[k], reference[k]) for k in base)
    tensors, settings = L.load_adapters(tmp_path / "adapters")
    assert settings == C.SETTINGS and sorted(tensors) == adapters
    state = trained.model.state_dict()
    assert max((tensors[k] - state[k]).abs().max().item() for k in adapters) < 1e-6
