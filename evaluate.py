"""
Evaluate a Qwen2-Audio checkpoint on MMAU (or any question file) and score it with MMAU's rule.

Inference is R1-AQA's: the training prompt, greedy decoding, left-padded batches, up to 256 new
tokens, stopping at <|im_end|> or <|endoftext|>. Every item keeps its original record and gains
`model_output` (the completion, special tokens skipped) and `model_prediction` (the text of its
first <answer>...</answer>, else the whole output). The result is a JSON list in MMAU's own shape,
in the data file's order, so MMAU's evaluation.py and R1-AQA-style tools read it. For R1-AQA/AVQA
and plain JSONL data each record also gets MMAU's `question`, `choices` and `answer` (the correct
choice string, not an index), so every output file is scored the same way.

Finished work is never lost. Each rank appends its predictions to OUT.parts/rank{r}.jsonl and
fsyncs after every batch. Re-running the same command, with any number of ranks, reads all those
files and evaluates only what is missing: items are keyed by their position in the data file, and
a line cut short by a kill is dropped. Items whose audio failed are tried again. OUT.parts/run.json
records the model and the settings that change predictions; a re-run with different ones stops
rather than mix them. Rank 0 writes OUT atomically (temp file + rename).

An item whose audio is missing or unreadable is not skipped: its prediction is empty, it gets an
`error` field naming the file and the reason, it counts as wrong, and the summary lists it.

Scoring is MMAU's official string match (reward.mmau_correct) and prints the official script's
lines: per task, per difficulty, per sub-category, then `Total Accuracy: 64.50% over 1000 samples`.
Data without those fields is grouped by `category` if it has one; the Total line is always there.
OUT's summary (preds.json -> preds.summary.json) holds the same numbers, the errored items, and the
data file's path and sha256: the two MMAU test-mini versions (2025-03-25, which R1-AQA used, and
the revised 2025-05-15) give scores that cannot be compared.

    python evaluate.py --model CKPT --data mmau-test-mini.json --audio-dir test-mini-audios --out preds.json
    torchrun --nproc_per_node 8 evaluate.py --model CKPT ...   # data parallel, one model copy per rank
    python evaluate.py --score preds.json [--key model_output]  # score an existing predictions file
    python evaluate.py                                          # the demo: checkpoint-0 vs the newest
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
from data import DOWNMIX, PROMPTS, AudioError, Sample, load_audio, read_samples
from reward import extract_answer, mmau_correct

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# sha256 of the two MMAU test-mini question files (see the recipe notes), so a score names its version
KNOWN_DATA = {
    "e8cc09223b497191781756212cb616315690aaa6ea7ac359db1b65d97d1e2433": "MMAU test-mini, original (2025-03-25)",
    "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c": "MMAU test-mini, revised (2025-05-15)",
}
# Report groups, as the official script prints them. Data with none of them is grouped by category.
GROUP_FIELDS = ["task", "difficulty", "sub-category"]
# The official script's own dicts: it prints every MMAU task and difficulty in this order, even over 0 samples.
MMAU_ORDER = {"task": ["sound", "music", "speech"], "difficulty": ["easy", "hard", "medium"]}
DEMO_RUNS, DEMO_TEST = Path("runs/demo"), Path("runs/synthetic/test.jsonl")


@dataclass
class EvalConfig:
    model: str  # a Hugging Face directory with the processor, e.g. a checkpoint train.py wrote
    data: str  # MMAU JSON list, R1-AQA/AVQA JSONL or plain JSONL
    out: str  # the predictions JSON
    audio_dir: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    dtype: str = "bfloat16"
    prompt: str = "answer"  # data.PROMPTS: evaluate with the prompt the model was trained on
    downmix: str = "first"  # data.DOWNMIX: channel 0 of multi-channel audio (R1-AQA), or the mean
    limit: int | None = None  # evaluate the first N items only


@dataclass
class Prediction:
    index: int  # position in the data file
    model_output: str
    model_prediction: str
    error: str | None = None  # why the audio could not be used


# -----------------------------------------------------------------------------
# Inference

def generate(model, processor, samples: list[Sample], audios, prompt: str, max_new_tokens: int) -> list[str]:
    """Greedy completions for one batch, decoded with special tokens skipped. Other generation
    settings (e.g. a repetition penalty) come from the checkpoint, as in R1-AQA's test script."""
    tokenizer = processor.tokenizer
    batch = M.collate(processor, samples, audios, prompt).to(model.device)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=M.end_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         suppress_tokens=M.suppressed_token_ids(tokenizer, model.config.text_config.vocab_size))
    completions = out[:, batch["input_ids"].shape[1]:]  # left padding: every prompt ends at the same column
    return processor.batch_decode(completions, skip_special_tokens=True)


