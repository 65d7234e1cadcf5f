"""Benchmark one GRPO step's compute: the engine against the usual Hugging Face way, and the ideal.

Per phase (rollout, reference, policy): the FLOPs the profiler counts and the wall time of ours (one
prefill per prompt with the KV cache forked G ways; one packed forward per group, lm_head only where a
completion token is predicted) against model.generate with num_return_sequences and G separate [prompt,
c_i] forwards with full logits, and against the ideal count of useful work. It checks that ours gives the
same log-probs. docs/performance.md has the measured tables.
    python -m tools.bench_step [--model DIR] [--group-size 8 --new-tokens 256]
"""

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import attention, packed, sampler  # noqa: E402  (after the path insert)
import grpo  # noqa: E402
import model as qwen  # noqa: E402
from data import SAMPLE_RATE, Sample  # noqa: E402
from workshop import demo  # noqa: E402

GROUP_SIZE = 8    # G, as R1-AQA
NEW_TOKENS = 12   # T, forced: every completion has exactly this many tokens
SECONDS = 10      # AVQA clips are 10 s
RUNS = 7          # timed runs per phase, after one warm-up
BETA = 0.04
PHASES = ("rollout", "reference", "policy")
# Questions the tiny tokenizer knows, so the text part has realistic token counts.
SAMPLES = [
    Sample("", "What is the pitch of the tone in the audio?", ["very low", "low", "high", "very high"], "low", {}),
    Sample("", "Who is speaking?", ["Man", "Woman", "Child", "Robot"], "Man", {}),
]


# -----------------------------------------------------------------------------
# Setup: one model, one batch, one rollout shared by every log-prob pass

@dataclass
class Bench:
    model: torch.nn.Module
    batch: dict                 # left-padded prompts from model.collate
    suppress: list              # ids never sampled: special tokens AND the end tokens
    end_ids: list
    pad_id: int
    group_size: int
    new_tokens: int
    # filled in by setup():
    rollout: grpo.Rollout = None      # our sampled completions, used by every log-prob pass
    advantages: torch.Tensor = None   # [N] from fixed random rewards
    ref_logp: torch.Tensor = None     # [N, T] reference log-probs (ours), input of the policy loss


def tones(seconds, n):
    """n clips of float32 audio: sine tones at different pitches."""
    t = np.arange(seconds * SAMPLE_RATE) / SAMPLE_RATE
    return [(0.5 * np.sin(2 * np.pi * 300 * (i + 1) * t)).astype(np.float32) for i in range(n)]


def setup(model_dir=None, samples=SAMPLES, group_size=GROUP_SIZE, new_tokens=NEW_TOKENS):
    """Load the model (default: the tiny one with a SECONDS window, built on first use), collate the
    prompts with clips that fill the window, sample our rollout once."""
    torch.manual_seed(0)
    model, processor = qwen.load(model_dir or demo.tiny(REPO / ".cache", SECONDS), dtype=torch.float32)
    model.eval()  # dropout is 0 in this config, so eval changes nothing for the policy pass
    tok = processor.tokenizer
    end_ids = qwen.end_token_ids(tok)
    batch = qwen.collate(processor, samples, tones(processor.feature_extractor.chunk_length, len(samples)))
    suppress = qwen.suppressed_token_ids(tok, model.config.text_config.vocab_size) + end_ids
    bench = Bench(model, batch, suppress, end_ids, tok.pad_token_id, group_size, new_tokens)
    bench.rollout = ours_rollout(bench)
    assert bench.rollout.mask.all() and bench.rollout.completion_ids.size(1) == new_tokens
    rewards = torch.randint(0, 3, (len(samples) * group_size,), generator=torch.Generator().manual_seed(0))
    bench.advantages = grpo.group_advantages(rewards.float(), group_size)  # [N]
    bench.ref_logp = ours_reference(bench)
    return bench


# -----------------------------------------------------------------------------
# Ours: grpo.py's real functions

