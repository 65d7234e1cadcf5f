"""Train Qwen2-Audio with GRPO, R1-AQA's recipe, on one process or many (FSDP2); with no flag, the CPU demo.

Each step takes prompts_per_step questions, samples group_size answers to each, scores them with R1-AQA's
rewards (reward.py), turns the rewards into group-relative advantages and takes one AdamW step on the
clipped-surrogate + KL loss (grpo.py). This file is the run: the seam that lets an extra from recipes/
replace a sub-step (Recipe, chosen once from the config), setup, the warm start, the loop with its
checkpoints and logs, and one GRPO step read top to bottom; its flags are config.py's.
    python train.py                      # the CPU workshop demo: tiny model, synthetic pitch task
    torchrun --nproc_per_node 8 train.py --model /path/Qwen2-Audio-7B-Instruct --data train.jsonl
    python train.py --help               # every flag; R1-AQA's values are the defaults
"""

import importlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
from config import (LOUDNESS, TINY_MODELS, WARM_START_BATCH, WARM_START_REASONING, Config, check_paths,
                    extras_asked, parse_args, reward_weights, validate)
import grpo
import model as M
import reward
from model import print0


# -----------------------------------------------------------------------------
# The seam: the sub-steps an extra may replace, chosen once from the config

@dataclass
class Recipe:
    """The functions a run uses for each sub-step; R1-AQA's by default. An extra (a recipes/ module, asked
    for by a flag) replaces the ones it changes in recipe_for, and nowhere else."""
    generate: Callable = None      # (model, batch, generators, G, max_new_tokens, end_ids, pad_id, suppress_ids,
                                   #  temperature, top_k, top_p) -> grpo.Rollout
    logprobs: Callable = None      # (model, rollout, pad_id, temperature) -> [N, T]
    advantages: Callable = None    # (micro-batches, group size) -> [N] per micro-batch, 0 where nothing trains
    loss: Callable = None          # (logp, old_logp, ref_logp, advantages, mask, denominator) -> (loss, metrics)
    loss_count: Callable = None    # (micro-batch) -> its part of what the loss divides by
    trained_mask: Callable = None  # (rollout, end_ids) -> [N, T] the tokens that train (audio checked apart)
    sample: Callable = None        # (run, step) -> Sampled
    step: Callable = None          # (run, step) -> (metrics, samples): one optimizer step
    arrange: Callable = data.permutation  # the order of an epoch's questions (data.epoch_order)
    guard: Callable = lambda run, passes: passes()  # (run, passes) around a step's packed passes: the
                                   # engine's fallback from FlexAttention to the dense mask, where flex runs
    adapters: object = None        # LoRA's hooks (recipes/lora.py): wrap, initial values, reference, saving
    before_training: list = field(default_factory=list)  # fn(run) at the end of setup (a curriculum's pre-pass)
    on_checkpoint: list = field(default_factory=list)    # fn(run folder) on rank 0 after each checkpoint


def recipe_for(cfg):
    """R1-AQA's recipe run by the engine (or, --engine plain, by grpo.py's own functions), then each extra the
    config asks for, in a fixed order, put in the place of the sub-steps it changes."""
    recipe = Recipe(advantages=group_advantages, loss=partial(grpo.grpo_loss, beta=cfg.beta, clip=cfg.clip_low),
                    loss_count=lambda b: b.counted.sum(), trained_mask=lambda rollout, end_ids: rollout.mask,
                    sample=sample_groups, step=grpo_step)
    if cfg.engine == "fast":
        from engine import attention, packed, sampler
        flex = False if cfg.dense_attention else None
        recipe.generate, recipe.logprobs = sampler.generate_groups, partial(packed.completion_logprobs, flex=flex)
        if not cfg.dense_attention and attention.flex_default("cuda" if torch.cuda.is_available() else "cpu"):
            recipe.guard = packed.flex_or_dense
    else:
        recipe.generate, recipe.logprobs = grpo.generate_groups, grpo.completion_logprobs
    for name, given in extras_asked(cfg).items():
        try:
            extra = importlib.import_module(f"recipes.{name}")
        except ModuleNotFoundError as e:
            if e.name not in ("recipes", f"recipes.{name}"):
                raise
            raise M.UsageError(f"{given} needs recipes/{name}.py, which this copy of the project does not have")
        recipe = extra.apply(recipe, cfg)
    try:
        from workshop import plot  # OUT/curves.svg, redrawn at every checkpoint (by rank 0)
        recipe.on_checkpoint.append(plot.write_curves)
    except ModuleNotFoundError:  # a copy without workshop/ trains the same, without the picture
        pass
    return recipe