def predict_batch(model, processor, samples: list[Sample], indices: list[int], cfg: EvalConfig) -> list[Prediction]:
    """Predictions for the items at `indices`; an item whose audio fails gets an error instead."""
    predictions, ok, audios = [], [], []
    for i in indices:
        try:
            audios.append(load_audio(samples[i].audio_path, cfg.downmix))
            ok.append(i)
        except AudioError as e:
            predictions.append(Prediction(i, "", "", error=str(e)))
    if ok:
        texts = generate(model, processor, [samples[i] for i in ok], audios, cfg.prompt, cfg.max_new_tokens)
        predictions += [Prediction(i, text, extract_answer(text)) for i, text in zip(ok, texts)]
    return predictions


def predict(model, processor, samples: list[Sample], indices: list[int], cfg: EvalConfig, part) -> None:
    """Evaluate this rank's items batch by batch, appending each batch to its part file on disk."""
    bar = tqdm(total=len(indices), unit="item", desc="evaluate", disable=this_rank() != 0, dynamic_ncols=True)
    for start in range(0, len(indices), cfg.batch_size):
        batch = indices[start:start + cfg.batch_size]
        append(part, predict_batch(model, processor, samples, batch, cfg))
        bar.update(len(batch))
    bar.close()


# -----------------------------------------------------------------------------
# Finished work on disk: OUT.parts/run.json and one append-only JSONL per rank

def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_parts(parts: Path) -> dict[int, Prediction]:
    """Every prediction in the part files, by item index. A good prediction of an item beats an
    errored one; otherwise the first one read wins."""
    done = {}
    for path in sorted(parts.glob("rank*.jsonl")):
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # after the last newline: a write cut by a kill
        for line in lines:
            p = Prediction(**json.loads(line))
            if p.index not in done or (done[p.index].error and not p.error):
                done[p.index] = p
    return done


def open_part(parts: Path, rank: int):
    """This rank's part file for appending, with a last line cut by a kill removed first."""
    path = parts / f"rank{rank}.jsonl"
    if path.exists():
        keep = path.read_bytes().rfind(b"\n") + 1
        os.truncate(path, keep)
    return open(path, "a", encoding="utf-8")


def append(part, predictions: list[Prediction]) -> None:
    """Write whole lines and push them to the disk: what a kill leaves behind is at most one torn line."""
    part.write("".join(json.dumps(asdict(p)) + "\n" for p in predictions))  # ASCII: a cut never splits a character
    part.flush()
    os.fsync(part.fileno())


