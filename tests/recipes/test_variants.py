"""recipes/variants.py (advantage scale, clip-higher, per-sequence ratio, loss aggregation, overlong
filtering) and dynamic sampling's informative groups: each against a slow loop over sequences and tokens,
numbers derived by hand, and grpo.py's defaults (and the variants' loss at R1-AQA's settings) against a
frozen copy of the R1-AQA loss, bit for bit."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import grpo
import model as M
import train
from recipes import dynamic_sampling, variants

LENGTHS = [1, 4, 7, 2, 7, 5]  # N = 6 completions (B = 2 prompts, G = 3), T = 7, several lengths


# -----------------------------------------------------------------------------
# The frozen reference: group_advantages and grpo_loss as they were before the variants (R1-AQA's
# loss, TRL 0.15.2). Do not edit: the defaults must keep giving exactly these numbers.

def frozen_group_advantages(rewards, group_size, eps=1e-4):
    r = rewards.view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.flatten()


def frozen_grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04, clip_eps=0.2,
                     token_mean=False, denominator=None):
    m = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta != 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if token_mean:
        total, count = (per_token * m).sum(), m.sum()
    else:
        total, count = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum(), m.new_tensor(m.size(0))
    loss = total / (count if denominator is None else denominator)
    tokens = m.sum().clamp(min=1)
    metrics = {
        "kl": (kl * m).sum() / tokens,
        "clip_frac": ((clipped < unclipped).float() * m).sum() / tokens,
        "ratio": (ratio * m).sum() / tokens,
        "tokens": m.sum(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


# -----------------------------------------------------------------------------
# Random inputs and the slow reference

def random_batch(seed, dtype=torch.float64, lengths=LENGTHS, T=7):
    """Log-probs with old/ref shifted by ~0.3 nats per token plus ~0.3 per completion, so token and
    sequence ratios fall on both sides of both clip bounds; the mask from the lengths; garbage (not 0)
    beyond it, which must not leak in."""
    g = torch.Generator().manual_seed(seed)
    N = len(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]                  # [N, T]
    logp = -torch.rand(N, T, generator=g, dtype=dtype) * 3
    old = logp + (torch.randn(N, T, generator=g, dtype=dtype) + torch.randn(N, 1, generator=g, dtype=dtype)) * 0.3
    ref = logp + torch.randn(N, T, generator=g, dtype=dtype) * 0.3
    adv = torch.randn(N, generator=g, dtype=dtype)
    return logp.requires_grad_(), old, ref, adv, mask


def micro_batch(rewards):
    """The fields of a train.MicroBatch the advantages read: its rewards, every row trained on and counted."""
    n = len(rewards)
    return SimpleNamespace(rewards=rewards, rollout=SimpleNamespace(mask=torch.ones(n, 3, dtype=torch.bool)),
                           counted=torch.ones(n, dtype=torch.bool))


@pytest.fixture
def one_process_group():
    """A process group of one (the batch std is all-reduced over processes), ended after the test."""
    M.init_distributed(always=True)
    yield
    dist.destroy_process_group()


def slow_loss(logp, old, ref, adv, lengths, beta, clip_low, clip_high, aggregation, ratio_level,
              max_new_tokens):
    """The loss written as loops over completions and tokens, with PPO's case analysis instead of
    min/clamp: the clip binds (constant surrogate, no gradient) when A > 0 and r > 1 + clip_high, or
    A < 0 and r < 1 - clip_low."""
    N, tokens = len(lengths), sum(lengths)
    loss = 0.0
    for i, n in enumerate(lengths):
        a = adv[i].item()
        seq_ratio = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n)) / n)
        row = 0.0
        for t in range(n):
            r = seq_ratio if ratio_level == "sequence" else torch.exp(logp[i, t] - old[i, t])
            if a > 0 and r.item() > 1 + clip_high:
                surrogate = (1 + clip_high) * a
            elif a < 0 and r.item() < 1 - clip_low:
                surrogate = (1 - clip_low) * a
            else:
                surrogate = r * a
            d = ref[i, t] - logp[i, t]
            row = row - surrogate + beta * (torch.exp(d) - d - 1)
        if aggregation == "sequence_mean":
            loss = loss + row / n / N
        elif aggregation == "token_mean":
            loss = loss + row / tokens
        else:
            loss = loss + row / (N * max_new_tokens)
    return loss


# -----------------------------------------------------------------------------
# Defaults: R1-AQA bit for bit

@pytest.mark.parametrize("seed", [0, 1])
def test_default_loss_is_the_frozen_r1_aqa_loss_bit_for_bit(seed):
    """grpo.grpo_loss (clip 0.2) and the variants' loss at R1-AQA's settings (clip 0.2/0.2, ratio per
    token): the loss, its gradient and the old metrics are torch.equal to the frozen copy, in fp32, with
    and without the denominator override, with and without the KL term; the variants' loss also for the
    frozen copy's other aggregation (token_mean)."""
    for beta in (0.04, 0.0):
        for old_mode, new_mode in ((False, "sequence_mean"), (True, "token_mean")):
            for denominator in (None, torch.tensor(2.5)):
                logp, old, ref, adv, mask = random_batch(seed, torch.float32)
                ref = ref if beta else None
                want, want_m = frozen_grpo_loss(logp, old, ref, adv, mask, beta, 0.2, old_mode, denominator)
                (want_grad,) = torch.autograd.grad(want, logp)
                losses = [variants.loss(logp, old, ref, adv, mask, denominator, beta, 0.2, 0.2, new_mode, "token")]
                if old_mode is False:  # R1-AQA's aggregation: the core's own loss
                    losses.append(grpo.grpo_loss(logp, old, ref, adv, mask, beta, 0.2, denominator))
                for got, got_m in losses:
                    (got_grad,) = torch.autograd.grad(got, logp)
                    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
                    assert all(torch.equal(got_m[k], want_m[k]) for k in want_m)
                if old_mode is False and denominator is None:  # the plain default calls
                    for plain, _ in (grpo.grpo_loss(logp, old, ref, adv, mask, beta),
                                     variants.loss(logp, old, ref, adv, mask, beta=beta)):
                        assert torch.equal(plain, want)
    assert 0 < want_m["clip_frac"] < 1  # the random ratios do reach the clip


