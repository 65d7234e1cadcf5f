"""train.py with FlexAttention forced on the CPU, where torch has no FlexAttention backward: a kernel that
fails on every process at the first policy pass. tests/engine/test_flex_fallback.py launches it with torchrun:

    torchrun --standalone --nproc_per_node 2 tests/engine/flex_fallback_run.py TRAIN_FLAGS...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import model as M  # noqa: E402
import train  # noqa: E402
from engine import attention  # noqa: E402

if __name__ == "__main__":
    attention.flex_default = lambda device: True
    sys.exit(M.run_main(train.main))
