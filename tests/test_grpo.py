"""grpo.py, R1-AQA's GRPO: the plain sampler and log-probs, the advantages and the loss, against slow
references and numbers derived by hand. (engine/'s fast versions are tested equal to these in tests/engine/.)"""

import math

import pytest
import torch

import grpo
import model as M
from conftest import pitch_samples
from engine import packed, sampler


def rollout_for(tiny, n_prompts=2, G=4, max_new_tokens=8, seed=0, step=0, first_index=0,
                generate=sampler.generate_groups, **sampling):
    """A rollout of the tiny model (the engine's sampler by default: the same tokens as grpo's, faster)."""
    model, processor = tiny
    tok = processor.tokenizer
    samples, audios = pitch_samples(first_index + n_prompts)
    batch = M.collate(processor, samples[first_index:], audios[first_index:])
    gens = grpo.prompt_generators(seed, step, range(first_index, first_index + n_prompts))
    return generate(model, batch, gens, G, max_new_tokens, M.end_token_ids(tok), tok.pad_token_id,
                    M.suppressed_token_ids(tok, model.config.text_config.vocab_size), **sampling)


def naive_logprobs(model, rollout, suppress_ids=()):
    """The slow reference: G separate [prompt, c_i] forwards through the model's own forward, with the
    audio encoded by the model every time, full logits everywhere (less suppress_ids)."""
    out = torch.zeros(rollout.completion_ids.shape)
    for n, (ids, mask) in enumerate(zip(rollout.completion_ids, rollout.mask)):
        b, k = n // rollout.group_size, int(mask.sum())
        prompt = rollout.prompt_ids[b]
        seq = torch.cat([prompt, ids[:k]])[None]
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq),
                       input_features=rollout.input_features[b:b + 1],
                       feature_attention_mask=rollout.feature_attention_mask[b:b + 1]).logits[0]
        P = len(prompt)
        logits[:, list(suppress_ids)] = float("-inf")
        out[n, :k] = logits[P - 1:P - 1 + k].float().log_softmax(-1).gather(-1, ids[:k, None]).squeeze(-1)
    return out


def test_completion_mask_keeps_tokens_through_first_end():
    """True up to and including the first end token; a completion without an end keeps everything."""
    END, PAD = 9, 0
    ids = torch.tensor([[5, 9, 0, 0],     # ends at t=1
                        [5, 6, 7, 8],     # never ends: all 4 kept
                        [9, 5, 9, 0]])    # ends at t=0; the later 9 is not trained on
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(grpo.completion_mask(ids, [END, PAD + 99]), expected)


def test_logprobs_equal_separate_forwards(tiny):
    """The plain log-probs (every completion after its prompt, one row each) = the model's own forward on
    each [prompt, c_i] alone, to 1e-5 in fp32. The prompts have different audio lengths (left padding in
    the batch), and completions have different lengths, so the right padding and the gather are checked."""
    model, _ = tiny
    rollout = rollout_for(tiny, n_prompts=3, G=4, max_new_tokens=10)
    assert len(set(rollout.mask.sum(1).tolist())) > 1, "want completions of several lengths"
    with torch.no_grad():
        plain = grpo.completion_logprobs(model, rollout, pad_id=0)
        naive = naive_logprobs(model, rollout)
    assert (plain - naive).abs().max() <= 1e-5
    assert (plain[~rollout.mask] == 0).all()


def test_logprobs_are_of_the_distribution_sampled_from(tiny):
    """With suppress_ids (the tokens sampling never draws), the log-probs equal the separate forwards'
    log-softmax without those tokens, to 1e-5: log p - log(1 - p(suppressed)). The random tiny model puts
    mass on them, so this differs from the full softmax: every sampled token's log-prob is higher (it is
    never one of them), and by more than 1e-3 somewhere. The engine's packed log-probs agree."""
    model, processor = tiny
    rollout = rollout_for(tiny, n_prompts=2, G=3, max_new_tokens=8)
    suppress = M.suppressed_token_ids(processor.tokenizer, model.config.text_config.vocab_size)
    with torch.no_grad():
        full = grpo.completion_logprobs(model, rollout, pad_id=0)
        sampled = grpo.completion_logprobs(model, rollout, pad_id=0, suppress_ids=suppress)
        fast = packed.completion_logprobs(model, rollout, pad_id=0, suppress_ids=suppress)
        naive = naive_logprobs(model, rollout, suppress)
    assert (sampled - naive).abs().max() <= 1e-5 and (fast - naive).abs().max() <= 1e-5
    assert (sampled[rollout.mask] >= full[rollout.mask]).all() and (sampled - full).max() > 1e-3


