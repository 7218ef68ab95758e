"""The CLI tells the truth: the key reference covers every schema key and the README's table is it;
every verb and flag has help; --dry-run shows the layout and runs nothing; a non-editable install
can submit SLURM jobs (its templates are package data)."""
import argparse
import dataclasses
import shutil
import subprocess
import sys
import typing

import pytest

import keel
from conftest import REPO, TINY_RECIPE, run_keel


def schema_paths(cls, prefix):
    """Every dotted key of a section dataclass, nested (also optional) sections walked: a recount
    independent of keel.cli.config."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        nested = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if nested is not None:
            yield from schema_paths(nested, f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}"


def test_every_schema_key_is_in_the_reference_and_the_readme_table_is_generated():
    from keel.cli.config import all_keys
    from keel.config import SECTIONS
    from keel.model.registry import MODELS
    from keel.rl.config import rl_schema
    sys.path.insert(0, str(REPO / "scripts"))
    from update_readme_keys import readme_with_keys

    keel.register_all()
    listed = {key.split("]", 1)[-1].lstrip(".") if "[" in key else key for key, *_ in all_keys()}
    listed = {k if k.startswith(tuple(SECTIONS)) else f"model.{k}" for k in listed}
    expected = set()
    for name, section in SECTIONS.items():
        if name == "model":
            for spec in MODELS.values():
                expected |= set(schema_paths(spec.config_cls, "model"))
        elif name == "rl":
            expected |= set(schema_paths(rl_schema(), "rl"))
        elif section.schema is not None:
            expected |= set(schema_paths(section.schema, name))
    assert expected - listed == set()
    assert len(expected) > 150  # every section, both families, the RL trainers' sub-sections
    assert all(meaning for *_, meaning in all_keys())  # every key says what it is
    readme = (REPO / "README.md").read_text()
    assert readme_with_keys(readme) == readme, "README's key table is stale: python scripts/update_readme_keys.py"


def walk_parsers(parser, path=("keel",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk_parsers(sub, path + (name,))


def test_every_verb_and_flag_has_help_and_states_its_default():
    from keel.cli import build_parser
    verbs = 0
    for path, parser in walk_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{' '.join(path)} {action.dest}: no help"
            has_default = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
            if has_default:
                assert "default" in action.help, f"{' '.join(path)} {action.option_strings}: default not stated"
        verbs += 1
    assert verbs >= 15


def test_wrong_flag_points_at_the_verbs_help_and_overrides(tmp_path):
    proc = run_keel(["train", str(TINY_RECIPE), "--stepz", "3"], check=False)
    assert proc.returncode == 2 and "keel train --help" in proc.stderr and "train.steps=2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_dry_run_shows_the_resolved_config_and_layout_and_runs_nothing(tmp_path):
    out = tmp_path / "never"
    proc = run_keel(["train", str(TINY_RECIPE), f"run.out_dir={out}", "parallel.tp=2", "train.micro_batch=2",
                     "--dry-run", "--world", "8"])
    assert "layout on 8 rank(s): pp 1 x dp_replicate 1 x dp_shard 4 x cp 1 x tp 2" in proc.stdout
    assert "per step: 16 x 128 = 2,048 tokens/step; 2 micro-batch(es) of 2" in proc.stdout
    assert not out.exists()
    bad = run_keel(["train", str(TINY_RECIPE), "--dry-run", "--world", "3", "parallel.tp=2"], check=False)
    assert bad.returncode == 2 and "world size 3" in bad.stderr and "Traceback" not in bad.stderr


def test_non_editable_install_submits_with_its_packaged_templates(tmp_path):
    """`pip install .` (a built wheel, not the checkout) renders the sbatch script from package data."""
    target, source = tmp_path / "site", tmp_path / "source"  # built from a copy: no build/ in the checkout
    shutil.copytree(REPO / "keel", source / "keel", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    assert (target / "keel" / "cli" / "templates" / "train.sbatch.j2").is_file()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "keel", "slurm", "submit", str(TINY_RECIPE), "--nodes", "2",
                           "--dry-run"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "#SBATCH --nodes=2" in proc.stdout and "torchrun" in proc.stdout
    probe = subprocess.run([sys.executable, "-c", "import keel; print(keel.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert probe.stdout.startswith(str(target))  # the installed copy ran, not the checkout
