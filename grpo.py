"""GRPO (group relative policy optimization) for an audio language model, written out by hand.

One GRPO step, read top to bottom:
  1. generate_groups: for each prompt, sample G completions. The audio is encoded once and the
     prompt prefilled once; its KV cache is then forked G ways into a preallocated cache and
     decoded token by token (decode.py: a step of fixed shapes, no host sync inside the loop).
  2. (the caller scores each completion with reward.py)
  3. group_advantages: normalise the rewards within each group: A = (r - mean) / (std + 1e-4).
  4. completion_logprobs: the log-prob of every sampled token, from ONE forward per group over
     the packed sequence [prompt, c_1, ..., c_G]. The same function serves the policy (with grad)
     and the frozen reference (no grad). Its attention (attention.py) skips the pairs no completion
     sees with FlexAttention on CUDA, and takes a dense mask elsewhere.
  5. grpo_loss: the clipped surrogate plus beta * KL(policy || reference), k3 estimator.
     Variants sit beside the step they change, R1-AQA's choices the defaults: in 3, which std
     (group, batch, none) and which groups are informative (dynamic sampling); in 5, clip-higher,
     a per-sequence ratio (GSPO), three aggregations and overlong filtering.

Mask convention, used everywhere: True = this completion token is trained on, i.e. every token up
to and including the first end token (see completion_mask). Shapes: B prompts, G completions per
prompt, N = B*G completions, T completion length, P prompt length, L packed length, V vocab.

The functions take the Hugging Face Qwen2AudioForConditionalGeneration and call its two halves,
`model.model` (audio encoder + projector + language model -> hidden states) and `model.lm_head`,
so that the vocabulary projection runs only where a completion token is predicted. This file knows
nothing of the rest of the project; it imports only its two engine pieces, decode.py (the KV cache
and the decode step) and attention.py (the packed mask), which import only torch and transformers,
so that the loop here reads as the algorithm. 6. sft_loss is the supervised baseline the paper
compares GRPO with, on the same log-probs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attention
import decode


@dataclass
class Rollout:
    """G sampled completions for each of B prompts, everything needed to score and train on them."""
    prompt_ids: list           # B tensors [P_b], the prompts without padding
    input_features: torch.Tensor          # [B, mels, frames] log-mel features, one clip per prompt
    feature_attention_mask: torch.Tensor  # [B, frames] 1 = real audio frame
    completion_ids: torch.Tensor          # [N, T] sampled tokens, pad after the end
    mask: torch.Tensor                    # [N, T] bool, True = token is trained on
    group_size: int                       # G


# -----------------------------------------------------------------------------
# 1. Sampling a group

def completion_mask(ids, end_ids):
    """The one mask: True for tokens up to and including the first end token. A completion that
    never ends (hit the length limit) keeps all its tokens."""
    is_end = torch.isin(ids, torch.as_tensor(end_ids, device=ids.device))  # [N, T]
    ends_before = is_end.long().cumsum(-1) - is_end.long()                 # [N, T] end tokens strictly before t
    return ends_before == 0                                                # [N, T]


def sample_next(logits, generators, temperature=1.0, top_k=0, top_p=1.0):
    """Draw one token per row. Row block i (G rows) draws its noise from generators[i], so a
    prompt's samples depend only on its own generator, not on the rest of the batch.
    top_k == 1 or temperature == 0 is greedy."""
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)                                           # [N]
    logits = logits.float() / temperature                                  # [N, V]
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                    # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))           # [N, V]
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)        # [N, V]
        sorted_probs = sorted_logits.softmax(-1)                           # [N, V]
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p              # [N, V] the mass before it is already > p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back to vocab order
    probs = logits.softmax(-1)                                             # [N, V]
    rows = probs.size(0) // len(generators)
    # Exponential race: argmax(p / E) with E ~ Exp(1) is a sample from p (as in gpt-fast).
    noise = torch.cat([torch.empty(rows, probs.size(1), device=probs.device).exponential_(generator=g)
                       for g in generators])                                # [N, V]
    return (probs / noise).argmax(-1)                                      # [N]


@torch.no_grad()
def generate_groups(model, batch, generators, group_size, max_new_tokens, end_ids, pad_id,
                    suppress_ids=(), temperature=1.0, top_k=50, top_p=1.0, check_every=8):
    """Sample group_size completions for each prompt of a left-padded batch (from model.collate).
    Encode + prefill once per prompt, fork the KV cache G ways into a preallocated one, decode
    (decode.py). Finished rows emit pad; the host asks whether all rows have finished only every
    check_every tokens (each question waits for the device), and the result is cut back to the
    longest completion, so the tokens do not depend on check_every. Returns a Rollout."""
    logits, state = decode.prefill_and_fork(model, batch, group_size, max_new_tokens)  # [N, V]
    N, device = logits.size(0), logits.device
    suppress = torch.as_tensor(list(suppress_ids), dtype=torch.long, device=device)
    end = torch.as_tensor(end_ids, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)                # [N]
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [N, T]
    for t in range(max_new_tokens):
        logits = logits.float().index_fill(-1, suppress, float("-inf"))   # [N, V]
        tok = sample_next(logits, generators, temperature, top_k, top_p)   # [N]
        tok = tok.masked_fill(done, pad_id)                                # [N] finished rows emit pad
        tokens[:, t] = tok
        done |= torch.isin(tok, end)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and done.all()):
            break
        logits = decode.step(model, state, tok)                            # [N, V]
    mask = completion_mask(tokens[:, :t + 1], end_ids)                     # [N, t+1]
    T = int(mask.sum(1).max())                                             # the longest completion
    prompts = [row[m.bool()] for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    return Rollout(prompts, batch["input_features"], batch["feature_attention_mask"],
                   tokens[:, :T].contiguous(), mask[:, :T].contiguous(), group_size)


def prompt_generators(seed, step, prompt_indices, device="cpu"):
    """One generator per prompt, seeded from (run seed, step, the prompt's global index), so the same
    prompt at the same step samples the same completions however the batch is split."""
    mix = lambda i: ((seed * 1_000_003 + step) * 1_000_003 + int(i)) % 2**63
    return [torch.Generator(device).manual_seed(mix(i)) for i in prompt_indices]


# -----------------------------------------------------------------------------
# 3. Advantages

ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(rewards, group_size, scale="group", batch_std=None, eps=1e-4):
    """(r - group mean) / (std + eps), unbiased std. Equal rewards in a group give exactly 0.
    scale "group": the group's std (R1-AQA). "batch": the std of all the batch's rewards (Lite PPO,
    "Tricks or Traps?", arXiv 2508.08221), so a group whose rewards barely differ is not blown up.
    "none": no division (Dr. GRPO, Liu et al., arXiv 2503.20783), so too easy or too hard prompts
    (tiny std) are not over-weighted. batch_std: the global std, reward_std of reward_sums summed
    over ranks; None = these rewards are the whole batch."""
    assert group_size >= 2, "GRPO needs at least 2 completions per group"
    assert scale in ADVANTAGE_SCALES, f"advantage scale {scale!r}: use one of {ADVANTAGE_SCALES}"
    r = rewards.view(-1, group_size)                                       # [B, G]
    centred = r - r.mean(1, keepdim=True)                                  # [B, G]
    if scale == "group":
        std = r.std(1, keepdim=True)                                       # [B, 1]
    elif scale == "batch":
        std = reward_std(reward_sums(rewards)) if batch_std is None else batch_std  # []
    else:
        return centred.flatten()                                           # [N] "none"
    return (centred / (std + eps)).flatten()                               # [N]


def reward_sums(rewards):
    """[count, sum, sum of squares] of the rewards, fp64: what ranks all-reduce for the batch std."""
    r = rewards.double()                                                   # [N]
    return torch.stack([r.new_tensor(r.numel()), r.sum(), (r * r).sum()])  # [3]


def reward_std(sums):
    """Unbiased std of all the rewards behind sums (reward_sums, summed over ranks) as fp32."""
    n, s, sq = sums.unbind()
    return ((sq - s * s / n) / (n - 1)).clamp(min=0).sqrt().float()        # []


def informative_groups(rewards, group_size):
    """Groups whose rewards are not all equal [B]; the others have advantage 0 and give no policy
    gradient (DAPO's dynamic sampling, Yu et al., arXiv 2503.14476, trains only on these)."""
    r = rewards.view(-1, group_size)                                       # [B, G]
    return (r != r[:, :1]).any(1)                                          # [B]


# -----------------------------------------------------------------------------
# 4. Log-probs of the completions, one packed forward per group

@dataclass
class Packed:
    """B rows [prompt_b, c_b1, ..., c_bG], each completion cut at its mask, right-padded to L."""
    input_ids: torch.Tensor       # [B, L]
    position_ids: torch.Tensor    # [B, L] restart after the prompt for every completion
    segments: torch.Tensor        # [B, L] 0 = prompt, i = completion i, -1 = pad (attention.visible)
    source: torch.Tensor          # [N, T] flat index into [B*L] of the state predicting each token


def pack_groups(rollout, pad_id):
    """Lay out each group as one sequence in which every completion sees the prompt and its own past."""
    # index bookkeeping on the CPU; completion_logprobs moves the result to the model's device once
    G, comp, mask = rollout.group_size, rollout.completion_ids.cpu(), rollout.mask.cpu()
    lengths = mask.sum(1).tolist()                                         # N completion lengths
    rows, positions, segments, source = [], [], [], torch.zeros_like(comp)
    for b, prompt in enumerate(p.cpu() for p in rollout.prompt_ids):
        P = len(prompt)
        row, pos, seg = [prompt], [torch.arange(P)], [torch.zeros(P, dtype=torch.long)]
        start = P
        for i in range(G):
            n = lengths[b * G + i]
            row.append(comp[b * G + i, :n])
            pos.append(torch.arange(P, P + n))
            seg.append(torch.full((n,), i + 1))
            # token j is predicted by the completion's token j-1, token 0 by the last prompt state
            src = start - 1 + torch.arange(n)
            src[:1] = P - 1
            source[b * G + i, :n] = src
            start += n
        rows.append(torch.cat(row)), positions.append(torch.cat(pos)), segments.append(torch.cat(seg))
    L = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (0, L - len(r)), value=pad_id) for r in rows])        # [B, L]
    pos = torch.stack([F.pad(p, (0, L - len(p))) for p in positions])                 # [B, L]
    seg = torch.stack([F.pad(s, (0, L - len(s)), value=-1) for s in segments])        # [B, L] -1 = pad
    source += torch.arange(len(rows)).repeat_interleave(G)[:, None] * L                # [N, T] flat index
    return Packed(ids, pos, seg, source * mask)


