"""What one GRPO step of the 7B costs: per-GPU memory, and FLOPs per optimizer step.

Purpose: before renting 8 GPUs, check that the run fits and how much compute a step is. Nothing is
allocated: the model is built on the meta device (model.meta_model) only to count its parameters.

Memory (per GPU, bytes), FSDP2 over N GPUs with bf16 compute and fp32 master weights (as
DeepSpeed ZeRO-3 in R1-AQA). Every row is one kind of tensor, with its formula. Rows belong to:
  state    lives through the whole step: fp32 master shard, fp32 gradient shard, AdamW moments,
           the frozen reference's bf16 shard
  rollout  only while sampling: the whole model gathered in bf16 (no collectives per token), and
           the KV cache of the G forked completions
  train    only during the policy pass (the reference pass needs less): gathered FSDP units,
           checkpointed activations, logits at completion positions
  total = state + max(rollout, train). No headroom for the CUDA context or fragmentation.

FLOPs per optimizer step (step_flops): 2 FLOPs per parameter per token for every matmul, plus
attention (q.k and p.v: 4 * hidden FLOPs per (query, key) pair per layer); the encoder always runs
on its full 30 s window (1500 positions) because the processor pads every clip to it.

    python plan.py                          # the 7B on 8 x 80 GB, R1-AQA settings
    python plan.py --model DIR --gpus 4 --gpu-mem 40 --prompt-tokens 350   # 10 s clips: 250 audio tokens
"""

import argparse
from dataclasses import dataclass

import model as qwen

GIB = 2**30
PARAMS_7B = 8_397_094_912
# R1-AQA's prompt for a 30 s clip: 750 audio placeholders (25 per second) + ~100 text tokens (chat
# frame, question, choices, instruction; about 75 with the Qwen2 tokenizer, rounded up).
PROMPT_TOKENS = 850


@dataclass
class Row:
    name: str
    bytes: int
    phase: str    # "state", "rollout" or "train"
    formula: str


@dataclass
class MemoryPlan:
    rows: list
    total: int        # state + max(rollout, train)
    gpu_bytes: int
    fits: bool


# -----------------------------------------------------------------------------
# Counting the model

def param_counts(model):
    """Parameters per part of a Qwen2AudioForConditionalGeneration (meta or real)."""
    count = lambda module: sum(p.numel() for p in module.parameters())
    parts = model.model
    return {
        "total": count(model),
        "audio_layers": count(parts.audio_tower.layers),
        "projector": count(parts.multi_modal_projector),
        "lm_layers": count(parts.language_model.layers),
        "lm_layer": count(parts.language_model.layers[0]),
        "lm_head": count(model.lm_head),
        # the FSDP root unit: all that is not inside an audio or decoder layer (embeddings, lm_head,
        # audio convolutions and positions, projector, final norms)
        "root": count(model) - count(parts.audio_tower.layers) - count(parts.language_model.layers),
    }


def count_model(config):
    """(parameter counts, sizes) of the architecture, from a model built on the meta device. The 7B's
    shapes must give its known parameter count: a check on model.config_7b() and on a loaded config."""
    counts, sizes = param_counts(qwen.meta_model(config)), shapes(config)
    if sizes == shapes(qwen.config_7b()):
        assert counts["total"] == PARAMS_7B, f"7B shapes but {counts['total']:,} parameters"
    return counts, sizes


def shapes(config):
    """The sizes the formulas use, from a Qwen2AudioConfig."""
    text, audio = config.text_config, config.audio_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return dict(layers=text.num_hidden_layers, hidden=text.hidden_size, kv=text.num_key_value_heads * head_dim,
                inter=text.intermediate_size, vocab=text.vocab_size, audio_layers=audio.encoder_layers,
                d_audio=audio.d_model, ffn_audio=audio.encoder_ffn_dim, mels=audio.num_mel_bins,
                frames=2 * audio.max_source_positions, positions=audio.max_source_positions)


# -----------------------------------------------------------------------------
# Memory per GPU

