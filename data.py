"""Data for audio question answering: audio, question files, the paper's prompts, and the step's questions.

load_audio() reads any file libsndfile reads and returns 16 kHz mono (channel 0, as R1-AQA) through a
windowed-sinc resampler; read_samples() reads R1-AQA/AVQA JSONL, MMAU, MMAR, MMSU and plain JSONL into
one Sample type, a malformed record raising DataError with its file and line; build_prompt() writes the
paper's three prompts; step_indices() says which questions a step sees (a pure function of seed and step).
    python data.py questions.jsonl [--audio-dir DIR]     # check a file: every bad record and clip
    python data.py --from-avqa train_qa.json --audio-dir CLIPS --out avqa_train.jsonl   (tools/avqa.py)
Exit status: 0 all good; 1 bad records or audio; 2 a file or folder that cannot be used (one line).
"""

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MAX_SECONDS = 30  # the audio encoder's window; the processor truncates longer clips


class AudioError(Exception):
    """An audio file that is missing or cannot be decoded."""


class DataError(ValueError):
    """
    A question file that cannot be used, as one self-contained line that starts with the path:
    a malformed record ("{file}:{line}: {problem}" or "{file}: item {index}: {problem}") or a
    problem with the whole file ("{file}: {problem}": missing, a folder, not UTF-8, no records).
    """


# -----------------------------------------------------------------------------
# audio

