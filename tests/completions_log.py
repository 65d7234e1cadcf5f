"""train.py with the tokens of every GRPO completion recorded, for tests that compare two runs
(tests/test_distributed.py: 1 process against 2). samples.jsonl holds the first few texts of rank
0's share only; this holds every completion of every rank, every round, every step.

    torchrun --standalone --nproc_per_node 2 tests/completions_log.py LOG [train.py flags ...]

writes LOG.rank{r}.json on each rank: {"step position j": token ids up to and including the first end
token}, position being the prompt's place in the step's global batch (round k's: k * prompts_per_step
+ p) and j its completion. read() merges the ranks' files.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

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


def main(path, argv):
    with recording({}) as log:
        T.main(argv)
    write(log, path, int(os.environ.get("RANK", "0")))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
