"""Evaluate a checkpoint, or every checkpoint of a training run, on MMAU (or MMAR, MMSU, any question file).

Inference is R1-AQA's: the training prompt, greedy decoding (model.generate), up to 256 new tokens. Each
item keeps its record and gains `model_output` and `model_prediction` (its first answer tag), in a file
the benchmark's official script reads; reward.score_predictions scores it by the benchmark's rule. It is
resumable (each rank appends to OUT.parts/ and fsyncs), data parallel under torchrun, and a run folder
gives a table of accuracy per step. docs/evaluation.md says more.
    python evaluate.py --model CKPT --data mmau-test-mini.json --audio-dir test-mini-audios --out preds.json
    python evaluate.py --model runs/r1-aqa --data mmau-test-mini.json --audio-dir test-mini-audios  # every step
    python evaluate.py --score preds.json [--key model_output]    # python evaluate.py: the demo's checkpoints
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
import reward
from data import DOWNMIX, PROMPTS, AudioError, DataError, Sample, audio_duration, load_audio, read_samples
from reward import Score, Tally, extract_answer, score_predictions as score

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# sha256 of the two MMAU test-mini question files (see the recipe notes), so a score names its version
KNOWN_DATA = {
    "e8cc09223b497191781756212cb616315690aaa6ea7ac359db1b65d97d1e2433": "MMAU test-mini, original (2025-03-25)",
    "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c": "MMAU test-mini, revised (2025-05-15)",
}
DEMO_RUNS, DEMO_TEST = Path("runs/demo"), Path("runs/synthetic/test.jsonl")


@dataclass
class EvalConfig:
    model: str  # a Hugging Face directory with the processor, e.g. a checkpoint train.py wrote
    data: str  # MMAU JSON list, MMAR, MMSU, R1-AQA/AVQA JSONL or plain JSONL
    out: str  # the predictions JSON
    audio_dir: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    dtype: str = "bfloat16"
    prompt: str = "answer"  # data.PROMPTS: evaluate with the prompt the model was trained on
    system_prompt: str = ""  # the chat's system turn ("" = the chat template's default), as in training
    think_words: int = 0  # with the think prompt: the word limit training asked for (0 = none)
    downmix: str = "first"  # data.DOWNMIX: channel 0 of multi-channel audio (R1-AQA), or the mean
    limit: int | None = None  # evaluate the first N items only
    key: str = "model_prediction"  # the field scored, and the one a test set's submission carries


@dataclass
class Prediction:
    index: int  # position in the data file
    model_output: str
    model_prediction: str
    error: str | None = None  # why the audio could not be used


# -----------------------------------------------------------------------------
# Inference

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
        texts = M.generate(model, processor, [samples[i] for i in ok], audios, cfg.prompt, cfg.max_new_tokens,
                         cfg.system_prompt or None, cfg.think_words)
        predictions += [Prediction(i, text, extract_answer(text)) for i, text in zip(ok, texts)]
    return predictions


def batches(todo: list[int], batch_size: int) -> list[list[int]]:
    """The items to do, grouped by their fixed batch of the data file (items kB .. kB+B-1), in order.
    An uninterrupted run hands generate() the same batches whatever the number of ranks (rank r runs
    batches[r::world]); a batch left half-written by a kill keeps only its missing items."""
    groups: dict[int, list[int]] = {}
    for i in todo:
        groups.setdefault(i // batch_size, []).append(i)
    return list(groups.values())


def predict(model, processor, samples: list[Sample], mine: list[list[int]], cfg: EvalConfig, part) -> None:
    """Evaluate this rank's batches, appending each batch to its part file on disk."""
    bar = tqdm(total=sum(map(len, mine)), unit="item", desc="evaluate", disable=this_rank() != 0, dynamic_ncols=True)
    for batch in mine:
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
    """What decides the predictions, the batch size included (see batches()). --limit, the audio
    folder and the rank count do not."""
    weights = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in Path(cfg.model).glob("*.safetensors"))
    return {"model": str(Path(cfg.model).resolve()), "weights": weights, "data_sha256": data_sha256,
            "prompt": cfg.prompt, "system_prompt": cfg.system_prompt, "think_words": cfg.think_words,
            "downmix": cfg.downmix, "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.dtype,
            "batch_size": cfg.batch_size}


