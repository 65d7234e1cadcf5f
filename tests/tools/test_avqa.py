"""tools/avqa.py, AVQA's preparation as `python data.py --from-avqa train_qa.json --audio-dir CLIPS --out
avqa_train.jsonl` runs it: clip names, what is kept and dropped and why, never overwriting, atomic writes."""

import json

import numpy as np
import pytest
import soundfile as sf

import data
from data import SAMPLE_RATE
from test_data import _drop, _no_file, _text, write_jsonl
from tools import avqa


AVQA_QA = {"id": 183, "video_name": "-HG3Omg_89c_000030", "video_id": 341, "question_text": "What happened in the video?",
           "multi_choice": ["motorboat", "Yacht consignment", "Sailboat set sail", "Consignment car"], "answer": 1,
           "question_relation": "View", "question_type": "Happening"}  # a record of AVQA's train_qa.json


def test_avqa_clip_stems():
    """A clip is looked for by its video_name and by YouTube id + start seconds without zero padding."""
    assert avqa.avqa_clip_stems("-HG3Omg_89c_000030") == ["-HG3Omg_89c_000030", "-HG3Omg_89c_30"]
    assert avqa.avqa_clip_stems("a_b-c_d_000000") == ["a_b-c_d_000000", "a_b-c_d_0"]  # ids may hold "_"
    assert avqa.avqa_clip_stems("abc_30") == ["abc_30"]  # already unpadded: one name
    assert avqa.avqa_clip_stems("nostart") == ["nostart"]


@pytest.fixture
def avqa_files(tmp_path):
    """AVQA's format: 3 good records (2 on one wav named by video_name, 1 on a flac named id_start),
    4 with no clip in the folder itself, 1 with an unreadable clip, 2 malformed: 10 records, 3 to keep."""
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(clips / "-HG3Omg_89c_000030.wav", np.zeros(SAMPLE_RATE), SAMPLE_RATE)
    sf.write(clips / "bbbbbbbbbbb_7.flac", np.zeros(2 * 8000), 8000)
    (clips / "ccccccccccc_000000.wav").write_text("not audio")
    (clips / "ddddddddddd_000001.mp4").write_bytes(b"")  # a video: not an audio extension, so not a clip
    (clips / "sub").mkdir()
    sf.write(clips / "sub" / "eeeeeeeeeee_000001.wav", np.zeros(8000), 8000)  # subfolders are not searched
    good = [AVQA_QA, dict(AVQA_QA, id=184, question_text="Which video is it?", answer=3),
            dict(AVQA_QA, id=5, video_name="bbbbbbbbbbb_000007", answer=0)]
    missing = [dict(AVQA_QA, id=10 + i, video_name=f"{c * 11}_000001") for i, c in enumerate("defd")]
    unreadable = [dict(AVQA_QA, id=20, video_name="ccccccccccc_000000")]
    malformed = [_drop(AVQA_QA, "video_name"), dict(AVQA_QA, answer=4)]
    records = [good[0], missing[0], malformed[0], good[1], unreadable[0], missing[1], good[2], malformed[1],
               missing[2], missing[3]]
    qa = tmp_path / "train_qa.json"
    qa.write_text(json.dumps(records, indent=1))
    return qa, clips, good