def test_default_advantages_are_the_frozen_ones_bit_for_bit():
    """grpo.group_advantages, and the run's default advantages (train.group_advantages, the recipe's
    "group" scale, per micro-batch), are torch.equal to the frozen copy, including a group of equal
    rewards (exactly 0) and non-integer rewards."""
    rewards = torch.cat([torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 1.0]),
                         torch.rand(12, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(grpo.group_advantages(rewards, 4), frozen_group_advantages(rewards, 4))
    (default,) = train.group_advantages([micro_batch(rewards)], 4)
    assert torch.equal(default, frozen_group_advantages(rewards, 4))


# -----------------------------------------------------------------------------
# Every variant against the slow loops

@pytest.mark.parametrize("aggregation", variants.AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", variants.RATIO_LEVELS)
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28), (3e-2, 4e-2)])
def test_loss_equals_slow_loops(aggregation, ratio_level, clip):
    """Every aggregation x ratio level x clip range, beta 0.04, fp64: the loss and its gradient equal
    the loops over completions and tokens to 1e-12. token_sum divides by N * max_new_tokens = 6 * 10,
    a constant larger than the 7 columns actually sampled."""
    clip_low, clip_high = clip
    fracs = []
    for seed in range(3):
        logp, old, ref, adv, mask = random_batch(seed)
        denominator = len(LENGTHS) * 10 if aggregation == "token_sum" else None
        got, metrics = variants.loss(logp, old, ref, adv, mask, denominator, 0.04, clip_low, clip_high,
                                     aggregation, ratio_level)
        (got_grad,) = torch.autograd.grad(got, logp)
        want = slow_loss(logp, old, ref, adv, LENGTHS, 0.04, clip_low, clip_high, aggregation, ratio_level, 10)
        (want_grad,) = torch.autograd.grad(want, logp)
        assert abs(got.item() - want.item()) < 1e-12
        assert (got_grad - want_grad).abs().max() < 1e-12
        assert (got_grad[~mask] == 0).all()  # nothing beyond a completion's end is trained
        assert torch.allclose(metrics["clip_frac_low"] + metrics["clip_frac_high"], metrics["clip_frac"])
        fracs.append(metrics["clip_frac"].item())
    assert 0 < sum(fracs) < len(fracs)  # the clip binds on some tokens and not on others


