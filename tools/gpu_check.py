"""Check one GPU before renting eight: one GRPO step of a Qwen2-Audio with the 7B's widths and
vocabulary but only a few layers, in bf16 at R1-AQA's lengths, measured against what plan.py and
the hardware allow.

The model is random (built on the GPU, nothing downloaded): 30 s of audio, the R1-AQA prompt
(~850 tokens with the audio), G = 8 completions forced to 256 tokens (end tokens suppressed, as in
tools/bench_step.py), sharded with FSDP2 as train.py does (fp32 master weights, bf16 compute,
gradient checkpointing, a bf16 reference, AdamW). The second step is measured (the first makes the
AdamW moments and compiles FlexAttention). It prints:
  memory     peak GPU memory of each phase above the step's start, against plan.memory_plan for
             this depth and GPU count (a phase's plan = its largest moment), and the state
  decode     tokens per second of the decode loop against the HBM bound: each decode step reads
             the bf16 language-model weights and the whole preallocated KV cache once
  forward    the packed forward's useful TFLOP/s (visible pairs only, plan.py's formulas) against
             the GPU's bf16 dense peak
  attention  FlexAttention against the dense mask: time of the packed forward and of forward +
             backward, and the largest differences of the log-probs and of the gradients
  packing    bf16 packed log-probs against G separate forwards: the largest difference
  nccl       under torchrun with more than one GPU: all-gather (bf16) and reduce-scatter (fp32) of
             one decoder layer, and their bus bandwidth (nccl-tests' busbw)
The bandwidth and the peak are assumptions: vendor figures for the GPU names in GPUS, or
--hbm-tbps / --peak-tflops. On a machine without CUDA it says so in one line and exits 0.

    python tools/gpu_check.py                                       # one GPU, ~2 decoder layers
    torchrun --standalone --nproc_per_node 8 tools/gpu_check.py     # eight, with NCCL
    python tools/gpu_check.py --decoder-layers 4 --new-tokens 128 --compile-decode
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                          WhisperFeatureExtractor)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine import packed, sampler  # noqa: E402  (after the path insert)
import grpo  # noqa: E402
import model as M  # noqa: E402
from workshop import demo  # noqa: E402
from tools import plan  # noqa: E402
from data import SAMPLE_RATE, Sample  # noqa: E402

SAMPLE = Sample("", "What is the pitch of the tone in the audio?", ["very low", "low", "high", "very high"], "low", {})
# (name fragment, HBM bytes/s, bf16 dense FLOP/s): vendor spec sheets, first match wins. Assumptions.
GPUS = [("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12),
        ("A100-SXM4-40GB", 1.555e12, 312e12), ("A100", 2.0e12, 312e12)]


# -----------------------------------------------------------------------------
# The arithmetic of the bounds (pure; tests/test_gpu_check.py checks it by hand)

def gpu_spec(name):
    """(HBM bytes/s, bf16 dense FLOP/s) for a CUDA device name, or None if it is not in GPUS."""
    return next(((hbm, peak) for fragment, hbm, peak in GPUS if fragment in name), None)


def decode_bytes(counts, sizes, rows, cache_len):
    """Bytes one decode step reads: the language model's bf16 weights (its layers, lm_head; the
    embedding reads only `rows` rows) and the whole KV cache, k and v, of every layer, in bf16:
    the preallocated cache is read at its full length, masked slots included."""
    weights = (counts["lm_layers"] + counts["lm_head"]) * 2
    cache = 2 * sizes["layers"] * sizes["kv"] * cache_len * rows * 2
    return weights, cache


def decode_bound(weight_bytes, cache_bytes, rows, bandwidth):
    """Tokens per second when every step is limited by reading its bytes once: rows tokens per step."""
    return rows * bandwidth / (weight_bytes + cache_bytes)


def packed_flops(counts, sizes, group_size, prompt, new):
    """Useful FLOPs of one packed forward (one prompt): the encoder, the language model over the
    visible pairs only, lm_head at the G*T completion positions (plan.pass_flops)."""
    return sum(plan.pass_flops(counts, sizes, group_size, prompt, new, packed=True, attention="visible"))


def bus_bandwidth(nbytes, seconds, world):
    """nccl-tests' bus bandwidth of an all-gather or reduce-scatter of nbytes (the whole tensor):
    algbw = nbytes / seconds, times (world - 1) / world, what each link carries."""
    return nbytes / seconds * (world - 1) / world


def few_layer_config(audio_layers, decoder_layers, audio_token_id):
    """Qwen2-Audio-7B's config (model.config_7b) with fewer layers and another <|AUDIO|> id."""
    d = plan.config_7b().to_dict()
    d["audio_config"]["encoder_layers"] = audio_layers
    d["text_config"]["num_hidden_layers"] = decoder_layers
    d["text_config"].pop("layer_types", None)  # derived from the layer count
    d["audio_token_index"] = audio_token_id
    return Qwen2AudioConfig(**d)


