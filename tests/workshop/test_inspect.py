"""workshop/inspect.py: every number it shows is grpo.py's. The token shares sum to grpo_loss, the advantages
are group_advantages, the probabilities are exp(completion_logprobs), the ratio is exactly 1 on the first pass
and not on the second, where the clip marks are clipped_surrogate's."""

import copy
import math
import re
from types import SimpleNamespace

import pytest
import torch

import grpo
import model as M
import reward
from workshop import inspect as laid

TEMPERATURE = 0.9  # not 1, so the log-probs below check that the temperature reaches completion_logprobs


def flags(policy_dir, pitch_task, *extra):
    """A group of 4 short completions of question 1 of the tiny pitch task."""
    return [str(policy_dir), "--data", str(pitch_task[0]), "--question", "1", "--group-size", "4",
            "--max-new-tokens", "10", "--temperature", str(TEMPERATURE), *extra]


@pytest.fixture(scope="module")
def opened(warm_dir, tiny2_dir, pitch_task):
    """The warm-started tiny model laid open over two passes (lr 1e-2, so the clip binds), against the random
    tiny model as the reference (so the KL is not 0). start: the policy before the step."""
    args = laid.parse_args(flags(warm_dir, pitch_task, "--num-iterations", "2", "--lr", "1e-2"))
    policy, processor = M.load(warm_dir, dtype=torch.float32)
    reference = M.load(tiny2_dir, dtype=torch.float32)[0].eval()
    start = copy.deepcopy(policy).eval()
    sample, audio = laid.load_question(args.data, args.question)
    group, passes = laid.lay_open(policy, processor, reference, sample, audio, args)
    assert group.advantages.abs().sum() > 0, "the group's rewards must differ for this test to mean anything"
    return SimpleNamespace(args=args, policy=policy.eval(), start=start, reference=reference, processor=processor,
                           group=group, passes=passes, pad=processor.tokenizer.pad_token_id)


def logprobs(model, o):
    """grpo.completion_logprobs as training takes them: at the temperature, the suppressed tokens left out."""
    suppress = M.suppressed_token_ids(o.processor.tokenizer, model.config.text_config.vocab_size)
    with torch.no_grad():
        return grpo.completion_logprobs(model, o.group.rollout, o.pad, TEMPERATURE, suppress)  # [G, T]


def test_rewards_and_advantages_are_reward_and_grpos(opened, pitch_task):
    """The completions decode the sampled ids; the rewards are reward.score's; the advantages are
    grpo.group_advantages of the totals; the question is --question's."""
    o, tok = opened, opened.processor.tokenizer
    assert o.group.sample.audio_path.endswith("train_00001.wav")
    texts = tok.batch_decode(o.group.rollout.completion_ids, skip_special_tokens=True)
    assert o.group.texts == texts
    totals = torch.tensor([reward.score(t, o.group.sample.answer, "answer").total for t in texts])
    assert [r.total for r in o.group.rewards] == totals.tolist()
    assert torch.equal(o.group.advantages, grpo.group_advantages(totals, 4))
    assert o.group.rollout.completion_ids.shape[1] <= 10  # --max-new-tokens


def test_probabilities_are_completion_logprobs(opened):
    """Pass 1's log-probs are the start policy's, the reference's are the reference's, and pass 2's are the
    stepped policy's (all grpo.completion_logprobs at --temperature); pass 2's old_logp is pass 1's."""
    first, second = opened.passes
    start, ref = logprobs(opened.start, opened), logprobs(opened.reference, opened)
    after = logprobs(opened.policy, opened)
    torch.testing.assert_close(first.logp, start, rtol=0, atol=1e-6)
    torch.testing.assert_close(first.ref_logp, ref, rtol=0, atol=0)
    torch.testing.assert_close(second.logp, after, rtol=0, atol=1e-6)
    assert torch.equal(second.old_logp, first.logp) and torch.equal(second.ref_logp, first.ref_logp)
    assert not torch.allclose(start, after, atol=1e-3)  # the AdamW step moved the policy


def test_shares_sum_to_grpo_loss(opened):
    """For each pass, the shares sum to grpo.grpo_loss (beta 0.1, clip 0.2) recomputed from the log-probs,
    to 1e-6, and each share is the hand-written token term: (-min(r A, clip(r, 0.8, 1.2) A) + 0.1 k3) / n / N."""
    o, mask, A = opened, opened.group.rollout.mask, opened.group.advantages
    for p in o.passes:
        loss, _ = grpo.grpo_loss(p.logp, p.old_logp, p.ref_logp, A, mask, beta=0.1, clip=0.2)
        assert abs(p.share.sum().item() - loss.item()) < 1e-6 and p.loss == loss.item()
        N = mask.size(0)
        for i, j in mask.nonzero().tolist():
            r, d = (p.logp[i, j] - p.old_logp[i, j]).exp().item(), (p.ref_logp[i, j] - p.logp[i, j]).item()
            k3 = math.exp(d) - d - 1
            term = -min(r * A[i].item(), min(max(r, 0.8), 1.2) * A[i].item()) + 0.1 * k3
            assert p.share[i, j].item() == pytest.approx(term / mask[i].sum().item() / N, rel=1e-4, abs=1e-8)
        assert (p.share[~mask] == 0).all()
    first = o.passes[0]  # its surrogate shares -A/n/N sum to -mean(A) = 0: the loss is the KL part (the screen says so)
    kl_part, _ = grpo.grpo_loss(first.logp, first.logp, first.ref_logp, torch.zeros_like(A), mask, beta=0.1)
    assert abs(first.loss - kl_part.item()) < 1e-6 and kl_part > 0


