"""Train Qwen2-Audio with GRPO, the R1-AQA recipe, or with supervised fine-tuning, on one process or many.

GRPO (the default), each step: take prompts_per_step questions, sample group_size answers to each,
score them with the R1-AQA rewards, turn the rewards into group-relative advantages, and take an
AdamW step on the clipped-surrogate + KL loss. SFT (--algo sft, the paper's baseline): the same
questions, cross-entropy on the correct answer. This file is the run: its one Config (every field a
flag), the checks of every flag and path before anything is built, the model, optimizer and
reference, resume or warm start, and the loop with its checkpoints and logs. What one step does is
in steps.py, its math in grpo.py. The model is always sharded with FSDP2: fp32 master weights (or,
with --lora-rank, a frozen base and fp32 adapters), bf16 compute, and a process group of one when
not launched by torchrun.

    python train.py                      # the CPU workshop demo: tiny model, synthetic pitch task
    torchrun --nproc_per_node 8 train.py --model /path/Qwen2-Audio-7B-Instruct --data train.jsonl
    python train.py --help               # every flag; R1-AQA's values are the defaults
"""

import argparse
import inspect
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import batches as B
import checkpoint
import curriculum
import data
import synthetic
import grpo
import lora as L
import model as M
import plan
import steps as S
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
    warm_start_data: str = ""  # warm start on these questions' CORRECT answers, audio encoder frozen ("" = format only; "synthetic-loudness": the demo's second question)
    save_every: int = 100  # write a checkpoint every this many steps (and at the end)
    keep_last: int = 3  # newest checkpoints kept (>= 1), besides checkpoint-0
    resume: bool = False  # continue the run in --out from its newest complete checkpoint (same settings)
    overwrite: bool = False  # start over in an --out that holds a run, deleting its checkpoints and logs
    log_samples: int = 2  # completions per step written to samples.jsonl
    max_bad_fraction: float = 0.01  # stop if more than this share of samples has unreadable audio
    eval_samples: int = 200  # held-out questions scored (the first N of --eval-data)
    eval_every: int = 0  # also score them at every checkpoint whose step is a multiple of this (0 = never)
    dist_timeout_minutes: float = 30.0  # a process waiting longer than this in one collective aborts the run (NCCL)
    plan: bool = False  # print the per-GPU memory plan and FLOPs of this config (the 7B unless --model is a folder), exit
    gpus: int = 8  # number of GPUs the --plan is for
    gpu_mem: float = 80.0  # GiB per GPU that the --plan checks against


# The workshop demo (`python train.py`): a tiny model learns a synthetic task on a laptop CPU in minutes.
# R1-AQA's values above stay the defaults for real models; flags given explicitly override these.
# The warm start answers another question about the same clips (how loud), audio encoder frozen: a start
# that listens, as a pretrained base does; a format-only warm start (random answers) teaches the answer
# to ignore the audio. beta 0.1 keeps some probability on every answer, so a class the policy gets wrong
# still yields a correct sample to learn from. The lr decays linearly to 0 (R1-AQA's schedule): at a
# constant 1e-3 AdamW kept taking steps of the same size after the task was learned (README).
DEMO = dict(max_steps=300, prompts_per_step=32, micro_batch=32, lr=1e-3, lr_decay=True, beta=0.1,
            max_new_tokens=16, dtype="float32", gradient_checkpointing=False, balance_answers=True,
            warm_start_steps=200, warm_start_data="synthetic-loudness", save_every=50, eval_every=50, seed=0)
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
        (S.reward_weights(cfg) is not None, "reward_weights", "must be two numbers >= 0: accuracy,format"),
    ]


