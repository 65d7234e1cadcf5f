"""R1-AQA's GRPO, written out by hand as pure functions of tensors; nothing here imports the project.

One step: generate_groups samples G completions per prompt, reward.py scores them, group_advantages
normalises the rewards within each group, completion_logprobs gives the log-prob of every sampled token
(policy with grad, frozen reference without), and grpo_loss is the clipped surrogate plus beta * KL.
The sampler and log-probs here are the plain versions, to be checked by eye; train.py runs engine/'s
faster ones by default, tested equal to these (`--engine plain` runs these). sft_loss is the paper's
supervised baseline on the same log-probs. Mask convention: True = this completion token is trained on.
Shapes: B prompts, G completions per prompt, N = B*G, T completion tokens, P prompt tokens, V vocab.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    """G sampled completions for each of B prompts: everything needed to score and train on them."""
    prompt_ids: list                      # B tensors [P_b], the prompts without padding
    input_features: torch.Tensor          # [B, mels, frames] log-mel features, one clip per prompt
    feature_attention_mask: torch.Tensor  # [B, frames] 1 = real audio frame
    completion_ids: torch.Tensor          # [N, T] sampled tokens, pad after the end
    mask: torch.Tensor                    # [N, T] bool, True = token is trained on
    group_size: int                       # G


# -----------------------------------------------------------------------------
# 1. Sampling a group

def completion_mask(ids, end_ids):
    """True for the tokens up to and including the first end token; a completion that never ends (it hit
    the length limit) keeps all its tokens."""
    is_end = torch.isin(ids, torch.as_tensor(end_ids, device=ids.device))  # [N, T]
    ends_before = is_end.long().cumsum(-1) - is_end.long()                 # [N, T] end tokens strictly before t
    return ends_before == 0                                                # [N, T]


def sample_next(logits, generators, temperature=1.0, top_k=0, top_p=1.0):
    """One token per row. Row block i (G rows) draws its noise from generators[i], so a prompt's samples
    depend only on its own generator. top_k == 1 or temperature == 0 is greedy."""
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
    # exponential race: argmax(p / E) with E ~ Exp(1) is a sample from p
    noise = torch.cat([torch.empty(rows, probs.size(1), device=probs.device).exponential_(generator=g)
                       for g in generators])                               # [N, V]
    return (probs / noise).argmax(-1)                                      # [N]


def prompt_generators(seed, step, prompt_indices, device="cpu"):
    """One generator per prompt, seeded from (run seed, step, the prompt's index in the global batch), so a
    prompt samples the same completions however the batch is split over micro-batches and processes."""
    mix = lambda i: ((seed * 1_000_003 + step) * 1_000_003 + int(i)) % 2**63
    return [torch.Generator(device).manual_seed(mix(i)) for i in prompt_indices]


@torch.no_grad()
def generate_groups(model, batch, generators, group_size, max_new_tokens, end_ids, pad_id, suppress_ids=(),
                    temperature=1.0, top_k=50, top_p=1.0):
    """G completions for each prompt of a left-padded batch (model.collate): every prompt repeated G times,
    then one token at a time through the model with Hugging Face's growing KV cache. A finished row emits
    pad. Returns a Rollout cut to the longest completion."""
    G, ids, attn = group_size, batch["input_ids"], batch["attention_mask"]  # [B, P], [B, P]
    rows = lambda x: x.repeat_interleave(G, 0)                             # [B, ...] -> [N, ...]
    attn, pos = rows(attn), rows((attn.cumsum(-1) - 1).clamp(min=0))       # [N, P] positions skip the padding
    out = model.model(input_ids=rows(ids), attention_mask=attn, position_ids=pos, use_cache=True,
                      input_features=rows(batch["input_features"]),
                      feature_attention_mask=rows(batch["feature_attention_mask"]))
    suppress = torch.as_tensor(list(suppress_ids), dtype=torch.long, device=ids.device)
    tokens = torch.full((attn.size(0), max_new_tokens), pad_id, device=ids.device)  # [N, T]
    done = torch.zeros(attn.size(0), dtype=torch.bool, device=ids.device)         # [N]
    for t in range(max_new_tokens):
        logits = model.lm_head(out.last_hidden_state[:, -1]).float()       # [N, V]
        tok = sample_next(logits.index_fill(-1, suppress, float("-inf")), generators, temperature, top_k, top_p)
        tokens[:, t] = tok.masked_fill(done, pad_id)                       # [N]
        done |= torch.isin(tokens[:, t], torch.as_tensor(end_ids, device=ids.device))
        if done.all():
            break
        attn, pos = F.pad(attn, (0, 1), value=1), pos[:, -1:] + 1          # [N, P+t+1], [N, 1]
        out = model.model(input_ids=tokens[:, t:t + 1], attention_mask=attn, position_ids=pos,
                          cache=out.cache, use_cache=True)
    mask = completion_mask(tokens[:, :t + 1], end_ids)                     # [N, t+1]
    T = int(mask.sum(1).max())                                             # the longest completion
    prompts = [row[m.bool()] for row, m in zip(ids, batch["attention_mask"])]
    return Rollout(prompts, batch["input_features"], batch["feature_attention_mask"],
                   tokens[:, :T].contiguous(), mask[:, :T].contiguous(), G)


# -----------------------------------------------------------------------------
# 3. Advantages (2, the rewards, is reward.py)

def group_advantages(rewards, group_size, eps=1e-4):
    """(r - group mean) / (group std + eps), unbiased std: how much better than its group a completion
    did. A group whose rewards are all equal gives exactly 0, so no gradient."""
    assert group_size >= 2, "GRPO needs at least 2 completions per group"
    r = rewards.view(-1, group_size)                                       # [B, G]
    centred = r - r.mean(1, keepdim=True)                                  # [B, G]
    return (centred / (r.std(1, keepdim=True) + eps)).flatten()            # [N]


# -----------------------------------------------------------------------------
# 4. Log-probs of the sampled tokens

def completion_logprobs(model, rollout, pad_id, temperature=1.0, suppress_ids=()):
    """log pi(token) of every completion token, fp32, 0 where the mask is False: each completion after its
    prompt as one row (the audio encoded once per row), right-padded, one forward over the N rows. The
    tokens sampling never draws (suppress_ids) are left out of the softmax: the distribution sampled from."""
    G, N, T = rollout.group_size, *rollout.completion_ids.shape
    prompts = [p for p in rollout.prompt_ids for _ in range(G)]                         # N prompts
    seqs = [torch.cat([p, c]) for p, c in zip(prompts, rollout.completion_ids)]         # N tensors [P_b + T]
    L = max(len(s) for s in seqs)
    ids = torch.stack([F.pad(s, (0, L - len(s)), value=pad_id) for s in seqs])          # [N, L]
    attn = torch.stack([torch.arange(L, device=ids.device) < len(s) for s in seqs]).long()  # [N, L]
    hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False,
                         input_features=rollout.input_features.repeat_interleave(G, 0),
                         feature_attention_mask=rollout.feature_attention_mask.repeat_interleave(G, 0),
                         ).last_hidden_state                                            # [N, L, H]
    # completion token j of row i is predicted by the state at position P_i - 1 + j
    at = torch.stack([len(p) - 1 + torch.arange(T, device=ids.device) for p in prompts])  # [N, T]
    states = hidden.gather(1, at[..., None].expand(-1, -1, hidden.size(-1)))           # [N, T, H]
    logits = model.lm_head(states).float() / temperature                               # [N, T, V]
    logits = logits.index_fill(-1, torch.as_tensor(list(suppress_ids), dtype=torch.long, device=ids.device),
                               float("-inf"))                                          # [N, T, V]
    logp = logits.log_softmax(-1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)  # [N, T]
    return logp.masked_fill(~rollout.mask, 0.0)                                        # [N, T]


# -----------------------------------------------------------------------------
# 5. The loss

def clipped_surrogate(ratio, advantages, clip_low, clip_high):
    """PPO's per-token objective, negated: -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A), and where
    the clip binds. ratio [N, T], advantages [N]."""
    adv = advantages[:, None]                                              # [N, 1]
    unclipped = ratio * adv                                                # [N, T]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv               # [N, T]
    return -torch.min(unclipped, clipped), clipped < unclipped             # [N, T], [N, T]


def k3_kl(logp, ref_logp):
    """KL(policy || reference) per token, the k3 estimator exp(ref - logp) - (ref - logp) - 1: unbiased
    and never negative."""
    delta = ref_logp - logp                                                # [N, T]
    return torch.exp(delta) - delta - 1                                    # [N, T]


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04, clip=0.2, denominator=None):
    """The clipped surrogate + beta * KL per token, each completion's tokens averaged, summed over the
    completions and divided by denominator (default: N; the whole batch's completions when this is a
    micro-batch of it). logp/old_logp/ref_logp [N, T] (ref_logp None when beta == 0), advantages [N].
    With one update per rollout old_logp is logp.detach(), so the ratio is exactly 1."""
    m = mask.float()                                                       # [N, T]
    ratio = torch.exp(logp - old_logp)                                     # [N, T]
    per_token, binds = clipped_surrogate(ratio, advantages, clip, clip)    # [N, T], [N, T]
    kl = k3_kl(logp, ref_logp) if beta != 0 else torch.zeros_like(logp)    # [N, T]
    if beta != 0:
        per_token = per_token + beta * kl
    per_sequence = (per_token * m).sum(1) / m.sum(1).clamp(min=1)          # [N]
    loss = per_sequence.sum() / (m.new_tensor(m.size(0)) if denominator is None else denominator)
    return loss, loss_metrics(kl, ratio, binds, m)


def loss_metrics(kl, ratio, binds, m):
    """Token means over the mask: the KL, the ratio, and how often the clip binds (at either bound, at the
    lower one where A < 0, at the upper one where A > 0)."""
    tokens, binds = m.sum().clamp(min=1), binds.float() * m                # [], [N, T]
    metrics = {"kl": (kl * m).sum() / tokens, "clip_frac": binds.sum() / tokens,
               "clip_frac_low": (binds * (ratio < 1)).sum() / tokens,
               "clip_frac_high": (binds * (ratio > 1)).sum() / tokens,
               "ratio": (ratio * m).sum() / tokens, "tokens": m.sum()}
    return {k: v.detach() for k, v in metrics.items()}


# -----------------------------------------------------------------------------
# 6. The supervised baseline, on the same log-probs

def sft_loss(logp, mask, denominator=None):
    """Cross-entropy of given target tokens (teacher forcing): the sum of -log p over the mask, divided by
    its number of tokens or by denominator (the whole batch's, for a micro-batch of it). answer_prob is
    the mean probability of a whole target."""
    m = mask.float()                                                       # [B, T]
    nll, tokens, rows = -(logp * m).sum(), m.sum(), mask.any(1)            # [], [], [B]
    loss = nll / (tokens.clamp(min=1) if denominator is None else denominator)
    answer_prob = ((logp * m).sum(1).exp() * rows).sum() / rows.sum().clamp(min=1)  # []
    metrics = {"nll": nll / tokens.clamp(min=1), "answer_prob": answer_prob, "tokens": tokens,
               "sequences": rows.sum().float()}
    return loss, {k: v.detach() for k, v in metrics.items()}
