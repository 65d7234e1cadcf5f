"""SARI's curriculum: train from the easy questions to the hard ones, by the starting policy's pass rates.

SARI (Wen et al., "SARI: Structured Audio Reasoning via Curriculum-Guided Reinforcement Learning",
arXiv 2504.15900) found that GRPO on audio questions ordered from easy to hard converges faster and
ends higher than on shuffled ones. With --curriculum K, a pre-pass samples K completions of every
training question with the policy GRPO starts from (after the warm start, if any) and stores each
question's pass rate, the share of its completions whose answer is right, in OUT/pass_rates.json.
Training then takes the questions easiest first (batches.epoch_order), every epoch.

The pre-pass is data parallel and resumable, like evaluate.py: the questions go in fixed batches of
--micro-batch, dealt round-robin to the processes; each process appends its batches' rates to
OUT/pass_rates.parts/rank{r}.jsonl and fsyncs, so a restart samples only what is missing. Each
question samples from its own generator, seeded from (seed, its index), so the rates do not depend
on the number of processes, and the order is a pure function of (seed, step) given the stored
rates: resume stays exact. A question whose audio cannot be read gets rate -1 (last).

train.py calls pass_rates(run) in setup.
"""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import batches as B
import grpo
import model as M
import reward

PREPASS_STEP = -1  # the generators' step: no training step samples with these seeds


def pass_rates(run):
    """Every training question's pass rate under the current (starting) policy, on every rank."""
    out, rank, world = Path(run.cfg.out), dist.get_rank(), dist.get_world_size()
    final = out / "pass_rates.json"
    if not final.exists():
        parts = out / "pass_rates.parts"
        done = read_parts(parts)
        dist.barrier()  # every rank has read the parts before any rank appends to them
        batches = B.chunks(list(range(len(run.train))), run.cfg.micro_batch)
        todo = [b for b in batches if not all(i in done for i in b)]
        parts.mkdir(parents=True, exist_ok=True)
        run.policy.eval()
        with open_part(parts / f"rank{rank}.jsonl") as part, M.unsharded(run.policy):
            for batch in tqdm(todo[rank::world], desc="curriculum pre-pass", disable=rank != 0):
                append(part, batch, sample_rates(run, batch))
        dist.barrier()
        if rank == 0:
            write_atomically(final, merged(read_parts(parts), len(run.train), run.cfg.curriculum))
        dist.barrier()
    stored = json.loads(final.read_text())
    return stored["pass_rates"]


@torch.no_grad()
def sample_rates(run, indices):
    """K completions of each question in one micro-batch (inside model.unsharded), scored by the
    accuracy reward."""
    cfg, K = run.cfg, run.cfg.curriculum
    samples = [run.train[i] for i in indices]
    audios, ok = B.read_audio(samples, cfg.downmix)
    inputs = M.collate(run.processor, samples, audios, cfg.prompt, cfg.system_prompt or None,
                       cfg.think_words).to(run.device)
    gens = grpo.prompt_generators(cfg.seed, PREPASS_STEP, indices, run.device)
    r = grpo.generate_groups(run.policy, inputs, gens, K, cfg.max_new_tokens, run.end_ids, run.pad_id,
                             run.suppress_ids, cfg.temperature, cfg.top_k, cfg.top_p)
    texts = run.processor.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
    right = [reward.accuracy_reward(t, samples[n // K].answer) for n, t in enumerate(texts)]
    return [sum(right[j * K:(j + 1) * K]) / K if good else -1.0 for j, good in enumerate(ok)]


def open_part(path):
    """A rank's part file for appending, a last line torn by a kill cut off first."""
    if path.exists():
        os.truncate(path, path.read_bytes().rfind(b"\n") + 1)
    return open(path, "a")


def append(part, indices, rates):
    """One batch's rates as whole lines, pushed to the disk (a kill leaves at most one torn line)."""
    part.write("".join(json.dumps({"index": i, "pass_rate": r}) + "\n" for i, r in zip(indices, rates)))
    part.flush()
    os.fsync(part.fileno())


def read_parts(parts):
    """{question index: pass rate} from every rank's part file; a line torn by a kill is dropped."""
    done = {}
    for path in sorted(Path(parts).glob("rank*.jsonl")):
        for line in path.read_text().split("\n")[:-1]:  # after the last newline: a write cut short
            record = json.loads(line)
            done[record["index"]] = record["pass_rate"]
    return done


def merged(done, n, k):
    missing = [i for i in range(n) if i not in done]
    if missing:
        raise RuntimeError(f"the curriculum pre-pass has no rate for {len(missing)} questions, e.g. {missing[0]}")
    return {"samples_per_question": k, "pass_rates": [done[i] for i in range(n)]}


def write_atomically(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
