"""
Data for audio question answering: audio loading, question files, prompts, a synthetic task.

The model hears 16 kHz mono audio and reads a multiple-choice question. This file turns what is
on disk into exactly that:
- load_audio() reads any file libsndfile reads (wav, flac, ogg; any rate, any channel count),
  keeps the first channel (as R1-AQA does; averaging them is an option) and resamples to 16 kHz
  with a windowed-sinc (Kaiser) polyphase filter.
- read_samples() reads three question formats into one Sample type, picking the format from
  the content: R1-AQA/AVQA JSONL (answer is an index), MMAU JSON lists (answer is a string)
  and a plain JSONL for your own data ({"audio", "question", "choices", "answer"}).
  A malformed record raises DataError naming the file, the line (or list item) and the problem.
- build_prompt() writes the R1-AQA question text.
- make_synthetic() writes a small pitch-band task (real wav files) to train on a CPU.

Run it as a data checker; it lists every bad record and every missing or unreadable clip:
    python data.py questions.jsonl
    python data.py mmau-test-mini.json --audio-dir test-mini-audios
"""

import argparse
import json
import math
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
    """A malformed question record: "{file}:{line}: {problem}" or "{file}: item {index}: {problem}"."""


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
    return resample(mono, sr, SAMPLE_RATE)


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
    answer: str  # the correct choice string
    meta: dict  # the original record


def read_samples(path, audio_dir=None) -> list[Sample]:
    """All samples of a question file; raises DataError on the first malformed record."""
    samples, errors = scan_samples(path, audio_dir)
    if errors:
        raise errors[0]
    return samples


def scan_samples(path, audio_dir=None) -> tuple[list[Sample], list[DataError]]:
    """
    The good samples of a question file and one DataError per malformed record, in file order.
    A file starting with "[" is an MMAU JSON list; otherwise it is JSONL, read as R1-AQA/AVQA
    when its first record has "question_text" or "multi_choice", else as the plain format.
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
            sample = _PARSERS[fmt](record, where)
        except DataError as e:
            errors.append(e)
            continue
        sample.audio_path = _resolve_audio(sample.audio_path, path, audio_dir)
        samples.append(sample)
    return samples, errors


def _read_records(path: Path) -> tuple[str, list[tuple[str, object]]]:
    """The file's format and, per record, its location and its JSON value (or a DataError)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            return "mmau", [("", DataError(f"{path}:{e.lineno}: bad JSON: {e.msg} at column {e.colno}"))]
        return "mmau", [(f"{path}: item {i}", item) for i, item in enumerate(items)]
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
    return ("avqa" if "question_text" in first or "multi_choice" in first else "plain"), records


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


