"""Nothing a user made is ever overwritten, every mistake is one line and exit code 2, and a finished
run says so. Each bad start below runs against an existing run whose files are hashed before and after."""
import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import REPO, TINY_RECIPE, keel_refusal, read_metrics, run_keel, small_run_overrides


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(args, *fragments):
    """`keel ARGS` refuses with one line (exit 2) naming every fragment; returns that line."""
    error = keel_refusal(args)
    for fragment in fragments:
        assert fragment in error, error
    return error


@pytest.fixture(scope="module")
def existing_run(module_tmp):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = module_tmp / "run"
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(run, **{"train.steps": 4, "checkpoint.every": 2})])
    return run


@pytest.fixture
def untouched(existing_run):
    before = tree_hashes(existing_run)
    yield existing_run
    assert tree_hashes(existing_run) == before  # byte-identical: nothing rewritten, added or removed


def test_import_into_an_existing_run_is_refused(untouched):
    one_line_error(["import", "hf", "smollm2", str(untouched)],
                   str(untouched), "not an empty folder")


def test_export_into_an_existing_run_is_refused(untouched, tmp_path):
    one_line_error(["export", "hf", str(untouched), str(untouched)], "not an empty folder")


def test_failed_start_leaves_the_run_untouched(untouched, tmp_path):
    one_line_error(["train", str(TINY_RECIPE), *small_run_overrides(untouched, **{
        "checkpoint.resume": str(tmp_path / "nonexistent"), "train.steps": 8})],
        "checkpoint.resume:", "nonexistent", "no such checkpoint")
    fresh = tmp_path / "fresh"
    one_line_error(["train", str(TINY_RECIPE), *small_run_overrides(fresh, **{
        "model.init_from": str(tmp_path / "missing")})], "model.init_from:", "missing")
    assert not fresh.exists()  # a failed start makes no half-made run folder


def test_shape_mismatch_names_the_differing_key(untouched, tmp_path):
    line = one_line_error(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "other", **{
        "model.dim": 32, "model.init_from": str(untouched)})], "model.init_from:", "model.dim 64")
    assert "32" in line
    one_line_error(["train", str(TINY_RECIPE), *small_run_overrides(untouched, **{
        "model.ffn_dim": 96, "train.steps": 8})], "checkpoint.resume:", "model.ffn_dim 128")


def test_rl_recipe_under_keel_train_points_to_keel_rl(tmp_path):
    one_line_error(["train", str(REPO / "recipes" / "rl" / "grpo-tiny.yaml")],
                   "is an RL recipe", "keel rl")


def test_a_finished_run_says_so(untouched):
    proc = run_keel(["train", str(TINY_RECIPE), *small_run_overrides(untouched, **{"train.steps": 4})])
    assert "already at step 4/4" in proc.stdout and "train.steps=8" in proc.stdout
    assert "nan" not in proc.stdout


def test_resume_by_step_number(existing_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(existing_run, run)
    proc = run_keel(["train", str(TINY_RECIPE), *small_run_overrides(run, **{
        "checkpoint.resume": 2, "train.steps": 4, "checkpoint.every": 2})])
    assert "step 2," in proc.stdout and "resumed from" in proc.stdout
    ref = {r["step"]: r for r in read_metrics(existing_run) if "loss" in r}
    again = [r for r in read_metrics(run) if "loss" in r][-2:]
    assert [(r["step"], r["loss"]) for r in again] == [(s, ref[s]["loss"]) for s in (3, 4)]
    one_line_error(["train", str(TINY_RECIPE), *small_run_overrides(run, **{
        "checkpoint.resume": 3, "train.steps": 6})], "checkpoint.resume:", "no checkpoint at step 3",
        "committed: 2, 4")


def test_exports_and_imports_follow_the_umask(existing_run, tmp_path):
    old = os.umask(0o022)
    try:
        run_keel(["export", "hf", str(existing_run), str(tmp_path / "hf")])
        run_keel(["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    finally:
        os.umask(old)
    for out in (tmp_path / "hf", tmp_path / "back"):  # readable by a serving account, as mkdir/open make them
        modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
        assert modes[str(Path("."))] == 0o755
        assert all(m in (0o755, 0o644) for m in modes.values()), modes