def ours_rollout(bench):
    generators = grpo.prompt_generators(seed=0, step=0, prompt_indices=range(len(bench.batch["input_ids"])))
    return sampler.generate_groups(bench.model, bench.batch, generators, bench.group_size, bench.new_tokens,
                                bench.end_ids, bench.pad_id, bench.suppress, temperature=1.0, top_k=50, top_p=1.0)


@torch.no_grad()
def ours_reference(bench):
    return packed.completion_logprobs(bench.model, bench.rollout, bench.pad_id)  # [N, T]


def ours_policy(bench):
    return policy_step(bench, lambda: packed.completion_logprobs(bench.model, bench.rollout, bench.pad_id))


def policy_step(bench, logprobs):
    """The policy phase for any log-prob function: forward, GRPO loss (mu = 1), backward."""
    bench.model.zero_grad(set_to_none=True)
    logp = logprobs()                                                      # [N, T]
    loss, _ = grpo.grpo_loss(logp, logp.detach(), bench.ref_logp, bench.advantages, bench.rollout.mask, beta=BETA)
    loss.backward()
    return logp.detach(), loss.detach()


# -----------------------------------------------------------------------------
# Baseline: what TRL's GRPOTrainer / R1-AQA do

@torch.no_grad()
def baseline_rollout(bench):
    """HF generate: the batch is expanded G times BEFORE the audio is encoded and the prompt prefilled."""
    torch.manual_seed(0)
    out = bench.model.generate(**bench.batch, num_return_sequences=bench.group_size, do_sample=True,
                               temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=bench.new_tokens,
                               min_new_tokens=bench.new_tokens, suppress_tokens=bench.suppress,
                               eos_token_id=bench.end_ids, pad_token_id=bench.pad_id)  # [N, P+T]
    assert out.size(1) == bench.batch["input_ids"].size(1) + bench.new_tokens
    return out


def baseline_logprobs(bench):
    """G full sequences [prompt, completion] per prompt, the audio repeated G times, logits and
    log_softmax at every position, then the completion positions sliced out."""
    G, batch, comp = bench.group_size, bench.batch, bench.rollout.completion_ids  # comp [N, T]
    ids = torch.cat([batch["input_ids"].repeat_interleave(G, 0), comp], 1)      # [N, P+T]
    attn = torch.cat([batch["attention_mask"].repeat_interleave(G, 0), bench.rollout.mask.long()], 1)  # [N, P+T]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                               # [N, P+T] as generate numbers them
    features = batch["input_features"].repeat_interleave(G, 0)            # [N, mels, frames] G copies
    frames = batch["feature_attention_mask"].repeat_interleave(G, 0)      # [N, frames]
    logits = bench.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                         input_features=features, feature_attention_mask=frames).logits  # [N, P+T, V]
    logp = logits.float().log_softmax(-1)                                  # [N, P+T, V]
    T = comp.size(1)
    return logp[:, -T - 1:-1].gather(-1, comp[..., None]).squeeze(-1)      # [N, T]


@torch.no_grad()
def baseline_reference(bench):
    return baseline_logprobs(bench)


def baseline_policy(bench):
    return policy_step(bench, lambda: baseline_logprobs(bench))


# -----------------------------------------------------------------------------
# Ideal: every unique token once per pass (see the docstring for the formula)

def ideal_logprobs(bench):
    """Per prompt: encode + prefill once, fork the cache G ways, the first T-1 tokens of every
    completion as one chunk; lm_head on the last prompt state once and on the G*(T-1) chunk states.
    Assumes full-length completions (the benchmark forces them)."""
    G, model, roll = bench.group_size, bench.model, bench.rollout
    out = []
    for b, prompt in enumerate(roll.prompt_ids):
        P, comp = len(prompt), roll.completion_ids[b * G:(b + 1) * G]      # comp [G, T]
        pre = model.model(input_ids=prompt[None], input_features=roll.input_features[b:b + 1],
                          feature_attention_mask=roll.feature_attention_mask[b:b + 1], use_cache=True)
        cache = pre.cache
        cache.batch_repeat_interleave(G)
        pos = torch.arange(P, P + comp.size(1) - 1).expand(G, -1)          # [G, T-1]
        hidden = model.model(input_ids=comp[:, :-1], position_ids=pos, cache=cache,
                             use_cache=True).last_hidden_state             # [G, T-1, H]
        first = model.lm_head(pre.last_hidden_state[:, -1]).expand(G, 1, -1)  # [G, 1, V] one row, shared
        logits = torch.cat([first, model.lm_head(hidden)], 1).float()     # [G, T, V]
        out.append(logits.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1))  # [G, T]
    return torch.cat(out)                                                  # [N, T]


