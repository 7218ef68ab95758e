"""`keel plot`, `keel env` and `keel --version`, run as a user runs them (a fresh `python -m keel`)."""
import ast
import importlib.metadata
import importlib.util
import json
import math
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import keel
from keel.cli import build_parser
from keel.cli.env import OPTIONAL_PACKAGES
from keel.cli.plot import DPI, FIGURE_WIDTH_IN, SUBPLOT_HEIGHT_IN, plot_runs, read_series
from keel.errors import DataError

from conftest import REPO, run_keel

# matplotlib's first two default line colours (C0, C1): one per run in every subplot.
RUN_COLORS = [(0x1F / 255, 0x77 / 255, 0xB4 / 255), (0xFF / 255, 0x7F / 255, 0x0E / 255)]
# Distribution -> the module it installs, to check `keel env` against what Python can import.
MODULE_OF = {"transformer-engine": "transformer_engine", "flash-attn": "flash_attn", "faiss-cpu": "faiss",
             "faiss-gpu": "faiss", "reasoning-gym": "reasoning_gym", "megatron-core": "megatron.core"}


def write_run(run_dir, steps, seed, replay=()):
    """A metrics.jsonl shaped like the trainer's: a decaying noisy loss, warmup-then-cosine lr,
    eval_loss every 10 steps only, a diverged (NaN) step 7, and `replay` steps logged twice as a
    train.nonfinite=rollback run does."""
    rng = random.Random(seed)
    rows = []
    for step in list(range(1, steps + 1)) + list(replay):
        loss = 1.5 + 4.0 * math.exp(-step / 15) + rng.uniform(-0.05, 0.05)
        lr = 3e-4 * min(1.0, step / 5) * 0.5 * (1 + math.cos(math.pi * step / steps))
        row = {"step": step, "loss": float("nan") if step == 7 else loss, "lr": lr,
               "grad_norm": rng.uniform(0.5, 2.0), "tokens_per_s": rng.uniform(8e3, 9e3)}
        if step % 10 == 0:
            row["eval_loss"] = loss + 0.1
        rows.append(row)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def recount(run_dir, metric):
    """An independent count: every line's JSON, the last finite value for each step."""
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if isinstance(row.get(metric), float) and not math.isnan(row[metric]):
            last[row["step"]] = row[metric]
    return sorted(last), [last[s] for s in sorted(last)]


@pytest.fixture
def two_runs(tmp_path):
    return (write_run(tmp_path / "baseline", 40, seed=0, replay=(19, 20)),
            write_run(tmp_path / "muon", 30, seed=1))


def has_color(image, rgb, tol=0.02):
    return bool(np.any(np.all(np.abs(image[..., :3] - np.array(rgb)) < tol, axis=-1)))


def test_plot_writes_a_png_with_one_subplot_per_metric_and_one_line_per_run(two_runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "curves.png"
    proc = run_keel(["plot", *map(str, two_runs), "--metric", "loss", "--metric", "eval_loss",
                     "--out", str(out)])
    assert proc.stdout.strip() == str(out.resolve())
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (round(2 * SUBPLOT_HEIGHT_IN * DPI), round(FIGURE_WIDTH_IN * DPI))
    assert all(has_color(image, rgb) for rgb in RUN_COLORS)  # both runs were drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline", "curves.png", "muon"]  # no temp left


def test_plot_draws_only_runs_that_have_the_metric(tmp_path):
    import matplotlib.image

    lm = write_run(tmp_path / "lm", 20, seed=0)
    other = tmp_path / "rl"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.7}\n')
    image = matplotlib.image.imread(plot_runs([str(lm), str(other)], ["loss"], str(tmp_path / "p.png")))
    assert has_color(image, RUN_COLORS[0]) and not has_color(image, RUN_COLORS[1])


def test_read_series_equals_a_recount_of_the_json_lines(two_runs):
    for run in two_runs:
        for metric in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s"):
            assert read_series(run, metric) == recount(run, metric), (run.name, metric)
    steps, _ = read_series(two_runs[0], "loss")
    assert 7 not in steps and steps == sorted(set(steps)) and len(steps) == 39  # NaN skipped, replay once
    assert read_series(two_runs[0], "eval_loss")[0] == [10, 20, 30, 40]


def test_read_series_skips_a_last_line_still_being_written(tmp_path):
    run = tmp_path / "live"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    assert read_series(run, "loss") == ([1, 2], [2.5, 2.4])


