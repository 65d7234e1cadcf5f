"""Supervised fine-tuning (--algo sft): the paper's baseline, in the place of the GRPO step.

Each step takes the questions GRPO would see and trains on the correct answer in the prompt's format
(data.target_text), then the end token: cross-entropy by teacher forcing, through the same log-probs and
the same supervised step as the format warm start (train.supervised_step, grpo.sft_loss). No sampling,
no reference. docs/experiment.md runs the paper's table, SFT rows included.
"""

import time

import torch.distributed as dist

import data
import model as M
import train


def apply(recipe, cfg):
    recipe.step = step
    return recipe


def step(run, step):
    """One optimizer step of cross-entropy on the correct answers of the step's questions."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    indices = train.step_questions(cfg, run.recipe, run.questions, step)
    batch = data.my_share([run.questions[i] for i in indices], rank, world)
    targets = [data.target_text(s.answer, cfg.prompt) + M.END_TOKENS[0] for s in batch]
    run.policy.train()
    stats = train.supervised_step(run, run.optimizer, batch, targets, run.counts)
    if not stats["skipped"]:  # a skipped update leaves the schedule where it is
        run.scheduler.step()
    return {"step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0], "seconds": time.time() - t0}, []
