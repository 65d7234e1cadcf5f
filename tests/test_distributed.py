"""Two processes on CPU (gloo), launched the way users launch them: torchrun. FSDP2 collectives, world-
size-independent training, and exact kill-and-resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import checkpoint
import completions_log
import train as T
from conftest import quick_args
from recipes import lora

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weight_diffs(a, b):
    """|a - b| of every weight of two checkpoints (a LoRA run's last one: its merged model), flattened."""
    folder = lambda c: Path(c) / lora.MERGED if (Path(c) / lora.MERGED).is_dir() else Path(c)
    wa, wb = (load_file(folder(c) / "model.safetensors") for c in (a, b))
    assert wa.keys() == wb.keys()
    return torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])


def max_weight_diff(a, b):
    return weight_diffs(a, b).max().item()


def run_args(warm_dir, pitch_task, out):
    # 6 steps, a checkpoint every 2; lr 1e-2 so that weights move far and any divergence would show
    return quick_args(warm_dir, pitch_task, out, "--max-steps", "6", "--save-every", "2", "--lr", "1e-2")


def kill_after(cmd, out, steps):
    """Start cmd, SIGKILL its whole process group once `steps` metric records exist, return whether it
    was still running (it must be, or the kill proved nothing)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = Path(out) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def completions_path(out) -> Path:
    """Where a run's completion tokens are recorded (tests/completions_log.py): beside its folder."""
    return Path(out).with_name(Path(out).name + ".completions")


def out_of(args) -> Path:
    return Path(args[len(args) - args[::-1].index("--out")])  # the value of the last --out given