def batch_rules(cfg, world):
    share = cfg.prompts_per_step // world
    return [
        (cfg.max_steps >= 0, "max_steps", "must be >= 0"),
        (cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world == 0, "prompts_per_step",
         f"the global batch must split evenly over the {world} process(es)"),
        (cfg.micro_batch >= 1 and share % min(cfg.micro_batch, max(share, 1)) == 0, "micro_batch",
         f"must divide each process's {share} prompts (or be at least that many)"),
        (cfg.warm_start_steps >= 0 and (cfg.warm_start_steps == 0 or S.WARM_START_BATCH % world == 0),
         "warm_start_steps", f"must be >= 0, and its batch of {S.WARM_START_BATCH} must split over {world} processes"),
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
        (cfg.warm_start_steps or not cfg.warm_start_data, "warm_start_data",
         "would do nothing without --warm-start-steps: give the number of steps"),
        (cfg.lora_rank == 0 or not cfg.warm_start_steps, "lora_rank",
         "with --warm-start-steps: warm start a full model first, then start LoRA from its checkpoint-0"),
        (0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
        (cfg.dist_timeout_minutes > 0, "dist_timeout_minutes", "must be > 0"),
    ]


def check_paths(cfg):
    """The model folder, the data files and the audio folder exist, before anything is built."""
    if cfg.model not in M.TINY_MODELS:
        M.check_model_dir(cfg.model)
        if M.adapter_base(cfg.model) is not None:
            raise M.UsageError(f"--model {cfg.model}: LoRA adapters, not a model to train: give the merged model "
                               f"of a LoRA run's last checkpoint (checkpoint-N/merged) or the base model "
                               f"{M.adapter_base(cfg.model)} (--resume continues the LoRA run itself)")
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data), ("--warm-start-data", cfg.warm_start_data)):
        if path and path not in ("synthetic", B.LOUDNESS) and not Path(path).is_file():
            what = "is a folder, not a question file" if Path(path).is_dir() else "no such file"
            keyword = {"--data": ", or `synthetic`", "--warm-start-data": f", or `{B.LOUDNESS}`"}.get(flag, "")
            raise M.UsageError(f"{flag} {path}: {what} (give an R1-AQA/AVQA JSONL, MMAU JSON or plain JSONL file"
                               f"{keyword})")
    if cfg.audio_dir:
        try:
            data.check_audio_dir(cfg.audio_dir)
        except data.DataError as e:
            raise M.UsageError(f"{e} (it is where relative audio paths in the data are looked up; leave it "
                               f"out to use the data file's folder)") from None