def run_key(cfg: EvalConfig, data_sha256: str) -> dict:
    """What decides the predictions. The batch size, --limit, the audio folder and the rank count do not."""
    weights = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in Path(cfg.model).glob("*.safetensors"))
    return {"model": str(Path(cfg.model).resolve()), "weights": weights, "data_sha256": data_sha256,
            "prompt": cfg.prompt, "downmix": cfg.downmix, "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.dtype}


def check_run_key(parts: Path, key: dict) -> None:
    """Refuse to continue a run made with another model, data file or settings."""
    path = parts / "run.json"
    if path.exists() and (old := json.loads(path.read_text())) != key:
        raise ValueError(f"{parts} holds predictions from another run:\n  {old}\nthis run:\n  {key}\n"
                         f"delete {parts} or choose another --out")


# -----------------------------------------------------------------------------
# Files

def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a temp file, fsynced, renamed over the target."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def summary_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.stem + ".summary.json")


def output_record(sample: Sample, p: Prediction) -> dict:
    """The original record in MMAU's shape plus the prediction (and the error, if any)."""
    record = {**sample.meta, "question": sample.question, "choices": sample.choices, "answer": sample.answer,
              "model_prediction": p.model_prediction, "model_output": p.model_output}
    if p.error:
        record["error"] = p.error
    return record


# -----------------------------------------------------------------------------
# Scoring: MMAU's evaluation.py

@dataclass
class Tally:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return 100 * self.correct / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "correct": self.correct, "total": self.total}


@dataclass
class Score:
    key: str  # the field that was scored
    total: Tally
    groups: dict[str, dict[str, Tally]]  # field -> value -> tally, in print order
    skipped: int  # items without the key: not counted, as in the official script
    errors: list[dict]  # items whose audio failed (counted wrong)


def group_fields(records: list[dict]) -> list[str]:
    """MMAU's report groups that the records have; else `category` (e.g. the synthetic task's band) if they have it."""
    fields = [f for f in GROUP_FIELDS if any(f in r for r in records)]
    if fields:
        return fields
    return ["category"] if any("category" in r for r in records) else []


def group_order(name: str, values: list[str]) -> list[str]:
    """MMAU's tasks and difficulties in the official order, else values in order of appearance."""
    known = MMAU_ORDER.get(name, [])
    return known if set(values) <= set(known) else list(dict.fromkeys(values))


def score(records: list[dict], key: str | None = None) -> Score:
    """Score records by MMAU's string match on `key` (default: model_prediction if any record has it)."""
    if key is None:
        key = "model_prediction" if any("model_prediction" in r for r in records) else "model_output"
    scored = [r for r in records if key in r]
    fields = group_fields(scored)
    groups = {f: {v: Tally() for v in group_order(f, [str(r[f]) for r in scored if f in r])} for f in fields}
    total = Tally()
    for r in scored:
        correct = mmau_correct(r[key], r["answer"], r["choices"])
        for tally in [total] + [groups[f][str(r[f])] for f in fields if f in r]:
            tally.correct += correct
            tally.total += 1
    errors = [{"index": i, "id": r.get("id"), "error": r["error"]} for i, r in enumerate(records) if "error" in r]
    return Score(key, total, groups, len(records) - len(scored), errors)


def report_lines(s: Score) -> list[str]:
    """The official script's printout (its header and separator lines included)."""
    lines = []
    for name, tallies in s.groups.items():
        lines += ["*" * 30, f"{name.capitalize()}-wise Accuracy:"]
        lines += [f"{value} : {t.accuracy:.2f}% over {t.total} samples" for value, t in tallies.items()]
    lines += ["*" * 30, f"Total Accuracy: {s.total.accuracy:.2f}% over {s.total.total} samples", "*" * 30]
    # The official script prints 0 here: it skips items without the key before counting them.
    lines.append(f"No prediction count: {s.skipped}")
    return lines


def print_score(s: Score) -> None:
    for line in report_lines(s):
        M.print0(line)
    if s.errors:
        M.print0(f"{len(s.errors)} items had no usable audio (empty prediction, counted wrong):")
        for e in s.errors[:10]:
            M.print0(f"  item {e['index']}: {e['error']}")
        if len(s.errors) > 10:
            M.print0(f"  ... and {len(s.errors) - 10} more, listed in the summary")


@dataclass
class Provenance:
    """Where a predictions file came from: the question file, its hash, the model and the settings."""
    data: str | None = None
    data_sha256: str | None = None
    data_version: str | None = None  # a known MMAU version, recognised by its hash
    model: str | None = None
    settings: dict | None = None
    note: str = ""


