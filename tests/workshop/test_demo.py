"""workshop/demo.py's synthetic task: balanced labels, each tone in its band, deterministic files reused,
and the shifted held-out splits of workshop/compare.py outside the training task."""

import numpy as np
import pytest

import data
from data import SAMPLE_RATE
from workshop import demo


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return demo.make_synthetic(tmp_path_factory.mktemp("synth"), n_train=40, n_test=8, seed=0)


def test_synthetic_labels_are_balanced(task):
    """40 train and 8 test items cycle through the 4 bands: 10 and 2 of each."""
    train, test = (data.read_samples(p) for p in task)
    for samples, per_class in ((train, 10), (test, 2)):
        answers = [s.answer for s in samples]
        assert {c: answers.count(c) for c in demo.PITCH_CHOICES} == dict.fromkeys(demo.PITCH_CHOICES, per_class)
        assert all(s.choices == demo.PITCH_CHOICES and s.meta["category"] == s.answer for s in samples)


def test_synthetic_tone_is_in_its_band(task):
    """Each clip's FFT peak lies in its labelled band (centre +-15%), and each clip is 1-2 s of 16 kHz audio."""
    for sample in data.read_samples(task[0]):
        audio = data.load_audio(sample.audio_path)
        assert SAMPLE_RATE <= len(audio) <= 2 * SAMPLE_RATE
        peak_hz = np.argmax(np.abs(np.fft.rfft(audio))) * SAMPLE_RATE / len(audio)
        centre = demo.PITCH_CENTERS_HZ[demo.PITCH_CHOICES.index(sample.answer)]
        # FFT bins are at most 1 Hz apart for >= 1 s clips, so allow 1 Hz beyond the +-15% band
        assert 0.85 * centre - 1 <= peak_hz <= 1.15 * centre + 1, (sample.audio_path, peak_hz, centre)


def test_synthetic_is_deterministic_and_reused(tmp_path, task):
    """Same seed -> byte-identical files; a different seed differs; a repeated call rewrites nothing."""
    again = demo.make_synthetic(tmp_path / "a", n_train=40, n_test=8, seed=0)
    other = demo.make_synthetic(tmp_path / "b", n_train=40, n_test=8, seed=1)
    assert again[0].read_text() == task[0].read_text()
    wav = "wavs/train_00007.wav"
    assert (tmp_path / "a" / wav).read_bytes() == (task[0].parent / wav).read_bytes()
    assert other[0].read_text() != task[0].read_text()
    stamp = again[0].stat().st_mtime_ns
    assert demo.make_synthetic(tmp_path / "a", n_train=40, n_test=8, seed=0) == again
    assert again[0].stat().st_mtime_ns == stamp
    demo.make_synthetic(tmp_path / "a", n_train=4, n_test=8, seed=0)  # other parameters: regenerated
    assert len(data.read_samples(again[0])) == 4


def test_shifted_splits_lie_outside_the_training_task(tmp_path):
    """compare.py's shifted splits: "audio" clips are 0.4-0.9 s (training: 1-2 s) and quiet (level
    0.01-0.04 with 20-40% noise: never above 0.04 * (1 + 5 * 0.4) = 0.12, while training levels reach
    0.8), each still a tone in its labelled band; "wording" asks another question with the choices
    reversed, its answer index pointing at the right band. Both balanced, both reused when asked again."""
    audio = data.read_samples(demo.make_shifted(tmp_path, "audio", n=8))
    assert sorted(s.answer for s in audio) == sorted(demo.PITCH_CHOICES * 2)
    for s in audio:
        clip = data.load_audio(s.audio_path)
        assert 0.4 * SAMPLE_RATE <= len(clip) <= 0.9 * SAMPLE_RATE and np.abs(clip).max() <= 0.12
        peak_hz = np.argmax(np.abs(np.fft.rfft(clip))) * SAMPLE_RATE / len(clip)
        centre = demo.PITCH_CENTERS_HZ[demo.PITCH_CHOICES.index(s.answer)]
        assert 0.85 * centre - 2.5 <= peak_hz <= 1.15 * centre + 2.5  # bins are 2.5 Hz apart at 0.4 s
    worded = data.read_samples(demo.make_shifted(tmp_path, "wording", n=8))
    assert {s.question for s in worded} == {"Which frequency band is this tone in?"}
    assert all(s.choices == demo.PITCH_CHOICES[::-1] and s.answer == s.meta["category"] for s in worded)
    stamp = (tmp_path / "shifted-audio" / "test.jsonl").stat().st_mtime_ns
    demo.make_shifted(tmp_path, "audio", n=8)
    assert (tmp_path / "shifted-audio" / "test.jsonl").stat().st_mtime_ns == stamp