def test_sequence_ratio_by_hand():
    """Completion 0: 2 tokens with log(pi/pi_old) = [ln 2, 0], A = +1; completion 1: 1 token, ratio 0.9,
    A = -1. Clip 0.2 low / 0.28 high, beta 0, sequence_mean.
    Per sequence: r_0 = exp((ln 2 + 0) / 2) = sqrt 2 = 1.41421 > 1.28 so it clips to 1.28, and both of
    its tokens get gradient 0; r_1 = 0.9 > 0.8 is not clipped. loss = -(1.28 + -0.9) / 2 = -0.19.
    d loss / d logp[1, 0] = -A * r_1 / len / N = 0.9 / 1 / 2 = 0.45. clip_frac: 2 of 3 tokens, both high.
    Per token: ratios [2, 1] clip to [1.28, 1], mean 1.14; loss = -(1.14 - 0.9) / 2 = -0.12; token
    [0, 1] keeps gradient -A * 1 / 2 / 2 = -0.25; clip_frac 1 of 3."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -3.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(2), 0.0], [math.log(0.9), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = variants.loss(logp, old, None, adv, mask, beta=0.0, clip_low=0.2, clip_high=0.28, ratio_level="sequence")
    (grad,) = torch.autograd.grad(loss, logp)
    assert abs(loss.item() + 0.19) < 1e-12
    assert grad[0, 0] == 0 and grad[0, 1] == 0 and abs(grad[1, 0].item() - 0.45) < 1e-12
    assert abs(m["clip_frac"].item() - 2 / 3) < 1e-7 and abs(m["clip_frac_high"].item() - 2 / 3) < 1e-7  # fp32
    loss, m = variants.loss(logp, old, None, adv, mask, beta=0.0, clip_low=0.2, clip_high=0.28, ratio_level="token")
    (grad,) = torch.autograd.grad(loss, logp)
    assert abs(loss.item() + 0.12) < 1e-12
    assert grad[0, 0] == 0 and abs(grad[0, 1].item() + 0.25) < 1e-12
    assert abs(m["clip_frac"].item() - 1 / 3) < 1e-7


def test_clip_higher_by_hand():
    """Ratios 1.25 (A = +1) and 0.75 (A = -1), one token each. Symmetric 0.2: 1.25 clips to 1.2 and 0.75
    to 0.8, loss = -(1.2 - 0.8) / 2 = -0.2, clip_frac 1 (low 1/2, high 1/2). DAPO's 0.2 / 0.28: 1.25 <
    1.28 is free, loss = -(1.25 - 0.8) / 2 = -0.225, only the low bound binds (low 1/2, high 0). The
    symmetric case both through grpo.grpo_loss and the variants' loss."""
    logp = torch.log(torch.tensor([[1.25], [0.75]], dtype=torch.float64))
    old, mask, adv = torch.zeros(2, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, -1.0])
    for loss, m in (grpo.grpo_loss(logp, old, None, adv, mask, 0.0, 0.2),
                    variants.loss(logp, old, None, adv, mask, beta=0.0, clip_low=0.2, clip_high=0.2)):
        assert abs(loss.item() + 0.2) < 1e-12
        assert (m["clip_frac"].item(), m["clip_frac_low"].item(), m["clip_frac_high"].item()) == (1.0, 0.5, 0.5)
    loss, m = variants.loss(logp, old, None, adv, mask, beta=0.0, clip_low=0.2, clip_high=0.28)
    assert abs(loss.item() + 0.225) < 1e-12
    assert (m["clip_frac"].item(), m["clip_frac_low"].item(), m["clip_frac_high"].item()) == (0.5, 0.5, 0.0)


def test_token_sum_needs_a_denominator_and_bad_names_fail():
    """Dr. GRPO's constant cannot be guessed from the mask, so token_sum without a denominator stops;
    an unknown aggregation, ratio level or advantage scale names itself."""
    logp, old, ref, adv, mask = random_batch(0)
    with pytest.raises(AssertionError, match="denominator"):
        variants.loss(logp, old, ref, adv, mask, aggregation="token_sum")
    with pytest.raises(AssertionError, match="'seq_mean'"):
        variants.loss(logp, old, ref, adv, mask, aggregation="seq_mean")
    with pytest.raises(AssertionError, match="'word'"):
        variants.loss(logp, old, ref, adv, mask, ratio_level="word")
    with pytest.raises(AssertionError, match="'global'"):
        variants.scaled_advantages([micro_batch(adv)], 3, "global")


