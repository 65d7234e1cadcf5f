"""Training curves as one hand-written SVG that opens in any browser, with no plotting library.

write_curves(RUN) draws RUN/metrics.jsonl into RUN/curves.svg: small multiples against the step of
what the run logged (held-out accuracy as points where it was scored); a key the run lacks gets no
panel. `python -m workshop.plot RUN [RUN ...] --out FILE.svg` overlays runs, one colour and legend
entry each. Every panel's <g> carries data-transform="sx ox sy oy" (pixel x = ox + sx * step,
pixel y = oy + sy * value), so the drawn points can be read back. The file is replaced atomically.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr


class MetricsError(ValueError):
    """A missing, empty or unreadable metrics.jsonl (or a bad command line). main shows it as one line.
    Not model.UsageError: this module stays standard-library only, so it loads without torch."""


@dataclass(frozen=True)
class Panel:
    key: str              # the metrics.jsonl key it draws
    title: str
    unit: bool            # a share or a probability: a fixed 0..1 axis
    points: bool = False  # scored now and then: markers, not a line


PANELS = (Panel("reward", "reward", False), Panel("accuracy", "accuracy (training)", True),
          Panel("format", "format", True), Panel("kl", "KL to the reference", False),
          Panel("completion_len", "completion length (tokens)", False),
          Panel("frac_zero_std", "groups with equal rewards", True),
          Panel("eval_accuracy", "held-out accuracy", True, points=True),
          Panel("loss", "loss (SFT)", False), Panel("answer_prob", "answer probability (SFT)", True))
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")  # Okabe-Ito
COLUMNS, WIDTH, HEIGHT = 3, 600, 400           # the grid of panels, and one panel's size in px
LEFT, RIGHT, TOP, BOTTOM = 110, 36, 64, 84     # the margins around a panel's plot area
TEXT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif' fill='#222'"


@dataclass
class Run:
    label: str   # its legend entry
    rows: list   # the records of its metrics.jsonl, in order


def read_metrics(path):
    """The records of a metrics.jsonl; a missing, empty or malformed file is a MetricsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: no such file")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not is_number(row.get("step")):
                raise MetricsError(f"{path}:{n}: not a record with a numeric 'step'")
            rows.append(row)
    if not rows:
        raise MetricsError(f"{path}: empty, no step logged yet")
    return rows


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(rows, key):
    """(step, value) of every record that logged a finite number under key."""
    return [(r["step"], float(r[key])) for r in rows if is_number(r.get(key))]


