"""evaluate.py: MMAU's scoring and printout, inference end to end, resuming, and 2 ranks.

The end-to-end tests run the tiny random model on tests/fixtures/mmau-mini.json, 20 invented
questions in MMAU test-mini's schema (the same fields and shapes: a list category, a repeated
choice, 2 to 5 choices, both key orders), with generated noise clips for audio. The real MMAU
question files (MMAU_DIR, default: the shared folder next to the repository) are an extra check
where present: every answer scores correct, and the summary recognises their versions.

Run: python -m pytest -q tests/test_evaluate.py
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
from transformers import Qwen2AudioForConditionalGeneration

import evaluate as E
import model as M
import reward as R
from conftest import ROOT, pitch_samples
from data import SAMPLE_RATE, Sample
from reward import extract_answer, mmau_correct
from tools import benchmarks
from workshop.demo import build_tiny, make_synthetic

MMAU_DIR = Path(os.environ.get("MMAU_DIR", ROOT.parent / "shared" / "mmau"))
MMAU_VERSIONS = {MMAU_DIR / "mmau-test-mini-2025-03-25.json": "MMAU test-mini, original (2025-03-25)",
                 MMAU_DIR / "mmau-test-mini.json": "MMAU test-mini, revised (2025-05-15)"}
MMAU = ROOT / "tests" / "fixtures" / "mmau-mini.json"  # made for these tests, in MMAU's schema


def real(path: Path):
    """A real MMAU file as a test parameter: skipped where it is not present."""
    return pytest.param(path, id=path.stem, marks=pytest.mark.skipif(not path.exists(), reason=f"no {path}"))

CHOICES = ["Man", "Woman", "Child", "Robot"]
N = 20  # items evaluated end to end
MISSING = 5  # the item whose clip is not written


def item(prediction, answer="Man", choices=CHOICES, **fields):
    return {"choices": choices, "answer": answer, "model_prediction": prediction, **fields}


def correct(record) -> bool:
    return E.score([record]).total.correct == 1


# ----------------------------------------------------------------------------- loading

def test_load_equals_from_pretrained_in_the_asked_dtype(tiny_dir):
    """M.load reads in the checkpoint's dtype and casts afterwards; the result is the same model as
    from_pretrained(dtype=...): every parameter and buffer (the fp32 rotary frequencies too) with the
    same dtype and value, the same config, and only the Whisper position table frozen."""
    model, _ = M.load(tiny_dir, dtype=torch.bfloat16)
    reference = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    ours, theirs = ({**dict(m.named_parameters()), **dict(m.named_buffers())} for m in (model, reference))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].device.type == "cpu", name
        assert torch.equal(ours[name], tensor), name
    assert ours["model.language_model.rotary_emb.inv_freq"].dtype == torch.float32
    assert model.config.to_dict() == reference.config.to_dict()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.audio_tower.embed_positions.weight"]


def mapped_ranges(suffix):
    """Address ranges of this process's memory maps of files ending in `suffix` (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(suffix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_load_reads_without_a_host_copy(tiny_dir, monkeypatch):
    """M.load asks from_pretrained for the checkpoint's own dtype ("auto"), whatever dtype it returns:
    read that way every weight is a view of the memory-mapped safetensors file (shown on the CPU with
    the tiny model, saved in fp32), so no process holds its own copy of the checkpoint; the cast and
    the move to the device then go one tensor at a time."""
    calls = []
    real = Qwen2AudioForConditionalGeneration.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        calls.append(kwargs)
        return real(cls, path, **kwargs)

    monkeypatch.setattr(Qwen2AudioForConditionalGeneration, "from_pretrained", classmethod(spy))
    M.load(tiny_dir, dtype=torch.bfloat16)
    assert calls == [{"dtype": "auto"}]  # not dtype=bfloat16, which would cast the whole model on the host
    model, _ = M.load(tiny_dir, dtype=torch.float32)
    ranges = mapped_ranges(".safetensors")
    assert ranges and all(any(a <= p.data_ptr() < b for a, b in ranges) for p in model.parameters())


# ----------------------------------------------------------------------------- generation

def test_generate_on_a_sharded_policy_matches_the_plain_model(tiny, tiny_dir):
    """generate() is what training's held-out score can call: on the FSDP2-sharded policy inside
    M.unsharded (one process, a one-process gloo group, fp32) it gives exactly the plain model's
    completions for a left-padded batch of clips of different lengths."""
    model, processor = tiny
    samples, audios = pitch_samples(4)
    # 12 new tokens: the random tiny model rarely stops early, so the texts are long enough to differ
    expected = M.generate(model, processor, samples, audios, "answer", 12)
    assert len(set(expected)) > 1 and all(expected)
    M.init_distributed(always=True)
    try:
        policy = M.sharded_load(tiny_dir, param_dtype=torch.float32).eval()
        with M.unsharded(policy):
            assert M.generate(policy, processor, samples, audios, "answer", 12) == expected
    finally:
        dist.destroy_process_group()


def test_batch_mates_change_the_numerics(tiny_dir):
    """Why the batch size is part of a run's key: an item's bf16 logits change with the other items
    of its batch (they set its left padding), while the same batch gives the same logits again."""
    model, processor = M.load(tiny_dir, dtype=torch.bfloat16)
    samples, audios = pitch_samples(3)
    with torch.no_grad():
        alone, *again = (model(**M.collate(processor, samples[:k], audios[:k])).logits[0, -1] for k in (1, 3, 3))
    assert torch.equal(again[0], again[1]) and not torch.equal(alone, again[0])


# ----------------------------------------------------------------------------- the rule, on crafted cases

def test_exact_choice_is_correct():
    """The answer string itself is correct; another choice is wrong."""
    assert correct(item("Man"))
    assert not correct(item("Woman"))


def test_choice_with_extra_words_is_correct():
    """Extra words are allowed if none of them belongs to a wrong choice."""
    # {the, speaker, is, a, man}: contains {man}, no word of {woman, child, robot}
    assert correct(item("The speaker is a man."))


def test_two_choices_is_wrong():
    """Naming the answer and another choice is wrong: the other choice's word is present."""
    assert not correct(item("Man or Woman"))


def test_choices_sharing_words():
    """Shared words do not count against the answer; a word only a wrong choice has does."""
    bands = ["very low", "low", "high", "very high"]
    # answer "very low": wrong words = {high}; "very low" contains {very, low} and not "high"
    assert correct(item("very low", "very low", bands))
    # "low" lacks the answer's word "very"
    assert not correct(item("low", "very low", bands))
    # answer "low": wrong words = {very, high}; "very low" contains "very"
    assert not correct(item("very low", "low", bands))
    assert correct(item("low", "low", bands))