# -----------------------------------------------------------------------------
# The step on the GPU

class Run:
    """The sharded policy and reference, AdamW, one prompt batch, and the sampling settings."""

    def __init__(self, args, device, config, tokenizer, seconds=30):
        features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=seconds)
        self.processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer)
        self.config = config
        torch.manual_seed(0)
        with torch.device(device):
            policy = Qwen2AudioForConditionalGeneration(config)           # fp32, random
        ref = copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False).eval()
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.policy, self.ref = M.shard(policy, torch.bfloat16), M.shard(ref)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-6)
        t = np.arange(seconds * SAMPLE_RATE) / SAMPLE_RATE
        self.batch = M.collate(self.processor, [SAMPLE], [(0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)])
        self.batch = self.batch.to(device)
        self.end_ids, self.pad_id = M.end_token_ids(tokenizer), tokenizer.pad_token_id
        self.suppress = M.suppressed_token_ids(tokenizer, config.text_config.vocab_size) + self.end_ids
        self.args, self.device = args, device
        self.flex = {"auto": None, "flex": True, "dense": False}[args.attention]

    @torch.no_grad()
    def rollout_prefill(self):
        """The rollout's prefill and fork alone: what check_decode subtracts."""
        self.policy.eval()
        with M.unsharded(self.policy):
            return sampler.prefill_and_fork(self.policy, self.batch, self.args.group_size, self.args.new_tokens)

    def rollout(self, compile_options=None):
        self.policy.eval()
        gens = grpo.prompt_generators(0, 0, [dist.get_rank()], self.device)
        with M.unsharded(self.policy):
            return sampler.generate_groups(self.policy, self.batch, gens, self.args.group_size, self.args.new_tokens,
                                        self.end_ids, self.pad_id, self.suppress, compile_options=compile_options)

    @torch.no_grad()
    def reference(self, rollout, flex=None):
        logp = packed.completion_logprobs(self.ref, rollout, self.pad_id, flex=self.flex if flex is None else flex)
        M.reshard(self.ref)
        return logp

    def policy_pass(self, rollout, ref_logp, flex=None):
        self.policy.train()
        logp = packed.completion_logprobs(self.policy, rollout, self.pad_id, flex=self.flex if flex is None else flex)
        advantages = grpo.group_advantages(torch.arange(logp.size(0), dtype=torch.float32, device=self.device),
                                           self.args.group_size)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), ref_logp, advantages, rollout.mask)
        loss.backward()
        return logp.detach()

    def optimizer_step(self):
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure_step(run):
    """({phase: peak bytes above the step's start}, bytes allocated at the start, the rollout)."""
    torch.cuda.synchronize()
    start, peaks = torch.cuda.memory_allocated(), {}

    def phase(name, fn, *args):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = fn(*args)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - start
        return result
    r = phase("rollout", run.rollout)
    ref_logp = phase("reference", run.reference, r)
    phase("policy", run.policy_pass, r, ref_logp)
    phase("optimizer", run.optimizer_step)
    return peaks, start, r


def seconds(fn, *args, repeats=3):
    """Median wall seconds of fn(*args) on the GPU, after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# -----------------------------------------------------------------------------
# The checks

def check_memory(run, world):
    """Two steps; the second's phase peaks against the plan for this config and GPU count."""
    measure_step(run)
    peaks, start, r = measure_step(run)
    P, args = len(r.prompt_ids[0]), run.args
    p = plan.memory_plan(run.config, gpus=world, prompts_per_gpu=1, group_size=args.group_size, prompt_tokens=P,
                         max_new_tokens=args.new_tokens)
    planned, gib = plan.phase_peaks(p), 2**30
    lines = [f"memory: {P} prompt tokens, G={args.group_size}, {r.completion_ids.size(1)} new tokens, {world} GPU(s); "
             f"GiB above the step's start",
             f"  {'phase':10s} {'measured':>9s} {'plan':>7s} {'plan/measured':>14s}"]
    lines += [f"  {k:10s} {peaks[k] / gib:9.2f} {planned[k] / gib:7.2f} {planned[k] / peaks[k]:14.2f}" for k in peaks]
    state = sum(row.bytes for row in p.rows if row.phase == "state")
    lines.append(f"  state      {start / gib:9.2f} {state / gib:7.2f} {state / start:14.2f}   "
                 "(allocated at the step's start)")
    return "\n".join(lines), r