def test_logprobs_depend_on_the_audio(tiny):
    """The audio reaches the log-probs: other features give other numbers (the test above is not vacuous)."""
    model, _ = tiny
    rollout = rollout_for(tiny, n_prompts=1, G=2)
    with torch.no_grad():
        a = grpo.completion_logprobs(model, rollout, pad_id=0)
        rollout.input_features = rollout.input_features.flip(-1)
        b = grpo.completion_logprobs(model, rollout, pad_id=0)
    assert (a - b).abs().max() > 1e-3


def test_greedy_sampling_equals_generate(tiny):
    """top_k=1 decoding with the plain sampler gives model.generate's greedy tokens, row for row."""
    model, processor = tiny
    tok = processor.tokenizer
    rollout = rollout_for(tiny, n_prompts=3, G=2, max_new_tokens=12, top_k=1, generate=grpo.generate_groups)
    batch = M.collate(processor, *pitch_samples(3))
    ref = model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=M.end_token_ids(tok),
                         pad_token_id=tok.pad_token_id,
                         suppress_tokens=M.suppressed_token_ids(tok, model.config.text_config.vocab_size))
    ref = ref[:, batch["input_ids"].shape[1]:]
    ours = rollout.completion_ids[::2]  # the G copies are identical under greedy
    assert torch.equal(rollout.completion_ids[0::2], rollout.completion_ids[1::2])
    assert torch.equal(ours[:, :ref.shape[1]], ref)


def test_same_seed_same_completions_whatever_the_split(tiny):
    """Prompt i at step s samples from its own generator: 4 prompts at once, 2+2 or 1+1+1+1 agree."""
    plain = dict(generate=grpo.generate_groups)
    whole = rollout_for(tiny, n_prompts=4, G=3, seed=7, step=5, **plain)
    for size in (1, 2):
        parts = [rollout_for(tiny, n_prompts=size, G=3, seed=7, step=5, first_index=i, **plain)
                 for i in range(0, 4, size)]
        T = whole.completion_ids.shape[1]
        ids = torch.cat([torch.nn.functional.pad(p.completion_ids, (0, T - p.completion_ids.shape[1])) for p in parts])
        assert torch.equal(ids, whole.completion_ids)
    other_step = rollout_for(tiny, n_prompts=4, G=3, seed=7, step=6)
    assert not torch.equal(other_step.completion_ids[:, :4], whole.completion_ids[:, :4])


