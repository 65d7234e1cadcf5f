"""Tests for data.py: audio loading and resampling, question readers, prompts, the step's questions, checker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import data
from data import SAMPLE_RATE, AudioError, DataError

REPO = Path(__file__).resolve().parents[1]
MMAU_DIR = Path(os.environ.get("MMAU_DIR", REPO.parent / "shared" / "mmau"))


def sine(freq, sr, seconds=2.0, amplitude=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return amplitude * np.sin(2 * np.pi * freq * t)


def rel_rms(x, ref):
    return np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref**2))


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# -----------------------------------------------------------------------------
# resampling and audio formats

@pytest.mark.parametrize("sr", [44100, 48000, 8000, 22050])
def test_resampled_sine_matches_ideal(tmp_path, sr):
    """A 1 kHz sine at any rate comes out as the ideal 16 kHz sine: relative RMS error < 5e-6 away from the edges."""
    path = tmp_path / f"sine_{sr}.wav"
    sf.write(path, sine(1000, sr), sr, subtype="FLOAT")
    y = data.load_audio(path)
    # 2 s at any rate is 32000 samples at 16 kHz; output n sits at time n/16000 s
    assert y.dtype == np.float32 and len(y) == 32000
    ideal = sine(1000, SAMPLE_RATE)
    edge = SAMPLE_RATE // 10  # skip 0.1 s at each end, where the filter sees the zero padding
    err = rel_rms(y[edge:-edge], ideal[edge:-edge])
    print(f"1 kHz sine from {sr} Hz: relative RMS error {err:.2e}")
    # measured 3.98e-6, 4.18e-6, 2.74e-6, 4.08e-6 (44.1, 48, 8, 22.05 kHz); a Kaiser beta of 9
    # instead of 10 gives 7e-6 to 1.2e-5, so the bound holds the filter to its design
    assert err < 5e-6


def test_resampling_removes_tones_above_new_nyquist(tmp_path):
    """A 12 kHz tone at 48 kHz (above the 8 kHz output Nyquist; it would alias to 4 kHz) comes out >= 110 dB down."""
    path = tmp_path / "tone12k.wav"
    sf.write(path, sine(12000, 48000), 48000, subtype="FLOAT")
    y = data.load_audio(path)
    edge = SAMPLE_RATE // 10
    # output RMS over input RMS; the input is a 0.5-amplitude sine, RMS 0.5/sqrt(2)
    attenuation_db = 20 * np.log10(np.sqrt(np.mean(y[edge:-edge] ** 2)) / (0.5 / np.sqrt(2)))
    print(f"12 kHz tone from 48 kHz: {attenuation_db:.1f} dB")
    assert attenuation_db <= -110  # measured -114.4 dB; a Kaiser beta of 9 instead of 10 gives -105.9 dB


def test_output_length_is_ceil_of_scaled_length():
    """len(out) = ceil(len(in) * 16000 / sr): 44101 samples at 44.1 kHz -> ceil(16000.36) = 16001."""
    assert len(data.resample(np.zeros(44101), 44100, SAMPLE_RATE)) == 16001
    assert len(data.resample(np.zeros(44100), 44100, SAMPLE_RATE)) == 16000
    assert len(data.resample(np.zeros(3), 8000, SAMPLE_RATE)) == 6


def test_16k_input_is_returned_unchanged(tmp_path):
    """At 16 kHz there is nothing to resample: the float samples come back bit-exact."""
    x = np.random.default_rng(0).uniform(-1, 1, 1234).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(data.load_audio(tmp_path / "a.wav"), x)


def test_stereo_keeps_channel_0_or_averages(tmp_path):
    """R1-AQA keeps the first channel: left 0.6*s and right 0.2*s give 0.6*s; downmix="mean" gives 0.4*s."""
    s = sine(440, SAMPLE_RATE, seconds=0.5, amplitude=1.0)
    sf.write(tmp_path / "st.wav", np.stack([0.6 * s, 0.2 * s], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(data.load_audio(tmp_path / "st.wav"), 0.6 * s, atol=1e-6)
    np.testing.assert_allclose(data.load_audio(tmp_path / "st.wav", downmix="mean"), 0.4 * s, atol=1e-6)
    with pytest.raises(ValueError, match="unknown downmix 'left'"):
        data.load_audio(tmp_path / "st.wav", downmix="left")


@pytest.mark.parametrize("name, subtype, tolerance", [
    # rounding to 16 bits: error RMS 2^-15/sqrt(12) = 8.8e-6, i.e. 2.5e-5 of the sine's RMS 0.354
    ("int16.wav", "PCM_16", 1e-4),
    ("int24.wav", "PCM_24", 1e-6),  # 256x finer than 16 bits; measured 2e-7 (float32 output)
    ("float.wav", "FLOAT", 1e-7),  # float32 round trip: relative error ~2^-24
    ("int16.flac", "PCM_16", 1e-4),  # lossless 16-bit, as int16.wav
    ("vorbis.ogg", "VORBIS", 0.05),  # lossy: measured 1.3% for this sine
])
def test_reads_common_formats(tmp_path, name, subtype, tolerance):
    """wav (int16/int24/float), flac and ogg all decode to the written signal within their precision."""
    x = sine(440, SAMPLE_RATE, seconds=1.0)
    sf.write(tmp_path / name, x, SAMPLE_RATE, subtype=subtype)
    y = data.load_audio(tmp_path / name)
    assert y.dtype == np.float32 and y.shape == (16000,)
    assert rel_rms(y, x) < tolerance


def _missing(tmp_path):
    return tmp_path / "missing.wav"


def _zero_frames(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0), SAMPLE_RATE)
    return tmp_path / "empty.wav"


def _cut_wav(tmp_path, keep_bytes):
    sf.write(tmp_path / "full.wav", sine(440, SAMPLE_RATE, seconds=1.0), SAMPLE_RATE, subtype="PCM_16")
    path = tmp_path / f"cut{keep_bytes}.wav"
    path.write_bytes((tmp_path / "full.wav").read_bytes()[:keep_bytes])
    return path


def _text_as_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file, not audio\n")
    return path


@pytest.mark.parametrize("make, reason", [
    pytest.param(_missing, "file not found", id="missing"),
    pytest.param(_zero_frames, "no audio frames", id="zero-frames"),
    # a 1 s 16-bit mono wav is a 44-byte header + 32000 data bytes
    pytest.param(lambda p: _cut_wav(p, 20), "not readable as audio", id="header-cut"),  # inside 'fmt '
    pytest.param(lambda p: _cut_wav(p, 1000), "truncated", id="data-cut"),  # 956 of 32000 data bytes
    pytest.param(_text_as_wav, "not readable as audio", id="text-file"),
    pytest.param(lambda p: p, "not readable as audio", id="directory"),
])
def test_bad_audio_raises_audio_error_naming_path(tmp_path, make, reason):
    """Every unusable file raises AudioError whose message has the path and the reason."""
    path = make(tmp_path)
    with pytest.raises(AudioError) as e:
        data.load_audio(path)
    assert str(path) in str(e.value) and reason in str(e.value)


def test_streamed_wav_with_placeholder_size_loads(tmp_path):
    """A WAV written by a streaming encoder (data size 0xFFFFFFFF, "unknown") is not taken as truncated."""
    x = sine(440, SAMPLE_RATE, seconds=1.0)
    sf.write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="PCM_16")
    raw = bytearray((tmp_path / "a.wav").read_bytes())
    size_at = raw.index(b"data") + 4  # the 4-byte size follows the chunk id
    raw[size_at : size_at + 4] = b"\xff\xff\xff\xff"
    (tmp_path / "streamed.wav").write_bytes(raw)
    np.testing.assert_allclose(data.load_audio(tmp_path / "streamed.wav"), x, atol=1 / 32768)


# -----------------------------------------------------------------------------
# question readers

AVQA_RECORD = {"id": 183, "video_name": "-HG3Omg_89c_000030", "question_text": "What happened in the video?",
               "multi_choice": ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment car"],
               "answer": 1, "question_type": "Happening", "audio_path": "wavs/-HG3Omg_89c_30.wav"}
MMAU_ITEM = {"id": "3fe6", "audio_id": "./test-mini-audios/3fe6.wav", "question": "Who speaks?",
             "choices": ["Man", "Woman", "Child", "Robot"], "answer": "Man", "task": "sound"}
PLAIN_RECORD = {"audio": "clips/dog.flac", "question": "Which animal?", "choices": ["dog", "cat"], "answer": "cat"}


def test_avqa_reader(tmp_path):
    """AVQA: index 1 -> second choice; as R1-AQA's plain str.replace, only lowercase "video" becomes
    "audio" (inside "videos" too) while "Video" and "VIDEO" stay; paths relative to the file's folder."""
    second = dict(AVQA_RECORD, question_text="Video shows what? The video is loud. VIDEO; videos.", answer=0)
    path = write_jsonl(tmp_path / "train.jsonl", [AVQA_RECORD, second])
    a, b = data.read_samples(path)
    assert a.question == "What happened in the audio?"
    assert b.question == "Video shows what? The audio is loud. VIDEO; audios."
    assert a.choices == AVQA_RECORD["multi_choice"]
    assert (a.answer, b.answer) == ("Yacht consignment", "motorboat")
    assert a.audio_path == str(tmp_path / "wavs" / "-HG3Omg_89c_30.wav")
    assert a.meta == AVQA_RECORD