# -----------------------------------------------------------------------------
# Logs

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
    optimizer = torch.optim.AdamW(S.trainable(policy), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    updates = max(cfg.max_steps * (cfg.num_iterations if cfg.algo == "grpo" else 1), 1)
    decay = (lambda u: max(0.0, 1 - u / updates)) if cfg.lr_decay else (lambda u: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    tok = processor.tokenizer
    return S.Run(cfg, policy, None, processor, optimizer, scheduler, train, device, M.end_token_ids(tok),
               tok.pad_token_id, M.suppressed_token_ids(tok, policy.config.text_config.vocab_size),
               {"seen": 0, "bad": 0}, Path(model_dir).resolve(), lora)


def lora_settings(cfg):
    if not cfg.lora_rank:
        return None
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    return L.LoRASettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.lora_audio, cfg.seed)


def reference(cfg, policy, start=None):
    """The frozen reference: the policy at step 0, in the compute dtype, sharded, without grads. A copy of
    the policy's own shards, made while it holds those weights (the checkpoint is read once), or, where it no
    longer does (a resumed run that began with a warm start), read from `start`, that run's checkpoint-0.
    None with beta 0 or SFT (no KL term), and with LoRA (the policy with its adapters off is the reference)."""
    if cfg.beta == 0 or cfg.algo == "sft" or cfg.lora_rank:
        return None
    dtype = getattr(torch, cfg.dtype)
    ref = M.sharded_copy(policy, dtype) if start is None else M.sharded_load(start, storage_dtype=dtype)
    return ref.requires_grad_(False).eval()


def check_bad_fraction(run):
    """Stop (on every rank at once) when more than max_bad_fraction of the samples seen were unreadable;
    the first few bad ones are always tolerated (the fraction is taken of at least 100)."""
    counts = torch.tensor([run.counts["bad"], run.counts["seen"]], dtype=torch.float64, device=run.device)
    bad, seen = S.all_sum(counts).tolist()
    if bad > run.cfg.max_bad_fraction * max(seen, 100):
        raise SystemExit(f"stopping: {int(bad)} of {int(seen)} samples had unreadable audio "
                         f"(more than --max-bad-fraction {run.cfg.max_bad_fraction}); run `python data.py` on the data")
    return int(bad)


def print_plan(cfg):
    """Memory per GPU and FLOPs per step for this run's batch settings, from the config on the meta device."""
    config = plan.load_config(cfg.model if Path(cfg.model).is_dir() else {"tiny-omni": "omni-7b"}.get(cfg.model))
    print(plan.report(config, cfg.gpus, cfg.micro_batch, cfg.prompts_per_step, cfg.group_size,
                      new_tokens=cfg.max_new_tokens, gpu_mem_gb=cfg.gpu_mem, beta=cfg.beta, algo=cfg.algo,
                      lora_rank=cfg.lora_rank, attention="dense" if cfg.dense_attention else "block",
                      max_steps=cfg.max_steps, save_every=cfg.save_every, keep_last=cfg.keep_last))


def check_disk(cfg, model_dir, resume_from, device):
    """Stop before the model is built if the checkpoints this run will keep at once (plan.disk_plan, from the
    model's parameter counts) cannot fit where --out is. Rank 0 measures the free space and every rank
    decides on its figure, so all stop or none."""
    counts, _ = plan.count_model(plan.load_config(str(M.adapter_base(model_dir) or model_dir)))
    kept = [p for p in checkpoint.complete(cfg.out) if checkpoint.step_of(p) != 0] if resume_from else []
    first = resume_from is None and bool(cfg.warm_start_steps or cfg.curriculum)
    need = plan.disk_plan(counts, plan.Step(lora_rank=cfg.lora_rank, lora_audio=cfg.lora_audio),
                          getattr(torch, cfg.dtype).itemsize, cfg.max_steps, cfg.save_every, cfg.keep_last,
                          checkpoint.step_of(resume_from) if resume_from else 0, len(kept), first)
    free = torch.tensor([shutil.disk_usage(cfg.out).free if dist.get_rank() == 0 else 0], dtype=torch.float64,
                        device=device)
    dist.broadcast(free, src=0)
    if need.total > free.item():
        zero = " and checkpoint-0" if first else ""
        raise M.UsageError(f"--out {cfg.out}: the run needs about {need.total / 1e9:.1f} GB for its checkpoints "
                           f"({need.at_once} of {need.checkpoint / 1e9:.1f} GB at once{zero}) but "
                           f"{free.item() / 1e9:.1f} GB are free there: free some space, lower --keep-last, or "
                           f"choose another --out")
    return need


def main(argv=None):
    cfg, demo = parse_args(argv)
    if cfg.plan:
        return print_plan(cfg)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_paths(cfg)
    _, world, device = M.init_distributed(always=True, timeout=timedelta(minutes=cfg.dist_timeout_minutes))
    torch.manual_seed(cfg.seed)
    print0(f"{'demo preset' if demo else 'config'}: {json.dumps(asdict(cfg))}")
    run, held_out, start = setup(cfg, device)
    before = S.heldout(run, held_out) if held_out and start == 0 else None
    if before:
        print0(f"held-out before: accuracy {before['eval_accuracy']:.1%}, format {before['eval_format']:.1%} "
               f"({before['eval_questions']} questions)")
    history = loop(run, start, held_out)
    if held_out:
        after = S.heldout(run, held_out)
        print0(f"held-out after: accuracy {after['eval_accuracy']:.1%}, format {after['eval_format']:.1%} "
               f"({after['eval_questions']} questions)" + (f" (before: {before['eval_accuracy']:.1%})" if before else ""))
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
            synthetic.make_synthetic(Path(cfg.cache_dir) / "synthetic")
        if cfg.warm_start_data == B.LOUDNESS:
            synthetic.make_synthetic(Path(cfg.cache_dir) / B.LOUDNESS, task="loudness")
    dist.barrier()  # the folder is tidy and the tiny model and task exist before any rank reads them
    resume_from = checkpoint.check_run_folder(cfg, asdict(Config()))
    train, held_out = B.load_data(cfg)
    B.check_first_batch(cfg, train)
    if cfg.overwrite and rank == 0:
        print0(f"--overwrite: deleting the run in {out}")
        checkpoint.wipe(out)
    model_dir = (M.tiny(cfg.cache_dir, window_seconds=2, family=M.TINY_MODELS[cfg.model])
                 if cfg.model in M.TINY_MODELS else cfg.model)
    check_disk(cfg, model_dir, resume_from, device)
    run = build_run(cfg, model_dir, train, device)
    if resume_from is None and (cfg.warm_start_steps or cfg.curriculum):
        if cfg.warm_start_steps:
            S.warm_start(run, cfg.warm_start_steps, cfg.warm_start_lr, B.read_questions(
                "--warm-start-data", B.warm_start_path(cfg), cfg))
        checkpoint.save(run, 0)  # the starting policy: the reference, and the curriculum's pre-pass resumes from it
    run.ref = reference(cfg, run.policy, out / "checkpoint-0" if resume_from and cfg.warm_start_steps else None)
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
    step_fn = S.sft_step if cfg.algo == "sft" else S.train_step
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=dist.get_rank() != 0)
    for step in bar:
        metrics, samples = step_fn(run, step)
        metrics["bad_samples"] = check_bad_fraction(run)
        if held_out and cfg.eval_every and metrics["step"] % cfg.eval_every == 0:
            metrics.update(S.heldout(run, held_out))  # the same weights as the checkpoint saved below
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
