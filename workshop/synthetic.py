"""The workshop's synthetic task: which pitch band is the tone in the audio? Real wav files and
R1-AQA-style JSONL, so the demo runs the same readers, prompt, rewards and model as a real run.

A clip is a 1-2 s sine in one of four bands near 200, 500, 1200 and 3000 Hz (+-15%, so the bands
never overlap), at a random level and phase, with up to 10% noise; the choices are
['very low', 'low', 'high', 'very high']. make_synthetic writes the training and test splits;
make_shifted writes held-out splits outside the training distribution (shorter, quieter and
noisier clips; or another question with the choices reversed) for compare.py. Both are
deterministic for their arguments and reuse what they wrote before.

    python -c "import synthetic; print(synthetic.make_synthetic('runs/synthetic'))"
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from data import SAMPLE_RATE

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


@dataclass
class Tones:
    """What a synthetic clip and its question are drawn from (the training task's ranges by default)."""
    seconds: tuple = (1.0, 2.0)  # clip length
    level: tuple = (0.05, 0.8)   # peak amplitude of the sine
    noise: tuple = (0.0, 0.1)    # white noise std, as a share of the level
    question: str = PITCH_QUESTION
    choices: tuple = tuple(PITCH_CHOICES)  # in the order the prompt lists them


# Held-out splits outside the training distribution, for the SFT-against-GRPO comparison (compare.py).
SHIFTS = {
    "audio": Tones(seconds=(0.4, 0.9), level=(0.01, 0.04), noise=(0.2, 0.4)),  # shorter, quieter, noisier
    "wording": Tones(question="Which frequency band is this tone in?", choices=tuple(reversed(PITCH_CHOICES))),
}


def make_shifted(out_dir, kind: str, n: int = 200, seed: int = 0) -> Path:
    """Write a held-out split of the pitch task with SHIFTS[kind]'s clips or wording; return its JSONL.
    The labels are balanced; the same arguments give the same files, and a second call reuses them."""
    out_dir = Path(out_dir) / f"shifted-{kind}"
    jsonl, manifest = out_dir / "test.jsonl", out_dir / "manifest.json"
    params = {"task": "pitch-band", "shift": kind, "n": n, "seed": seed}
    if manifest.exists() and json.loads(manifest.read_text()) == params and jsonl.exists():
        return jsonl
    manifest.unlink(missing_ok=True)  # written last, so an interrupted call is never reused
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2 + list(SHIFTS).index(kind)])
    labels = rng.permutation(np.arange(n) % len(PITCH_CHOICES))
    records = [_write_tone(out_dir, f"{kind}_{i:05d}", int(label), rng, SHIFTS[kind]) for i, label in enumerate(labels)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest.write_text(json.dumps(params))
    return jsonl


def _write_tone(out_dir: Path, name: str, label: int, rng: np.random.Generator, tones: Tones = Tones()) -> dict:
    """One sine in band `label` (random length, level and phase, and some noise) -> its record."""
    freq = PITCH_CENTERS_HZ[label] * rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    t = np.arange(int(rng.uniform(*tones.seconds) * SAMPLE_RATE)) / SAMPLE_RATE
    amplitude = rng.uniform(*tones.level)
    tone = amplitude * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    noise = rng.uniform(*tones.noise) * amplitude * rng.standard_normal(len(t))
    audio_path = f"wavs/{name}.wav"  # relative to the JSONL file, so the folder can move
    sf.write(out_dir / audio_path, np.clip(tone + noise, -1, 1), SAMPLE_RATE, subtype="PCM_16")
    choices = list(tones.choices)
    return {"id": name, "question_text": tones.question, "multi_choice": choices,
            "answer": choices.index(PITCH_CHOICES[label]), "audio_path": audio_path,
            "category": PITCH_CHOICES[label], "frequency_hz": round(freq, 1)}
