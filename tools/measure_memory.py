"""Measure the memory of one GRPO (or SFT, or LoRA) step on the CPU, phase by phase, against tools/plan.py.

It builds the step as train.py does (sharded with FSDP2, gradient checkpointing, a bf16 reference), runs
the rollout, the reference pass, the policy pass and the optimizer step under the profiler, and compares
each phase's peak with plan.memory_plan(device="cpu") for the same config and batch. Under torchrun it
measures one rank of several. docs/training.md has the measured table.
    python -m tools.measure_memory [--algo sft] [--lora-rank 8]
    torchrun --standalone --nproc_per_node 2 -m tools.measure_memory
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch._C._profiler import _EventType
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpo  # noqa: E402  (after the path insert)
from engine import packed, sampler  # noqa: E402
from recipes import lora as L  # noqa: E402
import model as M  # noqa: E402
from workshop import demo  # noqa: E402
from tools import plan  # noqa: E402
from data import SAMPLE_RATE, Sample  # noqa: E402

PHASES = ("rollout", "reference", "policy", "optimizer")
SAMPLE = Sample("", "What is the pitch of the tone in the audio?", ["very low", "low", "high", "very high"], "low", {})


# -----------------------------------------------------------------------------
# The model

def mid_config(audio_token_id, vocab=16384, width=512, layers=8, heads=8, audio_width=256, window_seconds=10):
    """A Qwen2-Audio with the 7B's shape ratios at a small width: no grouped KV heads, intermediate
    size 2.6875 x hidden (11008 / 4096), a vocabulary far larger than the tiny tokenizer's (the
    embedding and lm_head are big units, as in the 7B; ids past the tokenizer are never sampled)."""
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=audio_width, encoder_layers=layers // 2,
                          encoder_attention_heads=4, encoder_ffn_dim=4 * audio_width, num_mel_bins=128,
                          max_source_positions=50 * window_seconds),
        text_config=dict(model_type="qwen2", vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=width * 43 // 16,
                         rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False),
        audio_token_index=audio_token_id,
    )


def build_model(out_dir, seed=0, window_seconds=10, **sizes):
    """Write a random mid-size Qwen2-Audio with the tiny tokenizer to out_dir (once)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = demo.build_tokenizer()
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=window_seconds)
    config = mid_config(tokenizer.convert_tokens_to_ids("<|AUDIO|>"), window_seconds=window_seconds, **sizes)
    torch.manual_seed(seed)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(out_dir)
    Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


# -----------------------------------------------------------------------------
# One step, phase by phase

@dataclass
class Step:
    """Built models and one prompt batch, for full fine-tuning or LoRA, GRPO or SFT."""
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # None: the policy with its adapters off (LoRA), or no reference (SFT)
    optimizer: torch.optim.Optimizer
    batch: dict
    end_ids: list
    pad_id: int
    suppress: list          # never sampled: special tokens and the end tokens (forced full length)
    group_size: int
    new_tokens: int
    beta: float = 0.04
    variant: dict = field(default_factory=dict)  # plan.memory_plan's variant: algo, lora_rank, target_tokens
    targets: torch.Tensor | None = None          # SFT: [B, new_tokens] target ids