def test_plot_default_output_is_named_after_the_metrics_in_the_current_directory(two_runs, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = plot_runs([str(r) for r in two_runs], ["loss", "lr", "loss"])
    assert written == tmp_path / "plot-loss-lr.png" and written.is_file()


def one_error_line(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keel: error: "), proc.stderr
    return lines[0]


def test_plot_a_metric_no_run_has_names_the_available_ones(two_runs, tmp_path):
    out = tmp_path / "never.png"
    line = one_error_line(run_keel(["plot", *map(str, two_runs), "--metric", "perplexity",
                                    "--out", str(out)], check=False))
    available = re.search(r"available: (.*)$", line).group(1).split(", ")
    assert "perplexity" in line
    assert available == ["eval_loss", "grad_norm", "loss", "lr", "tokens_per_s"]
    assert not out.exists()


@pytest.mark.parametrize("problem", ["no_folder", "no_metrics_file", "bad_json", "text_value"])
def test_plot_bad_runs_are_one_line_naming_the_file(problem, tmp_path):
    run = tmp_path / "run"
    if problem != "no_folder":
        run.mkdir()
    good = '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n'
    if problem == "bad_json":
        (run / "metrics.jsonl").write_text(good + '{"step": 3, "loss": 2.8,,}\n{"step": 4, "loss": 2.7}\n')
    if problem == "text_value":
        (run / "metrics.jsonl").write_text(good + '{"step": 3, "loss": "2.8"}\n')
    line = one_error_line(run_keel(["plot", str(run), "--metric", "loss", "--out", str(tmp_path / "p.png")],
                                   check=False))
    expected = {"no_folder": f"{run}: no such run directory", "no_metrics_file": f"{run}/metrics.jsonl: not found",
                "bad_json": f"{run}/metrics.jsonl:3: not valid JSON", "text_value": f"{run}/metrics.jsonl:3: loss"}
    assert expected[problem] in line
    with pytest.raises(DataError):
        read_series(run, "loss")


def test_plot_flags_all_have_help_and_an_example():
    plot = build_parser()._subparsers._group_actions[0].choices["plot"]
    for action in plot._actions:
        assert action.help, action.dest
    assert "default" in plot.format_help() and "keel plot runs/" in plot.epilog


def test_env_json_reports_what_python_can_import(tmp_path):
    home = tmp_path / "keel-home"
    (home / "kjv").mkdir(parents=True)
    (home / "kjv" / ".complete").write_text("ok\n")  # a finished fetch, as keel.data.assets commits it
    (home / "smollm2").mkdir()  # an interrupted fetch: no marker, so not present
    proc = run_keel(["env", "--json"], env={"KEEL_HOME": str(home), "SLURM_CONF": "/etc/slurm/test.conf"})
    env = json.loads(proc.stdout)

    assert env["keel"]["version"] == keel.__version__
    assert env["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["torch"]["version"] == torch.__version__
    assert env["torch"]["cuda_available"] == torch.cuda.is_available()
    assert env["torch"]["devices"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    packages = {p["name"]: p for p in env["packages"]}
    assert set(packages) == set(OPTIONAL_PACKAGES)
    for name, pkg in packages.items():
        if name.startswith("faiss"):
            continue  # faiss-cpu and faiss-gpu both install `faiss`: checked together below
        assert pkg["installed"] == (importlib.util.find_spec(MODULE_OF.get(name, name)) is not None), name
        if pkg["installed"]:
            assert pkg["version"] == importlib.metadata.version(name)
    faiss_installed = packages["faiss-cpu"]["installed"] or packages["faiss-gpu"]["installed"]
    assert faiss_installed == (importlib.util.find_spec("faiss") is not None)
    assert packages["matplotlib"]["installed"]  # keel plot's dependency, so always there

    assert env["keel_home"] == str(home) and env["keel_home_from_env"]
    assert {name: a["present"] for name, a in env["assets"].items()} == \
        {"kjv": True, "shakespeare": False, "smollm2": False, "ml-100k": False}
    assert env["assets"]["kjv"]["path"] == str(home / "kjv")
    assert env["slurm"] == {"sbatch": shutil.which("sbatch"), "sinfo": shutil.which("sinfo"),
                            "SLURM_CONF": "/etc/slurm/test.conf"}


def test_env_text_report_lists_torch_and_every_package():
    out = run_keel(["env"]).stdout
    assert re.search(rf"^torch +{re.escape(torch.__version__)}$", out, re.M)
    for name in OPTIONAL_PACKAGES:
        assert re.search(rf"^  {re.escape(name)} ", out, re.M), name


def requirement_name(spec):
    return re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower().replace("_", "-")


def test_env_names_the_extra_setup_py_installs_each_package_with():
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
              if kw.arg in ("install_requires", "extras_require")}
    provided_by = {}
    for spec in kwargs["install_requires"]:
        provided_by.setdefault(requirement_name(spec), []).append("keel")
    for extra, specs in kwargs["extras_require"].items():
        for spec in specs:
            provided_by.setdefault(requirement_name(spec), []).append(f"keel[{extra}]")
    for name, listed in OPTIONAL_PACKAGES.items():
        assert listed == provided_by.get(name, []), name


def test_version_prints_keel_and_its_version():
    proc = run_keel(["--version"])
    assert proc.stdout == f"keel {keel.__version__}\n"


def test_cli_modules_import_without_torch_or_matplotlib():
    code = ("import sys, keel.cli, keel.cli.env, keel.cli.plot; keel.cli.build_parser(); "
            "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "[]"
