"""train.py in one process: flags, data order, the loop end to end, checkpoints, and faults."""

import json
import types
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import Qwen2AudioForConditionalGeneration

import data
import grpo
import model as M
import reward
import checkpoint
import config
import train as T
from conftest import quick_args
from engine import packed
from recipes import dynamic_sampling, variants
from workshop import demo


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_leftover_group():
    """A run that stops with SystemExit leaves its process group; the next test starts without one."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_every_config_field_is_a_flag():
    """Each Config field maps to --kebab-case; bools take --x / --no-x; explicit flags beat the demo preset."""
    cfg, demo = config.parse_args([])
    assert demo and cfg.lr == config.DEMO["lr"] and cfg.prompts_per_step == 32
    cfg, demo = config.parse_args(["--lr", "5e-4"])
    assert demo and cfg.lr == 5e-4 and cfg.max_new_tokens == config.DEMO["max_new_tokens"]
    cfg, demo = config.parse_args(["--model", "/some/Qwen2-Audio-7B-Instruct", "--data", "train.jsonl"])
    assert not demo and cfg == config.Config(model="/some/Qwen2-Audio-7B-Instruct", data="train.jsonl")
    for f in fields(config.Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            assert getattr(config.parse_args([flag])[0], f.name) is True
            assert getattr(config.parse_args(["--no-" + f.name.replace("_", "-")])[0], f.name) is False
        else:
            value = {int: "7", float: "0.5", str: "x"}[f.type]
            assert getattr(config.parse_args([flag, value])[0], f.name) == f.type(value)


def test_the_demo_warm_starts_on_loudness_and_decays_the_lr():
    """`python train.py`: 200 warm-start steps on the synthetic loudness question (correct answers, audio
    encoder frozen), then 300 GRPO steps whose lr decays linearly from 1e-3 to 0, the held-out set scored
    every 50 steps (at each checkpoint: --save-every alone moves both); flags still override the preset."""
    cfg, demo = config.parse_args([])
    assert demo and (cfg.warm_start_data, cfg.warm_start_steps, cfg.max_steps) == (config.LOUDNESS, 200, 300)
    assert (cfg.lr, cfg.lr_decay, cfg.beta, cfg.eval_every, cfg.eval_samples) == (1e-3, True, 0.1, 50, 200)
    cfg, _ = config.parse_args(["--warm-start-data", "", "--no-lr-decay"])
    assert cfg.warm_start_data == "" and not cfg.lr_decay
    cfg, _ = config.parse_args(["--warm-start-steps", "0"])  # no warm start at all: its data goes with it
    assert (cfg.warm_start_steps, cfg.warm_start_data) == (0, "")
    cfg, _ = config.parse_args(["--save-every", "100"])  # held-out at the checkpoints asked for, not refused
    assert (cfg.save_every, cfg.eval_every) == (100, 100)
    config.validate(cfg, 1)
    cfg, _ = config.parse_args(["--save-every", "25", "--eval-every", "50"])
    assert (cfg.save_every, cfg.eval_every) == (25, 50)


def test_r1_aqa_defaults():
    """Without the demo preset the defaults are R1-AQA's."""
    c = config.Config()
    assert (c.group_size, c.lr, c.beta, c.temperature, c.top_k, c.max_new_tokens) == (8, 1e-6, 0.04, 1.0, 50, 256)
    assert (c.weight_decay, c.grad_clip, c.seed, c.save_every, c.clip_low, c.clip_high, c.num_iterations) == (
        0, 1.0, 42, 100, 0.2, 0.2, 1)
    assert (c.loss_aggregation, c.advantage_scale, c.ratio_level, c.mask_truncated, c.dynamic_sampling) == (
        "sequence_mean", "group", "token", False, 0)
    assert c.lr_decay and c.dtype == "bfloat16" and c.algo == "grpo" and c.lora_rank == 0


def test_two_steps_end_to_end(warm_dir, pitch_task, tmp_path):
    """Two GRPO steps from the warm-started model: two metric records, samples, and checkpoints that
    from_pretrained opens, with weights that moved. Gradient checkpointing is on (the default for real
    models)."""
    out = tmp_path / "run"
    _, test_jsonl = pitch_task
    T.main(quick_args(warm_dir, pitch_task, out, "--save-every", "1", "--eval-data", str(test_jsonl),
                      "--eval-samples", "4", "--log-samples", "3", "--gradient-checkpointing"))
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for key in ["reward", "accuracy", "format", "kl", "clip_frac", "completion_len", "frac_zero_std",
                "grad_norm", "lr", "seconds", "skipped", "bad_samples"]:
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[0]["lr"] == pytest.approx(5e-4)  # linear decay over 2 steps: 1e-3 * (1 - 1/2)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 3
    assert [p.name for p in checkpoint.complete(out)] == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / "train_config.json").read_text())["max_steps"] == 2
    assert all(r["grad_norm"] > 0 and r["format"] > 0 for r in records)
    trained = Qwen2AudioForConditionalGeneration.from_pretrained(out / "checkpoint-2")
    start = Qwen2AudioForConditionalGeneration.from_pretrained(warm_dir)
    moved = [not torch.equal(p, start.state_dict()[k]) for k, p in trained.state_dict().items()]
    assert sum(moved) > len(moved) // 2
    model, processor = M.load(out / "checkpoint-2")
    assert processor.tokenizer.padding_side == "left" and model.dtype == torch.bfloat16