def load_step(model_dir, group_size, new_tokens, prompts=1, lora_rank=0, algo="grpo"):
    """The policy (fp32 master, bf16 compute, checkpointing; with lora_rank a frozen bf16 base and fp32
    adapters) and, for full GRPO, the bf16 reference, sharded as in train.py; AdamW on what trains, and
    `prompts` copies of one question with a tone filling the audio window. SFT's target repeats " low"."""
    policy = M.sharded_load(model_dir, param_dtype=torch.bfloat16, storage_dtype=torch.float32,
                            gradient_checkpointing=True, adapters=L.LoRA(L.LoRASettings(rank=lora_rank)) if lora_rank else None)
    ref = None
    if algo == "grpo" and not lora_rank:
        ref = M.sharded_load(model_dir, storage_dtype=torch.bfloat16).requires_grad_(False).eval()
    processor = M.load_processor(model_dir)
    seconds = processor.feature_extractor.chunk_length
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(seconds * SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    batch = M.collate(processor, [SAMPLE] * prompts, [tone] * prompts)
    tok = processor.tokenizer
    end_ids = M.end_token_ids(tok)
    suppress = M.suppressed_token_ids(tok, policy.config.text_config.vocab_size) + end_ids
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    targets = torch.tensor([(tok.encode(" low") * new_tokens)[:new_tokens]] * prompts) if algo == "sft" else None
    variant = dict(algo=algo, lora_rank=lora_rank, target_tokens=new_tokens)
    return Step(policy, ref, optimizer, batch, end_ids, tok.pad_token_id, suppress,
                group_size if algo == "grpo" else 1, new_tokens, variant=variant, targets=targets)


def run_step(step, micro_batches=2):
    """One GRPO step as train.py runs it, each phase under a profiler label "phase:NAME": sample all
    micro-batches under one model.unsharded, then the reference's log-probs, then forward + backward
    per micro-batch (the gradients accumulate), then clip and step. Returns the last rollout.
    SFT: its forward + backward on the teacher-forced targets per micro-batch, then clip and step."""
    if step.targets is not None:
        return run_sft_step(step, micro_batches)
    B = step.batch["input_ids"].size(0)
    with record_function("phase:rollout"):
        step.policy.eval()
        with M.unsharded(step.policy):
            rollouts = [sampler.generate_groups(step.policy, step.batch, grpo.prompt_generators(0, k, range(B)),
                                             step.group_size, step.new_tokens, step.end_ids, step.pad_id,
                                             step.suppress) for k in range(micro_batches)]
    with record_function("phase:reference"):
        refs = [reference(step, r) for r in rollouts]
    with record_function("phase:policy"):
        step.policy.train()
        for r, ref_logp in zip(rollouts, refs):
            advantages = grpo.group_advantages(torch.arange(r.mask.size(0), dtype=torch.float32), step.group_size)
            logp = packed.completion_logprobs(step.policy, r, step.pad_id)          # [N, T]
            loss, _ = grpo.grpo_loss(logp, logp.detach(), ref_logp, advantages, r.mask, step.beta)
            loss.backward()
    optimizer_phase(step)
    return rollouts[-1]


def run_sft_step(step, micro_batches):
    """SFT as steps.supervised_step runs it: a prompt + target sequence per prompt (group size 1)."""
    prompts = [row[m.bool()] for row, m in zip(step.batch["input_ids"], step.batch["attention_mask"])]
    r = grpo.Rollout(prompts, step.batch["input_features"], step.batch["feature_attention_mask"], step.targets,
                     torch.ones_like(step.targets, dtype=torch.bool), group_size=1)
    with record_function("phase:policy"):
        step.policy.train()
        for _ in range(micro_batches):
            loss, _ = grpo.sft_loss(packed.completion_logprobs(step.policy, r, step.pad_id), r.mask)
            loss.backward()
    optimizer_phase(step)
    return r


def optimizer_phase(step):
    with record_function("phase:optimizer"):
        torch.nn.utils.clip_grad_norm_([p for p in step.policy.parameters() if p.requires_grad], 1.0)
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def reference(step, r):
    """Reference log-probs. Its own copy is resharded after: FSDP2 keeps a root's weights gathered after
    forward (it expects a backward), which the reference never runs. With LoRA it is the policy with
    its adapters off, as in steps.reference_logprobs."""
    if step.ref is None:
        with L.adapters_disabled(step.policy):
            return packed.completion_logprobs(step.policy, r, step.pad_id)
    logp = packed.completion_logprobs(step.ref, r, step.pad_id)
    M.reshard(step.ref)
    return logp


def allocations(nodes, phase=None, collective=False):
    """(time, bytes, address, phase, inside a c10d collective) of every allocation (+) and free (-)
    in a profiler event tree."""
    for node in nodes:
        label = node.name[len("phase:"):] if node.name.startswith("phase:") else phase
        inside = collective or node.name.startswith("c10d::")
        if node.tag == _EventType.Allocation:
            yield node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, phase, inside
        yield from allocations(node.children, label, inside)


def measure_phases(step, micro_batches=2):
    """({phase: the most bytes torch's allocator held above the step's start, during the phase},
    the same without the copies gloo's collectives make, the step's last rollout), for a second
    step (the first creates the AdamW moments). gloo's reduce-scatter and all-gather copy their
    input and keep the copy until a worker thread lets go (NCCL works in place on the GPU). A block
    allocated before the step and freed in it has no event (so is not subtracted)."""
    run_step(step, micro_batches)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        r = run_step(step, micro_batches)
    held, own, peaks, own_peaks, copies = 0, 0, {}, {}, set()
    for _, size, ptr, phase, collective in sorted(allocations(prof.profiler.kineto_results.experimental_event_tree())):
        if size > 0 and collective:
            copies.add(ptr)
        mine = not (ptr in copies)
        if size < 0:
            copies.discard(ptr)
        held, own = held + size, own + (size if mine else 0)
        if phase is not None:
            peaks[phase], own_peaks[phase] = max(peaks.get(phase, 0), held), max(own_peaks.get(phase, 0), own)
    return peaks, own_peaks, r


def local_bytes(tensors):
    """Bytes of this rank's part of each tensor (the local shard of a DTensor)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def state_bytes(step):
    """What lives through the step, counted from the tensors: the policy's weights (fp32 master shards;
    with LoRA the whole bf16 base and the adapters' shards), AdamW moments, reference."""
    moments = [v for s in step.optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"master": local_bytes(step.policy.parameters()), "moments": local_bytes(moments),
            "reference": local_bytes(step.ref.parameters()) if step.ref is not None else 0}


# -----------------------------------------------------------------------------
# Against the plan

def compare(step, peaks, r):
    """[(phase, measured bytes, planned bytes)], the plan evaluated for torch's CPU kernels at this
    step's sizes (its phase = its largest moment), and the plan itself."""
    p = plan.memory_plan(step.policy.config, gpus=dist.get_world_size(), prompts_per_gpu=len(r.prompt_ids),
                         group_size=step.group_size, prompt_tokens=max(len(x) for x in r.prompt_ids),
                         max_new_tokens=step.new_tokens, beta=step.beta, device="cpu", **step.variant)
    planned = plan.phase_peaks(p)
    return [(phase, peaks[phase], planned[phase]) for phase in PHASES if phase in planned], p


def report(step, peaks, own, r):
    """The comparison as text, MiB, rank 0's view."""
    rows, p = compare(step, own, r)
    n = sum(x.numel() for x in step.policy.parameters())
    lines = [f"{n / 1e6:.1f}M parameters, {dist.get_world_size()} process(es), prompt {len(r.prompt_ids[0])} "
             f"tokens, G={step.group_size}, {step.new_tokens} new tokens, 2 micro-batches; MiB above the step's start",
             f"{'phase':10s} {'measured':>9s} {'with gloo':>10s} {'plan':>9s} {'plan/measured':>14s}"]
    lines += [f"{phase:10s} {got / 2**20:9.2f} {peaks[phase] / 2**20:10.2f} {planned / 2**20:9.2f} {planned / got:14.3f}"
              for phase, got, planned in rows]
    counted = state_bytes(step)
    lines.append(f"state: tensors {sum(counted.values()) / 2**20:.2f}, plan "
                 f"{sum(row.bytes for row in p.rows if row.phase == 'state') / 2**20:.2f}")
    lines += [f"  plan moment {m:32s} {size / 2**20:9.2f}" for m, size in p.moments.items()]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--audio-width", type=int, default=256)
    parser.add_argument("--window-seconds", type=int, default=10, help="audio window (50 encoder positions per second)")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0 = full fine-tuning)")
    parser.add_argument("--algo", default="grpo", choices=["grpo", "sft"], help="GRPO's step or SFT's")
    args = parser.parse_args()
    M.init_distributed(always=True)
    torch.set_num_threads(1)  # the CPU attention kernel's scratch buffers are per thread
    sizes = dict(width=args.width, layers=args.layers, vocab=args.vocab, audio_width=args.audio_width)
    name = "mid-qwen2-audio-" + "-".join(f"{k}{v}" for k, v in sizes.items()) + f"-{args.window_seconds}s"
    model_dir = build_model(REPO / ".cache" / name, window_seconds=args.window_seconds, **sizes)
    step = load_step(model_dir, args.group_size, args.new_tokens, lora_rank=args.lora_rank, algo=args.algo)
    M.print0(report(step, *measure_phases(step)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