def test_avqa_reader_with_audio_dir(tmp_path):
    """With audio_dir, relative paths go under it; absolute paths that do not exist fall back to audio_dir/<name>."""
    moved = dict(AVQA_RECORD, audio_path="/elsewhere/wavs/x.wav")
    path = write_jsonl(tmp_path / "train.jsonl", [AVQA_RECORD, moved])
    a, b = data.read_samples(path, audio_dir=tmp_path / "audio")
    assert a.audio_path == str(tmp_path / "audio" / "-HG3Omg_89c_30.wav")  # audio/wavs/... does not exist either
    assert b.audio_path == str(tmp_path / "audio" / "x.wav")


def test_mmau_reader_and_audio_dir_rule(tmp_path):
    """MMAU audio_id resolves next to the JSON, or under audio_dir as given if it exists there, else by bare name."""
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps([MMAU_ITEM]))
    [s] = data.read_samples(path)
    assert (s.question, s.choices, s.answer) == ("Who speaks?", ["Man", "Woman", "Child", "Robot"], "Man")
    assert s.audio_path == str(tmp_path / "test-mini-audios" / "3fe6.wav")
    # audio_dir = the folder holding the extracted test-mini-audios/ (the file exists there)
    extracted = tmp_path / "mmau" / "test-mini-audios"
    extracted.mkdir(parents=True)
    (extracted / "3fe6.wav").touch()
    assert data.read_samples(path, tmp_path / "mmau")[0].audio_path == str(extracted / "3fe6.wav")
    # audio_dir = test-mini-audios/ itself
    assert data.read_samples(path, extracted)[0].audio_path == str(extracted / "3fe6.wav")