def test_from_avqa_writes_r1_aqa_jsonl(tmp_path, capsys, avqa_files):
    """The good records come out in order as AVQA's fields plus dataset_name and the clip's absolute
    audio_path, answer still the index; read_samples reads them back; every drop is counted by reason."""
    qa, clips, good = avqa_files
    out = tmp_path / "avqa_train.jsonl"
    assert data.main(["--from-avqa", str(qa), "--audio-dir", str(clips), "--out", str(out)]) == 0
    wavs = [clips / "-HG3Omg_89c_000030.wav"] * 2 + [clips / "bbbbbbbbbbb_7.flac"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [dict(r, dataset_name="AVQA", audio_path=str(w.resolve())) for r, w in zip(good, wavs)]
    assert list(records[0]) == list(AVQA_QA) + ["dataset_name", "audio_path"]
    samples = data.read_samples(out)
    assert [(s.question, s.answer) for s in samples] == [
        ("What happened in the audio?", "Yacht consignment"), ("Which audio is it?", "Consignment car"),
        ("What happened in the audio?", "motorboat")]
    assert len(data.load_audio(samples[2].audio_path)) == 2 * SAMPLE_RATE  # 2 s at 8 kHz, resampled
    stdout = capsys.readouterr().out
    assert f"{qa}: 10 records, 3 kept, 7 dropped" in stdout
    assert f"dropped, malformed record: 2\n  {qa}: item 2: missing field 'video_name'\n" \
           f"  {qa}: item 7: answer index 4 is out of range for 4 choices\n" in stdout
    # 4 missing: the first 3 are shown
    assert f"dropped, missing audio: 4\n  {qa}: item 1: no audio file ddddddddddd_000001.* or ddddddddddd_1.* " \
           f"in {clips}\n" in stdout and "  ... and 1 more\n" in stdout
    assert f"dropped, unreadable audio: 1\n  {qa}: item 4: {clips / 'ccccccccccc_000000.wav'}: not readable" in stdout
    assert stdout.endswith(f"wrote {out} (3 records)\n")


def test_from_avqa_never_overwrites_silently(tmp_path, capsys, avqa_files):
    """An existing --out is refused before any work (exit 2, one line, file untouched); --overwrite
    replaces it; no temporary file is left."""
    qa, clips, _ = avqa_files
    out = tmp_path / "avqa_train.jsonl"
    out.write_text("finished work\n")
    argv = ["--from-avqa", str(qa), "--audio-dir", str(clips), "--out", str(out)]
    assert data.main(argv) == 2
    assert capsys.readouterr() == ("", f"error: {out}: already exists; pass --overwrite to replace it\n")
    assert out.read_text() == "finished work\n"
    assert data.main(argv + ["--overwrite"]) == 0
    assert len(data.read_samples(out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avqa_train.jsonl", "clips", "train_qa.json"]


def test_write_jsonl_is_atomic(tmp_path):
    """A write that fails halfway (the second record is not JSON-serialisable) leaves the existing file
    as it was and no temporary file."""
    out = write_jsonl(tmp_path / "out.jsonl", ["finished work"])
    with pytest.raises(TypeError, match="not JSON serializable"):
        avqa.write_jsonl(out, [{"a": 1}, {"b": object()}], overwrite=True)
    assert out.read_text() == "finished work\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_from_avqa_with_no_readable_clip_writes_nothing(tmp_path, capsys, avqa_files):
    """If no record has a readable clip: exit 1, the drops listed, and no --out file."""
    qa, _, _ = avqa_files
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.jsonl"
    assert data.main(["--from-avqa", str(qa), "--audio-dir", str(empty), "--out", str(out)]) == 1
    stdout = capsys.readouterr().out
    assert "10 records, 0 kept, 10 dropped" in stdout and "dropped, missing audio: 8" in stdout
    assert stdout.endswith(f"FAILED: no record has a readable clip in {empty}; {out} not written\n")
    assert not out.exists()


@pytest.mark.parametrize("make, problem", [
    pytest.param(_no_file, "file not found", id="missing"),
    pytest.param(_text("qa.jsonl", json.dumps(AVQA_QA) + "\n"), "not AVQA's QA format (a JSON list", id="jsonl"),
    pytest.param(_text("qa.json", "[]"), "an empty JSON list, no records", id="empty-list"),
    pytest.param(_text("qa.json", '[{"id": 1}\n{"id": 2}]'), ":2: bad JSON", id="bad-json"),
])
def test_from_avqa_unusable_qa_file(tmp_path, capsys, make, problem):
    """A QA file that is missing, JSONL instead of AVQA's JSON list, empty, or broken JSON: exit 2 and one line."""
    qa = make(tmp_path)
    assert data.main(["--from-avqa", str(qa), "--audio-dir", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {qa}") and problem in err and err.count("\n") == 1
    assert not (tmp_path / "o.jsonl").exists()
