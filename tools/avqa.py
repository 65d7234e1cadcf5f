"""AVQA preparation: AVQA's own QA file (train_qa.json / val_qa.json) -> R1-AQA's JSONL, for the clips you have.

Each record keeps AVQA's fields (answer stays the index) and gains dataset_name "AVQA" and audio_path, the
clip found in the audio folder under its video_name or YouTube id + start seconds (as R1-AQA named its
wavs). Records that are malformed, whose clip is missing or whose clip does not read are dropped, each
counted under its reason. The output is written atomically. `python data.py --from-avqa` runs it;
docs/data.md gives the whole preparation, the ffmpeg step included.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from data import AudioError, DataError, audio_duration, avqa_question, get_field, read_text

DROP_REASONS = ("malformed record", "missing audio", "unreadable audio")


@dataclass
class AvqaConversion:
    total: int  # records in the AVQA file
    records: list[dict]  # the kept ones as R1-AQA JSONL records, in the file's order
    dropped: dict[str, list[str]]  # reason (DROP_REASONS) -> one message per dropped record


def avqa_clip_stems(video_name: str) -> list[str]:
    """The file names (without extension) an AVQA clip may have: its video_name, the VGGSound
    clip's name ("-HG3Omg_89c_000030"), and YouTube id + start seconds, as R1-AQA's file named
    its wavs ("-HG3Omg_89c_30")."""
    ytid, _, start = video_name.rpartition("_")
    short = f"{ytid}_{int(start)}" if ytid and start.isdigit() else video_name
    return list(dict.fromkeys([video_name, short]))


def _index_clips(audio_dir: Path) -> dict[str, Path]:
    """The audio files directly in audio_dir (any extension libsndfile reads) by name without extension;
    of two files with one name (a.flac, a.wav) the first in sorted order."""
    extensions = {name.lower() for name in sf.available_formats()}  # wav, flac, ogg, aiff, ...
    index = {}
    for path in sorted(audio_dir.iterdir()):
        if path.suffix[1:].lower() in extensions and path.is_file():
            index.setdefault(path.stem, path)
    return index


def _read_avqa_list(qa_file: Path) -> list:
    """The records of AVQA's QA file (a JSON list); DataError if the file is not one."""
    text = read_text(qa_file)
    if not text.lstrip().startswith("["):
        raise DataError(f"{qa_file}: not AVQA's QA format (a JSON list of records, as train_qa.json)")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{qa_file}:{e.lineno}: bad JSON: {e.msg} at column {e.colno}") from None
    if not items:
        raise DataError(f"{qa_file}: an empty JSON list, no records")
    return items


def convert_avqa(qa_file, audio_dir) -> AvqaConversion:
    """
    AVQA's QA records -> R1-AQA's JSONL records: AVQA's fields (answer stays the index) plus
    dataset_name "AVQA" and audio_path, the absolute path of the clip found in audio_dir under
    either name of avqa_clip_stems. Records that are malformed, whose clip is missing, or whose
    clip's header does not read are dropped, each with a message under its reason.
    """
    qa_file, audio_dir = Path(qa_file), Path(audio_dir)
    items, index = _read_avqa_list(qa_file), _index_clips(audio_dir)
    out = AvqaConversion(len(items), [], {reason: [] for reason in DROP_REASONS})
    problems = {}  # clip -> its AudioError message or "": a clip may serve several questions
    for i, item in enumerate(items):
        where = f"{qa_file}: item {i}"
        try:
            stems = _avqa_item_stems(item, where)
        except DataError as e:
            out.dropped["malformed record"].append(str(e))
            continue
        clip = next((index[stem] for stem in stems if stem in index), None)
        if clip is None:
            names = " or ".join(f"{stem}.*" for stem in stems)
            out.dropped["missing audio"].append(f"{where}: no audio file {names} in {audio_dir}")
            continue
        if clip not in problems:
            problems[clip] = _audio_problem(clip)
        if problems[clip]:
            out.dropped["unreadable audio"].append(f"{where}: {problems[clip]}")
            continue
        out.records.append(dict(item, dataset_name="AVQA", audio_path=str(clip.resolve())))
    return out


def _avqa_item_stems(item, where: str) -> list[str]:
    """The clip names of a well-formed AVQA record; DataError naming the item if it is malformed."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: record is not a JSON object")
    avqa_question(item, where)
    return avqa_clip_stems(get_field(item, "video_name", str, where))


def _audio_problem(path: Path) -> str:
    """"" if the file's header reads as audio with frames, else the AudioError's message."""
    try:
        audio_duration(path)
    except AudioError as e:
        return str(e)
    return ""


def check_new_file(path, overwrite: bool) -> None:
    """DataError "{path}: ..." unless path can be written: its folder exists and, without overwrite, it does not."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise DataError(f"{path}: its folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise DataError(f"{path}: already exists; pass --overwrite to replace it")


def write_jsonl(path, records: list[dict], overwrite: bool = False) -> None:
    """Write records one JSON object a line, atomically: .{name}.tmp in the same folder, then a rename."""
    path = Path(path)
    check_new_file(path, overwrite)  # again: the file may have appeared while the records were made
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # only left if something failed before the rename


def print_conversion(qa_file, conversion: AvqaConversion, examples: int = 3) -> None:
    """How many records were kept and, per reason, how many were dropped with the first few messages."""
    kept, total = len(conversion.records), conversion.total
    print(f"{qa_file}: {total} records, {kept} kept, {total - kept} dropped")
    for reason, messages in conversion.dropped.items():
        if messages:
            print(f"dropped, {reason}: {len(messages)}")
            for message in messages[:examples]:
                print(f"  {message}")
            if len(messages) > examples:
                print(f"  ... and {len(messages) - examples} more")



def prepare_avqa(qa_file, audio_dir, out, overwrite: bool = False) -> int:
    """--from-avqa: write R1-AQA's JSONL for the AVQA records whose clip is readable; 0, or 1 if none is."""
    check_new_file(out, overwrite)  # before the work, not after it
    conversion = convert_avqa(qa_file, audio_dir)
    print_conversion(qa_file, conversion)
    if not conversion.records:
        print(f"FAILED: no record has a readable clip in {audio_dir}; {out} not written")
        return 1
    write_jsonl(out, conversion.records, overwrite)
    print(f"wrote {out} ({len(conversion.records)} records)")
    return 0
