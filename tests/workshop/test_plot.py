"""workshop/plot.py: the SVG's drawn points, read back through each panel's transform, are the metrics."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from workshop import plot

ROOT = Path(__file__).resolve().parents[2]
NS = "{http://www.w3.org/2000/svg}"
GRPO_KEYS = ["reward", "accuracy", "format", "kl", "completion_len", "frac_zero_std", "eval_accuracy"]


def grpo_rows(steps=12, eval_every=5, shift=0.0):
    """Distinct, irregular values per step, as train.py logs them; held-out scores every eval_every."""
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "reward": 1.1 + 0.07 * s + shift, "accuracy": min(1.0, 0.05 * s + shift),
               "format": 0.5 + 0.04 * (s % 5), "completion_len": 40.0 - 1.5 * s, "frac_zero_std": (s % 3) / 4,
               "kl": 0.0 if s == 1 else 0.003 * s ** 1.5, "clip_frac": 0.0, "grad_norm": 0.5, "lr": 1e-3,
               "seconds": 1.2, "prompts_sampled": 32, "groups_dropped": 0, "bad_samples": 0}
        if s % eval_every == 0:
            row.update(eval_accuracy=0.25 + 0.06 * s, eval_format=1.0, eval_questions=16, eval_groups={"a=b": 0.5})
        rows.append(row)
    return rows


def write_run(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def panels(svg):
    """{key: (transform, [series elements])} in drawing order."""
    out = {}
    for g in ET.parse(svg).getroot().iter(f"{NS}g"):
        if g.get("class") == "panel":
            out[g.get("data-key")] = (tuple(map(float, g.get("data-transform").split())),
                                      [e for e in g if e.get("class") == "series"])
    return out


def drawn(element, t):
    """The (step, value) pairs an element draws, mapped back through the panel's transform."""
    sx, ox, sy, oy = t
    if element.tag == f"{NS}circle":
        pixels = [(float(element.get("cx")), float(element.get("cy")))]
    else:
        pixels = [tuple(map(float, p.split(","))) for p in element.get("points").split()]
    return [((px - ox) / sx, (py - oy) / sy) for px, py in pixels]


def assert_is_series(element, t, expected):
    """Coordinates are written with 2 decimals: at most 0.005 px off, i.e. 0.005 / |s| in data units."""
    got = drawn(element, t)
    assert len(got) == len(expected)
    for (s, v), (es, ev) in zip(got, expected):
        assert s == pytest.approx(es, abs=0.0051 / abs(t[0]))
        assert v == pytest.approx(ev, abs=0.0051 / abs(t[2]))


def test_points_are_the_metrics(tmp_path):
    """Every panel of a GRPO run draws exactly its key's values against the step, in logged order;
    held-out accuracy appears as one marker per scored step (5 and 10 of 12), and only there."""
    rows = grpo_rows()
    out = plot.write_curves(write_run(tmp_path / "run", rows))
    assert out == tmp_path / "run" / "curves.svg"
    found = panels(out)
    assert list(found) == GRPO_KEYS
    for key, (t, elements) in found.items():
        expected = [(r["step"], r[key]) for r in rows if key in r]
        if key == "eval_accuracy":
            assert [e.tag for e in elements] == [f"{NS}circle"] * 2  # steps 5 and 10
            assert_is_series(elements[0], t, expected[:1])
            assert_is_series(elements[1], t, expected[1:])
        else:
            assert [e.tag for e in elements] == [f"{NS}polyline"]
            assert_is_series(elements[0], t, expected)


def test_axis_labels_are_true(tmp_path):
    """Every tick label sits at the pixel its value maps to; accuracy-like panels span exactly 0..1; the
    others' ticks enclose their data, so every point lies inside its plot area."""
    out = plot.write_curves(write_run(tmp_path / "run", grpo_rows()))
    for g in ET.parse(out).getroot().iter(f"{NS}g"):
        if g.get("class") != "panel":
            continue
        sx, ox, sy, oy = map(float, g.get("data-transform").split())
        yticks = [(float(e.text), float(e.get("y"))) for e in g if e.get("class") == "ytick"]
        xticks = [(float(e.text), float(e.get("x"))) for e in g if e.get("class") == "xtick"]
        assert [v for v, _ in xticks] == [0, 5, 10, 15]  # steps 1..12: raw spacing 12/4 = 3 rounds up to 5
        for v, py in yticks:
            assert py == pytest.approx(oy + sy * v, abs=0.01)
        for v, px in xticks:
            assert px == pytest.approx(ox + sx * v, abs=0.01)
        lo, hi = yticks[0][0], yticks[-1][0]
        if g.get("data-key") in ("accuracy", "format", "frac_zero_std", "eval_accuracy"):
            assert (lo, hi) == (0, 1)
        for e in g:
            if e.get("class") == "series":
                assert all(lo <= v <= hi for _, v in drawn(e, (sx, ox, sy, oy)))


def test_nice_ticks_by_hand():
    """Round spacings of 1, 2, 2.5 or 5 times a power of ten, covering the data."""
    assert plot.nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1]          # raw 0.25 is already round
    assert plot.nice_ticks(8.36, 8.9) == [8.2, 8.4, 8.6, 8.8, 9.0]   # raw 0.135 -> 0.2
    assert plot.nice_ticks(0, 30) == [0, 10, 20, 30]                 # raw 7.5 -> 10
    assert plot.nice_ticks(0.0, 0.0) == [-1, -0.5, 0, 0.5, 1]        # one value: padded by 1, raw 0.5
    assert plot.nice_ticks(4.0, 4.0) == [2, 3, 4, 5, 6]              # padded by 2, raw 1


