"""Train Qwen2-Audio with GRPO, the R1-AQA recipe, or with supervised fine-tuning, on one process or many.

GRPO (the default), each step: take prompts_per_step questions, sample group_size answers to each,
score them with the R1-AQA rewards, turn the rewards into group-relative advantages, and take an
AdamW step on the clipped-surrogate + KL loss (all the math is in grpo.py). SFT (--algo sft, the
paper's baseline): the same questions, cross-entropy on the correct answer. The model is always
sharded with FSDP2: fp32 master weights (or, with --lora-rank, a frozen base and fp32 adapters),
bf16 compute, and a process group of one when not launched by torchrun.

    python train.py                      # the CPU workshop demo: tiny model, synthetic pitch task
    torchrun --nproc_per_node 8 train.py --model /path/Qwen2-Audio-7B-Instruct --data train.jsonl
    python train.py --help               # every flag; R1-AQA's values are the defaults
"""

import argparse
import inspect
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import batches as B
import checkpoint
import curriculum
import data
import evaluate
import grpo
import lora as L
import model as M
import plan
import reward
from model import print0


@dataclass
class Config:
    model: str = "tiny"  # a local Qwen2-Audio or Qwen2.5-Omni folder, or "tiny" / "tiny-omni" (built offline in --cache-dir)
    data: str = "synthetic"  # training data (R1-AQA JSONL, MMAU JSON or plain JSONL), or "synthetic"
    audio_dir: str = ""  # folder that relative audio paths in the data refer to ("" = the data file's folder)
    downmix: str = "first"  # multi-channel audio: keep channel 0 ("first", R1-AQA) or average the channels ("mean")
    eval_data: str = ""  # held-out data scored before and after training ("" = none; synthetic: its test split)
    out: str = "runs/demo"  # run folder: metrics.jsonl, samples.jsonl, checkpoint-{step}/
    cache_dir: str = "runs"  # where the tiny model and the synthetic task are built
    algo: str = "grpo"  # grpo, or sft: supervised fine-tuning on the correct answer (the paper's baseline)
    max_steps: int = 1000  # optimizer steps; each takes one global batch of questions
    prompts_per_step: int = 16  # global batch in prompts (all processes together)
    micro_batch: int = 1  # prompts per forward on each process, for sampling and for training
    group_size: int = 8  # G: completions sampled per prompt
    lr: float = 1e-6  # AdamW learning rate (when not given: 1e-6 GRPO, 1e-5 GRPO+LoRA and SFT, 1e-4 SFT+LoRA)
    lr_decay: bool = True  # decay the learning rate linearly to 0 over the run (R1-AQA); off = constant
    beta: float = 0.04  # KL weight; 0 drops the reference model entirely
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high] (PPO; R1-AQA 0.2)
    clip_high: float = 0.2  # upper clip range; DAPO's clip-higher uses 0.28
    num_iterations: int = 1  # optimizer steps per rollout batch (mu); > 1 makes the clip act
    loss_aggregation: str = "sequence_mean"  # sequence_mean (R1-AQA), token_mean (DAPO), token_sum (Dr. GRPO)
    advantage_scale: str = "group"  # divide advantages by the group's std (R1-AQA), the batch's, or none (Dr. GRPO)
    ratio_level: str = "token"  # importance ratio per token (R1-AQA), or per sequence (GSPO)
    mask_truncated: bool = False  # leave completions cut off at --max-new-tokens out of the loss (DAPO)
    dynamic_sampling: int = 0  # extra rounds of prompts to replace groups with equal rewards (DAPO; 0 = off)
    temperature: float = 1.0  # sampling temperature (also divides the logits in the loss)
    top_k: int = 50  # sample among the k likeliest tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    max_new_tokens: int = 256  # completion length limit
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 42  # data order and sampling noise
    prompt: str = "answer"  # the paper's prompt: direct (<1>), answer (<2>, R1-AQA), think (<3>); sets the format reward
    think_words: int = 0  # with --prompt think: ask for a reasoning of fewer words than this (Ke-Omni-R: 50; 0 = no limit)
    system_prompt: str = ""  # the chat's system turn ("" = the chat template's default, as R1-AQA and Ke-Omni-R)
    dtype: str = "bfloat16"  # compute dtype (bfloat16 or float32); weights and optimizer stay fp32
    gradient_checkpointing: bool = True  # recompute layer activations in backward to save memory
    dense_attention: bool = False  # packed passes over a dense [B, 1, L, L] mask (the fallback), not FlexAttention on a GPU
    lora_rank: int = 0  # LoRA adapters of this rank on a frozen base (0 = train every weight)
    lora_alpha: float = 16.0  # LoRA scaling is alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (> 0: 1 and 2 processes no longer agree)
    lora_targets: str = ",".join(L.LM_TARGETS)  # language-model linears that get adapters (lm_head too if named)
    lora_audio: bool = False  # also put adapters on every linear of the audio encoder
    balance_answers: bool = False  # order the data so every batch has each answer equally often
    curriculum: int = 0  # SARI: sample this many completions per question first, then train easy to hard (0 = off)
    reward_weights: str = "1,1"  # weights of the accuracy and format rewards (R1-AQA 1,1)
    warm_start_steps: int = 0  # supervised steps on the answer FORMAT only (random answers), before GRPO
    warm_start_lr: float = 3e-3  # learning rate of the warm start
    save_every: int = 100  # write a checkpoint every this many steps (and at the end)
    keep_last: int = 3  # newest checkpoints kept (>= 1), besides checkpoint-0
    resume: bool = False  # continue the run in --out from its newest complete checkpoint (same settings)
    overwrite: bool = False  # start over in an --out that holds a run, deleting its checkpoints and logs
    log_samples: int = 2  # completions per step written to samples.jsonl
    max_bad_fraction: float = 0.01  # stop if more than this share of samples has unreadable audio
    eval_samples: int = 200  # held-out questions scored (the first N of --eval-data)
    eval_every: int = 0  # also score them at every checkpoint whose step is a multiple of this (0 = never)
    plan: bool = False  # print the per-GPU memory plan and FLOPs of this config (the 7B unless --model is a folder), exit
    gpus: int = 8  # number of GPUs the --plan is for
    gpu_mem: float = 80.0  # GiB per GPU that the --plan checks against