def test_plain_reader(tmp_path):
    """The plain format keeps question, choices and answer string as written."""
    path = write_jsonl(tmp_path / "mine.jsonl", [PLAIN_RECORD])
    [s] = data.read_samples(path)
    assert (s.question, s.choices, s.answer) == ("Which animal?", ["dog", "cat"], "cat")
    assert s.audio_path == str(tmp_path / "clips" / "dog.flac")


def test_format_is_picked_from_content_not_name(tmp_path):
    """The reader depends on content: an MMAU list in a .jsonl file and AVQA lines in a .json file both load."""
    mmau = tmp_path / "x.jsonl"
    mmau.write_text("\n  " + json.dumps([MMAU_ITEM], indent=1))  # leading whitespace before "["
    avqa = write_jsonl(tmp_path / "y.json", [AVQA_RECORD])
    assert data.read_samples(mmau)[0].answer == "Man"
    assert data.read_samples(avqa)[0].answer == "Yacht consignment"


def test_duplicate_choices_are_accepted(tmp_path):
    """Real MMAU items repeat a choice string; that is not an error."""
    path = write_jsonl(tmp_path / "d.jsonl", [dict(PLAIN_RECORD, choices=["dog", "cat", "dog"])])
    assert data.read_samples(path)[0].choices == ["dog", "cat", "dog"]