def test_loudness_task_asks_the_level_of_the_same_tones(tmp_path):
    """task "loudness": the clips are the pitch task's kind of tone (1-2 s, FFT peak in the band the record
    names) asking "What is the volume ...?" with the pitch words as choices. The peak level lies in the
    labelled octave: level * (1 +- 15%), so the bands never overlap (0.0805 < 0.119); the clip's peak is that
    level plus up to 10% noise, at most 5 std away (0.5 of the level). Labels are balanced (8 = 2 of each)."""
    train, _ = demo.make_synthetic(tmp_path, n_train=8, n_test=4, seed=0, task="loudness")
    samples = data.read_samples(train)
    assert sorted(s.answer for s in samples) == sorted(demo.PITCH_CHOICES * 2)
    for s in samples:
        assert s.question == demo.LOUDNESS_QUESTION and s.choices == demo.PITCH_CHOICES
        centre = demo.LOUDNESS_LEVELS[demo.PITCH_CHOICES.index(s.answer)]
        assert 0.85 * centre <= s.meta["level"] <= 1.15 * centre
        clip = data.load_audio(s.audio_path)
        assert SAMPLE_RATE <= len(clip) <= 2 * SAMPLE_RATE
        assert 0.99 * s.meta["level"] - 1e-4 <= np.abs(clip).max() <= 1.5 * s.meta["level"]
        peak_hz = np.argmax(np.abs(np.fft.rfft(clip))) * SAMPLE_RATE / len(clip)
        pitch = demo.PITCH_CENTERS_HZ[demo.PITCH_CHOICES.index(s.meta["pitch"])]
        assert 0.85 * pitch - 1 <= peak_hz <= 1.15 * pitch + 1


def test_train_finds_the_demo_pieces_where_demo_builds_them(tmp_path):
    """train.py knows the tiny models' folders (config.TINY_MODELS) without running workshop/demo.py, and a
    run needs demo.build only while a piece it reads lacks the file demo writes last (or checks itself)."""
    import config
    import train
    cfg = config.Config(model="tiny", data="synthetic", warm_start_data=config.LOUDNESS, cache_dir=str(tmp_path))
    for name in config.TINY_MODELS:
        folder = train.model_folder(config.Config(model=name, cache_dir=str(tmp_path)))
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")  # demo.tiny reuses a folder that has one: nothing is built
        assert demo.tiny_model(tmp_path, name) == folder
    # workshop/compare.py's tiny model (2 s window, seed 0) is the same folder, built once for both
    tiny = train.model_folder(config.Config(model="tiny", cache_dir=str(tmp_path)))
    assert demo.tiny(tmp_path, window_seconds=2) == tiny
    assert train.demo_pieces_missing(cfg)  # neither question file yet
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "manifest.json").write_text("{}")
    assert train.demo_pieces_missing(cfg)  # the loudness question is still missing
    assert not train.demo_pieces_missing(config.Config(model="tiny", data="synthetic", cache_dir=str(tmp_path)))
    (tmp_path / config.LOUDNESS).mkdir()
    (tmp_path / config.LOUDNESS / "manifest.json").write_text("{}")
    assert not train.demo_pieces_missing(cfg)
    (tmp_path / config.TINY_MODELS["tiny"] / "config.json").unlink()
    assert train.demo_pieces_missing(cfg)
