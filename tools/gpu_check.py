"""Check the GPUs before renting eight for a day: what a real run does, in minutes, then a table of what passed
and what to change (--micro-batch, --keep-last, --dist-timeout-minutes) for these GPUs and this disk.
Random models with the 7B's widths and 2 + 2 layers (nothing downloaded) go through train.py's own code;
docs/performance.md "Before renting eight GPUs" says what each section checks. Without CUDA: one line, exit 0.

    torchrun --standalone --nproc_per_node 8 -m tools.gpu_check --out /disk/of/the/run
"""

import argparse
import math
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters  # dynamo's count of compiled graphs: torch has no public one
from transformers import WhisperFeatureExtractor

import checkpoint
import config
import data
import grpo
import model as M
import train as T
from data import SAMPLE_RATE, Sample
from engine import attention, packed, sampler
from recipes import lora
from tools import plan
from workshop import demo

SAMPLE = Sample("", "What is the pitch of the tone in the audio?", ["very low", "low", "high", "very high"], "low", {})
# (name fragment, HBM bytes/s, bf16 dense FLOP/s): vendor spec sheets, first match wins. Assumptions.
GPUS = [("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12),
        ("A100-SXM4-40GB", 1.555e12, 312e12), ("A100", 2.0e12, 312e12)]
# The random models rarely sample their 2 end tokens; these 40 more (ordinary ids of the tiny tokenizer) end
# completions at many lengths, so early stops and rows of several lengths are exercised.
EXTRA_ENDS = list(range(100, 140))


# -----------------------------------------------------------------------------
# The arithmetic of the bounds (pure; tests/tools/test_gpu_check.py checks it by hand)

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


def few_layer_config(family, tokenizer, audio_layers=2, decoder_layers=2, full_vocab=True):
    """The family's 7B config (plan.config_7b) with fewer layers and the tiny tokenizer's special token ids;
    its vocabulary is the 7B's (ids past the tokenizer are never sampled) or, without full_vocab, the
    tokenizer's. Omni's vision tower, which audio never runs, is the smallest the class builds."""
    d = plan.config_7b(family).to_dict()
    d["audio_config"]["encoder_layers"] = audio_layers
    d["text_config"]["num_hidden_layers"] = decoder_layers
    d["text_config"].pop("layer_types", None)  # derived from the layer count
    if not full_vocab:
        d["text_config"]["vocab_size"] = len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    d["audio_token_index"] = ids("<|AUDIO|>")
    if family == "omni":
        d["vision_config"].update(depth=1, fullatt_block_indexes=[0])
        d.update(image_token_index=ids("<|IMAGE|>"), video_token_index=ids("<|VIDEO|>"),
                 audio_start_token_id=ids("<|audio_bos|>"), audio_end_token_id=ids("<|audio_eos|>"),
                 vision_start_token_id=ids("<|vision_bos|>"))
    return demo.family_record(family).config_class(**d)


def timeout_minutes(save_seconds, save_bytes, bytes_7b, timeout):
    """(minutes a 7B save takes at the measured speed, the --dist-timeout-minutes to use). A whole save bounds
    every wait inside it; the timeout keeps twice that, and never less than the one given."""
    minutes = save_seconds * bytes_7b / save_bytes / 60
    return minutes, max(timeout, math.ceil(2 * minutes))


def largest_fit(sizes, budget):
    """The largest setting whose size fits the budget ({setting: bytes}, in increasing order), or None."""
    return max((k for k, size in sizes.items() if size <= budget), default=None)


# -----------------------------------------------------------------------------
# The check: its models, its sections, its table

class Failed(Exception):
    """A section's figures are not what a working run gives."""


@dataclass
class Result:
    name: str
    passed: bool
    seconds: float
    detail: str


class Check:
    """What the sections share: the flags, the process group, OUT/gpu-check/ and the models written there, and
    the figures the advice needs. configs(family, tokenizer, full_vocab) builds a model's config;
    seconds is the audio window of every model (30 s, R1-AQA's)."""

    def __init__(self, args, device, configs=None, seconds=30):
        self.args, self.device, self.seconds = args, device, seconds
        self.configs = configs or (lambda family, tok, full: few_layer_config(
            family, tok, args.audio_layers, args.decoder_layers, full))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.work = Path(args.out) / "gpu-check"
        self.folders, self.figures, self.big, self.trained = {}, {}, None, None

    def model(self, family, full_vocab):
        """The folder of a random model (rank 0 writes it once, in bf16, with its processor)."""
        key = (family, full_vocab)
        if key not in self.folders:
            folder = self.work / f"{family}-{'7b-vocab' if full_vocab else 'small-vocab'}"
            if self.rank == 0:
                write_model(folder, family, self.configs, full_vocab, self.seconds, self.device)
            dist.barrier()  # written before any rank reads it
            self.folders[key] = folder
        return self.folders[key]

    def clips(self):
        """Seconds of audio of a micro-batch's 2 prompts: a third and five sixths of the window (10 and 25 s)."""
        return [self.seconds / 3, self.seconds * 5 / 6]

    def step_model(self):
        """The 7B-vocabulary Qwen2-Audio as train.py builds it (Big), made once for the sections that time it."""
        if self.big is None:
            self.big = Big(self, self.model("qwen2-audio", full_vocab=True))
        return self.big


def write_model(folder, family, configs, full_vocab, seconds, device):
    """A random model of the family and its processor (the tiny tokenizer, a Whisper feature extractor of
    `seconds`) in bf16, as from_pretrained and train.py find a downloaded one."""
    fam = demo.family_record(family)
    tokenizer = demo.build_tokenizer(special_tokens=fam.special_tokens, named_tokens=fam.named_tokens)
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=seconds)
    processor = fam.processor_class(feature_extractor=features, tokenizer=tokenizer, chat_template=fam.chat_template)
    torch.manual_seed(0)
    with torch.device(device):
        model = M.for_audio(fam.model_class(configs(family, tokenizer, full_vocab)), fam).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = M.end_token_ids(tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def tone(seconds, hz=440.0):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def sampled(c, model, processor, clips, group_size, new_tokens, forced=False, seed=0):
    """A rollout of this rank's prompts (one per clip length, left-padded in one micro-batch) by train.py's sampler
    inside model.unsharded: completions end at many lengths (EXTRA_ENDS), or with forced, never before new_tokens."""
    tok, vocab = processor.tokenizer, model.config.text_config.vocab_size
    batch = M.collate(processor, [SAMPLE] * len(clips), [tone(s) for s in clips]).to(c.device)
    ends, suppress = M.end_token_ids(tok), M.suppressed_token_ids(tok, vocab)
    ends, suppress = (ends, suppress + ends) if forced else (ends + EXTRA_ENDS, suppress)
    gens = grpo.prompt_generators(seed, 0, [c.rank * len(clips) + i for i in range(len(clips))], c.device)
    model.eval()
    with M.unsharded(model):
        return sampler.generate_groups(model, batch, gens, group_size, new_tokens, ends, tok.pad_token_id, suppress)


@contextmanager
def calls_of(module, name):
    """The wall seconds of every call of module.name while inside (a collective FSDP looks up at call time,
    train.loop's checkpoint.save): one record a call."""
    real, records = getattr(module, name), []

    def timed(*args, **kwargs):
        t0 = time.time()
        out = real(*args, **kwargs)
        records.append(time.time() - t0)
        return out
    setattr(module, name, timed)
    try:
        yield records
    finally:
        setattr(module, name, real)


def max_over_ranks(x):
    t = torch.tensor([float(x)], device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def require(ok, detail):
    """The section's detail, or Failed on every rank if ok is False on any."""
    if max_over_ranks(not ok):
        raise Failed(detail)
    return detail


def run_sections(c):
    """Every section in order on every rank. One that fails is reported and the next one starts: each fails on
    every rank together (its verdict is reduced over ranks) unless a rank dies inside a collective, which the
    process group's timeout ends."""
    results = []
    for name, section in SECTIONS:
        t0 = time.time()
        try:
            detail, passed = section(c), True
        except Failed as e:
            detail, passed = str(e), False
        except (RuntimeError, ValueError, AssertionError, OSError, M.UsageError) as e:
            detail, passed = f"{type(e).__name__}: {e}", False
        results.append(Result(name, passed, time.time() - t0, detail))
        M.print0(f"[{name}] {'passed' if passed else 'FAILED'} in {results[-1].seconds:.0f} s\n{detail}\n")
    return results


def table(results):
    lines = [f"{'section':11s} {'result':6s} {'seconds':>8s}  summary"]
    lines += [f"{r.name:11s} {'PASS' if r.passed else 'FAIL':6s} {r.seconds:8.1f}  {r.detail.splitlines()[0][:90]}"
              for r in results]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Sections: loading, rollouts, compiles

def plain_rollout(c, family, full_vocab):
    """The model a section checks against: loaded plain (M.load), a rollout on this rank's clips, and that
    rollout's packed log-probs with the dense mask. Returns (folder, model, processor, rollout, log-probs)."""
    folder = c.model(family, full_vocab=full_vocab)
    plain, processor = M.load(folder, dtype=torch.bfloat16, device=c.device)
    r = sampled(c, plain, processor, c.clips(), c.args.group_size, 16)
    with torch.no_grad():
        expected = packed.completion_logprobs(plain, r, processor.tokenizer.pad_token_id, flex=False)
    return folder, plain, processor, r, expected


def section_load(c):
    """sharded_load (meta init, to_empty, broadcast from rank 0, rotary reset), LoRA loading (the frozen base
    kept whole on every rank and broadcast, ignored by FSDP; adapters sharded) and the reference copied from
    the policy's shards: each one's packed log-probs on this rank's rollout against a plain model's (M.load)."""
    folder, plain, processor, r, expected = plain_rollout(c, "qwen2-audio", full_vocab=True)
    pad = processor.tokenizer.pad_token_id
    rotary = [b for n, b in plain.named_buffers() if n.endswith("inv_freq")]
    del plain
    policy = M.sharded_load(folder, param_dtype=torch.bfloat16)
    adapted = M.sharded_load(folder, param_dtype=torch.bfloat16, adapters=lora.LoRA(lora.LoRASettings(rank=8)))
    diffs = {}
    for name, model in (("policy", policy), ("reference", M.sharded_copy(policy, torch.bfloat16)), ("LoRA", adapted)):
        with torch.no_grad():
            logp = packed.completion_logprobs(model.eval(), r, pad, flex=False)
        diffs[name] = max_over_ranks((logp - expected).abs().max())
        M.reshard(model)
    frozen = [p for p in adapted.parameters() if not p.requires_grad]
    ignored = all(not hasattr(p, "to_local") for p in frozen) and all(hasattr(p, "to_local") for p in T.trainable(adapted))
    same_rotary = all(torch.equal(a, b) for a, b in zip(rotary, (b for n, b in policy.named_buffers() if n.endswith("inv_freq"))))
    detail = ("max |d logp| against a plain model, bf16: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
              + f"; LoRA base ignored by FSDP: {ignored}; rotary frequencies equal: {same_rotary}")
    return require(max(diffs.values()) < 0.05 and ignored and same_rotary, detail)


def section_rollout(c):
    """A micro-batch of 2 prompts of different lengths per rank (padding rows), completions of many lengths and
    early stops: one all-gather per FSDP unit for the whole rollout (none on one process), and the packed
    log-probs (FlexAttention where it runs) against grpo.py's plain ones (a [prompt, completion] row each)."""
    big = c.step_model()
    with calls_of(dist, "all_gather_single") as gathers:  # FSDP2's gather in torch 2.13, looked up at call time
        r = sampled(c, big.policy, big.processor, c.clips(), c.args.group_size, c.args.new_tokens)
    lengths = r.mask.sum(1)
    units = len(M.fsdp_units(big.policy))
    with torch.no_grad():
        plain = grpo.completion_logprobs(big.ref, r, big.processor.tokenizer.pad_token_id)
    M.reshard(big.ref)
    diff = max_over_ranks((big.reference(r) - plain).abs().max())
    detail = (f"{r.completion_ids.size(0)} completions of {lengths.min().item()}..{lengths.max().item()} tokens "
              f"(limit {c.args.new_tokens}), prompts of {sorted(len(p) for p in r.prompt_ids)} tokens; "
              f"all-gathers {len(gathers)} for {units} FSDP units; packed vs plain max |d logp| {diff:.1e}")
    varied = len(set(lengths.tolist())) > 1 and lengths.min() < c.args.new_tokens
    return require(len(gathers) == (units if c.world > 1 else 0) and diff < 0.1 and varied, detail)


def section_recompiles(c):
    """FlexAttention as the packed passes call it (attention.compiled_flex), on this model's heads, over three
    packed lengths at R1-AQA's prompt (850 tokens, G = 8, T = 64, 128, 256): the graphs compiled (1 expected)."""
    text = c.step_model().config.text_config
    heads, kv, dim = text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    before, lengths = counters["stats"]["unique_graphs"], []
    for new in (64, 128, 256):
        seg = torch.tensor([[0] * plan.PROMPT_TOKENS + [i + 1 for i in range(8) for _ in range(new)]], device=c.device)
        q = torch.randn(1, heads, seg.size(1), dim, dtype=torch.bfloat16, device=c.device)
        k = torch.randn(1, kv, seg.size(1), dim, dtype=torch.bfloat16, device=c.device)
        attention.compiled_flex()(q, k, k, block_mask=attention.block_mask(seg), scale=dim ** -0.5, enable_gqa=heads != kv)
        lengths.append(f"{seg.size(1)} ({-(-seg.size(1) // plan.BLOCK)} blocks)")
    graphs = counters["stats"]["unique_graphs"] - before
    return require(graphs <= 1, f"{graphs} graph(s) compiled over packed lengths {', '.join(lengths)}; 1 expected "
                                "(TORCH_LOGS=recompiles names the guard that failed)")


# -----------------------------------------------------------------------------
# Sections: the step's memory and speed on the 7B-vocabulary model

class Big:
    """The sharded policy (fp32 master, bf16 compute, gradient checkpointing), its reference copied from it, AdamW,
    and one prompt of 30 s of audio: R1-AQA's lengths."""

    def __init__(self, c, folder):
        self.c, self.args, self.device = c, c.args, c.device
        self.processor = M.load_processor(folder)
        self.config = plan.load_config(str(folder))
        self.policy = M.sharded_load(folder, param_dtype=torch.bfloat16, gradient_checkpointing=True)
        self.ref = M.sharded_copy(self.policy, torch.bfloat16).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(T.trainable(self.policy), lr=1e-6)
        self.flex = {"auto": None, "flex": True, "dense": False}[c.args.attention]

    def rollout(self):
        return sampled(self.c, self.policy, self.processor, [self.c.seconds], self.args.group_size, self.args.new_tokens,
                       forced=True)

    @torch.no_grad()
    def rollout_prefill(self):
        """The rollout's prefill and fork alone: what section_decode subtracts."""
        batch = M.collate(self.processor, [SAMPLE], [tone(self.c.seconds)]).to(self.device)
        self.policy.eval()
        with M.unsharded(self.policy):
            return sampler.prefill_and_fork(self.policy, batch, self.args.group_size, self.args.new_tokens)

    @torch.no_grad()
    def reference(self, rollout, flex=None):
        logp = packed.completion_logprobs(self.ref, rollout, self.processor.tokenizer.pad_token_id,
                                          flex=self.flex if flex is None else flex)
        M.reshard(self.ref)
        return logp

    def policy_pass(self, rollout, ref_logp, flex=None):
        self.policy.train()
        logp = packed.completion_logprobs(self.policy, rollout, self.processor.tokenizer.pad_token_id,
                                          flex=self.flex if flex is None else flex)
        advantages = grpo.group_advantages(torch.arange(logp.size(0), dtype=torch.float32, device=self.device),
                                           rollout.group_size)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), ref_logp, advantages, rollout.mask)
        loss.backward()
        return logp.detach()

    def optimizer_step(self):
        return T.clip_and_step(self.policy, self.optimizer, 1.0)