def test_beta_zero_runs_without_reference(tiny2_dir, pitch_task, tmp_path):
    """beta 0: no reference model is built and the logged KL is exactly 0."""
    assert T.reference(config.Config(beta=0.0), T.Recipe(), tiny2_dir) is None
    T.main(quick_args(tiny2_dir, pitch_task, tmp_path, "--beta", "0", "--max-steps", "1"))
    assert metrics(tmp_path)[0]["kl"] == 0.0


def test_second_iteration_clips(warm_dir, pitch_task, tmp_path, monkeypatch):
    """num_iterations 2 with a large lr: every loss of the first pass over a rollout has old_logp equal to
    the policy (ratio exactly 1, no clipping); the second pass, after one update, sees ratios off 1 and
    clips. The lr schedule counts both updates (1e-2 * (1 - 2/4) after step 1 of 2)."""
    calls, real = [], grpo.grpo_loss

    def recording(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        calls.append((m["ratio"].item(), m["clip_frac"].item()))
        return loss, m

    monkeypatch.setattr(T.grpo, "grpo_loss", recording)
    T.main(quick_args(warm_dir, pitch_task, tmp_path, "--num-iterations", "2", "--lr", "1e-2", "--beta", "0"))
    # per step: 2 micro-batches (4 prompts, micro-batch 2) x 2 passes = 4 calls, in order
    first_pass = calls[0:2] + calls[4:6]
    second_pass = calls[2:4] + calls[6:8]
    assert len(calls) == 8 and all(call == (1.0, 0.0) for call in first_pass), calls
    assert all(ratio != 1.0 for ratio, _ in second_pass) and max(clip for _, clip in second_pass) > 0, calls
    first = metrics(tmp_path)[0]
    assert first["clip_frac"] > 0
    assert first["lr"] == pytest.approx(5e-3)


@pytest.fixture
def fresh_run(tiny2_dir, pitch_task, tmp_path):
    """train.setup() from nothing: the warm start of conftest's warm_dir (after which rewards differ within
    groups), checkpoint-0 saved, the reference built."""
    cfg, _ = config.parse_args(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--warm-start-steps", "15",
                                     "--warm-start-lr", "1e-2", "--lr", "1e-3"))
    _, _, device = M.init_distributed(always=True)
    run, _, start = T.setup(cfg, T.recipe_for(cfg), device)
    assert start == 0 and (tmp_path / "run" / "checkpoint-0").exists()
    return run


def test_first_grpo_update_equals_a_fresh_adamw(fresh_run, monkeypatch):
    """Saving checkpoint-0 must not initialise the GRPO optimizer (a zero-gradient step would start AdamW's
    step count at 1 and scale the first update by about 0.74). The first GRPO update equals that of a
    fresh torch.optim.AdamW given the same (clipped) gradient, parameter by parameter."""
    run = fresh_run
    assert not run.optimizer.state
    params = run.optimizer.param_groups[0]["params"]
    before = [p.detach().to_local().clone() for p in params]
    grads, real_clip = [], torch.nn.utils.clip_grad_norm_

    def recording_clip(*args, **kwargs):
        norm = real_clip(*args, **kwargs)
        grads.extend(p.grad.to_local().clone() for p in params)
        return norm

    monkeypatch.setattr(T.torch.nn.utils, "clip_grad_norm_", recording_clip)
    metrics_1, _ = T.grpo_step(run, 0)
    assert metrics_1["frac_zero_std"] < 1 and metrics_1["skipped"] == 0  # there was something to learn
    fresh = [torch.nn.Parameter(b.clone()) for b in before]
    for p, g in zip(fresh, grads):
        p.grad = g
    torch.optim.AdamW(fresh, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).step()
    after = [p.detach().to_local() for p in run.optimizer.param_groups[0]["params"]]
    assert sum(not torch.equal(a, b) for a, b in zip(after, before)) > len(before) // 2  # it did update
    for got, want in zip(after, fresh):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-7)


def test_the_reference_is_resharded_after_its_pass(fresh_run):
    """The frozen reference never runs backward, where FSDP frees the root units: after a step every one
    of its parameters is back to its sharded DTensor (nothing left gathered)."""
    from torch.distributed.tensor import DTensor
    T.grpo_step(fresh_run, 0)
    params = list(fresh_run.reference.parameters())
    assert len(params) == 66 and all(isinstance(p, DTensor) for p in params)


