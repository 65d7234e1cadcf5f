"""FSDP checks that need two processes (tests/test_distributed.py runs them as a job of tests/completions_log.py):

    torchrun --standalone --nproc_per_node 2 tests/dist_checks.py MODEL_DIR OUT.json

1. All-gathers during a rollout of many tokens: at most one per FSDP unit, whatever the length.
2. Ranks whose decode loops stop at different steps (8 vs 40 tokens) both finish: no collective
   runs inside the loop, so nothing can deadlock.
3. One AdamW step at lr 1e-6 moves the fp32 master weights; cast to bf16, most of the move vanishes.
4. A NaN in one rank's loss makes the global gradient norm non-finite on every rank, so the training
   step's clip_and_step (train.py) skips the update everywhere: no rank's weights change.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402
from conftest import pitch_samples  # noqa: E402
from engine import packed, sampler  # noqa: E402


@contextlib.contextmanager
def counting_all_gathers():
    """Within it, count the collective FSDP2 uses to gather parameters (torch.distributed.all_gather_single
    in torch 2.13; FSDP looks it up on the module at call time, so wrapping it sees every call)."""
    counter = {"calls": 0}
    real = dist.all_gather_single

    def counting(*args, **kwargs):
        counter["calls"] += 1
        return real(*args, **kwargs)

    dist.all_gather_single = counting
    try:
        yield counter
    finally:
        dist.all_gather_single = real


def rollout(policy, processor, max_new_tokens, rank):
    tok = processor.tokenizer
    samples, audios = pitch_samples(2)
    batch = M.collate(processor, samples[rank:rank + 1], audios[rank:rank + 1])
    # no end tokens allowed: every completion runs to max_new_tokens
    suppress = M.suppressed_token_ids(tok, policy.config.text_config.vocab_size) + M.end_token_ids(tok)
    with M.unsharded(policy):
        return sampler.generate_groups(policy, batch, grpo.prompt_generators(0, 0, [rank]), 4, max_new_tokens,
                                       M.end_token_ids(tok), tok.pad_token_id, suppress)


def nan_on_rank_1(policy, opt, r, processor, rank):
    """Backward a loss that is NaN on rank 1 only, then the training step's clip_and_step: (the global
    norm this rank saw, whether it stepped, whether the weights are unchanged, on every rank)."""
    policy.zero_grad(set_to_none=True)
    logp = packed.completion_logprobs(policy, r, processor.tokenizer.pad_token_id)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, torch.ones(len(logp)), r.mask, beta=0.0)
    (loss * (float("nan") if rank == 1 else 1.0)).backward()
    before = {k: v.clone() for k, v in M.full_state_dict(policy).items()}
    norm, stepped = T.clip_and_step(policy, opt, 1.0)
    after = M.full_state_dict(policy)
    return norm, stepped, all(torch.equal(before[k], after[k]) for k in before)


def main(model_dir, out):
    rank, world, _ = M.init_distributed()
    torch.set_num_threads(1)
    processor = M.load_processor(model_dir)
    policy = M.sharded_load(model_dir, param_dtype=torch.bfloat16).eval()
    with counting_all_gathers() as counter:
        r = rollout(policy, processor, max_new_tokens=8 if rank == 0 else 40, rank=rank)
    result = {"units": len(M.fsdp_units(policy)), "all_gathers": counter["calls"],
              "tokens": r.completion_ids.shape[1]}
    before = {k: v.clone() for k, v in M.full_state_dict(policy).items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    policy.train()
    logp = packed.completion_logprobs(policy, r, processor.tokenizer.pad_token_id)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, r.mask, beta=0.0)
    loss.backward()
    opt.step()
    after = M.full_state_dict(policy)
    norm, stepped, unchanged = nan_on_rank_1(policy, opt, r, processor, rank)
    result.update(norm_after_nan=str(norm), stepped_after_nan=stepped, unchanged_after_nan=unchanged)
    if rank == 0:
        trained = [k for k, p in policy.named_parameters() if p.requires_grad]
        moved = sum(int((after[k] != before[k]).sum()) for k in trained)
        moved_bf16 = sum(int((after[k].bfloat16() != before[k].bfloat16()).sum()) for k in trained)
        result.update(moved=moved, moved_bf16=moved_bf16, numel=sum(before[k].numel() for k in trained))
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