@torch.no_grad()
def ideal_forward(bench):
    return ideal_logprobs(bench)


def ideal_policy(bench):
    return policy_step(bench, lambda: ideal_logprobs(bench))


SIDES = {
    "ours": {"rollout": ours_rollout, "reference": ours_reference, "policy": ours_policy},
    "baseline": {"rollout": baseline_rollout, "reference": baseline_reference, "policy": baseline_policy},
    "ideal": {"rollout": ideal_forward, "reference": ideal_forward, "policy": ideal_policy},
}


# -----------------------------------------------------------------------------
# Measuring

def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode has no formula for the CPU flash-attention kernel that sdpa runs on CPU, so every
# attention would count 0. Give it the same dense formula the GPU kernels get.
aten = torch.ops.aten
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def count_flops(fn, *args):
    """(FLOPs of fn(*args), its result)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        result = fn(*args)
    return counter.get_total_flops(), result


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_memory(fn, *args):
    """Peak bytes allocated while fn runs and still live, from the allocation events in time order
    (a free of a block that existed before the start has no event and is not counted). The event
    tree is a private torch API; the public tables sum allocations per op, not over time."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = [e for e in _walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation]
    sizes = [e.extra_fields.alloc_size for e in sorted(events, key=lambda e: e.start_time_ns)]
    return max(itertools.accumulate(sizes, initial=0))


def wall_times(bench, phase, runs):
    """Median seconds of each side's phase; one warm-up, then the sides alternate run by run."""
    fns = {side: SIDES[side][phase] for side in ("ours", "baseline")}
    times = {side: [] for side in fns}
    for i in range(runs + 1):
        for side, fn in fns.items():
            start = time.perf_counter()
            fn(bench)
            if i > 0:
                times[side].append(time.perf_counter() - start)
    return {side: statistics.median(t) for side, t in times.items()}


def check_agreement(bench, atol=1e-5):
    """Ours, the baseline and the ideal compute the same reference log-probs, policy log-probs and
    loss. Returns the largest difference from ours."""
    ours = [ours_reference(bench), *ours_policy(bench)]
    worst = 0.0
    for side in ("baseline", "ideal"):
        other = [SIDES[side]["reference"](bench), *SIDES[side]["policy"](bench)]
        for a, b in zip(ours, other):
            torch.testing.assert_close(b, a, atol=atol, rtol=0)
            worst = max(worst, (a - b).abs().max().item())
    return worst


def measure(bench, runs=RUNS):
    """{phase: {quantity: {side: value}}} for FLOPs, wall seconds and peak bytes."""
    table = {}
    for phase in PHASES:
        flops = {side: count_flops(SIDES[side][phase], bench)[0] for side in SIDES}
        memory = {side: peak_memory(SIDES[side][phase], bench) for side in ("ours", "baseline")}
        table[phase] = {"flops": flops, "wall": wall_times(bench, phase, runs), "memory": memory}
    return table


def attention_pairs(segments):
    """(query, key) pairs per layer of one packed forward with these segment ids [B, L]: all of them
    (a kernel that takes a dense mask), those of FlexAttention's computed 128 x 128 blocks (whole
    blocks, as its kernel computes them), and the visible ones (the ideal)."""
    B, L = segments.shape
    blocks = int(attention.block_mask(segments).to_dense().sum())
    return {"dense": B * L * L, "flex": blocks * 128 * 128, "visible": int(attention.dense_mask(segments).sum())}