def test_permutation_of_the_answer_is_correct():
    """A choice with the same words as the answer in another order is ignored, so naming it is correct."""
    choices = ["guitar and drums", "drums and guitar", "piano", "violin"]
    # wrong words = {piano, violin}; "drums and guitar" has the answer's three words
    assert correct(item("drums and guitar", "guitar and drums", choices))


def test_empty_prediction_is_wrong():
    """A prediction without any word is wrong, also when it is only punctuation."""
    assert not correct(item(""))
    assert not correct(item(" ... "))


def test_case_and_punctuation_are_ignored():
    """Words are compared lowercased, punctuation is not a word."""
    assert correct(item("MAN!!"))
    assert correct(item("(man)."))


def test_items_without_the_field_are_skipped(capsys):
    """Records without the scored field are not counted (as in the official script), only reported,
    on a line of their own after the official ones."""
    records = [item("Man"), {"choices": CHOICES, "answer": "Man"}, item("Robot")]
    s = E.score(records)
    assert (s.total.correct, s.total.total, s.skipped) == (1, 2, 1)
    E.print_score(s)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == ["No prediction count: 0",
                          "1 items have no 'model_prediction' field: not scored, as in the official script"]


def test_key_defaults_to_model_prediction_else_model_output():
    """model_prediction is scored when present; otherwise model_output, the official script's key."""
    both = {"choices": CHOICES, "answer": "Man", "model_prediction": "Man", "model_output": "Woman"}
    assert E.score([both]).key == "model_prediction" and E.score([both]).total.correct == 1
    assert E.score([both], key="model_output").total.correct == 0
    raw = {"choices": CHOICES, "answer": "Man", "model_output": "<answer>Man</answer>"}
    # the whole output is tokenized: {answer, man}, which has no wrong word
    assert E.score([raw]).key == "model_output" and E.score([raw]).total.correct == 1


# ----------------------------------------------------------------------------- the printout

def test_report_lines_match_the_official_script():
    """Task lines in the official order (sound, music, speech; zero counts too), then difficulty
    (easy, hard, medium), then sub-categories in order of appearance, then the Total line."""
    records = [
        item("Woman", task="music", difficulty="easy", **{"sub-category": "B"}),  # wrong
        item("Man", task="sound", difficulty="easy", **{"sub-category": "A"}),  # right
        item("Man", task="sound", difficulty="hard", **{"sub-category": "A"}),  # right
        {"choices": CHOICES, "answer": "Man", "task": "speech", "difficulty": "hard"},  # skipped
        item("Man", task="speech", difficulty="medium", **{"sub-category": None}),  # right, in no sub-category
    ]
    # sound 2/2, music 0/1, speech 1/1; easy 1/2, hard 1/1, medium 1/1; B 0/1, A 2/2 (the null
    # sub-category is left out of that section only, as the official script's `if subcat is not
    # None` does); total 3/4 = 75.00%
    assert E.report_lines(E.score(records)) == [
        "******************************",
        "Task-wise Accuracy:",
        "sound : 100.00% over 2 samples",
        "music : 0.00% over 1 samples",
        "speech : 100.00% over 1 samples",
        "******************************",
        "Difficulty-wise Accuracy:",
        "easy : 50.00% over 2 samples",
        "hard : 100.00% over 1 samples",
        "medium : 100.00% over 1 samples",
        "******************************",
        "Sub-category-wise Accuracy:",
        "B : 0.00% over 1 samples",
        "A : 100.00% over 2 samples",
        "******************************",
        "Total Accuracy: 75.00% over 4 samples",
        "******************************",
        # The official script `continue`s past an item without the key before the line that would
        # count it, so it prints 0 whatever is skipped; print_score reports the skipped item apart.
        "No prediction count: 0",
    ]


def test_mmau_sections_are_always_printed():
    """As the official script, MMAU data gets all three sections even when a field is absent: the
    three tasks and difficulties at 0 samples, and a Sub-category header with no lines."""
    lines = E.report_lines(E.score([item("Man", task="sound")]))
    # sound 1/1; no difficulty, no sub-category: the item counts in the task section and the total only
    assert lines[:9] == ["*" * 30, "Task-wise Accuracy:", "sound : 100.00% over 1 samples",
                         "music : 0.00% over 0 samples", "speech : 0.00% over 0 samples",
                         "*" * 30, "Difficulty-wise Accuracy:", "easy : 0.00% over 0 samples",
                         "hard : 0.00% over 0 samples"]
    assert lines[9:13] == ["medium : 0.00% over 0 samples", "*" * 30, "Sub-category-wise Accuracy:", "*" * 30]


def test_report_lines_for_other_data():
    """Without MMAU's fields, records are grouped by category if they have one; Total is always printed."""
    records = [item("Man", category="speech"), item("Child", category="speech"), item("Man", category="noise")]
    assert E.report_lines(E.score(records))[:5] == [
        "******************************",
        "Category-wise Accuracy:",
        "speech : 50.00% over 2 samples",
        "noise : 100.00% over 1 samples",
        "******************************",
    ]
    plain = E.report_lines(E.score([item("Man"), item("Child"), item("Robot"), item("man")]))
    assert plain[:2] == ["******************************", "Total Accuracy: 50.00% over 4 samples"]


def test_score_file_prints_the_key_and_writes_a_summary(tmp_path, capsys):
    """--score says which field it scored and writes preds.summary.json; without an evaluation
    summary of this exact file, the source data is marked unknown."""
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"choices": CHOICES, "answer": "Man", "model_output": "<answer>Man</answer>",
                                  "task": "sound"}]))
    assert E.main(["--score", str(preds)]) == 0
    out = capsys.readouterr().out
    assert "by 'model_output'" in out and "Total Accuracy: 100.00% over 1 samples" in out
    assert "No prediction count: 0" in out and "not scored" not in out  # nothing skipped
    summary = json.loads((tmp_path / "preds.summary.json").read_text())
    assert (summary["key"], summary["correct"], summary["total"], summary["data_sha256"]) == ("model_output", 1, 1, None)
    assert summary["groups"]["task"]["sound"] == {"accuracy": 100.0, "correct": 1, "total": 1}
    assert "unknown" in summary["note"]


@pytest.mark.parametrize("path", [pytest.param(MMAU, id="fixture"), *(real(path) for path in MMAU_VERSIONS)])
def test_every_mmau_answer_scores_correct(path):
    """On the fixture and both MMAU versions, each item's own answer is judged correct by the rule."""
    records = [dict(r, model_prediction=r["answer"]) for r in json.loads(path.read_text())]
    s = E.score(records)
    n = 20 if path == MMAU else 1000
    assert len(records) == n and (s.total.correct, s.total.total) == (n, n)
    assert sum(t.total for t in s.groups["task"].values()) == n


