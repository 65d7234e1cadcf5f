"""LoRA written out by hand (--lora-rank): low-rank adapters on a frozen base, in plain torch.

A frozen linear W [out, in] gets a trainable update: y = W x + (alpha / r) B A x, with A [r, in] and
B [out, r] = 0 at the start, so a fresh adapter is exactly the base model (Hu et al., 2021). LoRALinear
keeps the base layer's own Parameters, so the base keeps its Hugging Face keys; the adapters add
`...q_proj.lora_A` / `.lora_B` in fp32. `LoRA` is what the core calls (train.Recipe.adapters): wrap the
model before sharding, the adapters' first values, the reference with the adapters off, what a
checkpoint holds. Adapters are saved in PEFT's layout; docs/training.md says how a run uses them.
"""

import json
import math
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AUDIO_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # every linear of an encoder layer
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
MERGED = "merged"  # the subfolder of a LoRA run's last checkpoint that holds the merged model
PEFT_PREFIX = "base_model.model."  # PEFT's LoraModel wraps the Hugging Face model as base_model.model


class LoRAError(ValueError):
    """LoRA settings that cannot apply to the model (a target that matches nothing, a rank <= 0, ...)."""


@dataclass
class LoRASettings:
    """What apply_lora was given, plus the seed of init_adapters: enough to rebuild, merge and save."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = LM_TARGETS  # leaf names of language-model linears; "lm_head" adds the output layer
    audio: bool = False          # also every linear of the audio encoder's layers (AUDIO_TARGETS)
    seed: int = 0

    @property
    def scaling(self):
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An nn.Linear whose output gains scaling * B(A(dropout(x))). It holds the wrapped layer's own weight
    and bias Parameters (same objects, same dtype, same device); A and B are new fp32 Parameters."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        # built on meta, so nothing is allocated for the weight that is replaced right away
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=device, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.scaling, self.enabled = rank, alpha / rank, True
        init_pair(self.lora_A, self.lora_B)  # as PEFT does, from the global RNG; see init_adapters

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                            # [..., out]
        if not self.enabled:
            return y
        a = self.lora_dropout(x).to(self.lora_A.dtype)                     # [..., in]
        update = F.linear(F.linear(a, self.lora_A), self.lora_B)           # [..., r] -> [..., out]
        return y + (self.scaling * update).to(y.dtype)                     # exactly y while B == 0

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def init_pair(A, B, generator=None):
    """PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        B.zero_()


# -----------------------------------------------------------------------------
# Wrapping

def find_targets(model, targets, audio):
    """{module name: nn.Linear} to wrap. A target that names no linear layer is an error."""
    lm = dict(model.model.language_model.named_modules(prefix="model.language_model"))
    linears = {n: m for n, m in lm.items() if isinstance(m, nn.Linear)}
    linears["lm_head"] = model.lm_head
    leaf = lambda name: name.rsplit(".", 1)[-1]
    for t in targets:
        if not any(leaf(n) == t for n in linears):
            names = sorted({leaf(n) for n in linears}, key=lambda n: (n == "lm_head", n))
            raise LoRAError(f"LoRA target {t!r} matches no linear layer of the language model "
                             f"(its linear layers are named: {', '.join(names)})")
    found = {n: m for n, m in linears.items() if leaf(n) in targets}
    if audio:
        tower = model.model.audio_tower.layers.named_modules(prefix="model.audio_tower.layers")
        found.update({n: m for n, m in tower if isinstance(m, nn.Linear) and leaf(n) in AUDIO_TARGETS})
    return found


def apply_lora(model, rank, alpha, dropout=0.0, targets=LM_TARGETS, audio=False):
    """Swap the targeted linear layers of a Qwen2AudioForConditionalGeneration for LoRALinear, in place,
    on any device (meta included), and freeze every other parameter. Returns the wrapped module names.
    Adapters start as PEFT's do (global RNG); load init_adapters(model, seed) for values that depend on
    nothing else."""
    if not (isinstance(rank, int) and rank > 0):
        raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not 0 <= dropout < 1:
        raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    found = find_targets(model, tuple(targets), audio)
    if any(isinstance(m, LoRALinear) for m in found.values()):
        raise LoRAError("this model already has LoRA adapters")
    for name, module in found.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LoRALinear(module, rank, alpha, dropout))
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name))
    return list(found)


def is_adapter_key(key):
    return key.endswith(ADAPTER_SUFFIXES)


