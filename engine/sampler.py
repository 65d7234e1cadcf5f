"""The fast group sampler: encode and prefill each prompt once, fork its KV cache G ways into a
preallocated cache, and decode with a step of fixed shapes (as in gpt-fast).

A decoded token is written in place into a transformers StaticCache with room for every new token (a
growing cache copies itself at every token), and the attention mask is preallocated too. The step never
waits for the device (no .item(), no branch on a tensor), so torch.compile can trace it whole; the host
asks whether every row has finished only every check_every tokens. It runs eagerly: under FSDP2 each
unit's hooks break a compiled step apart (docs/performance.md).
generate_groups has the signature of grpo.generate_groups and gives the same tokens for the same generators
(tests/engine/test_sampler.py).
"""

from dataclasses import dataclass

import torch
from transformers import StaticCache

import grpo


@dataclass
class DecodeState:
    """Everything the decode step reads and updates in place, for N = B*G rows."""
    cache: StaticCache      # N rows, room for P + max_new_tokens positions
    mask: torch.Tensor      # [N, 1, 1, P + max_new_tokens] bool, True = a key the next token may see
    position: torch.Tensor  # [N, 1] the next token's position id
    slot: torch.Tensor      # [1] the cache slot the next token's key goes to: P + tokens decoded so far


def prefill_and_fork(model, batch, group_size, max_new_tokens):
    """Encode the audio and prefill the left-padded prompts once (B rows), then fork: the prompt's cache
    copied G ways into a StaticCache of N rows. Returns (the first token's logits [N, V], DecodeState).
    The prefill's own cache is emptied layer by layer as it is copied."""
    G, ids, attn = group_size, batch["input_ids"], batch["attention_mask"]  # [B, P], [B, P]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                               # [B, P] positions skip the left padding
    out = model.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                      input_features=batch["input_features"],
                      feature_attention_mask=batch["feature_attention_mask"])
    N, P = ids.size(0) * G, ids.size(1)
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    prompt_layers = out.cache.layers  # the prefill's own cache, ours to empty
    for i in range(len(prompt_layers)):
        # the static layer is allocated at its first update, and each prompt layer dropped once copied:
        # the two caches together never hold much more than the static one
        keys, values, prompt_layers[i] = prompt_layers[i].keys, prompt_layers[i].values, None
        cache.update(keys.repeat_interleave(G, 0), values.repeat_interleave(G, 0), i)  # [N, kv heads, P, d]
    mask = torch.zeros(N, 1, 1, P + max_new_tokens, dtype=torch.bool, device=ids.device)
    mask[..., :P] = attn.bool().repeat_interleave(G, 0)[:, None, None]     # [N, 1, 1, P] the prompt's padding
    state = DecodeState(cache, mask, pos[:, -1:].repeat_interleave(G, 0) + 1, torch.tensor([P], device=ids.device))
    return model.lm_head(out.last_hidden_state[:, -1]).repeat_interleave(G, 0), state  # [N, V]


def forward(model, tokens, mask, position, cache):
    """One token per row through the language model, writing its keys and values into the cache:
    [N, 1] -> next-token logits [N, V]. Shapes never change from token to token."""
    hidden = model.model(input_ids=tokens, attention_mask=mask, position_ids=position, cache=cache,
                         use_cache=True).last_hidden_state                 # [N, 1, H]
    return model.lm_head(hidden[:, -1])                                    # [N, V]


def step(model, state, tokens):
    """Feed the tokens just sampled [N]; returns the logits of the next ones [N, V]. The new slot is switched
    on in the mask before the forward: a token sees itself."""
    state.mask.index_fill_(-1, state.slot, True)                           # [N, 1, 1, S]
    logits = forward(model, tokens[:, None], state.mask, state.position, state.cache)  # [N, V]
    state.position.add_(1)
    state.slot.add_(1)
    return logits


@torch.no_grad()
def generate_groups(model, batch, generators, group_size, max_new_tokens, end_ids, pad_id, suppress_ids=(),
                    temperature=1.0, top_k=50, top_p=1.0, check_every=8):
    """grpo.generate_groups, fast: one prefill per prompt, the cache forked G ways, a fixed-shape decode
    step. Finished rows emit pad; the result is cut back to the longest completion, so the tokens do not
    depend on check_every. Returns a grpo.Rollout."""
    logits, state = prefill_and_fork(model, batch, group_size, max_new_tokens)  # [N, V]
    N, device = logits.size(0), logits.device
    suppress = torch.as_tensor(list(suppress_ids), dtype=torch.long, device=device)
    end = torch.as_tensor(end_ids, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)                # [N]
    tokens = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [N, T]
    for t in range(max_new_tokens):
        logits = logits.float().index_fill(-1, suppress, float("-inf"))   # [N, V]
        tok = grpo.sample_next(logits, generators, temperature, top_k, top_p).masked_fill(done, pad_id)  # [N]
        tokens[:, t] = tok
        done |= torch.isin(tok, end)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and done.all()):
            break
        logits = step(model, state, tok)                                   # [N, V]
    mask = grpo.completion_mask(tokens[:, :t + 1], end_ids)                # [N, t+1]
    T = int(mask.sum(1).max())                                             # the longest completion
    prompts = [row[m.bool()] for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    return grpo.Rollout(prompts, batch["input_features"], batch["feature_attention_mask"],
                        tokens[:, :T].contiguous(), mask[:, :T].contiguous(), group_size)