def check_run_key(parts: Path, key: dict) -> None:
    """Refuse to continue predictions made with another model, data file or settings: one line
    naming what differs and what would work."""
    old = json.loads(path.read_text()) if (path := parts / "run.json").exists() else key
    changed = [k for k in key if old.get(k) != key[k]]
    if changed:
        was = ", ".join(f"{k} {old.get(k)!r}" for k in changed)
        now = ", ".join(f"{k} {key[k]!r}" for k in changed)
        raise M.UsageError(f"{parts} holds predictions made with {was}, but this run has {now}: re-run with "
                           f"the earlier settings to continue them, or give another --out (or delete {parts})")


# -----------------------------------------------------------------------------
# Files

def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a temp file, fsynced, renamed over the target."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_predictions(path: Path, records: list[dict]) -> None:
    """The predictions file in the format the benchmark's official script reads: JSONL for MMSU (one
    record a line), else a JSON list."""
    if reward.detect(records) == "mmsu":
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        write_json(path, records)


def summary_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.stem + ".summary.json")


def output_record(sample: Sample, p: Prediction) -> dict:
    """The original record in MMAU's shape plus the prediction (and the error, if any), and what the
    benchmark's own script reads besides (MMSU's `response`). A withheld answer is null."""
    record = {**sample.meta, "question": sample.question, "choices": sample.choices, "answer": sample.answer,
              "model_prediction": p.model_prediction, "model_output": p.model_output}
    record.update(official_fields(record))
    if p.error:
        record["error"] = p.error
    return record


def submission_path(predictions: Path) -> Path:
    return predictions.with_name(predictions.stem + ".submission.json")


# -----------------------------------------------------------------------------
# Reports: the benchmark's official lines (benchmarks.py), the summary, --score

def print_score(s: Score) -> None:
    """The official lines of the benchmark, then what they leave out and the items whose audio failed."""
    for line in report_lines(s) + note_lines(s):
        M.print0(line)
    if s.errors:
        M.print0(f"{len(s.errors)} items had no usable audio (empty prediction, counted wrong):")
        for e in s.errors[:10]:
            M.print0(f"  item {e['index']}: {e['error']}")
        if len(s.errors) > 10:
            M.print0(f"  ... and {len(s.errors) - 10} more, listed in the summary")


def string_match_lines(s: Score) -> list[str]:
    """MMAU's and MMAR's printout, line for line. Where they would divide by zero (no item scored)
    this prints 0.00%."""
    lines = []
    for name, tallies in s.groups.items():
        lines += ["*" * 30, f"{name.capitalize()}-wise Accuracy:"]
        lines += [f"{value} : {t.accuracy:.2f}% over {t.total} samples" for value, t in tallies.items()]
    lines += ["*" * 30, f"Total Accuracy: {s.total.accuracy:.2f}% over {s.total.total} samples", "*" * 30]
    # The official scripts skip an item without the key before the line that would count it, so
    # this is always 0 there. note_lines says how many were skipped, on a line of its own.
    lines.append("No prediction count: 0")
    return lines


def report_lines(s: Score) -> list[str]:
    """The official script's printout for the score's benchmark (none without answers)."""
    if s.benchmark == "withheld":
        return []
    if s.benchmark == "mmsu":
        from tools import benchmarks  # MMSU's printout, with its rule
        return benchmarks.mmsu_lines(s)
    return string_match_lines(s)


def note_lines(s: Score) -> list[str]:
    """What the official printout does not show: items left out of the counts, and why."""
    lines = []
    if s.skipped:
        lines.append(f"{s.skipped} items have " + (f"a '{s.key}' that is not a string (null): not counted"
                                                    if s.benchmark == "mmsu" else f"no '{s.key}' field: not scored")
                     + ", as in the official script")
    if s.missing:
        lines.append(f"{s.missing} items have no '{s.key}' field: read as \"\" and counted wrong, as in the "
                     f"official script")
    if s.unparsed:
        lines.append(f"{s.unparsed} items have a response with no letter A-D where MMSU's script looks (the "
                     f"first character or the one before the last): not counted, as in the official script")
    return lines


def official_fields(record: dict) -> dict:
    """Fields a benchmark's own script reads that are not in our prediction record: MMAR's
    `answer_prediction` (model_prediction, under its name) and MMSU's `response`."""
    benchmark = reward.detect([record])
    if benchmark == "mmar":
        return {"answer_prediction": record["model_prediction"]}
    if benchmark == "mmsu":
        from tools import benchmarks  # MMSU's response, by its rule
        return {"response": benchmarks.mmsu_response(record["model_prediction"], record)}
    return {}