def nice_ticks(lo, hi, count=5):
    """About count round ticks (1, 2, 2.5 or 5 times a power of ten apart) from <= lo to >= hi."""
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):  # one value: a band around it
        pad = abs(lo) / 2 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / (count - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def transform(x, y, xticks, yticks):
    """(sx, ox, sy, oy) mapping data to the pixels of the plot area whose top-left corner is (x, y)."""
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    sx = w / (xticks[-1] - xticks[0])
    sy = -h / (yticks[-1] - yticks[0])  # pixel y grows downwards
    return sx, x - sx * xticks[0], sy, y + h - sy * yticks[0]


def axes_svg(t, x, y, xticks, yticks):
    """Grid lines, tick labels, the axis lines and the word 'step' around one plot area."""
    sx, ox, sy, oy = t
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = []
    for v in yticks:
        py = oy + sy * v
        out.append(f"<line x1='{x}' y1='{py:.2f}' x2='{x + w}' y2='{py:.2f}' stroke='#ddd' stroke-width='2'/>")
        out.append(f"<text class='ytick' x='{x - 12}' y='{py:.2f}' dy='0.35em' text-anchor='end' "
                   f"font-size='22' {TEXT}>{v:g}</text>")
    for v in xticks:
        px = ox + sx * v
        out.append(f"<line x1='{px:.2f}' y1='{y + h}' x2='{px:.2f}' y2='{y + h + 8}' stroke='#222' stroke-width='3'/>")
        out.append(f"<text class='xtick' x='{px:.2f}' y='{y + h + 34}' text-anchor='middle' "
                   f"font-size='22' {TEXT}>{v:g}</text>")
    out.append(f"<polyline points='{x},{y} {x},{y + h} {x + w},{y + h}' fill='none' stroke='#222' stroke-width='3'/>")
    out.append(f"<text x='{x + w / 2}' y='{y + h + 70}' text-anchor='middle' font-size='22' {TEXT}>step</text>")
    return out


def series_svg(panel, t, run, colour):
    """One run's values of the panel's key: a thick line, or markers when the key is sparse."""
    sx, ox, sy, oy = t
    xy = [(ox + sx * s, oy + sy * v) for s, v in series(run.rows, panel.key)]
    name, points = quoteattr(run.label), " ".join(f"{px:.2f},{py:.2f}" for px, py in xy)
    if panel.points:  # a thin guide joins the markers, so each run's trend reads even where they overlap
        return [f"<polyline class='guide' points='{points}' fill='none' stroke='{colour}' stroke-width='2' "
                "stroke-opacity='0.6'/>"] + [
                f"<circle class='series' data-run={name} cx='{px:.2f}' cy='{py:.2f}' r='9' fill='{colour}' "
                f"stroke='white' stroke-width='2'/>" for px, py in xy]
    return [f"<polyline class='series' data-run={name} points='{points}' fill='none' stroke='{colour}' "
            "stroke-width='4' stroke-linejoin='round' stroke-linecap='round' stroke-opacity='0.9'/>"]


def panel_svg(panel, runs, x, y, xticks):
    """One small multiple, its top-left corner at (x, y): title, axes, then every run's series."""
    values = [v for run in runs for _, v in series(run.rows, panel.key)]
    lo, hi = min(values), max(values)
    yticks = nice_ticks(min(lo, 0.0), max(hi, 1.0)) if panel.unit else nice_ticks(lo, hi)
    t = transform(x + LEFT, y + TOP, xticks, yticks)
    out = [f"<g class='panel' data-key='{panel.key}' data-transform='{' '.join(map(repr, t))}'>",
           f"<text x='{x + LEFT}' y='{y + 42}' font-size='28' font-weight='bold' {TEXT}>{escape(panel.title)}</text>"]
    out += axes_svg(t, x + LEFT, y + TOP, xticks, yticks)
    for run, colour in zip(runs, colours(len(runs))):
        out += series_svg(panel, t, run, colour)
    return out + ["</g>"]


def colours(n):
    return [COLOURS[i % len(COLOURS)] for i in range(n)]


def legend_svg(labels, width):
    """One entry per run (a thick line in its colour, then its label), wrapped into rows; its height."""
    out, x, y = [], 20, 40
    for label, colour in zip(labels, colours(len(labels))):
        w = 90 + 16 * len(label)  # about 0.6 em per character at 26 px
        if x > 20 and x + w > width:
            x, y = 20, y + 44
        out.append(f"<line x1='{x}' y1='{y}' x2='{x + 50}' y2='{y}' stroke='{colour}' stroke-width='8' "
                   "stroke-linecap='round'/>")
        out.append(f"<text class='legend' x='{x + 64}' y='{y}' dy='0.35em' font-size='26' {TEXT}>"
                   f"{escape(label)}</text>")
        x += w
    return out, y + 24


def render(runs):
    """The whole figure: a legend row, then a panel for every key that some run logged."""
    panels = [p for p in PANELS if any(series(run.rows, p.key) for run in runs)]
    if not panels:
        keys = sorted({k for run in runs for r in run.rows for k in r} - {"step"})
        raise MetricsError(f"nothing to plot: no run logged any of {[p.key for p in PANELS]} (it has {keys})")
    width = COLUMNS * WIDTH if len(panels) >= COLUMNS else len(panels) * WIDTH
    legend, header = legend_svg([run.label for run in runs], width)
    height = header + math.ceil(len(panels) / COLUMNS) * HEIGHT
    xticks = nice_ticks(0, max(r["step"] for run in runs for r in run.rows))
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}'>",
           f"<title>{escape(', '.join(run.label for run in runs))}: training curves</title>",
           f"<rect width='{width}' height='{height}' fill='white'/>"] + legend
    for i, panel in enumerate(panels):
        out += panel_svg(panel, runs, (i % COLUMNS) * WIDTH, header + (i // COLUMNS) * HEIGHT, xticks)
    return "\n".join(out + ["</svg>", ""])


def write_atomic(path, text):
    """Write text to path through a temporary file beside it, so a reader sees the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def labels(run_dirs):
    """The folders' names, or the paths as given where two runs share a name."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def overlay(run_dirs, out_file):
    """Draw the metrics.jsonl of every run folder into one SVG at out_file, one colour per run."""
    runs = [Run(label, read_metrics(Path(d) / "metrics.jsonl")) for label, d in zip(labels(run_dirs), run_dirs)]
    write_atomic(out_file, render(runs))
    return Path(out_file)


def write_curves(run_dir, out_file=None):
    """Draw RUN/metrics.jsonl into out_file (by default RUN/curves.svg); returns the path written."""
    return overlay([run_dir], out_file or Path(run_dir) / "curves.svg")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m workshop.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", help="the SVG to write (default with one run: RUN/curves.svg)")
    args = parser.parse_args(argv)
    try:
        if args.out is None and len(args.runs) > 1:
            raise MetricsError("--out: needed to overlay several runs")
        out = Path(args.out or Path(args.runs[0]) / "curves.svg")
        if not out.parent.is_dir():
            raise MetricsError(f"--out {out}: no folder {out.parent}")
        print(f"wrote {overlay(args.runs, out)}")
    except (MetricsError, OSError) as e:  # an unwritable --out too
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
