"""GRPO variants from after R1-AQA, each in the place of the sub-step of train.py's step it changes.

--advantage-scale batch|none (Lite PPO; Dr. GRPO) replaces the advantages; --clip-low/--clip-high
(DAPO's clip-higher), --ratio-level sequence (GSPO) and --loss-aggregation token_mean|token_sum (DAPO;
Dr. GRPO) replace the loss and what it divides by; --mask-truncated (DAPO's overlong filtering) the
trained mask. They combine freely, and each equals TRL's matching setting (tests/recipes/test_variants.py).
docs/variants.md has the sources and what each measured on the demo.
"""

from functools import partial

import torch
import torch.distributed as dist

import grpo
import model as M

AGGREGATIONS = ("sequence_mean", "token_mean", "token_sum")
ADVANTAGE_SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")


def apply(recipe, cfg):
    """The recipe with the variants the config asks for in place of R1-AQA's sub-steps."""
    check(cfg)
    recipe.loss = partial(loss, beta=cfg.beta, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                          aggregation=cfg.loss_aggregation, ratio_level=cfg.ratio_level)
    recipe.loss_count = {"sequence_mean": lambda b: b.counted.sum(), "token_mean": lambda b: b.rollout.mask.sum(),
                         "token_sum": lambda b: b.counted.sum() * cfg.max_new_tokens}[cfg.loss_aggregation]
    if cfg.advantage_scale != "group":
        recipe.advantages = partial(scaled_advantages, scale=cfg.advantage_scale)
    if cfg.mask_truncated:
        recipe.trained_mask = mask_truncated
    return recipe


def check(cfg):
    rules = [(cfg.loss_aggregation in AGGREGATIONS, "loss_aggregation", AGGREGATIONS),
             (cfg.advantage_scale in ADVANTAGE_SCALES, "advantage_scale", ADVANTAGE_SCALES),
             (cfg.ratio_level in RATIO_LEVELS, "ratio_level", RATIO_LEVELS)]
    problems = [f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be one of {', '.join(allowed)}"
                for ok, name, allowed in rules if not ok]
    problems += [f"--clip-low {cfg.clip_low}: must be in (0, 1)"] if not 0 < cfg.clip_low < 1 else []
    problems += [f"--clip-high {cfg.clip_high}: must be > 0"] if not cfg.clip_high > 0 else []
    if problems:
        raise M.UsageError("; ".join(problems))


# -----------------------------------------------------------------------------
# The advantages: divided by the batch's std, or not at all

def scaled_advantages(batches, group_size, scale):
    """(r - group mean), divided by the std of every counted reward of the global batch (scale "batch": a
    group whose rewards barely differ is not blown up; a truncated completion's reward counts, as in TRL)
    or by nothing ("none": too easy or too hard prompts are not over-weighted). The batch std is summed
    over processes, so one process equals two. A completion that does not train gets 0."""
    assert scale in ("batch", "none"), f"advantage scale {scale!r}: use batch or none (group: grpo.group_advantages)"
    trained = [b.rollout.mask.any(1) for b in batches]                                  # [N] each
    std = None
    if scale == "batch":
        sums = sum(reward_sums(b.rewards[b.counted]) for b in batches)                  # [3]
        dist.all_reduce(sums)
        std = reward_std(sums)                                                          # []
    out = []
    for b, t in zip(batches, trained):
        r = b.rewards.view(-1, group_size)                                              # [B, G]
        centred = (r - r.mean(1, keepdim=True)).flatten()                               # [N]
        out.append((centred if std is None else centred / (std + 1e-4)) * t)           # [N]
    return out


def reward_sums(rewards):
    """[count, sum, sum of squares] of the rewards, fp64: what processes all-reduce for the batch std."""
    r = rewards.double()                                                   # [N]
    return torch.stack([r.new_tensor(r.numel()), r.sum(), (r * r).sum()])  # [3]


def reward_std(sums):
    """Unbiased std of all the rewards behind sums (reward_sums, summed over processes) as fp32."""
    n, s, sq = sums.unbind()
    return ((sq - s * s / n) / (n - 1)).clamp(min=0).sqrt().float()        # []


# -----------------------------------------------------------------------------
# The loss: the ratio per token or per sequence, asymmetric clip, three aggregations

def loss(logp, old_logp, ref_logp, advantages, mask, denominator=None, beta=0.04, clip_low=0.2, clip_high=0.2,
         aggregation="sequence_mean", ratio_level="token"):
    """grpo.grpo_loss with the ratio of ratio_level, the clip [1 - clip_low, 1 + clip_high] and the
    aggregation's count; with R1-AQA's settings it is grpo_loss exactly. Returns (loss, metrics)."""
    m = mask.float()                                                       # [N, T]
    ratio = importance_ratio(logp, old_logp, m, ratio_level)               # [N, T]
    per_token, binds = grpo.clipped_surrogate(ratio, advantages, clip_low, clip_high)  # [N, T], [N, T]
    kl = grpo.k3_kl(logp, ref_logp) if beta != 0 else torch.zeros_like(logp)  # [N, T]
    if beta != 0:
        per_token = per_token + beta * kl
    return aggregate(per_token, m, aggregation, denominator), grpo.loss_metrics(kl, ratio, binds, m)


def importance_ratio(logp, old_logp, m, level="token"):
    """pi / pi_old per token, or per sequence (GSPO): exp of the mean token log-ratio, one weight per
    completion like its reward, clipped as one, so per-token noise does not pile up over long completions.
    Every token carries its sequence's ratio; the KL term stays per token."""
    assert level in RATIO_LEVELS, f"ratio level {level!r}: use one of {RATIO_LEVELS}"
    if level == "token":
        return torch.exp(logp - old_logp)                                  # [N, T]
    log_ratio = ((logp - old_logp) * m).sum(1) / m.sum(1).clamp(min=1)    # [N] mean over the mask
    return torch.exp(log_ratio)[:, None].expand_as(logp)                   # [N, T] equal along a row


def aggregate(per_token, m, aggregation="sequence_mean", denominator=None):
    """One loss from per-token losses [N, T] over the mask m, divided by a count (the sequences counted are
    all N rows, a truncated completion's too, as in TRL):
      sequence_mean: each completion's token mean, summed, / N sequences (R1-AQA);
      token_mean: the sum over all tokens / their number (DAPO): every token weighs the same;
      token_sum: the sum over all tokens / (N * max_new_tokens) (Dr. GRPO), a constant; denominator required.
    denominator: the whole batch's count / world size, when this is one micro-batch of one process."""
    assert aggregation in AGGREGATIONS, f"aggregation {aggregation!r}: use one of {AGGREGATIONS}"
    assert aggregation != "token_sum" or denominator is not None, "token_sum needs a denominator"
    if aggregation == "sequence_mean":
        total, count = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum(), m.new_tensor(m.size(0))
    else:
        total, count = (per_token * m).sum(), m.sum()
    return total / (count if denominator is None else denominator)


# -----------------------------------------------------------------------------
# The trained mask: completions cut off at the length limit left out

def mask_truncated(rollout, end_ids):
    """The mask without the completions that never ended within the length limit (DAPO's overlong
    filtering): a cut-off answer is left out instead of being scored as wrong."""
    ids, mask = rollout.completion_ids, rollout.mask
    is_end = torch.isin(ids, torch.as_tensor(end_ids, device=ids.device))  # [N, T]
    ended = (is_end & mask).any(1, keepdim=True)                           # [N, 1]
    return mask & ended                                                    # [N, T]
