"""Decoding G completions per prompt from one prefill: a preallocated KV cache and a decode step of
fixed shapes (as in gpt-fast).

The idea: after the prompt is prefilled once, its keys and values are copied G ways into a
transformers StaticCache with room for every new token, so a decoded token is written in place
(a growing cache would copy itself at every token). The attention mask is preallocated too: the
prompt's padding, and one more cache slot switched on per token. Every tensor the step touches
keeps its shape and address, and the step never waits for the device (no .item(), no Python
branch on a tensor), so torch.compile can trace it whole and CUDA graphs can replay it.
Compilation is opt-in (compile_options); tests/test_decode.py traces it on the CPU with dynamo's
"eager" backend and fullgraph=True, which fails on any graph break or recompilation.

    (imported by grpo.py: grpo.generate_groups is the sampling loop)
"""

import functools
from dataclasses import dataclass

import torch
from transformers import StaticCache


@dataclass
class DecodeState:
    """Everything the decode step reads and updates in place, for N = B*G rows."""
    cache: StaticCache      # N rows, room for P + max_new_tokens positions
    mask: torch.Tensor      # [N, 1, 1, P + max_new_tokens] bool, True = a key the next token may see
    position: torch.Tensor  # [N, 1] the next token's position id
    slot: torch.Tensor      # [1] the cache slot the next token's key goes to: P + tokens decoded so far


def prefill_and_fork(model, batch, group_size, max_new_tokens):
    """Encode the audio and prefill the left-padded prompts once (B rows), then fork: the prompt's
    cache copied G ways into a StaticCache of N rows. Returns (the first token's logits [N, V],
    DecodeState). The prefill's own cache is emptied layer by layer as it is copied."""
    G, ids, attn = group_size, batch["input_ids"], batch["attention_mask"]  # [B, P], [B, P]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                               # [B, P] positions skip the left padding
    out = model.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                      input_features=batch["input_features"],
                      feature_attention_mask=batch["feature_attention_mask"])
    N, P = ids.size(0) * G, ids.size(1)
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    prompt_layers = out.past_key_values.layers  # the prefill's own cache, ours to empty
    for i in range(len(prompt_layers)):
        # the static layer is allocated at its first update, and each prompt layer dropped once
        # copied: the two caches together never hold much more than the static one
        keys, values, prompt_layers[i] = prompt_layers[i].keys, prompt_layers[i].values, None
        cache.update(keys.repeat_interleave(G, 0), values.repeat_interleave(G, 0), i)  # [N, kv heads, P, d]
    mask = torch.zeros(N, 1, 1, P + max_new_tokens, dtype=torch.bool, device=ids.device)
    mask[..., :P] = attn.bool().repeat_interleave(G, 0)[:, None, None]     # [N, 1, 1, P] the prompt's padding
    state = DecodeState(cache, mask, pos[:, -1:].repeat_interleave(G, 0) + 1,
                        torch.tensor([P], device=ids.device))
    return model.lm_head(out.last_hidden_state[:, -1]).repeat_interleave(G, 0), state  # [N, V]


def forward(model, tokens, mask, position, cache):
    """One token per row through the language model, writing its keys and values into the cache:
    [N, 1] -> next-token logits [N, V]. Shapes never change from token to token."""
    hidden = model.model(input_ids=tokens, attention_mask=mask, position_ids=position, past_key_values=cache,
                         use_cache=True).last_hidden_state                 # [N, 1, H]
    return model.lm_head(hidden[:, -1])                                    # [N, V]


@functools.cache
def compiled(options):
    """forward under torch.compile(**dict(options)), built once per process and set of options."""
    return torch.compile(forward, **dict(options))


def step(model, state, tokens, compile_options=None):
    """Feed the tokens just sampled [N]; returns the logits of the next ones [N, V]. The new slot is
    switched on in the mask before the forward: a token sees itself."""
    state.mask.index_fill_(-1, state.slot, True)                           # [N, 1, 1, S]
    run = forward if compile_options is None else compiled(tuple(sorted(compile_options.items())))
    logits = run(model, tokens[:, None], state.mask, state.position, state.cache)  # [N, V]
    state.position.add_(1)
    state.slot.add_(1)
    return logits
