"""Recipes: extends, overrides, and a one-line error naming the key or file for bad input."""

import pytest

import keel
from keel.errors import ConfigError
from conftest import TINY_RECIPE, keel_refusal, run_keel, small_run_overrides


def test_tiny_recipe_extends_base_and_overrides_apply():
    cfg = keel.load_recipe(TINY_RECIPE, ["train.steps=7", "optim.lr=1e-3", "data.sources=[{path: corpus:kjv}]"])
    assert cfg.model.n_layers == 4 and cfg.model.vocab_size == 49152  # tiny's own and base's keys
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3
    assert [s.path for s in cfg.data.sources] == ["corpus:kjv"]
    assert cfg.model.head_dim == cfg.model.dim // cfg.model.n_heads


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "train.stepz: unknown key (did you mean 'train.steps'?)"),
    ("trian.steps=5", "trian: unknown key (did you mean 'train'?)"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("optim.lr=-0.1", "optim.lr: must be > 0"),
    ("optim.schedule=cosin", "optim.schedule: expected one of 'cosine' | 'wsd' | 'constant', got 'cosin' (did you mean 'cosine'?)"),
    ("model.n_kv_heads=4", "model.n_kv_heads: 4 does not divide model.n_heads 6"),
    ("model.name=lama", "model.name: unknown model family 'lama' (did you mean 'llama'?)"),
    ("train.global_batch=15", "train.global_batch: 15 is not a multiple of train.micro_batch 8"),
    ("logging.wandb=online2", "logging.wandb: expected one of"),
    ("data.sources=[]", "data.sources: at least one data source is required"),
    ("data.sources=[{path: x, weight: 0}]", "data.sources[0].weight: must be > 0"),
    ("train.steps", "train.steps: an override must look like key.sub=value"),
    ("train.steps.x=1", "train.steps: is a value, not a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        keel.load_recipe(TINY_RECIPE, [override])
    assert str(err.value).startswith(message.split(" (")[0]) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_recipe_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {name: llama\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        keel.load_recipe(bad_yaml)
    missing_parent = tmp_path / "child.yaml"
    missing_parent.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml: recipe file not found"):
        keel.load_recipe(missing_parent)
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("extends: cycle.yaml\n")
    with pytest.raises(ConfigError, match="extends` forms a cycle"):
        keel.load_recipe(cycle)
    no_model = tmp_path / "nomodel.yaml"
    no_model.write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="model.name: required"):
        keel.load_recipe(no_model)


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("keel") and "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_bad_recipe_and_override_exit_2_with_one_line(tmp_path):
    _assert_one_line_error(run_keel(["train", str(tmp_path / "nope.yaml")], check=False), "nope.yaml",
                           "recipe file not found")
    error = keel_refusal(["train", TINY_RECIPE, "train.stepz=3"])
    assert "train.stepz: unknown key" in error and "did you mean 'train.steps'" in error
    _assert_one_line_error(run_keel(["train"], check=False), "recipe")  # argparse, same shape


def test_cli_bad_data_files_name_the_file(tmp_path):
    missing = tmp_path / "missing_corpus"
    assert str(missing) in keel_refusal(["train", TINY_RECIPE, f"data.sources=[{{path: {missing}}}]",
                                         *small_run_overrides(tmp_path / "run")])
    orphan = tmp_path / "orphan"
    (tmp_path / "orphan.bin").write_bytes(b"\0" * 64)
    assert "orphan" in keel_refusal(["train", TINY_RECIPE, f"data.sources=[{{path: {orphan}}}]",
                                     *small_run_overrides(tmp_path / "run")])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops\n')
    proc = run_keel(["data", "preprocess", str(broken), "--out", str(tmp_path / "b")], check=False)
    _assert_one_line_error(proc, "broken.jsonl:2")


def test_world_size_that_does_not_fit_the_layout_is_refused(tmp_path):
    error = keel_refusal(["train", TINY_RECIPE, "parallel.dp_replicate=3", *small_run_overrides(tmp_path)])
    assert "parallel:" in error and "world size 1" in error


def test_yaml_off_reads_as_the_word_where_a_choice_expects_it():
    """YAML 1.1 turns a bare `off` into false; a key whose choices include 'off' takes the word."""
    import keel
    from conftest import TINY_RECIPE

    assert keel.load_recipe(TINY_RECIPE, ["precision.fp8=off"]).precision.fp8 == "off"