@pytest.mark.parametrize("path", [real(path) for path in MMAU_VERSIONS])
def test_the_real_mmau_versions_are_recognised(path):
    """A summary names the data's version by its sha256 (evaluate.KNOWN_DATA): each released file's hash
    is there, with its own name."""
    assert E.KNOWN_DATA[hashlib.sha256(path.read_bytes()).hexdigest()] == MMAU_VERSIONS[path]


# ----------------------------------------------------------------------------- MMAR and MMSU

def mmar(prediction, answer, choices, modality, category, sub=None, **fields):
    """A prediction record in MMAR-meta.json's shape (sub-category left out when None)."""
    record = {"id": f"x_{modality}", "audio_path": f"./audio/x_{modality}.wav", "question": "?", "choices": choices,
              "answer": answer, "modality": modality, "category": category, "language": "en", **fields}
    if sub is not None:
        record["sub-category"] = sub
    if prediction is not None:
        record["model_prediction"] = prediction
    return record


INSTRUMENTS = ["Violin", "Flute", "Piano", "Trumpet"]
MMAR_RECORDS = [
    mmar("Flute", "Flute", INSTRUMENTS, "music", "Perception Layer", "Instrument"),  # right
    mmar("Flute or Piano", "Flute", INSTRUMENTS, "music", "Perception Layer", "Instrument"),  # names Piano: wrong
    # the answer is not exactly a choice, as in MMAR's file: answer words {on, a, ship} are all there and
    # "plane", the only word of the other choice, is not: right
    mmar("On a ship", "on a ship.", ["On a plane", "On a ship"], "mix-sound-speech", "Semantic Layer"),
    # two answers joined by a newline, as in MMAR's file: "colombian" is missing: wrong
    mmar("American", "American\nColombian", ["American", "Colombian"], "speech", "Cultural Layer", "Accent"),
    mmar(None, "Dog", ["Dog", "Cat"], "sound", "Signal Layer", "Animal"),  # no model_prediction: skipped
]


def test_mmar_is_scored_and_printed_as_its_script():
    """MMAR: MMAU's string match on the answer as written; its 7 modalities and 4 categories always
    printed in its order, sub-categories in order of appearance (none for the item without one)."""
    s = E.score(MMAR_RECORDS)
    assert (s.benchmark, s.total.correct, s.total.total, s.skipped) == ("mmar", 2, 4, 1)
    # music 1/2, mix-sound-speech 1/1, speech 0/1; Perception 1/2, Semantic 1/1, Cultural 0/1;
    # Instrument 1/2, Accent 0/1 (the skipped item's Animal never appears); total 2/4 = 50.00%
    assert E.report_lines(s) == [
        "******************************",
        "Modality-wise Accuracy:",
        "sound : 0.00% over 0 samples",
        "music : 50.00% over 2 samples",
        "speech : 0.00% over 1 samples",
        "mix-sound-music : 0.00% over 0 samples",
        "mix-sound-speech : 100.00% over 1 samples",
        "mix-music-speech : 0.00% over 0 samples",
        "mix-sound-music-speech : 0.00% over 0 samples",
        "******************************",
        "Category-wise Accuracy:",
        "Signal Layer : 0.00% over 0 samples",
        "Perception Layer : 50.00% over 2 samples",
        "Semantic Layer : 100.00% over 1 samples",
        "Cultural Layer : 0.00% over 1 samples",
        "******************************",
        "Sub-category-wise Accuracy:",
        "Instrument : 50.00% over 2 samples",
        "Accent : 0.00% over 1 samples",
        "******************************",
        "Total Accuracy: 50.00% over 4 samples",
        "******************************",
        "No prediction count: 0",
    ]


def test_values_the_official_script_does_not_know_come_after_its_own():
    """A modality outside MMAR's seven (where its script would stop with a KeyError) is printed after them."""
    s = E.score([mmar("Flute", "Flute", INSTRUMENTS, "vocal", "Signal Layer")])
    assert list(s.groups["modality"])[-2:] == ["mix-sound-music-speech", "vocal"]
    assert s.groups["modality"]["vocal"] == R.Tally(1, 1)


def mmsu(prediction, answer, category, sub, choices=("Happy", "Sad", "Angry", "None")):
    """A prediction record in MMSU's shape: choice_a .. choice_d (null past a 2-choice item's), answer_gt."""
    fields = dict(zip(["choice_a", "choice_b", "choice_c", "choice_d"], list(choices) + [None, None]))
    return {"id": "q", "audio_path": "audio/q.wav", "question": "?", **fields, "answer_gt": answer,
            "task_name": "t", "category": category, "sub-category": sub, "model_prediction": prediction}


YES_NO = ("Yes", "No")
MMSU_RECORDS = [
    mmsu("None", "None", "Perception", "Paralinguistics"),  # "None" is choice D's text -> D -> right
    mmsu("Angry", "Sad", "Perception", "Paralinguistics"),  # choice C's text -> C: "Angry" != "Sad", wrong
    mmsu("B", "No", "Reasoning", "Linguistics", YES_NO),  # a letter, read as the script reads it -> B: right
    mmsu("The answer is A.", "No", "Reasoning", "Linguistics", YES_NO),  # the one before the last -> A: wrong
    mmsu("I am not sure", "Happy", "Perception", "Linguistics"),  # "I" and "r": no letter, not counted
    mmsu("", "Sad", "Reasoning", "Paralinguistics"),  # empty (e.g. the audio failed): counted, wrong
    mmsu("Definitely yes", "Yes", "Reasoning", "Linguistics", YES_NO),  # first character D: no choice D, wrong
    mmsu("sad", "Sad", "Perception", "Paralinguistics"),  # not exactly a choice; "s", "a": not counted
    mmsu("Happy", "Happy", "Perception", "Linguistics"),  # choice A's text -> A: right
]


def test_mmsu_letter_rule():
    """The letter MMSU's script reads: first character A-D, else the one before the last, after strip and
    without newlines; "" (counted, wrong) for an empty or "None" response; None (not counted) otherwise."""
    cases = {
        "B": "B", " C\n": "C", "B) Sad": "B",
        "The answer is D.": "D",  # "T", then "D" before the final "."
        "(C)": "C",
        "Answer: (C)": "A",  # the first character is the "A" of "Answer": the script reads A
        "\nThe answer\nis A.": "A",  # stripped, then "The answeris A."
        "": "", "None": "",
        "c": None, "maybe": None, "X": None,  # lowercase; "m" and "b"; one character that is not A-D
    }
    assert {r: benchmarks.mmsu_letter(r) for r in cases} == cases


