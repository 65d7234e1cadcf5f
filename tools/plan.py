"""What one training step of the 7B costs: per-GPU memory, FLOPs per optimizer step, and the disk its
checkpoints need, from the config on the meta device (nothing is allocated).

Memory is planned row by row (one kind of tensor each, with its formula) per phase of the step (state,
rollout, reference, policy, optimizer) under FSDP2 with bf16 compute and fp32 masters, as train.py shards
the model; FLOPs count every matmul and the attention pairs the packed passes compute (FlexAttention's
visible blocks, or the dense mask's L^2). tools/measure_memory.py checks the plan against the allocator.
docs/training.md explains each row and gives the 7B's tables.
    python -m tools.plan [--model DIR|omni-7b] [--gpus 4 --gpu-mem 40] [--algo sft --lora-rank 64] [--summary]
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

from transformers import Qwen2AudioConfig

import model as qwen

GIB = 2**30
PARAMS_7B = 8_397_094_912
# Qwen2.5-Omni-7B's thinker as trained here, without its vision tower: language model 7,070,619,136 +
# lm_head 544,997,376 + audio encoder 639,647,232 (the vision tower, 676,550,144, is dropped)
PARAMS_OMNI_7B = 8_255_263_744
ARCHITECTURES = {"qwen2-audio-7b": "qwen2-audio", "omni-7b": "omni"}  # --model names of the built-in 7B configs
# R1-AQA's prompt for a 30 s clip: 750 audio placeholders (25 per second) + ~100 text tokens (chat
# frame, question, choices, instruction; about 75 with the Qwen2 tokenizer, rounded up).
PROMPT_TOKENS = 850
TARGET_TOKENS = 10   # SFT target: "<answer>...</answer>" and the end token
BLOCK = 128          # FlexAttention's block size
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AUDIO_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class Row:
    name: str
    bytes: int
    phase: str    # "state", or a phase / moment such as "rollout:decode" (see the docstring)
    formula: str


@dataclass
class MemoryPlan:
    rows: list
    moments: dict     # moment -> bytes above the state (its own rows + its phase's rows)
    total: int        # state + the largest moment
    gpu_bytes: int
    fits: bool


@dataclass
class Step:
    """One step's settings, per GPU where it matters. SFT runs groups of one: G = 1, T = the target."""
    gpus: int = 8
    prompts: int = 1              # B: prompts (GRPO) or sequences (SFT) per forward
    group_size: int = 8
    prompt_tokens: int = PROMPT_TOKENS
    new_tokens: int = 256
    beta: float = 0.04
    algo: str = "grpo"
    lora_rank: int = 0
    lora_audio: bool = False      # adapters on the audio encoder too
    target_tokens: int = TARGET_TOKENS
    device: str = "cuda"
    attention: str = ""           # "block" (FlexAttention) or "dense" (the mask); "" = the device's default

    def __post_init__(self):
        assert self.algo in ("grpo", "sft") and self.device in ("cuda", "cpu"), (self.algo, self.device)
        self.attention = self.attention or ("block" if self.device == "cuda" else "dense")
        assert self.attention in ("block", "dense"), self.attention

    G = property(lambda self: self.group_size if self.algo == "grpo" else 1)
    T = property(lambda self: self.new_tokens if self.algo == "grpo" else self.target_tokens)
    L = property(lambda self: self.prompt_tokens + self.G * self.T)           # packed length
    tokens = property(lambda self: self.prompts * self.L)
    N = property(lambda self: self.prompts * self.G)                          # completions
    M = property(lambda self: self.N * self.T)                                # positions with logits
    lora = property(lambda self: self.lora_rank > 0)
    masked = property(lambda self: self.attention == "dense")                  # a dense [B, 1, L, L] mask
    reference = property(lambda self: self.algo == "grpo" and self.beta != 0)
    audio_trains = property(lambda self: not self.lora or self.lora_audio)


# -----------------------------------------------------------------------------
# Counting the model

def adapter_width(layers, targets):
    """Sum of (in + out) over the Linear layers LoRA adapts: adapters = rank * this."""
    return sum(m.in_features + m.out_features for name, m in layers.named_modules()
               if name.split(".")[-1] in targets)