def summary_groups(s: Score) -> dict:
    """The groups as JSON: MMSU's (category, sub-category) pairs become "category / sub-category"."""
    return {f: {(" / ".join(v) if isinstance(v, tuple) else v): t.as_dict() for v, t in g.items()}
            for f, g in s.groups.items()}


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
    return {"predictions": str(predictions), "predictions_sha256": sha256(predictions),
            "benchmark": reward.NAMES[s.benchmark], "key": s.key, **s.total.as_dict(), "skipped": s.skipped,
            "unparsed": s.unparsed, "groups": summary_groups(s), "errors": s.errors, **asdict(source)}


# -----------------------------------------------------------------------------
# Checking the command line before any work: models, run folders, data

CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def run_checkpoints(run: Path) -> list[Path]:
    """The complete checkpoint-N folders of a training run, in step order. train.py marks a complete
    one with trainer_state.pt; checkpoint-N.tmp (being written) and checkpoint-N.old are not checkpoints."""
    found = [(int(m.group(1)), p) for p in run.glob("checkpoint-*")
             if (m := CHECKPOINT.fullmatch(p.name)) and (p / "trainer_state.pt").is_file()]
    return [p for _, p in sorted(found)]


def is_run_folder(path: Path) -> bool:
    """A folder of checkpoint-N folders (train.py's --out) rather than a model folder."""
    return path.is_dir() and not (path / "config.json").exists() and any(
        CHECKPOINT.fullmatch(p.name) for p in path.glob("checkpoint-*"))


def model_folders(path: Path) -> list[Path]:
    """--model: one model folder, or every complete checkpoint of a run folder; UsageError otherwise.
    Loading them is M.load's alone (a checkpoint format of its own, e.g. adapters, belongs there)."""
    if not is_run_folder(path):
        return [M.check_model_dir(path)]
    checkpoints = run_checkpoints(path)
    if not checkpoints:
        raise M.UsageError(f"--model {path}: a run folder without a complete checkpoint-N (one with "
                           f"trainer_state.pt) yet; wait for train.py's first checkpoint")
    return [M.check_model_dir(p) for p in checkpoints]


