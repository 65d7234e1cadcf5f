"""Attention for the packed group [prompt, c_1, ..., c_G]: which (query, key) pairs are visible, as a
dense [B, 1, L, L] mask or as a FlexAttention BlockMask, and the attention function that runs the latter.

Every completion sees the prompt and its own past, never another completion. A dense mask makes the
kernel compute all L^2 pairs (3.5x the visible ones at P = 850, G = 8, T = 256); FlexAttention keeps the
same rule per 128 x 128 block and skips the blocks without a visible pair. It is the default on CUDA
only (torch 2.13 has no FlexAttention backward on the CPU). `enable(model)` registers "sdpa_or_flex"
with transformers' public AttentionInterface for the language model alone: FlexAttention for a
BlockMask, exactly sdpa otherwise; compiled once, for dynamic lengths. docs/performance.md says more.
"""

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_or_flex"
# What a FlexAttention kernel that cannot run raises: torch.compile's failures (dynamo's and inductor's
# errors: Triton missing, a GPU too old, a tile needing more shared memory than the GPU has) and a failed
# launch are RuntimeErrors; a backward torch lacks, NotImplementedError (the CPU's). torch.OutOfMemoryError
# is a RuntimeError too, but not a kernel failure: the dense mask would need more memory, not less.
KERNEL_ERRORS = (RuntimeError, NotImplementedError)


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
    """torch.compile(flex_attention), made once: a new compile per call would recompile every time. Compiled
    for dynamic shapes from the start: the packed length, and with it the BlockMask's number of blocks,
    changes at every call; the default would compile a static kernel first, then recompile."""
    return torch.compile(flex_attention, dynamic=True)


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