def test_mmsu_is_scored_and_printed_as_its_script():
    """MMSU: the prediction becomes the letter of the choice it equals, else is read by the script's letter
    rule; a response without a letter is left out. Lines per category then sub-category, in order of first
    appearance among counted items (nested: Perception's before Reasoning's), fractions with 4 decimals."""
    s = E.score(MMSU_RECORDS)
    # counted: items 0-3, 5, 6, 8 (7); right: 0, 2, 8 (3); not counted: 4 and 7
    assert (s.benchmark, s.total.correct, s.total.total, s.unparsed, s.skipped) == ("mmsu", 3, 7, 2, 0)
    # Perception/Paralinguistics 1/2 (items 0, 1), Perception/Linguistics 1/1 (item 8; item 4 not counted),
    # Reasoning/Linguistics 1/3 (items 2, 3, 6), Reasoning/Paralinguistics 0/1 (item 5);
    # Perception 2/3, Reasoning 1/4, overall 3/7 = 0.428571...
    assert E.report_lines(s) == [
        "Category: Perception, Sub-category: Paralinguistics, Accuracy: 0.5000",
        "Category: Perception, Sub-category: Linguistics, Accuracy: 1.0000",
        "Category: Reasoning, Sub-category: Linguistics, Accuracy: 0.3333",
        "Category: Reasoning, Sub-category: Paralinguistics, Accuracy: 0.0000",
        "Category: Perception, Average Accuracy: 0.6667",
        "Category: Reasoning, Average Accuracy: 0.2500",
        "Overall Accuracy: 0.4286",
        "Total count: 7",
    ]
    assert E.note_lines(s) == ["2 items have a response with no letter A-D where MMSU's script looks (the first "
                               "character or the one before the last): not counted, as in the official script"]


def test_mmsu_prediction_record_has_the_response_its_script_reads():
    """evaluate.py's MMSU record carries `response`: the letter of the choice the answer names."""
    item = {k: v for k, v in MMSU_RECORDS[1].items() if k != "model_prediction"}
    sample = Sample("q.wav", "?", ["Happy", "Sad", "Angry", "None"], "Sad", item)
    record = E.output_record(sample, E.Prediction(0, "<answer>Sad</answer>", "Sad"))
    assert record["response"] == "B" and record["model_prediction"] == "Sad" and record["answer_gt"] == "Sad"
    plain = E.output_record(Sample("a.wav", "?", CHOICES, "Man", {}), E.Prediction(0, "Man", "Man"))
    assert "response" not in plain


def test_the_benchmark_is_recognised_from_the_fields():
    """MMSU by choice_a, MMAR by modality with audio_path, MMAU by task/difficulty/sub-category, else other."""
    assert [R.detect(r) for r in (MMSU_RECORDS, MMAR_RECORDS, [item("Man", task="sound")], [item("Man")])] == \
        ["mmsu", "mmar", "mmau", "other"]


def test_score_file_names_the_benchmark(tmp_path, capsys):
    """--score on MMSU predictions prints MMSU's lines and its summary names the benchmark, with MMSU's
    (category, sub-category) groups as "category / sub-category" and the uncounted items."""
    preds = tmp_path / "mmsu.json"
    preds.write_text(json.dumps([dict(r, choices=["x", "y"], answer=r["answer_gt"]) for r in MMSU_RECORDS]))
    assert E.main(["--score", str(preds)]) == 0
    assert "Overall Accuracy: 0.4286" in capsys.readouterr().out
    summary = json.loads(E.summary_path(preds).read_text())
    assert (summary["benchmark"], summary["correct"], summary["total"], summary["unparsed"]) == ("MMSU", 3, 7, 2)
    assert summary["groups"]["sub-category"]["Reasoning / Linguistics"] == {"accuracy": 33.3333, "correct": 1,
                                                                           "total": 3}


def test_mmar_predictions_carry_the_key_its_script_reads():
    """MMAR's code/evaluation.py reads `answer_prediction`: evaluate.py's MMAR record carries it, equal to
    model_prediction (which MMAR's README names); records of other benchmarks do not get it."""
    meta = {k: v for k, v in MMAR_RECORDS[0].items() if k != "model_prediction"}
    record = E.output_record(Sample("x.wav", "?", INSTRUMENTS, "Flute", meta),
                             E.Prediction(0, "<answer>Flute</answer>", "Flute"))
    assert record["answer_prediction"] == record["model_prediction"] == "Flute"
    plain = E.output_record(Sample("a.wav", "?", CHOICES, "Man", {}), E.Prediction(0, "Man", "Man"))
    assert "answer_prediction" not in plain


def test_mmar_file_in_the_official_format_is_scored(tmp_path, capsys):
    """A file with only MMAR's script's key (answer_prediction, no model_prediction) is scored on it by
    default, and --key answer_prediction is accepted: the same 2 of 4 as MMAR_RECORDS by model_prediction
    (the item without a prediction skipped), not "0.00% over 0 samples"."""
    official = [{("answer_prediction" if k == "model_prediction" else k): v for k, v in r.items()}
                for r in MMAR_RECORDS]
    s = E.score(official)
    assert (s.key, s.total.correct, s.total.total, s.skipped) == ("answer_prediction", 2, 4, 1)
    assert E.report_lines(s) == E.report_lines(E.score(MMAR_RECORDS))
    preds = tmp_path / "mmar.json"
    preds.write_text(json.dumps(official))
    assert E.main(["--score", str(preds), "--key", "answer_prediction"]) == 0
    assert "Total Accuracy: 50.00% over 4 samples" in capsys.readouterr().out


def official_mmsu(response, answer="Sad"):
    """A record as MMSU's own inference writes it: no answer or choices, and `response` (none if it is ...)."""
    record = {k: v for k, v in mmsu("x", answer, "Perception", "Paralinguistics").items() if k != "model_prediction"}
    return record if response is ... else dict(record, response=response)


def test_mmsu_null_response_is_skipped_and_a_missing_one_counted_wrong():
    """As MMSU's script: it reads record.get('response', ''), so a missing response is "" and counts as
    wrong; a null one fails its .strip() and is left out of every count."""
    records = [official_mmsu("B"), official_mmsu(None), official_mmsu(...), official_mmsu("C")]
    # "B" -> choice B "Sad" == answer_gt: right; null: skipped; missing -> "": counted, wrong; "C" -> "Angry": wrong
    s = E.score(records)
    assert (s.key, s.total.correct, s.total.total, s.skipped, s.missing) == ("response", 1, 3, 1, 1)
    assert E.note_lines(s) == [
        "1 items have a 'response' that is not a string (null): not counted, as in the official script",
        "1 items have no 'response' field: read as \"\" and counted wrong, as in the official script"]


