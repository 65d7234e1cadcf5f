"""Every flag, path and file a user types into train.py fails in one clear line, before any model is
built: exit status 2, the message names the flag or path and what would work, no traceback. These run
train.main in-process through model.run_main (what `python train.py` runs), so they take seconds; one
test runs the real command line, one runs it under torchrun with 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import model as M
import train as T
from conftest import ROOT, quick_args


@pytest.fixture(autouse=True)
def no_leftover_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def fails(argv, capsys, monkeypatch=None):
    """Run train.py's main as the command line does; return its one line of error output."""
    if monkeypatch is not None:  # a model must never be built for these
        monkeypatch.setattr(T, "build_run", lambda *a: pytest.fail("a model was built"))
    capsys.readouterr()  # drop what earlier runs in the same test printed
    with pytest.raises(SystemExit) as e:
        M.run_main(T.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("flag, value, reason", [
    ("--temperature", "0", "must be > 0"),
    ("--group-size", "1", "at least 2 per prompt"),
    ("--top-p", "0", "must be in (0, 1]"),
    ("--top-p", "1.5", "must be in (0, 1]"),
    ("--max-new-tokens", "0", "must be >= 1"),
    ("--beta", "-0.1", "must be >= 0"),
    ("--lr", "-1e-6", "must be >= 0"),
    ("--clip-low", "0", "must be in (0, 1)"),
    ("--clip-high", "0", "must be > 0"),
    ("--loss-aggregation", "mean", "must be one of sequence_mean, token_mean, token_sum"),
    ("--algo", "ppo", "must be grpo or sft"),
    ("--lora-alpha", "32", "--lora-rank 0: is 0, so --lora-alpha/--lora-dropout/--lora-targets/--lora-audio would"),
    ("--lora-rank", "-1", "must be >= 0"),
    ("--reward-weights", "2", "must be two numbers >= 0: accuracy,format"),
    ("--curriculum", "-1", "must be >= 0"),
    ("--eval-every", "3", "a multiple of --save-every"),
    ("--think-words", "50", "only the think prompt asks for a reasoning"),
    ("--micro-batch", "3", "must divide each process's 4 prompts"),
    ("--keep-last", "0", "the newest checkpoint is what --resume continues from"),
    ("--warm-start-data", "synthetic-loudness", "would do nothing without --warm-start-steps"),
    ("--prompt", "cot", "must be one of direct, answer, think"),
    ("--dtype", "float16", "must be bfloat16 or float32"),
])
def test_flags_that_make_no_sense_stop_at_start(tiny2_dir, pitch_task, tmp_path, capsys, monkeypatch,
                                                 flag, value, reason):
    """Each nonsensical training flag stops the run in one line that names the flag, its value and why."""
    line = fails(quick_args(tiny2_dir, pitch_task, tmp_path, f"{flag}={value}"), capsys, monkeypatch)
    assert (f"{flag} " in line or flag == "--lora-alpha") and reason in line


def test_several_bad_flags_are_named_together(tiny2_dir, pitch_task, tmp_path, capsys):
    """Two bad flags: both in the same line, so one run shows everything to fix."""
    line = fails(quick_args(tiny2_dir, pitch_task, tmp_path, "--temperature", "0", "--group-size", "1"), capsys)
    assert "--temperature 0.0" in line and "--group-size 1" in line


def test_prompts_must_split_over_the_processes(tiny2_dir, pitch_task, tmp_path, monkeypatch):
    """Under torchrun with 2 processes, 5 prompts per step cannot be shared: caught before init."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(M.UsageError, match="--prompts-per-step 5: the global batch must split evenly over the 2"):
        T.main(quick_args(tiny2_dir, pitch_task, tmp_path, "--prompts-per-step", "5"))


def no_config_folder(tmp_path):
    (tmp_path / "weights").mkdir()
    return tmp_path / "weights"


@pytest.mark.parametrize("case", ["no such model", "no config.json", "no such data", "no such audio dir",
                                  "no such warm-start data"])
def test_wrong_paths_stop_before_any_model_is_built(tiny2_dir, pitch_task, tmp_path, capsys, monkeypatch, case):
    """A typo'd --model, a folder without config.json, a missing --data file or --audio-dir: one line naming
    the path and what would work."""
    model, extra, path = tiny2_dir, [], None
    if case == "no such model":
        model = path = tmp_path / "no" / "such" / "dir"
    elif case == "no config.json":
        model = path = no_config_folder(tmp_path)
    elif case == "no such data":
        path = tmp_path / "no-such.jsonl"
        extra = ["--data", str(path)]
    elif case == "no such warm-start data":
        path = tmp_path / "no-such.jsonl"
        extra = ["--warm-start-data", str(path), "--warm-start-steps", "1"]
    else:
        path = tmp_path / "no-dir"
        extra = ["--audio-dir", str(path)]
    line = fails(quick_args(model, pitch_task, tmp_path / "run", *extra), capsys, monkeypatch)
    assert str(path) in line
    want = {"no such model": "no such folder (give a local Qwen2-Audio folder",
            "no config.json": "no config.json in this folder", "no such data": "no such file (give",
            "no such audio dir": "no such folder", "no such warm-start data": "no such file (give"}[case]
    assert want in line


def test_malformed_data_names_the_line(tiny2_dir, pitch_task, tmp_path, capsys, monkeypatch):
    """A data file that does not parse: the flag, the file and line, and the problem."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_text": "q?", "multi_choice": ["a", "b"], "answer": 5, "audio_path": "x.wav"}\n')
    line = fails(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--data", str(bad)), capsys, monkeypatch)
    assert f"--data: {bad}:1: answer index 5 is out of range for 2 choices" in line


def test_no_audio_in_the_first_batch_stops_the_run(tiny2_dir, pitch_task, tmp_path, capsys, monkeypatch):
    """An --audio-dir that exists but holds none of the clips: instead of training on silence, one line
    with the first path tried."""
    (tmp_path / "empty").mkdir()
    line = fails(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--audio-dir", str(tmp_path / "empty")),
                 capsys, monkeypatch)
    assert "none of the 4 clips of the first batch exists" in line and str(tmp_path / "empty") in line


def test_resume_without_a_checkpoint_stops(tiny2_dir, pitch_task, tmp_path, capsys, monkeypatch):
    """--resume into a folder with no checkpoint (a typo in --out) does not silently start from step 0."""
    line = fails(quick_args(tiny2_dir, pitch_task, tmp_path / "typo", "--resume"), capsys, monkeypatch)
    assert f"--resume: no checkpoint in {tmp_path / 'typo'} (start without --resume, or check --out)" in line


def test_second_fresh_run_into_the_same_folder(tiny2_dir, pitch_task, tmp_path, capsys):
    """A run that is not --resume never mixes with an old one: the second start stops naming the folder and
    its newest step; --overwrite starts over, and afterwards only the new run's checkpoints and logs are
    there (before, the old run's higher step numbers survived pruning and the new ones were deleted)."""
    out = tmp_path / "run"
    T.main(quick_args(tiny2_dir, pitch_task, out, "--max-steps", "2", "--save-every", "1"))
    line = fails(quick_args(tiny2_dir, pitch_task, out, "--max-steps", "1"), capsys)
    assert str(out) in line and "newest checkpoint is step 2" in line
    T.main(quick_args(tiny2_dir, pitch_task, out, "--max-steps", "1", "--overwrite"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_command_line_prints_one_line(tmp_path):
    """`python train.py --model /no/such/dir` as a user types it: exit 2, one line, no traceback."""
    result = subprocess.run([sys.executable, "train.py", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: --model {tmp_path / 'nope'}: no such folder (give a local Qwen2-Audio folder, a checkpoint-N that "
        f"train.py wrote, or `tiny`)"]


def test_under_torchrun_one_message_and_every_rank_exits(tiny2_dir, pitch_task, tmp_path):
    """2 processes, --resume into an empty folder: the check runs after the process group exists, every
    rank reaches the same verdict without a collective, one rank prints, both exit (no hang)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *quick_args(tiny2_dir, pitch_task, tmp_path / "typo", "--resume")]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: --resume: no checkpoint in") == 1, result.stderr[-2000:]
    assert "File \"" + str(Path(ROOT) / "train.py") not in result.stderr  # no traceback from our code