def summary(s: Score, predictions: Path, source: Provenance) -> dict:
    """The JSON summary: accuracy in total and per group, the errored items, and where it all came from."""
    return {"predictions": str(predictions), "predictions_sha256": sha256(predictions), "key": s.key,
            **s.total.as_dict(), "skipped": s.skipped,
            "groups": {f: {v: t.as_dict() for v, t in g.items()} for f, g in s.groups.items()},
            "errors": s.errors, **asdict(source)}


def known_provenance(predictions: Path) -> Provenance:
    """The provenance in an existing summary of exactly this predictions file, else none."""
    path = summary_path(predictions)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("predictions_sha256") == sha256(predictions):
            return Provenance(**{k: old.get(k) for k in ("data", "data_sha256", "data_version", "model", "settings")},
                              note="scored again with --score")
    return Provenance(note="source data unknown: no summary of this exact predictions file was found")


def score_file(path: Path, key: str | None) -> Score:
    """--score: score an existing predictions file, print the official lines, write its summary."""
    records = json.loads(path.read_text(encoding="utf-8"))
    s = score(records, key)
    source = known_provenance(path)
    M.print0(f"scoring {path} by '{s.key}': {len(records) - s.skipped} items, {s.skipped} without it skipped")
    if source.data:
        M.print0(f"data: {source.data} ({source.data_version or 'sha256 ' + source.data_sha256})")
    print_score(s)
    write_json(summary_path(path), summary(s, path, source))
    return s


# -----------------------------------------------------------------------------
# A whole evaluation

def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def evaluate(cfg: EvalConfig) -> Score | None:
    """Predict every item not done yet, split over the ranks; then rank 0 merges, writes and scores
    (and returns the score; the other ranks return None)."""
    rank, world, device = M.init_distributed()
    samples = read_samples(cfg.data, cfg.audio_dir)[:cfg.limit]
    data_sha256 = sha256(cfg.data)
    out = Path(cfg.out)
    todo = pending(parts_dir(out), run_key(cfg, data_sha256), len(samples))
    M.print0(f"{cfg.data}: {len(samples)} items, {len(samples) - len(todo)} already done in {parts_dir(out)}, "
             f"{len(todo)} to evaluate on {world} rank(s)")
    seconds = predict_share(cfg, samples, todo[rank::world], device)
    barrier()
    if todo:
        M.print0(f"{len(todo)} items in {seconds:.1f} s: {len(todo) / seconds:.2f} items/s on {world} rank(s)")
    s = finish(cfg, samples, out, data_sha256, world) if rank == 0 else None
    barrier()  # no rank returns (or starts another evaluation) before the results are written
    return s


def pending(parts: Path, key: dict, n: int) -> list[int]:
    """The items (of the first n) without a good prediction in the part files, the same on every rank."""
    check_run_key(parts, key)
    done = read_parts(parts)
    barrier()  # every rank has read the same part files before any rank writes to them
    parts.mkdir(parents=True, exist_ok=True)
    if this_rank() == 0 and not (parts / "run.json").exists():
        write_json(parts / "run.json", key)
    return [i for i in range(n) if i not in done or done[i].error]


def predict_share(cfg: EvalConfig, samples: list[Sample], mine: list[int], device) -> float:
    """Load the model and predict this rank's items into its part file; seconds spent predicting."""
    if not mine:
        return 0.0
    model, processor = M.load(cfg.model, dtype=DTYPES[cfg.dtype], device=device)
    model.eval()
    start = time.time()
    with open_part(parts_dir(Path(cfg.out)), this_rank()) as part:
        predict(model, processor, samples, mine, cfg, part)
    return time.time() - start


