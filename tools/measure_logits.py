"""Measure what the bf16 lm_head costs GRPO's log-probs, KL and ratio, against an fp32 lm_head.

The packed log-probs run lm_head in the compute dtype, so in bf16 each logit is rounded (a step of 0.125
for |z| in 16..32) before the fp32 log-softmax. On the tiny model in bf16 (fp32 master weights, bf16
compute copies, as train.py's policy), every sampled token's log-prob three ways: lm_head in bf16 (the
code), lm_head in fp32 over the same bf16 states, the whole model in fp32; the KL and |ratio - 1| at step 0
and after one AdamW step at lr 1e-6. Repeated with lm_head scaled so that its logits reach the 7B's range.

    python -m tools.measure_logits        # seconds on a CPU
"""

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import grpo
import model as M
from data import Sample
from engine import packed, sampler
from workshop import demo


class Fp32Head(torch.nn.Module):
    """lm_head in fp32: the same (bf16-valued) weights, the bf16 hidden states upcast, no rounding of the logits."""

    def __init__(self, head):
        super().__init__()
        self.weight = head.weight

    def forward(self, x):
        return F.linear(x.float(), self.weight.float())


def bf16_copy(model):
    """The compute copy FSDP's mixed precision makes of the fp32 master: every weight rounded to bf16."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    M.reset_rotary(bf16, "cpu")  # the rotary frequencies stay fp32, as in sharded_load
    return bf16


def logprobs(model, rollout, pad_id, suppress, fp32_head=False):
    """The log-probs training takes: the packed pass, the suppressed tokens out of the softmax."""
    head = model.lm_head
    if fp32_head:
        model.lm_head = Fp32Head(head)
    try:
        with torch.no_grad():
            return packed.completion_logprobs(model, rollout, pad_id, suppress_ids=suppress)
    finally:
        model.lm_head = head


def kl_and_ratio(new, old, mask):
    """k3 KL(new || old) as grpo_loss computes it with old as the reference, and mean |new/old - 1|."""
    delta = (old - new)[mask]
    return (delta.exp() - delta - 1).mean().item(), ((new - old)[mask].exp() - 1).abs().mean().item()


def pitch_samples(n):
    """n pitch questions and noise clips of 1 to 3 s (the test suite's, tests/conftest.py)."""
    rng, choices = np.random.default_rng(0), ["very low", "low", "high", "very high"]
    samples = [Sample(f"clip{i}.wav", demo.PITCH_QUESTION, choices, choices[i % 4], {}) for i in range(n)]
    return samples, [(0.1 * rng.standard_normal(16000 * (1 + i % 3))).astype(np.float32) for i in range(n)]


def measure(master, processor, scale):
    tok = processor.tokenizer
    with torch.no_grad():
        master.lm_head.weight.mul_(scale)
    before = bf16_copy(master)
    samples, audios = pitch_samples(4)
    batch = M.collate(processor, samples, audios)
    gens = grpo.prompt_generators(0, 0, range(4))
    suppress = M.suppressed_token_ids(tok, master.config.text_config.vocab_size)
    r = sampler.generate_groups(before, batch, gens, 8, 32, M.end_token_ids(tok), tok.pad_token_id, suppress)
    pad = tok.pad_token_id
    with torch.no_grad():
        states = before.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              input_features=batch["input_features"],
                              feature_attention_mask=batch["feature_attention_mask"]).last_hidden_state
        z = before.lm_head(states).float()
    old = {"bf16 lm_head": logprobs(before, r, pad, suppress), "fp32 lm_head": logprobs(before, r, pad, suppress, True),
           "fp32 model": logprobs(master.eval(), r, pad, suppress)}
    err = (old["bf16 lm_head"] - old["fp32 lm_head"])[r.mask].abs()
    print(f"lm_head x {scale}: logits max |z| {z.abs().max().item():.1f}, mean max z {z.max(-1).values.mean().item():.1f}; "
          f"{int(r.mask.sum())} tokens; |logp(bf16 head) - logp(fp32 head)| max {err.max().item():.2e} mean "
          f"{err.mean().item():.2e}")
    # one AdamW step of the GRPO loss at lr 1e-6 on the fp32 master (the policy's forward in bf16, as trained)
    master.train()
    opt = torch.optim.AdamW(master.parameters(), lr=1e-6, weight_decay=0.0)
    logp = packed.completion_logprobs(master, r, pad, suppress_ids=suppress)
    adv = grpo.group_advantages(torch.arange(logp.size(0), dtype=torch.float32) % 3, 8)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, r.mask, beta=0.0)
    loss.backward()
    opt.step()
    after = bf16_copy(master)
    new = {"bf16 lm_head": logprobs(after, r, pad, suppress), "fp32 lm_head": logprobs(after, r, pad, suppress, True),
           "fp32 model": logprobs(master.eval(), r, pad, suppress)}
    for way in old:
        kl0, ratio0 = kl_and_ratio(old[way], old[way], r.mask)
        kl, ratio = kl_and_ratio(new[way], old[way], r.mask)
        print(f"  {way:13s} step 0: KL {kl0:.1e} |ratio-1| {ratio0:.1e}; after one step: KL {kl:.2e} "
              f"mean |ratio-1| {ratio:.2e}")


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = demo.build_tiny(Path(tmp) / "tiny", window_seconds=2)
        for scale in (1, 60):
            master, processor = M.load(folder, dtype=torch.float32)
            measure(master, processor, scale)


if __name__ == "__main__":
    main()