# The workshop demo (`python train.py`): a tiny model learns a synthetic task on a laptop CPU in minutes.
# R1-AQA's values above stay the defaults for real models; flags given explicitly override these.
# beta 0.1 rather than 0.04: a stronger pull towards the reference keeps some probability on every
# answer, so a class the policy gets wrong still yields a correct sample to learn from. At 0.04 (and
# with G = 16 too) some seeds stalled at 50% or 75%, every group of the unlearned classes all wrong.
# A constant lr: with R1-AQA's linear decay the tiny model had not started to listen by step 250.
DEMO = dict(max_steps=600, prompts_per_step=32, micro_batch=32, lr=1e-3, lr_decay=False, beta=0.1,
            max_new_tokens=16, dtype="float32", gradient_checkpointing=False, balance_answers=True,
            warm_start_steps=60, save_every=50, seed=0)
# The learning rate when none is given, by (algo, LoRA). GRPO: R1-AQA's 1e-6. The paper does not give its
# SFT settings; these are the common choices for a 7B model, ten times higher for LoRA's few weights
# than for all of them: 1e-5 for full SFT, 1e-4 for LoRA SFT (as in the LoRA and QLoRA papers' 7B
# runs), and 1e-5 for GRPO with LoRA. A choice, not the paper's values.
DEFAULT_LR = {("grpo", False): 1e-6, ("grpo", True): 1e-5, ("sft", False): 1e-5, ("sft", True): 1e-4}


def parse_args(argv=None):
    """Config fields become flags (max_steps -> --max-steps), with the field's comment as help."""
    helps = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Config):
        flag, kind = "--" + f.name.replace("_", "-"), {} if f.type is bool else {"type": f.type}
        action = argparse.BooleanOptionalAction if f.type is bool else "store"
        parser.add_argument(flag, action=action, default=None, help=f"{helps[f.name]} (default {f.default})", **kind)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    demo = (given.get("model", "tiny") in M.TINY_MODELS and given.get("data", "synthetic") == "synthetic"
            and not given.get("plan"))
    cfg = replace(Config(), **{**(DEMO if demo else {}), **given})
    if "lr" not in given and not demo:
        cfg.lr = DEFAULT_LR.get((cfg.algo, cfg.lora_rank > 0), cfg.lr)
    return cfg, demo


WARM_START_BATCH = 16  # questions per warm-start step, all processes together


def validate(cfg, world):
    """Flags that make no sense stop the run before anything is built, each named with the reason."""
    problems = [f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: {why}"
                for ok, flag, why in sampling_rules(cfg) + batch_rules(cfg, world) + mode_rules(cfg) if not ok]
    if problems:
        raise M.UsageError("; ".join(problems))