def test_sampler_respects_top_k_and_top_p():
    """top_k draws only from the k largest logits; top_p keeps the smallest set with mass >= p."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gens = [torch.Generator().manual_seed(0)]
    k2 = grpo.sample_next(logits, gens, top_k=2)
    assert set(k2.tolist()) == {0, 1}
    # p = 0.7: 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7, so {0, 1}; the renormalised share of 0 is 0.5/0.8
    p7 = grpo.sample_next(logits, gens, top_p=0.7)
    assert set(p7.tolist()) == {0, 1}
    assert abs((p7 == 0).float().mean().item() - 0.625) < 0.04
    # no filtering: all four appear, token 3 about 5% of the time
    full = grpo.sample_next(logits, gens, top_k=0)
    assert set(full.tolist()) == {0, 1, 2, 3} and abs((full == 3).float().mean().item() - 0.05) < 0.02


def test_group_advantages_by_hand():
    """rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735, so A = +-0.5 / 0.57745
    = +-0.86588. A group of equal rewards gives exactly 0, never NaN."""
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)
    assert abs(a - 0.86588) < 1e-5


def test_loss_and_kl_by_hand():
    """Two completions, lengths 2 and 1, ratio 1 (num_iterations 1), A = [1, -2], beta 0.04.
    ref - logp = [ln 2, 0] on completion 0 and [0] on completion 1.
    k3(ln 2) = 2 - ln 2 - 1 = 0.306853; k3(0) = 0.
    per-token loss = -A + beta * k3: [-1 + 0.012274, -1] and [2].
    sequence mean: ((-0.987726 - 1) / 2 + 2) / 2 = 0.503069.
    KL metric (token mean): 0.306853 / 3 = 0.102284."""
    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -7.0, -7.0]], requires_grad=True)
    ref = logp.detach() + torch.tensor([[math.log(2), 0.0, 3.0], [0.0, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0])
    loss, metrics = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.04)
    assert abs(loss.item() - 0.503069) < 1e-5
    assert abs(metrics["kl"].item() - 0.102284) < 1e-5
    assert metrics["clip_frac"].item() == 0 and metrics["ratio"].item() == 1
    # d loss / d logp[0, 0] = (-A + beta * dk3/dlogp) / len / N = (-1 + 0.04 * (1 - 2)) / 2 / 2 = -0.26
    loss.backward()
    assert abs(logp.grad[0, 0].item() + 0.26) < 1e-6
    assert logp.grad[0, 2].item() == 0 and logp.grad[1, 1].item() == 0  # masked tokens get no gradient
    half, _ = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.04, denominator=4)
    assert abs(half.item() - 0.503069 / 2) < 1e-5  # a global denominator of 4 sequences


def test_clip_binds_only_outside_the_trust_region():
    """ratio [1.5, 0.5, 1.1], eps 0.2. For A > 0 the clip binds only at 1.5 (1.2 < 1.5); for A < 0 only at
    0.5 (-0.8 < -0.5). Where it binds, the token's gradient is 0."""
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])).requires_grad_()
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, metrics = grpo.grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, beta=0.0)
    assert abs(metrics["clip_frac"].item() - 2 / 6) < 1e-6
    loss.backward()
    grad = logp.grad
    assert grad[0, 0] == 0 and grad[1, 1] == 0
    assert (grad[0, 1:] != 0).all() and grad[1, 0] != 0 and grad[1, 2] != 0
    # surrogate: A=+1 -> min(r, clip r) = [1.2, 0.5, 1.1]; A=-1 -> [-1.5, -0.8, -1.1]; loss = -mean of means
    expected = -((1.2 + 0.5 + 1.1) / 3 + (-1.5 - 0.8 - 1.1) / 3) / 2
    assert abs(loss.item() - expected) < 1e-6


def test_clip_acts_on_the_second_iteration(tiny_dir):
    """num_iterations 2: the first pass has ratio 1 (no clipping); after a large update the second pass
    over the same rollout sees ratios outside [0.8, 1.2] and clips exactly those in the binding direction."""
    model, processor = M.load(tiny_dir, dtype=torch.float32)
    rollout = rollout_for((model.eval(), processor), n_prompts=2, G=4)
    adv = torch.tensor([1.0, -1.0] * 4)
    old = grpo.completion_logprobs(model, rollout, 0).detach()
    opt = torch.optim.SGD(model.parameters(), lr=30.0)
    for it in range(2):
        logp = grpo.completion_logprobs(model, rollout, 0)
        loss, metrics = grpo.grpo_loss(logp, old, None, adv, rollout.mask, beta=0.0)
        ratio = torch.exp(logp.detach() - old)
        if it == 0:
            assert metrics["clip_frac"] == 0
        else:
            binding = ((ratio > 1.2) & (adv[:, None] > 0)) | ((ratio < 0.8) & (adv[:, None] < 0))
            expected = binding[rollout.mask].float().mean()
            assert expected > 0.05
            assert abs(metrics["clip_frac"] - expected) < 1e-6
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_learns_a_toy_reward(tiny2_dir, sign):
    """Reward = share of completion tokens with an even id (about 0.5 at random). 25 GRPO steps raise the
    mean reward well above 0.5; with the advantage sign flipped it falls instead. Same code as training."""
    torch.manual_seed(0)
    model, processor = M.load(tiny2_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    history = []
    for step in range(25):
        model.eval()
        rollout = rollout_for((model, processor), n_prompts=4, G=8, max_new_tokens=4, step=step)
        ids, mask = rollout.completion_ids, rollout.mask
        rewards = (((ids % 2 == 0) & mask).sum(1) / mask.sum(1)).float()  # [N]
        history.append(rewards.mean().item())
        model.train()
        logp = grpo.completion_logprobs(model, rollout, 0)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, sign * grpo.group_advantages(rewards, 8), mask, beta=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    start, end = sum(history[:5]) / 5, sum(history[-5:]) / 5
    if sign > 0:
        assert end > start + 0.2 and end > 0.75, history
    else:
        assert end < start - 0.2 and end < 0.25, history