def test_overlay_has_a_series_per_run_and_a_legend(tmp_path):
    """Two runs: two series per panel, in the runs' order and colours, and a legend naming both
    folders. A key only one run logged (held-out accuracy) is drawn for that run alone."""
    a = write_run(tmp_path / "beta0.1", grpo_rows())
    b_rows = [{k: v for k, v in r.items() if not k.startswith("eval")} for r in grpo_rows(steps=20, shift=0.1)]
    b = write_run(tmp_path / "beta0.5", b_rows)
    out = plot.overlay([a, b], tmp_path / "both.svg")
    root = ET.parse(out).getroot()
    assert [e.text for e in root.iter(f"{NS}text") if e.get("class") == "legend"] == ["beta0.1", "beta0.5"]
    found = panels(out)
    assert list(found) == GRPO_KEYS
    for key, (t, elements) in found.items():
        if key == "eval_accuracy":
            assert {e.get("data-run") for e in elements} == {"beta0.1"}
            continue
        assert [e.get("data-run") for e in elements] == ["beta0.1", "beta0.5"]
        assert elements[0].get("stroke") != elements[1].get("stroke")
        assert_is_series(elements[1], t, [(r["step"], r[key]) for r in b_rows])


def test_missing_keys_get_no_panel(tmp_path):
    """An SFT run logs loss and answer_prob, not rewards: those two panels only. A non-finite value
    (a skipped step's NaN) is left out of its line rather than drawn."""
    rows = [{"step": s, "loss": 2.0 / s, "answer_prob": 0.1 * s, "grad_norm": 1.0, "lr": 1e-5, "seconds": 0.5}
            for s in range(1, 8)]
    rows[3]["loss"] = float("nan")
    out = plot.write_curves(write_run(tmp_path / "sft", rows), tmp_path / "sft.svg")
    found = panels(out)
    assert list(found) == ["loss", "answer_prob"]
    t, (line,) = found["loss"]
    assert_is_series(line, t, [(r["step"], r["loss"]) for r in rows if r["step"] != 4])


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    """A missing, empty or malformed metrics.jsonl, or one with nothing to plot, is an error naming the
    file (and line); from the command line it is one line on stderr and exit status 2, as is an --out
    with no folder to go in or several runs and no --out."""
    cases = {"missing": None, "empty": "\n", "bad": '{"step": 1, "reward": 1}\n{"step": 2, "rew\n',
             "nostep": '{"reward": 1}\n', "nothing": '{"step": 1, "lr": 0.1}\n'}
    messages = {"missing": "missing/metrics.jsonl: no such file", "empty": "empty/metrics.jsonl: empty",
                "bad": "bad/metrics.jsonl:2: not JSON", "nostep": "nostep/metrics.jsonl:1: not a record",
                "nothing": "nothing to plot"}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "metrics.jsonl").write_text(text)
        with pytest.raises(plot.MetricsError, match=messages[name]):
            plot.write_curves(tmp_path / name)
        with pytest.raises(SystemExit) as exit_:
            plot.main([str(tmp_path / name)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and messages[name] in err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "bad"), str(tmp_path / "empty")])  # several runs need --out
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "bad"), "--out", str(tmp_path / "nowhere" / "x.svg")])  # checked first
    nowhere = tmp_path / "nowhere"
    assert capsys.readouterr().err == f"error: --out {nowhere / 'x.svg'}: no folder {nowhere}\n"


def test_write_is_atomic(tmp_path, monkeypatch):
    """The figure is written whole to a temporary file beside the target, then moved over it with
    os.replace: a failed render leaves the old figure untouched, and no temporary file is left behind,
    even when the move itself fails."""
    run = write_run(tmp_path / "run", grpo_rows())
    (run / "curves.svg").write_text("old")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(plot.MetricsError):
        plot.write_curves(run)
    assert (run / "curves.svg").read_text() == "old"
    write_run(run, grpo_rows())
    moves, replace = [], plot.os.replace
    def spy(src, dst):
        moves.append((Path(src).parent, Path(dst), ET.parse(src).getroot().tag))  # complete, parseable XML
        replace(src, dst)
    monkeypatch.setattr(plot.os, "replace", spy)
    plot.write_curves(run)
    assert moves == [(run, run / "curves.svg", f"{NS}svg")]
    assert sorted(p.name for p in run.iterdir()) == ["curves.svg", "metrics.jsonl"]
    (run / "taken").mkdir()
    with pytest.raises(OSError):
        plot.write_curves(run, run / "taken")  # os.replace cannot put a file over a folder
    assert sorted(p.name for p in run.iterdir()) == ["curves.svg", "metrics.jsonl", "taken"]


def test_command_line_overlays_runs(tmp_path):
    """`python -m workshop.plot A B --out F` from the project root writes F with both runs; the same
    folder name twice is told apart by the paths as given."""
    a = write_run(tmp_path / "x" / "seed0", grpo_rows())
    b = write_run(tmp_path / "y" / "seed0", grpo_rows(shift=0.2))
    out = tmp_path / "cmp.svg"
    done = subprocess.run([sys.executable, "-m", "workshop.plot", str(a), str(b), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"wrote {out}"
    names = [e.get("data-run") for e in panels(out)["reward"][1]]
    assert names == [str(a), str(b)]
