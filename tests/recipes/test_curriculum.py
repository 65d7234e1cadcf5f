"""SARI's curriculum: the order is a pure function of (seed, epoch) and the stored pass rates, easiest
first; the pre-pass that measures the rates resumes after a kill to the same rates."""

import json
from types import SimpleNamespace

import pytest
import torch.distributed as dist

import config
import data
import train as T
from conftest import quick_args
from recipes import curriculum


@pytest.fixture(autouse=True)
def no_leftover_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def by_pass_rate(rates):
    """The epoch order the curriculum puts in the recipe (its arrange) for these pass rates."""
    return lambda rng, n: curriculum.easiest_first(rates, rng, n)


def test_easiest_first_ties_in_a_seeded_order():
    """Rates [0.5, 1, 0, 1, 0.5, 0]: the two 1s first, then the 0.5s, then the 0s; within a rate the order
    is a seeded permutation, the same for the same (seed, epoch), possibly different for another epoch."""
    rates = [0.5, 1.0, 0.0, 1.0, 0.5, 0.0]
    order = data.epoch_order(["a"] * 6, epoch=0, seed=3, balance=False, arrange=by_pass_rate(rates))
    assert [rates[i] for i in order] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    assert sorted(order[:2]) == [1, 3] and sorted(order[2:4]) == [0, 4] and sorted(order[4:]) == [2, 5]
    assert data.epoch_order(["a"] * 6, 0, 3, False, by_pass_rate(rates)) == order
    epochs = {tuple(data.epoch_order(["a"] * 6, e, 3, False, by_pass_rate(rates))) for e in range(8)}
    assert len(epochs) > 1 and all([rates[i] for i in o] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0] for o in epochs)


def test_balanced_curriculum_interleaves_answers_from_easy_to_hard():
    """Balanced: each window of 2 holds answers a and b once, and each answer's questions come easiest
    first: a's rates [0.2, 0.9, 0.5] -> indices 1, 2, 0; b's [1, 0] -> 4, 3."""
    answers, rates = ["a", "a", "a", "b", "b"], [0.2, 0.9, 0.5, 0.0, 1.0]
    order = data.epoch_order(answers, 0, 0, balance=True, arrange=by_pass_rate(rates))
    assert order == [1, 4, 2, 3, 0]


def test_step_indices_follow_the_curriculum(monkeypatch):
    """A step's batch is the next slice of the curriculum order (the recipe's, once the pre-pass has
    measured the rates); without rates, the usual shuffle."""
    cfg = config.Config(prompts_per_step=2, seed=1)
    rates = [i / 10 for i in range(10)]  # question 9 easiest
    questions = [data.Sample(f"{i}.wav", f"q{i}", ["a", "b"], "a", {}) for i in range(10)]
    run = SimpleNamespace(recipe=T.Recipe())
    monkeypatch.setattr(curriculum, "pass_rates", lambda run: rates)  # the pre-pass's result
    curriculum.order_by_pass_rate(run)
    assert T.step_questions(cfg, run.recipe, questions, 0) == [9, 8]
    assert T.step_questions(cfg, run.recipe, questions, 4) == [1, 0]
    assert T.step_questions(cfg, T.Recipe(), questions, 0) != [9, 8]


def test_the_pre_pass_resumes_after_a_kill(warm_dir, pitch_task, tmp_path):
    """--curriculum 4 on 8 questions (micro-batches of 2): the rates are each a share of 4 completions.
    A pre-pass killed with half its batches written and its last line torn, then run again, writes
    the same rates as an uninterrupted one, re-sampling only what was missing."""
    args = lambda out: quick_args(warm_dir, pitch_task, out, "--max-steps", "0", "--curriculum", "4", "--data",
                                  str(pitch_task[1]))
    T.main(args(tmp_path / "whole"))
    whole = json.loads((tmp_path / "whole" / "pass_rates.json").read_text())
    assert whole["samples_per_question"] == 4 and len(whole["pass_rates"]) == 8
    assert all(r in (0, 0.25, 0.5, 0.75, 1) for r in whole["pass_rates"])
    part = tmp_path / "whole" / "pass_rates.parts" / "rank0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    (tmp_path / "killed" / "pass_rates.parts").mkdir(parents=True)
    (tmp_path / "killed" / "pass_rates.parts" / "rank0.jsonl").write_text("".join(lines[:4]) + lines[4][:9])
    samples, real = [], curriculum.sample_rates
    curriculum.sample_rates = lambda run, batch: samples.append(batch) or real(run, batch)
    try:
        T.main(args(tmp_path / "killed"))
    finally:
        curriculum.sample_rates = real
    assert json.loads((tmp_path / "killed" / "pass_rates.json").read_text()) == whole
    assert samples == [[4, 5], [6, 7]]  # batches [0, 1] and [2, 3] were whole; 4's line was torn