def completion_logprobs(model, rollout, pad_id, temperature=1.0, flex=None, suppress_ids=()):
    """log pi(token) of every completion token, fp32, 0 where the mask is False. The audio is
    encoded once per group, and lm_head + log_softmax run only at completion-predicting positions.
    flex: attention through a FlexAttention BlockMask (True) or a dense [B, 1, L, L] mask (False);
    None = attention.flex_default: FlexAttention on CUDA, the dense mask elsewhere.
    suppress_ids: the tokens sampling never draws (generate_groups' suppress_ids), left out of the
    softmax here too: these are then the log-probs of the distribution the completions came from.
    Otherwise mass on those tokens is invisible to the loss, and pushed there by it (README)."""
    packed = pack_groups(rollout, pad_id)
    device = rollout.completion_ids.device
    flex = attention.flex_default(device) if flex is None else flex
    hidden = model.model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                         attention_mask=attention.packed_mask(model, packed.segments.to(device), flex),
                         use_cache=False, input_features=rollout.input_features,
                         feature_attention_mask=rollout.feature_attention_mask).last_hidden_state  # [B, L, H]
    mask = rollout.mask                                                    # [N, T]
    states = hidden.flatten(0, 1)[packed.source.to(device)[mask]]          # [M, H] M = trained tokens
    logits = model.lm_head(states).float() / temperature                   # [M, V]
    if len(suppress_ids):
        logits = logits.index_fill(-1, torch.as_tensor(list(suppress_ids), device=device), float("-inf"))
    token_logp = logits.log_softmax(-1).gather(-1, rollout.completion_ids[mask][:, None]).squeeze(-1)  # [M]
    return torch.zeros(mask.shape, device=device, dtype=token_logp.dtype).masked_scatter(mask, token_logp)  # [N, T]