# -----------------------------------------------------------------------------
# Setup

@dataclass
class Run:
    """What the steps share, built once in setup."""
    cfg: Config
    recipe: Recipe
    policy: torch.nn.Module
    reference: torch.nn.Module | None  # a frozen copy; None with beta 0, SFT, or LoRA (adapters switched off)
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    questions: list                   # the training Samples
    tokens: "Tokens"
    device: torch.device
    counts: dict                      # samples seen and unreadable, on this rank
    base: Path                        # the model folder the policy was loaded from


@dataclass
class Tokens:
    """The token ids sampling needs: what ends a completion, the pad, and what a completion never holds."""
    end_ids: list
    pad_id: int
    suppress_ids: list


def main(argv=None):
    cfg, demo = parse_args(argv)
    if cfg.plan:
        return print_plan(cfg)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_paths(cfg)
    _, world, device = M.init_distributed(always=True, timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    recipe = recipe_for(cfg)
    torch.manual_seed(cfg.seed)
    print0(f"{'demo preset' if demo else 'config'}: {json.dumps(asdict(cfg))}")
    run, held_out, start = setup(cfg, recipe, device)
    before = heldout(run, held_out) if held_out and start == 0 else None
    if before:
        print0(f"held-out before: accuracy {before['eval_accuracy']:.1%}, format {before['eval_format']:.1%} "
               f"({before['eval_questions']} questions)")
    history = loop(run, start, held_out)
    if held_out:
        after = heldout(run, held_out)
        print0(f"held-out after: accuracy {after['eval_accuracy']:.1%}, format {after['eval_format']:.1%} "
               f"({after['eval_questions']} questions)" + (f" (before: {before['eval_accuracy']:.1%})" if before else ""))
    if history:
        key, label = ("answer_prob", "p(answer)") if cfg.algo == "sft" else ("accuracy", "train accuracy")
        print0(text_chart([h[key] for h in history], label=label))
    dist.destroy_process_group()


def print_plan(cfg):
    """--plan: memory per GPU and FLOPs per step for this run's settings (tools/plan.py), nothing loaded."""
    try:
        from tools import plan
    except ModuleNotFoundError:
        raise M.UsageError("--plan needs tools/plan.py, which this copy of the project does not have") from None
    return plan.print_for(cfg)


def setup(cfg, recipe, device):
    """The run folder, data, model, optimizer and reference; then either resume, or warm start (if asked) and
    begin. Every check that can stop the run comes before the model is built, with the same verdict on every
    rank. Returns (run, held-out samples, the step to start from)."""
    rank, out = dist.get_rank(), Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.tidy(out)
        if demo_pieces_missing(cfg):
            from workshop import demo  # the tiny model and the synthetic questions, built once in --cache-dir
            demo.build(cfg.cache_dir, cfg.model, cfg.data == "synthetic", cfg.warm_start_data == LOUDNESS)
    dist.barrier()  # the folder is tidy and the tiny model and task exist before any rank reads them
    resume_from = checkpoint.check_run_folder(cfg, asdict(Config()))
    questions, held_out = load_questions(cfg)
    check_first_batch(cfg, recipe, questions)
    if cfg.overwrite and rank == 0:
        print0(f"--overwrite: deleting the run in {out}")
        checkpoint.wipe(out)
    run = build_run(cfg, recipe, model_folder(cfg), questions, device)
    checkpoint.check_disk(run, resume_from)
    if resume_from is None and (cfg.warm_start_steps or recipe.before_training):
        if cfg.warm_start_steps:
            warm_start(run, cfg.warm_start_steps, cfg.warm_start_lr, warm_start_questions(cfg))
        checkpoint.save(run, 0)  # the starting policy: the reference, and a pre-pass resumes from it
    run.reference = reference(cfg, recipe, run.policy, out / "checkpoint-0" if resume_from and cfg.warm_start_steps
                              else None)
    start = checkpoint.load(run, resume_from) if resume_from else 0
    for prepare in recipe.before_training:
        prepare(run)
    if resume_from is not None:
        print0(f"resumed from {resume_from} at step {start}")
        if rank == 0:
            for log in ("metrics.jsonl", "samples.jsonl"):
                checkpoint.truncate_log(out / log, start)
    return run, held_out, start


def model_folder(cfg):
    """--model as a folder: a tiny model's is in --cache-dir, where workshop/demo.py builds it."""
    return Path(cfg.cache_dir) / TINY_MODELS[cfg.model] if cfg.model in TINY_MODELS else cfg.model


def demo_pieces_missing(cfg):
    """Whether the tiny model or a synthetic question file this run reads is not yet in --cache-dir. Each is
    whole once its config.json or manifest.json exists, as workshop/demo.py checks."""
    cache, needed = Path(cfg.cache_dir), []
    if cfg.model in TINY_MODELS:
        needed.append(model_folder(cfg) / "config.json")
    for name, asked in (("synthetic", cfg.data == "synthetic"), (LOUDNESS, cfg.warm_start_data == LOUDNESS)):
        needed += [cache / name / "manifest.json"] if asked else []
    return not all(path.exists() for path in needed)


def load_questions(cfg):
    """(training samples, held-out samples); a malformed file stops the run with a one-line UsageError."""
    train, test = cfg.data, cfg.eval_data
    if cfg.data == "synthetic":  # written by rank 0 in setup()
        train, synthetic_test = (str(Path(cfg.cache_dir) / "synthetic" / f) for f in ("train.jsonl", "test.jsonl"))
        test = test or synthetic_test
    return read_questions("--data", train, cfg), read_questions("--eval-data", test, cfg)[:cfg.eval_samples]


def read_questions(name, path, cfg):
    if not path:
        return []
    try:
        return data.read_samples(path, cfg.audio_dir or None)
    except data.DataError as e:
        raise M.UsageError(f"{name}: {e}") from None


def check_first_batch(cfg, recipe, questions):
    """Stop before training on nothing: if no clip of the first global batch exists, the audio folder or the
    paths in the data are wrong, and every sample would be skipped."""
    paths = [questions[i].audio_path for i in step_questions(cfg, recipe, questions, 0)]
    if not any(Path(p).is_file() for p in paths):
        hint = "check --audio-dir" if cfg.audio_dir else "give --audio-dir, the folder the audio paths are relative to"
        raise M.UsageError(f"--data {cfg.data}: none of the {len(paths)} clips of the first batch exists, "
                           f"e.g. {paths[0]} ({hint})")


def warm_start_questions(cfg):
    """The questions of --warm-start-data ([] for a format-only warm start)."""
    path = str(Path(cfg.cache_dir) / LOUDNESS / "train.jsonl") if cfg.warm_start_data == LOUDNESS else cfg.warm_start_data
    return read_questions("--warm-start-data", path, cfg)


def step_questions(cfg, recipe, questions, step):
    """Dataset indices of the step's global batch (data.step_indices, in the recipe's order)."""
    return data.step_indices(step, cfg.prompts_per_step, [s.answer for s in questions], cfg.seed,
                             cfg.balance_answers, recipe.arrange)


def build_run(cfg, recipe, model_dir, questions, device):
    """The policy, sharded with FSDP2 (fp32 master weights, or LoRA's frozen base and fp32 adapters), its
    processor and token ids, AdamW, and the learning-rate schedule."""
    policy = M.sharded_load(model_dir, param_dtype=getattr(torch, cfg.dtype), storage_dtype=torch.float32,
                            gradient_checkpointing=cfg.gradient_checkpointing, adapters=recipe.adapters)
    processor = M.load_processor(model_dir)
    optimizer = torch.optim.AdamW(trainable(policy), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    updates = max(cfg.max_steps * (cfg.num_iterations if cfg.algo == "grpo" else 1), 1)
    decay = (lambda u: max(0.0, 1 - u / updates)) if cfg.lr_decay else (lambda u: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    tok = processor.tokenizer
    tokens = Tokens(M.end_token_ids(tok), tok.pad_token_id,
                    M.suppressed_token_ids(tok, policy.config.text_config.vocab_size))
    return Run(cfg, recipe, policy, None, processor, optimizer, scheduler, questions, tokens, device,
               {"seen": 0, "bad": 0}, Path(model_dir).resolve())


def reference(cfg, recipe, policy, start=None):
    """The frozen reference: the policy at step 0, in the compute dtype, sharded, without grads; a copy of the
    policy's own shards (the weights are read once), or where it no longer holds them (a resumed run that
    began with a warm start) read from `start`, its checkpoint-0. None with beta 0, SFT (no KL term), and LoRA
    (the policy with its adapters off is the reference)."""
    if cfg.beta == 0 or cfg.algo == "sft" or recipe.adapters is not None:
        return None
    dtype = getattr(torch, cfg.dtype)
    ref = M.sharded_copy(policy, dtype) if start is None else M.sharded_load(start, storage_dtype=dtype)
    return ref.requires_grad_(False).eval()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# The loop

def loop(run, start, held_out=()):
    """The steps, each logged to metrics.jsonl and samples.jsonl; a checkpoint every --save-every steps and at
    the end, with the held-out score when --eval-every asks."""
    cfg, out, history = run.cfg, Path(run.cfg.out), []
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=dist.get_rank() != 0)
    for step in bar:
        metrics, samples = run.recipe.step(run, step)
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
            after_checkpoint(run, bar, samples)
    return history


def after_checkpoint(run, bar, samples):
    """Rank 0: show one completion (read completions, not only rewards: that is where hacks show), then the
    recipe's checkpoint hooks (the demo's curves); a hook that fails prints one line and the run goes on."""
    if dist.get_rank() != 0:
        return
    if samples:
        bar.write(f"step {samples[0]['step']} sample: answer {samples[0]['answer']!r}, "
                  f"completion {samples[0]['completion']!r}, reward {samples[0]['reward']:.0f}")
    for hook in run.recipe.on_checkpoint:
        try:
            hook(run.cfg.out)
        except (OSError, ValueError) as e:
            bar.write(f"{getattr(hook, '__module__', 'a hook')}: {e} (training goes on)")


def check_bad_fraction(run):
    """Stop (on every rank at once) when more than max_bad_fraction of the samples seen were unreadable;
    the first few bad ones are always tolerated (the fraction is taken of at least 100)."""
    counts = torch.tensor([run.counts["bad"], run.counts["seen"]], dtype=torch.float64, device=run.device)
    bad, seen = all_sum(counts).tolist()
    if bad > run.cfg.max_bad_fraction * max(seen, 100):
        raise SystemExit(f"stopping: {int(bad)} of {int(seen)} samples had unreadable audio "
                         f"(more than --max-bad-fraction {run.cfg.max_bad_fraction}); run `python data.py` on the data")
    return int(bad)


def progress(cfg, m):
    """The progress line's numbers for one step."""
    if cfg.algo == "sft":
        return f"loss {m['loss']:.3f} p(answer) {m['answer_prob']:.2f} {cfg.prompts_per_step / m['seconds']:.0f} q/s"
    return (f"reward {m['reward']:.2f} acc {m['accuracy']:.2f} fmt {m['format']:.2f} kl {m['kl']:.4f} "
            f"{m['prompts_sampled'] * cfg.group_size / m['seconds']:.0f} c/s")


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
# One GRPO step

@dataclass
class MicroBatch:
    """One micro-batch of a step: the rollout of its prompts and its scores."""
    rollout: grpo.Rollout
    samples: list              # the micro-batch's questions
    completions: list          # N decoded texts
    rewards: torch.Tensor      # [N]
    accuracy: torch.Tensor     # [N]
    format: torch.Tensor       # [N]
    valid: torch.Tensor        # [N] bool, False = unreadable audio (never trained on)
    lengths: torch.Tensor      # [N] completion tokens, up to and including the first end token
    counted: torch.Tensor      # [N] bool, in the loss's count and the batch's statistics (the mask is what
                               # trains: a truncated completion under --mask-truncated is counted, untrained)
    advantages: torch.Tensor | None = None  # [N]
    ref_logp: torch.Tensor | None = None    # [N, T]
    old_logp: torch.Tensor | None = None    # [N, T]


def grpo_step(run, step):
    """Sample and score G completions per prompt, group-relative advantages, the reference's log-probs, then
    --num-iterations AdamW steps on the clipped surrogate + KL over every micro-batch of the batch."""
    cfg, t0 = run.cfg, time.time()
    sampled = run.recipe.sample(run, step)
    stats = rollout_stats(sampled.own, cfg.group_size)  # what the policy does on the step's own prompts
    for b, advantages in zip(sampled.all, run.recipe.advantages(sampled.all, cfg.group_size)):
        b.advantages = advantages                                             # [N]
    batches = sampled.trained
    with torch.no_grad():
        run.recipe.guard(run, lambda: fixed_logprobs(run, batches))
    if run.reference is not None:
        M.reshard(run.reference)  # it never runs backward, which is where FSDP would free its root units
    local = sum(run.recipe.loss_count(b) for b in sampled.all)
    denominator = all_sum(torch.as_tensor(local, device=run.device).float().reshape(1))[0].clamp(min=1) / \
        dist.get_world_size()  # every process divides by the global count / world: FSDP averages gradients
    run.policy.train()
    skipped = 0
    for _ in range(cfg.num_iterations):
        losses = optimizer_step(run, batches, denominator)  # the metrics of the last pass are logged
        skipped += losses["skipped"]
    stats.update(losses, skipped=skipped, prompts_sampled=sampled.prompts, groups_dropped=sampled.dropped)
    metrics = {"step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0], "seconds": time.time() - t0}
    return metrics, sample_records(sampled.all, cfg.log_samples, step + 1)


def fixed_logprobs(run, batches):
    """The log-probs the loss holds fixed: the reference's, and with --num-iterations > 1 the policy's as it
    sampled (with one update they are logp.detach())."""
    for b in batches:
        b.ref_logp = reference_logprobs(run, b.rollout) if run.cfg.beta else None
        if run.cfg.num_iterations > 1:
            b.old_logp = logprobs(run, run.policy, b.rollout)


def my_micro_batches(cfg):
    """This process's prompt positions in the global batch, in micro-batches."""
    positions = data.my_share(list(range(cfg.prompts_per_step)), dist.get_rank(), dist.get_world_size())
    return data.chunks(positions, cfg.micro_batch)


@dataclass
class Sampled:
    """A step's sampling: this process's micro-batches (all of them, those that go through the policy pass,
    those of the step's own prompts, for the logged statistics), and over all processes the prompts sampled
    and the groups dropped."""
    all: list
    trained: list
    own: list
    prompts: int
    dropped: int


def sample_groups(run, step):
    """R1-AQA's sampling: one round of the step's prompts, this process's share, micro-batch by micro-batch."""
    cfg = run.cfg
    indices = step_questions(cfg, run.recipe, run.questions, step)
    batches = [rollout(run, step, pos, [run.questions[indices[p]] for p in pos]) for pos in my_micro_batches(cfg)]
    return Sampled(batches, batches, batches, cfg.prompts_per_step, 0)


def group_advantages(batches, group_size):
    """R1-AQA's advantages (grpo.group_advantages) per micro-batch; 0 for a completion that does not train."""
    return [grpo.group_advantages(b.rewards, group_size) * b.rollout.mask.any(1) for b in batches]


def rollout(run, step, positions, samples):
    """Sample and score one micro-batch (positions: its prompts' places in the global batch, which seed
    their generators). The policy samples in eval mode with every FSDP unit gathered once for the rollout."""
    cfg = run.cfg
    audios, ok = data.read_audio(samples, cfg.downmix, run.counts)
    inputs = M.collate(run.processor, samples, audios, cfg.prompt, cfg.system_prompt or None,
                       cfg.think_words).to(run.device)
    generators = grpo.prompt_generators(cfg.seed, step, positions, run.device)
    run.policy.eval()  # generation must not run with gradient checkpointing (it would drop the KV cache)
    with M.unsharded(run.policy):
        r = run.recipe.generate(run.policy, inputs, generators, cfg.group_size, cfg.max_new_tokens,
                                run.tokens.end_ids, run.tokens.pad_id, run.tokens.suppress_ids, cfg.temperature,
                                cfg.top_k, cfg.top_p)
    return score(run, r, samples, ok)


def score(run, r, samples, ok):
    """R1-AQA's rewards of every completion (reward.py). A completion of unreadable audio stays in its group
    (the batch keeps its shape) but is masked out of the loss."""
    texts = run.processor.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
    answers = [s.answer for s in samples for _ in range(r.group_size)]
    scores = [reward.score(t, a, run.cfg.prompt, *reward_weights(run.cfg)) for t, a in zip(texts, answers)]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=run.device)
    valid = torch.tensor(ok, device=run.device).repeat_interleave(r.group_size)  # [N]
    lengths = r.mask.sum(1)                                                     # [N]
    r.mask = run.recipe.trained_mask(r, run.tokens.end_ids) & valid[:, None]    # [N, T]
    return MicroBatch(r, samples, texts, as_tensor([s.total for s in scores]), as_tensor([s.accuracy for s in scores]),
                      as_tensor([s.format for s in scores]), valid, lengths, valid.clone())


def reference_logprobs(run, rollout):
    """Log-probs under the frozen reference: its own sharded copy, or with LoRA the policy itself with its
    adapters switched off (the base model, with no second copy of the weights)."""
    if run.reference is not None:
        return logprobs(run, run.reference, rollout)
    with run.recipe.adapters.disabled(run.policy):
        return logprobs(run, run.policy, rollout)


def logprobs(run, model, rollout, temperature=None):
    """The recipe's log-probs of the distribution the completions were sampled from: at the run's temperature,
    the suppressed tokens left out of the softmax as sampling leaves them out."""
    temperature = run.cfg.temperature if temperature is None else temperature
    return run.recipe.logprobs(model, rollout, run.tokens.pad_id, temperature, suppress_ids=run.tokens.suppress_ids)


def optimizer_step(run, batches, denominator):
    """Accumulate the loss of every micro-batch (each divided by the whole batch's count, so micro-batches and
    processes add up to one batch), clip, and step; a skipped update leaves the lr schedule where it is."""
    sums = run.recipe.guard(run, lambda: accumulate(run, batches, denominator))
    grad_norm, finite = clip_and_step(run.policy, run.optimizer, run.cfg.grad_clip)
    if finite:
        run.scheduler.step()
    kl, clip, low, high, tokens = all_sum(sums).tolist()
    tokens = max(tokens, 1)
    return {"kl": kl / tokens, "clip_frac": clip / tokens, "clip_frac_low": low / tokens,
            "clip_frac_high": high / tokens, "grad_norm": grad_norm, "skipped": int(not finite)}


def accumulate(run, batches, denominator):
    """The loss's backward, micro-batch by micro-batch; returns this process's metric sums [5]."""
    sums = torch.zeros(5, device=run.device)
    for b in batches:
        logp = logprobs(run, run.policy, b.rollout)                                  # [N, T]
        old = logp.detach() if b.old_logp is None else b.old_logp
        loss, m = run.recipe.loss(logp, old, b.ref_logp, b.advantages, b.rollout.mask, denominator=denominator)
        loss.backward()
        sums += torch.stack([m[k] * m["tokens"] for k in ("kl", "clip_frac", "clip_frac_low", "clip_frac_high")]
                            + [m["tokens"]])
    return sums


def clip_and_step(model, optimizer, max_norm):
    """Clip the accumulated gradients and step; a non-finite norm (it is global, so every rank sees the same
    value) skips the update on all ranks. Returns (grad norm, whether the step was taken)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), finite


def rollout_stats(batches, group_size):
    """Means over the global batch of readable samples: what the policy does, before any group is dropped."""
    rows = []
    for b in batches:
        valid = b.valid.float()                                                        # [N]
        zero_std = (b.rewards.view(-1, group_size).std(1) == 0).float().repeat_interleave(group_size)  # [N]
        rows.append(torch.stack([valid, b.rewards * valid, b.accuracy * valid, b.format * valid,
                                 b.lengths * valid, zero_std * valid]).sum(1))
    n, rew, acc, fmt, length, zero = all_sum(torch.stack(rows).sum(0)).tolist()
    n = max(n, 1)
    return {"reward": rew / n, "accuracy": acc / n, "format": fmt / n, "completion_len": length / n,
            "frac_zero_std": zero / n}


def all_sum(x):
    dist.all_reduce(x)
    return x


def sample_records(batches, n, step):
    """The first n completions of the step's first micro-batch, for samples.jsonl."""
    b = batches[0]
    G = b.rollout.group_size
    return [{"step": step, "question": b.samples[i // G].question, "answer": b.samples[i // G].answer,
             "completion": b.completions[i], "reward": b.rewards[i].item()} for i in range(min(n, len(b.completions)))]


# -----------------------------------------------------------------------------
# Supervised steps: the format warm start (and recipes/sft.py), on the same log-probs as GRPO

def supervised_step(run, optimizer, samples, targets, counts=None):
    """One optimizer step of cross-entropy on the target texts of this rank's share of a global batch,
    micro-batch by micro-batch, the loss divided by the global batch's target tokens (grpo.sft_loss).
    Logged: that loss, and p(answer), the mean probability of a whole target."""
    cfg = run.cfg
    batches = [teacher_forced(run, s, t, counts) for s, t in zip(data.chunks(samples, cfg.micro_batch),
                                                                 data.chunks(targets, cfg.micro_batch))]
    tokens = all_sum(sum(r.mask.sum() for r in batches).float()) / dist.get_world_size()
    sums = run.recipe.guard(run, lambda: supervised_passes(run, batches, tokens))
    grad_norm, finite = clip_and_step(run.policy, optimizer, cfg.grad_clip)
    nll, prob, n = all_sum(sums).tolist()
    return {"loss": nll / max(float(tokens) * dist.get_world_size(), 1), "answer_prob": prob / max(n, 1),
            "grad_norm": grad_norm, "skipped": int(not finite)}


def supervised_passes(run, batches, tokens):
    """The cross-entropy's backward, micro-batch by micro-batch; returns this process's metric sums [3]."""
    sums = torch.zeros(3, device=run.device)
    for r in batches:
        logp = logprobs(run, run.policy, r, temperature=1.0)                          # [B, T] targets: no temperature
        loss, m = grpo.sft_loss(logp, r.mask, tokens)
        loss.backward()
        sums += torch.stack([m["nll"] * m["tokens"], m["answer_prob"] * m["sequences"], m["sequences"]])
    return sums


def teacher_forced(run, samples, targets, counts=None):
    """A Rollout whose completions are given texts (group size 1), for supervised log-probs. A sample with
    unreadable audio keeps its place with silence and an empty mask."""
    audios, ok = data.read_audio(samples, run.cfg.downmix, counts)
    inputs = M.collate(run.processor, samples, audios, run.cfg.prompt, run.cfg.system_prompt or None,
                       run.cfg.think_words).to(run.device)
    ids = run.processor.tokenizer(targets, add_special_tokens=False, padding="longest", padding_side="right",
                                  return_tensors="pt")["input_ids"].to(run.device)
    prompts = [row[m.bool()] for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    mask = grpo.completion_mask(ids, run.tokens.end_ids) & torch.tensor(ok, device=run.device)[:, None]
    return grpo.Rollout(prompts, inputs["input_features"], inputs["feature_attention_mask"], ids, mask, group_size=1)


def warm_start(run, steps, lr, questions=()):
    """Teach a random model the answer format before RL. With questions (--warm-start-data): their CORRECT
    answers, the audio encoder frozen, so the model learns to read the audio for another question, as a
    pretrained base has. Without: the training questions with `<answer>{a random choice}</answer>`; it
    starts GRPO at chance, but has learned that the answer does not depend on the audio (docs/workshop.md).
    Under --prompt think a target opens with the fixed WARM_START_REASONING as its think block: the format only.
    The batch is drawn for all processes before each takes its share: it does not depend on their number."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    rng, pool = np.random.default_rng(cfg.seed), questions or run.questions
    frozen = [p for p in run.policy.model.audio_tower.parameters() if p.requires_grad] if questions else []
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(trainable(run.policy), lr=lr, weight_decay=0.0)
    run.policy.train()
    for _ in tqdm(range(steps), desc="warm start" + ("" if questions else " (format only)"), disable=rank != 0):
        batch = [pool[i] for i in rng.choice(len(pool), WARM_START_BATCH)]
        answers = [s.answer for s in batch] if questions else [rng.choice(s.choices) for s in batch]
        targets = [data.target_text(a, cfg.prompt, WARM_START_REASONING) + M.END_TOKENS[0] for a in answers]
        supervised_step(run, opt, data.my_share(batch, rank, world), data.my_share(targets, rank, world))
    for p in frozen:
        p.requires_grad_(True)


# -----------------------------------------------------------------------------
# The held-out score

@torch.no_grad()
def heldout(run, samples):
    """The held-out questions scored as evaluate.py scores a checkpoint: greedy completions (the
    checkpoint's generation settings), the benchmark's rule on the first answer tag (MMAU's string match
    for MMAU, synthetic and plain data), per category too; plus the rate of completions in the prompt's
    format. The batches are dealt round-robin, so every question is scored once whatever the number of
    processes; unequal shares are safe, as inside model.unsharded a forward issues no collective."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    run.policy.eval()
    records, mine = [], data.chunks(samples, cfg.micro_batch)[rank::world]  # each question once; shares may differ
    with M.unsharded(run.policy):
        for batch in mine:
            audios, _ = data.read_audio(batch, cfg.downmix)
            texts = M.generate(run.policy, run.processor, batch, audios, cfg.prompt, cfg.max_new_tokens,
                               cfg.system_prompt or None, cfg.think_words)
            records += [{**s.meta, "question": s.question, "choices": s.choices, "answer": s.answer,
                         "model_prediction": reward.extract_answer(t), "model_output": t} for s, t in zip(batch, texts)]
        nll = {} if cfg.prompt == "think" else {"eval_answer_nll": answer_nll(run, mine)}
    everyone = [None] * world
    dist.all_gather_object(everyone, records)
    records = [r for part in everyone for r in part]
    s = reward.score_predictions(records, "model_prediction")
    groups = {f"{name}={value}": t.accuracy / 100 for name, tallies in s.groups.items() for value, t in tallies.items()}
    return {"eval_accuracy": s.total.accuracy / 100, "eval_format":
            sum(reward.format_reward(r["model_output"], cfg.prompt) for r in records) / max(len(records), 1),
            "eval_questions": s.total.total, "eval_groups": groups, **nll}


@torch.no_grad()
def answer_nll(run, batches):
    """The mean over every process's questions of -log p(the correct answer's whole target | the prompt), from
    this process's `batches` (inside model.unsharded: the shares may differ): it moves where greedy accuracy
    stays flat (log 4 = 1.39 for a policy in format that spreads its mass over four choices)."""
    sums = torch.zeros(2, device=run.device)
    for batch in batches:
        targets = [data.target_text(s.answer, run.cfg.prompt) + M.END_TOKENS[0] for s in batch]
        r = teacher_forced(run, batch, targets)
        logp = logprobs(run, run.policy, r, temperature=1.0)                   # [B, T]
        sums += torch.stack([-(logp * r.mask).sum(), r.mask.any(1).sum().float()])
    nll, n = all_sum(sums).tolist()
    return nll / max(n, 1)


if __name__ == "__main__":
    import train  # run as the module `train`, the one recipes/ import, not as a second copy named __main__
    sys.exit(M.run_main(train.main))