def check_decode(run, r, bandwidth):
    """Decode tokens/s (generate_groups minus its prefill, forced full length) against the HBM bound."""
    G, T = run.args.group_size, run.args.new_tokens
    counts, sizes = plan.count_model(run.config)
    weights, cache = decode_bytes(counts, sizes, G, len(r.prompt_ids[0]) + T)
    bound = decode_bound(weights, cache, G, bandwidth)
    lines = [f"decode: {G} rows x {T - 1} steps; a step reads {weights / 1e9:.2f} GB of weights + "
             f"{cache / 1e9:.2f} GB of KV cache; bound {bound:.0f} tokens/s at {bandwidth / 1e12:.2f} TB/s (assumed)"]
    prefill = seconds(run.rollout_prefill)
    modes = {"eager": None} | ({"compiled": {"mode": "reduce-overhead"}} if run.args.compile_decode else {})
    for name, options in modes.items():
        rate = G * (T - 1) / (seconds(run.rollout, options) - prefill)
        lines.append(f"  {name:9s} {rate:9.0f} tokens/s = {rate / bound:.2f} of the bound")
    return "\n".join(lines)


def check_forward(run, r, peak):
    """The packed forward (the reference's pass: encoder + language model + lm_head at the completion
    positions, no grad) in useful TFLOP/s against the bf16 dense peak."""
    counts, sizes = plan.count_model(run.config)
    flops = packed_flops(counts, sizes, run.args.group_size, len(r.prompt_ids[0]), r.completion_ids.size(1))
    rate = flops / seconds(run.reference, r)
    return (f"forward: {flops / 1e12:.2f} TFLOP useful (visible pairs) per packed forward, {rate / 1e12:.0f} TFLOP/s "
            f"= {rate / peak:.2f} of {peak / 1e12:.0f} TFLOP/s bf16 dense peak (assumed)")


def local_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def check_attention(run, r):
    """FlexAttention against the dense mask on the same rollout: times, and the largest differences
    of the reference's log-probs and of the policy's gradients (relative to the largest gradient)."""
    ref = {flex: run.reference(r, flex) for flex in (True, False)}
    run.optimizer.zero_grad(set_to_none=True)
    run.policy_pass(r, ref[False], True)
    flex_grads = [g.clone() for g in local_grads(run.policy)]
    run.optimizer.zero_grad(set_to_none=True)
    run.policy_pass(r, ref[False], False)
    dense_grads = local_grads(run.policy)
    diff = max((a - b).abs().max().item() for a, b in zip(flex_grads, dense_grads))
    scale = max(b.abs().max().item() for b in dense_grads)
    flex_grads = dense_grads = None  # 2 x the gradients' memory, not wanted while timing
    times = {flex: (seconds(run.reference, r, flex), seconds(run.policy_pass, r, ref[False], flex))
             for flex in (True, False)}
    run.optimizer.zero_grad(set_to_none=True)
    return "\n".join([
        f"attention: flex vs dense, max |d logp| {(ref[True] - ref[False]).abs().max().item():.2e}, "
        f"max |d grad| {diff:.2e} ({diff / scale:.1e} of the largest gradient)",
        f"  forward          flex {times[True][0]:.3f} s   dense {times[False][0]:.3f} s   flex/dense "
        f"{times[True][0] / times[False][0]:.2f}",
        f"  forward+backward flex {times[True][1]:.3f} s   dense {times[False][1]:.3f} s   flex/dense "
        f"{times[True][1] / times[False][1]:.2f}"])