def measure_step(big):
    """({phase: peak bytes above the step's start}, bytes allocated at the start, the rollout, the grad norm)."""
    torch.cuda.synchronize()
    start, peaks = torch.cuda.memory_allocated(), {}

    def phase(name, fn, *args):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = fn(*args)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - start
        return result
    r = phase("rollout", big.rollout)
    ref_logp = phase("reference", big.reference, r)
    phase("policy", big.policy_pass, r, ref_logp)
    norm, finite = phase("optimizer", big.optimizer_step)
    return peaks, start, r, norm if finite else float("nan")


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


def section_memory(c):
    """Two GRPO steps (the first makes AdamW's moments); the second's phase peaks against plan.memory_plan for this
    model and GPU count; the ratio scales the 7B's plan in the advice. The gradient norm is clip_grad_norm_'s
    over the DTensor shards."""
    big = c.step_model()
    measure_step(big)
    peaks, start, r, norm = measure_step(big)
    c.figures["rollout"] = r
    P, args = len(r.prompt_ids[0]), c.args
    p = plan.memory_plan(big.config, gpus=c.world, prompts_per_gpu=1, group_size=args.group_size, prompt_tokens=P,
                         max_new_tokens=args.new_tokens)
    planned, gib = plan.phase_peaks(p), 2**30
    state = sum(row.bytes for row in p.rows if row.phase == "state")
    c.figures["memory_ratio"] = max_over_ranks((start + max(peaks.values())) / p.total)
    lines = [f"measured/plan {c.figures['memory_ratio']:.2f} for the whole step; grad norm {norm:.3g}; {P} prompt "
             f"tokens, G={args.group_size}, {r.completion_ids.size(1)} new tokens, {c.world} GPU(s); GiB above the "
             f"step's start", f"  {'phase':10s} {'measured':>9s} {'plan':>7s} {'plan/measured':>14s}"]
    lines += [f"  {k:10s} {peaks[k] / gib:9.2f} {planned[k] / gib:7.2f} {planned[k] / peaks[k]:14.2f}" for k in peaks]
    lines.append(f"  state      {start / gib:9.2f} {state / gib:7.2f} {state / start:14.2f}   (allocated at the step's start)")
    return require(math.isfinite(norm), "\n".join(lines))


