"""Attention for the packed group [prompt, c_1, ..., c_G]: which (query, key) pairs are visible, as a
dense mask or as a FlexAttention BlockMask, and the attention function that runs the BlockMask.

The idea: in a packed row every completion sees the prompt and its own past, never another
completion. A kernel that takes a dense [B, 1, L, L] mask computes all L^2 pairs (3.5x the visible
ones at P = 850, G = 8, T = 256) and cannot be FlashAttention. FlexAttention takes a BlockMask, the
same rule kept per 128 x 128 block, and skips every block without a visible pair. `visible` is the
one definition of the rule; `dense_mask` and `block_mask` both evaluate it.

Where it runs: `flex_default(device)` is True on CUDA only. torch 2.13's FlexAttention runs on the
CPU forward-only (no backward: it raises NotImplementedError), and there only eagerly, computing
every score (no saving), or compiled, which costs ~20 s per shape on a CPU. On CUDA the kernel is
compiled once (torch.compile(flex_attention)); new lengths make dynamo mark them dynamic.

How it reaches the model (transformers 5.23): Qwen2Attention looks up its attention function by
name from config._attn_implementation on every call, and create_causal_mask passes a 4-D mask
(a BlockMask is 4-D) through untouched. `enable(model)` registers one function, "sdpa_or_flex",
under the public AttentionInterface / AttentionMaskInterface and gives it to the language model
only (the Qwen2-Audio encoder keeps sdpa): it runs FlexAttention for a BlockMask and is exactly
transformers' sdpa otherwise (the decode loop, model.generate). The switch stays on, because
gradient checkpointing recomputes a layer in backward, outside any per-call switch.

    (imported by grpo.py; tests/test_attention.py checks both paths against each other)
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_or_flex"


def visible(q_seg, k_seg, q_idx, k_idx):
    """May query q attend to key k? Segments: 0 = the prompt, i = completion i, -1 = padding.
    Causal, never to padding, only to the prompt or the query's own completion. A padding query sees
    the prompt and itself: its state is never used, and a row with no key would be NaN in sdpa."""
    shared = (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    return ((q_idx >= k_idx) & shared) | ((q_idx == k_idx) & (q_seg < 0))


def dense_mask(segments):
    """[B, L] segment ids -> [B, 1, L, L] bool, True = query may attend to key."""
    idx = torch.arange(segments.size(1), device=segments.device)         # [L]
    return visible(segments[:, :, None], segments[:, None, :], idx[:, None], idx[None, :])[:, None]


def block_mask(segments):
    """[B, L] segment ids -> FlexAttention BlockMask of the same rule (one mask for every head)."""
    B, L = segments.shape

    def mask_mod(b, h, q, k):
        return visible(segments[b, q], segments[b, k], q, k)
    return create_block_mask(mask_mod, B, None, L, L, device=segments.device)


def flex_default(device):
    """The rule: FlexAttention where its compiled kernels run forward and backward, i.e. CUDA."""
    return torch.device(device).type == "cuda"


@functools.cache
def compiled_flex():
    """torch.compile(flex_attention), made once: a new compile per call would recompile every time."""
    return torch.compile(flex_attention)


def flex_kernel(query, key, value, block_mask, scale):
    """flex_attention: compiled once per process on CUDA (the fused kernel), eager on the CPU."""
    kernel = compiled_flex() if query.device.type == "cuda" else flex_attention
    return kernel(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.size(1) != key.size(1))


def sdpa_or_flex(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: [B, heads, L, d] in, ([B, L, heads, d], None) out."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    assert dropout == 0.0, "FlexAttention here takes no attention dropout (Qwen2's is 0)"
    out = flex_kernel(query, key, value, attention_mask, scaling)          # [B, heads, L, d]
    return out.transpose(1, 2).contiguous(), None


def enable(model):
    """Give the language model of a Qwen2-Audio sdpa_or_flex (once; the encoder keeps its own).
    A model loaded with another attention than sdpa is refused rather than silently changed."""
    AttentionInterface.register(NAME, sdpa_or_flex)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks as for sdpa, for every call but the packed one
    current = model.config.text_config._attn_implementation  # transformers has no public getter for it
    if current != NAME:
        if current != "sdpa":
            raise ValueError(f"FlexAttention for the packed forward needs the language model on sdpa, not {current!r}")
        model.set_attn_implementation({"text_config": NAME})


def packed_mask(model, segments, flex):
    """The packed forward's attention_mask: a BlockMask (after enable(model)) or the dense mask."""
    if flex:
        enable(model)
        return block_mask(segments)
    return dense_mask(segments)