def _drop(record, key):
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize("bad, problem", [
    ('{"question_text": "What happened in the video?", ', "bad JSON: Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    (_drop(AVQA_RECORD, "audio_path"), "missing field 'audio_path'"),
    (_drop(AVQA_RECORD, "multi_choice"), "missing field 'multi_choice'"),
    (dict(AVQA_RECORD, answer=4), "answer index 4 is out of range for 4 choices"),
    (dict(AVQA_RECORD, answer=-1), "answer index -1 is out of range"),
    (dict(AVQA_RECORD, answer="1"), "field 'answer' should be int, got str"),
    (dict(AVQA_RECORD, answer=True), "field 'answer' should be int, got bool"),
    (dict(AVQA_RECORD, multi_choice=["only one"], answer=0), "needs at least 2 choices, got 1"),
    (dict(AVQA_RECORD, multi_choice=["a", 2]), "should be a list of strings"),
])
def test_bad_avqa_record_names_file_and_line(tmp_path, bad, problem):
    """A bad record on line 3 (after a good line and a blank line) raises DataError "<file>:3: <problem>"."""
    path = write_jsonl(tmp_path / "avqa.jsonl", [AVQA_RECORD, "", bad])
    with pytest.raises(DataError) as e:
        data.read_samples(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert problem in str(e.value)


@pytest.mark.parametrize("bad, problem", [
    (dict(MMAU_ITEM, answer="Dog"), "answer 'Dog' is not one of the choices"),
    (dict(MMAU_ITEM, choices=["Man"], answer="Man"), "needs at least 2 choices, got 1"),
    (_drop(MMAU_ITEM, "audio_id"), "missing field 'audio_id'"),
    (_drop(MMAU_ITEM, "question"), "missing field 'question'"),
])
def test_bad_mmau_item_names_file_and_index(tmp_path, bad, problem):
    """A bad item at list index 1 raises DataError "<file>: item 1: <problem>"."""
    path = tmp_path / "mmau.json"
    path.write_text(json.dumps([MMAU_ITEM, bad], indent=2))
    with pytest.raises(DataError) as e:
        data.read_samples(path)
    assert str(e.value).startswith(f"{path}: item 1: ") and problem in str(e.value)


def test_broken_json_list_names_line(tmp_path):
    """A JSON list that does not parse reports the line of the syntax error (line 3: the missing comma)."""
    path = tmp_path / "mmau.json"
    path.write_text('[\n{"a": 1}\n{"b": 2}]\n')
    with pytest.raises(DataError, match=r":3: bad JSON"):
        data.read_samples(path)


def test_bad_plain_record(tmp_path):
    """Plain format: an answer missing from the choices is reported with file and line 1."""
    path = write_jsonl(tmp_path / "mine.jsonl", [dict(PLAIN_RECORD, answer="cow")])
    with pytest.raises(DataError, match=rf"^{path}:1: answer 'cow' is not one of the choices \['dog', 'cat'\]$"):
        data.read_samples(path)


def test_scan_collects_every_bad_record(tmp_path):
    """scan_samples keeps going: 2 good and 3 bad lines give 2 samples and errors for lines 2, 3, 5 in order."""
    lines = [PLAIN_RECORD, "not json", _drop(PLAIN_RECORD, "audio"), PLAIN_RECORD, dict(PLAIN_RECORD, choices=[])]
    path = write_jsonl(tmp_path / "mine.jsonl", lines)
    samples, errors = data.scan_samples(path)
    assert len(samples) == 2
    assert [str(e).split(": ")[0] for e in errors] == [f"{path}:2", f"{path}:3", f"{path}:5"]


def test_the_mmau_fixture_reads_as_mmau():
    """tests/fixtures/mmau-mini.json (20 invented questions in MMAU test-mini's schema, for the tests that
    need MMAU's shape) reads as MMAU: every field of a released item, each answer among its choices, all
    three tasks, the audio under test-mini-audios/ beside the file."""
    path = REPO / "tests" / "fixtures" / "mmau-mini.json"
    samples = data.read_samples(path)
    assert len(samples) == 20 and all(s.answer in s.choices and len(s.choices) >= 2 for s in samples)
    assert {s.meta["task"] for s in samples} == {"sound", "music", "speech"}
    fields = {"id", "audio_id", "question", "choices", "answer", "dataset", "task", "split", "category",
              "sub-category", "difficulty"}
    assert all(set(s.meta) == fields for s in samples)
    assert all(Path(s.audio_path) == path.parent / "test-mini-audios" / f"{s.meta['id']}.wav" for s in samples)


@pytest.mark.parametrize("name", ["mmau-test-mini.json", "mmau-test-mini-2025-03-25.json"])
def test_real_mmau_files_load(name):
    """Both released MMAU test-mini versions parse completely: 1000 samples, every answer among its choices."""
    path = MMAU_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not available (set MMAU_DIR)")
    samples = data.read_samples(path)
    assert len(samples) == 1000
    assert all(s.answer in s.choices and len(s.choices) >= 2 for s in samples)
    assert {s.meta["task"] for s in samples} == {"sound", "music", "speech"}


# -----------------------------------------------------------------------------
# MMAR, MMSU and test sets whose answers are withheld

# MMAR-meta.json's fields (a JSON list): the answer is the text, not always exactly one of the choices.
MMAR_ITEMS = [
    {"id": "aaaaaaaaaaa_00-00-00_00-00-20", "audio_path": "./audio/aaaaaaaaaaa_00-00-00_00-00-20.wav",
     "question": "Which instrument plays the melody?", "choices": ["Violin", "Flute", "Piano", "Trumpet"],
     "answer": "Flute", "modality": "music", "category": "Perception Layer", "sub-category": "Instrument",
     "language": "None", "source": "youtube", "url": "https://www.youtube.com/watch?v=aaaaaaaaaaa",
     "timestamp": "00:00:00,00:00:20"},
    {"id": "bbbbbbbbbbb_00-01-00_00-01-12", "audio_path": "./audio/bbbbbbbbbbb_00-01-00_00-01-12.wav",
     "question": "Where are they?", "choices": ["On a plane", "On a ship"], "answer": "on a ship.",
     "modality": "mix-sound-speech", "category": "Semantic Layer", "language": "en", "source": "youtube",
     "url": "https://www.youtube.com/watch?v=bbbbbbbbbbb", "timestamp": "00:01:00,00:01:12"},
]
# MMSU's fields (ddwang2000/MMSU): the choices are fields, 2-choice items leave choice_c/d null, and the
# answer_gt is the text of the correct choice. "None" is a real choice string.
MMSU_ITEMS = [
    {"id": "emotion_0001", "audio_path": "audio/emotion_0001.wav", "question": "What is the speaker's emotion?",
     "choice_a": "Happy", "choice_b": "Sad", "choice_c": "Angry", "choice_d": "None", "answer_gt": "None",
     "task_name": "emotion_recognition", "category": "Perception", "sub-category": "Paralinguistics",
     "sub-sub-category": "Speaking Style", "linguistics_sub_discipline": "None"},
    {"id": "stress_0002", "audio_path": "audio/stress_0002.wav", "question": "Is the stress on the first syllable?",
     "choice_a": "Yes", "choice_b": "No", "choice_c": None, "choice_d": None, "answer_gt": "No",
     "task_name": "stress_detection", "category": "Reasoning", "sub-category": "Linguistics",
     "sub-sub-category": "Phonology", "linguistics_sub_discipline": "Phonetics"},
]


def test_mmar_reader(tmp_path):
    """MMAR-meta.json: audio_path relative to the file, choices and answer as written; an answer that is not
    exactly a choice ("on a ship." for "On a ship") is kept for the official string match; the record is meta."""
    path = tmp_path / "MMAR-meta.json"
    path.write_text(json.dumps(MMAR_ITEMS, indent=4))
    a, b = data.read_samples(path)
    assert (a.question, a.choices, a.answer) == ("Which instrument plays the melody?",
                                                 ["Violin", "Flute", "Piano", "Trumpet"], "Flute")
    assert a.audio_path == str(tmp_path / "audio" / "aaaaaaaaaaa_00-00-00_00-00-20.wav")
    assert (b.choices, b.answer) == (["On a plane", "On a ship"], "on a ship.")
    assert (a.meta, b.meta) == (MMAR_ITEMS[0], MMAR_ITEMS[1])
    # the same records as JSONL read the same way
    lines = write_jsonl(tmp_path / "MMAR-meta.jsonl", MMAR_ITEMS)
    assert [s.answer for s in data.read_samples(lines)] == ["Flute", "on a ship."]


def test_mmsu_reader(tmp_path):
    """MMSU: choices from choice_a .. choice_d in order, null ones left out (2 choices for the second item);
    the answer is answer_gt; JSON list (the official inference script's input) and JSONL read the same."""
    for path in (tmp_path / "mmsu.json", tmp_path / "mmsu.jsonl"):
        if path.suffix == ".json":
            path.write_text(json.dumps(MMSU_ITEMS))
        else:
            write_jsonl(path, MMSU_ITEMS)
        a, b = data.read_samples(path)
        assert (a.choices, a.answer) == (["Happy", "Sad", "Angry", "None"], "None")
        assert (b.choices, b.answer) == (["Yes", "No"], "No")
        assert a.question == "What is the speaker's emotion?"
        assert a.audio_path == str(tmp_path / "audio" / "emotion_0001.wav")
        assert (a.meta, b.meta) == (MMSU_ITEMS[0], MMSU_ITEMS[1])


def test_record_format_picks_the_reader():
    """The first record decides: choice_a -> MMSU, modality with audio_path -> MMAR, else the container."""
    assert data.record_format(MMSU_ITEMS[0], listed=False) == "mmsu"
    assert data.record_format(MMAR_ITEMS[0], listed=True) == "mmar"
    assert data.record_format(MMAU_ITEM, listed=True) == "mmau"
    assert data.record_format(AVQA_RECORD, listed=False) == "avqa"
    assert data.record_format(dict(PLAIN_RECORD, modality="speech"), listed=False) == "plain"  # no audio_path


@pytest.mark.parametrize("bad, problem", [
    (dict(MMSU_ITEMS[1], choice_c=None, choice_d="Maybe"),
     "field 'choice_d' is given but the choice before it is empty"),
    (dict(MMSU_ITEMS[1], choice_b="  "), "missing field 'choice_b'"),
    (dict(MMSU_ITEMS[1], answer_gt="Perhaps"), "answer_gt 'Perhaps' is not one of the choices ['Yes', 'No']"),
    (dict(MMSU_ITEMS[1], choice_a=1), "field 'choice_a' should be str, got int"),
    (_drop(MMSU_ITEMS[1], "audio_path"), "missing field 'audio_path'"),
])
def test_bad_mmsu_record_names_file_and_line(tmp_path, bad, problem):
    """A bad MMSU record on line 2 raises DataError "<file>:2: <problem>"."""
    path = write_jsonl(tmp_path / "mmsu.jsonl", [MMSU_ITEMS[0], bad])
    with pytest.raises(DataError) as e:
        data.read_samples(path)
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value)


@pytest.mark.parametrize("bad, problem", [
    (_drop(MMAR_ITEMS[0], "category"), "missing field 'category'"),
    (dict(MMAR_ITEMS[0], choices=["Flute"]), "needs at least 2 choices, got 1"),
])
def test_bad_mmar_item_names_file_and_index(tmp_path, bad, problem):
    """MMAR's grouping fields are required (its evaluation.py reads them): item 1 is named."""
    path = tmp_path / "MMAR-meta.json"
    path.write_text(json.dumps([MMAR_ITEMS[0], bad]))
    with pytest.raises(DataError) as e:
        data.read_samples(path)
    assert str(e.value).startswith(f"{path}: item 1: ") and problem in str(e.value)


# MMAU's test split: the test-mini format with an empty answer.
MMAU_TEST_ITEM = dict(MMAU_ITEM, id="9a1c", audio_id="./test-audios/9a1c.wav", answer="", split="test")


@pytest.mark.parametrize("withheld", [MMAU_TEST_ITEM, dict(MMAU_TEST_ITEM, answer=None),
                                     _drop(MMAU_TEST_ITEM, "answer")])
def test_withheld_answers_are_refused_unless_allowed(tmp_path, withheld):
    """An empty, null or missing answer is refused by default (training reads this way), naming the item;
    with allow_unanswered (evaluation) the sample has answer None and the other fields as usual."""
    path = tmp_path / "mmau-test.json"
    path.write_text(json.dumps([MMAU_ITEM, withheld]))
    with pytest.raises(DataError) as e:
        data.read_samples(path)
    assert str(e.value).startswith(f"{path}: item 1: no answer ('answer' is missing or empty)")
    a, b = data.read_samples(path, allow_unanswered=True)
    assert (a.answer, b.answer, b.choices, b.meta) == ("Man", None, MMAU_ITEM["choices"], withheld)


def test_withheld_answers_in_every_string_format(tmp_path):
    """MMSU (answer_gt), MMAR and plain read a withheld answer as None when allowed, and refuse it otherwise;
    AVQA, training data with an index answer, always requires it."""
    mmsu = write_jsonl(tmp_path / "mmsu.jsonl", [dict(MMSU_ITEMS[0], answer_gt=None)])
    mmar = write_jsonl(tmp_path / "mmar.jsonl", [_drop(MMAR_ITEMS[0], "answer")])
    plain = write_jsonl(tmp_path / "plain.jsonl", [dict(PLAIN_RECORD, answer="")])
    for path, key in ((mmsu, "answer_gt"), (mmar, "answer"), (plain, "answer")):
        assert data.read_samples(path, allow_unanswered=True)[0].answer is None
        with pytest.raises(DataError, match=f"no answer \\('{key}' is missing or empty\\)"):
            data.read_samples(path)
    avqa = write_jsonl(tmp_path / "avqa.jsonl", [_drop(AVQA_RECORD, "answer")])
    with pytest.raises(DataError, match="missing field 'answer'"):
        data.read_samples(avqa, allow_unanswered=True)


def test_checker_reports_withheld_and_outside_answers(tmp_path, capsys):
    """The checker reads a test set whose answers are withheld (not an error) and counts, apart, answers
    that are not one of the choices (MMAR)."""
    test = tmp_path / "mmau-test.json"
    test.write_text(json.dumps([MMAU_TEST_ITEM, dict(MMAU_TEST_ITEM, id="9a1d")]))
    data.check_file(test)
    assert "answers withheld: 2 (can be evaluated, not trained on)" in capsys.readouterr().out
    mmar = tmp_path / "MMAR-meta.json"
    mmar.write_text(json.dumps(MMAR_ITEMS))
    data.check_file(mmar)
    out = capsys.readouterr().out
    assert "answers that are not one of the choices: 1" in out and "by modality: mix-sound-speech 1, music 1" in out


# -----------------------------------------------------------------------------
# prompt

def test_build_prompt_matches_recipe():
    """The user text is the recipe's, character for character, with choices as str(list); the direct
    prompt is the answer prompt without its last sentence."""
    q = "Based on the given audio, identify the source of the speaking voice."
    choices = ["Man", "Woman", "Child", "Robot"]
    assert data.build_prompt(q, choices) == (
        "Based on the given audio, identify the source of the speaking voice. Please choose the answer from the "
        "following options: ['Man', 'Woman', 'Child', 'Robot']. Output the final answer in <answer> </answer>.")
    assert data.build_prompt(q, choices, "think") == (
        "Based on the given audio, identify the source of the speaking voice. Please choose the answer from the "
        "following options: ['Man', 'Woman', 'Child', 'Robot']. "
        "Output the thinking process in <think> </think> and final answer in <answer> </answer>.")
    assert data.build_prompt(q, choices, "direct") == (
        "Based on the given audio, identify the source of the speaking voice. Please choose the answer from the "
        "following options: ['Man', 'Woman', 'Child', 'Robot'].")
    with pytest.raises(ValueError, match="unknown prompt 'cot'"):
        data.build_prompt(q, choices, "cot")
    # Ke-Omni-R's think prompt asks for a short reasoning; a word limit leaves the other prompts alone
    assert data.build_prompt(q, choices, "think", think_words=50).endswith(
        "['Man', 'Woman', 'Child', 'Robot']. Output the thinking process (less than 50 words) in <think> </think> "
        "and final answer in <answer> </answer>.")
    assert data.build_prompt(q, choices, "answer", think_words=50) == data.build_prompt(q, choices)


# -----------------------------------------------------------------------------
# which questions each step sees

def test_balanced_order_interleaves_answers():
    """Balanced: each window of 4 consecutive samples holds each of the 4 answers once; a permutation either way."""
    answers = ["a", "b", "c", "d"] * 10
    order = data.epoch_order(answers, epoch=0, seed=0, balance=True)
    assert sorted(order) == list(range(40))
    for w in range(0, 40, 4):
        assert sorted(answers[i] for i in order[w:w + 4]) == ["a", "b", "c", "d"]
    assert sorted(data.epoch_order(answers, 0, 0, balance=False)) == list(range(40))


def test_step_indices_run_through_epochs():
    """Steps tile an endless run of epochs: 10 samples, 4 per step -> steps 0..4 cover two epochs exactly."""
    answers = list("abcdeabcde")
    steps = [data.step_indices(s, 4, answers, seed=3) for s in range(5)]
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert data.step_indices(2, 4, answers, seed=3) == steps[2]  # depends only on (seed, step)


# -----------------------------------------------------------------------------
# data checker

def test_checker_lists_every_problem_and_fails(tmp_path):
    """One bad record and one missing wav: exit code 1 and both are listed, with their counts."""
    sf.write(tmp_path / "ok.wav", np.zeros(SAMPLE_RATE), SAMPLE_RATE)
    lines = [dict(PLAIN_RECORD, audio="ok.wav"), dict(PLAIN_RECORD, audio="gone.wav"), dict(PLAIN_RECORD, answer="cow")]
    path = write_jsonl(tmp_path / "mine.jsonl", lines)
    run = subprocess.run([sys.executable, str(REPO / "data.py"), str(path)], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert f"{path}:3: answer 'cow' is not one of the choices" in run.stdout
    assert f"{tmp_path / 'gone.wav'}: file not found" in run.stdout
    assert "3 records, 2 good, 1 bad" in run.stdout
    assert "audio files: 2, 1 readable, 1 missing or unreadable" in run.stdout


def test_checker_passes_a_good_file(tmp_path, capsys):
    """All good: exit 0, breakdown by category, durations 1 s and 31 s (8 kHz files), one clip over 30 s."""
    sf.write(tmp_path / "short.wav", np.zeros(8000), 8000)
    sf.write(tmp_path / "long.wav", np.zeros(31 * 8000), 8000)
    lines = [dict(PLAIN_RECORD, audio="short.wav", category="animals"),
             dict(PLAIN_RECORD, audio="long.wav", category="animals"),
             dict(PLAIN_RECORD, audio="short.wav", category="pets")]
    path = write_jsonl(tmp_path / "mine.jsonl", lines)
    assert data.main([str(path), "--audio-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "by category: animals 2, pets 1" in out
    # 2 distinct files of 1 s and 31 s: median = mean = 16 s
    assert "durations (s): min 1.00, median 16.00, mean 16.00, max 31.00" in out
    assert "longer than 30 s (the model hears only the first 30 s): 1" in out
    assert out.rstrip().endswith("OK")


# -----------------------------------------------------------------------------
# files that cannot be used: one line naming the path, before any work

def _no_file(tmp_path):
    return tmp_path / "no" / "file.jsonl"


def _latin1(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "caf\xe9"}\n')  # 0xe9 is "e acute" in Latin-1, invalid alone in UTF-8
    return path


def _text(name, content):
    def make(tmp_path):
        (tmp_path / name).write_text(content)
        return tmp_path / name
    return make


@pytest.mark.parametrize("make, problem", [
    pytest.param(_no_file, "file not found", id="missing"),
    pytest.param(lambda p: p, "is a folder", id="folder"),
    pytest.param(_latin1, "not UTF-8 text (byte 0xe9 at offset 17)", id="not-utf8"),  # 17 = len('{"question": "caf')
    pytest.param(_text("empty.jsonl", ""), "empty file, no records", id="empty"),
    pytest.param(_text("blank.jsonl", "\n  \n\n"), "empty file, no records", id="blank-lines"),
    pytest.param(_text("list.json", " [ ]\n"), "an empty JSON list, no records", id="empty-list"),
    pytest.param(_text("train_qa.json", json.dumps([_drop(AVQA_RECORD, "audio_path")])),
                 "AVQA's own QA file, which has no audio paths; convert it first with python data.py --from-avqa",
                 id="raw-avqa"),
])
def test_unusable_file_is_one_line_error(tmp_path, capsys, make, problem):
    """read_samples and scan_samples raise DataError "<path>: <problem>" (one line); the checker prints
    "error: <path>: <problem>" as the only line on stderr, nothing on stdout, and exits 2."""
    path = make(tmp_path)
    for read in (data.read_samples, data.scan_samples):
        with pytest.raises(DataError) as e:
            read(path)
        assert str(e.value).startswith(f"{path}: ") and problem in str(e.value) and "\n" not in str(e.value)
    assert data.main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {e.value}\n"


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    """A UTF-8 file that starts with a byte-order mark (as some editors save it) reads like one without."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PLAIN_RECORD).encode() + b"\n")
    assert data.read_samples(path)[0].answer == "cat"


@pytest.mark.parametrize("kind, problem", [("missing", "no such folder"), ("file", "not a folder")])
def test_checker_refuses_bad_audio_dir(tmp_path, capsys, kind, problem):
    """--audio-dir that is missing or a file: exit 2, "error: --audio-dir <dir>: <problem>" alone on stderr."""
    path = write_jsonl(tmp_path / "mine.jsonl", [PLAIN_RECORD])
    audio_dir = tmp_path / "clips"
    if kind == "file":
        audio_dir.write_text("")
    assert data.main([str(path), "--audio-dir", str(audio_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: --audio-dir {audio_dir}: {problem}\n"


def test_script_missing_file_exits_2_without_traceback(tmp_path):
    """`python data.py /no/file.jsonl` as a script: exit 2 and one line on stderr, no traceback."""
    path = _no_file(tmp_path)
    run = subprocess.run([sys.executable, str(REPO / "data.py"), str(path)], capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (2, "", f"error: {path}: file not found\n")


def test_usage_errors_exit_2(tmp_path):
    """argparse refuses: nothing to do, --out without --from-avqa, --from-avqa without --out or --audio-dir."""
    for argv in ([], ["f.jsonl", "--out", "o.jsonl"], ["f.jsonl", "--overwrite"],
                 ["--from-avqa", "qa.json", "--out", "o.jsonl"], ["--from-avqa", "qa.json", "--audio-dir", "."]):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2, argv


def test_audio_dir_dot_resolves_like_r1_aqa(tmp_path, monkeypatch):
    """R1-AQA opens audio_path as written, so a relative path is relative to the working directory;
    here it is relative to the data file's folder, and `--audio-dir .` gives R1-AQA's behaviour:
    data/train.jsonl naming wavs/a.wav finds ./wavs/a.wav instead of data/wavs/a.wav."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "a.wav", np.zeros(SAMPLE_RATE), SAMPLE_RATE)
    (tmp_path / "data").mkdir()
    absolute = str(tmp_path / "wavs" / "a.wav")
    path = write_jsonl(tmp_path / "data" / "train.jsonl",
                       [dict(AVQA_RECORD, audio_path="wavs/a.wav"), dict(AVQA_RECORD, audio_path=absolute)])
    assert [s.audio_path for s in data.read_samples(path)] == [str(tmp_path / "data" / "wavs" / "a.wav"), absolute]
    assert [s.audio_path for s in data.read_samples(path, audio_dir=".")] == ["wavs/a.wav", absolute]
    assert data.main([str(path), "--audio-dir", "."]) == 0  # the clip is found and reads
