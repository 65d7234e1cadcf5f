"""The paper's comparison in miniature: supervised fine-tuning against GRPO, full and LoRA, on a CPU.

From the demo's start (a warm start on how loud the clips are, correct answers, the encoder frozen), four
runs see the same questions in the same order for the same steps: SFT full, SFT LoRA (rank 8), GRPO full
and GRPO LoRA. The start and each final checkpoint are
scored by evaluate.py (greedy, MMAU's string match) on the held-out split, on shifted audio (shorter,
quieter, noisier clips) and on a reworded question. Finished runs and evaluations are kept, so a second
call only prints the table. docs/experiment.md has the measured tables.
    python -m workshop.compare                      # seed 0, 300 steps
    python -m workshop.compare --seed 1 --out runs/compare-s1
"""

import argparse
import json
import sys
from pathlib import Path

import config
import evaluate
import model as M
import train
from workshop import demo

# Shared by every run: the demo's batch and sampling settings (config.DEMO), for a model given by path.
COMMON = ["--prompts-per-step", "32", "--micro-batch", "32", "--max-new-tokens", "16", "--dtype", "float32",
          "--no-gradient-checkpointing", "--balance-answers", "--lr-decay"]
RUNS = {
    "SFT, full": ["--algo", "sft", "--lr", "1e-3"],
    "SFT, LoRA": ["--algo", "sft", "--lora-rank", "8", "--lr", "1e-2"],
    "GRPO, full": ["--beta", "0.1", "--lr", "1e-3"],
    "GRPO, LoRA": ["--beta", "0.1", "--lora-rank", "8", "--lr", "1e-2"],
}
WARM_START = ["--max-steps", "0", "--warm-start-steps", str(config.DEMO["warm_start_steps"]),
              "--warm-start-data", config.LOUDNESS]


def prepare(cache):
    """The tiny model and the task's four splits: train, held-out test, shifted audio, reworded (the same
    for every seed: the seed is the training's)."""
    model = demo.tiny(cache, window_seconds=2)
    train_jsonl, test_jsonl = demo.make_synthetic(Path(cache) / "synthetic")
    splits = {"held-out": test_jsonl, "shifted audio": demo.make_shifted(Path(cache) / "synthetic", "audio"),
              "reworded": demo.make_shifted(Path(cache) / "synthetic", "wording")}
    return model, train_jsonl, splits


def train_once(args, out):
    """train.py with these flags into `out`, unless a finished run is already there."""
    steps = int(args[args.index("--max-steps") + 1])
    if (out / f"checkpoint-{steps}").exists():
        return
    train.main(args + ["--out", str(out), "--overwrite"])


def score(checkpoint, split, jsonl, out):
    """evaluate.py's accuracy (%) of a checkpoint on a split; its predictions stay in `out`."""
    preds = out / "eval" / f"{checkpoint.parent.name}-{checkpoint.name}-{split.replace(' ', '-')}.json"
    summary = evaluate.summary_path(preds)
    if not summary.exists():
        preds.parent.mkdir(parents=True, exist_ok=True)
        evaluate.main(["--model", str(checkpoint), "--data", str(jsonl), "--out", str(preds), "--batch-size", "32",
                       "--max-new-tokens", "16", "--dtype", "float32"])
    return json.loads(summary.read_text())["accuracy"]


def table(rows, splits):
    lines = [f"| {'run':11s} | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    lines += [f"| {name:11s} | " + " | ".join(f"{acc[s]:.1f}%" for s in splits) + " |" for name, acc in rows.items()]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="data order, sampling and LoRA initialisation")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    parser.add_argument("--out", default="runs/compare", help="where the runs, predictions and table go")
    parser.add_argument("--cache-dir", default="runs", help="where the tiny model and the task are built")
    args = parser.parse_args(argv)
    out = Path(args.out)
    tiny, train_jsonl, splits = prepare(args.cache_dir)
    base = ["--data", str(train_jsonl), "--seed", str(args.seed), *COMMON]
    train_once(["--model", str(tiny), *base, *WARM_START, "--cache-dir", args.cache_dir], out / "start")
    start = out / "start" / "checkpoint-0"
    rows = {"start": {s: score(start, s, j, out) for s, j in splits.items()}}
    for name, flags in RUNS.items():
        folder = out / name.lower().replace(", ", "-")
        train_once(["--model", str(start), *base, "--max-steps", str(args.steps), "--save-every", str(args.steps),
                    *flags], folder)
        rows[name] = {s: score(folder / f"checkpoint-{args.steps}", s, j, out) for s, j in splits.items()}
    text = table(rows, splits)
    print(f"\nseed {args.seed}, {args.steps} steps of 32 questions, greedy accuracy (MMAU's string match):\n{text}")
    (out / "table.json").write_text(json.dumps({"seed": args.seed, "steps": args.steps, "accuracy": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(M.run_main(main))