def one_process(args):
    """train.main in this process with 1 thread, like each of the 2 ranks, every completion recorded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with completions_log.recording({}) as log:
            T.main(args)
        completions_log.write(log, completions_path(out_of(args)), rank=0)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def two_processes(*runs, checks=None):
    """train.py runs (their flags) under torchrun on 2 processes, one after another in one launch
    (tests/completions_log.py), every completion recorded (each rank its own) and each rank's stdout kept;
    checks: (MODEL_DIR, OUT.json) for tests/dist_checks.py, run last in the same launch."""
    jobs = [{"log": str(completions_path(out_of(args))), "argv": list(args)} for args in runs]
    jobs += [{"checks": [str(c) for c in checks]}] if checks else []
    path = Path(f"{completions_path(out_of(runs[0]))}.jobs.json")
    path.write_text(json.dumps(jobs))
    script = ROOT / "tests" / "completions_log.py"
    done = subprocess.run(torchrun(str(script), str(path)), cwd=ROOT, env=ENV, timeout=300 * len(jobs),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def stdout_of(out) -> str:
    """What a run of two_processes printed, on every rank."""
    log = completions_path(out)
    return "".join(p.read_text() for p in sorted(log.parent.glob(f"{log.name}.rank*.stdout")))


# Metrics that are float sums over tokens or parameters whose order (or weights that differ by float
# rounding after a step) is not the same on 1 and 2 processes, with the relative tolerance each is held
# to: about 10x the largest difference measured over every run that uses assert_same_run (the tests
# here and test_omni's): KL 5.2e-5 (the run from nothing, whose step-1 weights differ in 4 of 246,528
# elements by up to 2.1e-4: AdamW's eps cancellations, below), grad norm 1.1e-6 (the 6-step run); SFT's
# loss and p(answer) measured equal, held to the grad norm's. Everything else is compared exactly:
# rewards, accuracy, format, lengths and the zero-std fraction are sums of small integers (exact in
# fp32 in any order), counts and the lr are exact, and the clip fractions are 0 unless
# --num-iterations > 1 (measured equal there).
FLOAT_SUMS = {"kl": 5e-4, "grad_norm": 1e-5, "loss": 1e-5, "answer_prob": 1e-5}


def assert_same_run(one, two, steps, weights_tolerance=1e-5):
    """The same completions (every one's tokens, recorded by completions_log, and the logged samples) and
    the same metrics per step: exactly, but for the float sums in FLOAT_SUMS, each within its tolerance;
    and the final weights within weights_tolerance (None: checked by the caller)."""
    a_all, b_all = metrics(one), metrics(two)
    assert len(a_all) == len(b_all) == steps
    tokens = completions_log.read(completions_path(one))
    assert tokens == completions_log.read(completions_path(two))
    for a, b in zip(a_all, b_all):
        assert a.keys() == b.keys(), a["step"]
        for key in a.keys() - {"seconds"}:
            if key in FLOAT_SUMS:
                assert a[key] == pytest.approx(b[key], rel=FLOAT_SUMS[key], abs=1e-12), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)
        if "loss" not in a:  # GRPO: every completion of every prompt sampled in the step is there
            assert tokens, f"{completions_path(one)}: no completions recorded"
            group = 1 + max(int(k.split()[2]) for k in tokens)
            expected = {f"{a['step'] - 1} {p} {j}" for p in range(a["prompts_sampled"]) for j in range(group)}
            assert {k for k in tokens if int(k.split()[0]) == a["step"] - 1} == expected, a["step"]
    assert (Path(one) / "samples.jsonl").read_text() == (Path(two) / "samples.jsonl").read_text()
    if weights_tolerance is not None:
        assert max_weight_diff(Path(one) / f"checkpoint-{steps}", Path(two) / f"checkpoint-{steps}") < weights_tolerance


@pytest.fixture(scope="module")
def one_process_run(warm_dir, pitch_task, tmp_path_factory):
    """The uninterrupted 1-process reference."""
    out = tmp_path_factory.mktemp("one")
    one_process(run_args(warm_dir, pitch_task, out))
    return out


def from_nothing_args(tiny2_dir, pitch_task, out):
    return quick_args(tiny2_dir, pitch_task, out, "--warm-start-steps", "40", "--max-steps", "2",
                      "--gradient-checkpointing")


LOSS_VARIANTS = [["--loss-aggregation", "token_mean"], ["--num-iterations", "2"], ["--gradient-checkpointing"]]


def variant_args(warm_dir, pitch_task, out, variant):
    return quick_args(warm_dir, pitch_task, out, "--lr", "1e-2", *variant)


MODES = {"sft": ["--algo", "sft"], "lora-grpo": ["--lora-rank", "4"],
         "dynamic-sampling": ["--dynamic-sampling", "2", "--advantage-scale", "batch"],
         "curriculum": ["--curriculum", "2"]}


def mode_args(warm_dir, pitch_task, out, mode):
    return quick_args(warm_dir, pitch_task, out, "--max-steps", "4", "--save-every", "2", *MODES[mode])


def one_missing_clip_args(warm_dir, pitch_task, out):
    """A run on the pitch task with its first clip's path made one that does not exist (gone.wav), written
    beside the task; 2 steps x 16 prompts = all 32 records once, so the missing clip is met exactly once."""
    train_jsonl, _ = pitch_task
    lines = train_jsonl.read_text().splitlines()
    record = json.loads(lines[0])
    record["audio_path"] = str(train_jsonl.parent / "gone.wav")
    data = train_jsonl.parent / "one_missing_2proc.jsonl"  # beside the original: its audio paths are relative
    data.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    return quick_args(warm_dir, pitch_task, out, "--data", str(data), "--prompts-per-step", "16",
                      "--micro-batch", "8", "--max-new-tokens", "3")


@pytest.fixture(scope="module")
def two_process_runs(tiny_dir, tiny2_dir, warm_dir, pitch_task, tmp_path_factory):
    """Every 2-process run of this module that must succeed, in one torchrun launch (a launch costs seconds
    of imports), then dist_checks.py's: {run name: its folder, "checks": dist_checks.py's OUT.json}."""
    base = tmp_path_factory.mktemp("two")
    runs = {"6 steps": run_args(warm_dir, pitch_task, base / "six-steps"),
            "from nothing": from_nothing_args(tiny2_dir, pitch_task, base / "from-nothing"),
            **{f"variant {v[-1]}": variant_args(warm_dir, pitch_task, base / f"variant-{i}", v)
               for i, v in enumerate(LOSS_VARIANTS)},
            **{f"mode {m}": mode_args(warm_dir, pitch_task, base / f"mode-{m}", m) for m in MODES},
            "one missing clip": one_missing_clip_args(warm_dir, pitch_task, base / "one-missing-clip")}
    two_processes(*runs.values(), checks=(tiny_dir, base / "checks.json"))
    return {name: out_of(args) for name, args in runs.items()} | {"checks": base / "checks.json"}


@pytest.fixture(scope="module")
def two_process_run(two_process_runs):
    """The same run, uninterrupted, on 2 processes."""
    return two_process_runs["6 steps"]


def test_fsdp_rollout_gathers_once_per_unit_and_master_weights_are_fp32(two_process_runs):
    """Rollouts of 8 and 40 tokens on the two ranks: each all-gathers exactly once per FSDP unit (6 for
    2 + 2 layers, lm_head and the trunk) and neither deadlocks. An lr 1e-6 step moves most fp32 master
    weights; seen in bf16, fewer than 10% would have moved. A NaN on one rank stops the next step on both:
    the training step's clip_and_step sees a non-finite global norm everywhere, and no weight changes."""
    ranks = json.loads(two_process_runs["checks"].read_text())
    assert [r["tokens"] for r in ranks] == [8, 40]
    for r in ranks:
        assert r["units"] == 6 and r["all_gathers"] == r["units"]
    moved, moved_bf16, numel = ranks[0]["moved"], ranks[0]["moved_bf16"], ranks[0]["numel"]
    assert moved > 0.8 * numel and moved_bf16 < 0.1 * numel
    # a NaN on rank 1 alone: both ranks see a non-finite global norm, so both skip the step
    assert [r["norm_after_nan"] for r in ranks] == ["nan", "nan"]
    assert [r["stepped_after_nan"] for r in ranks] == [False, False]
    assert [r["unchanged_after_nan"] for r in ranks] == [True, True]


