"""Which questions each training step sees, each process's share of them, and their audio.

The data order is a pure function of (seed, step): a step's global batch is a slice of an endless
run of epochs, each a fresh permutation (or, with --balance-answers, the answers interleaved, or,
with SARI's curriculum, the questions from easy to hard by their stored pass rates). A resumed run
therefore sees exactly the data the interrupted one would have, and 1 process sees what 2 do: each
process takes its contiguous share of the global batch, then works through it micro-batch by
micro-batch. Audio that cannot be read is replaced by silence and masked out by the caller, so a
batch keeps its shape and every process stays in step.

train.py is the only user; the tests call these functions directly.
"""

from pathlib import Path

import numpy as np
import torch.distributed as dist

import data
import model as M


def my_share(items, rank, world):
    """This process's contiguous share of a global batch (the batch splits evenly: train.validate)."""
    per = len(items) // world
    return items[rank * per:(rank + 1) * per]


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def load_data(cfg):
    """(train samples, held-out samples); a malformed file stops the run with a one-line UsageError."""
    train, test = cfg.data, cfg.eval_data
    if cfg.data == "synthetic":  # written by rank 0 in setup()
        train, synthetic_test = (str(Path(cfg.cache_dir) / "synthetic" / f) for f in ("train.jsonl", "test.jsonl"))
        test = test or synthetic_test
    return read_questions("--data", train, cfg), read_questions("--eval-data", test, cfg)[:cfg.eval_samples]


LOUDNESS = "synthetic-loudness"  # --warm-start-data: the synthetic loudness question, written in --cache-dir


def warm_start_path(cfg):
    """The question file of --warm-start-data ("" for a format-only warm start)."""
    if cfg.warm_start_data == LOUDNESS:
        return str(Path(cfg.cache_dir) / LOUDNESS / "train.jsonl")
    return cfg.warm_start_data


def read_questions(flag, path, cfg):
    if not path:
        return []
    try:
        samples = data.read_samples(path, cfg.audio_dir or None)
    except data.DataError as e:
        raise M.UsageError(f"{flag}: {e}") from None
    return samples


def check_first_batch(cfg, train):
    """Stop before training on nothing: if no clip of the first global batch exists, the audio folder or
    the paths in the data are wrong, and every sample would be skipped."""
    paths = [train[i].audio_path for i in step_indices(cfg, [s.answer for s in train], 0)]
    if not any(Path(p).is_file() for p in paths):
        hint = "check --audio-dir" if cfg.audio_dir else "give --audio-dir, the folder the audio paths are relative to"
        raise M.UsageError(f"--data {cfg.data}: none of the {len(paths)} clips of the first batch exists, "
                           f"e.g. {paths[0]} ({hint})")


def epoch_order(answers, epoch, seed, balance, pass_rates=None):
    """A fresh permutation per epoch. Balanced: interleave the answers round-robin, so any window of
    (number of distinct answers) consecutive samples holds each answer once. With pass rates (SARI's
    curriculum): easiest first, the highest pass rate first, ties in a random order; balanced, each
    answer's questions from easy to hard, interleaved."""
    rng = np.random.default_rng([seed, epoch])
    if pass_rates is None:
        arrange = lambda ix: rng.permutation(ix).tolist()
    else:
        tie = rng.random(len(answers))
        arrange = lambda ix: sorted(ix, key=lambda i: (-pass_rates[i], tie[i]))
    if not balance:
        return arrange(range(len(answers)))
    by_answer = {}
    for i, a in enumerate(answers):
        by_answer.setdefault(a, []).append(i)
    queues = [arrange(ix) for _, ix in sorted(by_answer.items())]
    return [q[j] for j in range(max(map(len, queues))) for q in queues if j < len(q)]


def step_indices(cfg, answers, step, extra_round=0, pass_rates=None):
    """Dataset indices of the global batch of `step`: a slice of an endless run of epochs. Depends on
    nothing but (seed, step) (and the stored pass rates of a curriculum), so a resumed run sees exactly
    the data the interrupted one would have. An extra round of dynamic sampling draws its prompts from
    (seed, step, round) alone."""
    if extra_round:
        rng = np.random.default_rng([cfg.seed, step, extra_round])
        return rng.choice(len(answers), cfg.prompts_per_step, replace=cfg.prompts_per_step > len(answers)).tolist()
    n, start = len(answers), step * cfg.prompts_per_step
    out = []
    while len(out) < cfg.prompts_per_step:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(answers, epoch, cfg.seed, cfg.balance_answers, pass_rates)
        out += order[offset:offset + cfg.prompts_per_step - len(out)]
    return out


def read_audio(samples, downmix, counts=None):
    """Decode each clip. An unreadable one is reported, counted (in counts, if given) and replaced by
    1 s of silence; the caller masks it out of the loss, so the batch keeps its shape and all ranks
    stay in step."""
    audios, ok = [], []
    for s in samples:
        try:
            audios.append(data.load_audio(s.audio_path, downmix))
            ok.append(True)
        except data.AudioError as e:
            print(f"[rank {dist.get_rank()}] skipping sample: {e}", flush=True)
            audios.append(np.zeros(data.SAMPLE_RATE, dtype=np.float32))
            ok.append(False)
    if counts is not None:
        counts["seen"] += len(samples)
        counts["bad"] += ok.count(False)
    return audios, ok
