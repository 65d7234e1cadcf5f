"""No warning reaches a user of the demo. pytest.ini turns every deprecation the project's calls set off
into an error, everywhere in the suite; this file checks that a short run of train.py, through each part
of the demo, sets off no warning of any kind.

Run: python -m pytest -q tests/test_warnings.py
"""

import logging
import warnings

import torch.distributed as dist

import train as T
from conftest import quick_args


def test_a_short_run_warns_nothing(tiny2_dir, pitch_task, tmp_path):
    """The format warm start, 2 GRPO steps (rollouts, reference and policy passes, AdamW and the lr
    schedule), the held-out score before and after, checkpoints and the chart: no warning through the
    warnings module (every one recorded, none filtered) and none through transformers' logger."""
    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            T.main(quick_args(tiny2_dir, pitch_task, tmp_path, "--warm-start-steps", "2", "--eval-data",
                              str(pitch_task[1]), "--eval-samples", "2"))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    assert (tmp_path / "checkpoint-2").is_dir()  # the run went through
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert [record.getMessage() for record in logged] == []