def audio_duration(path) -> float:
    """Seconds of audio in a file, read from its header; AudioError if it is missing, unreadable, empty or cut."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as e:
        raise AudioError(f"{path}: not readable as audio ({e.error_string})") from e
    if info.frames == 0:
        raise AudioError(f"{path}: contains no audio frames")
    if _wav_data_is_cut(info.extra_info):
        raise AudioError(f"{path}: truncated (the header declares more audio data than the file holds)")
    return info.duration


def _wav_data_is_cut(log: str) -> bool:
    """libsndfile silently shortens a WAV whose data chunk is cut off; its header log says so."""
    m = re.search(r"^data : (\d+) \(should be (\d+)\)", log, flags=re.MULTILINE)
    if m is None:
        return False
    declared, present = int(m.group(1)), int(m.group(2))
    streamed = declared in (0, 0xFFFFFFFF)  # placeholder sizes written by streaming encoders
    return not streamed and present < declared


DOWNMIX = ("first", "mean")  # multi-channel audio: keep channel 0 (R1-AQA, training and evaluation) or average


def load_audio(path, downmix: str = "first") -> np.ndarray:
    """Any audio file -> float32 mono at SAMPLE_RATE: its first channel, or the mean of its channels."""
    if downmix not in DOWNMIX:
        raise ValueError(f"unknown downmix {downmix!r}: choose one of {DOWNMIX}")
    audio_duration(path)  # the checks
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise AudioError(f"{path}: cannot decode ({e.error_string})") from e
    mono = data[:, 0] if downmix == "first" else data.mean(axis=1)
    return np.ascontiguousarray(mono) if sr == SAMPLE_RATE else resample(mono, sr, SAMPLE_RATE)


def resample(x: np.ndarray, sr_in: int, sr_out: int, zeros: int = 24, beta: float = 10.0) -> np.ndarray:
    """
    Band-limited resampling of a 1-D signal by the rational factor up/down = sr_out/sr_in.
    Output sample n sits at input time t = n*down/up = base + r/up. It is the sum of the input
    around t weighted by a Kaiser-windowed sinc low-pass whose cutoff is the lower Nyquist
    frequency. Only `up` distinct fractional offsets r/up exist, so the filter is tabulated once
    per offset (the polyphase bank) and outputs sharing an offset are one matrix-vector product.
    """
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    if up == down:
        return x.astype(np.float32)
    bank, half = _polyphase_bank(up, down, zeros, beta)
    n_out = -(-len(x) * up // down)  # ceil(len(x) * up / down)
    padded = np.pad(x.astype(np.float64), (half, half + 1))
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half)
    y = np.empty(n_out, dtype=np.float32)
    for r in range(min(up, n_out)):
        base = r * down // up  # input index just before output r; output r + m*up is m*down further
        count = len(range(r, n_out, up))
        y[r::up] = windows[base + 1 :: down][:count] @ bank[r]
    return y


def _polyphase_bank(up: int, down: int, zeros: int, beta: float) -> tuple[np.ndarray, int]:
    """bank[r]: the 2*half tap weights for outputs n = r (mod up), on inputs base-half+1 .. base+half."""
    rolloff = 0.94  # cutoff slightly below Nyquist leaves room for the filter's transition band
    cutoff = rolloff * min(1.0, up / down)  # as a fraction of the input Nyquist frequency
    reach = zeros / cutoff  # filter half-length in input samples
    half = math.ceil(reach) + 1
    frac = (np.arange(up) * down % up) / up
    t = frac[:, None] - np.arange(-half + 1, half + 1)[None, :]  # distance from output to each tap
    window = np.i0(beta * np.sqrt(np.clip(1 - (t / reach) ** 2, 0, None))) / np.i0(beta)
    bank = cutoff * np.sinc(cutoff * t) * window * (np.abs(t) <= reach)
    return bank / bank.sum(axis=1, keepdims=True), half  # each phase passes DC with gain exactly 1


# -----------------------------------------------------------------------------
# question files

@dataclass
class Sample:
    audio_path: str
    question: str
    choices: list[str]
    answer: str | None  # the correct choice string (MMAR: as given); None: withheld, only if the reader allowed it
    meta: dict  # the original record


def read_samples(path, audio_dir=None, allow_unanswered: bool = False) -> list[Sample]:
    """All samples of a question file; DataError if the file is unusable or on its first malformed record.
    A record without an answer is malformed unless allow_unanswered (evaluation of a withheld test set)."""
    samples, errors = scan_samples(path, audio_dir, allow_unanswered)
    if errors:
        raise errors[0]
    return samples


def scan_samples(path, audio_dir=None, allow_unanswered: bool = False) -> tuple[list[Sample], list[DataError]]:
    """
    The good samples of a question file and one DataError per malformed record, in file order;
    a file that cannot be used at all (missing, a folder, not UTF-8, no records) raises DataError
    before anything is parsed. The reader is picked by record_format() from the first record.
    """
    path = Path(path)
    fmt, records = _read_records(path)
    samples, errors = [], []
    for where, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"{where}: record is not a JSON object")
            sample = _PARSERS[fmt](record, where, allow_unanswered)
        except DataError as e:
            errors.append(e)
            continue
        sample.audio_path = _resolve_audio(sample.audio_path, path, audio_dir)
        samples.append(sample)
    return samples, errors


def read_text(path) -> str:
    """A text file's content; DataError "{path}: {problem}" if it is missing, a folder, not UTF-8 or empty."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the question file inside it")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is dropped
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file, no records")
    return text