def test_ratio_is_one_then_not_and_clip_marks(opened):
    """Pass 1: the ratio is exactly 1 on every token and nothing is clipped. Pass 2 (after one step at lr
    1e-2): the ratio differs from 1, the clip binds somewhere, and the marks are exactly where
    grpo.clipped_surrogate says it binds (with the ratio exp(logp - old_logp) recomputed here)."""
    first, second = opened.passes
    mask, A = opened.group.rollout.mask, opened.group.advantages
    assert torch.equal(first.ratio[mask], torch.ones(int(mask.sum()))) and not first.clipped.any()
    assert (second.ratio[mask] != 1).any()
    _, binds = grpo.clipped_surrogate(torch.exp(second.logp - first.logp), A, 0.2, 0.2)
    assert torch.equal(second.clipped, binds & mask) and second.clipped.any()
    assert second.clipped.sum() == second.metrics["clip_frac"] * second.metrics["tokens"]


def test_beta_zero_has_no_kl(opened):
    """With --beta 0 the shares sum to grpo_loss without a reference, and every KL term is 0."""
    o, p = opened, opened.passes[1]
    loss, _ = grpo.grpo_loss(p.logp, p.old_logp, None, o.group.advantages, o.group.rollout.mask, beta=0)
    ratio, kl, share, _ = laid.token_shares(p.logp, p.old_logp, None, o.group.advantages, o.group.rollout.mask, 0)
    assert abs(share.sum().item() - loss.item()) < 1e-6 and (kl == 0).all()


def test_seed_changes_the_group(opened, pitch_task):
    """--seed seeds the sampler: the same seed gives the same group, another seed another."""
    o, audio = opened, laid.load_question(opened.args.data, 1)[1]
    again = laid.sample_group(o.start, o.processor, o.group.sample, audio, o.args)
    other = laid.sample_group(o.start, o.processor, o.group.sample, audio,
                              laid.parse_args(flags(o.args.checkpoint, pitch_task, "--seed", "1")))
    assert torch.equal(again.rollout.completion_ids, o.group.rollout.completion_ids)
    assert other.texts != o.group.texts


def shown_tokens(screen):
    """The screen's token lines: '  {index} {repr(token)} ...'."""
    return [line for line in screen.splitlines() if re.match(r"\s+\d+ ['\"]", line)]


def distinct(group):
    """The first completion of each distinct token sequence (the screen shows the others as one line)."""
    ids, mask, seen = group.rollout.completion_ids, group.rollout.mask, {}
    return [i for i in range(len(ids)) if seen.setdefault(tuple(ids[i][mask[i]].tolist()), i) == i]


def test_screen(opened, warm_dir, tiny2_dir, pitch_task, capsys):
    """The printed screen shows each completion, the ratio-is-1 note, one line per token of each distinct
    completion (at most --tokens of them), and on a second pass one * per clipped token shown."""
    laid.main(flags(warm_dir, pitch_task, "--reference", str(tiny2_dir)))
    screen = capsys.readouterr().out
    assert "ratio is exactly 1" in screen and f"reference {tiny2_dir}" in screen
    assert all(repr(t)[:45] in screen for t in opened.group.texts)  # the same seed samples the same group
    rows, lengths = distinct(opened.group), opened.group.rollout.mask.sum(1)
    assert len(shown_tokens(screen)) == int(lengths[rows].sum())
    args = laid.parse_args(flags(warm_dir, pitch_task, "--num-iterations", "2", "--tokens", "2"))
    screen = laid.render(opened.group, opened.passes, opened.processor.tokenizer, args)
    assert "pass 2 (after 1 AdamW step" in screen and "p_old" in screen
    assert len(shown_tokens(screen)) == int(lengths[rows].clamp(max=2).sum())
    clipped = int(opened.passes[1].clipped[rows, :2].sum())
    assert clipped > 0 and sum(line.endswith(" *") for line in shown_tokens(screen)) == clipped
    laid.main(flags(warm_dir, pitch_task, "--beta", "0", "--max-new-tokens", "3"))
    assert "reference - (beta 0)" in capsys.readouterr().out


def test_reference_folder_rule(tmp_path, tiny2_dir):
    """A checkpoint-N beside a checkpoint-0 is compared with checkpoint-0; any other folder with itself;
    --reference wins."""
    for name in ("checkpoint-0", "checkpoint-50", "other"):
        (tmp_path / "run" / name).mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-0" / "config.json").write_text("{}")
    run = tmp_path / "run"
    assert laid.reference_dir(run / "checkpoint-50") == run / "checkpoint-0"
    assert laid.reference_dir(run / "other") == run / "other"
    (run / "checkpoint-0" / "config.json").unlink()
    assert laid.reference_dir(run / "checkpoint-50") == run / "checkpoint-50"
    assert laid.reference_dir(run / "checkpoint-50", tiny2_dir) == tiny2_dir


def test_bad_input_is_one_line(pitch_task, tmp_path):
    """A wrong flag or question stops with a UsageError naming it."""
    with pytest.raises(M.UsageError, match="--question 32: .* has 32 questions"):
        laid.load_question(pitch_task[0], 32)
    with pytest.raises(M.UsageError, match="--data "):
        laid.load_question(tmp_path / "missing.jsonl", 0)
    with pytest.raises(M.UsageError, match="--group-size 1: must be >= 2"):
        laid.parse_args(["x", "--group-size", "1"])
