"""MMSU's scoring and the MMAU test split's submission: the benchmark rules that are not MMAU's string match.

MMSU (dingdongwang/MMSU_Bench, mmsu_evaluation.py, on JSONL) reads a letter A-D from the `response` (its
first character, else the one before the last) and counts it right when that choice's text equals
answer_gt; a response with no letter, and a null one, is left out; a missing one counts wrong. Our prompt
shows the choices as a list, so `response` is the letter of the choice the prediction equals exactly, else
the prediction itself. A test set whose answers are withheld (MMAU's test split) is not scored:
submission() writes what its leaderboard takes. `evaluate.py --score FILE` (score_file) scores a
predictions file, ours or in an official script's format. docs/evaluation.md has each benchmark's rules.
"""

import json
from pathlib import Path

import evaluate as E
import model as M
import reward
from data import MMSU_CHOICES
from reward import Tally

LETTERS = "ABCD"  # MMSU's choice_a .. choice_d


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
    "None" response: counted, wrong. None where it finds no letter: not counted at all."""
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


def score_mmsu(scored: list[dict], key: str) -> tuple[Tally, dict, int]:
    """Totals per category, per (category, sub-category) and overall, in order of first appearance
    among the counted items, as the script's nested defaultdicts fill. The script's own `response` is
    read as it is; any other key's text is first turned into the response evaluate.py would write."""
    total, by_category, by_pair, unparsed = Tally(), {}, {}, 0
    for r in scored:
        text = r.get(key, "")
        letter = mmsu_letter(text if key == "response" else mmsu_response(text, r))
        if letter is None:
            unparsed += 1
            continue
        category, sub = str(r.get("category", "")), str(r.get("sub-category", ""))
        correct = mmsu_correct(letter, r)
        for tally in (total, by_category.setdefault(category, Tally()), by_pair.setdefault((category, sub), Tally())):
            tally.add(correct)
    return total, {"category": by_category, "sub-category": by_pair}, unparsed


def mmsu_lines(s) -> list[str]:
    """mmsu_evaluation.py's printout, line for line (accuracies as fractions, 4 decimals)."""
    by_category, by_pair = s.groups["category"], s.groups["sub-category"]
    lines = [f"Category: {c}, Sub-category: {sub}, Accuracy: {t.fraction:.4f}"
             for category in by_category for (c, sub), t in by_pair.items() if c == category]
    lines += [f"Category: {c}, Average Accuracy: {t.fraction:.4f}" for c, t in by_category.items()]
    return lines + [f"Overall Accuracy: {s.total.fraction:.4f}", f"Total count: {s.total.total}"]


def submission(items: list[dict], predictions: list[str], key: str = "model_prediction") -> list[dict]:
    """The test-set submission: each item as released plus the prediction under `key`, in the file's
    order. model_prediction is the input MMAU's README gives for its evaluation.py (the script as
    published reads model_output), which the leaderboard runs against the withheld answers; the id
    identifies each item."""
    return [{**item, key: p} for item, p in zip(items, predictions, strict=True)]


# -----------------------------------------------------------------------------
# evaluate.py --score: a predictions file, ours or in an official script's format (JSON list or JSONL)

def known_provenance(predictions: Path) -> E.Provenance:
    """The provenance in an existing summary of exactly this predictions file, else none."""
    path = E.summary_path(predictions)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("predictions_sha256") == E.sha256(predictions):
            return E.Provenance(**{k: old.get(k) for k in ("data", "data_sha256", "data_version", "model",
                                                           "settings")}, note="scored again with --score")
    return E.Provenance(note="source data unknown: no summary of this exact predictions file was found")


def read_predictions(path: Path) -> list[dict]:
    """--score's file: question records as evaluate.py or the benchmark's own tools write them, a JSON
    list or JSONL (one record a line, as MMSU's). Anything else is a UsageError naming the file and,
    for a bad record, its index."""
    what = f"--score {path}"
    records = read_records(path, what)
    mmsu = reward.detect([r for r in records if isinstance(r, dict)]) == "mmsu"
    answer, choices = ("answer_gt", "choice_a .. choice_d") if mmsu else ("answer", "a 'choices' list")
    if records and all(isinstance(r, dict) and r.get(answer) is None for r in records):
        raise M.UsageError(f"{what}: no item has an answer (a test set whose answers are withheld): nothing to "
                           f"score; its evaluation wrote {E.submission_path(path)} for the leaderboard")
    for i, r in enumerate(records):
        if not is_question_record(r, mmsu):
            raise M.UsageError(f"{what}: item {i} is not a question record (an '{answer}' string, {choices}, "
                               f"predictions as strings)")
    return records


def is_question_record(r, mmsu: bool) -> bool:
    """The answer and choices there (MMSU's: answer_gt, choice_a ..), and every prediction a string
    (MMSU's `response` may be null: its script skips it, and so does score())."""
    if not isinstance(r, dict):
        return False
    answered = (isinstance(r.get("answer_gt"), str) and isinstance(r.get("choice_a"), str) if mmsu else
                isinstance(r.get("answer"), str) and isinstance(r.get("choices"), list))
    return answered and all(isinstance(r[k], str) for k in ("model_prediction", "model_output", "answer_prediction")
                            if k in r)


def read_records(path: Path, what: str) -> list:
    """The JSON list in the file, else its JSONL lines (one JSON value a line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise M.UsageError(f"{what}: no such file (give a predictions JSON that evaluate.py wrote)") from None
    except OSError as e:
        raise M.UsageError(f"{what}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise M.UsageError(f"{what}: not a JSON file ({e})") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        whole = e
    if isinstance(whole, list):
        return whole
    try:
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        lines = []
    if lines:
        return lines
    if isinstance(whole, json.JSONDecodeError):
        raise M.UsageError(f"{what}: not a JSON file, nor JSONL ({whole})")
    raise M.UsageError(f"{what}: a JSON {type(whole).__name__}, but a predictions file is a list of items (or JSONL)")


def score_file(path: Path, key: str | None) -> reward.Score:
    """--score: score an existing predictions file, print the official lines, write its summary."""
    records = read_predictions(path)
    s = reward.score_predictions(records, key)
    source = known_provenance(path)
    M.print0(f"scoring {path} by '{s.key}': {len(records) - s.skipped} items, {s.skipped} without it skipped")
    if source.data:
        M.print0(f"data: {source.data} ({source.data_version or 'sha256 ' + source.data_sha256})")
    E.print_score(s)
    E.write_json(E.summary_path(path), E.summary(s, path, source))
    return s
