"""Where ranks wait for each other, and for how long: the process group's timeout, what rank 0 does alone
around a checkpoint's collectives, one read of the weights for the policy and the reference, the disk
check before anything is written, the curriculum's wait on the host, and the held-out shares.

Run: python -m pytest -q tests/test_waits.py
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import checkpoint as C
import config
import data
import model as M
import train as T
from conftest import quick_args
from test_checkpoint import fake_checkpoint
from wait_checks import heldout_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def group():
    """A one-process group, as train.py makes without torchrun; destroyed after the test."""
    _, _, device = M.init_distributed(always=True)
    yield device
    if dist.is_initialized():
        dist.destroy_process_group()


class Stop(Exception):
    pass


def test_the_timeout_reaches_the_process_group(monkeypatch):
    """init_distributed hands its timeout to init_process_group; train.py gives it --dist-timeout-minutes
    (default 30: longer than rank 0's slowest work alone, its write of the 7B's bf16 weights)."""
    seen, real_init = [], dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: (seen.append(k["timeout"]), real_init(*a, **k))[1])
    M.init_distributed(always=True, timeout=timedelta(minutes=7))
    dist.destroy_process_group()
    assert seen == [timedelta(minutes=7)]
    with pytest.raises(M.UsageError, match="--dist-timeout-minutes 0.0: must be > 0"):
        config.validate(config.Config(dist_timeout_minutes=0.0), 1)

    def stop(always=False, timeout=None):
        seen.append(timeout)
        raise Stop
    monkeypatch.setattr(T.M, "init_distributed", stop)
    for argv, minutes in ((["--dist-timeout-minutes", "45"], 45), ([], 30)):
        with pytest.raises(Stop):
            T.main(["--model", "tiny", "--out", "unused", *argv])
        assert seen[-1] == timedelta(minutes=minutes)


def test_save_prunes_after_the_barrier_and_each_file_is_synced_once(tiny2_dir, pitch_task, tmp_path, monkeypatch,
                                                                    group):
    """checkpoint.save: rank 0 writes the Hugging Face weights before dcp.save (the others wait in its first
    collective), fsyncs its own files and renames before the barrier, and prunes after it (the others wait
    for that in the next collective, not on top of the rest). Every file of the checkpoint is fsynced
    exactly once, by the writer that made it: train_state/'s shards and metadata by dcp's writer, the rest
    by rank 0 (before, rank 0 synced the whole tree again: ~118 GB at 7B)."""
    cfg, _ = config.parse_args(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--keep-last", "1"))
    run = T.build_run(cfg, T.recipe_for(cfg), tiny2_dir, [], group)
    for step in (1, 2):
        fake_checkpoint(tmp_path / "run", f"checkpoint-{step}")
    events, synced = [], []
    record = lambda name, fn: lambda *a, **k: (events.append(name), fn(*a, **k))[1]
    monkeypatch.setattr(run.policy, "save_pretrained", record("hf weights", run.policy.save_pretrained))
    monkeypatch.setattr(dcp, "save", record("dcp.save", dcp.save))
    monkeypatch.setattr(C, "publish", record("publish", C.publish))
    monkeypatch.setattr(dist, "barrier", record("barrier", dist.barrier))
    monkeypatch.setattr(C, "prune", record("prune", C.prune))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    C.save(run, 3)
    assert events == ["hf weights", "dcp.save", "publish", "barrier", "prune"]
    final = tmp_path / "run" / "checkpoint-3"
    assert [p.name for p in C.complete(tmp_path / "run")] == ["checkpoint-3"]  # 1 and 2 pruned
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert any(f.startswith("train_state/") and f.endswith(".distcp") for f in files) and "model.safetensors" in files
    tmp = str(final) + ".tmp/"
    # paths as they were when synced, under checkpoint-3.tmp; dcp syncs its metadata as .metadata.tmp, then renames it
    synced = [s[len(tmp):].replace(".metadata.tmp", ".metadata") for s in synced if s.startswith(tmp)]
    assert sorted(s for s in synced if s in files) == files


def test_the_reference_is_copied_from_the_policy_not_read_again(tiny2_dir, pitch_task, tmp_path, monkeypatch, group):
    """train.setup reads the checkpoint once: the reference is a bf16 copy of the policy's own shards, equal
    bit for bit to what reading the checkpoint again into bf16 gave (and with the rotary frequencies, which no
    state dict holds, rebuilt)."""
    reads, real_read = [], M.read_pretrained
    monkeypatch.setattr(M, "read_pretrained", lambda *a, **k: (reads.append(a[1]), real_read(*a, **k))[1])
    cfg, _ = config.parse_args(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--dtype", "bfloat16"))
    run, _, _ = T.setup(cfg, T.recipe_for(cfg), group)
    assert len(reads) == 1 and run.reference is not None
    read_again = M.sharded_load(tiny2_dir, storage_dtype=torch.bfloat16)
    copied, expected = M.full_state_dict(run.reference), M.full_state_dict(read_again)
    assert copied.keys() == expected.keys()
    assert all(copied[k].dtype == torch.bfloat16 and torch.equal(copied[k], expected[k]) for k in expected)
    rotary = lambda m: [b for n, b in m.named_buffers() if n.endswith("inv_freq")]
    assert all(torch.equal(a, b) for a, b in zip(rotary(run.reference), rotary(read_again)))


def test_the_disk_check_stops_a_run_that_cannot_fit(tiny2_dir, pitch_task, tmp_path, monkeypatch, group):
    """Before anything is written: the checkpoints a run keeps at once (here 10 steps, a save every 2, keep 2:
    3 at once, the newest 2 and the one being written) against the free space of --out (shutil.disk_usage
    stood in). One byte short stops it with one line naming the figures and what to change; exactly enough
    passes. The tiny model (2 s window, width 64, 2 + 2 layers, a vocabulary of 451) has 246,528 parameters:
    audio encoder 110,336 (convolutions 24,640 + 12,352, the frozen position table 100 x 64 = 6,400,
    2 layers of 33,408, a layer norm 128), projector 4,160, 2 decoder layers of 37,120, a final norm 64,
    embeddings and lm_head 451 x 64 each. A checkpoint in fp32 holds fp32 weights (4 bytes a parameter),
    AdamW's two fp32 moments of what trains (8 a parameter, none for the frozen table) and the Hugging Face
    weights in the compute dtype (4): 16 x 246,528 - 8 x 6,400 = 3,893,248 bytes; 3 of them 11,679,744.
    A warm start's checkpoint-0 (no moments yet) adds 8 x 246,528 = 1,972,224."""
    cfg, _ = config.parse_args(quick_args(tiny2_dir, pitch_task, tmp_path, "--max-steps", "10", "--save-every", "2",
                                     "--keep-last", "2"))
    run = T.build_run(cfg, T.recipe_for(cfg), tiny2_dir, [], group)
    assert sum(p.numel() for p in run.policy.parameters()) == 246_528
    assert sum(p.numel() for p in run.policy.parameters() if not p.requires_grad) == 6_400
    need = 11_679_744
    free = SimpleNamespace(free=need - 1)
    monkeypatch.setattr(C.shutil, "disk_usage", lambda path: free)
    with pytest.raises(M.UsageError) as e:
        C.check_disk(run, None)
    message = str(e.value)
    assert "\n" not in message and f"--out {tmp_path}" in message and "--keep-last" in message
    assert f"{need / 1e9:.1f} GB" in message and "(3 at once)" in message
    free.free = need
    assert C.check_disk(run, None) == need
    run.cfg = replace(cfg, warm_start_steps=1)
    free.free = need + 1_972_224
    assert C.check_disk(run, None) == free.free
    free.free -= 1
    with pytest.raises(M.UsageError, match=r"\(3 at once and checkpoint-0\)"):
        C.check_disk(run, None)


def test_heldout_scores_every_question_once_on_two_processes(tiny2_dir, pitch_task, tmp_path, group):
    """7 held-out questions on 2 processes in batches of 3 (rank 0 decodes 2 batches, rank 1 one): all 7
    are scored, once each, with one process's metrics (before: 6, while the log said 7), the answer's NLL
    too (before: over the 6 questions of equal shares). And a rank that
    reaches model.wait_for_all 12 s after the other, with a 10 s process-group timeout, is waited for:
    the curriculum's wait after its pre-pass is on the host, outside the group's timeout."""
    out = tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "tests" / "wait_checks.py"), str(tiny2_dir), str(pitch_task[1]), str(out)],
                   cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, timeout=300)
    two = json.loads(out.read_text())
    assert two["waited"] >= 12
    one = T.heldout(heldout_run(tiny2_dir, group), data.read_samples(pitch_task[1])[:7])
    assert two["eval_questions"] == one["eval_questions"] == 7
    nll = one.pop("eval_answer_nll")  # the same batches' sums, added in another order
    assert two.pop("eval_answer_nll") == pytest.approx(nll, rel=1e-6)
    assert {k: two[k] for k in one} == one
