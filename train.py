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
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
from tqdm import tqdm

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
    keep_last: int = 3  # checkpoints kept besides checkpoint-0
    resume: bool = False  # continue from the newest complete checkpoint in --out
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


# -----------------------------------------------------------------------------
# Data

def load_data(cfg):
    """(train samples, held-out samples). 'synthetic' writes the pitch task once into the cache dir."""
    train, test = cfg.data, cfg.test_data
    if cfg.data == "synthetic":
        if dist.get_rank() == 0:
            data.make_synthetic(Path(cfg.cache_dir) / "synthetic")
        dist.barrier()  # the other ranks read the files rank 0 wrote
        train, synthetic_test = (str(Path(cfg.cache_dir) / "synthetic" / f) for f in ("train.jsonl", "test.jsonl"))
        test = test or synthetic_test
    audio_dir = cfg.audio_dir or None
    held_out = data.read_samples(test, audio_dir)[:cfg.eval_samples] if test else []
    return data.read_samples(train, audio_dir), held_out


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
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    kl, clip, tokens = all_sum(sums).tolist()
    return {"kl": kl / max(tokens, 1), "clip_frac": clip / max(tokens, 1), "grad_norm": grad_norm.item(),
            "skipped": int(not finite)}


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


# -----------------------------------------------------------------------------
# Warm start and held-out accuracy (both on the same packed forward as GRPO)

def warm_start(run, steps, lr, batch_size=16):
    """Teach a random model the answer FORMAT only: `<answer>{a random choice}</answer>`. It then
    starts GRPO at chance accuracy with a good format, and has to learn to listen."""
    cfg = run.cfg
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(run.policy.parameters(), lr=lr, weight_decay=0.0)
    run.policy.train()
    for _ in tqdm(range(steps), desc="warm start (format only)", disable=dist.get_rank() != 0):
        batch = my_share([run.train[i] for i in rng.choice(len(run.train), batch_size)], dist.get_rank(),
                         dist.get_world_size())
        targets = [f"<answer>{rng.choice(s.choices)}</answer><|im_end|>" for s in batch]
        r = teacher_forced(run, batch, targets)
        logp = grpo.completion_logprobs(run.policy, r, run.pad_id)                 # [B, T]
        tokens = all_sum(r.mask.sum().float()) / dist.get_world_size()
        (-(logp * r.mask).sum() / tokens).backward()
        torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


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
# Checkpoints: a Hugging Face model folder + the exact training state, written atomically

def save_checkpoint(run, step):
    """OUT/checkpoint-{step}/: the model in the compute dtype (from_pretrained opens it), the processor,
    and train_state/ (fp32 weight shards, optimizer, step, scheduler, RNG, config). Written under a
    temporary name and renamed when complete, so a crash mid-save never leaves a valid-looking folder."""
    cfg, rank = run.cfg, dist.get_rank()
    out = Path(cfg.out)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash
    dist.barrier()  # no rank writes into tmp before it is cleared
    full = M.full_state_dict(run.policy)
    if rank == 0:
        dtype = getattr(torch, cfg.dtype)
        run.policy.save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in full.items()})
        run.processor.save_pretrained(tmp)
    state = {"model": get_model_state_dict(run.policy), "optim": get_optimizer_state_dict(run.policy, run.optimizer)}
    dcp.save(state, checkpoint_id=tmp / "train_state")
    seen, bad = all_sum(torch.tensor([run.counts["seen"], run.counts["bad"]], device=run.device)).tolist()  # run totals
    if rank == 0:
        torch.save({"step": step, "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "counts": {"seen": seen, "bad": bad}, "config": asdict(cfg)}, tmp / "trainer_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(out, cfg.keep_last)
    dist.barrier()  # a later resume or save on any rank must see the renamed folder


def checkpoints(out):
    """Complete checkpoints in OUT, oldest first."""
    found = [(int(p.name.split("-")[1]), p) for p in Path(out).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(out, keep_last):
    """Keep the newest keep_last, and checkpoint-0 (the starting policy, the demo's 'before')."""
    for p in checkpoints(out)[:-keep_last]:
        if p.name != "checkpoint-0":
            shutil.rmtree(p)


def load_checkpoint(run, path):
    """Restore weights, optimizer, scheduler and RNG; returns the step to continue from."""
    state = {"model": get_model_state_dict(run.policy), "optim": get_optimizer_state_dict(run.policy, run.optimizer)}
    dcp.load(state, checkpoint_id=path / "train_state")
    set_model_state_dict(run.policy, state["model"])
    set_optimizer_state_dict(run.policy, run.optimizer, state["optim"])
    trainer = torch.load(path / "trainer_state.pt", weights_only=False)
    run.scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    if dist.get_rank() == 0:
        run.counts.update(trainer["counts"])  # rank 0 carries the run's totals; others restart from 0
    return trainer["step"]


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
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
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
    _, world, device = M.init_distributed(always=True)
    torch.manual_seed(cfg.seed)
    assert cfg.prompts_per_step % world == 0, f"--prompts-per-step {cfg.prompts_per_step} must divide by {world} ranks"
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
    """Model, data, optimizer and reference; then either resume, or warm start (if asked) and begin.
    Returns (run, held-out samples, the step to start from)."""
    rank, out = dist.get_rank(), Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.model == "tiny":
            M.tiny(cfg.cache_dir, window_seconds=2)
    dist.barrier()  # the tiny model exists before other ranks load it
    model_dir = M.tiny(cfg.cache_dir, window_seconds=2) if cfg.model == "tiny" else cfg.model
    train, held_out = load_data(cfg)
    run = build_run(cfg, model_dir, train, device)
    done = checkpoints(out) if cfg.resume else []
    if cfg.resume and not done:
        print0(f"--resume: no complete checkpoint in {out}, starting from step 0")
    if not done:
        if rank == 0:
            truncate_log(out / "metrics.jsonl", 0)  # a fresh run starts fresh logs
            truncate_log(out / "samples.jsonl", 0)
        if cfg.warm_start_steps:
            warm_start(run, cfg.warm_start_steps, cfg.warm_start_lr)
            save_checkpoint(run, 0)
    run.ref = reference(cfg, out / "checkpoint-0" if cfg.warm_start_steps else model_dir)
    if not done:
        return run, held_out, 0
    start = load_checkpoint(run, done[-1])
    print0(f"resumed from {done[-1]} at step {start}")
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
            save_checkpoint(run, metrics["step"])
            if dist.get_rank() == 0 and samples:  # read completions, not only rewards: that is where hacks show
                bar.write(f"step {metrics['step']} sample: answer {samples[0]['answer']!r}, "
                          f"completion {samples[0]['completion']!r}, reward {samples[0]['reward']:.0f}")
    return history


if __name__ == "__main__":
    main()