def _read_records(path: Path) -> tuple[str, list[tuple[str, object]]]:
    """The file's format and, per record, its location and its JSON value (or a DataError)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            return "mmau", [("", DataError(f"{path}:{e.lineno}: bad JSON: {e.msg} at column {e.colno}"))]
        if not items:
            raise DataError(f"{path}: an empty JSON list, no records")
        if isinstance(items[0], dict) and "multi_choice" in items[0] and "audio_path" not in items[0]:
            raise DataError(f"{path}: AVQA's own QA file, which has no audio paths; convert it first with "
                            f"python data.py --from-avqa {path} --audio-dir CLIPS --out OUT.jsonl")
        first = next((r for r in items if isinstance(r, dict)), {})
        return record_format(first, listed=True), [(f"{path}: item {i}", item) for i, item in enumerate(items)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((where, DataError(f"{where}: bad JSON: {e.msg} at column {e.colno}")))
    first = next((r for _, r in records if isinstance(r, dict)), {})
    return record_format(first, listed=False), records


def record_format(first: dict, listed: bool) -> str:
    """The reader for a file, from its first record: MMSU by choice_a (its choices are fields), MMAR by
    modality with audio_path (MMAR-meta.json; JSON list or JSONL), else by the container: a JSON list is
    MMAU, and JSONL is R1-AQA/AVQA when the record has question_text or multi_choice, else plain."""
    if "choice_a" in first:
        return "mmsu"
    if "modality" in first and "audio_path" in first:
        return "mmar"
    if listed:
        return "mmau"
    return "avqa" if "question_text" in first or "multi_choice" in first else "plain"


def check_audio_dir(audio_dir, flag: str = "--audio-dir") -> None:
    """DataError "{flag} {audio_dir}: ..." unless the audio folder exists; call it before any work."""
    path = Path(audio_dir)
    if not path.is_dir():
        raise DataError(f"{flag} {path}: {'not a folder' if path.exists() else 'no such folder'}")


def _resolve_audio(name: str, data_file: Path, audio_dir) -> str:
    """
    Without audio_dir, a relative path is relative to the data file's folder. With audio_dir,
    audio_dir/name if that exists, else audio_dir/<bare file name>: so MMAU's
    "./test-mini-audios/<id>.wav" is found whether audio_dir is the folder holding
    test-mini-audios/ or test-mini-audios/ itself, and absolute paths from another machine
    (as in the released AVQA file) can be redirected.
    """
    p = Path(name)
    if audio_dir is None:
        return str(p if p.is_absolute() else data_file.parent / p)
    as_given = Path(audio_dir) / p  # an absolute p stays as it is
    return str(as_given if as_given.exists() else Path(audio_dir) / p.name)


def get_field(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field '{key}' should be {kind.__name__}, got {type(value).__name__}")
    return value


def _get_choices(record: dict, key: str, where: str) -> list[str]:
    choices = get_field(record, key, list, where)
    if not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field '{key}' should be a list of strings")
    if len(choices) < 2:
        raise DataError(f"{where}: needs at least 2 choices, got {len(choices)}")
    return choices  # duplicate choices are allowed: real MMAU items have them


def _get_answer(record: dict, where: str, allow_unanswered: bool, key: str = "answer") -> str | None:
    """The answer string; a missing, null or empty one is withheld: None if allowed, else DataError."""
    if record.get(key) in (None, ""):
        if allow_unanswered:
            return None
        raise DataError(f"{where}: no answer ('{key}' is missing or empty): a file whose answers are withheld "
                        f"(as MMAU's test split) can be evaluated, not trained on")
    return get_field(record, key, str, where)


def _get_answer_string(record: dict, choices: list[str], where: str, allow_unanswered: bool,
                       key: str = "answer") -> str | None:
    """The answer, which must be one of the choices (None if withheld and allowed)."""
    answer = _get_answer(record, where, allow_unanswered, key)
    if answer is not None and answer not in choices:
        raise DataError(f"{where}: {key} {answer!r} is not one of the choices {choices}")
    return answer


def avqa_question(record: dict, where: str) -> tuple[str, list[str], str]:
    """An AVQA record's question, choices and answer string; its answer is a 0-based index."""
    question = get_field(record, "question_text", str, where)
    question = question.replace("video", "audio")  # as R1-AQA: lowercase only ("Video" stays)
    choices = _get_choices(record, "multi_choice", where)
    index = get_field(record, "answer", int, where)
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: answer index {index} is out of range for {len(choices)} choices")
    return question, choices, choices[index]


def _parse_avqa(record: dict, where: str, allow_unanswered: bool) -> Sample:
    """R1-AQA/AVQA: AVQA's record plus audio_path; the questions were written about videos. Training
    data: its answer index is always required."""
    question, choices, answer = avqa_question(record, where)
    return Sample(get_field(record, "audio_path", str, where), question, choices, answer, record)