def section_decode(c):
    """Decode tokens/s (the rollout minus its prefill, forced to full length) against the HBM bound."""
    big, (bandwidth, _) = c.step_model(), hardware(c.args, c.device)
    G, Tn, r = c.args.group_size, c.args.new_tokens, c.figures.get("rollout") or c.step_model().rollout()
    counts, sizes = plan.count_model(big.config)
    weights, cache = decode_bytes(counts, sizes, G, len(r.prompt_ids[0]) + Tn)
    bound = decode_bound(weights, cache, G, bandwidth)
    rate = G * (Tn - 1) / (seconds(big.rollout) - seconds(big.rollout_prefill))
    return (f"{rate:.0f} tokens/s = {rate / bound:.2f} of the bound: {G} rows x {Tn - 1} steps; a step reads "
            f"{weights / 1e9:.2f} GB of weights + {cache / 1e9:.2f} GB of KV cache; bound {bound:.0f} tokens/s at "
            f"{bandwidth / 1e12:.2f} TB/s (assumed)")


def section_forward(c):
    """The packed forward (the reference's pass: encoder + language model + lm_head at the completion positions,
    no grad) in useful TFLOP/s against the bf16 dense peak."""
    big, (_, peak) = c.step_model(), hardware(c.args, c.device)
    r = c.figures.get("rollout") or big.rollout()
    counts, sizes = plan.count_model(big.config)
    flops = packed_flops(counts, sizes, c.args.group_size, len(r.prompt_ids[0]), r.completion_ids.size(1))
    rate = flops / seconds(big.reference, r)
    return (f"{rate / 1e12:.0f} TFLOP/s = {rate / peak:.2f} of {peak / 1e12:.0f} TFLOP/s bf16 dense peak (assumed); "
            f"{flops / 1e12:.2f} TFLOP useful (visible pairs) per packed forward")


