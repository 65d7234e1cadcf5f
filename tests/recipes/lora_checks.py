"""LoRA under FSDP2 on two processes, run by tests/recipes/test_lora.py:

    torchrun --standalone --nproc_per_node 2 tests/recipes/lora_checks.py MODEL_DIR OUT

Every rank loads the model with LoRA adapters (language model and audio encoder) through
model.sharded_load, with gradient checkpointing on, samples its own group (rank r: prompt r) inside
model.unsharded, and takes STEPS AdamW steps on the fixed global batch (rank r holds group r). Rank 0
writes OUT/adapters (lora.save_adapters) and OUT/checks.pt with, per rank:
  - bytes all-gathered during the rollout and the bytes of the adapters (the base is never gathered);
  - whether every frozen parameter is a plain tensor, and a copy of the whole frozen base after
    training (the test compares both ranks' copies with the checkpoint);
  - the parameters that had a gradient.
The test then trains the same adapters in one process with `train` below and compares.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest

import grpo  # noqa: E402
import model as M  # noqa: E402
from conftest import pitch_samples  # noqa: E402
from engine import packed, sampler  # noqa: E402
from recipes import lora as L  # noqa: E402

SETTINGS = L.LoRASettings(rank=4, alpha=8.0, audio=True, seed=0)
STEPS, LR, GROUP, TOKENS, PROMPTS = 3, 1e-2, 2, 6, 2
ADVANTAGES = torch.tensor([1.0, -1.0])  # [GROUP] fixed, so the loss depends only on the log-probs


@torch.no_grad()
def sample_group(model, processor, i):
    """GROUP completions of TOKENS tokens for prompt i of pitch_samples(PROMPTS). Its generator is seeded
    by the prompt's index, so the completions are the same on any number of processes."""
    samples, audios = pitch_samples(PROMPTS)
    batch = M.collate(processor, samples[i:i + 1], audios[i:i + 1])
    tok = processor.tokenizer
    suppress = M.suppressed_token_ids(tok, model.config.text_config.vocab_size)
    return sampler.generate_groups(model, batch, grpo.prompt_generators(0, 0, [i]), GROUP, TOKENS,
                                   M.end_token_ids(tok), tok.pad_token_id, suppress)


def train(model, rollouts, pad_id, world=1):
    """STEPS AdamW steps over the trainable parameters on the given groups. Each rank divides by
    (sequences in the global batch / world), so FSDP's average over ranks gives the one-process
    gradient. Returns the names of the parameters that had a gradient at the last step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    model.train()
    for _ in range(STEPS):
        for r in rollouts:
            logp = packed.completion_logprobs(model, r, pad_id)           # [GROUP, T]
            loss, _ = grpo.grpo_loss(logp, logp.detach(), None, ADVANTAGES, r.mask, beta=0.0,
                                     denominator=PROMPTS * GROUP / world)
            loss.backward()
        with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return with_grad


def count_gathered_bytes():
    """Wrap the collective FSDP2 gathers parameters with (it looks it up on the module at call time)."""
    counter = {"bytes": 0}
    real = dist.all_gather_single

    def counting(output, *args, **kwargs):
        counter["bytes"] += output.numel() * output.element_size()
        return real(output, *args, **kwargs)

    dist.all_gather_single = counting
    return counter, real


def main(model_dir, out):
    rank, world, _ = M.init_distributed()
    torch.set_num_threads(1)
    processor = M.load_processor(model_dir)
    policy = M.sharded_load(model_dir, gradient_checkpointing=True, adapters=L.LoRA(SETTINGS))
    counter, real = count_gathered_bytes()
    policy.eval()
    with M.unsharded(policy):
        rollout = sample_group(policy, processor, rank)
    dist.all_gather_single = real
    frozen = [(n, p) for n, p in policy.named_parameters() if not p.requires_grad]
    adapters = [p for n, p in policy.named_parameters() if L.is_adapter_key(n)]
    result = {"gathered_bytes": counter["bytes"], "adapter_bytes": sum(p.numel() * 4 for p in adapters),
              "units": len(M.fsdp_units(policy)), "completions": rollout.completion_ids.tolist(),
              "base_plain": all(type(p.data) is torch.Tensor for _, p in frozen)}
    result["with_grad"] = train(policy, [rollout], processor.tokenizer.pad_token_id, world)
    base = {n: p.detach().clone() for n, p in frozen}
    tensors = L.adapter_state_dict(policy)  # all ranks: it gathers
    gathered = [None] * world
    dist.all_gather_object(gathered, (result, base))
    if rank == 0:
        L.save_adapters(Path(out) / "adapters", tensors, SETTINGS, base_model=model_dir)
        torch.save(gathered, Path(out) / "checks.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