def test_two_processes_match_one(one_process_run, two_process_run):
    """Same config on 1 and 2 processes: the same completions (rewards, lengths, logged samples), the same
    KL and grad norm per step, and after 6 optimizer steps the same weights to 1e-5."""
    assert_same_run(one_process_run, two_process_run, steps=6)


def test_the_whole_run_from_nothing_is_independent_of_the_world_size(two_process_runs, tiny2_dir, pitch_task,
                                                                      tmp_path):
    """From a random model: the warm start (its questions and random answers are drawn for the global batch,
    then shared out), checkpoint-0, then GRPO with gradient checkpointing on (the 7B default). 1 and 2
    processes give the same checkpoint-0 (within 1e-5; measured 1.9e-6), the same completions and metrics.
    The final weights agree to 1e-5 but for a few single elements whose gradient is a cancellation near
    AdamW's eps (1e-8), where the order of the float sums (2 processes add 2 micro-batches each, then
    reduce) decides the update: 9 of 246,528 after 2 steps, at most 4e-4. Changing only --micro-batch on
    one process does the same (19 elements, 7.5e-5). The bug this catches differed by 0.19 everywhere."""
    one, two = tmp_path / "one", two_process_runs["from nothing"]
    one_process(from_nothing_args(tiny2_dir, pitch_task, one))
    assert max_weight_diff(one / "checkpoint-0", two / "checkpoint-0") < 1e-5
    assert_same_run(one, two, steps=2, weights_tolerance=None)
    assert min(r["grad_norm"] for r in metrics(one)) > 0  # GRPO had something to learn
    diffs = weight_diffs(one / "checkpoint-2", two / "checkpoint-2")
    assert (diffs > 1e-5).sum() <= 25 and diffs.max() < 1e-3  # <= 1e-4 of the weights; < one step of lr 1e-3


@pytest.mark.parametrize("variant", LOSS_VARIANTS, ids=lambda v: v[-1])
def test_loss_variants_on_two_processes_match_one(variant, two_process_runs, warm_dir, pitch_task, tmp_path):
    """The token mean (a global token count), two optimizer steps per rollout (old log-probs, the clip) and
    gradient checkpointing (layers recomputed in backward) normalise and step the same on 2 processes as
    on 1: the same completions and metrics, weights within 1e-5 after 2 steps at lr 1e-2 (measured once:
    0, 1.7e-6 and 1.2e-7)."""
    one_process(variant_args(warm_dir, pitch_task, tmp_path / "one", variant))
    assert_same_run(tmp_path / "one", two_process_runs[f"variant {variant[-1]}"], steps=2)


