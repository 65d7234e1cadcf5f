"""Every flag of train.py, with its help and its check, and the demo preset; one flat dataclass, as in CleanRL.

Each Config field is a flag (max_steps -> --max-steps), R1-AQA's values the defaults; its metadata holds the
help and, for a flag beyond R1-AQA, the recipes/ module it needs when not at its default (train.recipe_for
imports it). With no model and no data given, `python train.py` runs the workshop demo's preset. Flags that
make no sense, and paths that do not exist, stop the run here, before anything is built, in one line.
"""

import argparse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import data
import model as M


def flag(default, help, extra=None):
    """A Config field: its default, its --help, and the recipes/ module it needs when not at its default."""
    return field(default=default, metadata={"help": help, "extra": extra})


@dataclass
class Config:
    """Every flag of train.py (max_steps -> --max-steps). R1-AQA's values are the defaults."""
    model: str = flag("tiny", "a local Qwen2-Audio or Qwen2.5-Omni folder, or tiny / tiny-omni (built offline in "
                              "--cache-dir)")
    data: str = flag("synthetic", "training data (R1-AQA JSONL, MMAU JSON or plain JSONL), or synthetic")
    audio_dir: str = flag("", "folder that relative audio paths in the data refer to ('' = the data file's folder)")
    downmix: str = flag("first", "multi-channel audio: keep channel 0 (first, R1-AQA) or average the channels (mean)")
    eval_data: str = flag("", "held-out data scored before and after training ('' = none; synthetic: its test split)")
    out: str = flag("runs/demo", "run folder: metrics.jsonl, samples.jsonl, checkpoint-{step}/")
    cache_dir: str = flag("runs", "where the tiny model and the synthetic task are built")
    algo: str = flag("grpo", "grpo, or sft: supervised fine-tuning on the correct answer (the paper's baseline)",
                     "sft")
    engine: str = flag("fast", "fast: engine/ (KV cache forked G ways, packed log-probs); plain: grpo.py's own "
                               "sampler and log-probs, the same numbers, slower")
    max_steps: int = flag(1000, "optimizer steps; each takes one global batch of questions")
    prompts_per_step: int = flag(16, "global batch in prompts (all processes together)")
    micro_batch: int = flag(1, "prompts per forward on each process, for sampling and for training")
    group_size: int = flag(8, "G: completions sampled per prompt")
    lr: float = flag(1e-6, "AdamW learning rate (when not given: 1e-6 GRPO, 1e-5 GRPO+LoRA and SFT, 1e-4 SFT+LoRA)")
    lr_decay: bool = flag(True, "decay the learning rate linearly to 0 over the run (R1-AQA); off = constant")
    beta: float = flag(0.04, "KL weight; 0 drops the reference model entirely")
    clip_low: float = flag(0.2, "the ratio is clipped to [1 - clip_low, 1 + clip_high] (PPO; R1-AQA 0.2)",
                           "variants")
    clip_high: float = flag(0.2, "upper clip range; DAPO's clip-higher uses 0.28", "variants")
    num_iterations: int = flag(1, "optimizer steps per rollout batch (mu); > 1 makes the clip act")
    loss_aggregation: str = flag("sequence_mean", "sequence_mean (R1-AQA), token_mean (DAPO), token_sum (Dr. GRPO)",
                                 "variants")
    advantage_scale: str = flag("group", "divide advantages by the group's std (R1-AQA), the batch's, or none "
                                         "(Dr. GRPO)", "variants")
    ratio_level: str = flag("token", "importance ratio per token (R1-AQA), or per sequence (GSPO)", "variants")
    mask_truncated: bool = flag(False, "leave completions cut off at --max-new-tokens out of the loss (DAPO)",
                                "variants")
    dynamic_sampling: int = flag(0, "extra rounds of prompts to replace groups with equal rewards (DAPO; 0 = off)",
                                 "dynamic_sampling")
    temperature: float = flag(1.0, "sampling temperature (also divides the logits in the loss)")
    top_k: int = flag(50, "sample among the k likeliest tokens (0 = all)")
    top_p: float = flag(1.0, "nucleus sampling mass (1.0 = off)")
    max_new_tokens: int = flag(256, "completion length limit")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "max global gradient norm")
    seed: int = flag(42, "data order and sampling noise")
    prompt: str = flag("answer", "the paper's prompt: direct (<1>), answer (<2>, R1-AQA), think (<3>); sets the "
                                 "format reward")
    think_words: int = flag(0, "with --prompt think: ask for a reasoning of fewer words than this (Ke-Omni-R: 50; "
                               "0 = no limit)")
    system_prompt: str = flag("", "the chat's system turn ('' = the chat template's default, as R1-AQA and "
                                  "Ke-Omni-R)")
    dtype: str = flag("bfloat16", "compute dtype (bfloat16 or float32); weights and optimizer stay fp32")
    gradient_checkpointing: bool = flag(True, "recompute layer activations in backward to save memory")
    dense_attention: bool = flag(False, "packed passes over a dense [B, 1, L, L] mask (the fallback), not "
                                        "FlexAttention on a GPU")
    lora_rank: int = flag(0, "LoRA adapters of this rank on a frozen base (0 = train every weight)", "lora")
    lora_alpha: float = flag(16.0, "LoRA scaling is alpha / rank", "lora")
    lora_dropout: float = flag(0.0, "dropout on the adapters' input (> 0: 1 and 2 processes no longer agree)",
                               "lora")
    lora_targets: str = flag("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "language-model linears that get adapters (lm_head too if named)", "lora")
    lora_audio: bool = flag(False, "also put adapters on every linear of the audio encoder", "lora")
    balance_answers: bool = flag(False, "order the data so every batch has each answer equally often")
    curriculum: int = flag(0, "SARI: sample this many completions per question first, then train easy to hard "
                              "(0 = off)", "curriculum")
    reward_weights: str = flag("1,1", "weights of the accuracy and format rewards (R1-AQA 1,1)")
    warm_start_steps: int = flag(0, "supervised steps on the answer FORMAT only (random answers), before GRPO")
    warm_start_lr: float = flag(3e-3, "learning rate of the warm start")
    warm_start_data: str = flag("", "warm start on these questions' CORRECT answers, audio encoder frozen ('' = "
                                    "format only: random answers; synthetic-loudness: the demo's second question)")
    save_every: int = flag(100, "write a checkpoint every this many steps (and at the end)")
    keep_last: int = flag(3, "newest checkpoints kept (>= 1), besides checkpoint-0")
    resume: bool = flag(False, "continue the run in --out from its newest complete checkpoint (same settings)")
    overwrite: bool = flag(False, "start over in an --out that holds a run, deleting its checkpoints and logs")
    log_samples: int = flag(2, "completions per step written to samples.jsonl")
    max_bad_fraction: float = flag(0.01, "stop if more than this share of samples has unreadable audio")
    eval_samples: int = flag(200, "held-out questions scored (the first N of --eval-data)")
    eval_every: int = flag(0, "also score them at every checkpoint whose step is a multiple of this (0 = never)")
    dist_timeout_minutes: float = flag(30.0, "a process waiting longer than this in one collective aborts the run")
    plan: bool = flag(False, "print the per-GPU memory plan and FLOPs of this config (the 7B unless --model is a "
                             "folder), exit", "plan")
    gpus: int = flag(8, "number of GPUs the --plan is for")
    gpu_mem: float = flag(80.0, "GiB per GPU that the --plan checks against")


TINY_MODELS = {"tiny": "tiny-qwen2-audio-2s-seed0", "tiny-omni": "tiny-omni-2s-seed0"}  # --model names of the tiny
                # models workshop/demo.py builds offline, and their folders in --cache-dir


LOUDNESS = "synthetic-loudness"  # --warm-start-data: the demo's second question, built in --cache-dir


# The workshop demo (`python train.py`): a tiny model learns a synthetic task on a laptop CPU in minutes.
# R1-AQA's values above stay the defaults for real models; flags given explicitly override these. The warm
# start answers another question about the same clips (how loud), the audio encoder frozen: a start that
# listens, as a pretrained base does. beta 0.1 keeps some probability on every answer; the lr decays to 0,
# so the end of the run is stable. Why each, as measured: docs/workshop.md.
DEMO = dict(max_steps=300, prompts_per_step=32, micro_batch=32, lr=1e-3, lr_decay=True, beta=0.1,
            max_new_tokens=16, dtype="float32", gradient_checkpointing=False, balance_answers=True,
            warm_start_steps=200, warm_start_data=LOUDNESS, save_every=50, eval_every=50, seed=0)


# The learning rate when none is given, by (algo, LoRA): GRPO R1-AQA's 1e-6; the others are the common
# choices for a 7B (the paper gives no SFT settings; docs/experiment.md).
DEFAULT_LR = {("grpo", False): 1e-6, ("grpo", True): 1e-5, ("sft", False): 1e-5, ("sft", True): 1e-4}


WARM_START_BATCH = 16  # questions per warm-start step, all processes together
WARM_START_REASONING = ""  # the think block of the warm start's targets under --prompt think: the data holds
                           # no reasoning, so it teaches the format `<think></think><answer>...</answer>` alone


def parse_args(argv=None):
    """Config fields become flags, their help from the field's metadata. With no model and no data given,
    the demo preset; returns (config, whether it is the demo)."""
    parser = argparse.ArgumentParser(description="Train Qwen2-Audio with GRPO (R1-AQA), or SFT; with no flag, the CPU demo.")
    for f in fields(Config):
        flag_, kind = "--" + f.name.replace("_", "-"), {} if f.type is bool else {"type": f.type}
        action = argparse.BooleanOptionalAction if f.type is bool else "store"
        parser.add_argument(flag_, action=action, default=None, help=f"{f.metadata['help']} (default {f.default})",
                            **kind)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    demo = (given.get("model", "tiny") in TINY_MODELS and given.get("data", "synthetic") == "synthetic"
            and not given.get("plan"))
    cfg = replace(Config(), **{**(DEMO if demo else {}), **given})
    if demo and not cfg.warm_start_steps and "warm_start_data" not in given:
        cfg.warm_start_data = ""  # --warm-start-steps 0 turns the demo's warm start off, its data too
    if demo and "save_every" in given and "eval_every" not in given:
        cfg.eval_every = cfg.save_every  # the demo scores its held-out set at the checkpoints you ask for
    if "lr" not in given and not demo:
        cfg.lr = DEFAULT_LR.get((cfg.algo, cfg.lora_rank > 0), cfg.lr)
    return cfg, demo


def validate(cfg, world):
    """Flags that make no sense stop the run before anything is built, each named with the reason."""
    problems = [f"--{name.replace('_', '-')} {getattr(cfg, name)}: {why}"
                for ok, name, why in sampling_rules(cfg) + batch_rules(cfg, world) + mode_rules(cfg) if not ok]
    if problems:
        raise M.UsageError("; ".join(problems))


def sampling_rules(cfg):
    return [
        (cfg.algo in ("grpo", "sft"), "algo", "must be grpo or sft"),
        (cfg.engine in ("fast", "plain"), "engine", "must be fast or plain"),
        (cfg.temperature > 0, "temperature", "must be > 0: it divides the logits"),
        (cfg.group_size >= 2 or cfg.algo == "sft", "group_size", "GRPO compares completions: at least 2 per prompt"),
        (0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]"),
        (cfg.top_k >= 0, "top_k", "must be >= 0 (0 = no limit)"),
        (cfg.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
        (cfg.beta >= 0, "beta", "must be >= 0 (0 = no KL term and no reference model)"),
        (cfg.lr >= 0, "lr", "must be >= 0"),
        (cfg.warm_start_lr >= 0, "warm_start_lr", "must be >= 0"),
        (cfg.num_iterations >= 1, "num_iterations", "must be >= 1"),
        (cfg.grad_clip > 0, "grad_clip", "must be > 0"),
        (cfg.weight_decay >= 0, "weight_decay", "must be >= 0"),
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
    lora = [f.name for f in fields(Config) if f.metadata["extra"] == "lora" and f.name != "lora_rank"]
    return [
        (cfg.dtype in ("bfloat16", "float32"), "dtype", "must be bfloat16 or float32"),
        (cfg.prompt in data.PROMPTS, "prompt", f"must be one of {', '.join(data.PROMPTS)}"),
        (cfg.think_words >= 0 and (cfg.think_words == 0 or cfg.prompt == "think"), "think_words",
         "must be >= 0, and only the think prompt asks for a reasoning"),
        (cfg.downmix in data.DOWNMIX, "downmix", f"must be one of {', '.join(data.DOWNMIX)}"),
        (cfg.prompt != "think" or cfg.algo == "grpo", "prompt",
         "has no supervised target for --algo sft: the data holds answers, not reasoning"),
        (cfg.lora_rank >= 0, "lora_rank", "must be >= 0 (0 = no LoRA)"),
        (cfg.lora_rank > 0 or all(getattr(cfg, n) == getattr(Config, n) for n in lora), "lora_rank",
         "is 0, so --lora-alpha/--lora-dropout/--lora-targets/--lora-audio would do nothing: give a rank"),
        (cfg.warm_start_steps or not cfg.warm_start_data, "warm_start_data",
         "would do nothing without --warm-start-steps: give the number of steps"),
        (cfg.lora_rank == 0 or not cfg.warm_start_steps, "lora_rank",
         "with --warm-start-steps: warm start a full model first, then start LoRA from its checkpoint-0"),
        (cfg.dist_timeout_minutes > 0, "dist_timeout_minutes", "must be > 0"),
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
    if cfg.model not in TINY_MODELS:
        M.check_model_dir(cfg.model)
        if M.adapter_base(cfg.model) is not None:
            raise M.UsageError(f"--model {cfg.model}: LoRA adapters, not a model to train: give the merged model "
                               f"of a LoRA run's last checkpoint (checkpoint-N/merged) or the base model "
                               f"{M.adapter_base(cfg.model)} (--resume continues the LoRA run itself)")
    named = {"--data": "synthetic", "--warm-start-data": LOUDNESS}
    for name, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data), ("--warm-start-data", cfg.warm_start_data)):
        if path and path != named.get(name) and not Path(path).is_file():
            what = "is a folder, not a question file" if Path(path).is_dir() else "no such file"
            raise M.UsageError(f"{name} {path}: {what} (give an R1-AQA/AVQA JSONL, MMAU JSON or plain JSONL file"
                               + (f", or `{named[name]}`)" if name in named else ")"))
    if cfg.audio_dir:
        try:
            data.check_audio_dir(cfg.audio_dir)
        except data.DataError as e:
            raise M.UsageError(f"{e} (it is where relative audio paths in the data are looked up; leave it "
                               f"out to use the data file's folder)") from None


def extras_asked(cfg):
    """{recipes/ module: the first flag asking for it}, for every Config field not at its default that names an
    extra, in the order the extras apply."""
    asked = {}
    for f in fields(Config):
        if f.metadata["extra"] and f.metadata["extra"] != "plan" and getattr(cfg, f.name) != f.default:
            asked.setdefault(f.metadata["extra"], f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}")
    order = ("lora", "sft", "variants", "dynamic_sampling", "curriculum")
    return {name: asked[name] for name in order if name in asked}
