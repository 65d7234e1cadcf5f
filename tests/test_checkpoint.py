"""checkpoint.py (without a model, but for one --resume of the tiny one): what counts as a checkpoint,
pruning, crash leftovers, the order of a re-save, fsync, the run-folder rules (a fresh run never mixes
with an old one; --resume continues only the same run), and resuming never runs code a checkpoint
file names."""

import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import checkpoint as C
import config
import model as M
import train as T
from conftest import quick_args


def fake_checkpoint(out, name, marker=""):
    """A folder laid out like a complete checkpoint (trainer_state.pt is what save() writes last)."""
    path = Path(out) / name
    path.mkdir(parents=True)
    (path / "trainer_state.pt").write_text(marker)
    (path / "train_config.json").write_text(json.dumps(asdict(config.Config(out=str(out)))))
    return path


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    """A folder without trainer_state.pt (a crash mid-save), *.tmp or *.old never counts as a checkpoint;
    steps sort by number, not name; pruning keeps the newest keep_last and checkpoint-0."""
    for step in [0, 10, 20, 30, 40, 100]:
        fake_checkpoint(tmp_path, f"checkpoint-{step}")
    (tmp_path / "checkpoint-50").mkdir()
    fake_checkpoint(tmp_path, "checkpoint-60.tmp")
    fake_checkpoint(tmp_path, "checkpoint-70.old")
    assert [p.name for p in C.complete(tmp_path)][-2:] == ["checkpoint-40", "checkpoint-100"]
    C.prune(tmp_path, keep_last=2)
    assert [p.name for p in C.complete(tmp_path)] == ["checkpoint-0", "checkpoint-40", "checkpoint-100"]