def test_score_reads_mmsu_files_in_the_official_format(tmp_path, capsys):
    """--score on what MMSU's own tools write (JSONL; answer_gt and choice_a .. choice_d, `response`, no
    answer or choices) prints MMSU's lines, by `response`: not "answers withheld", not "not a JSON file"."""
    records = [dict(official_mmsu(benchmarks.mmsu_response(r["model_prediction"], r), r["answer_gt"]),
                    **{k: r[k] for k in ("choice_a", "choice_b", "choice_c", "choice_d", "category", "sub-category")})
               for r in MMSU_RECORDS]
    preds = tmp_path / "mmsu.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert E.main(["--score", str(preds)]) == 0
    out = capsys.readouterr().out
    # the same responses as MMSU_RECORDS' predictions give: 3 right of 7 counted, 2 without a letter
    assert "by 'response'" in out and "Overall Accuracy: 0.4286" in out and "Total count: 7" in out


def finish_from_parts(data: Path, out: Path, predictions: list, key: str | None = None) -> R.Score:
    """evaluate.finish (rank 0's merge, write and score) on predictions put in the part files by hand,
    as a run leaves them: what the run writes, without a model. key: --key (None: its default)."""
    parts = E.parts_dir(out)
    parts.mkdir(parents=True)
    (parts / "rank0.jsonl").write_text("".join(json.dumps(asdict(p)) + "\n" for p in predictions))
    cfg = E.EvalConfig("model", str(data), str(out), **({} if key is None else {"key": key}))
    return E.finish(cfg, E.read_data(str(data), None), out, E.sha256(data), 1)


def test_mmsu_predictions_are_the_jsonl_its_script_reads(tmp_path):
    """MMSU's script reads JSONL (json.loads line by line; a JSON list gives it no items): the MMSU
    predictions file is one record a line, each with the `response` it reads. MMAU's stays a JSON list."""
    data = tmp_path / "mmsu.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "model_prediction"}) + "\n"
                            for r in MMSU_RECORDS))
    predictions = [E.Prediction(i, r["model_prediction"], r["model_prediction"]) for i, r in enumerate(MMSU_RECORDS)]
    s = finish_from_parts(data, tmp_path / "preds.json", predictions)
    lines = [json.loads(line) for line in (tmp_path / "preds.json").read_text().splitlines()]
    assert [r["response"] for r in lines] == ["D", "C", "B", "The answer is A.", "I am not sure", "", "Definitely yes",
                                              "sad", "A"]  # a choice's text becomes its letter
    assert (s.total.correct, s.total.total) == (3, 7)  # as test_mmsu_is_scored_and_printed_as_its_script
    assert E.score(lines, "response").total == s.total  # the file alone, read by the script's key
    mmau = tmp_path / "mmau.json"
    mmau.write_text(json.dumps([{"audio_id": "a.wav", "question": "Who?", "choices": CHOICES, "answer": "Man",
                                 "task": "sound"}]))
    finish_from_parts(mmau, tmp_path / "mmau-preds.json", [E.Prediction(0, "Man", "Man")])
    assert isinstance(json.loads((tmp_path / "mmau-preds.json").read_text()), list)


def test_the_submission_carries_the_key_asked_for(tmp_path):
    """A withheld test set's submission carries model_prediction (the input MMAU's README names) by default;
    --key model_output (the key MMAU's evaluation.py reads) makes it carry the whole reply under that name."""
    data = tmp_path / "mmau-test.json"
    items = [{"id": f"q{i}", "audio_id": f"./a/{i}.wav", "question": "Who?", "choices": CHOICES, "answer": "",
              "task": "sound"} for i in range(2)]
    data.write_text(json.dumps(items))
    predictions = [E.Prediction(i, f"<think>hm</think><answer>{c}</answer>", c) for i, c in enumerate(["Man", "Robot"])]
    for key in ("model_prediction", "model_output"):
        out = tmp_path / key / "preds.json"
        assert finish_from_parts(data, out, predictions, key).key == key
        submission = json.loads(E.submission_path(out).read_text())
        assert submission == [dict(item, **{key: getattr(p, key)}) for item, p in zip(items, predictions)]


# ----------------------------------------------------------------------------- end to end on the tiny model

@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    """Noise clips of 1-3 s under the names the first N MMAU items expect, except item MISSING."""
    root = tmp_path_factory.mktemp("mmau-audio")
    rng = np.random.default_rng(0)
    for i, record in enumerate(json.loads(MMAU.read_text())[:N]):
        if i != MISSING:
            path = root / record["audio_id"]
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, 0.1 * rng.standard_normal(SAMPLE_RATE * (1 + i % 3)), SAMPLE_RATE)
    return root


def eval_args(tiny_dir, audio_dir, out, *extra):
    return ["--model", str(tiny_dir), "--data", str(MMAU), "--audio-dir", str(audio_dir), "--out", str(out),
            "--limit", str(N), "--batch-size", "4", "--max-new-tokens", "8", "--dtype", "float32", *extra]


@pytest.fixture(scope="module")
def full_run(tiny_dir, audio_dir, tmp_path_factory):
    """One uninterrupted 1-process run on the first N items: (predictions path, records)."""
    out = tmp_path_factory.mktemp("full") / "preds.json"
    assert E.main(eval_args(tiny_dir, audio_dir, out)) == 0
    return out, json.loads(out.read_text())


def test_end_to_end_records(full_run):
    """N items in data order, each the original record plus model_output and model_prediction."""
    _, records = full_run
    originals = json.loads(MMAU.read_text())[:N]
    assert len(records) == N
    for original, record in zip(originals, records):
        assert {k: record[k] for k in original} == original
        assert record["model_prediction"] == extract_answer(record["model_output"])
    assert sum("error" in r for r in records) == 1


def test_missing_audio_is_an_error_counted_wrong(full_run):
    """The item without a clip has an empty prediction and an error naming the file; it is scored
    (as wrong) and listed in the summary, and the other items were still evaluated."""
    out, records = full_run
    bad = records[MISSING]
    assert bad["model_prediction"] == "" and bad["model_output"] == ""
    assert Path(bad["audio_id"]).name in bad["error"] and "file not found" in bad["error"]
    summary = json.loads(E.summary_path(out).read_text())
    assert summary["total"] == N  # the errored item counts
    assert summary["correct"] == sum(mmau_correct(r["model_prediction"], r["answer"], r["choices"]) for r in records)
    assert summary["errors"] == [{"index": MISSING, "id": bad["id"], "error": bad["error"]}]
    assert all(r["model_output"] for i, r in enumerate(records) if i != MISSING)  # 8 new tokens, never empty


