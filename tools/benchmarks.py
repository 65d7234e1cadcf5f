"""
Each benchmark's own scoring rule and printout, item for item as its official script does it.

evaluate.py runs the model and writes the predictions; this file turns prediction records (the
original item plus `model_prediction` and `model_output`) into numbers and the official lines.
The benchmark is recognised from the records' fields, as data.py recognises the question file:

- MMAU (Sakshi113/MMAU, evaluation.py): MMAU's string match (reward.mmau_correct), here on
  model_prediction (the script itself reads model_output: --key model_output); lines per task
  (sound, music, speech, always), per difficulty (easy, hard, medium, always), per sub-category
  (in order of appearance; a null one in no line), then `Total Accuracy: 64.50% over 1000
  samples` and `No prediction count: 0`.
- MMAR (ddlBoJack/MMAR, code/evaluation.py, adapted from MMAU's): the same string match on
  model_prediction, the answer taken as written (an MMAR answer need not be exactly a choice);
  lines per modality (its 7, always), per category (its 4 layers, always), per sub-category, Total.
- MMSU (dingdongwang/MMSU_Bench, mmsu_evaluation.py): the script reads a letter A-D from the
  `response` (its first character, else the one before the last) and counts it right when that
  choice's text equals answer_gt; a response where it finds no letter is left out of every count.
  Our prompt shows the choices as a list, so the model answers with a choice's text: `response`
  is the letter of the choice the prediction equals exactly, else the prediction itself (a letter
  answer such as "B" or "The answer is B." then reads as the script reads it). Lines per category
  and sub-category, per category, `Overall Accuracy: 0.6050` and `Total count: 5000`.
- Other data (R1-AQA/AVQA, plain, the synthetic task): MMAU's string match, grouped by `category`.

Items without the scored field are not counted (as in MMAU's and MMAR's scripts); the count is
reported on a line of its own, after the official ones. A test set whose answers are withheld
(MMAU's test split) is not scored: submission() writes what MMAU's leaderboard takes.

    s = score(records)                    # or score(records, "model_output")
    print("\n".join(report_lines(s) + note_lines(s)))
"""

from dataclasses import dataclass

from data import MMSU_CHOICES, record_format
from reward import mmau_correct

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
LETTERS = "ABCD"  # MMSU's choice_a .. choice_d


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
    skipped: int  # items without the key: not counted, as in the official scripts
    errors: list[dict]  # items whose audio failed (counted wrong)
    unparsed: int = 0  # MMSU: responses with no letter where its script looks, left out of every count as there


def detect(records: list[dict]) -> str:
    """The benchmark of prediction records: MMSU or MMAR by their fields (data.record_format's rule on
    the first record), MMAU if any record has task, difficulty or sub-category, else other."""
    first = next((r for r in records if isinstance(r, dict)), {})
    fmt = record_format(first, listed=True)
    if fmt in ("mmsu", "mmar"):
        return fmt
    return "mmau" if any(f in r for r in records for f in SECTIONS["mmau"]) else "other"


def default_key(records: list[dict]) -> str:
    return "model_prediction" if any("model_prediction" in r for r in records) else "model_output"


def score(records: list[dict], key: str | None = None, benchmark: str | None = None) -> Score:
    """Score prediction records by their benchmark's rule on `key` (default: model_prediction, which
    MMAR's script reads, if any record has it; else model_output, which MMAU's script reads)."""
    key = key or default_key(records)
    benchmark = benchmark or detect(records)
    scored = [r for r in records if key in r]
    errors = [{"index": i, "id": r.get("id"), "error": r["error"]} for i, r in enumerate(records) if "error" in r]
    if benchmark == "mmsu":
        total, groups, unparsed = _score_mmsu(scored, key)
    else:
        (total, groups), unparsed = _score_string_match(scored, key, benchmark), 0
    return Score(benchmark, key, total, groups, len(records) - len(scored), errors, unparsed)


# -----------------------------------------------------------------------------
# MMAU, MMAR and other data: the string match

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


def _string_match_lines(s: Score) -> list[str]:
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


# -----------------------------------------------------------------------------
# MMSU: a letter read from the response

