"""The rules that judge an answer: R1-AQA's rewards for training, and the benchmarks' scoring for evaluation.

Training (score): accuracy, 1 if the first <answer>...</answer> (or the whole completion) equals the correct
choice exactly, plus format, 1 if the whole completion is one answer block (the think prompt: a think
block first; the direct prompt: a bare one-line answer); 0, 1 or 2 with both weights at 1. Unlike R1-AQA's
code, accuracy is the string match alone, without math_verify (docs/grpo.md says why).
Evaluation (score_predictions): MMAU's official string match (mmau_correct) over a predictions file, per
task, difficulty and sub-category (MMAR: its modality and layers; other data: category); MMSU's letter rule
comes from tools/benchmarks.py. Completions are decoded with special tokens skipped before scoring.
"""

import re
from dataclasses import dataclass

from data import record_format

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>")  # no DOTALL: "." does not match a newline
FORMAT = re.compile(r"<answer>.*?</answer>", re.DOTALL)
THINK_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
DIRECT_FORMAT = re.compile(r"[^\s<>](?:[^\n<>]*[^\s<>])?")  # one line, no tags, no surrounding space
FORMATS = {"direct": DIRECT_FORMAT, "answer": FORMAT, "think": THINK_FORMAT}  # by prompt (data.PROMPTS)
WORD = re.compile(r"\b\w+\b")


def extract_answer(text: str) -> str:
    """The first single-line <answer>...</answer> content, else the whole text; stripped."""
    match = ANSWER_TAG.search(text)
    if match is None:
        return text.strip()
    return match.group(1).strip()


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 if the extracted answer equals the correct choice string exactly, else 0.0."""
    # R1-AQA's ground truth is "<answer>{choice}</answer>", parsed with the same regex and strip,
    # so the choice string is stripped too.
    return 1.0 if extract_answer(completion) == answer.strip() else 0.0


def format_reward(completion: str, prompt: str = "answer") -> float:
    """1.0 if the whole completion has the prompt's format: an answer block (answer), a think block
    then an answer block (think), or a bare one-line answer (direct)."""
    # The completion was decoded with special tokens skipped, so no <|im_end|> trails it. It is
    # not stripped, as in R1-AQA: any leading or trailing whitespace makes the format 0.
    return 1.0 if FORMATS[prompt].fullmatch(completion) else 0.0


@dataclass
class Reward:
    accuracy: float
    format: float
    total: float


def score(completion: str, answer: str, prompt: str = "answer",
          accuracy_weight: float = 1.0, format_weight: float = 1.0) -> Reward:
    """Both rewards of one completion and their weighted sum (R1-AQA: weights 1 and 1)."""
    accuracy = accuracy_reward(completion, answer)
    fmt = format_reward(completion, prompt)
    return Reward(accuracy, fmt, accuracy_weight * accuracy + format_weight * fmt)


def mmau_tokens(text: str) -> set[str]:
    """The set of lowercase words of a text, as MMAU's evaluation tokenizes it."""
    return set(WORD.findall(text.lower()))


def mmau_correct(prediction: str, answer: str, choices: list[str]) -> bool:
    """MMAU's string match: all answer words present, no word that only another choice has."""
    predicted = mmau_tokens(prediction)
    expected = mmau_tokens(answer)
    if not predicted:
        return False
    wrong = set()
    for choice in choices:
        tokens = mmau_tokens(choice)
        if tokens != expected:  # a reordering of the answer's words counts as the answer
            wrong |= tokens - expected
    return expected <= predicted and predicted.isdisjoint(wrong)


# -----------------------------------------------------------------------------
# Scoring a predictions file: MMAU's string match (MMAU, MMAR, other data), MMSU's rule from tools/

NAMES = {"mmau": "MMAU", "mmar": "MMAR", "mmsu": "MMSU", "other": "other data (MMAU's string match)",
         "withheld": "answers withheld (a test split): no score, a submission file"}
# The report sections of the string-match benchmarks, in print order.
SECTIONS = {"mmau": ["task", "difficulty", "sub-category"], "mmar": ["modality", "category", "sub-category"]}
# The official scripts' own dicts: these values are printed in this order, even over 0 samples.
ORDER = {
    "mmau": {"task": ["sound", "music", "speech"], "difficulty": ["easy", "hard", "medium"]},
    "mmar": {"modality": ["sound", "music", "speech", "mix-sound-music", "mix-sound-speech", "mix-music-speech",
                          "mix-sound-music-speech"],
             "category": ["Signal Layer", "Perception Layer", "Semantic Layer", "Cultural Layer"]},
}
# The field each official script scores, where it is not model_prediction: MMAU's evaluation.py reads
# model_output (the whole reply), MMAR's code/evaluation.py answer_prediction, MMSU's script response.
OFFICIAL_KEY = {"mmau": "model_output", "mmar": "answer_prediction", "mmsu": "response"}
KEYS = ["model_prediction", "model_output", "answer_prediction", "response"]  # what --key may name