def _get(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field '{key}' should be {kind.__name__}, got {type(value).__name__}")
    return value


def _get_choices(record: dict, key: str, where: str) -> list[str]:
    choices = _get(record, key, list, where)
    if not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: field '{key}' should be a list of strings")
    if len(choices) < 2:
        raise DataError(f"{where}: needs at least 2 choices, got {len(choices)}")
    return choices  # duplicate choices are allowed: real MMAU items have them


def _get_answer_string(record: dict, choices: list[str], where: str) -> str:
    answer = _get(record, "answer", str, where)
    if answer not in choices:
        raise DataError(f"{where}: answer {answer!r} is not one of the choices {choices}")
    return answer


def _parse_avqa(record: dict, where: str) -> Sample:
    """R1-AQA/AVQA: answer is a 0-based index; the questions were written about videos."""
    question = _get(record, "question_text", str, where)
    question = question.replace("video", "audio")  # as R1-AQA: lowercase only ("Video" stays)
    choices = _get_choices(record, "multi_choice", where)
    index = _get(record, "answer", int, where)
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: answer index {index} is out of range for {len(choices)} choices")
    audio = _get(record, "audio_path", str, where)
    return Sample(audio, question, choices, choices[index], record)


def _parse_mmau(record: dict, where: str) -> Sample:
    choices = _get_choices(record, "choices", where)
    answer = _get_answer_string(record, choices, where)
    question = _get(record, "question", str, where)
    return Sample(_get(record, "audio_id", str, where), question, choices, answer, record)


def _parse_plain(record: dict, where: str) -> Sample:
    choices = _get_choices(record, "choices", where)
    answer = _get_answer_string(record, choices, where)
    question = _get(record, "question", str, where)
    return Sample(_get(record, "audio", str, where), question, choices, answer, record)


_PARSERS = {"avqa": _parse_avqa, "mmau": _parse_mmau, "plain": _parse_plain}


PROMPTS = ("direct", "answer", "think")  # the paper's Prompt <1>, <2> and <3>
_ASK = {
    "direct": "",
    "answer": " Output the final answer in <answer> </answer>.",
    "think": " Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
}


def build_prompt(question: str, choices: list[str], prompt: str = "answer") -> str:
    """The user text of the paper's three prompts; choices are shown as Python's str(list).
    answer (Prompt <2>) is R1-AQA's training prompt and think (Prompt <3>) its think variant, both
    as in its code. direct (Prompt <1>, the paper's SFT rows) is not in R1-AQA's code: it is Prompt
    <2> without the answer-tag instruction, the question and the choices alone."""
    if prompt not in _ASK:
        raise ValueError(f"unknown prompt {prompt!r}: choose one of {PROMPTS}")
    return f"{question} Please choose the answer from the following options: {choices}.{_ASK[prompt]}"


# -----------------------------------------------------------------------------
# synthetic task: which pitch band is this tone in?

PITCH_CHOICES = ["very low", "low", "high", "very high"]
PITCH_CENTERS_HZ = [200.0, 500.0, 1200.0, 3000.0]  # with +-15% jitter the bands never overlap
PITCH_JITTER = 0.15
PITCH_QUESTION = "What is the pitch of the tone in the audio?"


def make_synthetic(out_dir, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """
    Write wavs/ and R1-AQA-style train.jsonl and test.jsonl under out_dir; return the two paths.
    Labels are balanced; the same arguments give the same files, and a second call with the
    same arguments reuses them (manifest.json records what was made). The default 2000 training
    clips take about 4 s and 100 MB to write; 250 steps of 32 prompts see each about 4 times.
    """
    out_dir = Path(out_dir)
    train, test = out_dir / "train.jsonl", out_dir / "test.jsonl"
    manifest = out_dir / "manifest.json"
    params = {"task": "pitch-band", "n_train": n_train, "n_test": n_test, "seed": seed}
    if manifest.exists() and json.loads(manifest.read_text()) == params and train.exists() and test.exists():
        return train, test
    manifest.unlink(missing_ok=True)  # written last, so an interrupted run is never reused
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    for split, n, jsonl in (("train", n_train, train), ("test", n_test, test)):
        rng = np.random.default_rng([seed, split == "test"])
        labels = rng.permutation(np.arange(n) % len(PITCH_CHOICES))
        records = [_write_tone(out_dir, f"{split}_{i:05d}", int(label), rng) for i, label in enumerate(labels)]
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest.write_text(json.dumps(params))
    return train, test


def _write_tone(out_dir: Path, name: str, label: int, rng: np.random.Generator) -> dict:
    """One 1-2 s sine in band `label` (random level and phase, up to 10% noise) -> its record."""
    freq = PITCH_CENTERS_HZ[label] * rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    t = np.arange(int(rng.uniform(1.0, 2.0) * SAMPLE_RATE)) / SAMPLE_RATE
    amplitude = rng.uniform(0.05, 0.8)
    tone = amplitude * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    noise = rng.uniform(0, 0.1) * amplitude * rng.standard_normal(len(t))
    audio_path = f"wavs/{name}.wav"  # relative to the JSONL file, so the folder can move
    sf.write(out_dir / audio_path, np.clip(tone + noise, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    return {"id": name, "question_text": PITCH_QUESTION, "multi_choice": PITCH_CHOICES, "answer": label,
            "audio_path": audio_path, "category": PITCH_CHOICES[label], "frequency_hz": round(freq, 1)}


# -----------------------------------------------------------------------------
# data checker

CATEGORY_FIELDS = ["task", "category", "difficulty", "question_type"]  # MMAU (+ synthetic: category), AVQA


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Check a question file and its audio.")
    parser.add_argument("file", help="AVQA/R1-AQA JSONL, MMAU JSON or plain JSONL")
    parser.add_argument("--audio-dir", help="folder that relative audio paths are relative to")
    args = parser.parse_args(argv)
    samples, bad_records = scan_samples(args.file, args.audio_dir)
    print(f"{args.file}: {len(samples) + len(bad_records)} records, {len(samples)} good, {len(bad_records)} bad")
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


if __name__ == "__main__":
    sys.exit(main())