# -----------------------------------------------------------------------------
# 5. The loss

AGGREGATIONS = ("sequence_mean", "token_mean", "token_sum")
RATIO_LEVELS = ("token", "sequence")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04, clip_low=0.2, clip_high=0.2,
              aggregation="sequence_mean", denominator=None, ratio_level="token"):
    """Clipped surrogate + beta * KL, per token, aggregated over the mask.

    logp/old_logp/ref_logp: [N, T] log-probs of the sampled tokens (policy with grad, policy at
    sampling time, frozen reference; ref_logp may be None when beta == 0). advantages: [N].
    KL uses the k3 estimator, exp(ref - logp) - (ref - logp) - 1, which is unbiased and always >= 0
    (J. Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html).
    The ratio is clipped to [1 - clip_low, 1 + clip_high]; clip-higher (DAPO, Yu et al., arXiv
    2503.14476: 0.2 and 0.28) lets unlikely tokens with A > 0 grow further, against entropy collapse.
    ratio_level and aggregation: see importance_ratio and aggregate. Returns (loss, metrics)."""
    m = mask.float()                                                       # [N, T]
    ratio = importance_ratio(logp, old_logp, m, ratio_level)               # [N, T] exactly 1 when old = logp.detach()
    adv = advantages[:, None]                                              # [N, 1]
    unclipped = ratio * adv                                                # [N, T]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv               # [N, T]
    per_token = -torch.min(unclipped, clipped)                             # [N, T]
    kl = torch.zeros_like(logp)
    if beta != 0:
        delta = ref_logp - logp                                            # [N, T]
        kl = torch.exp(delta) - delta - 1                                  # [N, T] k3
        per_token = per_token + beta * kl
    loss = aggregate(per_token, m, aggregation, denominator)
    tokens = m.sum().clamp(min=1)
    binds = (clipped < unclipped).float() * m                              # [N, T] where the clip binds
    metrics = {
        "kl": (kl * m).sum() / tokens,                                      # token mean
        "clip_frac": binds.sum() / tokens,                                 # at either bound
        "clip_frac_low": (binds * (ratio < 1)).sum() / tokens,             # at 1 - clip_low (A < 0)
        "clip_frac_high": (binds * (ratio > 1)).sum() / tokens,            # at 1 + clip_high (A > 0)
        "ratio": (ratio * m).sum() / tokens,
        "tokens": m.sum(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def importance_ratio(logp, old_logp, m, level="token"):
    """pi / pi_old per token, or per sequence (GSPO, Zheng et al., arXiv 2507.18071): exp of the mean
    token log-ratio, one weight per completion like its reward, clipped as one, so per-token noise
    does not pile up over long completions. GSPO clips far tighter: clip_low 3e-4, clip_high 4e-4,
    beta 0. Every token carries its sequence's ratio, so sequence_mean gives GSPO's loss and the
    other aggregations weigh sequences by length; the KL term stays per token."""
    assert level in RATIO_LEVELS, f"ratio level {level!r}: use one of {RATIO_LEVELS}"
    if level == "token":
        return torch.exp(logp - old_logp)                                  # [N, T]
    log_ratio = ((logp - old_logp) * m).sum(1) / m.sum(1).clamp(min=1)    # [N] mean over the mask
    return torch.exp(log_ratio)[:, None].expand_as(logp)                   # [N, T] equal along a row


def aggregate(per_token, m, aggregation="sequence_mean", denominator=None):
    """One loss from per-token losses [N, T] over the mask m, divided by a count:
      sequence_mean: sum of each completion's token mean / N sequences (R1-AQA, TRL 0.15).
      token_mean: sum over all tokens / number of tokens (DAPO): every token weighs the same, so
        long completions are not diluted.
      token_sum: sum over all tokens / (N * max_new_tokens) (Dr. GRPO): a constant, so neither short
        right nor long wrong completions are favoured. denominator is required.
    The sequences counted are all N rows, trained on or not: a row with an empty mask (a truncated
    completion under mask_truncated) adds 0 to the sum but still counts, as in TRL.
    denominator replaces the count when one batch is split over micro-batches and ranks (FSDP
    averages gradients over ranks): the batch's sequences, tokens, or sequences * max_new_tokens,
    summed over all ranks and divided by the world size."""
    assert aggregation in AGGREGATIONS, f"aggregation {aggregation!r}: use one of {AGGREGATIONS}"
    assert aggregation != "token_sum" or denominator is not None, "token_sum needs a denominator"
    if aggregation == "sequence_mean":
        total, count = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum(), m.new_tensor(m.size(0))
    else:
        total, count = (per_token * m).sum(), m.sum()
    return total / (count if denominator is None else denominator)


def mask_truncated(mask, completion_ids, end_ids):
    """The mask without the completions that never ended within the length limit (DAPO's overlong
    filtering, arXiv 2503.14476): a cut-off answer is left out instead of being scored as wrong. It is
    left out of training only: the loss's count of sequences and the batch std still include it."""
    is_end = torch.isin(completion_ids, torch.as_tensor(end_ids, device=completion_ids.device))  # [N, T]
    ended = (is_end & mask).any(1, keepdim=True)                           # [N, 1]
    return mask & ended                                                    # [N, T]


# -----------------------------------------------------------------------------
# 6. The supervised baseline, on the same log-probs

def sft_loss(logp, mask, denominator=None):
    """Cross-entropy of given target tokens (teacher forcing, the paper's SFT rows): the sum of -log p
    over the mask divided by the number of its tokens, or by denominator (the global batch's tokens /
    world size, when a batch is split over micro-batches and ranks, as in grpo_loss). The prompt is never
    in the mask, so only the answer is learned. Returns (loss, metrics); answer_prob is the mean
    probability of a whole target."""
    m = mask.float()                                                       # [B, T]
    nll = -(logp * m).sum()                                                # []
    tokens, rows = m.sum(), mask.any(1)                                    # [], [B]
    loss = nll / (tokens.clamp(min=1) if denominator is None else denominator)
    answer_prob = ((logp * m).sum(1).exp() * rows).sum() / rows.sum().clamp(min=1)  # []
    metrics = {"nll": nll / tokens.clamp(min=1), "answer_prob": answer_prob, "tokens": tokens,
               "sequences": rows.sum().float()}
    return loss, {k: v.detach() for k, v in metrics.items()}