def local_grads(model):
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def section_attention(c):
    """FlexAttention against the dense mask on the same rollout: the largest differences of the reference's
    log-probs and of the policy's gradients (relative to the largest), and the time of each pass."""
    big = c.step_model()
    r = c.figures.get("rollout") or big.rollout()
    ref = {flex: big.reference(r, flex) for flex in (True, False)}
    big.optimizer.zero_grad(set_to_none=True)
    big.policy_pass(r, ref[False], True)
    flex_grads = [g.clone() for g in local_grads(big.policy)]
    big.optimizer.zero_grad(set_to_none=True)
    big.policy_pass(r, ref[False], False)
    dense_grads = local_grads(big.policy)
    diff = max_over_ranks(max((a - b).abs().max().item() for a, b in zip(flex_grads, dense_grads)))
    scale = max_over_ranks(max(b.abs().max().item() for b in dense_grads))
    flex_grads = dense_grads = None  # 2 x the gradients' memory, not wanted while timing
    times = {flex: (seconds(big.reference, r, flex), seconds(big.policy_pass, r, ref[False], flex)) for flex in (True, False)}
    big.optimizer.zero_grad(set_to_none=True)
    logp_diff = max_over_ranks((ref[True] - ref[False]).abs().max())
    return require(logp_diff < 0.05 and diff <= 1e-2 * scale, "\n".join([
        f"flex vs dense: max |d logp| {logp_diff:.2e}, max |d grad| {diff:.2e} ({diff / scale:.1e} of the largest)",
        f"  forward          flex {times[True][0]:.3f} s   dense {times[False][0]:.3f} s   flex/dense "
        f"{times[True][0] / times[False][0]:.2f}",
        f"  forward+backward flex {times[True][1]:.3f} s   dense {times[False][1]:.3f} s   flex/dense "
        f"{times[True][1] / times[False][1]:.2f}"]))