@dataclass
class Tally:
    correct: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def accuracy(self) -> float:
        return self.fraction * 100  # (correct / total) * 100, as the official scripts compute it

    def add(self, correct: bool) -> None:
        self.correct += correct
        self.total += 1

    def as_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "correct": self.correct, "total": self.total}


@dataclass
class Score:
    benchmark: str  # a key of NAMES
    key: str  # the field that was scored
    total: Tally
    groups: dict[str, dict]  # section -> value -> Tally, in print order (MMSU's sub-category: (category, sub))
    skipped: int  # items without the key (MMSU: with a null one): not counted, as in the official scripts
    errors: list[dict]  # items whose audio failed (counted wrong)
    unparsed: int = 0  # MMSU: responses with no letter where its script looks, left out of every count as there
    missing: int = 0  # MMSU: items without the key, read as "" and counted wrong, as its script does


def detect(records: list[dict]) -> str:
    """The benchmark of prediction records: MMSU or MMAR by their fields (data.record_format's rule on
    the first record), MMAU if any record has task, difficulty or sub-category, else other."""
    first = next((r for r in records if isinstance(r, dict)), {})
    fmt = record_format(first, listed=True)
    if fmt in ("mmsu", "mmar"):
        return fmt
    return "mmau" if any(f in r for r in records for f in SECTIONS["mmau"]) else "other"


def default_key(records: list[dict], benchmark: str) -> str:
    """model_prediction if any record has it (evaluate.py's records all do); else the key the
    benchmark's official script reads (a file in its own format), if any record has it; else
    model_output."""
    for key in ("model_prediction", OFFICIAL_KEY.get(benchmark)):
        if any(key in r for r in records):
            return key
    return "model_output"


def score_predictions(records: list[dict], key: str | None = None, benchmark: str | None = None) -> Score:
    """Score prediction records by their benchmark's rule on `key` (default: default_key): MMAU's string
    match, or for MMSU its letter rule (tools/benchmarks.py)."""
    benchmark = benchmark or detect(records)
    key = key or default_key(records, benchmark)
    errors = [{"index": i, "id": r.get("id"), "error": r["error"]} for i, r in enumerate(records) if "error" in r]
    if benchmark == "mmsu":  # its script reads record.get('response', ''), and skips what .strip() fails on
        from tools import benchmarks  # MMSU's rule: a tool beside the core, imported for MMSU data only
        scored = [r for r in records if isinstance(r.get(key, ""), str)]
        total, groups, unparsed = benchmarks.score_mmsu(scored, key)
        missing = sum(key not in r for r in records)
    else:
        scored = [r for r in records if key in r]
        (total, groups), unparsed, missing = _score_string_match(scored, key, benchmark), 0, 0
    return Score(benchmark, key, total, groups, len(records) - len(scored), errors, unparsed, missing)


def sections(benchmark: str, records: list[dict]) -> list[str]:
    """The report sections: the official ones, or for other data `category` if records have it."""
    if benchmark in SECTIONS:
        return SECTIONS[benchmark]
    return ["category"] if any("category" in r for r in records) else []


def group_order(known: list[str], values: list[str]) -> list[str]:
    """The official script's values in its order, then any other value in order of appearance (where
    the official script, whose dict has no such key, would stop with a KeyError)."""
    return known + [v for v in dict.fromkeys(values) if v not in known]


def group_of(record: dict, field: str) -> str | None:
    """The record's group for a field; a missing or null value is in no group of that field (the
    official scripts' rule for sub-category), while the record still counts in the other groups and
    the total."""
    value = record.get(field)
    return None if value is None else str(value)


def _score_string_match(scored: list[dict], key: str, benchmark: str) -> tuple[Tally, dict]:
    """The total and the groups of each report section, every scored item by MMAU's string match."""
    fields = sections(benchmark, scored)
    known = ORDER.get(benchmark, {})
    values = {f: [g for r in scored if (g := group_of(r, f)) is not None] for f in fields}
    groups = {f: {v: Tally() for v in group_order(known.get(f, []), values[f])} for f in fields}
    total = Tally()
    for r in scored:
        correct = mmau_correct(r[key], r["answer"], r["choices"])
        for tally in [total] + [groups[f][g] for f in fields if (g := group_of(r, f)) is not None]:
            tally.add(correct)
    return total, groups