def finish(cfg: EvalConfig, samples: list[Sample], out: Path, data_sha256: str, world: int) -> Score:
    """Rank 0: merge the part files into OUT in data order, score it and write its summary."""
    done = read_parts(parts_dir(out))
    missing = [i for i in range(len(samples)) if i not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} items have no prediction after the run, e.g. item {missing[0]}")
    write_json(out, [output_record(s, done[i]) for i, s in enumerate(samples)])
    version = KNOWN_DATA.get(data_sha256)
    source = Provenance(cfg.data, data_sha256, version, cfg.model, {**asdict(cfg), "world_size": world})
    s = score(json.loads(out.read_text(encoding="utf-8")), "model_prediction")
    M.print0(f"predictions: {out}; data: {cfg.data} ({version or 'sha256 ' + data_sha256})")
    print_score(s)
    write_json(summary_path(out), summary(s, out, source))
    return s


# -----------------------------------------------------------------------------
# The demo: the starting policy and the newest checkpoint on the synthetic test split

def demo_checkpoints(runs: Path = DEMO_RUNS) -> list[Path]:
    """checkpoint-0 (the starting policy, if present) and the newest checkpoint-{step}."""
    steps = {int(m.group(1)): p for p in runs.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    if not steps:
        return []
    return list(dict.fromkeys([steps[s] for s in (0, max(steps)) if s in steps]))


def demo(batch_size: int, max_new_tokens: int, dtype: str) -> int:
    """Evaluate the demo's starting model and its newest checkpoint; print both accuracies."""
    checkpoints = demo_checkpoints()
    if not checkpoints or not DEMO_TEST.exists():
        M.print0(f"No demo checkpoints in {DEMO_RUNS}/ or no test split {DEMO_TEST}: run `python train.py` first.")
        return 1
    accuracy = {}
    for ckpt in checkpoints:
        M.print0(f"\n=== {ckpt} ===")
        cfg = EvalConfig(model=str(ckpt), data=str(DEMO_TEST), out=str(DEMO_RUNS / "eval" / f"{ckpt.name}.json"),
                         batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype)
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        s = evaluate(cfg)
        accuracy[ckpt.name] = s.total.accuracy if s else 0.0
    M.print0(f"\nGreedy accuracy on {DEMO_TEST}: " + " -> ".join(f"{k} {v:.2f}%" for k, v in accuracy.items()))
    return 0


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a Qwen2-Audio checkpoint on MMAU-style questions.")
    parser.add_argument("--model", help="checkpoint directory (with its processor)")
    parser.add_argument("--data", help="MMAU JSON, R1-AQA JSONL or plain JSONL question file")
    parser.add_argument("--audio-dir", help="folder the audio paths are relative to (default: the data file's)")
    parser.add_argument("--out", help="predictions JSON to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="default bfloat16 (the 7B on a GPU); the demo uses float32, several times faster on a CPU")
    parser.add_argument("--prompt", choices=PROMPTS, default="answer",
                        help="the paper's prompt the model was trained with: direct (<1>), answer (<2>, R1-AQA), think (<3>)")
    parser.add_argument("--downmix", choices=DOWNMIX, default="first",
                        help="multi-channel audio: keep channel 0 (R1-AQA) or average the channels")
    parser.add_argument("--limit", type=int, help="evaluate the first N items only")
    parser.add_argument("--score", metavar="PREDICTIONS", help="only score an existing predictions JSON")
    parser.add_argument("--key", choices=["model_prediction", "model_output"],
                        help="field to score (default: model_prediction if present, else model_output)")
    args = parser.parse_args(argv)
    if not args.score and (args.model or args.data or args.out) and not (args.model and args.data and args.out):
        parser.error("--model, --data and --out go together (or give none of them for the demo)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.score:
        score_file(Path(args.score), args.key)
        return 0
    if args.model is None:
        status = demo(args.batch_size, args.max_new_tokens, args.dtype or "float32")
    else:
        cfg = EvalConfig(args.model, args.data, args.out, args.audio_dir, args.batch_size, args.max_new_tokens,
                         args.dtype or "bfloat16", args.prompt, args.downmix, args.limit)
        evaluate(cfg)
        status = 0
    if dist.is_initialized():
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
