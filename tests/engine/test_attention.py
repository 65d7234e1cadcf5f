"""engine/attention.py: the packed layout's visibility rule, its dense mask and its FlexAttention BlockMask,
and the two paths of engine/packed.py's log-probs against each other.

On the CPU torch 2.13 runs FlexAttention forward only (eagerly), so: the forward is compared with the real
kernel; the backward with a stand-in kernel that runs sdpa on the BlockMask's own mask_mod, which checks
everything around the kernel (the rule, the dispatch in every layer, gradient checkpointing's recompute,
the gradients) but not the CUDA kernel itself (tools/gpu_check.py does).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

import grpo
import model as M
from conftest import pitch_samples
from engine import attention, packed
from test_grpo import rollout_for
from tools import plan


def segments(*rows):
    """[B, L] segment ids from lists, right-padded with -1."""
    L = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (L - len(r)) for r in rows])


def test_visible_by_hand():
    """Prompt of 2, completion 1 of 2 tokens, completion 2 of 1, one pad:
    prompt tokens see the prompt causally; c1 sees the prompt and its own past; c2 the prompt and
    itself, not c1; the pad sees the prompt and itself (it is never read; no row may be empty)."""
    seg = segments([0, 0, 1, 1, 2, -1])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 1, 0],
                             [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(attention.dense_mask(seg)[0, 0], expected)


def packed_segments(prompts, group_size, new):
    """Segment rows [prompt, c_1..c_G] for prompts of several lengths, completions of length `new`."""
    return segments(*[[0] * p + [i + 1 for i in range(group_size) for _ in range(new)] for p in prompts])


def test_block_mask_is_the_dense_rule():
    """Over several 128-blocks and with padding: the BlockMask's mask_mod gives the dense mask pair for
    pair, and the blocks it marks for computing are exactly those holding a visible pair."""
    seg = packed_segments([150, 97], group_size=3, new=80)               # L = 390: 4 blocks, row 2 padded
    dense = attention.dense_mask(seg)                                      # [B, 1, L, L]
    bm = attention.block_mask(seg)
    B, L = seg.shape
    assert torch.equal(create_mask(bm.mask_mod, B, 1, L, L, device="cpu"), dense)
    pad = -L % 128
    tiles = F.pad(dense, (0, pad, 0, pad)).unflatten(2, (-1, 128)).unflatten(4, (-1, 128))  # [B, 1, q, 128, k, 128]
    assert torch.equal(bm.to_dense().bool(), tiles.any(3).any(-1))


def test_block_count_matches_plan():
    """plan.py's count of the blocks FlexAttention computes (attention="block") is the real BlockMask's,
    at R1-AQA's lengths: P = 850, G = 8, T = 256."""
    bm = attention.block_mask(packed_segments([850], group_size=8, new=256))
    assert int(bm.to_dense().sum()) == plan.visible_blocks(850, 8, 256) == 178


@pytest.fixture(scope="module")
def fresh(tiny_dir):
    """A model of its own for this file: enable() switches its language model's attention function."""
    model, processor = M.load(tiny_dir, dtype=torch.float32)
    return model.eval(), processor


def test_flex_forward_equals_dense(fresh):
    """The real FlexAttention kernel (eager on the CPU, no grad): packed log-probs equal the dense
    path's to 1e-5 in fp32 (measured 5e-7), with prompts of different lengths (padding) and
    completions of different lengths. The language model switched, the encoder kept sdpa."""
    model, _ = fresh
    rollout = rollout_for(fresh, n_prompts=3, G=4, max_new_tokens=10)
    assert len(set(rollout.mask.sum(1).tolist())) > 1
    with torch.no_grad():
        dense = packed.completion_logprobs(model, rollout, pad_id=0, flex=False)
        flex = packed.completion_logprobs(model, rollout, pad_id=0, flex=True)
    assert (flex - dense).abs().max() <= 1e-5
    assert model.config.text_config._attn_implementation == attention.NAME
    assert model.config.audio_config._attn_implementation == "sdpa"


def sdpa_on_mask_mod(calls):
    """A stand-in for the flex kernel with a backward on the CPU: sdpa over the BlockMask's mask_mod."""
    def kernel(query, key, value, block_mask, scale):
        calls.append(query.shape)
        B, _, L, _ = query.shape
        mask = create_mask(block_mask.mask_mod, B, 1, L, L, device=query.device)  # [B, 1, L, L]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                              enable_gqa=query.size(1) != key.size(1))
    return kernel


