"""SARI's curriculum (--curriculum K): train from the easy questions to the hard ones, by the starting
policy's pass rates (Wen et al., arXiv 2504.15900).

Before training, a pre-pass samples K completions of every training question with the policy GRPO starts
from and stores each question's pass rate in OUT/pass_rates.json; every epoch then takes the questions
easiest first (the recipe's epoch order). The pre-pass is data parallel and resumable like evaluate.py:
fixed batches dealt round-robin, each process appending to OUT/pass_rates.parts/rank{r}.jsonl. Each
question samples from its own generator, so the rates do not depend on the number of processes.
"""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import grpo
import model as M
import reward

PREPASS_STEP = -1  # the generators' step: no training step samples with these seeds


def apply(recipe, cfg):
    """The recipe with the pre-pass before training and, from then on, the epochs easiest first."""
    if cfg.curriculum < 0:
        raise M.UsageError(f"--curriculum {cfg.curriculum}: must be >= 0 (completions per question; 0 = off)")
    recipe.before_training.append(order_by_pass_rate)
    return recipe


def order_by_pass_rate(run):
    """Measure (or read) the pass rates, then put the easy-to-hard order in the recipe."""
    rates = pass_rates(run)
    run.recipe.arrange = lambda rng, n: easiest_first(rates, rng, n)


def easiest_first(rates, rng, n):
    """An epoch's order: the highest pass rate first, ties in a random order drawn once per epoch."""
    tie = rng.random(n)
    return lambda indices: sorted(indices, key=lambda i: (-rates[i], tie[i]))


def pass_rates(run):
    """Every training question's pass rate under the current (starting) policy, on every rank."""
    out, rank, world = Path(run.cfg.out), dist.get_rank(), dist.get_world_size()
    final = out / "pass_rates.json"
    if not final.exists():
        parts = out / "pass_rates.parts"
        done = read_parts(parts)
        dist.barrier()  # every rank has read the parts before any rank appends to them
        batches = data.chunks(list(range(len(run.questions))), run.cfg.micro_batch)
        todo = [b for b in batches if not all(i in done for i in b)]
        parts.mkdir(parents=True, exist_ok=True)
        run.policy.eval()
        with open_part(parts / f"rank{rank}.jsonl") as part, M.unsharded(run.policy):
            for batch in tqdm(todo[rank::world], desc="curriculum pre-pass", disable=rank != 0):
                append(part, batch, sample_rates(run, batch))
        M.wait_for_all()  # ranks finish minutes apart after hours of uneven decoding: a wait on the host
        if rank == 0:
            write_atomically(final, merged(read_parts(parts), len(run.questions), run.cfg.curriculum))
        dist.barrier()
    stored = json.loads(final.read_text())
    return stored["pass_rates"]


@torch.no_grad()
def sample_rates(run, indices):
    """K completions of each question in one micro-batch (inside model.unsharded), scored by the
    accuracy reward."""
    cfg, K = run.cfg, run.cfg.curriculum
    samples = [run.questions[i] for i in indices]
    audios, ok = data.read_audio(samples, cfg.downmix)
    inputs = M.collate(run.processor, samples, audios, cfg.prompt, cfg.system_prompt or None,
                       cfg.think_words).to(run.device)
    gens = grpo.prompt_generators(cfg.seed, PREPASS_STEP, indices, run.device)
    r = run.recipe.generate(run.policy, inputs, gens, K, cfg.max_new_tokens, run.tokens.end_ids,
                            run.tokens.pad_id, run.tokens.suppress_ids, cfg.temperature, cfg.top_k, cfg.top_p)
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