def test_kl_is_zero_at_the_first_step(fresh_run):
    """Before the first update the policy is the reference (checkpoint-0), so the k3 KL of step 1 is 0
    in float32 (a wrong reference, e.g. the model before the warm start, gives a clearly positive KL)."""
    metrics_1, _ = T.grpo_step(fresh_run, 0)
    metrics_2, _ = T.grpo_step(fresh_run, 1)
    assert metrics_1["kl"] == 0.0 and metrics_2["kl"] > 0


def test_nan_loss_skips_the_update(warm_dir, pitch_task, tmp_path, monkeypatch):
    """A non-finite loss skips the optimizer step, is counted, and leaves the weights finite and unchanged;
    the same step without the NaN does change them."""
    real = grpo.grpo_loss

    def poisoned(*args, **kwargs):
        loss, m = real(*args, **kwargs)
        return loss * float("nan"), m

    T.main(quick_args(warm_dir, pitch_task, tmp_path / "a", "--max-steps", "1"))
    monkeypatch.setattr(T.grpo, "grpo_loss", poisoned)
    T.main(quick_args(warm_dir, pitch_task, tmp_path / "b", "--max-steps", "1"))
    assert metrics(tmp_path / "a")[0]["skipped"] == 0 and metrics(tmp_path / "b")[0]["skipped"] == 1
    # one step: the schedule decays to 0 after its one update; a skipped update leaves it at 1e-3
    assert metrics(tmp_path / "a")[0]["lr"] == 0.0 and metrics(tmp_path / "b")[0]["lr"] == 1e-3
    start = load_file(warm_dir / "model.safetensors")
    clean = load_file(tmp_path / "a" / "checkpoint-1" / "model.safetensors")
    poisoned_run = load_file(tmp_path / "b" / "checkpoint-1" / "model.safetensors")
    assert all(torch.equal(poisoned_run[k], start[k]) for k in start)
    assert not all(torch.equal(clean[k], start[k]) for k in start)


def write_with_missing_audio(pitch_task, tmp_path, n_missing):
    train_jsonl, _ = pitch_task
    lines = train_jsonl.read_text().splitlines()
    for i in range(n_missing):
        record = json.loads(lines[i])
        record["audio_path"] = str(tmp_path / f"gone{i}.wav")
        lines[i] = json.dumps(record)
    path = train_jsonl.parent / f"with_{n_missing}_missing.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_unreadable_audio_is_skipped_and_counted(tiny2_dir, pitch_task, tmp_path, capsys):
    """One missing clip among 32: logged with its path, counted, and the run goes on."""
    data = write_with_missing_audio(pitch_task, tmp_path, 1)
    T.main(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--data", str(data), "--prompts-per-step", "16",
                      "--micro-batch", "16", "--max-new-tokens", "3", "--balance-answers"))
    # 2 steps x 16 prompts cover all 32 records once, so the missing one was seen exactly once
    assert [r["bad_samples"] for r in metrics(tmp_path / "run")] in ([0, 1], [1, 1])
    assert "gone0.wav" in capsys.readouterr().out


def test_too_many_unreadable_clips_stop_the_run(tiny2_dir, pitch_task, tmp_path):
    """More than max_bad_fraction bad (of at least 100) stops with a message that says what to do."""
    data = write_with_missing_audio(pitch_task, tmp_path, 8)
    with pytest.raises(SystemExit, match="unreadable audio"):
        T.main(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--data", str(data), "--prompts-per-step", "32",
                          "--micro-batch", "32", "--max-new-tokens", "2", "--max-bad-fraction", "0.05"))


def test_token_mean_changes_the_update(warm_dir, pitch_task, tmp_path):
    """--loss-aggregation token_mean weights long completions more than the per-sequence mean: another
    gradient."""
    T.main(quick_args(warm_dir, pitch_task, tmp_path / "seq", "--max-steps", "1", "--beta", "0"))
    T.main(quick_args(warm_dir, pitch_task, tmp_path / "tok", "--max-steps", "1", "--beta", "0", "--loss-aggregation", "token_mean"))
    seq, tok = metrics(tmp_path / "seq")[0], metrics(tmp_path / "tok")[0]
    assert seq["reward"] == tok["reward"]  # same rollout
    assert seq["grad_norm"] != pytest.approx(tok["grad_norm"], rel=1e-4)


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    """A folder without trainer_state.pt (a crash mid-save) or named *.tmp never counts as a checkpoint;
    pruning keeps the newest keep_last and checkpoint-0."""
    for step in [0, 10, 20, 30, 40]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.pt").write_text("")
    (tmp_path / "checkpoint-50").mkdir()
    (tmp_path / "checkpoint-60.tmp").mkdir()
    assert [p.name for p in checkpoint.complete(tmp_path)][-1] == "checkpoint-40"
    checkpoint.prune(tmp_path, keep_last=2)
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["checkpoint-0", "checkpoint-30", "checkpoint-40"]


