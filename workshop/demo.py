"""The demo's tiny model and task, built offline: a tiny Qwen2-Audio (or Qwen2.5-Omni thinker) and a
synthetic question about real wav files. Which pitch band is the tone in?

The tiny model has the real classes, processor and chat template, a small byte-level BPE with the real
special tokens and a small random config (about 270k parameters); model.load opens it like the 7B. The
task's clips are 1-2 s sines in four bands near 200, 500, 1200 and 3000 Hz, written as R1-AQA-style JSONL,
so the demo runs the real readers, prompt, rewards and model. Both are deterministic and built once.
    python -m workshop.demo --out tiny-model [--family omni]    # build a tiny model into a folder
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from transformers import Qwen2_5OmniThinkerConfig, Qwen2AudioConfig, Qwen2TokenizerFast, WhisperFeatureExtractor

import model as M
from config import LOUDNESS, TINY_MODELS
from data import SAMPLE_RATE, build_prompt

FAMILIES = {"tiny": "qwen2-audio", "tiny-omni": "omni"}  # train.py's --model tiny names, and each one's family


def family_record(family):
    """model.Family of "qwen2-audio" or "omni" (recipes/omni.py)."""
    return M.QWEN2_AUDIO if family == "qwen2-audio" else M.other_family(lambda f: f.name == "Qwen2.5-Omni", family)


def _tokenizer_corpus():
    """Text the tiny BPE is trained on: the chat frame, the R1-AQA prompt, answer tags and words."""
    words = ["very low", "low", "high", "very high", "Man", "Woman", "Child", "Robot",
             "yes", "no", "one", "two", "three", "four", "speech", "music", "sound"]
    lines = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ",
             "<|im_start|>assistant\n"]
    for q in ["What is the pitch of the tone in the audio?", "What happened in the audio?",
              "How many beeps are there?", "Is the sound loud or soft?", "Who is speaking?"]:
        lines.append(build_prompt(q, words[:4]))
        lines.append(build_prompt(q, words[4:8], "think"))
    lines += [f"<answer>{w}</answer>" for w in words] + [f"<think>{w}</think>" for w in words]
    return lines * 20


def build_tokenizer(vocab_size=512, special_tokens=M.SPECIAL_TOKENS, named_tokens=None):
    """A small byte-level BPE with Qwen2's special tokens, wrapped as a Qwen2 tokenizer. named_tokens:
    tokenizer attributes naming some of them (Qwen2.5-Omni's audio_token, image_token, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    named = {"extra_special_tokens": named_tokens} if named_tokens else {}
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, errors="replace", **named)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[1:])})
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(tokenizer, window_seconds=10, width=64, layers=2, heads=4):
    """A small Qwen2-Audio: same classes, a few hundred thousand parameters.
    The encoder sees 50 positions per second of its mel window (100 mel frames per second, conv stride 2)."""
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=width, encoder_layers=layers,
                          encoder_attention_heads=heads, encoder_ffn_dim=2 * width, num_mel_bins=128,
                          max_source_positions=50 * window_seconds),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, intermediate_size=2 * width,
                         rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )


def tiny_omni_config(tokenizer, window_seconds=10, width=64, layers=2, heads=4):
    """A small Qwen2.5-Omni thinker: the real classes and the real encoder windows (100 positions, 2 s of
    audio, whatever the clip length), RoPE sections in the real proportions (16/24/24 of 64 -> 2/3/3 of
    head_dim/2 = 8), lm_head not tied. Its vision tower is the smallest the class accepts: it is dropped."""
    head_dim, ids = width // heads, tokenizer.convert_tokens_to_ids
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=width, encoder_layers=layers, encoder_attention_heads=heads,
                          encoder_ffn_dim=2 * width, num_mel_bins=128, max_source_positions=1500, n_window=100,
                          output_dim=width),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                           fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, intermediate_size=2 * width, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16])),
        audio_token_index=ids("<|AUDIO|>"), image_token_index=ids("<|IMAGE|>"), video_token_index=ids("<|VIDEO|>"),
        audio_start_token_id=ids("<|audio_bos|>"), audio_end_token_id=ids("<|audio_eos|>"),
        vision_start_token_id=ids("<|vision_bos|>"),
    )


TINY_CONFIGS = {"qwen2-audio": tiny_config, "omni": tiny_omni_config}