def test_flex_path_gradients_equal_dense(fresh, monkeypatch):
    """With grad and gradient checkpointing (train mode): the BlockMask path, on a stand-in kernel,
    gives the dense path's log-probs and every parameter's gradient (fp32, 1e-6). The kernel runs in
    every decoder layer twice, forward and checkpointing's recompute: the switch outlives the call."""
    model, _ = fresh
    rollout = rollout_for(fresh, n_prompts=2, G=3, max_new_tokens=8)
    calls = []
    monkeypatch.setattr(attention, "flex_kernel", sdpa_on_mask_mod(calls))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    results = {}
    try:
        for flex in (False, True):
            model.zero_grad(set_to_none=True)
            logp = packed.completion_logprobs(model, rollout, pad_id=0, flex=flex)
            (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
            results[flex] = (logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        model.activation_checkpointing_disable()
        model.eval().zero_grad(set_to_none=True)
    assert len(calls) == 2 * model.config.text_config.num_hidden_layers
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=0)
    assert len(results[True][1]) == len(results[False][1]) > 0
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_where_flex_runs():
    """The rule: FlexAttention on CUDA only. On the CPU torch refuses its backward, which is why."""
    assert attention.flex_default("cuda") and attention.flex_default(torch.device("cuda", 3))
    assert not attention.flex_default("cpu")
    seg = packed_segments([5], group_size=2, new=3)
    q = torch.randn(1, 2, seg.size(1), 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        attention.flex_kernel(q, q, q, attention.block_mask(seg), scale=None)


def test_enable_leaves_other_attention_as_sdpa(tiny_dir):
    """After enable(): greedy model.generate (sdpa masks, cache) gives the same tokens as before; a
    model loaded with another attention is refused, not changed."""
    model, processor = M.load(tiny_dir, dtype=torch.float32)
    tok = processor.tokenizer
    batch = M.collate(processor, *pitch_samples(2))
    greedy = lambda: model.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    before = greedy()
    attention.enable(model)
    assert torch.equal(greedy(), before)
    eager = M.load(tiny_dir, dtype=torch.float32)[0]
    eager.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="needs the language model on sdpa"):
        attention.enable(eager)


def test_flex_compiles_once_for_every_length(monkeypatch):
    """compiled_flex compiles for dynamic lengths from the start: packed rows of 300, 600 and 700 tokens
    (BlockMasks of 3, 5 and 6 blocks) compile one graph; the default (dynamic=None) compiles a static graph
    first and then recompiles (2). The compile call is attention.py's own, its backend stood in by a counter
    that runs the traced graph eagerly: seconds on the CPU instead of ~20 s per shape, the same guards.
    The outputs equal the eager kernel's. Block counts of 1, 2 and 4 are avoided here: dynamo specialises a
    size equal to 1 or to a static head count (4 query, 2 KV heads here), which the 7B's packed lengths
    (7 to 23 blocks; 32 or 28 query and 32 or 4 KV heads) never hit."""
    graphs, real_compile = [], torch.compile

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    # only attention.py's call; the eager flex_attention compiles a wrapper of its own with backend="eager"
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(
        fn, **kwargs, **({"backend": counting} if fn is flex_attention else {})))
    attention.compiled_flex.cache_clear()
    torch._dynamo.reset()
    try:
        kernel = attention.compiled_flex()
        for prompt, new in ((100, 50), (200, 100), (300, 100)):
            seg = packed_segments([prompt], group_size=4, new=new)                   # L = prompt + 4 * new
            bm = attention.block_mask(seg)
            q, kv = torch.randn(1, 4, seg.size(1), 16), torch.randn(1, 2, seg.size(1), 16)
            out = kernel(q, kv, kv, block_mask=bm, scale=0.25, enable_gqa=True)
            expected = flex_attention(q, kv, kv, block_mask=bm, scale=0.25, enable_gqa=True)
            torch.testing.assert_close(out, expected)
    finally:
        attention.compiled_flex.cache_clear()
        torch._dynamo.reset()
    assert len(graphs) == 1