def test_summary_names_the_data_file(full_run):
    """The summary holds the data file's path and sha256, and the MMAU version where the hash is a known
    one (the fixture's is not: no version is claimed; test_the_real_mmau_versions_are_recognised)."""
    out, _ = full_run
    summary = json.loads(E.summary_path(out).read_text())
    assert summary["data_sha256"] == hashlib.sha256(MMAU.read_bytes()).hexdigest()
    assert summary["data_version"] is None and summary["benchmark"] == "MMAU"
    assert summary["data"] == str(MMAU) and summary["settings"]["limit"] == N


def test_rescoring_keeps_the_provenance(full_run, tmp_path, capsys):
    """--score on an evaluated file gives the same numbers and keeps the data file's hash."""
    out, _ = full_run
    preds = tmp_path / "preds.json"
    shutil.copy(out, preds)
    shutil.copy(E.summary_path(out), E.summary_path(preds))
    before = json.loads(E.summary_path(preds).read_text())
    E.main(["--score", str(preds)])
    after = json.loads(E.summary_path(preds).read_text())
    assert (after["correct"], after["total"], after["data_sha256"]) == (before["correct"], N, before["data_sha256"])
    assert f"Total Accuracy: {before['accuracy']:.2f}% over {N} samples" in capsys.readouterr().out


@pytest.fixture(scope="module")
def withheld_run(tiny_dir, audio_dir, tmp_path_factory):
    """MMAU's test split in miniature: the first 3 test-mini items with their answers withheld (""), as
    the test split has them, evaluated end to end: (test file, predictions path, stdout)."""
    root = tmp_path_factory.mktemp("withheld")
    test = root / "mmau-test.json"
    test.write_text(json.dumps([dict(r, answer="", split="test") for r in json.loads(MMAU.read_text())[:3]]))
    out = root / "preds.json"
    args = ["--model", str(tiny_dir), "--data", str(test), "--audio-dir", str(audio_dir), "--out", str(out),
            "--batch-size", "4", "--max-new-tokens", "8", "--dtype", "float32"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert E.main(args) == 0
    return test, out, stdout.getvalue()


def test_withheld_answers_give_a_submission_not_a_score(withheld_run):
    """No score is printed; OUT.submission.json is a JSON list with, per item in the file's order, the
    item exactly as released (answer "" too) plus model_prediction, and nothing else."""
    test, out, stdout = withheld_run
    items, records = json.loads(test.read_text()), json.loads(out.read_text())
    submission = json.loads(E.submission_path(out).read_text())
    assert E.submission_path(out) == out.with_name("preds.submission.json")
    assert submission == [dict(item, model_prediction=r["model_prediction"]) for item, r in zip(items, records)]
    assert [list(entry) for entry in submission] == [list(item) + ["model_prediction"] for item in items]
    assert all(isinstance(entry["model_prediction"], str) for entry in submission)
    assert "Total Accuracy" not in stdout
    assert f"the submission for the leaderboard is {E.submission_path(out)}" in stdout
    summary = json.loads(E.summary_path(out).read_text())
    assert summary["benchmark"] == R.NAMES["withheld"] and summary["items"] == 3 and "accuracy" not in summary
    assert summary["submission_sha256"] == hashlib.sha256(E.submission_path(out).read_bytes()).hexdigest()


def test_withheld_predictions_are_not_scored(withheld_run, capsys):
    """--score on predictions without answers stops with one line pointing at the submission file."""
    _, out, _ = withheld_run
    err = usage_error(["--score", str(out)], capsys)
    assert "no item has an answer" in err and str(E.submission_path(out)) in err


def test_a_run_without_answers_has_no_table(tmp_path, capsys):
    """A run folder evaluated on a withheld test set prints no accuracy table and writes no table.json."""
    p = E.Plan([], [], "0" * 64, tmp_path / "table.json")
    assert E.report_table(p, [R.Score("withheld", "model_prediction", R.Tally(), {}, 0, [])]) is None
    assert "answers withheld: no table" in capsys.readouterr().out and not p.table.exists()


def test_a_file_with_some_answers_withheld_is_refused(tiny_dir, tmp_path, capsys):
    """Answers all there (a score) or all withheld (a submission): a mix stops before any model is loaded."""
    data = tmp_path / "mixed.jsonl"
    lines = [{"audio": "a.wav", "question": "Who?", "choices": CHOICES, "answer": answer} for answer in ("Man", "")]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    err = usage_error(["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "p.json")], capsys)
    assert f"--data {data}: 1 of 2 items have no answer (e.g. item 1)" in err


# ----------------------------------------------------------------------------- resuming

def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_dir, audio_dir, full_run, tmp_path):
    """A run stopped after 7 items with its last line torn, then re-run, gives the uninterrupted
    output. Each item's prediction is in the part file once, the errored item's too: its clip is
    still missing, so the second run does not try it again."""
    out = tmp_path / "preds.json"
    E.main(eval_args(tiny_dir, audio_dir, out, "--limit", "7"))  # batches 0-3 and 4-6: 7 lines
    part = E.parts_dir(out) / "rank0.jsonl"
    text = part.read_text()
    part.write_text(text[:-30])  # a kill in the middle of item 6's line: 6 whole lines remain
    out.unlink()
    E.main(eval_args(tiny_dir, audio_dir, out))
    assert out.read_text() == full_run[0].read_text()
    lines = [json.loads(line) for line in part.read_text().splitlines()]
    assert sorted(p["index"] for p in lines if not p["error"]) == [i for i in range(N) if i != MISSING]
    assert [p["index"] for p in lines if p["error"]] == [MISSING]


def test_failed_audio_is_retried(tiny_dir, audio_dir, full_run, tmp_path):
    """Re-run after the missing clip appears: that item is evaluated, the others are kept."""
    out = tmp_path / "preds.json"
    shutil.copytree(E.parts_dir(full_run[0]), E.parts_dir(out))
    fixed_audio = tmp_path / "audio"
    shutil.copytree(audio_dir, fixed_audio)
    _, records = full_run
    sf.write(fixed_audio / records[MISSING]["audio_id"], np.zeros(SAMPLE_RATE), SAMPLE_RATE)
    E.main(eval_args(tiny_dir, fixed_audio, out))
    again = json.loads(out.read_text())
    assert "error" not in again[MISSING] and again[MISSING]["model_output"]
    assert again[:MISSING] + again[MISSING + 1:] == records[:MISSING] + records[MISSING + 1:]


def usage_error(argv, capsys) -> str:
    """Run main as `python evaluate.py` does; it must exit with 2 and print one line, no traceback."""
    with pytest.raises(SystemExit) as stop:
        M.run_main(E.main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "9"), ("--batch-size", "2"), ("--dtype", "bfloat16")])