def param_counts(model):
    """Parameters per part of a model of either family as model.py runs it (meta or real; Omni's thinker
    without its vision tower)."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    parts = model.model
    lm, audio = parts.language_model, parts.audio_tower
    linears = [m for layers in (lm.layers, audio.layers) for m in layers.modules() if hasattr(m, "in_features")]
    return {
        "total": count(model),
        "audio_layers": count(audio.layers),
        "audio_layer": count(audio.layers[0]),
        "projector": count(model.get_submodule(qwen.family_of_config(model.config).projector)),
        "lm_layers": count(lm.layers),
        "lm_layer": count(lm.layers[0]),
        "lm_head": count(model.lm_head),
        # the trunk's own FSDP unit: all of model.model outside its audio and decoder layers
        # (embeddings, audio convolutions and positions, projector, final norms)
        "trunk_root": count(parts) - count(audio.layers) - count(lm.layers),
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),  # the audio position table
        "largest": max(p.numel() for p in model.parameters()),
        "lora_lm": adapter_width(lm.layers, LM_TARGETS),
        "lora_audio": adapter_width(audio.layers, AUDIO_TARGETS),
        "lora_largest": max(max(m.in_features, m.out_features) for m in linears),  # * rank: the largest adapter
    }


def count_model(config):
    """(parameter counts, sizes) of the architecture, from a model built on the meta device. A 7B's
    shapes must give its known parameter count: a check on model.config_7b(family) and on a loaded config."""
    counts, sizes = param_counts(qwen.meta_model(config)), shapes(config)
    for family, known in (("qwen2-audio", PARAMS_7B), ("omni", PARAMS_OMNI_7B)):
        if sizes == shapes(config_7b(family)):
            assert counts["total"] == known, f"{family} 7B shapes but {counts['total']:,} parameters"
    return counts, sizes


def shapes(config):
    """The sizes the formulas use, from a Qwen2AudioConfig or a Qwen2.5-Omni thinker config. audio_window:
    the positions each audio position attends to (Qwen2-Audio: the whole 30 s window; Omni's encoder
    attends within windows of n_window positions, 2 s of audio)."""
    text, audio = config.text_config, config.audio_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return dict(layers=text.num_hidden_layers, hidden=text.hidden_size, kv=text.num_key_value_heads * head_dim,
                inter=text.intermediate_size, vocab=text.vocab_size, audio_layers=audio.encoder_layers,
                d_audio=audio.d_model, ffn_audio=audio.encoder_ffn_dim, mels=audio.num_mel_bins,
                frames=2 * audio.max_source_positions, positions=audio.max_source_positions,
                audio_window=min(getattr(audio, "n_window", audio.max_source_positions), audio.max_source_positions))


def adapters(p, st):
    """LoRA parameters: rank * sum of (in + out) over the adapted layers."""
    return st.lora_rank * (p["lora_lm"] + (p["lora_audio"] if st.lora_audio else 0))


def trained(p, st):
    """The parameters that have gradients and AdamW moments (all but the frozen position table)."""
    return adapters(p, st) if st.lora else p["total"] - p["frozen"]


# -----------------------------------------------------------------------------
# Memory per GPU

def state_rows(p, st):
    """Alive the whole step: the sharded master weights and moments, and the reference or the base."""
    n, g = p["total"], st.gpus
    if st.lora:
        a = adapters(p, st)
        return [Row("base weights bf16, a full copy on every GPU", n * 2, "state", "params * 2 (not sharded)"),
                Row("adapters fp32 (shard)", a * 4 // g, "state", "adapters * 4 / gpus"),
                Row("adapter AdamW exp_avg + exp_avg_sq (shard)", 2 * a * 4 // g, "state", "2 * adapters * 4 / gpus")]
    return [
        Row("master weights fp32 (shard)", n * 4 // g, "state", "params * 4 / gpus"),
        Row("AdamW exp_avg + exp_avg_sq (shard)", 2 * trained(p, st) * 4 // g, "state", "2 * trained * 4 / gpus"),
        Row("reference weights bf16 (shard)", n * 2 // g if st.reference else 0, "state",
            "params * 2 / gpus; 0 if beta = 0 or SFT"),
    ]


def rollout_rows(p, s, st):
    """Sampling: every unit gathered once in bf16 on entering model.unsharded, before any activation
    exists (the last gather's buffer, lm_head's, is alive only then), kept for the whole decode loop.
    The fork copies the prompt's keys and values G ways into a cache preallocated for P + T tokens
    (decode.py), layer by layer, so one layer's copy is in flight at a time; decoding then writes in
    place."""
    if st.algo != "grpo":
        return []
    N, P, T, kv, V = st.N, st.prompt_tokens, st.T, s["kv"], s["vocab"]
    cache = lambda length: 2 * s["layers"] * kv * length * N * 2
    if st.lora:
        rows = [Row("adapters gathered bf16 (the base is resident)", adapters(p, st) * 2, "rollout", "adapters * 2")]
    else:
        rows = [Row("weights bf16, gathered for sampling", p["total"] * 2, "rollout", "params * 2"),
                Row("all-gather buffer of lm_head (gathered last)", p["lm_head"] * 2, "rollout:gather", "lm_head * 2")]
    return rows + [
        Row("KV cache, preallocated for P + T", cache(P + T), "rollout:cache", "2 (k, v) * layers * kv * (P + T) * N * 2"),
        Row("fork: one layer's prompt keys and values, G copies", 2 * kv * P * N * 2, "rollout:cache:fork",
            "2 * kv * P * N * 2"),
        Row("sampling: logits, filtered, probs, noise, ratio", 5 * N * V * 4, "rollout:cache:decode", "5 * N * V * 4"),
    ]


def reference_rows(p, s, st):
    """The frozen reference's pass, no grad. In a decoder layer: the trunk root and that layer gathered
    (FSDP2 keeps a unit's all-gather buffer in forward until the next unit's is copied out), the MLP's
    up, act(gate) and their product.
    At the logits: lm_head gathered, the fp32 logits and their log_softmax. Attention's bias lives
    only inside sdpa, before the MLP runs."""
    if not st.reference:
        return []
    B, L, tokens, h, i = st.prompts, st.L, st.tokens, s["hidden"], s["inter"]
    if st.lora:  # the base is resident; the units (adapters, switched off) still gather
        rows = [Row("reference layer adapters + all-gather buffer", ahead(st) * st.lora_rank * p["lora_lm"] // s["layers"] * 2,
                    "reference:trunk", "2 * layer adapters * 2 (1 GPU: layer adapters * 2)")]
    else:
        rows = [Row("reference trunk root gathered bf16", p["trunk_root"] * 2, "reference", "trunk_root * 2"),
                Row("reference decoder layer + its all-gather buffer", ahead(st) * p["lm_layer"] * 2,
                    "reference:trunk", "2 * lm_layer * 2 (1 GPU: lm_layer * 2)"),
                Row("reference lm_head gathered bf16", p["lm_head"] * 2, "reference:logits", "lm_head * 2")]
    return rows + [Row("packed attention mask (bool)", B * L * L, "reference", "B * L^2")] * st.masked + [
        Row("a decoder layer's forward without grad", tokens * (6 * i + 4 * h), "reference:trunk",
            "tokens * (3 * inter * 2 + 2 * hidden * 2)"),
        Row("hidden states, states at completion positions", (tokens + st.M) * h * 2, "reference:logits",
            "(tokens + M) * hidden * 2"),
        Row("logits fp32 and log_softmax", 2 * st.M * s["vocab"] * 4, "reference:logits", "2 * M * V * 4"),
    ]


def reduction_rows(name, size, phase, st):
    """An FSDP unit's gradient reduction (reduce_dtype fp32): the fp32 reduce-scatter input the whole
    unit's size, next to the unsharded bf16 gradient until it is copied in, then next to the fp32
    reduce-scatter output (the new shard, or one added to the accumulated shard). torch's CPU
    kernel for the copy-in (_chunk_cat) builds a bf16 temporary; the CUDA kernel writes fp32 directly."""
    if st.device == "cpu":
        return [Row(f"{name} gradient bf16 + copy-in temporary bf16, or its shard", size * 4, phase, f"{name} * max(2 + 2, 4 / gpus)"),
                Row(f"{name} reduce-scatter input fp32", size * 4, phase, f"{name} * 4")]
    return [Row(f"{name} gradient bf16, or its fp32 shard", size * max(2, 4 // st.gpus), phase, f"{name} * max(2, 4 / gpus)"),
            Row(f"{name} reduce-scatter input fp32", size * 4, phase, f"{name} * 4")]


def ahead(st):
    """Units' worth of memory one gathered unit takes in forward and in backward: itself and, with more
    than one GPU, the all-gather buffer kept for overlap (forward) or the next unit prefetched
    (backward). On one GPU FSDP2 gathers by copying each parameter at use, with no buffer."""
    return 2 if st.gpus > 1 else 1


def unit_rows(name, size, phase, st):
    """An FSDP unit in the middle of its backward: it and the next unit (prefetched) gathered in bf16,
    and the previous unit's fp32 reduce-scatter input, which FSDP2 frees only when this unit's
    reduction starts (one in flight). At that reduction this unit's bf16 gradient and its own
    reduce-scatter input replace its weights, its activations and the previous input: a larger
    moment only on the CPU (the copy-in's temporary) and only for activations under 2 bytes per
    parameter of the unit."""
    return [Row(f"{name} gathered bf16, + the next prefetched", ahead(st) * size * 2, phase,
                f"2 * {name} * 2 (1 GPU: {name} * 2)"),
            Row(f"previous {name}'s reduce-scatter input fp32", size * 4, phase, f"{name} * 4")]


def policy_rows(p, s, st):
    """The policy's pass up to lm_head's reduction. The gradients are all counted throughout: after
    the first micro-batch of a step they all exist. The trunk root stays gathered from forward to
    the end of backward (FSDP2 does not reshard a root after forward)."""
    B, L, tokens, M, V, g = st.prompts, st.L, st.tokens, st.M, s["vocab"], st.gpus
    pos, d = s["positions"], s["d_audio"]
    rows = [Row("gradient shards fp32", trained(p, st) * 4 // g, "policy", "trained * 4 / gpus"),
            *[Row("packed attention mask (bool)", B * L * L, "policy:graph", "B * L^2")] * st.masked,
            Row("LM checkpoints (each decoder layer's input)", s["layers"] * tokens * s["hidden"] * 2, "policy:graph",
                "layers * tokens * hidden * 2"),
            Row("trunk output: final norm's saved tensors, states", (8 * tokens + 2 * M) * s["hidden"], "policy:graph",
                "tokens * hidden * (4 + 2 + 2) + M * hidden * 2")]
    if st.audio_trains:
        rows += [Row("audio checkpoints", B * s["audio_layers"] * pos * d * 2, "policy:graph",
                     "B * audio_layers * positions * d * 2"),
                 Row("audio conv front end (not checkpointed)", B * 6 * pos * d * 2, "policy:graph",
                     "B * (2 + 2 + 1 + 1) * positions * d * 2: conv1, GELU at 2x, conv2, GELU")]
    if not st.lora:
        rows += [Row("trunk root gathered bf16", p["trunk_root"] * 2, "policy:graph", "trunk_root * 2"),
                 Row("lm_head gathered bf16", p["lm_head"] * 2, "policy:graph:logits", "lm_head * 2")]
        rows += reduction_rows("lm_head", p["lm_head"], "policy:graph:lm_head", st)
    return rows + [
        Row("log_softmax output fp32 (saved)", M * V * 4, "policy:graph:logits", "M * V * 4"),
        Row("gradient of the gathered log-probs (V wide)", M * V * 4, "policy:graph:logits", "M * V * 4"),
        Row("log_softmax gradient fp32", M * V * 4, "policy:graph:logits", "M * V * 4"),
    ]


def backward_rows(p, s, st):
    """The trunk's backward, unit by unit, each layer recomputed (checkpointing). FSDP2 keeps lm_head's
    reduce-scatter input until the end of backward: lm_head is a root of its own, and a root frees
    its last buffer only in its final callback. The embedding's backward runs last (its forward ran
    first); the trunk root's gradients wait for its reduction, in the final callback, once the
    graph, lm_head's buffer and the trunk root's weights are gone."""
    B, L, tokens, h, kv, i = st.prompts, st.L, st.tokens, s["hidden"], s["kv"], s["inter"]
    pos, d, f = s["positions"], s["d_audio"], s["ffn_audio"]
    if st.lora:  # the units hold only the adapters
        rows = unit_rows("layer adapters", st.lora_rank * p["lora_lm"] // s["layers"], "policy:graph:backward:decoder", st)
    else:
        rows = [Row("lm_head reduce-scatter input fp32, kept", p["lm_head"] * 4, "policy:graph:backward", "lm_head * 4"),
                *unit_rows("decoder layer", p["lm_layer"], "policy:graph:backward:decoder", st)]
    rows += [Row("decoder layer recomputed: saved + MLP grads", tokens * (24 * h + 4 * kv + 12 * i),
                 "policy:graph:backward:decoder", "tokens * (22 hidden + 4 kv + 8 inter + 2 hidden + 4 inter)"),
             *[Row("attention bias bf16 (from the bool mask)", B * L * L * 2, "policy:graph:backward:decoder",
                   "B * L^2 * 2")] * st.masked]
    if st.audio_trains:
        audio_unit = st.lora_rank * p["lora_audio"] // s["audio_layers"] if st.lora else p["audio_layer"]
        rows += unit_rows("audio adapters" if st.lora else "audio layer", audio_unit, "policy:graph:backward:audio", st)
        rows.append(Row("audio layer recomputed: saved + MLP grads", B * pos * (20 * d + 8 * f),
                        "policy:graph:backward:audio", "B * positions * (18 d + 4 ffn + 2 d + 4 ffn)"))
    if not st.lora:
        rows.append(Row("trunk root gradient bf16 (embedding last)", p["trunk_root"] * 2,
                        "policy:graph:backward:embedding", "trunk_root * 2"))
        rows += reduction_rows("trunk root", p["trunk_root"], "policy:root_reduction", st)
    return rows


def optimizer_rows(p, st):
    """Clipping and the AdamW step: the gradients, and AdamW's temporaries. On a GPU torch runs the
    foreach implementation (one temporary, sqrt(exp_avg_sq), the size of all moments' shards); on
    the CPU the per-tensor one (sqrt and its quotient, for one tensor at a time)."""
    n, g = trained(p, st), st.gpus
    rows = [Row("gradient shards fp32", n * 4 // g, "optimizer", "trained * 4 / gpus")]
    if st.device == "cuda":
        return rows + [Row("AdamW foreach temporary", n * 4 // g, "optimizer", "trained * 4 / gpus")]
    largest = st.lora_rank * p["lora_largest"] if st.lora else p["largest"]
    return rows + [Row("AdamW per-tensor temporaries (CPU)", 2 * largest * 4 // g, "optimizer",
                       "2 * largest tensor * 4 / gpus")]


def moments(rows):
    """{moment: bytes}: each moment's rows plus the rows of the phases it belongs to."""
    phases = list(dict.fromkeys(r.phase for r in rows if r.phase != "state"))  # in step order
    leaves = [m for m in phases if not any(q.startswith(m + ":") for q in phases)]
    return {m: sum(r.bytes for r in rows if m == r.phase or m.startswith(r.phase + ":")) for m in leaves}


def memory_plan(config, gpus=8, prompts_per_gpu=1, group_size=8, prompt_tokens=PROMPT_TOKENS,
                max_new_tokens=256, gpu_mem_gb=80, beta=0.04, **variant):
    """Per-GPU memory of one step, row by row. gpu_mem_gb is in GiB (an "80 GB" card has 80 GiB).
    variant: algo ("grpo" or "sft"), lora_rank, lora_audio, target_tokens, device ("cuda" or "cpu")."""
    p, s = count_model(config)
    st = Step(gpus, prompts_per_gpu, group_size, prompt_tokens, max_new_tokens, beta, **variant)
    rows = (state_rows(p, st) + rollout_rows(p, s, st) + reference_rows(p, s, st) + policy_rows(p, s, st)
            + backward_rows(p, s, st) + optimizer_rows(p, st))
    peaks = moments(rows)
    total = sum(r.bytes for r in rows if r.phase == "state") + max(peaks.values())
    return MemoryPlan(rows, peaks, total, int(gpu_mem_gb * GIB), total <= gpu_mem_gb * GIB)


def phase_peaks(plan):
    """{phase: its largest moment}, e.g. rollout = max(rollout:gather, rollout:decode)."""
    peaks = {}
    for moment, size in plan.moments.items():
        phase = moment.split(":")[0]
        peaks[phase] = max(peaks.get(phase, 0), size)
    return peaks


def format_plan(plan):
    """The plan as a text table, GiB per row and per moment."""
    lines = [f"{'per GPU':52s} {'GiB':>7s}  {'phase':32s} formula"]
    lines += [f"{r.name:52s} {r.bytes / GIB:7.2f}  {r.phase:32s} {r.formula}" for r in plan.rows]
    state = sum(r.bytes for r in plan.rows if r.phase == "state")
    lines.append(f"{'  state':52s} {state / GIB:7.2f}")
    peak = max(plan.moments.values())
    for moment, size in plan.moments.items():
        mark = "  <- largest" if size == peak else ""
        lines.append(f"{'  moment ' + moment:52s} {size / GIB:7.2f}{mark}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"{'total = state + largest moment':52s} {plan.total / GIB:7.2f}  "
                 f"{verdict} in {plan.gpu_bytes / GIB:.0f} GiB")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Disk: the checkpoints a run keeps at once

@dataclass
class DiskPlan:
    checkpoint: int   # bytes of one checkpoint (checkpoint.save)
    last: int         # of the last one (LoRA: with the merged model)
    first: int        # of checkpoint-0, written before training (warm start or curriculum); else 0
    at_once: int      # checkpoints of this run's saves on the disk together at the peak
    total: int        # bytes the run needs: checkpoint-0 + the peak


def checkpoint_bytes(p, st, compute_bytes=2, optimizer=True, merged=False):
    """One checkpoint folder: train_state/'s fp32 weights (LoRA: the adapters) and, once AdamW has stepped,
    its two fp32 moments of what trains; the Hugging Face weights in the compute dtype (LoRA: the adapters
    in fp32, and in the last checkpoint the merged model too). The config and tokenizer files (a few MB)
    are not counted."""
    if st.lora:
        a = adapters(p, st)
        return a * 4 + (2 * a * 4 if optimizer else 0) + a * 4 + (p["total"] * compute_bytes if merged else 0)
    return p["total"] * 4 + (2 * trained(p, st) * 4 if optimizer else 0) + p["total"] * compute_bytes


def saves(max_steps, save_every, start=0):
    """Checkpoints steps start+1 .. max_steps write: every save_every-th step, and the last."""
    if max_steps <= start:
        return 0
    return max_steps // save_every - start // save_every + (max_steps % save_every != 0)


def disk_plan(p, st, compute_bytes=2, max_steps=1000, save_every=100, keep_last=3, start=0, kept=0, first=False):
    """The disk a run needs for its checkpoints. A save writes a new checkpoint before pruning the oldest, so
    keep_last + 1 are on the disk at the peak (fewer if the run saves fewer times). A resumed run (from
    `start`, with `kept` checkpoints besides checkpoint-0 already on the disk) needs room for its new ones
    only. first: checkpoint-0 is still to be written (it is always kept)."""
    at_once = min(saves(max_steps, save_every, start), keep_last + 1 - min(kept, keep_last))
    one = checkpoint_bytes(p, st, compute_bytes)
    last = checkpoint_bytes(p, st, compute_bytes, merged=True)
    zero = checkpoint_bytes(p, st, compute_bytes, optimizer=False, merged=max_steps == 0) if first else 0
    return DiskPlan(one, last, zero, at_once, zero + (at_once - 1) * one + last if at_once else zero)


def format_disk(d, keep_last, save_every, max_steps):
    """One line: what a checkpoint weighs and how many the run keeps at once (GB = 10^9 bytes, as disks count)."""
    gb = lambda n: f"{n / 1e9:.1f} GB"
    last = f" (the last {gb(d.last)}, with the merged model)" if d.last != d.checkpoint else ""
    first = f" + checkpoint-0 {gb(d.first)}" if d.first else ""
    return (f"disk: a checkpoint is {gb(d.checkpoint)}{last}; --keep-last {keep_last} with a save every {save_every} "
            f"of {max_steps} steps keeps up to {d.at_once} at once (the newest and the one being written){first}: "
            f"{gb(d.total)}")


# -----------------------------------------------------------------------------
# FLOPs per optimizer step

def encoder_flops(p, s):
    """One clip through the audio encoder and projector, always the full window: conv1 + conv2 + 2 * layer
    params * positions + attention 4 * d * positions * window per layer (window = positions for Qwen2-Audio,
    100 for Omni) + projector."""
    conv1 = 2 * s["mels"] * 3 * s["d_audio"] * s["frames"]
    conv2 = 2 * s["d_audio"] * 3 * s["d_audio"] * s["positions"]
    attention = 4 * s["d_audio"] * s["positions"] * s["audio_window"] * s["audio_layers"]
    layers = 2 * p["audio_layers"] * s["positions"] + attention
    return conv1 + conv2 + layers + 2 * p["projector"] * (s["positions"] // 2)


def lm_flops(p, s, tokens, pairs, logit_positions):
    """The decoder over `tokens` tokens with `pairs` (query, key) pairs per layer, and lm_head at
    `logit_positions`: 2 * layer params * tokens + 4 * hidden * pairs * layers + 2 * lm_head * positions."""
    return 2 * p["lm_layers"] * tokens + 4 * s["hidden"] * pairs * s["layers"] + 2 * p["lm_head"] * logit_positions


def visible_blocks(prompt, group_size, new, block=BLOCK):
    """Blocks of block x block (query, key) pairs holding at least one visible pair in the packed
    layout [prompt, c_1, ..., c_G]: a query block sees the prompt up to itself and, for every
    completion it overlaps, that completion up to its own last query."""
    L, starts = prompt + group_size * new, [prompt + i * new for i in range(group_size)]
    count = 0
    for q0 in range(0, L, block):
        q1 = min(q0 + block, L)
        spans = [(0, min(prompt, q1))] + [(a, min(a + new, q1)) for a in starts if a < q1 and a + new > q0]
        keys = set()
        for a, b in spans:
            keys.update(range(a // block, (b - 1) // block + 1) if b > a else ())
        count += len(keys)
    return count


def packed_pairs(prompt, group_size, new, attention):
    """(query, key) pairs per layer of one packed forward: every L^2 pair ("dense", sdpa with a mask),
    the pairs of the visible blocks ("block"), or only the visible pairs ("visible", the ideal):
    P^2/2 + G*T*P + G*T^2/2."""
    L = prompt + group_size * new
    if attention == "dense":
        return L * L
    if attention == "block":
        return visible_blocks(prompt, group_size, new) * BLOCK**2
    assert attention == "visible", attention
    return prompt**2 / 2 + group_size * (new * prompt + new**2 / 2)


def pass_flops(p, s, group_size, prompt, new, packed, attention="visible"):
    """One forward over a prompt's G completions, as (encoder, language model) FLOPs.
    packed (ours): the audio encoded once, the prompt once, each completion token once, logits at
    the G*T completion positions, attention over packed_pairs.
    not packed (HF generate / TRL): G separate [prompt, completion] sequences, the audio encoded G
    times, logits at every position; padding gives them a mask too, so "dense" counts seq^2 pairs,
    "block" the causal blocks, "visible" seq^2/2.
    A rollout does the same matmuls, token by token, over the visible pairs only (a causal prefill
    and a KV cache need no mask): pass attention="visible" for it."""
    if packed:
        pairs = packed_pairs(prompt, group_size, new, attention)
        return encoder_flops(p, s), lm_flops(p, s, prompt + group_size * new, pairs, group_size * new)
    seq = prompt + new
    blocks = -(-seq // BLOCK)
    pairs = {"dense": seq**2, "block": blocks * (blocks + 1) / 2 * BLOCK**2, "visible": seq**2 / 2}[attention]
    return group_size * encoder_flops(p, s), group_size * lm_flops(p, s, seq, pairs, seq)


def step_flops(config, prompts=16, group_size=8, prompt_tokens=PROMPT_TOKENS, new_tokens=256, beta=0.04,
               checkpointing=True, packed=True, attention="block", algo="grpo", lora_rank=0,
               target_tokens=TARGET_TOKENS, lora_audio=False):
    """Projected FLOPs of one optimizer step, per phase, all GPUs together. rollout = 1 pass over the
    visible pairs; reference = 1 pass (0 if beta = 0); policy = forward + backward (2x forward) plus
    the forward recomputed by checkpointing: 4 passes (3 without). With LoRA the frozen weights need
    no weight gradients: the backward is 1x forward (3 passes, 2 without checkpointing), and a frozen
    encoder runs forward only. SFT: groups of one [prompt, target], no rollout, no reference.
    new_tokens = the completions' length (256 is the limit, so this is the upper bound)."""
    p, s = count_model(config)
    G, T = (group_size, new_tokens) if algo == "grpo" else (1, target_tokens)
    one = lambda attn: sum(pass_flops(p, s, G, prompt_tokens, T, packed, attn)) * prompts
    passes = (4 if checkpointing else 3) - (1 if lora_rank else 0)
    encoder, lm = pass_flops(p, s, G, prompt_tokens, T, packed, attention)
    frozen_encoder = lora_rank and not lora_audio
    phases = {"rollout": one("visible") if algo == "grpo" else 0,
              "reference": one(attention) if algo == "grpo" and beta else 0,
              "policy": prompts * ((1 if frozen_encoder else passes) * encoder + passes * lm)}
    return {**phases, "total": sum(phases.values())}


# -----------------------------------------------------------------------------

def config_7b(family="qwen2-audio"):
    """The 7B's architecture: Qwen2-Audio-7B-Instruct, or with family "omni" Qwen2.5-Omni-7B's thinker
    (recipes/omni.py; the config classes' defaults are NOT these models)."""
    if family == "omni":
        from recipes import omni
        return omni.omni_config_7b()
    return qwen2_audio_config_7b()


def qwen2_audio_config_7b():
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=1280, encoder_layers=32,
                          encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                         rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False),
        audio_token_index=151646,
    )


def print_for(cfg):
    """train.py --plan: memory per GPU and FLOPs per step for a run's settings, from the config on the meta
    device (the 7B unless --model is a folder; tiny-omni plans Qwen2.5-Omni-7B's thinker)."""
    model = cfg.model if Path(cfg.model).is_dir() else {"tiny-omni": "omni-7b"}.get(cfg.model)
    print(report(load_config(model), cfg.gpus, cfg.micro_batch, cfg.prompts_per_step, cfg.group_size,
                 new_tokens=cfg.max_new_tokens, gpu_mem_gb=cfg.gpu_mem, beta=cfg.beta, algo=cfg.algo,
                 lora_rank=cfg.lora_rank, attention="dense" if cfg.dense_attention else "block",
                 max_steps=cfg.max_steps, save_every=cfg.save_every, keep_last=cfg.keep_last))


def load_config(model):
    """The config to plan for: None or a built-in name (ARCHITECTURES: qwen2-audio-7b, omni-7b) gives that
    7B's architecture; a local model folder of either family gives its own (Omni's thinker config, also
    out of a whole Omni model's config.json)."""
    if model is None or model in ARCHITECTURES:
        return config_7b(ARCHITECTURES.get(model, "qwen2-audio"))
    return qwen.family_of(model).config_class.from_pretrained(model)


def flops_table(config, prompts, group_size, prompt_tokens, new_tokens, gpus, beta=0.04, **variant):
    """Ours against HF/TRL's layout, phase by phase. variant: attention, algo, lora_rank, target_tokens."""
    ours = step_flops(config, prompts, group_size, prompt_tokens, new_tokens, beta, **variant)
    hf = step_flops(config, prompts, group_size, prompt_tokens, new_tokens, beta, packed=False, **variant)
    lines = [f"FLOPs per optimizer step: {prompts} prompts x G={group_size}, prompt {prompt_tokens} "
             f"tokens, completions of {new_tokens} tokens, checkpointing, attention {variant.get('attention', 'block')}",
             f"{'phase':10s} {'ours PFLOP':>11s} {'HF/TRL PFLOP':>13s} {'ratio':>6s}"]
    for phase in ours:
        ratio = f"{ours[phase] / hf[phase]:6.2f}" if hf[phase] else f"{'-':>6s}"
        lines.append(f"{phase:10s} {ours[phase] / 1e15:11.2f} {hf[phase] / 1e15:13.2f} {ratio}")
    lines.append(f"per GPU: {ours['total'] / gpus / 1e15:.2f} PFLOP")
    return "\n".join(lines)


def report(config, gpus=8, prompts_per_gpu=1, prompts=16, group_size=8, prompt_tokens=PROMPT_TOKENS,
           new_tokens=256, gpu_mem_gb=80, beta=0.04, algo="grpo", lora_rank=0, target_tokens=TARGET_TOKENS,
           attention="block", max_steps=1000, save_every=100, keep_last=3):
    """The whole plan as text: the memory table, the FLOPs, and the disk the checkpoints need (in bf16).
    train.py --plan prints this too. attention: "block" (FlexAttention, what the code runs on a GPU) or
    "dense" (the fallback mask)."""
    variant = dict(algo=algo, lora_rank=lora_rank, target_tokens=target_tokens)
    plan = memory_plan(config, gpus, prompts_per_gpu, group_size, prompt_tokens, new_tokens, gpu_mem_gb, beta,
                       attention=attention, **variant)
    what = (f"{prompts_per_gpu} prompt(s) x G={group_size} per GPU, prompt {prompt_tokens} tokens + {new_tokens} "
            f"new, beta={beta}" if algo == "grpo" else
            f"{prompts_per_gpu} sequence(s) per GPU, prompt {prompt_tokens} tokens + target {target_tokens}")
    head = f"{algo.upper()}, {f'LoRA r={lora_rank}' if lora_rank else 'full fine-tuning'}, memory per GPU: {gpus} GPUs, {what}"
    flops = flops_table(config, prompts, group_size, prompt_tokens, new_tokens, gpus, beta, attention=attention,
                        **variant)
    disk = disk_plan(count_model(config)[0], Step(lora_rank=lora_rank), 2, max_steps, save_every, keep_last)
    return "\n".join([head, format_plan(plan), "", flops, "", format_disk(disk, keep_last, save_every, max_steps)])


def fit_summary(config, lora_rank=64, sft_batch=8, cards=(24, 48, 80)):
    """Per-GPU memory of full fine-tuning and LoRA, SFT and GRPO (1 prompt x G 8 per GPU, R1-AQA's
    lengths), on 1 GPU and on 8, and which cards it fits, as a Markdown table."""
    lines = [f"| {'training':22s} | 1 GPU, GiB | " + " | ".join(f"1 x {c} GB" for c in cards)
             + " | 8 GPUs, GiB per GPU | 8 x 80 GB |", "|---|---:|" + "---|" * len(cards) + "---:|---|"]
    mark = lambda plan_bytes, card: "fits" if plan_bytes <= card * GIB else "no"
    for algo in ("sft", "grpo"):
        for rank in (0, lora_rank):
            batch = sft_batch if algo == "sft" else 1
            one, eight = (memory_plan(config, gpus, batch, algo=algo, lora_rank=rank).total for gpus in (1, 8))
            name = f"{algo.upper()}, {f'LoRA r={rank}' if rank else 'full'}"
            lines.append(f"| {name:22s} | {one / GIB:10.1f} | " + " | ".join(mark(one, c) for c in cards)
                         + f" | {eight / GIB:19.1f} | {mark(eight, 80)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model folder (Qwen2-Audio or Qwen2.5-Omni), or a built-in 7B "
                        "architecture: qwen2-audio-7b (the default) or omni-7b (Qwen2.5-Omni-7B's thinker)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=80, help="GiB per GPU")
    parser.add_argument("--prompts-per-gpu", type=int, default=1, help="prompts (SFT: sequences) per forward")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step (for FLOPs)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--algo", choices=("grpo", "sft"), default="grpo")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--target-tokens", type=int, default=TARGET_TOKENS, help="SFT target length")
    parser.add_argument("--attention", choices=("dense", "block"), default="block",
                        help="the packed passes' attention: visible blocks only (FlexAttention, on a GPU), or all "
                             "L^2 pairs over a dense mask (the fallback, train.py --dense-attention)")
    parser.add_argument("--max-steps", type=int, default=1000, help="for the disk: the run's length")
    parser.add_argument("--save-every", type=int, default=100, help="for the disk: a checkpoint every this many steps")
    parser.add_argument("--keep-last", type=int, default=3, help="for the disk: checkpoints kept")
    parser.add_argument("--summary", action="store_true", help="full vs LoRA, SFT vs GRPO, 1 and 8 GPUs")
    args = parser.parse_args(argv)
    config = load_config(args.model)
    if args.summary:
        return print(fit_summary(config, args.lora_rank or 64))
    print(report(config, args.gpus, args.prompts_per_gpu, args.prompts, args.group_size, args.prompt_tokens,
                 args.new_tokens, args.gpu_mem, args.beta, args.algo, args.lora_rank, args.target_tokens,
                 args.attention, args.max_steps, args.save_every, args.keep_last))


if __name__ == "__main__":
    main()