@torch.no_grad()
def separate_logprobs(model, rollout):
    """G separate [prompt, completion] forwards through the model's own forward (the slow reference)."""
    prompt, out = rollout.prompt_ids[0], torch.zeros(rollout.completion_ids.shape, device=rollout.mask.device)
    P = len(prompt)
    for n, ids in enumerate(rollout.completion_ids):
        seq = torch.cat([prompt, ids])[None]
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), input_features=rollout.input_features,
                       feature_attention_mask=rollout.feature_attention_mask).logits[0]
        out[n] = logits[P - 1:-1].float().log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
    M.reshard(model)
    return out


def check_packing(run, r):
    packed, separate = run.reference(r), separate_logprobs(run.ref, r)
    return (f"packing: bf16 packed log-probs vs {r.completion_ids.size(0)} separate forwards, max |d logp| "
            f"{(packed - separate).abs().max().item():.2e} (mean |logp| {separate.abs().mean().item():.2f})")


def check_nccl(run, device, world):
    """All-gather of one decoder layer in bf16 and reduce-scatter of it in fp32, as FSDP2 does."""
    counts, _ = plan.count_model(run.config)
    numel = counts["lm_layer"] // world * world
    lines = [f"nccl: {world} GPUs, one decoder layer ({numel / 1e6:.0f}M parameters)"]
    shard = torch.randn(numel // world, dtype=torch.bfloat16, device=device)
    whole = torch.empty(numel, dtype=torch.bfloat16, device=device)
    t = seconds(dist.all_gather_into_tensor, whole, shard, repeats=10)
    lines.append(f"  all-gather bf16     {numel * 2 / 1e9:.2f} GB in {t * 1e3:.1f} ms, "
                 f"bus bandwidth {bus_bandwidth(numel * 2, t, world) / 1e9:.0f} GB/s")
    full, out = torch.randn(numel, device=device), torch.empty(numel // world, device=device)
    t = seconds(dist.reduce_scatter_tensor, out, full, repeats=10)
    lines.append(f"  reduce-scatter fp32 {numel * 4 / 1e9:.2f} GB in {t * 1e3:.1f} ms, "
                 f"bus bandwidth {bus_bandwidth(numel * 4, t, world) / 1e9:.0f} GB/s")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio-layers", type=int, default=2, help="audio encoder layers (the 7B has 32)")
    parser.add_argument("--decoder-layers", type=int, default=2, help="language model layers (the 7B has 32)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256, help="every completion is forced to this length")
    parser.add_argument("--attention", choices=("auto", "flex", "dense"), default="auto",
                        help="the step's packed attention: auto = FlexAttention on CUDA")
    parser.add_argument("--compile-decode", action="store_true",
                        help="also time the decode loop under torch.compile(mode='reduce-overhead'): CUDA graphs")
    parser.add_argument("--hbm-tbps", type=float, help="HBM bandwidth, TB/s (default: by GPU name, see GPUS)")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak, TFLOP/s (default: by GPU name)")
    return parser.parse_args(argv)


def hardware(args, device):
    """(HBM bytes/s, bf16 FLOP/s): the flags, else the GPU name's entry in GPUS."""
    name = torch.cuda.get_device_name(device)
    spec = gpu_spec(name) or (None, None)
    bandwidth = args.hbm_tbps * 1e12 if args.hbm_tbps else spec[0]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else spec[1]
    if bandwidth is None or peak is None:
        raise M.UsageError(f"GPU {name!r} has no known figures: give --hbm-tbps and --peak-tflops")
    return bandwidth, peak


def main(argv=None):
    args = parse(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine, nothing to check; run it on the GPU machine")
        return 0
    rank, world, device = M.init_distributed(always=True)
    bandwidth, peak = hardware(args, device)
    tokenizer = demo.build_tokenizer()  # the tiny one: ids past it are never sampled
    config = few_layer_config(args.audio_layers, args.decoder_layers, tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    run = Run(args, device, config, tokenizer)
    M.print0(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
             f"{sum(p.numel() for p in run.policy.parameters()) / 1e9:.2f}B parameters "
             f"({args.audio_layers} audio + {args.decoder_layers} decoder layers at the 7B's widths)")
    report, r = check_memory(run, world)
    M.print0(report)
    for check in (lambda: check_decode(run, r, bandwidth), lambda: check_forward(run, r, peak),
                  lambda: check_attention(run, r), lambda: check_packing(run, r)):
        M.print0(check())
    if world > 1:
        M.print0(check_nccl(run, device, world))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(M.run_main(main))