def _parse_mmau(record: dict, where: str, allow_unanswered: bool) -> Sample:
    """MMAU: question, choices, the answer string (empty in the test split) and audio_id."""
    choices = _get_choices(record, "choices", where)
    answer = _get_answer_string(record, choices, where, allow_unanswered)
    question = get_field(record, "question", str, where)
    return Sample(get_field(record, "audio_id", str, where), question, choices, answer, record)


def _parse_mmar(record: dict, where: str, allow_unanswered: bool) -> Sample:
    """MMAR (MMAR-meta.json): MMAU's fields with audio_path, plus modality and category, which MMAR's
    evaluation.py groups by (sub-category may be absent). Its answer is not always one of the choices
    (a near-copy of one, or two joined by a newline): the official string match scores it as given."""
    choices = _get_choices(record, "choices", where)
    answer = _get_answer(record, where, allow_unanswered)
    question = get_field(record, "question", str, where)
    for key in ("modality", "category"):
        get_field(record, key, str, where)
    return Sample(get_field(record, "audio_path", str, where), question, choices, answer, record)


MMSU_CHOICES = ["choice_a", "choice_b", "choice_c", "choice_d"]


def _mmsu_choices(record: dict, where: str) -> list[str]:
    """choice_a and choice_b, then choice_c and choice_d where given: 2-choice items have them null or
    blank. The string "None" is a real choice in MMSU."""
    given = [record.get(key) not in (None, "") and not str(record[key]).isspace() for key in MMSU_CHOICES]
    for key, present, before in zip(MMSU_CHOICES, given, [True] + given):
        if key in ("choice_a", "choice_b") and not present:
            raise DataError(f"{where}: missing field '{key}'")
        if present and not before:
            raise DataError(f"{where}: field '{key}' is given but the choice before it is empty")
    return [get_field(record, key, str, where) for key, present in zip(MMSU_CHOICES, given) if present]


def _parse_mmsu(record: dict, where: str, allow_unanswered: bool) -> Sample:
    """MMSU: audio_path, question, choice_a .. choice_d and answer_gt, the text of the correct choice."""
    choices = _mmsu_choices(record, where)
    answer = _get_answer_string(record, choices, where, allow_unanswered, key="answer_gt")
    question = get_field(record, "question", str, where)
    return Sample(get_field(record, "audio_path", str, where), question, choices, answer, record)


def _parse_plain(record: dict, where: str, allow_unanswered: bool) -> Sample:
    choices = _get_choices(record, "choices", where)
    answer = _get_answer_string(record, choices, where, allow_unanswered)
    question = get_field(record, "question", str, where)
    return Sample(get_field(record, "audio", str, where), question, choices, answer, record)


_PARSERS = {"avqa": _parse_avqa, "mmau": _parse_mmau, "mmar": _parse_mmar, "mmsu": _parse_mmsu, "plain": _parse_plain}


PROMPTS = ("direct", "answer", "think")  # the paper's Prompt <1>, <2> and <3>
_ASK = {
    "direct": "",
    "answer": " Output the final answer in <answer> </answer>.",
    "think": " Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
}


def build_prompt(question: str, choices: list[str], prompt: str = "answer", think_words: int = 0) -> str:
    """The user text of the paper's three prompts; choices are shown as Python's str(list).
    answer (Prompt <2>) is R1-AQA's training prompt and think (Prompt <3>) its think variant, both
    as in its code. direct (Prompt <1>, the paper's SFT rows) is not in R1-AQA's code: it is Prompt
    <2> without the answer-tag instruction, the question and the choices alone. think_words > 0 asks
    the think prompt for a short reasoning, as Ke-Omni-R trained: "the thinking process (less than
    50 words)"."""
    if prompt not in _ASK:
        raise ValueError(f"unknown prompt {prompt!r}: choose one of {PROMPTS}")
    ask = _ASK[prompt]
    if think_words and prompt == "think":
        ask = ask.replace("thinking process", f"thinking process (less than {think_words} words)")
    return f"{question} Please choose the answer from the following options: {choices}.{ask}"