def resume_a_copy(done, out, step, args):
    """What a run stopped after checkpoint-{step} leaves: a copy of the finished run without the later
    checkpoints; --resume continues it in this process."""
    shutil.copytree(done, out)
    for path in checkpoint.complete(out):
        if checkpoint.step_of(path) > step:
            shutil.rmtree(path)
    one_process(args + ["--resume"])


@pytest.mark.parametrize("mode", MODES)
def test_modes_on_two_processes_and_resumed(mode, two_process_runs, warm_dir, pitch_task, tmp_path):
    """SFT, GRPO with LoRA, dynamic sampling (with batch-std advantages), and SARI's curriculum (its
    pre-pass data parallel): 2 processes equal 1 (the same pass rates, metrics and completions, weights
    within 1e-5), and a run resumed from its checkpoint-2 ends bit for bit as the uninterrupted run."""
    args = lambda out: mode_args(warm_dir, pitch_task, out, mode)
    two = two_process_runs[f"mode {mode}"]
    one_process(args(tmp_path / "one"))
    assert_same_run(tmp_path / "one", two, steps=4)
    resume_a_copy(tmp_path / "one", tmp_path / "resumed", 2, args(tmp_path / "resumed"))
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert strip(metrics(tmp_path / "resumed")) == strip(metrics(tmp_path / "one"))
    assert max_weight_diff(tmp_path / "one" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4") == 0.0
    if mode == "dynamic-sampling":  # the extra rounds did happen
        assert max(r["prompts_sampled"] for r in metrics(tmp_path / "one")) > 4
    if mode == "curriculum":
        rates = [json.loads((r / "pass_rates.json").read_text()) for r in (tmp_path / "one", two)]
        assert rates[0] == rates[1] and len(set(rates[0]["pass_rates"])) > 1


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_is_exact(nproc, one_process_run, two_process_run, warm_dir, pitch_task, tmp_path):
    """SIGKILL after step 3 (checkpoint-2 is the newest complete one), then --resume: the final weights and
    every step's metrics equal those of the uninterrupted run on as many processes, bit for bit, and the
    1-process run's within 1e-5. 1 process: `python train.py`, resumed in this process (where the
    uninterrupted run ran); 2: torchrun, resumed by torchrun."""
    out = tmp_path / "killed"
    args = run_args(warm_dir, pitch_task, out)
    launch = torchrun(str(ROOT / "train.py"), *args) if nproc == 2 else [sys.executable, str(ROOT / "train.py"), *args]
    assert kill_after(launch, out, steps=3), "the run ended before it could be killed"
    assert not (out / "checkpoint-6").exists()
    if nproc == 2:
        subprocess.run(launch + ["--resume"], cwd=ROOT, env=ENV, check=True, timeout=300)
    else:
        one_process(args + ["--resume"])
    resumed = metrics(out)
    same = metrics(one_process_run if nproc == 1 else two_process_run)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(same, resumed):  # same process and thread count: the same float operations in the same order
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    uninterrupted = one_process_run if nproc == 1 else two_process_run
    assert max_weight_diff(uninterrupted / "checkpoint-6", out / "checkpoint-6") == 0.0
    assert max_weight_diff(one_process_run / "checkpoint-6", out / "checkpoint-6") < 1e-5
    assert sorted(p.name for p in checkpoint.complete(out)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_unreadable_audio_on_two_processes(two_process_runs, warm_dir, pitch_task, tmp_path):
    """One missing clip on one rank: it is counted once for the whole run and both ranks finish every step;
    with a stricter --max-bad-fraction both ranks stop at the same step with the same message."""
    out = two_process_runs["one missing clip"]  # the launch ended with status 0
    assert "gone.wav" in stdout_of(out)
    assert [r["bad_samples"] for r in metrics(out)][-1] == 1
    assert [p.name for p in checkpoint.complete(out)] == ["checkpoint-2"]
    # with a lower tolerance both ranks stop together, with the message, instead of one hanging
    args = one_missing_clip_args(warm_dir, pitch_task, tmp_path / "strict")
    strict = subprocess.run(torchrun(str(ROOT / "train.py"), *args, "--max-bad-fraction", "0.001"),
                            cwd=ROOT, env=ENV, timeout=120, capture_output=True, text=True)
    assert strict.returncode != 0 and strict.stderr.count("stopping: 1 of 16 samples had unreadable audio") == 2