def test_text_chart():
    """The chart has `height` rows plus an axis; a value of 1 fills its column, 0 leaves it empty."""
    chart = T.text_chart([0.0, 1.0], height=4, width=2).splitlines()
    assert len(chart) == 5
    assert chart[0].endswith("| █") and chart[3].endswith("| █")
    assert "over 2 steps" in chart[-1]


def test_plan_prints_the_7b_table_for_this_runs_batch():
    """--plan without a model folder plans the 7B (its parameter count is asserted inside), uses the
    run's batch settings, and says whether it fits --gpu-mem."""
    import contextlib
    import io
    for gpu_mem, verdict in [("80", "fits in 80 GiB"), ("30", "does NOT fit in 30 GiB")]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            T.main(["--plan", "--gpu-mem", gpu_mem, "--group-size", "4", "--max-new-tokens", "128"])
        text = buf.getvalue()
        assert verdict in text and "G=4" in text and "+ 128 new" in text
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # --dense-attention plans the fallback's mask and L^2 attention
        T.main(["--plan", "--dense-attention"])
    assert "packed attention mask (bool)" in buf.getvalue() and "attention dense" in buf.getvalue()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the run's algorithm and LoRA rank reach the plan
        T.main(["--plan", "--algo", "sft", "--lora-rank", "64", "--gpus", "1", "--gpu-mem", "48"])
    assert buf.getvalue().startswith("SFT, LoRA r=64, memory per GPU: 1 GPUs") and "fits in 48 GiB" in buf.getvalue()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the run's checkpoint settings reach the disk line: 3 of 117.5 GB
        T.main(["--plan", "--max-steps", "300", "--save-every", "100", "--keep-last", "5"])
    assert "keeps up to 3 at once (the newest and the one being written): 352.6 GB" in buf.getvalue()


def test_mask_truncated_leaves_cut_off_completions_out(warm_dir, pitch_task, tmp_path, monkeypatch):
    """With 6 new tokens some completions reach their end token and some are cut off. --mask-truncated
    trains on exactly the rows that ended; without it every row is trained on. Lengths and rewards are
    logged the same way either way."""
    groups, real_score = [], T.score
    monkeypatch.setattr(T, "score", lambda *a: groups.append(real_score(*a)) or groups[-1])
    args = lambda out, *extra: quick_args(warm_dir, pitch_task, out, "--max-steps", "1", "--max-new-tokens", "6",
                                          *extra)
    T.main(args(tmp_path / "kept"))
    T.main(args(tmp_path / "masked", "--mask-truncated"))
    tok = M.load_processor(warm_dir).tokenizer
    ends = torch.tensor(M.end_token_ids(tok))
    ended = [torch.isin(g.rollout.completion_ids, ends).any(1) for g in groups]
    trained = [g.rollout.mask.any(1) for g in groups]
    assert all(t.all() for t in trained[:2])                                   # the first run: every row
    assert all(torch.equal(t, e) for t, e in zip(trained[2:], ended[2:]))      # the second: rows that ended
    assert 0 < int(sum(e.sum() for e in ended[2:])) < 16
    kept, masked = metrics(tmp_path / "kept")[0], metrics(tmp_path / "masked")[0]
    assert kept["completion_len"] == masked["completion_len"] and kept["reward"] == masked["reward"]


