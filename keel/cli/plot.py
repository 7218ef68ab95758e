"""`keel plot RUN [RUN ...] --metric NAME [--metric NAME ...]`: training curves from metrics.jsonl.

One subplot per metric, one line per run (labelled by the run folder's name), written as a PNG.
matplotlib is imported only when a plot is drawn, through its Agg canvas (no display, no pyplot
global state), so `keel --help` and the other verbs never pay for it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from pathlib import Path

from keel.errors import DataError, KeelError, MissingExtraError

METRICS_FILE = "metrics.jsonl"
# The PNG is FIGURE_WIDTH_IN x (SUBPLOT_HEIGHT_IN per metric) inches at DPI: a fixed pixel size,
# so two plots of the same metrics line up when compared side by side.
FIGURE_WIDTH_IN, SUBPLOT_HEIGHT_IN, DPI = 8.0, 3.0, 100

EPILOG = """example:
  keel plot runs/lm-tiny runs/lm-tiny-muon --metric loss --metric eval_loss
      writes plot-loss-eval_loss.png: loss and eval_loss against step, one line per run"""


class PlotError(KeelError):
    """A bad `keel plot` argument: a metric no run has, an output folder that does not exist."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_rows(run_dir) -> list[tuple[int, dict]]:
    """(line number, row) for every row of RUN/metrics.jsonl; a malformed line is a DataError."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise DataError(f"{path}: not found ({run_dir} is not a keel run directory, or it has not logged a step yet)")
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            # A run that is still training may be mid-way through writing its last line: a final
            # line without its newline is skipped rather than refused, so a live run can be plotted.
            if lineno == len(lines) and not text.endswith("\n"):
                continue
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if not _is_number(row.get("step")):
            raise DataError(f"{path}:{lineno}: expected a numeric \"step\", got {row.get('step')!r}")
        rows.append((lineno, row))
    return rows


def series_from_rows(rows, metric: str, path="metrics.jsonl", x: str = "step") -> tuple[list, list]:
    """(xs, values) of one metric, sorted by x. Rows without the metric (or the x key) and
    non-finite values are skipped: NaN/inf mark a diverged step and cannot be drawn. When a step
    appears twice (train.nonfinite=rollback replays steps), the later finite row wins."""
    by_step = {}
    for lineno, row in rows:
        value, x_value = row.get(metric), row.get(x)
        if value is None or x_value is None:
            continue
        for key, v in ((metric, value), (x, x_value)):
            if not _is_number(v):
                raise DataError(f"{path}:{lineno}: {key} is {v!r}, expected a number")
        if math.isfinite(value) and math.isfinite(x_value):
            by_step[row["step"]] = (x_value, value)
    points = sorted(by_step.values())
    return [p[0] for p in points], [p[1] for p in points]


def read_series(run_dir, metric: str, x: str = "step") -> tuple[list, list]:
    """(steps, values) of `metric` in RUN/metrics.jsonl; see series_from_rows for what is skipped."""
    return series_from_rows(read_rows(run_dir), metric, Path(run_dir) / METRICS_FILE, x)


def numeric_keys(rows) -> set[str]:
    return {key for _, row in rows for key, value in row.items() if _is_number(value)}


def default_out(metrics: list[str]) -> str:
    # Metric names may hold "/" (RL metrics such as reward/mean): keep file names flat and portable.
    return "plot-" + "-".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", m) for m in metrics) + ".png"


def run_labels(runs: list[str]) -> list[str]:
    """The run folder's name; the path as given when two runs share a folder name."""
    names = [Path(r).resolve().name for r in runs]
    return [name if names.count(name) == 1 else str(r) for name, r in zip(names, runs)]


def draw(curves: dict, metrics: list[str], x: str, out: Path) -> None:
    """curves: metric -> [(label, xs, values)]. Writes the PNG atomically: a reader (a browser,
    an earlier plot being refreshed) never sees a half-written file."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("keel plot needs matplotlib; `pip install matplotlib`") from None

    fig = Figure(figsize=(FIGURE_WIDTH_IN, SUBPLOT_HEIGHT_IN * len(metrics)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        for label, xs, values in curves[metric]:
            ax.plot(xs, values, label=label, linewidth=1.2, marker="." if len(xs) < 50 else None)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel(x)

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def plot_runs(runs: list[str], metrics: list[str], out: str | None = None, x: str = "step") -> Path:
    """Draw `metrics` of `runs` into a PNG; returns its absolute path."""
    metrics = list(dict.fromkeys(metrics))  # `--metric loss --metric loss` is one subplot
    out_path = Path(out or default_out(metrics)).absolute()
    if not out_path.parent.is_dir():
        raise PlotError(f"--out: folder {out_path.parent} does not exist")
    rows_by_run = [(run, read_rows(run)) for run in runs]  # every bad run is reported before drawing
    logged = set().union(*(numeric_keys(rows) for _, rows in rows_by_run))
    if not logged:
        raise PlotError(f"no rows logged yet in {', '.join(str(Path(r) / METRICS_FILE) for r in runs)}")
    if x not in logged:
        raise PlotError(f"--x {x}: in no run's {METRICS_FILE}; available: {', '.join(sorted(logged))}")
    available = logged - {"step", x}

    curves = {}
    for metric in metrics:
        curves[metric] = []
        for (run, rows), label in zip(rows_by_run, run_labels(runs)):
            xs, values = series_from_rows(rows, metric, Path(run) / METRICS_FILE, x)
            if xs:  # a run without this metric (an RL run next to a pretraining run) has no line
                curves[metric].append((label, xs, values))
        if not curves[metric]:
            if metric in available:
                raise PlotError(f"--metric {metric}: only non-finite (NaN/inf) values in {', '.join(runs)}")
            raise PlotError(f"--metric {metric}: in no run's {METRICS_FILE}; "
                            f"available: {', '.join(sorted(available)) or 'none'}")
    draw(curves, metrics, x, out_path)
    return out_path


def cmd_plot(args) -> None:
    print(plot_runs(args.runs, args.metric, args.out, args.x))


def add_parser(sub, parser_class) -> None:
    """`keel plot ...` under the CLI's subcommands."""
    p = sub.add_parser("plot", help="plot metrics of one or more runs into a PNG", epilog=EPILOG,
                       description="Plot metrics from runs' metrics.jsonl: one subplot per metric, "
                                   "one line per run.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory holding metrics.jsonl")
    p.add_argument("--metric", action="append", required=True, metavar="NAME",
                   help="metric to plot, e.g. loss, eval_loss, lr, grad_norm, tokens_per_s; "
                        "repeat for more subplots (required)")
    p.add_argument("--out", metavar="FILE.png",
                   help="PNG to write (default: plot-<metric1>[-<metric2>...].png in the current directory)")
    p.add_argument("--x", default="step", metavar="KEY",
                   help="metrics.jsonl key for the x axis (default: step)")
    p.set_defaults(fn=cmd_plot)
