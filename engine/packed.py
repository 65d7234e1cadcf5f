"""The fast log-probs: one forward per group over the packed sequence [prompt, c_1, ..., c_G].

Every completion sees the prompt and its own past (engine/attention.py: a dense mask, or a FlexAttention
BlockMask that skips the blocks nobody sees), position ids restart after the prompt, the audio is encoded
once per group, and lm_head + log_softmax run only where a completion token is predicted.
completion_logprobs has the signature of grpo.completion_logprobs (plus `flex`) and equals it to 1e-5 in
fp32 (tests/engine/test_packed.py).
"""

from dataclasses import dataclass

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M
from engine import attention


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


def completion_logprobs(model, rollout, pad_id, temperature=1.0, suppress_ids=(), flex=None):
    """log pi(token) of every completion token, fp32, 0 where the mask is False, from one packed forward
    per group, the suppressed tokens out of the softmax (grpo.completion_logprobs). flex: attention through
    a FlexAttention BlockMask (True) or a dense [B, 1, L, L] mask (False); None = attention.flex_default:
    FlexAttention on CUDA, the dense mask elsewhere."""
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
    logits = logits.index_fill(-1, torch.as_tensor(list(suppress_ids), dtype=torch.long, device=device),
                               float("-inf"))                              # [M, V] as sampling drew
    token_logp = logits.log_softmax(-1).gather(-1, rollout.completion_ids[mask][:, None]).squeeze(-1)  # [M]
    return torch.zeros(mask.shape, device=device, dtype=token_logp.dtype).masked_scatter(mask, token_logp)  # [N, T]


def flex_or_dense(run, passes):
    """passes(): the packed forwards (and backwards) of one step, run with FlexAttention. If its kernel fails
    in them on any process (compiling, forward or backward), every process switches the run's log-probs to
    the dense mask for the rest of the run, resets FSDP and redoes the whole of passes() from zeroed
    gradients: a failure in a later micro-batch leaves earlier ones' gradients added. The verdict is
    all-reduced, so the processes redo it together and FSDP's collectives stay paired."""
    result, failure = None, None
    try:
        result = passes()
    except attention.KERNEL_ERRORS as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        failure = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    failed = torch.tensor([float(failure is not None)], device=run.device)
    dist.all_reduce(failed)
    if not failed.item():
        return result
    M.print0(f"FlexAttention failed ({failure or 'on another process'}); redoing the step with the dense mask, "
             f"used for the rest of the run (--dense-attention uses it from the start)")
    run.recipe.logprobs, run.recipe.guard = partial(completion_logprobs, flex=False), lambda run, passes: passes()
    for model in (run.policy, run.reference):
        if model is not None:
            M.reset_after_error(model)
    return passes()