def lora_modules(model):
    """(name, LoRALinear) pairs in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


# -----------------------------------------------------------------------------
# Values: initial, current, merged

def init_adapters(model, seed):
    """{state-dict key: full CPU tensor} of every adapter: A drawn from a CPU generator seeded from (seed,
    the module's name), B zeros. The values depend on nothing but the seed, names and shapes: not the
    device, dtype, process count, or the order modules are visited in."""
    values = {}
    for name, m in lora_modules(model):
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))  # crc32: a stable hash
        A, B = torch.empty(m.lora_A.shape), torch.empty(m.lora_B.shape)   # [r, in], [out, r]
        init_pair(A, B, generator=g)
        values[f"{name}.lora_A"], values[f"{name}.lora_B"] = A, B
    return values


def adapter_state_dict(model):
    """{key: full fp32 CPU tensor} of every adapter, a copy. Under FSDP2 each adapter is gathered
    (DTensor.full_tensor), so every rank must call it; every rank gets the whole dict."""
    out = {}
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a DTensor under FSDP2
            out[name] = full.detach().to("cpu", copy=True)
    return out


def merged_state_dict(full_state_dict, settings):
    """Hugging Face keys only: each adapted weight becomes W + scaling * B @ A, computed in fp32 and cast
    to W's dtype; adapter keys are dropped. from_pretrained opens the result as a plain model."""
    merged = {}
    for key, value in full_state_dict.items():
        if is_adapter_key(key):
            continue
        stem = key.removesuffix(".weight")
        if key.endswith(".weight") and f"{stem}.lora_A" in full_state_dict:
            A = full_state_dict[f"{stem}.lora_A"].float()                  # [r, in]
            B = full_state_dict[f"{stem}.lora_B"].float()                  # [out, r]
            value = (value.float() + settings.scaling * (B @ A)).to(value.dtype)  # [out, in]
        merged[key] = value
    return merged


@contextmanager
def adapters_disabled(model):
    """Switch every adapter off (the model is then exactly the base model) and back to how it was."""
    modules = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(modules, before):
            m.enabled = enabled


# -----------------------------------------------------------------------------
# Adapter files in PEFT's layout: adapter_model.safetensors + adapter_config.json

def save_adapters(folder, adapter_tensors, settings, base_model=""):
    """Write adapters ({key: tensor} as adapter_state_dict gives) so that PEFT opens them:
    keys base_model.model.<module>.lora_A.weight, and target_modules a regex matching exactly the
    wrapped modules (PEFT full-matches a string against module names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{PEFT_PREFIX}{k}.weight": v.contiguous() for k, v in adapter_tensors.items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    modules = sorted({k.rsplit(".", 1)[0] for k in adapter_tensors})
    patterns = dict.fromkeys(re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(m)) for m in modules)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_model),
              "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
              "target_modules": "|".join(patterns), "bias": "none", "fan_in_fan_out": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_adapters(folder):
    """Inverse of save_adapters: ({key: tensor} with the model's keys, LoRASettings). Targets and audio
    are read off the module names; the seed is not stored (it only matters before training)."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise LoRAError(f"{folder / 'adapter_config.json'}: not a plain LoRA adapter "
                         f"(peft_type {config.get('peft_type')!r}); this project reads only those")
    tensors = {}
    for key, value in load_file(folder / "adapter_model.safetensors").items():
        if not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise LoRAError(f"{folder / 'adapter_model.safetensors'}: {key!r} is not a LoRA A or B weight")
        tensors[key.removeprefix(PEFT_PREFIX).removesuffix(".weight")] = value
    modules = [k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lora_A")]
    leaves = {m.rsplit(".", 1)[-1] for m in modules if ".audio_tower." not in m}
    known = LM_TARGETS + ("lm_head",)  # in the order LoRASettings lists them, so a round trip compares equal
    targets = tuple(t for t in known if t in leaves) + tuple(sorted(leaves - set(known)))
    settings = LoRASettings(rank=config["r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"],
                            targets=targets, audio=any(".audio_tower." in m for m in modules))
    return tensors, settings


# -----------------------------------------------------------------------------
# What the core calls: train.Recipe.adapters

def apply(recipe, cfg):
    """The recipe with LoRA's hooks: adapters of --lora-rank on --lora-targets (and the audio encoder)."""
    if not 0 <= cfg.lora_dropout < 1:
        raise M.UsageError(f"--lora-dropout {cfg.lora_dropout}: must be in [0, 1)")
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    recipe.adapters = LoRA(LoRASettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.lora_audio,
                                        cfg.seed))
    return recipe


class LoRA:
    """LoRA's hooks into loading (model.sharded_load), the step (the reference) and checkpoints."""

    def __init__(self, settings):
        self.settings = settings

    def wrap(self, model):
        """Adapters on the targets of a model on the meta device; every other parameter frozen."""
        s = self.settings
        try:
            apply_lora(model, s.rank, s.alpha, s.dropout, s.targets, s.audio)
        except LoRAError as e:
            raise M.UsageError(f"--lora-targets/--lora-rank: {e}") from None

    def initial(self, model):
        return init_adapters(model, self.settings.seed)

    def disabled(self, model):
        """The base model: the reference of a LoRA run, with no second copy of the weights."""
        return adapters_disabled(model)

    def trains(self, name):
        """Whether a state-dict key is trained (and kept in fp32): the adapters, never the base."""
        return is_adapter_key(name)

    def save(self, folder, policy, base, dtype, final):
        """A checkpoint's adapters in PEFT's layout, naming the base model; at the last step also the merged
        weights W + alpha / r B A in dtype, in folder/merged/ (never beside the adapters: with PEFT installed,
        from_pretrained would add them to weights that already hold them). Every rank calls it (the weights
        are gathered); rank 0 writes. Returns the folders written."""
        merged = M.gathered_state_dict(policy, dtype, keep=is_adapter_key) if final else None
        adapters = adapter_state_dict(policy)
        if dist.get_rank() == 0:
            if merged is not None:
                policy.save_pretrained(Path(folder) / MERGED, state_dict=merged_state_dict(merged, self.settings))
            save_adapters(folder, adapters, self.settings, base_model=str(base))
        return [folder] + ([Path(folder) / MERGED] if final else [])


def merge_saved(model, folder):
    """Fold the adapters saved in folder (PEFT's layout) into the model's weights: W + alpha / r * B A."""
    adapters, settings = load_adapters(folder)
    model.load_state_dict(merged_state_dict({**model.state_dict(), **adapters}, settings))