def target_text(answer: str, prompt: str = "answer", reasoning: str | None = None) -> str:
    """What supervised fine-tuning teaches the model to reply: the choice itself (direct, the paper's
    SFT rows) or in answer tags (answer, the form GRPO rewards). The think prompt needs a reasoning to
    imitate, which question files do not have: only a caller that supplies one (the warm start's fixed
    placeholder, which teaches the format) gets `<think>{reasoning}</think><answer>{answer}</answer>`."""
    if prompt == "think":
        if reasoning is None:
            raise ValueError("the think prompt has no supervised target: the data holds answers, not reasoning")
        return f"<think>{reasoning}</think><answer>{answer}</answer>"
    return answer if prompt == "direct" else f"<answer>{answer}</answer>"


# -----------------------------------------------------------------------------
# Which questions each step sees

def permutation(rng, n):
    """The order of an epoch's questions: a fresh permutation (an extra may give another, e.g. a curriculum)."""
    return lambda indices: rng.permutation(indices).tolist()


def epoch_order(answers, epoch, seed, balance, arrange=permutation):
    """Every question once, in the epoch's order. Balanced: the answers interleaved round-robin, so any
    window of (number of distinct answers) consecutive questions holds each answer once."""
    order = arrange(np.random.default_rng([seed, epoch]), len(answers))
    if not balance:
        return order(range(len(answers)))
    by_answer = {}
    for i, a in enumerate(answers):
        by_answer.setdefault(a, []).append(i)
    queues = [order(ix) for _, ix in sorted(by_answer.items())]
    return [q[j] for j in range(max(map(len, queues))) for q in queues if j < len(q)]


def step_indices(step, batch_size, answers, seed, balance=False, arrange=permutation):
    """Dataset indices of the global batch of `step`: a slice of an endless run of epochs. A pure function
    of (seed, step), so a resumed run sees exactly the data the interrupted one would have."""
    n, start, out = len(answers), step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        out += epoch_order(answers, epoch, seed, balance, arrange)[offset:offset + batch_size - len(out)]
    return out


def my_share(items, rank, world):
    """This process's contiguous share of a global batch (it splits evenly: train.validate checks)."""
    per = len(items) // world
    return items[rank * per:(rank + 1) * per]


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def read_audio(samples, downmix, counts=None):
    """Decode each clip. An unreadable one is reported, counted (in counts, if given) and replaced by 1 s of
    silence; the caller masks it out of the loss, so the batch keeps its shape and all ranks stay in step."""
    audios, ok = [], []
    for s in samples:
        try:
            audios.append(load_audio(s.audio_path, downmix))
            ok.append(True)
        except AudioError as e:
            print(f"[rank {int(os.environ.get('RANK', 0))}] skipping sample: {e}", flush=True)
            audios.append(np.zeros(SAMPLE_RATE, dtype=np.float32))
            ok.append(False)
    if counts is not None:
        counts["seen"] += len(samples)
        counts["bad"] += ok.count(False)
    return audios, ok


# -----------------------------------------------------------------------------
# data checker

CATEGORY_FIELDS = ["task", "modality", "category", "difficulty", "question_type"]  # MMAU, MMAR, MMSU, synthetic, AVQA


def scan_audio(samples: list[Sample]) -> tuple[list[float], list[AudioError]]:
    """Durations of the distinct audio files (from their headers, nothing decoded) and the bad ones."""
    durations, errors = [], []
    for path in dict.fromkeys(s.audio_path for s in samples):
        try:
            durations.append(audio_duration(path))
        except AudioError as e:
            errors.append(e)
    return durations, errors


def print_categories(samples: list[Sample]) -> None:
    for field in CATEGORY_FIELDS:
        counts = Counter(str(s.meta[field]) for s in samples if field in s.meta)
        if counts:
            print(f"by {field}: " + ", ".join(f"{v} {counts[v]}" for v in sorted(counts)))