def sampling_rules(cfg):
    return [
        (cfg.algo in ("grpo", "sft"), "algo", "must be grpo or sft"),
        (cfg.temperature > 0, "temperature", "must be > 0: it divides the logits"),
        (cfg.group_size >= 2 or cfg.algo == "sft", "group_size", "GRPO compares completions: at least 2 per prompt"),
        (0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]"),
        (cfg.top_k >= 0, "top_k", "must be >= 0 (0 = no limit)"),
        (cfg.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        (cfg.beta >= 0, "beta", "must be >= 0 (0 = no KL term and no reference model)"),
        (cfg.lr >= 0, "lr", "must be >= 0"),
        (cfg.warm_start_lr >= 0, "warm_start_lr", "must be >= 0"),
        (0 < cfg.clip_low < 1, "clip_low", "must be in (0, 1)"),
        (cfg.clip_high > 0, "clip_high", "must be > 0"),
        (cfg.num_iterations >= 1, "num_iterations", "must be >= 1"),
        (cfg.grad_clip > 0, "grad_clip", "must be > 0"),
        (cfg.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (cfg.loss_aggregation in grpo.AGGREGATIONS, "loss_aggregation", f"must be one of {', '.join(grpo.AGGREGATIONS)}"),
        (cfg.advantage_scale in grpo.ADVANTAGE_SCALES, "advantage_scale",
         f"must be one of {', '.join(grpo.ADVANTAGE_SCALES)}"),
        (cfg.ratio_level in grpo.RATIO_LEVELS, "ratio_level", f"must be one of {', '.join(grpo.RATIO_LEVELS)}"),
        (cfg.dynamic_sampling >= 0, "dynamic_sampling", "must be >= 0 (extra rounds; 0 = off)"),
        (cfg.curriculum >= 0, "curriculum", "must be >= 0 (completions per question; 0 = off)"),
        (reward_weights(cfg) is not None, "reward_weights", "must be two numbers >= 0: accuracy,format"),
    ]


def batch_rules(cfg, world):
    share = cfg.prompts_per_step // world
    return [
        (cfg.max_steps >= 0, "max_steps", "must be >= 0"),
        (cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world == 0, "prompts_per_step",
         f"the global batch must split evenly over the {world} process(es)"),
        (cfg.micro_batch >= 1 and share % min(cfg.micro_batch, max(share, 1)) == 0, "micro_batch",
         f"must divide each process's {share} prompts (or be at least that many)"),
        (cfg.warm_start_steps >= 0 and (cfg.warm_start_steps == 0 or WARM_START_BATCH % world == 0),
         "warm_start_steps", f"must be >= 0, and its batch of {WARM_START_BATCH} must split over {world} processes"),
        (cfg.save_every >= 1, "save_every", "must be >= 1"),
        (cfg.keep_last >= 1, "keep_last", "must be >= 1: the newest checkpoint is what --resume continues from"),
        (0 <= cfg.max_bad_fraction <= 1, "max_bad_fraction", "must be in [0, 1]"),
        (cfg.eval_samples >= 0, "eval_samples", "must be >= 0"),
        (cfg.eval_every >= 0 and cfg.eval_every % cfg.save_every == 0, "eval_every",
         "must be >= 0 and a multiple of --save-every: it scores checkpoints"),
        (cfg.log_samples >= 0, "log_samples", "must be >= 0"),
    ]


def mode_rules(cfg):
    lora_given = (cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.lora_audio) != (
        Config.lora_alpha, Config.lora_dropout, Config.lora_targets, Config.lora_audio)
    return [
        (cfg.dtype in ("bfloat16", "float32"), "dtype", "must be bfloat16 or float32"),
        (cfg.prompt in data.PROMPTS, "prompt", f"must be one of {', '.join(data.PROMPTS)}"),
        (cfg.think_words >= 0 and (cfg.think_words == 0 or cfg.prompt == "think"), "think_words",
         "must be >= 0, and only the think prompt asks for a reasoning"),
        (cfg.downmix in data.DOWNMIX, "downmix", f"must be one of {', '.join(data.DOWNMIX)}"),
        (cfg.prompt != "think" or (cfg.algo == "grpo" and not cfg.warm_start_steps), "prompt",
         "has no supervised target for --algo sft or --warm-start-steps: the data holds answers, not reasoning"),
        (cfg.lora_rank >= 0, "lora_rank", "must be >= 0 (0 = no LoRA)"),
        (cfg.lora_rank > 0 or not lora_given, "lora_rank",
         "is 0, so --lora-alpha/--lora-dropout/--lora-targets/--lora-audio would do nothing: give a rank"),
        (cfg.lora_rank == 0 or not cfg.warm_start_steps, "lora_rank",
         "with --warm-start-steps: warm start a full model first, then start LoRA from its checkpoint-0"),
        (0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
    ]


def reward_weights(cfg):
    """(accuracy weight, format weight) from --reward-weights, or None if it does not parse."""
    try:
        weights = tuple(float(w) for w in cfg.reward_weights.split(","))
    except ValueError:
        return None
    return weights if len(weights) == 2 and min(weights) >= 0 else None


def check_paths(cfg):
    """The model folder, the data files and the audio folder exist, before anything is built."""
    if cfg.model not in M.TINY_MODELS:
        M.check_model_dir(cfg.model)
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path and path != "synthetic" and not Path(path).is_file():
            what = "is a folder, not a question file" if Path(path).is_dir() else "no such file"
            raise M.UsageError(f"{flag} {path}: {what} (give an R1-AQA/AVQA JSONL, MMAU JSON or plain JSONL file"
                               + (", or `synthetic`)" if flag == "--data" else ")"))
    if cfg.audio_dir:
        try:
            data.check_audio_dir(cfg.audio_dir)
        except data.DataError as e:
            raise M.UsageError(f"{e} (it is where relative audio paths in the data are looked up; leave it "
                               f"out to use the data file's folder)") from None


# -----------------------------------------------------------------------------
# One GRPO step

@dataclass
class Run:
    """Everything a step needs, built once."""
    cfg: Config
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # a frozen copy; None with beta 0, or with LoRA (the adapters are switched off)
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train: list
    device: torch.device
    end_ids: list
    pad_id: int
    suppress_ids: list
    counts: dict  # samples seen and unreadable, on this rank
    base: Path  # the model folder the policy was loaded from
    lora: L.LoRASettings | None = None
    pass_rates: list | None = None  # the curriculum's, per training question


@dataclass
class Group:
    """One micro-batch of rollouts with its scores."""
    rollout: grpo.Rollout
    samples: list
    completions: list          # N decoded texts
    rewards: torch.Tensor      # [N]
    accuracy: torch.Tensor     # [N]
    format: torch.Tensor       # [N]
    valid: torch.Tensor        # [N] bool, False = unreadable audio (never trained on)
    lengths: torch.Tensor      # [N] completion tokens, up to and including the first end token
    advantages: torch.Tensor | None = None  # [N]
    ref_logp: torch.Tensor | None = None  # [N, T]
    old_logp: torch.Tensor | None = None  # [N, T]


def rollout(run, step, positions, samples):
    """Sample and score this rank's groups, micro-batch by micro-batch, with the weights gathered once."""
    cfg, groups = run.cfg, []
    run.policy.eval()  # generation must not run with gradient checkpointing (it would drop the KV cache)
    with M.unsharded(run.policy):
        for pos, batch in zip(B.chunks(positions, cfg.micro_batch), B.chunks(samples, cfg.micro_batch)):
            audios, ok = B.read_audio(batch, cfg.downmix, run.counts)
            inputs = collate(run, batch, audios)
            gens = grpo.prompt_generators(cfg.seed, step, pos, run.device)
            r = grpo.generate_groups(run.policy, inputs, gens, cfg.group_size,
                                     cfg.max_new_tokens, run.end_ids, run.pad_id, run.suppress_ids,
                                     cfg.temperature, cfg.top_k, cfg.top_p)
            groups.append(score(run, r, batch, ok))
    return groups


def score(run, r, samples, ok):
    """Rewards of every completion. Unreadable audio, and with --mask-truncated completions cut off at
    the length limit, are masked out of the loss."""
    texts = run.processor.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
    answers = [s.answer for s in samples for _ in range(r.group_size)]
    scores = [reward.score(t, a, run.cfg.prompt, *reward_weights(run.cfg)) for t, a in zip(texts, answers)]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=run.device)
    valid = torch.tensor(ok, device=run.device).repeat_interleave(r.group_size)  # [N]
    lengths = r.mask.sum(1)                                                  # [N]
    r.mask &= valid[:, None]                                                 # [N, T]
    if run.cfg.mask_truncated:
        r.mask = grpo.mask_truncated(r.mask, r.completion_ids, run.end_ids)  # [N, T]
    return Group(r, samples, texts, as_tensor([s.total for s in scores]), as_tensor([s.accuracy for s in scores]),
                 as_tensor([s.format for s in scores]), valid, lengths)


def sample_groups(run, step):
    """This rank's groups for the step, and (prompts sampled, groups dropped) over all ranks. With
    --dynamic-sampling R, groups whose rewards are all equal (no policy gradient) are dropped and up to
    R extra rounds of prompts are sampled, until the global batch holds prompts_per_step informative
    groups (DAPO's dynamic sampling, Yu et al., arXiv 2503.14476). Every rank decides from all-reduced
    flags, so all stop together; every round's prompts are a pure function of (seed, step, round)."""
    cfg, P, answers = run.cfg, run.cfg.prompts_per_step, [s.answer for s in run.train]
    positions = B.my_share(list(range(P)), dist.get_rank(), dist.get_world_size())
    groups, informative = [], []
    for extra in range(cfg.dynamic_sampling + 1):
        indices = B.step_indices(cfg, answers, step, extra, run.pass_rates)
        new = rollout(run, step, [extra * P + p for p in positions], [run.train[indices[p]] for p in positions])
        flags = torch.zeros(P, device=run.device)                             # [P] over all ranks
        flags[positions] = torch.cat([grpo.informative_groups(g.rewards, cfg.group_size).float() for g in new])
        groups, informative = groups + new, informative + [all_sum(flags)]
        if not cfg.dynamic_sampling or torch.cat(informative).sum() >= P:
            break
    if not cfg.dynamic_sampling:
        return groups, P, 0
    keep = torch.cat(informative).bool()                                      # [rounds * P]
    keep &= keep.cumsum(0) <= P                                               # the first P informative groups
    mine = torch.cat([keep[r * P:(r + 1) * P][positions] for r in range(len(informative))])  # this rank's prompts
    for g, kept in zip(groups, B.chunks(mine, cfg.micro_batch)):
        g.rollout.mask &= kept.repeat_interleave(cfg.group_size)[:, None]
    return groups, len(informative) * P, len(informative) * P - int(keep.sum())


def train_step(run, step):
    cfg, world = run.cfg, dist.get_world_size()
    t0 = time.time()
    sampled_groups, sampled, dropped = sample_groups(run, step)
    per_round = len(B.chunks(B.my_share(range(cfg.prompts_per_step), 0, world), cfg.micro_batch))
    stats = rollout_stats(run, sampled_groups[:per_round])  # the step's own prompts, before any is dropped
    groups = trained_groups(run, sampled_groups)
    set_advantages(run, groups)
    with torch.no_grad():
        for g in groups:
            if cfg.beta:
                g.ref_logp = reference_logprobs(run, g.rollout)
            if cfg.num_iterations > 1:  # the policy as it sampled; with mu = 1 it is logp.detach()
                g.old_logp = logprobs(run, run.policy, g.rollout)
    if run.ref is not None:
        M.reshard(run.ref)  # it never runs backward, which is where FSDP would free its root units
    denominator = loss_denominator(run, groups)
    run.policy.train()
    skipped = 0
    for _ in range(cfg.num_iterations):
        losses = optimizer_step(run, groups, denominator)  # the metrics of the last pass are logged
        skipped += losses["skipped"]
    stats.update(losses, skipped=skipped, prompts_sampled=sampled, groups_dropped=dropped)
    metrics = {"step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0], "seconds": time.time() - t0}
    return metrics, sample_records(run, sampled_groups, step + 1)


def trained_groups(run, groups):
    """The micro-batches that go through the policy pass: all of them, but with dynamic sampling only
    those in which some rank kept a group. Every rank keeps the same micro-batch slots, so each runs
    the same number of forwards and backwards (FSDP's collectives line up)."""
    if not run.cfg.dynamic_sampling:
        return groups
    used = all_sum(torch.stack([g.rollout.mask.any().float() for g in groups]))  # [micro-batches] over ranks
    return [g for g, n in zip(groups, used.tolist()) if n > 0]


def set_advantages(run, groups):
    """Group-relative advantages; with --advantage-scale batch, the std of every trained reward of the
    global batch (summed over ranks, so one process equals two). Masked samples get 0."""
    cfg, batch_std = run.cfg, None
    trained = [g.rollout.mask.any(1) for g in groups]                                  # [N] each
    if cfg.advantage_scale == "batch":
        sums = sum(grpo.reward_sums(g.rewards[t]) for g, t in zip(groups, trained))    # [3]
        batch_std = grpo.reward_std(all_sum(sums))
    for g, t in zip(groups, trained):
        g.advantages = grpo.group_advantages(g.rewards, cfg.group_size, cfg.advantage_scale, batch_std) * t


def collate(run, samples, audios):
    """The model's batch for these samples, asked the run's way (prompt, word limit, system turn)."""
    cfg = run.cfg
    return M.collate(run.processor, samples, audios, cfg.prompt, cfg.system_prompt or None,
                     cfg.think_words).to(run.device)


def reference_logprobs(run, rollout):
    """Log-probs under the frozen reference: its own sharded copy, or with LoRA the policy itself with
    its adapters switched off (the base model, with no second copy of the weights)."""
    if run.ref is not None:
        return logprobs(run, run.ref, rollout)
    with L.adapters_disabled(run.policy):
        return logprobs(run, run.policy, rollout)


def logprobs(run, model, rollout, temperature=None):
    """grpo.completion_logprobs with the run's temperature and attention: FlexAttention on a GPU, the dense
    mask on a CPU or with --dense-attention."""
    flex = False if run.cfg.dense_attention else None
    temperature = run.cfg.temperature if temperature is None else temperature
    return grpo.completion_logprobs(model, rollout, run.pad_id, temperature, flex)


def loss_denominator(run, groups):
    """Normalise by the whole global batch, not per micro-batch or per rank: its trained sequences, its
    trained tokens, or sequences x max_new_tokens (grpo.aggregate). FSDP averages gradients over ranks,
    so each rank divides by (global count / world size)."""
    cfg = run.cfg
    rows = sum(g.rollout.mask.any(1).sum() for g in groups)
    local = {"sequence_mean": rows, "token_mean": sum(g.rollout.mask.sum() for g in groups),
             "token_sum": rows * cfg.max_new_tokens}[cfg.loss_aggregation]
    return all_sum(torch.stack([torch.as_tensor(local, device=run.device).float()]))[0].clamp(min=1) / dist.get_world_size()


def optimizer_step(run, groups, denominator):
    """Accumulate the loss over micro-batches, clip, and step (or skip on a non-finite norm)."""
    cfg, sums = run.cfg, torch.zeros(5, device=run.device)
    for g in groups:
        logp = logprobs(run, run.policy, g.rollout)                                       # [N, T]
        old = logp.detach() if g.old_logp is None else g.old_logp
        loss, m = grpo.grpo_loss(logp, old, g.ref_logp, g.advantages, g.rollout.mask, cfg.beta, cfg.clip_low,
                                 cfg.clip_high, cfg.loss_aggregation, denominator, cfg.ratio_level)
        loss.backward()
        sums += torch.stack([m[k] * m["tokens"] for k in ("kl", "clip_frac", "clip_frac_low", "clip_frac_high")]
                            + [m["tokens"]])
    grad_norm, finite = clip_and_step(run.policy, run.optimizer, cfg.grad_clip)
    run.scheduler.step()
    kl, clip, low, high, tokens = all_sum(sums).tolist()
    tokens = max(tokens, 1)
    return {"kl": kl / tokens, "clip_frac": clip / tokens, "clip_frac_low": low / tokens,
            "clip_frac_high": high / tokens, "grad_norm": grad_norm, "skipped": int(not finite)}


def clip_and_step(model, optimizer, max_norm):
    """Clip the accumulated gradients and step; a non-finite norm (it is global, so every rank sees the
    same value) skips the update on all ranks. Returns (grad norm, whether the step was taken)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), finite


def rollout_stats(run, groups):
    """Means over the global batch of readable samples: what the policy does, before any is dropped."""
    G = run.cfg.group_size
    rows = []
    for g in groups:
        valid = g.valid.float()                                         # [N]
        zero_std = (g.rewards.view(-1, G).std(1) == 0).float().repeat_interleave(G)  # [N]
        rows.append(torch.stack([valid, g.rewards * valid, g.accuracy * valid, g.format * valid,
                                 g.lengths * valid, zero_std * valid]).sum(1))
    n, rew, acc, fmt, length, zero = all_sum(torch.stack(rows).sum(0)).tolist()
    n = max(n, 1)
    return {"reward": rew / n, "accuracy": acc / n, "format": fmt / n, "completion_len": length / n,
            "frac_zero_std": zero / n}


def all_sum(x):
    dist.all_reduce(x)
    return x


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Supervised steps: SFT (--algo sft) and the format warm start, on the same packed forward as GRPO

def sft_step(run, step):
    """Supervised fine-tuning on the questions GRPO would see at this step: the target is the correct
    choice in the prompt's format (data.target_text), then the end token."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    indices = B.step_indices(cfg, [s.answer for s in run.train], step, pass_rates=run.pass_rates)
    batch = B.my_share([run.train[i] for i in indices], rank, world)
    targets = [data.target_text(s.answer, cfg.prompt) + M.END_TOKENS[0] for s in batch]
    run.policy.train()
    stats = supervised_step(run, run.optimizer, batch, targets, run.counts)
    run.scheduler.step()
    return {"step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0], "seconds": time.time() - t0}, []


def supervised_step(run, optimizer, samples, targets, counts=None):
    """One optimizer step of cross-entropy on the target texts of this rank's share of a global batch,
    micro-batch by micro-batch (as GRPO's steps, so the forwards are the same on 1 process as on 2).
    The loss is the sum of -log p over the global batch's target tokens over their number (grpo.sft_loss).
    Logged: that loss, and p(answer), the mean probability of a whole target."""
    batches = [teacher_forced(run, s, t, counts) for s, t in zip(B.chunks(samples, run.cfg.micro_batch),
                                                                 B.chunks(targets, run.cfg.micro_batch))]
    tokens = all_sum(sum(r.mask.sum() for r in batches).float()) / dist.get_world_size()
    sums = torch.zeros(3, device=run.device)
    for r in batches:
        logp = logprobs(run, run.policy, r, temperature=1.0)                      # [B, T] targets: no temperature
        loss, m = grpo.sft_loss(logp, r.mask, tokens)
        loss.backward()
        sums += torch.stack([m["nll"] * m["tokens"], m["answer_prob"] * m["sequences"], m["sequences"]])
    grad_norm, finite = clip_and_step(run.policy, optimizer, run.cfg.grad_clip)
    nll, prob, n = all_sum(sums).tolist()
    return {"loss": nll / max(float(tokens) * dist.get_world_size(), 1), "answer_prob": prob / max(n, 1),
            "grad_norm": grad_norm, "skipped": int(not finite)}


def teacher_forced(run, samples, targets, counts=None):
    """A Rollout whose completions are given texts (group size 1), for supervised log-probs. A sample
    with unreadable audio keeps its place with silence and an empty mask."""
    audios, ok = B.read_audio(samples, run.cfg.downmix, counts)
    inputs = collate(run, samples, audios)
    ids = run.processor.tokenizer(targets, add_special_tokens=False, padding="longest", padding_side="right",
                                  return_tensors="pt")["input_ids"].to(run.device)
    prompts = [row[m.bool()] for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    mask = grpo.completion_mask(ids, run.end_ids) & torch.tensor(ok, device=run.device)[:, None]
    return grpo.Rollout(prompts, inputs["input_features"], inputs["feature_attention_mask"], ids, mask, group_size=1)


def warm_start(run, steps, lr):
    """Teach a random model the answer FORMAT only: `<answer>{a random choice}</answer>`. It then
    starts GRPO at chance accuracy with a good format, and has to learn to listen. The questions and
    the random answers are drawn for the whole global batch before each process takes its share, so
    the warm start, like everything after it, does not depend on the number of processes."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(trainable(run.policy), lr=lr, weight_decay=0.0)
    run.policy.train()
    for _ in tqdm(range(steps), desc="warm start (format only)", disable=rank != 0):
        batch = [run.train[i] for i in rng.choice(len(run.train), WARM_START_BATCH)]
        targets = [data.target_text(rng.choice(s.choices), cfg.prompt) + M.END_TOKENS[0] for s in batch]
        supervised_step(run, opt, B.my_share(batch, rank, world), B.my_share(targets, rank, world))


@torch.no_grad()
def heldout(run, samples):
    """The held-out questions scored as evaluate.py scores a checkpoint: greedy completions from its
    generate (the checkpoint's generation settings), MMAU's string match on the first answer tag, per
    category too; plus the rate of completions in the prompt's format. Every rank decodes its share."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    run.policy.eval()
    records = []
    with M.unsharded(run.policy):
        for batch in B.chunks(B.my_share(list(enumerate(samples)), rank, world), cfg.micro_batch):
            audios, _ = B.read_audio([s for _, s in batch], cfg.downmix)
            texts = evaluate.generate(run.policy, run.processor, [s for _, s in batch], audios, cfg.prompt,
                                      cfg.max_new_tokens, cfg.system_prompt or None, cfg.think_words)
            records += [evaluate.output_record(s, evaluate.Prediction(i, t, reward.extract_answer(t)))
                        for (i, s), t in zip(batch, texts)]
    everyone = [None] * world
    dist.all_gather_object(everyone, records)
    records = [r for part in everyone for r in part]
    s = evaluate.score(records, "model_prediction")
    groups = {f"{field}={value}": t.accuracy / 100 for field, tallies in s.groups.items() for value, t in tallies.items()}
    return {"eval_accuracy": s.total.accuracy / 100, "eval_format":
            sum(reward.format_reward(r["model_output"], cfg.prompt) for r in records) / max(len(records), 1),
            "eval_questions": s.total.total, "eval_groups": groups}


# -----------------------------------------------------------------------------
# Logs

def sample_records(run, groups, step):
    g = groups[0]
    return [{"step": step, "question": g.samples[i // g.rollout.group_size].question,
             "answer": g.samples[i // g.rollout.group_size].answer, "completion": g.completions[i],
             "reward": g.rewards[i].item()} for i in range(min(run.cfg.log_samples, len(g.completions)))]


def text_chart(values, height=8, width=60, label=""):
    """A plain-text line chart of values in [0, 1], resampled to `width` columns."""
    cols = [values[min(int(i * len(values) / width), len(values) - 1)] for i in range(min(width, len(values)))]
    rows = []
    for level in range(height, 0, -1):
        lo = (level - 1) / height
        rows.append(f"{lo + 1 / height:4.2f} |" + "".join("█" if v > lo else " " for v in cols))
    rows.append("     +" + "-" * len(cols) + f"  {label} over {len(values)} steps")
    return "\n".join(rows)


def progress(cfg, m):
    """The progress line's numbers for one step."""
    if cfg.algo == "sft":
        return f"loss {m['loss']:.3f} p(answer) {m['answer_prob']:.2f} {cfg.prompts_per_step / m['seconds']:.0f} q/s"
    return (f"reward {m['reward']:.2f} acc {m['accuracy']:.2f} fmt {m['format']:.2f} kl {m['kl']:.4f} "
            f"{m['prompts_sampled'] * cfg.group_size / m['seconds']:.0f} c/s")


# -----------------------------------------------------------------------------
# Setup and the loop

def build_run(cfg, model_dir, train, device):
    compute = getattr(torch, cfg.dtype)
    lora = lora_settings(cfg)
    try:
        policy = M.sharded_load(model_dir, param_dtype=compute, storage_dtype=torch.float32,
                                gradient_checkpointing=cfg.gradient_checkpointing, lora=lora)
    except L.LoRAError as e:
        raise M.UsageError(f"--lora-targets/--lora-rank: {e}") from None
    processor = M.load_processor(model_dir)
    optimizer = torch.optim.AdamW(trainable(policy), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    updates = max(cfg.max_steps * (cfg.num_iterations if cfg.algo == "grpo" else 1), 1)
    decay = (lambda u: max(0.0, 1 - u / updates)) if cfg.lr_decay else (lambda u: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    tok = processor.tokenizer
    return Run(cfg, policy, None, processor, optimizer, scheduler, train, device, M.end_token_ids(tok),
               tok.pad_token_id, M.suppressed_token_ids(tok, policy.config.text_config.vocab_size),
               {"seen": 0, "bad": 0}, Path(model_dir).resolve(), lora)


def lora_settings(cfg):
    if not cfg.lora_rank:
        return None
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    return L.LoRASettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.lora_audio, cfg.seed)


def reference(cfg, path):
    """The frozen reference: the policy at step 0, in the compute dtype, sharded, without grads. None with
    beta 0 or SFT (no KL term), and with LoRA (the policy with its adapters off is the reference)."""
    if cfg.beta == 0 or cfg.algo == "sft" or cfg.lora_rank:
        return None
    ref = M.sharded_load(path, storage_dtype=getattr(torch, cfg.dtype))
    return ref.requires_grad_(False).eval()


def check_bad_fraction(run):
    """Stop (on every rank at once) when more than max_bad_fraction of the samples seen were unreadable;
    the first few bad ones are always tolerated (the fraction is taken of at least 100)."""
    counts = torch.tensor([run.counts["bad"], run.counts["seen"]], dtype=torch.float64, device=run.device)
    bad, seen = all_sum(counts).tolist()
    if bad > run.cfg.max_bad_fraction * max(seen, 100):
        raise SystemExit(f"stopping: {int(bad)} of {int(seen)} samples had unreadable audio "
                         f"(more than --max-bad-fraction {run.cfg.max_bad_fraction}); run `python data.py` on the data")
    return int(bad)


def print_plan(cfg):
    """Memory per GPU and FLOPs per step for this run's batch settings, from the config on the meta device."""
    config = plan.load_config(cfg.model if Path(cfg.model).is_dir() else {"tiny-omni": "omni-7b"}.get(cfg.model))
    print(plan.report(config, cfg.gpus, cfg.micro_batch, cfg.prompts_per_step, cfg.group_size,
                      new_tokens=cfg.max_new_tokens, gpu_mem_gb=cfg.gpu_mem, beta=cfg.beta, algo=cfg.algo,
                      lora_rank=cfg.lora_rank, attention="dense" if cfg.dense_attention else "block"))


def main(argv=None):
    cfg, demo = parse_args(argv)
    if cfg.plan:
        return print_plan(cfg)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_paths(cfg)
    _, world, device = M.init_distributed(always=True)
    torch.manual_seed(cfg.seed)
    print0(f"{'demo preset' if demo else 'config'}: {json.dumps(asdict(cfg))}")
    run, held_out, start = setup(cfg, device)
    before = heldout(run, held_out) if held_out and start == 0 else None
    if before:
        print0(f"held-out before: accuracy {before['eval_accuracy']:.1%}, format {before['eval_format']:.1%} "
               f"({len(held_out)} questions)")
    history = loop(run, start, held_out)
    if held_out:
        after = heldout(run, held_out)
        print0(f"held-out after: accuracy {after['eval_accuracy']:.1%}, format {after['eval_format']:.1%}"
               + (f" (before: {before['eval_accuracy']:.1%})" if before else ""))
    if history:
        key, label = ("answer_prob", "p(answer)") if cfg.algo == "sft" else ("accuracy", "train accuracy")
        print0(text_chart([h[key] for h in history], label=label))
    dist.destroy_process_group()


def setup(cfg, device):
    """The run folder, data, model, optimizer and reference; then either resume, or warm start (if asked)
    and begin. Every check that can stop the run comes before the model is built, with the same verdict
    on every rank. Returns (run, held-out samples, the step to start from)."""
    rank, out = dist.get_rank(), Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.tidy(out)
        if cfg.model in M.TINY_MODELS:
            M.tiny(cfg.cache_dir, window_seconds=2, family=M.TINY_MODELS[cfg.model])
        if cfg.data == "synthetic":
            data.make_synthetic(Path(cfg.cache_dir) / "synthetic")
    dist.barrier()  # the folder is tidy and the tiny model and task exist before any rank reads them
    resume_from = checkpoint.check_run_folder(cfg, asdict(Config()))
    train, held_out = B.load_data(cfg)
    B.check_first_batch(cfg, train)
    if cfg.overwrite and rank == 0:
        print0(f"--overwrite: deleting the run in {out}")
        checkpoint.wipe(out)
    model_dir = (M.tiny(cfg.cache_dir, window_seconds=2, family=M.TINY_MODELS[cfg.model])
                 if cfg.model in M.TINY_MODELS else cfg.model)
    run = build_run(cfg, model_dir, train, device)
    if resume_from is None and (cfg.warm_start_steps or cfg.curriculum):
        if cfg.warm_start_steps:
            warm_start(run, cfg.warm_start_steps, cfg.warm_start_lr)
        checkpoint.save(run, 0)  # the starting policy: the reference, and the curriculum's pre-pass resumes from it
    run.ref = reference(cfg, out / "checkpoint-0" if cfg.warm_start_steps else model_dir)
    start = checkpoint.load(run, resume_from) if resume_from else 0
    if cfg.curriculum:
        run.pass_rates = curriculum.pass_rates(run)
    if resume_from is None:
        return run, held_out, 0
    print0(f"resumed from {resume_from} at step {start}")
    if rank == 0:
        checkpoint.truncate_log(out / "metrics.jsonl", start)
        checkpoint.truncate_log(out / "samples.jsonl", start)
    return run, held_out, start


def loop(run, start, held_out=()):
    cfg, out, history = run.cfg, Path(run.cfg.out), []
    step_fn = sft_step if cfg.algo == "sft" else train_step
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=dist.get_rank() != 0)
    for step in bar:
        metrics, samples = step_fn(run, step)
        metrics["bad_samples"] = check_bad_fraction(run)
        if held_out and cfg.eval_every and metrics["step"] % cfg.eval_every == 0:
            metrics.update(heldout(run, held_out))  # the same weights as the checkpoint saved below
        history.append(metrics)
        bar.set_postfix_str(progress(cfg, metrics))
        if dist.get_rank() == 0:
            checkpoint.append_jsonl(out / "metrics.jsonl", [metrics])
            checkpoint.append_jsonl(out / "samples.jsonl", samples)
        if metrics["step"] % cfg.save_every == 0 or metrics["step"] == cfg.max_steps:
            checkpoint.save(run, metrics["step"])
            if dist.get_rank() == 0 and samples:  # read completions, not only rewards: that is where hacks show
                bar.write(f"step {metrics['step']} sample: answer {samples[0]['answer']!r}, "
                          f"completion {samples[0]['completion']!r}, reward {samples[0]['reward']:.0f}")
    return history


if __name__ == "__main__":
    sys.exit(M.run_main(main))
