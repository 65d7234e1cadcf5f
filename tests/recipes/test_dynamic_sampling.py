"""Dynamic sampling on every batch split that validation accepts (tests/recipes/dynsample_grid.py): --prompts-per-step
{1, 4, 32} x --micro-batch {1, 2, 32}, on 1 process and on 2, a micro-batch larger than a process's share
included. The groups kept are checked against a slow reference, 2 processes against 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dynsample_grid as D

ROOT = Path(__file__).resolve().parents[2]


def logs(out, name):
    return [json.loads(line) for line in (Path(out) / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def grids(warm_dir, pitch_task, tmp_path_factory):
    """{processes: (records by combination, out folder)}: the grid in this process, then under torchrun on 2."""
    one, two = tmp_path_factory.mktemp("grid1"), tmp_path_factory.mktemp("grid2")
    D.run_grid(warm_dir, pitch_task[0], one)
    grid = ROOT / "tests" / "recipes" / "dynsample_grid.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(grid), str(warm_dir), str(pitch_task[0]), str(two)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return {n: (json.loads((out / "grid.json").read_text()), out) for n, out in ((1, one), (2, two))}


def first_informative(rewards, prompts):
    """The slow reference: walk the sampled groups in order (round by round, by global position) and keep
    a group whose rewards are not all equal while fewer than `prompts` are kept."""
    kept = []
    for r in rewards:
        kept.append(len(set(r)) > 1 and sum(kept) < prompts)
    return kept


def test_every_accepted_split_keeps_the_first_informative_groups(grids):
    """On 1 process all 9 combinations run, on 2 the 6 with 4 or 32 prompts. Every step keeps exactly the
    groups the slow reference keeps (so min(P, informative) of them), logs prompts_sampled = rounds x P and
    groups_dropped = the rest, splits each round into ceil(share / micro-batch) micro-batches, and logs the
    reward and frac_zero_std of round 0's P groups alone (the per-round slice, micro-batch > share too).
    Every run draws an extra round at some step (the path that crashed), and the grid holds a step that
    keeps an extra round's group, one that keeps nothing, and one that is full after dropping some."""
    seen = set()
    for processes, (records, out) in grids.items():
        ran = [name for name, r in records.items() if "steps" in r]
        assert len(ran) == {1: 9, 2: 6}[processes]
        for name in ran:
            P, micro_batch = (int(x) for x in name[1:].split("-mb"))
            share, steps = P // processes, records[name]["steps"]
            for s, m in zip(steps, logs(out / name, "metrics.jsonl"), strict=True):
                rounds = len(s["rewards"]) // P
                assert s["kept"] == first_informative(s["rewards"], P), (processes, name)
                assert sum(s["kept"]) == min(P, sum(len(set(r)) > 1 for r in s["rewards"]))
                assert (m["prompts_sampled"], m["groups_dropped"]) == (s["sampled"], s["dropped"])
                assert s["sampled"] == rounds * P and s["dropped"] == s["sampled"] - sum(s["kept"])
                assert s["micro_batches"] == rounds * -(-share // micro_batch)
                round0 = s["rewards"][:P]
                assert m["reward"] == sum(map(sum, round0)) / (P * D.GROUP_SIZE)
                assert m["frac_zero_std"] == sum(len(set(r)) == 1 for r in round0) / P
                if any(s["kept"][P:]):
                    seen.add("an extra round's group kept")
                if not any(s["kept"]):
                    seen.add("nothing kept")
                if sum(s["kept"]) == P and s["dropped"]:
                    seen.add("full after drops")
            assert max(s["sampled"] for s in steps) > P, (processes, name)
    assert seen == {"an extra round's group kept", "nothing kept", "full after drops"}


def test_two_processes_equal_one_on_every_split(grids):
    """Each combination that runs on both: the same groups sampled and kept, the same logged metrics (the
    rollout's exactly, the grad norm to 1e-4) and samples. And however a batch of P prompts is split (micro-
    batch 1, 2 or 32, 1 or 2 processes), step 1 samples and keeps the same groups."""
    (one, out1), (two, out2) = grids[1], grids[2]
    exact = ["reward", "accuracy", "format", "completion_len", "frac_zero_std", "prompts_sampled", "groups_dropped",
             "kl", "skipped"]
    for name in [n for n in two if "steps" in two[n]]:
        for a, b in zip(one[name]["steps"], two[name]["steps"], strict=True):
            assert (a["rewards"], a["kept"]) == (b["rewards"], b["kept"]), name
        for a, b in zip(logs(out1 / name, "metrics.jsonl"), logs(out2 / name, "metrics.jsonl"), strict=True):
            assert {k: a[k] for k in exact} == {k: b[k] for k in exact}, name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), name
        assert (out1 / name / "samples.jsonl").read_text() == (out2 / name / "samples.jsonl").read_text()
    for P in D.PROMPTS:
        firsts = [(r[f"P{P}-mb{m}"]["steps"][0]["rewards"], r[f"P{P}-mb{m}"]["steps"][0]["kept"])
                  for r in (one, two) for m in D.MICRO_BATCHES if "steps" in r[f"P{P}-mb{m}"]]
        assert len(firsts) == (6 if P > 1 else 3) and all(f == firsts[0] for f in firsts)


def test_one_prompt_a_step_cannot_split_over_two_processes(grids):
    """--prompts-per-step 1 runs on 1 process; on 2, validation refuses it, whatever the micro-batch, with a
    message that names the flag and the reason."""
    for micro_batch in D.MICRO_BATCHES:
        name = f"P1-mb{micro_batch}"
        assert "steps" in grids[1][0][name]
        assert grids[2][0][name]["refused"] == ("--prompts-per-step 1: the global batch must split evenly over "
                                                "the 2 process(es)")