def build_tiny(out_dir, seed=0, window_seconds=10, width=64, layers=2, family="qwen2-audio"):
    """Write a tiny random model of the family (model, tokenizer, feature extractor, processor) to out_dir.
    Deterministic for a seed; `load(out_dir)` opens it like the real one. The feature extractor's window
    is window_seconds (longer clips are cut)."""
    fam = family_record(family)
    tokenizer = build_tokenizer(special_tokens=fam.special_tokens, named_tokens=fam.named_tokens)
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=window_seconds)
    processor = fam.processor_class(feature_extractor=features, tokenizer=tokenizer, chat_template=fam.chat_template)
    config = TINY_CONFIGS[family](tokenizer, window_seconds, width, layers)
    torch.manual_seed(seed)
    model = fam.model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = M.end_token_ids(tokenizer)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def tiny(cache_dir, window_seconds=10, seed=0, family="qwen2-audio", folder=None):
    """The tiny model's directory under cache_dir (folder, or a name from its settings), built on first use."""
    path = Path(cache_dir) / (folder or f"tiny-{family}-{window_seconds}s-seed{seed}")
    if not (path / "config.json").exists():
        build_tiny(path, seed=seed, window_seconds=window_seconds, family=family)
    return path


def build(cache_dir, model_name, synthetic, loudness=False):
    """What a run on the demo's pieces needs, built once in cache_dir: the tiny model (if model_name is one),
    the synthetic pitch task and the loudness question (if asked)."""
    if model_name in TINY_MODELS:
        tiny_model(cache_dir, model_name)
    if synthetic:
        make_synthetic(Path(cache_dir) / "synthetic")
    if loudness:
        make_synthetic(Path(cache_dir) / LOUDNESS, task="loudness")


def tiny_model(cache_dir, model_name):
    """The folder of train.py's --model tiny / tiny-omni, config.TINY_MODELS[model_name] in cache_dir: a 2 s
    mel window, built on first use."""
    return tiny(cache_dir, window_seconds=2, family=FAMILIES[model_name], folder=TINY_MODELS[model_name])


# -----------------------------------------------------------------------------
# The synthetic task

PITCH_CHOICES = ["very low", "low", "high", "very high"]
PITCH_CENTERS_HZ = [200.0, 500.0, 1200.0, 3000.0]  # with +-15% jitter the bands never overlap
PITCH_JITTER = 0.15
PITCH_QUESTION = "What is the pitch of the tone in the audio?"
# A second question about the same kind of clips, for a start that listens (the demo's warm start): how loud is
# the tone? Its answers are the pitch task's words, so a model that learned it answers the pitch question with a
# choice. The peak levels are an octave apart; with +-15% jitter the bands never overlap.
LOUDNESS_LEVELS = [0.07, 0.14, 0.28, 0.56]
LOUDNESS_QUESTION = "What is the volume of the tone in the audio?"
TASKS = {"pitch": "pitch-band", "loudness": "loudness-band"}


def make_synthetic(out_dir, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                   task: str = "pitch") -> tuple[Path, Path]:
    """
    Write wavs/ and R1-AQA-style train.jsonl and test.jsonl under out_dir; return the two paths.
    Labels are balanced; the same arguments give the same files, and a second call with the
    same arguments reuses them (manifest.json records what was made). The default 2000 training
    clips take about 4 s and 100 MB to write; 250 steps of 32 prompts see each about 4 times.
    """
    out_dir = Path(out_dir)
    train, test = out_dir / "train.jsonl", out_dir / "test.jsonl"
    manifest = out_dir / "manifest.json"
    params = {"task": TASKS[task], "n_train": n_train, "n_test": n_test, "seed": seed}
    if manifest.exists() and json.loads(manifest.read_text()) == params and train.exists() and test.exists():
        return train, test
    manifest.unlink(missing_ok=True)  # written last, so an interrupted run is never reused
    (out_dir / "wavs").mkdir(parents=True, exist_ok=True)
    for split, n, jsonl in (("train", n_train, train), ("test", n_test, test)):
        rng = np.random.default_rng([seed, split == "test"])
        labels = rng.permutation(np.arange(n) % len(PITCH_CHOICES))
        write = _write_tone if task == "pitch" else _write_loudness
        records = [write(out_dir, f"{split}_{i:05d}", int(label), rng) for i, label in enumerate(labels)]
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


def _write_loudness(out_dir: Path, name: str, label: int, rng: np.random.Generator) -> dict:
    """One sine in a random pitch band, its peak level in loudness band `label` -> its record, asking how loud
    it is (the answer: the label's word of PITCH_CHOICES)."""
    level = LOUDNESS_LEVELS[label] * rng.uniform(1 - PITCH_JITTER, 1 + PITCH_JITTER)
    tones = Tones(level=(level, level), question=LOUDNESS_QUESTION)
    record = _write_tone(out_dir, name, int(rng.integers(len(PITCH_CHOICES))), rng, tones)
    return {**record, "answer": label, "category": PITCH_CHOICES[label], "pitch": record["category"],
            "level": round(level, 4)}


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="build the tiny model into this directory")
    parser.add_argument("--family", choices=list(TINY_CONFIGS), default="qwen2-audio", help="qwen2-audio or omni")
    parser.add_argument("--window-seconds", type=int, default=10, help="mel window of the tiny model")
    args = parser.parse_args()
    print(f"tiny model written to {build_tiny(args.out, window_seconds=args.window_seconds, family=args.family)}")