def test_other_settings_refuse_to_resume(tiny_dir, audio_dir, full_run, tmp_path, capsys, flag, value, monkeypatch):
    """Predictions made with other settings are never mixed in: the run stops before loading anything,
    saying what differs and what would work. The batch size counts: in bf16 it changes predictions."""
    monkeypatch.setattr(M, "load", None)  # a call would fail
    out = tmp_path / "preds.json"
    shutil.copytree(E.parts_dir(full_run[0]), E.parts_dir(out))
    err = usage_error(eval_args(tiny_dir, audio_dir, out, flag, value), capsys)
    setting = flag[2:].replace("-", "_")
    assert f"{setting} " in err and str(E.parts_dir(out)) in err and "another --out" in err


def test_batches_do_not_depend_on_the_rank_count():
    """The items are run in fixed batches of the data file, dealt out to the ranks: 1, 2 or 3 ranks
    hand generate() the same batches, so the rank count cannot change a prediction. After a kill,
    the untouched batches are still the same; the cut one keeps its missing items only."""
    one = E.batches(list(range(10)), 4)
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for world in (2, 3):
        dealt = [b for rank in range(world) for b in E.batches(list(range(10)), 4)[rank::world]]
        assert sorted(dealt) == one
    # done: 0-5 (batch 1 was cut after item 5), so 6 and 7 run together, and 8-9 as before
    assert E.batches([6, 7, 8, 9], 4) == [[6, 7], [8, 9]]


# ----------------------------------------------------------------------------- bad input: one line, exit 2

def questions(tmp_path) -> Path:
    """A well-formed plain JSONL question file (its audio need not exist for these tests)."""
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"audio": "a.wav", "question": "Who?", "choices": CHOICES, "answer": "Man"}) + "\n")
    return path