def test_tidy_clears_what_a_crash_left(tmp_path):
    """A .tmp folder is deleted. An .old folder whose replacement is complete is deleted; one whose
    replacement never arrived (or is incomplete) goes back in place, so the step keeps its checkpoint."""
    fake_checkpoint(tmp_path, "checkpoint-5.tmp")
    fake_checkpoint(tmp_path, "checkpoint-10.old", marker="old")
    fake_checkpoint(tmp_path, "checkpoint-10", marker="new")
    fake_checkpoint(tmp_path, "checkpoint-20.old", marker="old")   # crash between the two renames
    fake_checkpoint(tmp_path, "checkpoint-30.old", marker="old")
    (tmp_path / "checkpoint-30").mkdir()                            # a replacement without trainer_state.pt
    C.tidy(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert [(tmp_path / f"checkpoint-{s}" / "trainer_state.pt").read_text() for s in (10, 20, 30)] == [
        "new", "old", "old"]


def test_resaving_a_step_keeps_a_complete_copy_at_every_moment(tmp_path, monkeypatch):
    """publish() over an existing step renames the old copy aside before the new one takes its name. A
    crash right after that first rename leaves the old copy as checkpoint-N.old, which tidy() restores."""
    final = fake_checkpoint(tmp_path, "checkpoint-7", marker="old")
    tmp = fake_checkpoint(tmp_path, "checkpoint-7.tmp", marker="new")
    real_rename = Path.rename

    def crash_on_second_rename(self, target):
        if self.name == "checkpoint-7.tmp":
            raise OSError("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(OSError, match="killed"):
        C.publish(tmp, final)
    assert (tmp_path / "checkpoint-7.old" / "trainer_state.pt").read_text() == "old"
    monkeypatch.setattr(Path, "rename", real_rename)
    C.tidy(tmp_path)
    assert [p.name for p in C.complete(tmp_path)] == ["checkpoint-7"]
    assert (final / "trainer_state.pt").read_text() == "old"
    C.publish(fake_checkpoint(tmp_path, "checkpoint-7.tmp", marker="new"), final)  # uninterrupted: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    assert (final / "trainer_state.pt").read_text() == "new"


def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    """publish() fsyncs each of rank 0's files and each folder of the new checkpoint, then the run folder;
    train_state/'s shards are left to the writer on each rank that wrote them (dcp's, with sync_files), so
    rank 0 never syncs the whole checkpoint alone: 2 files + 2 folders (the checkpoint and train_state/)
    = 4 fsyncs before the rename, the parent's after it, and the shard never."""
    tmp = fake_checkpoint(tmp_path, "checkpoint-3.tmp")                   # trainer_state.pt, train_config.json
    (tmp / "train_state").mkdir()
    (tmp / "train_state" / "__0_0.distcp").write_bytes(b"x")
    events, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name),
                                                 real_fsync(fd)))
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, t: (events.append("rename"), real_rename(self, t))[1])
    C.publish(tmp, tmp_path / "checkpoint-3")
    assert sorted(events[:4]) == sorted(["trainer_state.pt", "train_config.json", "train_state", "checkpoint-3.tmp"])
    assert events[4:] == ["rename", tmp_path.name]


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path):
    """Without --resume a used --out stops with its newest step and the two ways on; --overwrite is
    allowed; a folder with logs but no checkpoint yet is a run too; an empty folder is not."""
    defaults = asdict(config.Config())
    assert C.check_run_folder(config.Config(out=str(tmp_path)), defaults) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(M.UsageError, match="no checkpoint yet"):
        C.check_run_folder(config.Config(out=str(tmp_path)), defaults)
    fake_checkpoint(tmp_path, "checkpoint-20")
    with pytest.raises(M.UsageError) as e:
        C.check_run_folder(config.Config(out=str(tmp_path)), defaults)
    assert str(tmp_path) in str(e.value) and "step 20" in str(e.value)
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert C.check_run_folder(config.Config(out=str(tmp_path), overwrite=True), defaults) is None
    C.wipe(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_resume_continues_only_the_same_run(tmp_path):
    """--resume needs a checkpoint; it accepts changes to fields that do not change the run (max_steps,
    save_every, ...) and names every field that would."""
    defaults = asdict(config.Config())
    with pytest.raises(M.UsageError, match=f"--resume: no checkpoint in {tmp_path}"):
        C.check_run_folder(config.Config(out=str(tmp_path), resume=True), defaults)
    path = fake_checkpoint(tmp_path, "checkpoint-4")
    ok = config.Config(out=str(tmp_path), resume=True, max_steps=5000, save_every=7, keep_last=9)
    assert C.check_run_folder(ok, defaults) == path
    with pytest.raises(M.UsageError) as e:
        C.check_run_folder(config.Config(out=str(tmp_path), resume=True, lr=3e-6, seed=1), defaults)
    assert "--lr 3e-06 (the run has 1e-06)" in str(e.value) and "--seed 1 (the run has 42)" in str(e.value)
    with pytest.raises(M.UsageError, match="contradict"):
        C.check_run_folder(config.Config(out=str(tmp_path), resume=True, overwrite=True), defaults)


class RunsCode:
    """Unpickled, it writes `marker`: what a crafted checkpoint file could do to the machine that opens it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_resume_refuses_a_trainer_state_that_would_run_code(tiny2_dir, pitch_task, tmp_path, capsys):
    """--resume from a checkpoint whose trainer_state.pt holds an object that runs code when unpickled:
    one line naming the file and what it holds, exit 2, and the code never ran. The same file under
    plain unpickling (weights_only=False, as resuming read it before) does run it."""
    args = quick_args(tiny2_dir, pitch_task, tmp_path / "run")
    cfg, _ = config.parse_args(args)
    path = fake_checkpoint(tmp_path / "run", "checkpoint-1")
    (path / "train_config.json").write_text(json.dumps(asdict(cfg)))
    marker = tmp_path / "marker"
    torch.save({"step": 1, "counts": {"seen": 4, "bad": 0}, "config": RunsCode(marker)}, path / "trainer_state.pt")
    with pytest.raises(SystemExit) as e:
        M.run_main(T.main, args + ["--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path / 'trainer_state.pt'}: refused to load it: it names exec")
    assert not marker.exists()
    torch.load(path / "trainer_state.pt", weights_only=False)
    assert marker.read_text() == "ran"


@pytest.fixture
def one_process():
    """A process group of one, as train.py runs a single process."""
    M.init_distributed(always=True)
    yield
    dist.destroy_process_group()


def test_train_state_files_that_would_run_code_are_refused(tmp_path, one_process):
    """train_state/ (torch.distributed.checkpoint) holds two pickles that dcp.load would unpickle without
    limits: the metadata file, and each non-tensor entry (the optimizer's lr, betas, ...). A crafted one
    of either is refused by name and its code never runs; a plain one loads as dcp.load loads it."""
    marker = tmp_path / "marker"
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(M.UsageError, match=r"meta/.metadata: refused to load it: it names builtins.exec"):
        C.holds_optimizer(tmp_path / "meta")
    state = lambda lr: {"model": {"w": torch.full((2,), 3.0)},
                        "optim": {"param_groups": [{"lr": lr, "betas": (0.9, 0.99)}]}}
    dcp.save(state(RunsCode(marker)), checkpoint_id=tmp_path / "entry")
    target = {"model": {"w": torch.zeros(2)}, "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]}}
    with pytest.raises(M.UsageError, match=r"\(entry optim.param_groups.0.lr\): refused to load it: it names exec"):
        C.read_train_state(target, tmp_path / "entry")
    assert not marker.exists()
    dcp.save(state(1e-3), checkpoint_id=tmp_path / "plain")
    assert C.holds_optimizer(tmp_path / "plain")
    C.read_train_state(target, tmp_path / "plain")
    assert target["optim"]["param_groups"][0] == {"lr": 1e-3, "betas": (0.9, 0.99)}
    assert torch.equal(target["model"]["w"], torch.full((2,), 3.0))
    dcp.load(target, checkpoint_id=tmp_path / "entry")  # plain dcp.load: the code runs
    assert marker.read_text() == "ran"