def fake_rollouts(informative_by_round, G=2):
    """A stand-in for train.rollout (one micro-batch a call): round r's prompt p gets rewards [1, 0]
    (informative) or [1, 1]; it records which global positions and samples each call was given."""
    calls = []

    def rollout(run, step, positions, samples):
        calls.append((list(positions), [s.question for s in samples]))
        flags = [informative_by_round[p // run.cfg.prompts_per_step][p % run.cfg.prompts_per_step] for p in positions]
        rewards = torch.tensor([[1.0, 0.0] if f else [1.0, 1.0] for f in flags]).flatten()
        r = grpo.Rollout([], None, None, torch.zeros(len(rewards), 3, dtype=torch.long),
                         torch.ones(len(rewards), 3, dtype=torch.bool), G)
        ones = torch.ones(len(rewards), dtype=torch.bool)
        return T.MicroBatch(r, [], [""] * len(rewards), rewards, rewards, rewards, ones, torch.full((len(rewards),), 3),
                            ones.clone())
    return rollout, calls


def test_dynamic_sampling_keeps_the_first_informative_groups(monkeypatch):
    """4 prompts a step. Round 0 has 2 informative groups (positions 0, 2); round 1 adds 3 (1, 2, 3), so
    the step is full after round 1 and keeps round 1's first two: 8 prompts sampled, 4 groups dropped,
    kept = [1, 0, 1, 0] then [0, 1, 1, 0]. Round 1's questions come from (seed, step, round) alone, and its
    generator indices (4..7) differ from round 0's (0..3)."""
    M.init_distributed(always=True)
    cfg = config.Config(prompts_per_step=4, micro_batch=2, group_size=2, dynamic_sampling=3, seed=5)
    train = [data.Sample(f"{i}.wav", f"q{i}", ["a", "b"], "a", {}) for i in range(10)]
    recipe = T.recipe_for(cfg)
    run = types.SimpleNamespace(cfg=cfg, recipe=recipe, questions=train, device=torch.device("cpu"))
    fake, calls = fake_rollouts([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    monkeypatch.setattr(T, "rollout", fake)
    sampled = recipe.sample(run, step=3)
    groups = sampled.all
    # one call per micro-batch of 2 prompts: 2 rounds x 2 micro-batches
    assert (sampled.prompts, sampled.dropped) == (8, 4) and len(calls) == 4 and len(groups) == 4
    kept = [g.rollout.mask.view(-1, 2, 3).any(2).all(1).tolist() for g in groups]  # per prompt
    assert sum(kept, []) == [True, False, True, False, False, True, True, False]
    assert sum([g.counted.view(-1, 2).all(1).tolist() for g in groups], []) == sum(kept, [])  # dropped: not counted
    assert calls[0][0] + calls[1][0] == [0, 1, 2, 3] and calls[2][0] + calls[3][0] == [4, 5, 6, 7]
    expected = [f"q{i}" for i in dynamic_sampling.round_questions(cfg, 10, 3, 1)]
    assert calls[2][1] + calls[3][1] == expected
    assert dynamic_sampling.round_questions(cfg, 10, 3, 1) != dynamic_sampling.round_questions(cfg, 10, 4, 1)


def test_dynamic_sampling_stops_at_its_cap(monkeypatch):
    """With 1 extra round allowed and only 1 informative group in 2 rounds, the step trains on that one:
    8 sampled, 7 dropped; without dynamic sampling nothing is masked or dropped."""
    M.init_distributed(always=True)
    train = [data.Sample(f"{i}.wav", f"q{i}", ["a", "b"], "a", {}) for i in range(10)]
    fake, calls = fake_rollouts([[0, 0, 1, 0], [0, 0, 0, 0]])
    monkeypatch.setattr(T, "rollout", fake)
    for rounds, expected in ((1, (8, 7)), (0, (4, 0))):
        cfg = config.Config(prompts_per_step=4, micro_batch=2, group_size=2, dynamic_sampling=rounds)
        recipe = T.recipe_for(cfg)
        sampled = recipe.sample(types.SimpleNamespace(cfg=cfg, recipe=recipe, questions=train, device="cpu"), 0)
        assert (sampled.prompts, sampled.dropped) == expected
        assert sum(int(g.rollout.mask.any(1).sum()) for g in sampled.all) == (2 if rounds else 8)


def set_advantages(recipe, groups, group_size):
    """What train.grpo_step does with the recipe's advantages: one [N] per micro-batch, on the micro-batch."""
    for g, advantages in zip(groups, recipe.advantages(groups, group_size)):
        g.advantages = advantages


def test_batch_scaled_advantages_use_the_whole_batch(monkeypatch):
    """--advantage-scale batch over two micro-batches equals grpo.group_advantages on their concatenation
    (one std for the batch); a sample out of the batch (not counted, not trained on) is out of the std
    and gets 0."""
    M.init_distributed(always=True)
    fake, _ = fake_rollouts([[1, 1, 0, 1]])
    cfg = config.Config(prompts_per_step=4, micro_batch=2, group_size=2, advantage_scale="batch")
    run = types.SimpleNamespace(cfg=cfg, questions=[], device="cpu")
    groups = [fake(run, 0, [0, 1], []), fake(run, 0, [2, 3], [])]
    groups[0].rewards = torch.tensor([1.0, 0.0, 2.0, 0.5])
    groups[1].rollout.mask[3] = False
    groups[1].counted[3] = False
    set_advantages(T.recipe_for(cfg), groups, cfg.group_size)
    rewards = torch.cat([g.rewards for g in groups])
    std = rewards[:7].std()  # the 7 counted rewards
    centred = rewards.view(-1, 2) - rewards.view(-1, 2).mean(1, keepdim=True)
    expected = (centred.flatten() / (std + 1e-4)) * torch.tensor([1.0] * 7 + [0.0])
    torch.testing.assert_close(torch.cat([g.advantages for g in groups]), expected, rtol=0, atol=1e-6)


def truncated_batch():
    """16 completions (4 prompts, G = 4) in 2 micro-batches of 2 prompts, max_new_tokens T = 4, scored as
    train.score scores them with --mask-truncated: rows 0-2 of each group end at token 1 (end id 9), so
    2 tokens are trained on; row 3 never ends, so variants.mask_truncated empties its mask. Rewards:
    [2, 2, 0 | 0], [2, 0, 0 | 0], [2, 2, 0 | 0], [2, 0, 0 | 0] (the truncated one last, 0)."""
    ends, cut = [5, 9, 0, 0], [5, 6, 7, 5]
    ids = torch.tensor(([ends] * 3 + [cut]) * 4)                                       # [16, 4]
    mask = variants.mask_truncated(grpo.Rollout([], None, None, ids, grpo.completion_mask(ids, [9]), 4), [9])
    rewards = torch.tensor([2.0, 2, 0, 0, 2, 0, 0, 0, 2, 2, 0, 0, 2, 0, 0, 0])
    groups = []
    for rows in (slice(0, 8), slice(8, 16)):
        r = grpo.Rollout([], None, None, ids[rows], mask[rows], 4)
        groups.append(T.MicroBatch(r, [], [""] * 8, rewards[rows], rewards[rows], rewards[rows],
                                   torch.ones(8, dtype=torch.bool), mask[rows].sum(1), torch.ones(8, dtype=torch.bool)))
    return groups


def loss_count(recipe, groups):
    """The count train.grpo_step divides the loss by, on one process (its all-reduce over one process and
    its division by a world of 1 leave it as it is)."""
    return sum(recipe.loss_count(g) for g in groups)


@pytest.mark.parametrize("aggregation, denominator, loss", [
    # advantages (scale none) = rewards - group mean: [1, 1, -1 | -1], [1.5, -.5, -.5 | -.5], twice. The
    # ratio is 1 and beta 0, so every trained token's loss is -A; the 12 trained rows' A sum to 3 (each
    # group's A sum to 0, minus its truncated row's: 1 + .5 + 1 + .5).
    ("sequence_mean", 16, -3 / 16),       # TRL's mean over all 16 rows (12 would make it 16/12 x as large)
    ("token_mean", 24, -3 * 2 / 24),      # 12 rows x 2 trained tokens; TRL counts trained tokens too
    ("token_sum", 16 * 4, -3 * 2 / 64),   # TRL's rows x max length: 16 x 4 (not 12 x 4)
])
def test_truncated_completions_count_in_the_loss_scale(aggregation, denominator, loss):
    """With --mask-truncated, 4 of 16 completions truncated: they are not trained on (advantage 0, empty
    mask), but the loss divides by every row as TRL's does, so the scale does not move with the number
    truncated. The denominator and the loss over both micro-batches, by hand (comments)."""
    M.init_distributed(always=True)
    cfg = config.Config(group_size=4, max_new_tokens=4, loss_aggregation=aggregation, advantage_scale="none",
                   mask_truncated=True, beta=0.0)
    recipe, groups = T.recipe_for(cfg), truncated_batch()
    set_advantages(recipe, groups, cfg.group_size)
    got = loss_count(recipe, groups)
    assert got.item() == denominator
    total = 0.0
    for g in groups:
        logp = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
        part, _ = recipe.loss(logp, logp.detach(), None, g.advantages.double(), g.rollout.mask, denominator=got)
        total += part.item()
    assert total == pytest.approx(loss, abs=1e-12)
    assert torch.cat([g.advantages for g in groups]).tolist() == [1, 1, -1, 0, 1.5, -.5, -.5, 0] * 2


def test_batch_std_counts_truncated_completions_and_not_dropped_groups():
    """--advantage-scale batch with --mask-truncated: the std is over every counted reward, the truncated
    ones' too, as TRL's. 16 rewards, six 2s: sum 12, squares 24, unbiased var (24 - 12^2/16) / 15 = 1,
    std 1; without the 4 truncated 0s it would be (24 - 12^2/12) / 11 = 12/11, std 1.0445. So the first
    row's A = 1 / (1 + 1e-4), not 1 / (1.0445 + 1e-4). A group dynamic sampling drops (sample_rounds
    clears both its mask and counted) is out of both the count and the std: drop the last group, and 12
    rows count: five 2s, sum 10, squares 20, var (20 - 10^2/12) / 11 = 35/33, std 1.02986."""
    M.init_distributed(always=True)
    cfg = config.Config(group_size=4, max_new_tokens=4, advantage_scale="batch", mask_truncated=True)
    recipe, groups = T.recipe_for(cfg), truncated_batch()
    set_advantages(recipe, groups, cfg.group_size)
    centred = torch.tensor([1, 1, -1, 0, 1.5, -.5, -.5, 0] * 2)  # the truncated rows get 0
    torch.testing.assert_close(torch.cat([g.advantages for g in groups]), centred / (1 + 1e-4), rtol=0, atol=1e-6)
    groups[1].rollout.mask[4:] = False
    groups[1].counted[4:] = False
    set_advantages(recipe, groups, cfg.group_size)
    kept = centred * torch.tensor([1.0] * 12 + [0.0] * 4)
    std = (35 / 33) ** 0.5
    assert abs(std - 1.02986) < 1e-5
    torch.testing.assert_close(torch.cat([g.advantages for g in groups]), kept / (std + 1e-4), rtol=0, atol=1e-6)
    assert cfg.loss_aggregation == "sequence_mean" and loss_count(recipe, groups).item() == 12


def test_evaluation_during_training_equals_evaluate_py(tiny2_dir, pitch_task, tmp_path):
    """--eval-every scores --eval-data at each checkpoint with evaluate.py's generation and scoring: the
    accuracy (total and per category) logged for step N equals what `evaluate.py --model RUN` reports
    for checkpoint-N (float32, the same batches of 2). After a 40-step warm start the model answers one
    band ("very low" at 100%, the rest 0%), so the per-category numbers are not all alike."""
    import evaluate as E
    out, test = tmp_path / "run", pitch_task[1]
    T.main(quick_args(tiny2_dir, pitch_task, out, "--warm-start-steps", "40", "--save-every", "1", "--eval-every",
                      "1", "--eval-data", str(test), "--eval-samples", "8"))
    records = metrics(out)
    assert [r["eval_questions"] for r in records] == [8, 8] and all(r["eval_format"] == 1.0 for r in records)
    assert all(0 < r["eval_accuracy"] < 1 for r in records)
    assert E.main(["--model", str(out), "--data", str(test), "--batch-size", "2", "--max-new-tokens", "12",
                   "--dtype", "float32"]) == 0
    rows = {row["step"]: row for row in json.loads(next(out.glob("eval/*/table.json")).read_text())["rows"]}
    assert sorted(rows) == [0, 1, 2]
    for logged in records:
        row = rows[logged["step"]]
        assert row["accuracy"]["total"] == pytest.approx(100 * logged["eval_accuracy"], abs=1e-9)
        for band in demo.PITCH_CHOICES:
            assert row["accuracy"][band] == pytest.approx(100 * logged["eval_groups"][f"category={band}"], abs=1e-9)


def test_reward_weights_weigh_the_logged_reward(warm_dir, pitch_task, tmp_path):
    """--reward-weights 2,0: every completion's reward is twice its accuracy, so the step's mean reward is
    exactly 2 x its mean accuracy (the same rollout as with 1,1, whose reward is accuracy + format)."""
    T.main(quick_args(warm_dir, pitch_task, tmp_path / "a", "--max-steps", "1"))
    T.main(quick_args(warm_dir, pitch_task, tmp_path / "b", "--max-steps", "1", "--reward-weights", "2,0"))
    plain, weighted = metrics(tmp_path / "a")[0], metrics(tmp_path / "b")[0]
    assert plain["reward"] == pytest.approx(plain["accuracy"] + plain["format"])
    assert weighted["reward"] == pytest.approx(2 * weighted["accuracy"]) and weighted["format"] == plain["format"]


def test_dense_attention_forces_the_fallback(warm_dir, pitch_task, tmp_path, monkeypatch):
    """Every packed forward gets flex=None (FlexAttention on a GPU, the dense mask on a CPU) unless
    --dense-attention, which forces flex=False everywhere: reference, policy and supervised passes."""
    seen, real = [], packed.completion_logprobs  # the engine's log-probs, train.py's default
    monkeypatch.setattr(packed, "completion_logprobs", lambda *a, **k: seen.append(k["flex"]) or real(*a, **k))
    T.main(quick_args(warm_dir, pitch_task, tmp_path / "auto", "--max-steps", "1", "--num-iterations", "2"))
    auto = list(seen)
    seen.clear()
    T.main(quick_args(warm_dir, pitch_task, tmp_path / "dense", "--max-steps", "1", "--num-iterations", "2",
                      "--dense-attention"))
    # 2 micro-batches x (reference + old log-probs + 2 policy passes) = 8 packed forwards each
    assert auto == [None] * 8 and seen == [False] * 8


def test_the_runs_prompt_settings_reach_every_forward(tiny2_dir, pitch_task, tmp_path, monkeypatch):
    """--prompt think --think-words 50 --system-prompt: the rollout, the held-out decoding and its
    scoring all ask the question that way (each call to model.collate carries the three settings)."""
    calls, real = [], M.collate
    monkeypatch.setattr(M, "collate", lambda *a: calls.append(a[3:]) or real(*a))
    T.main(quick_args(tiny2_dir, pitch_task, tmp_path, "--max-steps", "1", "--prompt", "think", "--think-words", "50",
                      "--system-prompt", "You judge pitch.", "--eval-data", str(pitch_task[1]), "--eval-samples", "2",
                      "--beta", "0"))
    assert len(calls) == 4 and set(calls) == {("think", "You judge pitch.", 50)}  # before, 2 rollouts, after


def test_tiny_omni_is_a_demo_model():
    """--model tiny-omni, like tiny, is built offline and runs the workshop preset."""
    cfg, demo = config.parse_args(["--model", "tiny-omni"])
    assert demo and cfg.lr == config.DEMO["lr"]
    config.check_paths(cfg)  # no folder to check: it is built in setup()


def test_warm_start_on_another_question_keeps_the_encoder(tiny2_dir, pitch_task, tmp_path, monkeypatch):
    """--warm-start-data: each warm-start step trains on those questions with their CORRECT answers as
    targets, with the audio encoder frozen: in checkpoint-0 its weights equal the base's while the language
    model's moved. The training after it trains the encoder again (checkpoint-1 differs there)."""
    loud, _ = demo.make_synthetic(tmp_path / "loud", n_train=16, n_test=4, task="loudness")
    seen, real = [], T.supervised_step

    def spy(run, optimizer, samples, targets, counts=None):
        seen.append((samples, targets, any(p.requires_grad for p in run.policy.model.audio_tower.parameters())))
        return real(run, optimizer, samples, targets, counts)
    monkeypatch.setattr(T, "supervised_step", spy)
    out = tmp_path / "run"
    T.main(quick_args(tiny2_dir, pitch_task, out, "--algo", "sft", "--max-steps", "1", "--save-every", "1",
                      "--warm-start-steps", "2", "--warm-start-data", str(loud)))
    warm, sft = seen[:2], seen[2:]
    assert len(warm) == 2 and len(sft) == 1 and sft[0][2]  # the SFT step trains the encoder
    for samples, targets, encoder_trains in warm:
        assert not encoder_trains and len(samples) == config.WARM_START_BATCH
        assert all(s.question == demo.LOUDNESS_QUESTION for s in samples)
        assert targets == [f"<answer>{s.answer}</answer><|im_end|>" for s in samples]
    base, start, after = (Qwen2AudioForConditionalGeneration.from_pretrained(d).state_dict() for d in
                          (tiny2_dir, out / "checkpoint-0", out / "checkpoint-1"))
    encoder = [k for k in base if "audio_tower." in k and "embed_positions" not in k]
    language = [k for k in base if "language_model." in k]
    assert encoder and all(torch.equal(base[k], start[k]) for k in encoder)
    assert all(not torch.equal(base[k], start[k]) for k in language)
    assert sum(not torch.equal(start[k], after[k]) for k in encoder) > len(encoder) // 2


def test_the_think_prompt_warm_starts_on_its_own_format(tiny2_dir, pitch_task, tmp_path, monkeypatch):
    """--prompt think --warm-start-steps: the warm start teaches the think format, each target an empty think
    block (the data holds no reasoning) then the answer, which the think format reward accepts; SFT on the
    think prompt stays refused, as it would have to imitate a reasoning the data does not hold."""
    seen, real = [], T.supervised_step

    def spy(run, optimizer, samples, targets, counts=None):
        seen.append((samples, targets))
        return real(run, optimizer, samples, targets, counts)
    monkeypatch.setattr(T, "supervised_step", spy)
    T.main(quick_args(tiny2_dir, pitch_task, tmp_path / "run", "--prompt", "think", "--max-steps", "0",
                      "--warm-start-steps", "2"))
    assert len(seen) == 2 and (tmp_path / "run" / "checkpoint-0").is_dir()
    for samples, targets in seen:
        assert len(targets) == config.WARM_START_BATCH
        assert all(t.startswith("<think></think><answer>") and t.endswith("</answer><|im_end|>") for t in targets)
        assert all(reward.format_reward(t.removesuffix("<|im_end|>"), "think") == 1.0 for t in targets)
        assert all(reward.format_reward(t.removesuffix("<|im_end|>"), "answer") == 0.0 for t in targets)
    cfg, _ = config.parse_args(quick_args(tiny2_dir, pitch_task, tmp_path / "sft", "--prompt", "think",
                                          "--algo", "sft"))
    with pytest.raises(M.UsageError, match="--prompt think: has no supervised target for --algo sft"):
        config.validate(cfg, 1)


def test_heldout_answer_nll_is_the_targets_log_prob(warm_dir, pitch_task, tmp_path):
    """eval_answer_nll, logged with the held-out scores, is the mean over questions of -log p of the whole
    correct target `<answer>{answer}</answer><|im_end|>` after the prompt, in the distribution sampling draws
    from (the suppressed tokens out of the softmax): here recomputed one question at a time by a plain
    forward of the saved checkpoint over prompt + target ids."""
    out, test = tmp_path / "run", pitch_task[1]
    T.main(quick_args(warm_dir, pitch_task, out, "--max-steps", "1", "--save-every", "1", "--eval-every", "1",
                      "--eval-data", str(test), "--eval-samples", "3"))
    logged = metrics(out)[0]["eval_answer_nll"]
    model, processor = M.load(out / "checkpoint-1", dtype=torch.float32)
    suppress = M.suppressed_token_ids(processor.tokenizer, model.config.text_config.vocab_size)
    nlls = []
    for s in data.read_samples(test)[:3]:
        prompt = M.collate(processor, [s], [data.load_audio(s.audio_path)])
        target = processor.tokenizer(data.target_text(s.answer) + M.END_TOKENS[0], add_special_tokens=False,
                                     return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt["input_ids"], target], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=prompt["input_features"],
                           feature_attention_mask=prompt["feature_attention_mask"]).logits[0]
        logits[:, suppress] = float("-inf")
        logp = logits[-target.shape[1] - 1:-1].log_softmax(-1).gather(1, target[0][:, None])
        nlls.append(-logp.sum().item())
    assert 0.5 < logged < 50  # in format after the warm start, not yet right: well above 0
    assert logged == pytest.approx(sum(nlls) / 3, rel=1e-4)