def section_nccl(c):
    """All-gather of one decoder layer in bf16 and reduce-scatter of it in fp32, as FSDP2 does (more than one GPU)."""
    if c.world == 1:
        return "one process: nothing to measure"
    counts, _ = plan.count_model(c.step_model().config)
    numel = counts["lm_layer"] // c.world * c.world
    shard = torch.randn(numel // c.world, dtype=torch.bfloat16, device=c.device)
    whole = torch.empty(numel, dtype=torch.bfloat16, device=c.device)
    t = seconds(dist.all_gather_single, whole, shard, repeats=10)
    lines = [f"{c.world} GPUs, one decoder layer ({numel / 1e6:.0f}M parameters)",
             f"  all-gather bf16     {numel * 2 / 1e9:.2f} GB in {t * 1e3:.1f} ms, bus bandwidth "
             f"{bus_bandwidth(numel * 2, t, c.world) / 1e9:.0f} GB/s"]
    full, out = torch.randn(numel, device=c.device), torch.empty(numel // c.world, device=c.device)
    t = seconds(dist.reduce_scatter_single, out, full, repeats=10)
    lines.append(f"  reduce-scatter fp32 {numel * 4 / 1e9:.2f} GB in {t * 1e3:.1f} ms, bus bandwidth "
                 f"{bus_bandwidth(numel * 4, t, c.world) / 1e9:.0f} GB/s")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Sections: train.py's loop, evaluate.py's generation, Qwen2.5-Omni

def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def training_flags(c, folder, task, out):
    """train.py's flags for the loop: every GPU gets 2 prompts in one micro-batch, 2 x GPUs + 1 held-out
    questions (uneven shares), a save at every step and --keep-last 1, a warm start of 2 steps where its batch of
    16 splits over the GPUs (so that rewards differ within groups), dynamic sampling of one extra round."""
    warm = 2 if config.WARM_START_BATCH % c.world == 0 else 0
    return ["--model", str(folder), "--data", str(task / "train.jsonl"), "--eval-data", str(task / "test.jsonl"),
            "--eval-samples", str(2 * c.world + 1), "--eval-every", "1", "--out", str(out), "--max-steps", "2",
            "--prompts-per-step", str(2 * c.world), "--micro-batch", "2", "--group-size", str(c.args.group_size),
            "--max-new-tokens", str(min(c.args.new_tokens, 32)), "--dynamic-sampling", "1", "--save-every", "1",
            "--keep-last", "1", "--warm-start-steps", str(warm), "--warm-start-lr", "1e-2", "--lr", "1e-5",
            "--overwrite", "--dist-timeout-minutes", str(c.args.dist_timeout_minutes)]


def section_training(c):
    """train.py's setup and loop on the small-vocabulary model: 2 steps, then --resume for a third. Every step
    finishes with a finite gradient norm and scores every held-out question once; the run folder ends with the
    newest checkpoint (and checkpoint-0) only. The saves are timed and scaled to the 7B's checkpoint."""
    folder, task, out = c.model("qwen2-audio", full_vocab=False), c.work / "synthetic", c.work / "run"
    if c.rank == 0:
        demo.make_synthetic(task, n_train=64, n_test=32)
    dist.barrier()  # the task is written before any rank reads it
    cfg, _ = config.parse_args(training_flags(c, folder, task, out))
    config.validate(cfg, c.world)
    history = []
    with calls_of(checkpoint, "save") as saves:
        for cfg in (cfg, replace(cfg, max_steps=3, resume=True, overwrite=False)):
            run, held_out, start = T.setup(cfg, T.recipe_for(cfg), c.device)
            history += T.loop(run, start, held_out)
    c.trained = run
    dist.barrier()  # rank 0 prunes after the last save's barrier: the folder is final once it gets here
    kept = [p.name for p in checkpoint.complete(out)]
    size = folder_bytes(out / "checkpoint-3")
    c.figures["save"] = (max(saves), size)
    counts, _ = plan.count_model(plan.config_7b())
    minutes, _ = timeout_minutes(max(saves), size, plan.checkpoint_bytes(counts, plan.Step()), cfg.dist_timeout_minutes)
    expected = (["checkpoint-0"] if cfg.warm_start_steps else []) + ["checkpoint-3"]
    detail = (f"steps {[h['step'] for h in history]} (resumed at {start}); held-out questions scored "
              f"{[h['eval_questions'] for h in history]} of {cfg.eval_samples}; grad norms "
              f"{[round(h['grad_norm'], 3) for h in history]}; prompts sampled {[h['prompts_sampled'] for h in history]}; "
              f"kept {kept}; saves {', '.join(f'{s:.1f}' for s in saves)} s for {size / 1e9:.2f} GB: a 7B checkpoint "
              f"(117.5 GB) ~{minutes:.1f} min at that speed, --dist-timeout-minutes {cfg.dist_timeout_minutes:g}")
    ok = ([h["step"] for h in history] == [1, 2, 3] and start == 2 and kept == expected
          and all(h["eval_questions"] == cfg.eval_samples and math.isfinite(h["grad_norm"]) for h in history))
    return require(ok, detail)


def section_evaluate(c):
    """evaluate.py's generation (model.generate) on the trained sharded policy inside model.unsharded (training's
    held-out path) against a plain model loaded from the run's last checkpoint: the same greedy completions on
    this rank's questions (2 each)."""
    if c.trained is None:
        raise Failed("no trained policy: the training section failed")
    run, c.trained = c.trained, None
    samples = run.questions[2 * c.rank:2 * c.rank + 2]
    audios, _ = data.read_audio(samples, run.cfg.downmix)
    args = (run.processor, samples, audios, run.cfg.prompt, 16)
    run.policy.eval()
    with M.unsharded(run.policy):
        sharded = M.generate(run.policy, *args)
    plain, _ = M.load(Path(run.cfg.out) / "checkpoint-3", dtype=torch.bfloat16, device=c.device)
    differ = max_over_ranks(sum(a != b for a, b in zip(sharded, M.generate(plain, *args))))
    return require(differ == 0, f"{int(differ)} of {2 * c.world} greedy completions differ between the sharded "
                                f"policy and checkpoint-3 loaded plain; e.g. {sharded[0]!r}")


def section_omni(c):
    """Qwen2.5-Omni's thinker (7B widths, 2 + 2 layers, small vocabulary): sharded_load, a rollout of two clip
    lengths (its encoder reads only the real frames), packed log-probs against a plain model, one GRPO step."""
    folder, plain, processor, r, expected = plain_rollout(c, "omni", full_vocab=False)
    pad = processor.tokenizer.pad_token_id
    del plain
    policy = M.sharded_load(folder, param_dtype=torch.bfloat16).train()
    logp = packed.completion_logprobs(policy, r, pad)
    diff = max_over_ranks((logp.detach() - expected).abs().max())
    advantages = grpo.group_advantages(torch.arange(logp.size(0), dtype=torch.float32, device=c.device), r.group_size)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, advantages, r.mask, beta=0.0)
    loss.backward()
    norm, finite = T.clip_and_step(policy, torch.optim.AdamW(T.trainable(policy), lr=1e-6), 1.0)
    return require(diff < 0.05 and finite, f"max |d logp| against a plain model {diff:.1e}; one step, grad norm "
                                           f"{norm:.3g}; prompts of {sorted(len(p) for p in r.prompt_ids)} tokens")


SECTIONS = [("load", section_load), ("rollout", section_rollout), ("recompiles", section_recompiles),
            ("memory", section_memory), ("decode", section_decode), ("forward", section_forward),
            ("attention", section_attention), ("nccl", section_nccl), ("training", section_training),
            ("evaluate", section_evaluate), ("omni", section_omni)]


# -----------------------------------------------------------------------------
# What to change, for these GPUs and this disk

def advice(c, gpu_bytes, free_bytes):
    """The settings of a real 7B run (R1-AQA's: 16 prompts, 1000 steps, a save every 100) on --gpus of these GPUs
    and the disk of --out, from the plan corrected by what the sections measured."""
    config = plan.config_7b()
    counts = plan.count_model(config)[0]
    lines = [f"For the 7B on {c.args.gpus} x {gpu_bytes / 2**30:.0f} GiB, R1-AQA's settings, --out {c.args.out}:"]
    ratio = c.figures.get("memory_ratio")
    if ratio is None:
        lines.append("  --micro-batch: no advice (the memory section failed)")
    else:
        share = max(16 // c.args.gpus, 1)
        totals = {mb: plan.memory_plan(config, gpus=c.args.gpus, prompts_per_gpu=mb).total * max(ratio, 1.0)
                  for mb in (1, 2, 4, 8, 16) if share % mb == 0}
        best = largest_fit(totals, gpu_bytes)
        lines.append(f"  --micro-batch {best}: the plan x {max(ratio, 1.0):.2f} (measured/plan) is "
                     f"{totals[best] / 2**30:.1f} GiB of {gpu_bytes / 2**30:.0f}" if best else
                     f"  --micro-batch: even 1 needs {totals[1] / 2**30:.1f} GiB: use LoRA (--lora-rank) or more GPUs")
    disk = {k: plan.disk_plan(counts, plan.Step(), keep_last=k).total for k in range(1, 11)}
    keep = largest_fit(disk, free_bytes)
    lines.append(f"  --keep-last {keep}: {keep + 1} checkpoints of 117.5 GB at once, {disk[keep] / 1e9:.0f} GB of "
                 f"{free_bytes / 1e9:.0f} GB free" if keep else
                 f"  --keep-last: even 1 needs {disk[1] / 1e9:.0f} GB, {free_bytes / 1e9:.0f} GB are free: free space "
                 f"or train LoRA (--lora-rank)")
    if "save" in c.figures:
        minutes, timeout = timeout_minutes(*c.figures["save"], plan.checkpoint_bytes(counts, plan.Step()),
                                           c.args.dist_timeout_minutes)
        lines.append(f"  --dist-timeout-minutes {timeout}: a 7B save takes ~{minutes:.1f} min on this disk, and ranks "
                     f"wait for rank 0's part of it inside collectives")
    else:
        lines.append("  --dist-timeout-minutes: no advice (the training section failed)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs", help="a folder on the disk the real run writes to: the check "
                        "writes its models and checkpoints in OUT/gpu-check/ and times its saves there")
    parser.add_argument("--keep", action="store_true", help="keep OUT/gpu-check/ (deleted at the end otherwise)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the real run, for the advice")
    parser.add_argument("--dist-timeout-minutes", type=float, default=config.Config.dist_timeout_minutes,
                        help="train.py's flag, as the real run will give it")
    parser.add_argument("--audio-layers", type=int, default=2, help="audio encoder layers (the 7B has 32)")
    parser.add_argument("--decoder-layers", type=int, default=2, help="language model layers (the 7B has 32)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256, help="the memory and speed sections force this length")
    parser.add_argument("--attention", choices=("auto", "flex", "dense"), default="auto",
                        help="the step's packed attention: auto = FlexAttention on CUDA")
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


def check(args, device, configs=None, seconds=30):
    """Every section, the table and the advice (rank 0 prints); OUT/gpu-check/ is deleted unless --keep.
    Returns the results."""
    c = Check(args, device, configs, seconds)
    M.print0(f"{torch.cuda.get_device_name(device)} x {c.world}, torch {torch.__version__}, work in {c.work}\n")
    results = run_sections(c)
    dist.barrier()  # every rank is done with the folder
    if c.rank == 0 and not args.keep:
        shutil.rmtree(c.work, ignore_errors=True)
    gpu = torch.cuda.get_device_properties(device).total_memory
    M.print0(table(results) + "\n\n" + advice(c, gpu, shutil.disk_usage(args.out).free))
    return results


def main(argv=None):
    args = parse(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine, nothing to check; run it on the GPU machine")
        return 0
    _, _, device = M.init_distributed(always=True, timeout=timedelta(minutes=args.dist_timeout_minutes))
    hardware(args, device)  # an unknown GPU stops here, before anything is built
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = check(args, device)
    dist.destroy_process_group()
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(M.run_main(main))
