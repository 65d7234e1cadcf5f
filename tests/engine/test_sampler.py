"""engine/sampler.py (prefill once, fork the KV cache into a preallocated one, a fixed-shape decode step)
against grpo.generate_groups, the plain sampler it replaces by default, and against a frozen copy of the
loop before the engine, which grew a DynamicCache by concatenation. Same seeds, same tokens; the decode
step traces whole."""

import pytest
import torch

import grpo
import model as M
from conftest import pitch_samples
from engine import sampler


# -----------------------------------------------------------------------------
# The frozen reference: grpo.sample_next and grpo.generate_groups as they were before decode.py

def old_sample_next(logits, generators, temperature=1.0, top_k=0, top_p=1.0):
    if top_k == 1 or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    rows = probs.size(0) // len(generators)
    noise = torch.cat([torch.empty(rows, probs.size(1), device=probs.device).exponential_(generator=g)
                       for g in generators])
    return (probs / noise).argmax(-1)


@torch.no_grad()
def old_generate_groups(model, batch, generators, group_size, max_new_tokens, end_ids, pad_id,
                        suppress_ids=(), temperature=1.0, top_k=50, top_p=1.0):
    G, ids, attn = group_size, batch["input_ids"], batch["attention_mask"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                      input_features=batch["input_features"],
                      feature_attention_mask=batch["feature_attention_mask"])
    cache = out.cache
    cache.batch_repeat_interleave(G)
    logits = model.lm_head(out.last_hidden_state[:, -1]).repeat_interleave(G, 0)
    attn = attn.repeat_interleave(G, 0)
    next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1
    suppress = torch.as_tensor(list(suppress_ids), dtype=torch.long, device=ids.device)
    end = torch.as_tensor(end_ids, device=ids.device)
    done = torch.zeros(ids.size(0) * G, dtype=torch.bool, device=ids.device)
    tokens = []
    for t in range(max_new_tokens):
        logits = logits.float().index_fill(-1, suppress, float("-inf"))
        tok = old_sample_next(logits, generators, temperature, top_k, top_p)
        tok = tok.masked_fill(done, pad_id)
        tokens.append(tok)
        done |= torch.isin(tok, end)
        if done.all() or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos,
                          cache=cache, use_cache=True)
        logits = model.lm_head(out.last_hidden_state[:, -1])
        next_pos = next_pos + 1
    completion_ids = torch.stack(tokens, dim=1)
    return completion_ids, grpo.completion_mask(completion_ids, end_ids)


# -----------------------------------------------------------------------------

# The random tiny model rarely samples its end tokens; 40 more end ids (about 9% of the vocabulary)
# make completions end at many lengths, so early ends and early stops are exercised.
EXTRA_ENDS = list(range(100, 140))


def both(tiny, n_prompts=3, G=4, max_new_tokens=12, seed=3, **kwargs):
    """(new rollout, (old ids, old mask)) from the same batch and the same seeds."""
    model, processor = tiny
    tok = processor.tokenizer
    batch = M.collate(processor, *pitch_samples(n_prompts))
    args = (G, max_new_tokens, M.end_token_ids(tok) + EXTRA_ENDS, tok.pad_token_id,
            M.suppressed_token_ids(tok, model.config.text_config.vocab_size))
    sampling = {k: v for k, v in kwargs.items() if k != "check_every"}
    new = sampler.generate_groups(model, batch, grpo.prompt_generators(seed, 0, range(n_prompts)), *args, **kwargs)
    old = old_generate_groups(model, batch, grpo.prompt_generators(seed, 0, range(n_prompts)), *args, **sampling)
    plain = grpo.generate_groups(model, batch, grpo.prompt_generators(seed, 0, range(n_prompts)), *args, **sampling)
    assert torch.equal(plain.completion_ids, old[0]) and torch.equal(plain.mask, old[1])
    return new, old


@pytest.mark.parametrize("sampling", [dict(), dict(top_k=0, top_p=0.8, check_every=1),
                                      dict(top_k=5, top_p=0.9, temperature=0.7, check_every=5)])
def test_same_tokens_as_the_plain_sampler(tiny, sampling):
    """3 prompts of different audio lengths (so different left padding), G = 4, 12 tokens: the engine, the
    plain sampler and the frozen loop give the same tokens and mask, column for column, under top-k, top-p,
    temperature, and any check_every.
    Completions of several lengths, some ending before the limit, so early stops are exercised."""
    new, (old_ids, old_mask) = both(tiny, **sampling)
    assert torch.equal(new.completion_ids, old_ids)
    assert torch.equal(new.mask, old_mask)
    lengths = new.mask.sum(1)
    assert len(set(lengths.tolist())) > 2 and lengths.min() < 12


def test_stops_when_every_row_has_ended(tiny):
    """A limit far beyond the longest completion: the loop stops within check_every tokens of the last
    end, and the result is cut back to the old loop's length (the longest completion), not the limit."""
    new, (old_ids, _) = both(tiny, n_prompts=2, G=3, max_new_tokens=200, seed=1)
    assert new.completion_ids.shape == old_ids.shape
    assert new.completion_ids.size(1) == new.mask.sum(1).max() < 200
    assert torch.equal(new.completion_ids, old_ids)


def test_decode_step_traces_whole_and_never_recompiles(tiny, monkeypatch):
    """The step keeps every shape and never syncs with the host: under torch.compile it traces as one graph
    (fullgraph=True fails on any graph break) and two rollouts of the same shapes, each with a new cache,
    compile it once (error_on_recompile); the tokens equal the eager loop's. dynamo's "eager" backend keeps
    this fast on the CPU (no code generation). The loop itself runs the step eagerly (docs/performance.md)."""
    torch._dynamo.reset()
    monkeypatch.setattr(sampler, "forward", torch.compile(sampler.forward, backend="eager", fullgraph=True))
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in (3, 4):
                new, (old_ids, _) = both(tiny, seed=seed)
                assert torch.equal(new.completion_ids, old_ids)
    finally:
        torch._dynamo.reset()


def test_fork_copies_the_prompt_cache_g_ways(tiny):
    """After the fork: N = B*G rows, the mask on exactly the prompt's real tokens, the next position one
    past the prompt's last, the next slot P; every row of a group holds its prompt's keys."""
    model, processor = tiny
    batch = M.collate(processor, *pitch_samples(2))
    B, P = batch["input_ids"].shape
    G, T = 3, 5
    with torch.no_grad():
        logits, state = sampler.prefill_and_fork(model, batch, G, T)
    assert logits.shape == (B * G, model.config.text_config.vocab_size)
    assert state.mask.shape == (B * G, 1, 1, P + T)
    real = batch["attention_mask"].sum(1).repeat_interleave(G)             # [N] prompt tokens per row
    assert torch.equal(state.mask.sum((1, 2, 3)), real) and not state.mask[..., P:].any()
    assert torch.equal(state.position[:, 0], real) and state.slot.tolist() == [P]
    keys = state.cache.layers[0].keys                                      # [N, kv heads, P + T, d]
    assert torch.equal(keys[0, :, :P], keys[G - 1, :, :P]) and not torch.equal(keys[0, :, :P], keys[G, :, :P])
    assert not keys[..., P:, :].any()