def read_data(data: str, audio_dir: str | None) -> list[Sample]:
    """--data's questions (and --audio-dir checked), or a UsageError naming the flag and the problem."""
    if audio_dir is not None and not Path(audio_dir).is_dir():
        raise M.UsageError(f"--audio-dir {audio_dir}: no such folder (give the folder the audio paths of "
                           f"--data are relative to, or leave it out for the data file's own folder)")
    try:
        samples = read_samples(data, audio_dir, allow_unanswered=True)  # a withheld test set: a submission
    except FileNotFoundError:
        raise M.UsageError(f"--data {data}: no such file") from None
    except OSError as e:
        raise M.UsageError(f"--data {data}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise M.UsageError(f"--data {data}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except DataError as e:  # names the file and the line or item
        raise M.UsageError(f"--data: {e} (python data.py {data} lists every bad record)") from None
    if not samples:
        raise M.UsageError(f"--data {data}: no questions in this file")
    withheld = [i for i, s in enumerate(samples) if s.answer is None]
    if 0 < len(withheld) < len(samples):
        raise M.UsageError(f"--data {data}: {len(withheld)} of {len(samples)} items have no answer (e.g. item "
                           f"{withheld[0]}): give a file whose answers are all there (scored) or all withheld "
                           f"(a submission file)")
    return samples


@dataclass
class Plan:
    """What one command evaluates, checked: one EvalConfig per checkpoint, on the same questions."""
    jobs: list[EvalConfig]
    samples: list[Sample]
    data_sha256: str
    table: Path | None = None  # a run folder: where the table of accuracy per step goes


def plan(args: argparse.Namespace) -> Plan:
    """Every check that bad input can fail, before any model is loaded or any collective, so that
    under torchrun all ranks stop at the same place: the model or run folder, the data, the audio
    folder, --out, and the settings of earlier predictions in the same place."""
    model = Path(args.model)
    folders = model_folders(model)
    samples = read_data(args.data, args.audio_dir)[:args.limit]
    settings = dict(audio_dir=args.audio_dir, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    dtype=args.dtype or "bfloat16", prompt=args.prompt, system_prompt=args.system_prompt,
                    think_words=args.think_words, downmix=args.downmix, limit=args.limit,
                    key=checked_key(args.key or "model_prediction", samples, args.data))
    if is_run_folder(model):
        out_dir = Path(args.out) if args.out else model / "eval" / Path(args.data).stem
        if out_dir.exists() and not out_dir.is_dir():
            raise M.UsageError(f"--out {out_dir}: a file, but with a run folder --out is a folder for the predictions")
        jobs = [EvalConfig(str(f), args.data, str(out_dir / f"{f.name}.json"), **settings) for f in folders]
        table = out_dir / "table.json"
    elif args.out is None:
        raise M.UsageError(f"--model {model} is one model folder: give --out PREDICTIONS.json (only a run "
                           f"folder of checkpoint-N folders has a default)")
    else:
        jobs, table = [EvalConfig(str(model), args.data, args.out, **settings)], None
    return checked(Plan(jobs, samples, sha256(args.data), table))


def checked_key(key: str, samples: list[Sample], data: str) -> str:
    """--key, if the predictions of this data will have that field (answer_prediction: MMAR's only;
    response: MMSU's only)."""
    benchmark = reward.detect([samples[0].meta])
    fields = ["model_prediction", "model_output"] + [reward.OFFICIAL_KEY[b] for b in ("mmar", "mmsu") if b == benchmark]
    if key not in fields:
        raise M.UsageError(f"--key {key}: the predictions of --data {data} ({reward.NAMES[benchmark]}) have no such "
                           f"field; give one of {', '.join(fields)}")
    return key


def checked(p: Plan) -> Plan:
    """The plan, after refusing any job whose earlier predictions were made with other settings."""
    for cfg in p.jobs:
        check_run_key(parts_dir(Path(cfg.out)), run_key(cfg, p.data_sha256))
    return p


# -----------------------------------------------------------------------------
# A whole evaluation

def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run(make_plan, *args) -> tuple[Plan, list[Score | None]]:
    """Join the process group, make_plan(*args) on every rank, then evaluate its checkpoints one after
    another, each data parallel over all ranks. Each rank finds bad input by itself; they wait for
    each other before raising it, so that rank 0 prints it before torchrun, seeing a rank exit, stops it."""
    _, _, device = M.init_distributed()
    try:
        p = make_plan(*args)
    except M.UsageError:
        barrier()
        raise
    return p, [evaluate(cfg, p.samples, p.data_sha256, device) for cfg in p.jobs]


def evaluate(cfg: EvalConfig, samples: list[Sample], data_sha256: str, device) -> Score | None:
    """Predict every item not done yet, its batches dealt out to the ranks; then rank 0 merges, writes
    and scores (and returns the score; the other ranks return None)."""
    rank, world = this_rank(), dist.get_world_size() if dist.is_initialized() else 1
    out = Path(cfg.out)
    todo = pending(parts_dir(out), run_key(cfg, data_sha256), samples)
    M.print0(f"{cfg.model} on {cfg.data}: {len(samples)} items, {len(samples) - len(todo)} already done in "
             f"{parts_dir(out)}, {len(todo)} to evaluate on {world} rank(s)")
    seconds = predict_share(cfg, samples, batches(todo, cfg.batch_size)[rank::world], device)
    barrier()
    if todo:
        M.print0(f"{len(todo)} items in {seconds:.1f} s: {len(todo) / seconds:.2f} items/s on {world} rank(s)")
    s = finish(cfg, samples, out, data_sha256, world) if rank == 0 else None
    barrier()  # no rank returns (or starts another evaluation) before the results are written
    return s


def pending(parts: Path, key: dict, samples: list[Sample]) -> list[int]:
    """The items without a prediction in the part files, and those whose audio failed but now reads
    (so a finished evaluation with a missing clip loads no model again), the same on every rank."""
    done = read_parts(parts)
    barrier()  # every rank has read the same part files before any rank writes to them
    parts.mkdir(parents=True, exist_ok=True)
    if this_rank() == 0 and not (parts / "run.json").exists():
        write_json(parts / "run.json", key)
    return [i for i, s in enumerate(samples) if i not in done or (done[i].error and readable(s.audio_path))]


def readable(path: str) -> bool:
    try:
        return audio_duration(path) > 0  # reads the header only
    except AudioError:
        return False


def predict_share(cfg: EvalConfig, samples: list[Sample], mine: list[list[int]], device) -> float:
    """Load the model and predict this rank's batches into its part file; seconds spent predicting."""
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
    records = [output_record(s, done[i]) for i, s in enumerate(samples)]
    write_predictions(out, records)
    version = KNOWN_DATA.get(data_sha256)
    source = Provenance(cfg.data, data_sha256, version, cfg.model, {**asdict(cfg), "world_size": world})
    M.print0(f"predictions: {out}; data: {cfg.data} ({version or 'sha256 ' + data_sha256})")
    if samples[0].answer is None:  # read_data: all answers withheld, or none
        return finish_withheld(samples, records, out, source, cfg.key)
    s = score(records, cfg.key)
    print_score(s)
    write_json(summary_path(out), summary(s, out, source))
    return s


def finish_withheld(samples: list[Sample], records: list[dict], out: Path, source: Provenance, key: str) -> Score:
    """A test set whose answers are withheld: no score; the submission file for the leaderboard (each
    item as released plus the prediction under `key`), and a summary naming it (and the items whose
    audio failed)."""
    path = submission_path(out)
    from tools import benchmarks  # the test split's submission: a tool beside the core
    write_json(path, benchmarks.submission([s.meta for s in samples], [r[key] for r in records], key))
    errors = [{"index": i, "id": s.meta.get("id"), "error": r["error"]}
              for i, (s, r) in enumerate(zip(samples, records)) if "error" in r]
    s = Score("withheld", key, Tally(), {}, 0, errors)
    M.print0(f"answers withheld: no score; the submission for the leaderboard is {path} ({len(samples)} items)")
    print_score(s)
    write_json(summary_path(out), {"predictions": str(out), "predictions_sha256": sha256(out), "benchmark":
                                   reward.NAMES[s.benchmark], "items": len(samples), "submission": str(path),
                                   "submission_sha256": sha256(path), "errors": errors, **asdict(source)})
    return s


# -----------------------------------------------------------------------------
# A run folder's table: accuracy per step

def step_of(checkpoint) -> int:
    return int(CHECKPOINT.fullmatch(Path(checkpoint).name).group(1))


def step_table(p: Plan, scores: list[Score]) -> dict:
    """Accuracy per checkpoint in the first report group (MMAU: task; else category; None where a
    column has no item) and in total. The best row has the highest total (the earliest of a tie)."""
    field = next(iter(scores[0].groups), None)
    columns = list(dict.fromkeys(v for s in scores for v in s.groups.get(field, {})))
    rows = [{"step": step_of(cfg.model), "checkpoint": cfg.model, "predictions": cfg.out,
             "accuracy": {c: round(t.accuracy, 4) if (t := s.groups[field].get(c, Tally())).total else None
                          for c in columns} | {"total": round(s.total.accuracy, 4)},
             "correct": s.total.correct, "total": s.total.total}
            for cfg, s in zip(p.jobs, scores)]
    best = max(rows, key=lambda r: (r["accuracy"]["total"], -r["step"]))
    version = KNOWN_DATA.get(p.data_sha256)
    return {"data": p.jobs[0].data, "data_sha256": p.data_sha256, "data_version": version, "key": scores[0].key,
            "group": field, "columns": columns + ["total"], "best_step": best["step"], "rows": rows}


def table_lines(table: dict) -> list[str]:
    """The table as text: one row per step, accuracy in %, the best step marked."""
    widths = [max(8, len(c) + 2) for c in table["columns"]]
    lines = ["step".rjust(8) + "".join(c.rjust(w) for c, w in zip(table["columns"], widths))]
    for row in table["rows"]:
        cells = "".join(("-" if row["accuracy"][c] is None else f"{row['accuracy'][c]:.2f}").rjust(w)
                        for c, w in zip(table["columns"], widths))
        lines.append(f"{row['step']:>8}{cells}" + ("  <- best" if row["step"] == table["best_step"] else ""))
    return lines


def report_table(p: Plan, scores: list[Score]) -> dict | None:
    """Rank 0: print the run's table and write it next to the predictions (none without answers)."""
    if scores[0].benchmark == "withheld":
        M.print0("\nanswers withheld: no table; each checkpoint's submission file is next to its predictions")
        return None
    table = step_table(p, scores)
    source = table["data_version"] or "sha256 " + p.data_sha256[:12]
    M.print0(f"\nAccuracy (%) per checkpoint on {table['data']} ({source}):")
    for line in table_lines(table):
        M.print0(line)
    write_json(p.table, table)
    M.print0(f"table: {p.table}")
    return table


# -----------------------------------------------------------------------------
# The demo: the starting policy and the newest checkpoint on the synthetic test split

def demo_checkpoints(runs: Path = DEMO_RUNS) -> list[Path]:
    """checkpoint-0 (the starting policy, if present) and the newest complete checkpoint."""
    found = run_checkpoints(runs)
    return list(dict.fromkeys([p for p in found[:1] if step_of(p) == 0] + found[-1:]))


def demo(batch_size: int, max_new_tokens: int, dtype: str) -> int:
    """Evaluate the demo's starting model and its newest checkpoint; print both accuracies."""
    checkpoints = demo_checkpoints()
    if not checkpoints or not DEMO_TEST.exists():
        M.print0(f"No demo checkpoints in {DEMO_RUNS}/ or no test split {DEMO_TEST}: run `python train.py` first.")
        return 1
    jobs = [EvalConfig(model=str(c), data=str(DEMO_TEST), out=str(DEMO_RUNS / "eval" / f"{c.name}.json"),
                       batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype) for c in checkpoints]
    _, scores = run(lambda: checked(Plan(jobs, read_data(str(DEMO_TEST), None), sha256(DEMO_TEST))))
    if this_rank() == 0:
        M.print0(f"\nGreedy accuracy on {DEMO_TEST}: "
                 + " -> ".join(f"{c.name} {s.total.accuracy:.2f}%" for c, s in zip(checkpoints, scores)))
    return 0


# -----------------------------------------------------------------------------
# Command line

def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a Qwen2-Audio checkpoint, or every checkpoint of a "
                                                 "training run, on MMAU, MMAR, MMSU or other questions.")
    parser.add_argument("--model", help="model folder (with its processor), or a run folder of checkpoint-N folders")
    parser.add_argument("--data", help="MMAU JSON (test-mini, or test: a submission file), MMAR-meta.json, MMSU, "
                        "R1-AQA JSONL or plain JSONL question file")
    parser.add_argument("--audio-dir", help="folder the audio paths are relative to (default: the data file's)")
    parser.add_argument("--out", help="predictions JSON to write; with a run folder, a folder for one per "
                                      "checkpoint and the table (default: RUN/eval/<data file stem>)")
    parser.add_argument("--batch-size", type=positive, default=8, help="items per generate() call; part of "
                        "what decides the predictions, so a resumed run must keep it")
    parser.add_argument("--max-new-tokens", type=positive, default=256)
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 (the 7B on a GPU); the demo "
                        "uses float32, several times faster on a CPU")
    parser.add_argument("--prompt", choices=PROMPTS, default="answer", help="the paper's prompt the model was "
                        "trained with: direct (<1>), answer (<2>, R1-AQA), think (<3>)")
    parser.add_argument("--system-prompt", default="", help="the chat's system turn the model was trained with "
                        "(default: the chat template's own)")
    parser.add_argument("--think-words", type=int, default=0, help="with --prompt think: the word limit the "
                        "model was trained with (Ke-Omni-R: 50; default: none)")
    parser.add_argument("--downmix", choices=DOWNMIX, default="first",
                        help="multi-channel audio: keep channel 0 (R1-AQA) or average the channels")
    parser.add_argument("--limit", type=positive, help="evaluate the first N items only")
    parser.add_argument("--score", metavar="PREDICTIONS", help="only score an existing predictions file "
                        "(JSON list or JSONL)")
    parser.add_argument("--key", choices=reward.KEYS, help="field to score, and the one a test set's submission "
                        "carries: model_prediction (the default, if present), model_output (the whole reply, "
                        "which MMAU's evaluation.py reads), answer_prediction (MMAR's script's), response (MMSU's)")
    args = parser.parse_args(argv)
    if not args.score and (args.model or args.data or args.out) and not (args.model and args.data):
        parser.error("--model and --data go together (or give none of them for the demo)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.score:
        from tools import benchmarks  # scoring a predictions file, ours or in an official script's format
        benchmarks.score_file(Path(args.score), args.key)
        return 0
    if args.model is None:
        status = demo(args.batch_size, args.max_new_tokens, args.dtype or "float32")
    else:
        p, scores = run(plan, args)
        if p.table and this_rank() == 0:
            report_table(p, scores)
        status = 0
    if dist.is_initialized():
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(M.run_main(main))