def r1_aqa_segments(prompt=850, group_size=8, new=256):
    """One packed row at R1-AQA's lengths: a prompt of 850 tokens and 8 completions of 256."""
    completions = [torch.full((new,), i + 1) for i in range(group_size)]
    return torch.cat([torch.zeros(prompt, dtype=torch.long), *completions])[None]  # [1, L]


# -----------------------------------------------------------------------------
# Report

def totals(table):
    """The step: FLOPs and wall time add up over the phases; peak memory is the largest phase's."""
    combine = {"flops": sum, "wall": sum, "memory": max}
    return {q: {side: combine[q](table[phase][q][side] for phase in PHASES) for side in table["policy"][q]}
            for q in combine}


def print_table(table):
    print(f"{'phase':10s} {'GFLOP ours':>10s} {'baseline':>9s} {'ideal':>7s} {'o/b':>5s} {'o/i':>5s} "
          f"{'wall ours':>9s} {'baseline':>9s} {'o/b':>5s} {'peak MiB ours':>13s} {'baseline':>9s}")
    for name, row in [*table.items(), ("step", totals(table))]:
        f, w, m = row["flops"], row["wall"], row["memory"]
        print(f"{name:10s} {f['ours'] / 1e9:10.3f} {f['baseline'] / 1e9:9.3f} {f['ideal'] / 1e9:7.3f} "
              f"{f['ours'] / f['baseline']:5.2f} {f['ours'] / f['ideal']:5.2f} "
              f"{w['ours']:8.3f}s {w['baseline']:8.3f}s {w['ours'] / w['baseline']:5.2f} "
              f"{m['ours'] / 2**20:13.1f} {m['baseline'] / 2**20:9.1f}")


def print_load():
    """The machine's load before we start: other busy processes distort multi-threaded wall times."""
    load, cores, threads = os.getloadavg()[0], os.cpu_count(), torch.get_num_threads()
    print(f"load average {load:.1f} on {cores} cores, {threads} torch threads")
    if threads > 1 and load > 1:
        print("warning: other processes are running; wall times with several threads are unreliable "
              "(rerun with --threads 1)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--runs", type=int, default=RUNS, help="timed runs per phase, after one warm-up")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_load()
    bench = setup()
    P, N = bench.batch["input_ids"].shape[1], bench.rollout.completion_ids.size(0)
    print(f"tiny Qwen2-Audio, {SECONDS} s clips, B={len(SAMPLES)} prompts (padded length {P}), "
          f"G={GROUP_SIZE}, N={N} completions x T={NEW_TOKENS} tokens, fp32")
    print(f"log-probs and loss agree: max |ours - baseline or ideal| = {check_agreement(bench):.1e} (< 1e-5)")
    table = measure(bench, args.runs)
    print_table(table)
    print("o/b = ours / baseline, o/i = ours / ideal; the ideal is counted, not run for time or memory")
    step = totals(table)
    print(f"flops_ours_vs_baseline: {step['flops']['ours'] / step['flops']['baseline']:.2f}")
    print(f"flops_ours_vs_ideal: {step['flops']['ours'] / step['flops']['ideal']:.2f}")
    print(f"wall_ours_vs_baseline: {step['wall']['ours'] / step['wall']['baseline']:.2f}")
    for name, seg in [("this packed pass", packed.pack_groups(bench.rollout, bench.pad_id).segments),
                      ("R1-AQA, P=850 G=8 T=256", r1_aqa_segments())]:
        pairs = attention_pairs(seg)
        print(f"attention pairs per layer, {name}: dense {pairs['dense']:,}, FlexAttention blocks "
              f"{pairs['flex']:,}, visible {pairs['visible']:,} (dense / visible "
              f"{pairs['dense'] / pairs['visible']:.2f}, flex / visible {pairs['flex'] / pairs['visible']:.2f})")


if __name__ == "__main__":
    main()