@pytest.mark.parametrize("aggregation", variants.AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", variants.RATIO_LEVELS)
def test_split_over_ranks_and_micro_batches_equals_one_batch(aggregation, ratio_level):
    """The caller's contract for the denominator: 8 completions split over 2 ranks x 2 micro-batches,
    each micro-batch's loss divided by (the whole batch's sequences, tokens, or sequences * 16) / 2,
    summed per rank and averaged over ranks (as FSDP averages gradients) equals the loss of the one
    batch, value and gradient, to 1e-12."""
    lengths, max_new_tokens, world = [3, 1, 7, 7, 2, 5, 4, 6], 16, 2
    logp, old, ref, adv, mask = random_batch(5, lengths=lengths)
    args = dict(beta=0.04, clip_low=0.2, clip_high=0.28, aggregation=aggregation, ratio_level=ratio_level)
    count = {"sequence_mean": mask.size(0), "token_mean": mask.sum(), "token_sum": mask.size(0) * max_new_tokens}
    whole_denominator = count[aggregation] if aggregation == "token_sum" else None
    whole, _ = variants.loss(logp, old, ref, adv, mask, denominator=whole_denominator, **args)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    split = 0.0
    for rows in ([0, 1], [2, 3], [4, 5], [6, 7]):  # rank 0: micro-batches 0, 1; rank 1: 2, 3
        part, _ = variants.loss(logp[rows], old[rows], ref[rows], adv[rows], mask[rows],
                                denominator=count[aggregation] / world, **args)
        split = split + part / world
    (split_grad,) = torch.autograd.grad(split, logp)
    assert abs(split.item() - whole.item()) < 1e-12
    assert (split_grad - whole_grad).abs().max() < 1e-12


# -----------------------------------------------------------------------------
# Advantages

def test_advantage_scales_by_hand(one_process_group):
    """rewards [1, 0, 0, 1 | 2, 2, 2, 0], G = 4. Centred: [.5, -.5, -.5, .5 | .5, .5, .5, -1.5].
    group: group 1 std sqrt(1/3) = 0.57735, group 2: squares .25 * 3 + 2.25 = 3, / 3 = 1, std 1.
    batch: all 8 rewards sum 8, squares 14, unbiased var (14 - 8^2 / 8) / 7 = 6/7, std 0.9258201.
    none: the centred rewards as they are."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    centred = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.5, 0.5, 0.5, -1.5])
    std = torch.tensor([math.sqrt(1 / 3)] * 4 + [1.0] * 4)
    scaled = lambda r, scale: variants.scaled_advantages([micro_batch(r)], 4, scale)[0]
    assert torch.allclose(grpo.group_advantages(rewards, 4), centred / (std + 1e-4), atol=1e-6)
    assert abs(math.sqrt(6 / 7) - 0.9258201) < 1e-7
    assert torch.allclose(scaled(rewards, "batch"), centred / (math.sqrt(6 / 7) + 1e-4), atol=1e-6)
    assert torch.equal(scaled(rewards, "none"), centred)
    assert torch.equal(scaled(torch.ones(8), "batch"), torch.zeros(8))  # no spread: 0, not NaN


def test_batch_std_over_two_ranks_equals_one_process(one_process_group, monkeypatch):
    """Ranks all-reduce reward_sums: the std from the summed sums, and so every advantage, is torch.equal
    to the one-process result (R1-AQA-style rewards 0, 1, 2 make the fp64 sums exact), and matches
    torch.std over the whole batch (the slow reference) to 1e-6, also for non-integer rewards. Each rank's
    all_reduce is played by adding the other rank's sums; one process's two micro-batches add up the same."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (32,), generator=g).float()          # 4 groups of 8 per rank
    (one,) = variants.scaled_advantages([micro_batch(rewards)], 8, "batch")
    halves = (rewards[:16], rewards[16:])
    two = []
    for rank, part in enumerate(halves):
        other = variants.reward_sums(halves[1 - rank])
        monkeypatch.setattr(dist, "all_reduce", lambda sums, other=other: sums.add_(other))
        two += variants.scaled_advantages([micro_batch(part)], 8, "batch")
    monkeypatch.undo()
    assert torch.equal(one, torch.cat(two))
    assert torch.equal(one, torch.cat(variants.scaled_advantages([micro_batch(h) for h in halves], 8, "batch")))
    for r in (rewards, torch.rand(32, generator=g)):
        summed = variants.reward_sums(r[:16]) + variants.reward_sums(r[16:])
        assert abs(variants.reward_std(summed) - r.std()) < 1e-6


def test_informative_groups_by_hand():
    """A group is informative when its rewards are not all equal: [1,1,1] no, [1,0,1] yes, [0,0,0] no,
    [2,2,1.5] yes. Exactly the groups whose advantages are not all 0."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 1.5])
    keep = dynamic_sampling.informative_groups(rewards, 3)
    assert keep.tolist() == [False, True, False, True]
    assert torch.equal(keep, (grpo.group_advantages(rewards, 3).view(4, 3) != 0).any(1))


# -----------------------------------------------------------------------------
# Overlong filtering

def test_mask_truncated_drops_only_completions_without_an_end():
    """End ids {9, 8}. Row 0 ends at t=1 and row 3 at the very last token: kept as they are. Row 1 never
    ends (hit the limit): dropped. Row 2 holds a 9 only beyond its mask (already masked out): dropped.
    Row 4 ends with the other end id 8: kept."""
    END, OTHER = 9, 8
    ids = torch.tensor([[5, END, 0, 0], [5, 6, 7, 5], [5, 6, 7, END], [5, 6, 7, END], [OTHER, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    expected = mask.clone()
    expected[1:3] = False
    rollout = SimpleNamespace(completion_ids=ids, mask=mask)  # the fields of a grpo.Rollout it reads
    assert torch.equal(variants.mask_truncated(rollout, [END, OTHER]), expected)
