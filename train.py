"""Train Qwen2-Audio with GRPO, the R1-AQA recipe, on one process or many.

Each step: take prompts_per_step questions, sample group_size answers to each, score them with the
R1-AQA rewards, turn the rewards into group-relative advantages, and take an AdamW step on the
clipped-surrogate + KL loss (all the math is in grpo.py). The model is always sharded with FSDP2:
fp32 master weights, bf16 compute, and a process group of one when not launched by torchrun.

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

import checkpoint
import data
import grpo
import model as M
import plan
import reward
from model import print0


@dataclass
class Config:
    model: str = "tiny"  # a local Qwen2-Audio directory, or "tiny" (built offline into --cache-dir)
    data: str = "synthetic"  # training data (R1-AQA JSONL, MMAU JSON or plain JSONL), or "synthetic"
    audio_dir: str = ""  # folder that relative audio paths in the data refer to ("" = the data file's folder)
    downmix: str = "first"  # multi-channel audio: keep channel 0 ("first", R1-AQA) or average the channels ("mean")
    test_data: str = ""  # held-out data scored before and after training ("" = none; synthetic: its test split)
    out: str = "runs/demo"  # run folder: metrics.jsonl, samples.jsonl, checkpoint-{step}/
    cache_dir: str = "runs"  # where the tiny model and the synthetic task are built
    max_steps: int = 1000  # GRPO steps; each samples one batch of groups
    prompts_per_step: int = 16  # global batch in prompts (all processes together)
    micro_batch: int = 1  # prompts per forward on each process, for sampling and for training
    group_size: int = 8  # G: completions sampled per prompt
    lr: float = 1e-6  # AdamW learning rate
    lr_decay: bool = True  # decay the learning rate linearly to 0 over the run (R1-AQA); off = constant
    beta: float = 0.04  # KL weight; 0 drops the reference model entirely
    clip_eps: float = 0.2  # PPO clip range of the ratio
    num_iterations: int = 1  # optimizer steps per rollout batch (mu); > 1 makes the clip act
    token_mean: bool = False  # loss = sum over tokens / tokens, instead of R1-AQA's mean of sequence means
    temperature: float = 1.0  # sampling temperature (also divides the logits in the loss)
    top_k: int = 50  # sample among the k likeliest tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    max_new_tokens: int = 256  # completion length limit
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    seed: int = 42  # data order and sampling noise
    prompt: str = "answer"  # the paper's prompt: direct (<1>), answer (<2>, R1-AQA), think (<3>); sets the format reward
    dtype: str = "bfloat16"  # compute dtype (bfloat16 or float32); weights and optimizer stay fp32
    gradient_checkpointing: bool = True  # recompute layer activations in backward to save memory
    balance_answers: bool = False  # order the data so every batch has each answer equally often
    warm_start_steps: int = 0  # supervised steps on the answer FORMAT only (random answers), before GRPO
    warm_start_lr: float = 3e-3  # learning rate of the warm start
    save_every: int = 100  # write a checkpoint every this many steps (and at the end)
    keep_last: int = 3  # newest checkpoints kept (>= 1), besides checkpoint-0
    resume: bool = False  # continue the run in --out from its newest complete checkpoint (same settings)
    overwrite: bool = False  # start over in an --out that holds a run, deleting its checkpoints and logs
    log_samples: int = 2  # completions per step written to samples.jsonl
    max_bad_fraction: float = 0.01  # stop if more than this share of samples has unreadable audio
    eval_samples: int = 200  # held-out questions scored before and after training
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


def parse_args(argv=None):
    """Config fields become flags (max_steps -> --max-steps), with the field's comment as help."""
    helps = dict(re.findall(r"^\s+(\w+): .*?#\s*(.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Config):
        flag, kind = "--" + f.name.replace("_", "-"), {} if f.type is bool else {"type": f.type}
        action = argparse.BooleanOptionalAction if f.type is bool else "store"
        parser.add_argument(flag, action=action, default=None, help=f"{helps[f.name]} (default {f.default})", **kind)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    demo = given.get("model", "tiny") == "tiny" and given.get("data", "synthetic") == "synthetic" and not given.get("plan")
    return replace(Config(), **{**(DEMO if demo else {}), **given}), demo


WARM_START_BATCH = 16  # questions per warm-start step, all processes together


def validate(cfg, world):
    """Flags that make no sense stop the run before anything is built, each named with the reason."""
    share = cfg.prompts_per_step // world
    rules = [
        (cfg.temperature > 0, "temperature", "must be > 0: it divides the logits"),
        (cfg.group_size >= 2, "group_size", "GRPO compares completions: at least 2 per prompt"),
        (0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]"),
        (cfg.top_k >= 0, "top_k", "must be >= 0 (0 = no limit)"),
        (cfg.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        (cfg.beta >= 0, "beta", "must be >= 0 (0 = no KL term and no reference model)"),
        (cfg.lr >= 0, "lr", "must be >= 0"),
        (cfg.warm_start_lr >= 0, "warm_start_lr", "must be >= 0"),
        (cfg.clip_eps > 0, "clip_eps", "must be > 0"),
        (cfg.num_iterations >= 1, "num_iterations", "must be >= 1"),
        (cfg.grad_clip > 0, "grad_clip", "must be > 0"),
        (cfg.weight_decay >= 0, "weight_decay", "must be >= 0"),
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
        (cfg.log_samples >= 0, "log_samples", "must be >= 0"),
        (cfg.dtype in ("bfloat16", "float32"), "dtype", "must be bfloat16 or float32"),
        (cfg.prompt in data.PROMPTS, "prompt", f"must be one of {', '.join(data.PROMPTS)}"),
        (cfg.downmix in data.DOWNMIX, "downmix", f"must be one of {', '.join(data.DOWNMIX)}"),
    ]
    problems = [f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: {why}" for ok, flag, why in rules if not ok]
    if problems:
        raise M.UsageError("; ".join(problems))


def check_paths(cfg):
    """The model folder, the data files and the audio folder exist, before anything is built."""
    if cfg.model != "tiny":
        M.check_model_dir(cfg.model)
    for flag, path in (("--data", cfg.data), ("--test-data", cfg.test_data)):
        if path and path != "synthetic" and not Path(path).is_file():
            what = "is a folder, not a question file" if Path(path).is_dir() else "no such file"
            raise M.UsageError(f"{flag} {path}: {what} (give an R1-AQA/AVQA JSONL, MMAU JSON or plain JSONL file"
                               + (", or `synthetic`)" if flag == "--data" else ")"))
    if cfg.audio_dir and not Path(cfg.audio_dir).is_dir():
        raise M.UsageError(f"--audio-dir {cfg.audio_dir}: no such folder (it is where relative audio paths "
                           f"in the data are looked up; leave it out to use the data file's folder)")


# -----------------------------------------------------------------------------
# Data

def load_data(cfg):
    """(train samples, held-out samples); a malformed file stops the run with a one-line UsageError."""
    train, test = cfg.data, cfg.test_data
    if cfg.data == "synthetic":  # written by rank 0 in setup()
        train, synthetic_test = (str(Path(cfg.cache_dir) / "synthetic" / f) for f in ("train.jsonl", "test.jsonl"))
        test = test or synthetic_test
    return read_questions("--data", train, cfg), read_questions("--test-data", test, cfg)[:cfg.eval_samples]


def read_questions(flag, path, cfg):
    if not path:
        return []
    try:
        samples = data.read_samples(path, cfg.audio_dir or None)
    except (data.DataError, OSError) as e:
        raise M.UsageError(f"{flag}: {e}") from None
    if not samples:
        raise M.UsageError(f"{flag} {path}: no questions in the file")
    return samples


def check_first_batch(cfg, train):
    """Stop before training on nothing: if no clip of the first global batch exists, the audio folder or
    the paths in the data are wrong, and every sample would be skipped."""
    paths = [train[i].audio_path for i in step_indices(cfg, [s.answer for s in train], 0)]
    if not any(Path(p).is_file() for p in paths):
        hint = "check --audio-dir" if cfg.audio_dir else "give --audio-dir, the folder the audio paths are relative to"
        raise M.UsageError(f"--data {cfg.data}: none of the {len(paths)} clips of the first batch exists, "
                           f"e.g. {paths[0]} ({hint})")


def epoch_order(answers, epoch, seed, balance):
    """A fresh permutation per epoch. Balanced: interleave the answers round-robin, so any window of
    (number of distinct answers) consecutive samples holds each answer once."""
    rng = np.random.default_rng([seed, epoch])
    if not balance:
        return rng.permutation(len(answers)).tolist()
    by_answer = {}
    for i, a in enumerate(answers):
        by_answer.setdefault(a, []).append(i)
    queues = [rng.permutation(ix).tolist() for _, ix in sorted(by_answer.items())]
    return [q[j] for j in range(max(map(len, queues))) for q in queues if j < len(q)]


def step_indices(cfg, answers, step):
    """Dataset indices of the global batch of `step`: a slice of an endless run of epochs. Depends on
    nothing but (seed, step), so a resumed run sees exactly the data the interrupted one would have."""
    n, start = len(answers), step * cfg.prompts_per_step
    out = []
    while len(out) < cfg.prompts_per_step:
        epoch, offset = divmod(start + len(out), n)
        out += epoch_order(answers, epoch, cfg.seed, cfg.balance_answers)[offset:offset + cfg.prompts_per_step - len(out)]
    return out


def read_audio(samples, downmix, counts=None):
    """Decode each clip. An unreadable one is reported, counted (in counts, if given) and replaced by
    1 s of silence; the caller masks it out of the loss, so the batch keeps its shape and all ranks
    stay in step."""
    audios, ok = [], []
    for s in samples:
        try:
            audios.append(data.load_audio(s.audio_path, downmix))
            ok.append(True)
        except data.AudioError as e:
            print(f"[rank {dist.get_rank()}] skipping sample: {e}", flush=True)
            audios.append(np.zeros(data.SAMPLE_RATE, dtype=np.float32))
            ok.append(False)
    if counts is not None:
        counts["seen"] += len(samples)
        counts["bad"] += ok.count(False)
    return audios, ok


# -----------------------------------------------------------------------------
# One GRPO step

@dataclass
class Run:
    """Everything a step needs, built once."""
    cfg: Config
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train: list
    device: torch.device
    end_ids: list
    pad_id: int
    suppress_ids: list
    counts: dict  # samples seen and unreadable, on this rank


@dataclass
class Group:
    """One micro-batch of rollouts with its scores."""
    rollout: grpo.Rollout
    samples: list
    completions: list          # N decoded texts
    rewards: torch.Tensor      # [N]
    accuracy: torch.Tensor     # [N]
    format: torch.Tensor       # [N]
    advantages: torch.Tensor   # [N]
    ref_logp: torch.Tensor | None = None  # [N, T]
    old_logp: torch.Tensor | None = None  # [N, T]


def my_share(items, rank, world):
    per = len(items) // world
    return items[rank * per:(rank + 1) * per]


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def rollout(run, step, positions, samples):
    """Sample and score this rank's groups, micro-batch by micro-batch, with the weights gathered once."""
    cfg, groups = run.cfg, []
    run.policy.eval()  # generation must not run with gradient checkpointing (it would drop the KV cache)
    with M.unsharded(run.policy):
        for pos, batch in zip(chunks(positions, cfg.micro_batch), chunks(samples, cfg.micro_batch)):
            audios, ok = read_audio(batch, cfg.downmix, run.counts)
            inputs = M.collate(run.processor, batch, audios, cfg.prompt).to(run.device)
            gens = grpo.prompt_generators(cfg.seed, step, pos, run.device)
            r = grpo.generate_groups(run.policy, inputs, gens, cfg.group_size,
                                     cfg.max_new_tokens, run.end_ids, run.pad_id, run.suppress_ids,
                                     cfg.temperature, cfg.top_k, cfg.top_p)
            r.mask &= torch.tensor(ok, device=run.device).repeat_interleave(cfg.group_size)[:, None]
            groups.append(score(run, r, batch, ok))
    return groups


def score(run, r, samples, ok):
    texts = run.processor.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
    answers = [s.answer for s in samples for _ in range(r.group_size)]
    scores = [reward.score(t, a, run.cfg.prompt) for t, a in zip(texts, answers)]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=run.device)
    rewards = as_tensor([s.total for s in scores])                       # [N]
    valid = as_tensor(ok).repeat_interleave(r.group_size)                # [N] 0 = unreadable audio
    advantages = grpo.group_advantages(rewards, r.group_size) * valid   # [N]
    return Group(r, samples, texts, rewards, as_tensor([s.accuracy for s in scores]),
                 as_tensor([s.format for s in scores]), advantages)


def train_step(run, step):
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    indices = step_indices(cfg, [s.answer for s in run.train], step)
    positions = my_share(list(range(cfg.prompts_per_step)), rank, world)
    groups = rollout(run, step, positions, [run.train[indices[p]] for p in positions])
    with torch.no_grad():
        for g in groups:
            if run.ref is not None:
                g.ref_logp = grpo.completion_logprobs(run.ref, g.rollout, run.pad_id, cfg.temperature)
            if cfg.num_iterations > 1:  # the policy as it sampled; with mu = 1 it is logp.detach()
                g.old_logp = grpo.completion_logprobs(run.policy, g.rollout, run.pad_id, cfg.temperature)
    if run.ref is not None:
        M.reshard(run.ref)  # it never runs backward, which is where FSDP would free its root units
    # Normalise by the whole global batch, not per micro-batch or per rank. FSDP averages gradients
    # over ranks, so each rank divides by (global count / world size).
    local = sum((g.rollout.mask.sum() if cfg.token_mean else g.rollout.mask.any(1).sum()) for g in groups)
    denominator = all_sum(torch.stack([local.float()]))[0].clamp(min=1) / world
    run.policy.train()
    skipped = 0
    for _ in range(cfg.num_iterations):
        stats = optimizer_step(run, groups, denominator)  # the metrics of the last pass are logged
        skipped += stats["skipped"]
    stats.update(rollout_stats(run, groups), skipped=skipped)
    metrics = {"step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0], "seconds": time.time() - t0}
    return metrics, sample_records(run, groups, step + 1)


def optimizer_step(run, groups, denominator):
    """Accumulate the loss over micro-batches, clip, and step. A non-finite gradient norm (the norm is
    global, so every rank sees the same value) skips the update on all ranks."""
    cfg, sums = run.cfg, torch.zeros(3, device=run.device)
    for g in groups:
        logp = grpo.completion_logprobs(run.policy, g.rollout, run.pad_id, cfg.temperature)  # [N, T]
        old = logp.detach() if g.old_logp is None else g.old_logp
        loss, m = grpo.grpo_loss(logp, old, g.ref_logp, g.advantages, g.rollout.mask, cfg.beta, cfg.clip_eps,
                                 cfg.token_mean, denominator)
        loss.backward()
        sums += torch.stack([m["kl"] * m["tokens"], m["clip_frac"] * m["tokens"], m["tokens"]])
    grad_norm, finite = clip_and_step(run.policy, run.optimizer, cfg.grad_clip)
    run.scheduler.step()
    kl, clip, tokens = all_sum(sums).tolist()
    return {"kl": kl / max(tokens, 1), "clip_frac": clip / max(tokens, 1), "grad_norm": grad_norm,
            "skipped": int(not finite)}


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
    """Means over the global batch of valid (readable) samples."""
    G = run.cfg.group_size
    rows = []
    for g in groups:
        valid = g.rollout.mask.any(1).float()                           # [N]
        r = g.rewards.view(-1, G)                                       # [B, G]
        zero_std = (r.std(1) == 0).float().repeat_interleave(G)          # [N]
        rows.append(torch.stack([valid, g.rewards * valid, g.accuracy * valid, g.format * valid,
                                 g.rollout.mask.sum(1) * valid, zero_std * valid]).sum(1))
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
# Warm start and held-out accuracy (both on the same packed forward as GRPO)

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
        targets = [f"<answer>{rng.choice(s.choices)}</answer><|im_end|>" for s in batch]
        supervised_step(run, opt, my_share(batch, rank, world), my_share(targets, rank, world))


def supervised_step(run, optimizer, samples, targets):
    """One optimizer step of cross-entropy on the target texts of this rank's share of a global batch,
    micro-batch by micro-batch (as GRPO's steps, so the forwards are the same on 1 process as on 2).
    The loss is the sum of -log p over the global batch's target tokens over their number."""
    batches = [teacher_forced(run, s, t) for s, t in zip(chunks(samples, run.cfg.micro_batch),
                                                         chunks(targets, run.cfg.micro_batch))]
    tokens = all_sum(sum(r.mask.sum() for r in batches).float()) / dist.get_world_size()
    for r in batches:
        logp = grpo.completion_logprobs(run.policy, r, run.pad_id)                 # [B, T]
        (-(logp * r.mask).sum() / tokens).backward()
    return clip_and_step(run.policy, optimizer, run.cfg.grad_clip)


def teacher_forced(run, samples, targets):
    """A Rollout whose completions are given texts (group size 1), for supervised log-probs."""
    audios, _ = read_audio(samples, run.cfg.downmix)
    inputs = M.collate(run.processor, samples, audios, run.cfg.prompt).to(run.device)
    ids = run.processor.tokenizer(targets, add_special_tokens=False, padding="longest", padding_side="right",
                                  return_tensors="pt")["input_ids"].to(run.device)
    prompts = [row[m.bool()] for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    return grpo.Rollout(prompts, inputs["input_features"], inputs["feature_attention_mask"], ids,
                        grpo.completion_mask(ids, run.end_ids), group_size=1)


@torch.no_grad()
def heldout_accuracy(run, samples):
    """Greedy accuracy and format rate on held-out questions, all ranks together."""
    cfg, sums = run.cfg, torch.zeros(3, device=run.device)
    run.policy.eval()
    with M.unsharded(run.policy):
        for batch in chunks(my_share(samples, dist.get_rank(), dist.get_world_size()), cfg.micro_batch):
            audios, _ = read_audio(batch, cfg.downmix)
            inputs = M.collate(run.processor, batch, audios, cfg.prompt).to(run.device)
            r = grpo.generate_groups(run.policy, inputs, [], 1, cfg.max_new_tokens, run.end_ids, run.pad_id,
                                     run.suppress_ids, top_k=1)
            texts = run.processor.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
            scores = [reward.score(t, s.answer, cfg.prompt) for t, s in zip(texts, batch)]
            sums += torch.tensor([sum(s.accuracy for s in scores), sum(s.format for s in scores), len(batch)],
                                 device=run.device)
    acc, fmt, n = all_sum(sums).tolist()
    return acc / max(n, 1), fmt / max(n, 1)


# -----------------------------------------------------------------------------
# Logs

def truncate_log(path, step):
    """Drop records past `step`: a resumed run rewrites what the interrupted one logged after its checkpoint."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def append_jsonl(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


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


# -----------------------------------------------------------------------------
# Setup and the loop

def build_run(cfg, model_dir, train, device):
    compute = getattr(torch, cfg.dtype)
    policy = M.sharded_load(model_dir, param_dtype=compute, storage_dtype=torch.float32,
                            gradient_checkpointing=cfg.gradient_checkpointing)
    processor = M.load_processor(model_dir)
    optimizer = torch.optim.AdamW(trainable(policy), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    updates = max(cfg.max_steps * cfg.num_iterations, 1)
    decay = (lambda u: max(0.0, 1 - u / updates)) if cfg.lr_decay else (lambda u: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    tok = processor.tokenizer
    return Run(cfg, policy, None, processor, optimizer, scheduler, train, device, M.end_token_ids(tok),
               tok.pad_token_id, M.suppressed_token_ids(tok, policy.config.text_config.vocab_size),
               {"seen": 0, "bad": 0})


def reference(cfg, path):
    """The frozen reference: the policy at step 0, in the compute dtype, sharded, without grads."""
    if cfg.beta == 0:
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
    config = plan.load_config(cfg.model if Path(cfg.model).is_dir() else None)
    print(plan.report(config, cfg.gpus, cfg.micro_batch, cfg.prompts_per_step, cfg.group_size,
                      new_tokens=cfg.max_new_tokens, gpu_mem_gb=cfg.gpu_mem, beta=cfg.beta))


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
    before = heldout_accuracy(run, held_out) if held_out and start == 0 else None
    if before:
        print0(f"held-out before GRPO: accuracy {before[0]:.1%}, format {before[1]:.1%} ({len(held_out)} questions)")
    history = loop(run, start)
    if held_out:
        after = heldout_accuracy(run, held_out)
        print0(f"held-out after GRPO: accuracy {after[0]:.1%}, format {after[1]:.1%}"
               + (f" (before: {before[0]:.1%})" if before else ""))
    if history:
        print0(text_chart([h["accuracy"] for h in history], label="train accuracy"))
    dist.destroy_process_group()


def setup(cfg, device):
    """The run folder, data, model, optimizer and reference; then either resume, or warm start (if asked)
    and begin. Every check that can stop the run comes before the model is built, with the same verdict
    on every rank. Returns (run, held-out samples, the step to start from)."""
    rank, out = dist.get_rank(), Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.tidy(out)
        if cfg.model == "tiny":
            M.tiny(cfg.cache_dir, window_seconds=2)
        if cfg.data == "synthetic":
            data.make_synthetic(Path(cfg.cache_dir) / "synthetic")
    dist.barrier()  # the folder is tidy and the tiny model and task exist before any rank reads them
    resume_from = checkpoint.check_run_folder(cfg, asdict(Config()))
    train, held_out = load_data(cfg)
    check_first_batch(cfg, train)
    if cfg.overwrite and rank == 0:
        print0(f"--overwrite: deleting the run in {out}")
        checkpoint.wipe(out)
    model_dir = M.tiny(cfg.cache_dir, window_seconds=2) if cfg.model == "tiny" else cfg.model
    run = build_run(cfg, model_dir, train, device)
    if resume_from is None and cfg.warm_start_steps:
        warm_start(run, cfg.warm_start_steps, cfg.warm_start_lr)
        checkpoint.save(run, 0)
    run.ref = reference(cfg, out / "checkpoint-0" if cfg.warm_start_steps else model_dir)
    if resume_from is None:
        return run, held_out, 0
    start = checkpoint.load(run, resume_from)
    print0(f"resumed from {resume_from} at step {start}")
    if rank == 0:
        truncate_log(out / "metrics.jsonl", start)
        truncate_log(out / "samples.jsonl", start)
    return run, held_out, start


def loop(run, start):
    cfg, out, history = run.cfg, Path(run.cfg.out), []
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=dist.get_rank() != 0)
    for step in bar:
        metrics, samples = train_step(run, step)
        metrics["bad_samples"] = check_bad_fraction(run)
        history.append(metrics)
        bar.set_postfix_str(f"reward {metrics['reward']:.2f} acc {metrics['accuracy']:.2f} fmt {metrics['format']:.2f} "
                            f"kl {metrics['kl']:.4f} {cfg.prompts_per_step * cfg.group_size / metrics['seconds']:.0f} c/s")
        if dist.get_rank() == 0:
            append_jsonl(out / "metrics.jsonl", [metrics])
            append_jsonl(out / "samples.jsonl", samples)
        if metrics["step"] % cfg.save_every == 0 or metrics["step"] == cfg.max_steps:
            checkpoint.save(run, metrics["step"])
            if dist.get_rank() == 0 and samples:  # read completions, not only rewards: that is where hacks show
                bar.write(f"step {metrics['step']} sample: answer {samples[0]['answer']!r}, "
                          f"completion {samples[0]['completion']!r}, reward {samples[0]['reward']:.0f}")
    return history


if __name__ == "__main__":
    sys.exit(M.run_main(main))
