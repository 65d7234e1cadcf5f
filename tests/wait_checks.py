"""Waits and shares that need two processes, run by tests/test_waits.py:

    torchrun --standalone --nproc_per_node 2 tests/wait_checks.py MODEL_DIR QUESTIONS.jsonl OUT.json

1. train.heldout on 7 questions in batches of 3: rank 0 decodes two batches (questions 0-2 and 6), rank 1
   one (3-5). Every question is scored once; the test compares the metrics with one process's.
2. The process group's timeout is 10 s and rank 1 reaches model.wait_for_all 12 s after rank 0: rank 0
   waits it out, on the host, in a gloo group of its own.
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402

TIMEOUT, LATE = 10, 12  # seconds


def heldout_run(model_dir, device):
    """The Run train.py builds for the model (fp32), held-out batches of 3: all train.heldout reads."""
    cfg = config.Config(micro_batch=3, max_new_tokens=12, dtype="float32")
    return T.build_run(cfg, T.recipe_for(cfg), model_dir, [], device)


def main(model_dir, questions, out):
    rank, world, device = M.init_distributed(timeout=timedelta(seconds=TIMEOUT))
    torch.set_num_threads(1)
    result = T.heldout(heldout_run(model_dir, device), data.read_samples(questions)[:7])
    t0 = time.time()
    if rank == 1:
        time.sleep(LATE)
    M.wait_for_all()
    result["waited"] = time.time() - t0
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
