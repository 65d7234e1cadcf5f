"""When FlexAttention's kernel fails (engine/packed.flex_or_dense, train.Recipe.guard): the run prints one line naming the reason and
--dense-attention, redoes the step with the dense mask and keeps it for the rest of the run, and ends
with the weights of a run that used the dense mask from the start (exactly, on one process).

The failing kernels: FlexAttention forced on the CPU, whose backward torch 2.13 does not implement
(it raises NotImplementedError as soon as a forward needs grad), and a stand-in kernel that fails where
the CPU's never does: in the reference's forward, or in the second micro-batch's backward, after the
first micro-batch's gradients were added. Runs of 2 steps, 4 prompts in 2 micro-batches, fp32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import train as T
from conftest import quick_args
from engine import attention, packed
from test_attention import sdpa_on_mask_mod

ROOT = Path(__file__).resolve().parents[2]
LINE = "FlexAttention failed ("


@pytest.fixture(autouse=True)
def no_leftover_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def run(warm_dir, pitch_task, out, *flags):
    T.main(quick_args(warm_dir, pitch_task, out, "--max-steps", "2", *flags))
    if dist.is_initialized():
        dist.destroy_process_group()
    return load_file(out / "checkpoint-2" / "model.safetensors")


@pytest.fixture(scope="module")
def dense(warm_dir, pitch_task, tmp_path_factory):
    """dense(*flags): the final weights of the run with these flags and --dense-attention from the start."""
    runs = {}

    def weights(*flags):
        if flags not in runs:
            runs[flags] = run(warm_dir, pitch_task, tmp_path_factory.mktemp("dense"), *flags, "--dense-attention")
        return runs[flags]
    return weights


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


def spy_flex(monkeypatch):
    """The flex argument of every packed forward, in order (None = FlexAttention where it runs)."""
    seen, real = [], packed.completion_logprobs
    monkeypatch.setattr(packed, "completion_logprobs", lambda *a, **k: seen.append(k["flex"]) or real(*a, **k))
    return seen


def fallback_lines(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(LINE)]


@pytest.mark.parametrize("algo", ["grpo", "sft"])
def test_cpu_flex_backward_falls_back(algo, warm_dir, pitch_task, dense, tmp_path, monkeypatch, capsys):
    """FlexAttention forced on the CPU (the real kernel): the first policy forward, GRPO's or SFT's,
    raises NotImplementedError. One line says so and names --dense-attention; that forward and every
    later one take the dense mask (2 steps x 2 micro-batches, + the failed one); the weights after 2
    steps equal the dense run's exactly. --beta 0: no reference pass, which the CPU's kernel would run
    (forward only) and round differently from the dense mask."""
    monkeypatch.setattr(attention, "flex_default", lambda device: True)
    seen = spy_flex(monkeypatch)
    flags = ("--algo", algo, "--beta", "0")
    weights = run(warm_dir, pitch_task, tmp_path, *flags)
    lines = fallback_lines(capsys)
    assert len(lines) == 1 and "NotImplementedError" in lines[0] and "--dense-attention" in lines[0]
    assert seen == [None] + [False] * 4
    assert_same_weights(weights, dense(*flags))


def failing_kernel(calls, fail_in_forward, grad_calls_before_failing=0):
    """A stand-in flex kernel (sdpa on the BlockMask's rule, test_attention.sdpa_on_mask_mod) that fails
    with a RuntimeError: in its first forward, or in the backward of every call with grad after the first
    `grad_calls_before_failing` ones (a kernel whose backward fails on a later micro-batch's shape)."""
    kernel = sdpa_on_mask_mod(calls)

    def fail(*_):
        raise RuntimeError("stand-in kernel failed\nsecond line, not printed")

    def failing(query, key, value, block_mask, scale):
        if fail_in_forward:
            fail()
        out = kernel(query, key, value, block_mask, scale)
        if out.requires_grad and len(calls) > grad_calls_before_failing:  # calls: this one included
            out.register_hook(fail)
        return out
    return failing


@pytest.mark.parametrize("where", ["reference forward", "second micro-batch's backward"])
def test_a_failing_kernel_redoes_the_step_dense(where, warm_dir, pitch_task, dense, tmp_path, monkeypatch, capsys):
    """A kernel failing in the reference's forward (no grad), or in the second micro-batch's backward
    after the first's gradients were added: the step is redone from zeroed gradients with the dense mask,
    which the rest of the run keeps (the kernel is never called again), and the final weights equal the
    dense run's exactly. Had the first micro-batch's gradients been kept, they would count twice."""
    layers = json.loads((warm_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    calls = []
    forward = where == "reference forward"
    monkeypatch.setattr(attention, "flex_default", lambda device: True)
    monkeypatch.setattr(attention, "flex_kernel", failing_kernel(calls, forward, grad_calls_before_failing=layers))
    seen = spy_flex(monkeypatch)
    flags = ("--algo", "grpo", "--beta", "0.04" if forward else "0")
    weights = run(warm_dir, pitch_task, tmp_path, *flags)
    lines = fallback_lines(capsys)
    assert lines == [f"{LINE}RuntimeError: stand-in kernel failed); redoing the step with the dense mask, used for "
                     f"the rest of the run (--dense-attention uses it from the start)"]
    if forward:  # the reference's first micro-batch, then 2 steps x (reference + policy) x 2 micro-batches
        assert calls == [] and seen == [None] + [False] * 8
    else:  # both micro-batches ran the kernel in every layer, then 2 steps x 2 micro-batches dense
        assert len(calls) == 2 * layers and seen == [None, None] + [False] * 4
    assert_same_weights(weights, dense(*flags))


def test_two_processes_fall_back_together(warm_dir, pitch_task, dense, tmp_path):
    """Two processes under torchrun, FlexAttention forced on the CPU (tests/engine/flex_fallback_run.py): both
    fail in their first policy forward, agree through the all-reduced flag, reset FSDP and redo the
    step together (no hang), rank 0 prints the one line, and the weights equal one dense process's
    within 1e-7 but for a few elements whose step-2 gradient is a cancellation near AdamW's eps, where the
    order of the sums decides (measured: 5 elements, at most 2.5e-7; a 2-process run dense from the start
    differs from one process in the same 5, by the same amounts). Counted twice, a micro-batch's
    gradients would move every weight."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "engine" / "flex_fallback_run.py"),
           *quick_args(warm_dir, pitch_task, tmp_path, "--max-steps", "2", "--algo", "grpo", "--beta", "0")]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(LINE)]
    assert len(lines) == 1 and "NotImplementedError" in lines[0], done.stdout[-3000:]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    reference = dense("--algo", "grpo", "--beta", "0")
    assert weights.keys() == reference.keys()
    diffs = torch.cat([(weights[k] - reference[k]).abs().flatten() for k in weights])
    assert (diffs > 1e-7).sum() <= 10 and diffs.max() < 1e-5