def state_rows(n, gpus, beta):
    """Sharded state, alive the whole step."""
    return [
        Row("master weights fp32 (shard)", n * 4 // gpus, "state", "params * 4 / gpus"),
        Row("gradients fp32 (shard)", n * 4 // gpus, "state", "params * 4 / gpus"),
        Row("AdamW exp_avg + exp_avg_sq", 2 * n * 4 // gpus, "state", "2 * params * 4 / gpus"),
        Row("reference weights bf16 (shard)", n * 2 // gpus if beta else 0, "state",
            "params * 2 / gpus, 0 if beta = 0"),
    ]


def rollout_rows(n, s, group_size, prompts, prompt_tokens, new_tokens):
    """Sampling: the whole model gathered in bf16, and the forked KV cache."""
    kv = 2 * s["layers"] * s["kv"] * (prompt_tokens + new_tokens) * group_size * prompts * 2
    return [
        Row("weights bf16, gathered for sampling", n * 2, "rollout", "params * 2"),
        Row("KV cache", kv, "rollout", "2 (k, v) * layers * kv_heads * head_dim * (prompt + new) * G * prompts * 2"),
    ]


def train_rows(p, s, group_size, prompts, prompt_tokens, new_tokens):
    """The policy pass over the packed sequences [prompt, c_1, ..., c_G], gradient checkpointing on
    every audio and decoder layer."""
    tokens = prompts * (prompt_tokens + group_size * new_tokens)           # packed length per GPU
    h, kv, i = s["hidden"], s["kv"], s["inter"]
    d, f, pos = s["d_audio"], s["ffn_audio"], s["positions"]
    completion = prompts * group_size * new_tokens                         # positions that get logits
    # FSDP2 with one unit per audio and decoder layer plus the root: the root (embeddings, lm_head,
    # ...) stays gathered through forward and backward, one decoder layer (the largest unit) runs
    # while the next is prefetched; each has bf16 weights and, in backward, unsharded bf16 gradients
    # waiting for the reduce-scatter.
    gathered = (p["root"] + 2 * p["lm_layer"]) * (2 + 2)
    # Saved inside one recomputed decoder layer, bytes per token: two RMSNorms (fp32 input + bf16
    # output: 6h each), q, k, v (2 * (h + 2kv)), attention output (2h), gate, up, silu(gate) and
    # their product (4 * 2i) = 16h + 4kv + 8i. Doubled: the gradients in flight during its backward.
    lm_layer = 2 * tokens * (16 * h + 4 * kv + 8 * i)
    # Encoder, elements per clip: the conv front end is not checkpointed (conv1 and its GELU at
    # 2 * positions, conv2 and its GELU at positions: 6 * positions * d); one recomputed layer saves
    # two LayerNorm inputs and outputs, q, k, v, the attention output, fc1 and GELU(fc1):
    # positions * (8d + 2f), doubled as above. bf16.
    audio = prompts * 2 * (6 * pos * d + 2 * pos * (8 * d + 2 * f))
    logits = completion * s["vocab"] * 4
    return [
        Row("FSDP units gathered (weights + grads bf16)", gathered, "train",
            "(root + 2 decoder layers) * (2 + 2); root = embeddings, lm_head, audio convs, projector"),
        Row("LM checkpoints", s["layers"] * tokens * h * 2, "train", "layers * tokens * hidden * 2"),
        Row("LM layer recomputed", lm_layer, "train", "2 * tokens * (16 hidden + 4 kv + 8 inter)"),
        Row("audio checkpoints", prompts * s["audio_layers"] * pos * d * 2, "train",
            "prompts * audio_layers * positions * d * 2"),
        Row("audio layer recomputed + convs", audio, "train",
            "prompts * 2 * (6 * positions * d + 2 * positions * (8d + 2f))"),
        Row("logits fp32 (completion positions)", logits, "train", "prompts * G * new * vocab * 4"),
        Row("log_softmax copy (saved)", logits, "train", "prompts * G * new * vocab * 4"),
        Row("logit gradient (backward)", logits, "train", "prompts * G * new * vocab * 4"),
    ]


def memory_plan(config, gpus=8, prompts_per_gpu=1, group_size=8, prompt_tokens=PROMPT_TOKENS,
                max_new_tokens=256, gpu_mem_gb=80, beta=0.04):
    """Per-GPU memory of one GRPO step, row by row. gpu_mem_gb is in GiB (an "80 GB" card has 80 GiB)."""
    p, s = count_model(config)
    rows = (state_rows(p["total"], gpus, beta)
            + rollout_rows(p["total"], s, group_size, prompts_per_gpu, prompt_tokens, max_new_tokens)
            + train_rows(p, s, group_size, prompts_per_gpu, prompt_tokens, max_new_tokens))
    phase = lambda name: sum(r.bytes for r in rows if r.phase == name)
    total = phase("state") + max(phase("rollout"), phase("train"))
    return MemoryPlan(rows, total, int(gpu_mem_gb * GIB), total <= gpu_mem_gb * GIB)


def format_plan(plan):
    """The plan as a text table, GiB per row and per phase."""
    lines = [f"{'per GPU':44s} {'GiB':>7s}  {'phase':7s}  formula"]
    lines += [f"{r.name:44s} {r.bytes / GIB:7.2f}  {r.phase:7s}  {r.formula}" for r in plan.rows]
    for name in ("state", "rollout", "train"):
        lines.append(f"{'  sum ' + name:44s} {sum(r.bytes for r in plan.rows if r.phase == name) / GIB:7.2f}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"{'total = state + max(rollout, train)':44s} {plan.total / GIB:7.2f}  "
                 f"{verdict} in {plan.gpu_bytes / GIB:.0f} GiB")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# FLOPs per optimizer step

def encoder_flops(p, s):
    """One clip through the audio encoder and projector, always the full window:
    conv1 + conv2 + 2 * layer params * positions + attention 4 * d * positions^2 per layer + projector."""
    conv1 = 2 * s["mels"] * 3 * s["d_audio"] * s["frames"]
    conv2 = 2 * s["d_audio"] * 3 * s["d_audio"] * s["positions"]
    layers = 2 * p["audio_layers"] * s["positions"] + 4 * s["d_audio"] * s["positions"] ** 2 * s["audio_layers"]
    return conv1 + conv2 + layers + 2 * p["projector"] * (s["positions"] // 2)


def lm_flops(p, s, tokens, pairs, logit_positions):
    """The decoder over `tokens` tokens with `pairs` (query, key) pairs per layer, and lm_head at
    `logit_positions`: 2 * layer params * tokens + 4 * hidden * pairs * layers + 2 * lm_head * positions."""
    return 2 * p["lm_layers"] * tokens + 4 * s["hidden"] * pairs * s["layers"] + 2 * p["lm_head"] * logit_positions


def pass_flops(p, s, group_size, prompt, new, packed):
    """One forward over a prompt's G completions (a rollout does the same matmuls, token by token).
    packed (ours): the audio encoded once, the prompt once, each completion token once, causal pairs
    P^2/2 + G*T*P + G*T^2/2, logits at the G*T completion positions.
    not packed (HF generate / TRL): G separate [prompt, completion] sequences, audio encoded G times,
    logits at every position."""
    if packed:
        pairs = prompt**2 / 2 + group_size * (new * prompt + new**2 / 2)
        return encoder_flops(p, s) + lm_flops(p, s, prompt + group_size * new, pairs, group_size * new)
    seq = prompt + new
    return group_size * (encoder_flops(p, s) + lm_flops(p, s, seq, seq**2 / 2, seq))


def step_flops(config, prompts=16, group_size=8, prompt_tokens=PROMPT_TOKENS, new_tokens=256, beta=0.04,
               checkpointing=True, packed=True):
    """Projected FLOPs of one optimizer step, per phase, all GPUs together:
    rollout = 1 pass; reference = 1 pass (0 if beta = 0); policy = forward + backward (2x forward),
    plus the forward recomputed by checkpointing: 4 passes (3 without). new_tokens = the completions'
    length (256 is the limit, so this is the upper bound)."""
    p, s = count_model(config)
    one = prompts * pass_flops(p, s, group_size, prompt_tokens, new_tokens, packed)
    phases = {"rollout": one, "reference": one if beta else 0, "policy": (4 if checkpointing else 3) * one}
    return {**phases, "total": sum(phases.values())}


# -----------------------------------------------------------------------------

def load_config(model_dir):
    """The config of a local Qwen2-Audio directory, or the 7B's."""
    if model_dir is None:
        return qwen.config_7b()
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_dir)


def flops_table(config, prompts, group_size, prompt_tokens, new_tokens, gpus, beta=0.04):
    ours = step_flops(config, prompts, group_size, prompt_tokens, new_tokens, beta)
    hf = step_flops(config, prompts, group_size, prompt_tokens, new_tokens, beta, packed=False)
    lines = [f"FLOPs per optimizer step: {prompts} prompts x G={group_size}, prompt {prompt_tokens} "
             f"tokens, completions of {new_tokens} tokens, checkpointing",
             f"{'phase':10s} {'ours PFLOP':>11s} {'HF/TRL PFLOP':>13s} {'ratio':>6s}"]
    for phase in ours:
        ratio = f"{ours[phase] / hf[phase]:6.2f}" if hf[phase] else f"{'-':>6s}"
        lines.append(f"{phase:10s} {ours[phase] / 1e15:11.2f} {hf[phase] / 1e15:13.2f} {ratio}")
    lines.append(f"per GPU: {ours['total'] / gpus / 1e15:.2f} PFLOP")
    return "\n".join(lines)


def report(config, gpus=8, prompts_per_gpu=1, prompts=16, group_size=8, prompt_tokens=PROMPT_TOKENS,
           new_tokens=256, gpu_mem_gb=80, beta=0.04):
    """The whole plan as text: the memory table, then the FLOPs. train.py --plan prints this too."""
    plan = memory_plan(config, gpus, prompts_per_gpu, group_size, prompt_tokens, new_tokens, gpu_mem_gb, beta)
    head = (f"memory per GPU: {gpus} GPUs, {prompts_per_gpu} prompt(s) x G={group_size} per GPU, "
            f"prompt {prompt_tokens} tokens + {new_tokens} new, beta={beta}")
    flops = flops_table(config, prompts, group_size, prompt_tokens, new_tokens, gpus, beta)
    return "\n".join([head, format_plan(plan), "", flops])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local Qwen2-Audio directory (default: the 7B architecture)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=80, help="GiB per GPU")
    parser.add_argument("--prompts-per-gpu", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per optimizer step (for FLOPs)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.04)
    args = parser.parse_args()
    print(report(load_config(args.model), args.gpus, args.prompts_per_gpu, args.prompts, args.group_size,
                 args.prompt_tokens, args.new_tokens, args.gpu_mem, args.beta))


if __name__ == "__main__":
    main()