def print_durations(durations: list[float]) -> None:
    if not durations:
        print("durations: no readable audio")
        return
    d = np.array(durations)
    print(f"durations (s): min {d.min():.2f}, median {np.median(d):.2f}, mean {d.mean():.2f}, max {d.max():.2f}")
    print(f"longer than {MAX_SECONDS} s (the model hears only the first {MAX_SECONDS} s): {(d > MAX_SECONDS).sum()}")


def print_problems(title: str, problems: list[Exception]) -> None:
    if problems:
        print(f"{title} ({len(problems)}):")
        for p in problems:
            print(f"  {p}")


def print_answers(samples: list[Sample]) -> None:
    """Answers that are withheld (evaluation only) or not among the choices (allowed in MMAR)."""
    withheld = sum(s.answer is None for s in samples)
    outside = sum(s.answer is not None and s.answer not in s.choices for s in samples)
    if withheld:
        print(f"answers withheld: {withheld} (can be evaluated, not trained on)")
    if outside:
        print(f"answers that are not one of the choices: {outside} (MMAR's string match scores them as given)")


def check_file(path, audio_dir=None) -> int:
    """The checker: print every bad record and missing or unreadable clip; 0 if there are none, else 1.
    A test set whose answers are withheld is not an error: it is reported on a line of its own."""
    samples, bad_records = scan_samples(path, audio_dir, allow_unanswered=True)
    print(f"{path}: {len(samples) + len(bad_records)} records, {len(samples)} good, {len(bad_records)} bad")
    print_answers(samples)
    print_categories(samples)
    durations, bad_audio = scan_audio(samples)
    n_files = len(durations) + len(bad_audio)
    print(f"audio files: {n_files}, {len(durations)} readable, {len(bad_audio)} missing or unreadable")
    print_durations(durations)
    print_problems("bad records", bad_records)
    print_problems("missing or unreadable audio", bad_audio)
    ok = not bad_records and not bad_audio
    print("OK" if ok else f"FAILED: {len(bad_records)} bad records, {len(bad_audio)} missing or unreadable audio files")
    return 0 if ok else 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check a question file and its audio, or prepare AVQA's.")
    parser.add_argument("file", nargs="?", help="question file to check: AVQA/R1-AQA JSONL, MMAU JSON, MMAR, MMSU "
                        "or plain JSONL")
    parser.add_argument("--audio-dir", help="folder that relative audio paths are relative to; with "
                        "--from-avqa, the folder holding the clips")
    parser.add_argument("--from-avqa", metavar="QA_JSON", help="AVQA's train_qa.json or val_qa.json to convert "
                        "to R1-AQA's JSONL (needs --audio-dir and --out)")
    parser.add_argument("--out", help="with --from-avqa: the JSONL file to write")
    parser.add_argument("--overwrite", action="store_true", help="with --from-avqa: replace --out if it exists")
    args = parser.parse_args(argv)
    if args.from_avqa is None and args.file is None:
        parser.error("give a question file to check, or --from-avqa QA_JSON --audio-dir DIR --out OUT")
    if args.from_avqa is not None and (args.file is not None or args.audio_dir is None or args.out is None):
        parser.error("--from-avqa takes --audio-dir and --out, and no question file to check")
    if args.from_avqa is None and (args.out is not None or args.overwrite):
        parser.error("--out and --overwrite go with --from-avqa")
    return args


def main(argv=None) -> int:
    """Exit 0: all good; 1: bad records or audio (checker), no record kept (--from-avqa); 2: a file or
    folder that cannot be used, printed as one line on stderr."""
    args = parse_args(argv)
    try:
        if args.audio_dir is not None:
            check_audio_dir(args.audio_dir)
        if args.from_avqa is not None:
            from tools import avqa  # AVQA's preparation, a tool apart from the reader
            return avqa.prepare_avqa(args.from_avqa, args.audio_dir, args.out, args.overwrite)
        return check_file(args.file, args.audio_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