def bad_model(kind, tmp_path):
    folder = tmp_path / "model"
    if kind != "missing":
        folder.mkdir()
    if kind == "other-type":
        (folder / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    return ["--model", str(folder), "--data", str(questions(tmp_path)), "--out", str(tmp_path / "p.json")], folder


@pytest.mark.parametrize("kind, says", [("missing", "no such folder"), ("no-config", "no config.json"),
                                        ("other-type", "model_type 'whisper'")])
def test_bad_model_folder_is_one_line(kind, says, tmp_path, capsys):
    """--model: a missing folder, a folder without config.json, another model type."""
    argv, folder = bad_model(kind, tmp_path)
    err = usage_error(argv, capsys)
    assert f"--model {folder}" in err and says in err


@pytest.mark.parametrize("content, says", [(None, None), ("{not json\n", ":1: bad JSON"),
                                           ('{"audio": "a.wav", "question": "Who?"}\n', ":1: missing field")])
def test_bad_data_is_one_line(content, says, tiny_dir, tmp_path, capsys):
    """--data: a missing file, a line that is not JSON, a record without its fields."""
    data = tmp_path / "questions.jsonl"
    if content is not None:
        data.write_text(content)
    err = usage_error(["--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "p.json")], capsys)
    # a missing file is worded by evaluate.py (FileNotFoundError) or by data.py (DataError)
    assert "--data" in err and str(data) in err and (says is None or says in err)


def test_missing_audio_dir_is_one_line(tiny_dir, tmp_path, capsys):
    """--audio-dir that does not exist."""
    audio = tmp_path / "no-audio"
    err = usage_error(["--model", str(tiny_dir), "--data", str(questions(tmp_path)), "--audio-dir", str(audio),
                       "--out", str(tmp_path / "p.json")], capsys)
    assert f"--audio-dir {audio}: no such folder" in err


def test_a_key_the_predictions_will_not_have_is_one_line(tiny_dir, tmp_path, capsys):
    """--key response (MMSU's script's field) on plain questions, whose predictions will not have it:
    one line naming the fields they will have, before any model is loaded."""
    err = usage_error(["--model", str(tiny_dir), "--data", str(questions(tmp_path)), "--out", str(tmp_path / "p.json"),
                       "--key", "response"], capsys)
    assert "--key response" in err and "give one of model_prediction, model_output" in err


@pytest.mark.parametrize("content, says", [(None, "no such file"), ("[{oops", "not a JSON file"),
                                           ('{\n  "answer": "Man"\n}', "a JSON dict"), ("[1, 2]", "item 0"),
                                           ('{"answer": "Man"}', "item 0"),  # JSONL: one record without choices
                                           ('[{"answer": "Man", "choices": ["Man"], "model_output": null}]', "item 0")])
def test_bad_predictions_file_is_one_line(content, says, tmp_path, capsys):
    """--score: a missing file, a file that is not JSON, JSON that is not a list of question records."""
    preds = tmp_path / "preds.json"
    if content is not None:
        preds.write_text(content)
    err = usage_error(["--score", str(preds)], capsys)
    assert f"--score {preds}" in err and says in err


def test_bad_input_under_torchrun_stops_every_rank(tiny_dir, tmp_path):
    """Two ranks given a missing --data: both stop (no hang), and the message is printed once."""
    data = tmp_path / "missing.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
           "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "p.json")]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("error: --data") == 1 and str(data) in result.stderr, result.stderr[-3000:]
    assert 'evaluate.py", line' not in result.stderr  # torchrun reports the exit; no rank printed a traceback


# ----------------------------------------------------------------------------- two ranks

def test_two_ranks_match_one(tiny_dir, audio_dir, full_run, tmp_path):
    """torchrun with 2 processes, resuming a 1-process run that finished items 0-4, writes the
    same output as the uninterrupted 1-process run (fp32 on a CPU: the same batch sizes give the
    same tokens), with each item predicted once. The rank count is not part of the run's key, so
    resuming on another number of ranks is allowed."""
    out = tmp_path / "preds.json"
    parts = E.parts_dir(out)
    parts.mkdir()
    shutil.copy(E.parts_dir(full_run[0]) / "run.json", parts)
    lines = (E.parts_dir(full_run[0]) / "rank0.jsonl").read_text().splitlines(keepends=True)
    (parts / "rank0.jsonl").write_text("".join(line for line in lines if json.loads(line)["index"] < 5))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "evaluate.py", *eval_args(tiny_dir, audio_dir, out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "15 to evaluate on 2 rank(s)" in result.stdout
    assert result.stdout.count("Total Accuracy:") == 1  # printed by rank 0 only
    assert out.read_text() == full_run[0].read_text()
    indices = [json.loads(line)["index"] for f in ("rank0.jsonl", "rank1.jsonl")
               for line in (parts / f).read_text().splitlines()]
    assert sorted(indices) == list(range(N))


# ----------------------------------------------------------------------------- a run folder

def test_run_folder_evaluates_every_checkpoint_once(tiny2_dir, audio_dir, tmp_path, capsys, monkeypatch):
    """--model RUN evaluates every complete checkpoint-N in step order (not checkpoint-N.tmp), into
    RUN/eval/<data stem>/, and prints and writes a table whose numbers are score()'s of each
    predictions file, the best total marked. A second run loads no model: every checkpoint is done,
    and the item whose clip is still missing is not retried."""
    run = tmp_path / "run"
    checkpoint(run, "checkpoint-2", build_tiny(tmp_path / "other", seed=1, window_seconds=2))
    checkpoint(run, "checkpoint-0", tiny2_dir)
    checkpoint(run, "checkpoint-4.tmp", tiny2_dir)  # still being written
    argv = ["--model", str(run), "--data", str(MMAU), "--audio-dir", str(audio_dir), "--limit", "8",
            "--batch-size", "4", "--max-new-tokens", "4", "--dtype", "float32"]
    assert E.main(argv) == 0
    first = capsys.readouterr().out
    out_dir = run / "eval" / MMAU.stem
    table = json.loads((out_dir / "table.json").read_text())
    assert [r["step"] for r in table["rows"]] == [0, 2] and table["columns"] == ["sound", "music", "speech", "total"]
    for row in table["rows"]:
        s = E.score(json.loads((out_dir / f"checkpoint-{row['step']}.json").read_text()))
        assert s.total.total == 8 and row["accuracy"]["total"] == round(s.total.accuracy, 4)
        for task, t in s.groups["task"].items():
            assert row["accuracy"][task] == (round(t.accuracy, 4) if t.total else None)
    best = max(table["rows"], key=lambda r: (r["accuracy"]["total"], -r["step"]))
    assert table["best_step"] == best["step"]
    printed = first[first.index("    step"):].splitlines()
    assert printed[0] == "    step   sound   music  speech   total"
    assert printed[1 + [0, 2].index(best["step"])].endswith(f"{best['accuracy']['total']:.2f}  <- best")
    monkeypatch.setattr(M, "load", None)  # a call would fail
    assert E.main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("8 already done") == 2 and again.count("0 to evaluate") == 2
    assert json.loads((out_dir / "table.json").read_text()) == table


def test_run_folder_without_a_complete_checkpoint_is_one_line(tmp_path, capsys):
    """A run folder whose only checkpoint is still being written: one line, exit 2."""
    checkpoint(tmp_path / "run", "checkpoint-0.tmp")
    (tmp_path / "run" / "checkpoint-0").mkdir()  # no trainer_state.pt
    err = usage_error(["--model", str(tmp_path / "run"), "--data", str(questions(tmp_path))], capsys)
    assert f"--model {tmp_path / 'run'}: a run folder without a complete checkpoint-N" in err


# ----------------------------------------------------------------------------- the demo

def checkpoint(run: Path, name: str, model_dir=None) -> Path:
    """A folder as train.py leaves it: a copy of model_dir (or empty) with trainer_state.pt, which
    train.py writes into every complete checkpoint."""
    path = run / name
    shutil.copytree(model_dir, path) if model_dir else path.mkdir(parents=True)
    (path / "trainer_state.pt").write_bytes(b"")
    return path


def test_demo_picks_the_start_and_the_newest_checkpoint(tmp_path):
    """checkpoint-0 and the largest step (by number, not by name); other names, and a checkpoint-N
    without trainer_state.pt (not complete), are ignored."""
    for name in ["checkpoint-0", "checkpoint-20", "checkpoint-100", "checkpoint-100.tmp", "checkpoint-7.old", "logs"]:
        checkpoint(tmp_path, name)
    (tmp_path / "checkpoint-200").mkdir()  # no trainer_state.pt
    assert E.demo_checkpoints(tmp_path) == [tmp_path / "checkpoint-0", tmp_path / "checkpoint-100"]
    assert E.run_checkpoints(tmp_path) == [tmp_path / f"checkpoint-{n}" for n in (0, 20, 100)]


def test_demo_without_checkpoints_says_to_train_first(tmp_path, monkeypatch, capsys):
    """With no runs/ folder the demo exits with 1 and tells the user to run train.py."""
    monkeypatch.chdir(tmp_path)
    assert E.main([]) == 1
    assert "run `python train.py` first" in capsys.readouterr().out


def test_demo_evaluates_before_and_after(tiny_dir, tmp_path, monkeypatch, capsys):
    """The demo scores checkpoint-0 and the newest checkpoint on the synthetic test split and
    prints both accuracies on one line."""
    monkeypatch.chdir(tmp_path)
    make_synthetic("runs/synthetic", n_train=4, n_test=8, seed=0)
    for name in ["checkpoint-0", "checkpoint-3"]:
        checkpoint(Path("runs/demo"), name, tiny_dir)
    assert E.demo(batch_size=8, max_new_tokens=4, dtype="float32") == 0
    out = capsys.readouterr().out
    assert out.count("Total Accuracy:") == 2 and "Category-wise Accuracy:" in out
    assert "Greedy accuracy on runs/synthetic/test.jsonl: checkpoint-0 " in out and "-> checkpoint-3 " in out
    records = json.loads(Path("runs/demo/eval/checkpoint-3.json").read_text())
    assert len(records) == 8 and {"question", "choices", "answer", "model_prediction"} <= set(records[0])
    assert records[0]["answer"] in records[0]["choices"]  # the AVQA index became the choice string


def test_the_prompt_settings_reach_generation_and_the_resume_key(tiny_dir, audio_dir, tmp_path, monkeypatch):
    """--prompt think --think-words 50 --system-prompt: every batch is asked that way, and a re-run with
    another system prompt is refused rather than mixed into the same predictions."""
    import model as M
    calls, real = [], M.collate
    monkeypatch.setattr(M, "collate", lambda *a: calls.append(a[3:]) or real(*a))
    out = tmp_path / "preds.json"
    settings = ["--limit", "4", "--prompt", "think", "--think-words", "50", "--system-prompt", "You judge audio."]
    assert E.main(eval_args(tiny_dir, audio_dir, out, *settings)) == 0
    assert calls and set(calls) == {("think", "You judge audio.", 50)}
    with pytest.raises(SystemExit) as e:
        M.run_main(E.main, eval_args(tiny_dir, audio_dir, out, *settings[:-1], "Another."))
    assert e.value.code == 2
