"""Dynamic sampling over every batch split, run by tests/recipes/test_dynamic_sampling.py, in its process or as:

    torchrun --standalone --nproc_per_node 2 tests/recipes/dynsample_grid.py MODEL_DIR TRAIN_JSONL OUT_DIR

--prompts-per-step {1, 4, 32} x --micro-batch {1, 2, 32}, 2 steps each, dynamic sampling on, in one
process group: a combination that validation refuses is recorded with its message; one it accepts
trains (train.main) with recipes.dynamic_sampling.sample_rounds recorded: each step's sampled groups'
rewards and whether each was kept, in the global order (round by round, rank by rank), gathered from
every rank, and the number of micro-batches. OUT_DIR/grid.json holds the records,
OUT_DIR/P{prompts}-mb{micro_batch}/ each run.
"""

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import model as M  # noqa: E402
import train as T  # noqa: E402
from recipes import dynamic_sampling as DS  # noqa: E402

PROMPTS, MICRO_BATCHES, GROUP_SIZE = (1, 4, 32), (1, 2, 32), 2


def run_args(model_dir, train_jsonl, out, prompts, micro_batch):
    """2 steps of up to 1 extra round each. G = 2 leaves many groups with equal rewards, so the extra round
    is drawn; seed 3 is one where every combination draws it and the grid holds the three cases the test
    names (seeds 0-7 tried from the warm-started tiny model: 3, 4 and 7 do)."""
    return ["--model", str(model_dir), "--data", str(train_jsonl), "--out", str(out), "--max-steps", "2",
            "--prompts-per-step", str(prompts), "--micro-batch", str(micro_batch), "--group-size", str(GROUP_SIZE),
            "--dynamic-sampling", "1", "--beta", "0", "--max-new-tokens", "12", "--lr", "1e-3", "--dtype", "float32",
            "--seed", "3", "--no-gradient-checkpointing"]


def in_global_order(mine, prompts):
    """Every rank's per-prompt list (its share of each round, round by round) as one list ordered round by
    round, and within a round by rank: the order of the global positions."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    share = prompts // len(everyone)
    rounds = len(mine) // share
    return [x for r in range(rounds) for part in everyone for x in part[r * share:(r + 1) * share]]


def recording(sample_rounds, log):
    """sample_rounds, logging what it returns for the whole global batch."""
    def recorded(run, step):
        sampled = sample_rounds(run, step)
        P, batches = run.cfg.prompts_per_step, sampled.all
        rewards = torch.cat([b.rewards for b in batches]).view(-1, GROUP_SIZE)               # [rounds * share, G]
        kept = torch.cat([b.rollout.mask.any(1) for b in batches]).view(-1, GROUP_SIZE).any(1)  # [rounds * share]
        log.append({"sampled": sampled.prompts, "dropped": sampled.dropped, "micro_batches": len(batches),
                    "rewards": in_global_order(rewards.tolist(), P), "kept": in_global_order(kept.tolist(), P)})
        return sampled
    return recorded


def run_grid(model_dir, train_jsonl, out_dir):
    """Every combination in one process group (train.main would end it after each run: kept open here)."""
    M.init_distributed(always=True)
    threads, destroy, sample_rounds = torch.get_num_threads(), dist.destroy_process_group, DS.sample_rounds
    torch.set_num_threads(1)  # each rank's float sums the same way on 1 process as on 2
    dist.destroy_process_group, records = (lambda *args, **kwargs: None), {}
    try:
        for prompts, micro_batch in itertools.product(PROMPTS, MICRO_BATCHES):
            name, log = f"P{prompts}-mb{micro_batch}", []
            DS.sample_rounds = recording(sample_rounds, log)
            try:
                T.main(run_args(model_dir, train_jsonl, Path(out_dir) / name, prompts, micro_batch))
                records[name] = {"steps": log}
            except M.UsageError as e:
                records[name] = {"refused": str(e)}
        if dist.get_rank() == 0:
            (Path(out_dir) / "grid.json").write_text(json.dumps(records))
    finally:
        DS.sample_rounds, dist.destroy_process_group = sample_rounds, destroy
        torch.set_num_threads(threads)
        dist.destroy_process_group()
    return records


if __name__ == "__main__":
    run_grid(*sys.argv[1:4])
