"""train.py runs with every GRPO completion recorded (every rank's, round's and step's; samples.jsonl: a few of
rank 0's), for tests that compare two runs (tests/test_distributed.py: 1 process against 2).

    torchrun --standalone --nproc_per_node 2 tests/completions_log.py JOBS.json

runs JOBS.json's jobs in turn in the same processes (a launch costs seconds of imports): train.py runs
{"log": LOG, "argv": [flags]}, each writing LOG.rank{r}.stdout and LOG.rank{r}.json, {"step position j": token
ids up to and including the first end token} (position: the prompt's place in the step's global batch, round
k's k * prompts_per_step + p; j: its completion), which read() merges; or dist_checks.py's {"checks": [MODEL_DIR,
OUT.json]}."""

import contextlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train as T  # noqa: E402


@contextlib.contextmanager
def recording(log: dict):
    """Within it, every train.rollout (one micro-batch; looked up by name when the sampling calls it) adds its
    tokens to log."""
    real = T.rollout

    def rollout(run, step, positions, samples):
        b = real(run, step, positions, samples)
        G = run.cfg.group_size
        for i, (ids, n) in enumerate(zip(b.rollout.completion_ids, b.lengths)):
            log[f"{step} {positions[i // G]} {i % G}"] = ids[:n].tolist()
        return b

    T.rollout = rollout
    try:
        yield log
    finally:
        T.rollout = real


def write(log: dict, path, rank: int) -> None:
    Path(f"{path}.rank{rank}.json").write_text(json.dumps(log))


def read(path) -> dict:
    """Every rank's records, merged; a completion recorded twice would be a bug, so it fails."""
    merged = {}
    for part in sorted(Path(path).parent.glob(f"{Path(path).name}.rank*.json")):
        records = json.loads(part.read_text())
        assert not merged.keys() & records.keys(), f"{part}: completions already recorded by another rank"
        merged.update(records)
    return merged


def run(log_path, argv, rank):
    """train.main(argv), its completions recorded to log_path and its stdout beside them."""
    with open(f"{log_path}.rank{rank}.stdout", "w") as out, contextlib.redirect_stdout(out), recording({}) as log:
        T.main(argv)
    write(log, log_path, rank)


def own_group(store, job, rank, world):
    """A process group for one job, under a store prefix of its own. Each job destroys its group at the end
    (train.main does); a second dist.init_process_group on torchrun's store would reuse the first group's
    keys, and hangs when the ranks arrive at different times (measured with torch 2.13). train's
    model.init_distributed finds this group made and uses it (gloo's default timeout, 30 minutes, is train.py's)."""
    dist.init_process_group("gloo", store=dist.PrefixStore(f"job{job}", store), rank=rank, world_size=world)


def main(jobs_path):
    store, rank, world = next(dist.rendezvous("env://"))  # torchrun's store, as init_process_group finds it
    for i, job in enumerate(json.loads(Path(jobs_path).read_text())):
        own_group(store, i, rank, world)
        if rank == 0:  # in torchrun's stderr, before a failing job's traceback
            print(f"job {i}: {json.dumps(job)}", file=sys.stderr, flush=True)
        if "checks" in job:
            # imported for its job only: it imports conftest, which sets torch's threads to 2; the training
            # runs keep torchrun's 1 (dist_checks.main sets 1 again)
            import dist_checks
            dist_checks.main(*job["checks"])
        else:
            run(job["log"], job["argv"], rank)


if __name__ == "__main__":
    main(sys.argv[1])
