"""DAPO's dynamic sampling (--dynamic-sampling R), in the place of train.py's one round of sampling.

A group whose rewards are all equal has advantage 0 and gives no policy gradient. This drops such groups
and samples up to R extra rounds of prompts until the global batch holds prompts_per_step informative
groups (Yu et al., arXiv 2503.14476). Every process decides from all-reduced flags, so all stop together,
keep the same first informative groups and run the same micro-batch slots; an extra round's prompts are a
pure function of (seed, step, round), so resume stays exact and one process equals two.
"""

import numpy as np
import torch

import model as M
import train


def apply(recipe, cfg):
    if cfg.dynamic_sampling < 0:
        raise M.UsageError(f"--dynamic-sampling {cfg.dynamic_sampling}: must be >= 0 (extra rounds; 0 = off)")
    recipe.sample = sample_rounds
    return recipe


def informative_groups(rewards, group_size):
    """Groups whose rewards are not all equal [B]: the only ones with a policy gradient."""
    r = rewards.view(-1, group_size)                                       # [B, G]
    return (r != r[:, :1]).any(1)                                          # [B]


def round_questions(cfg, n, step, extra_round):
    """Dataset indices of an extra round's prompts: drawn from (seed, step, round) alone."""
    rng = np.random.default_rng([cfg.seed, step, extra_round])
    return rng.choice(n, cfg.prompts_per_step, replace=cfg.prompts_per_step > n).tolist()


def sample_rounds(run, step):
    """Rounds of this process's share of prompts until the global batch has prompts_per_step informative
    groups (or R extra rounds are spent); then every group past the first prompts_per_step informative ones,
    and every group with equal rewards, is masked out (neither trained on nor counted)."""
    cfg, P = run.cfg, run.cfg.prompts_per_step
    batches, informative = [], []
    for extra in range(cfg.dynamic_sampling + 1):
        indices = (train.step_questions(cfg, run.recipe, run.questions, step) if extra == 0
                   else round_questions(cfg, len(run.questions), step, extra))
        new = [train.rollout(run, step, [extra * P + p for p in pos], [run.questions[indices[p]] for p in pos])
               for pos in train.my_micro_batches(cfg)]
        flags = torch.zeros(P, device=run.device)                             # [P] over all processes
        flags[sum(train.my_micro_batches(cfg), [])] = torch.cat(
            [informative_groups(b.rewards, cfg.group_size).float() for b in new])
        batches, informative = batches + new, informative + [train.all_sum(flags)]
        if torch.cat(informative).sum() >= P:
            break
    keep = torch.cat(informative).bool()                                      # [rounds * P]
    keep &= keep.cumsum(0) <= P                                               # the first P informative groups
    mask_dropped(batches, keep, cfg)
    sampled = len(informative) * P
    own = batches[:len(train.my_micro_batches(cfg))]
    return train.Sampled(batches, trained_slots(batches), own, sampled, sampled - int(keep.sum()))


def mask_dropped(batches, keep, cfg):
    """Split the global keep flags [rounds * P] by each micro-batch's own prompts, round by round, and mask
    the dropped groups out of training and out of the count."""
    positions = sum(train.my_micro_batches(cfg), [])                          # this process's prompts
    rounds = len(keep) // cfg.prompts_per_step
    mine = torch.cat([keep[r * cfg.prompts_per_step:(r + 1) * cfg.prompts_per_step][positions] for r in range(rounds)])
    for b, kept in zip(batches, mine.split([len(b.rewards) // cfg.group_size for b in batches])):
        rows = kept.repeat_interleave(cfg.group_size)                         # [N]
        b.rollout.mask &= rows[:, None]
        b.counted &= rows


def trained_slots(batches):
    """The micro-batches that go through the policy pass: those in which some process trains on a completion.
    Every process keeps the same slots, so each runs the same forwards and backwards (FSDP's collectives
    line up)."""
    used = train.all_sum(torch.stack([b.rollout.mask.any().float() for b in batches]))  # [micro-batches]
    return [b for b, n in zip(batches, used.tolist()) if n > 0]