def mmsu_response(prediction: str, record: dict) -> str:
    """The `response` MMSU's script reads: the letter of the choice (choice_a .. choice_d) that the
    prediction equals exactly, once stripped; else the prediction as it is."""
    text = prediction.strip()
    for letter, field in zip(LETTERS, MMSU_CHOICES):
        if text and record.get(field) == text:
            return letter
    return prediction


def mmsu_letter(response: str) -> str | None:
    """The letter MMSU's script reads from a response, stripped and without newlines: its first
    character if that is A-D, else the one before the last ("The answer is B."). "" for an empty or
    "None" response: counted, wrong (the script would reuse the previous item's letter there, a
    variable left over from the loop). None where it finds no letter: not counted at all."""
    predict = response.strip().replace("\n", "")
    if predict in ("", "None"):
        return ""
    if predict[0] in LETTERS:
        return predict[0]
    if len(predict) > 1 and predict[-2] in LETTERS:
        return predict[-2]
    return None


def mmsu_correct(letter: str, record: dict) -> bool:
    """Right when the chosen letter's choice text equals answer_gt, as the script compares them."""
    return letter != "" and record.get(f"choice_{letter.lower()}", "") == record.get("answer_gt", "")


def _score_mmsu(scored: list[dict], key: str) -> tuple[Tally, dict, int]:
    """Totals per category, per (category, sub-category) and overall, in order of first appearance
    among the counted items, as the script's nested defaultdicts fill."""
    total, by_category, by_pair, unparsed = Tally(), {}, {}, 0
    for r in scored:
        letter = mmsu_letter(mmsu_response(r[key], r))
        if letter is None:
            unparsed += 1
            continue
        category, sub = str(r.get("category", "")), str(r.get("sub-category", ""))
        correct = mmsu_correct(letter, r)
        for tally in (total, by_category.setdefault(category, Tally()), by_pair.setdefault((category, sub), Tally())):
            tally.add(correct)
    return total, {"category": by_category, "sub-category": by_pair}, unparsed


def _mmsu_lines(s: Score) -> list[str]:
    """mmsu_evaluation.py's printout, line for line (accuracies as fractions, 4 decimals)."""
    by_category, by_pair = s.groups["category"], s.groups["sub-category"]
    lines = [f"Category: {c}, Sub-category: {sub}, Accuracy: {t.fraction:.4f}"
             for category in by_category for (c, sub), t in by_pair.items() if c == category]
    lines += [f"Category: {c}, Average Accuracy: {t.fraction:.4f}" for c, t in by_category.items()]
    return lines + [f"Overall Accuracy: {s.total.fraction:.4f}", f"Total count: {s.total.total}"]


# -----------------------------------------------------------------------------
# Reports and files

def report_lines(s: Score) -> list[str]:
    """The official script's printout for the score's benchmark (none without answers)."""
    if s.benchmark == "withheld":
        return []
    return _mmsu_lines(s) if s.benchmark == "mmsu" else _string_match_lines(s)


def note_lines(s: Score) -> list[str]:
    """What the official printout does not show: items left out of the counts, and why."""
    lines = []
    if s.skipped:
        lines.append(f"{s.skipped} items have no '{s.key}' field: not scored, as in the official script")
    if s.unparsed:
        lines.append(f"{s.unparsed} items have a response with no letter A-D where MMSU's script looks (the "
                     f"first character or the one before the last): not counted, as in the official script")
    return lines


def official_fields(record: dict) -> dict:
    """Fields a benchmark's own script reads that are not in our prediction record: MMSU's `response`."""
    if detect([record]) == "mmsu":
        return {"response": mmsu_response(record["model_prediction"], record)}
    return {}


def submission(items: list[dict], predictions: list[str]) -> list[dict]:
    """The test-set submission: each item as released plus `model_prediction`, in the file's order. It
    is the input MMAU's README gives for its evaluation.py, which the leaderboard runs against the
    withheld answers; the id identifies each item."""
    return [{**item, "model_prediction": p} for item, p in zip(items, predictions, strict=True)]


def summary_groups(s: Score) -> dict:
    """The groups as JSON: MMSU's (category, sub-category) pairs become "category / sub-category"."""
    return {f: {(" / ".join(v) if isinstance(v, tuple) else v): t.as_dict() for v, t in g.items()}
            for f, g in s.groups.items()}
