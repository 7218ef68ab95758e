"""A family added from outside keel/ — one registration in a test module — trains through
keel.train.Trainer and through `keel train` with a recipe, with its own loss and metric."""
import json
import subprocess
import sys

import pytest
import torch

import keel
from conftest import REPO, read_metrics

TOY = REPO / "tests" / "toy_family.py"


def recipe(tmp_path, out, steps=30, **extra):
    text = {"plugins": [str(TOY)], "model": {"name": "char_bigram"}, "data": {"seq_len": 64, "sources": [{"path": "kjv"}]},
            "train": {"steps": steps, "micro_batch": 4, "global_batch": 8, "eval_batches": 4, "sample_tokens": 0},
            "optim": {"lr": 0.5, "weight_decay": 0.0, "schedule": "constant"},
            "run": {"out_dir": str(out)}, "logging": {"wandb": "disabled", "progress": False}, **extra}
    path = tmp_path / "bigram.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


def recount_accuracy(model, data) -> float:
    """Top-1 next-character accuracy over the same held-out windows, counted without the task."""
    correct = total = 0
    for batch in data.eval_batches(4, 4, 0, 1):
        for chars, nxt in zip(batch["chars"].tolist(), batch["next"].tolist()):
            for c, n in zip(chars, nxt):
                correct += int(model.logits[c].argmax().item() == n)
                total += 1
    return correct / total


def test_plugin_family_trains_through_the_trainer(tmp_path):
    from keel.train.trainer import Trainer

    cfg = keel.load_recipe(recipe(tmp_path, tmp_path / "run"))
    assert type(cfg.model).__name__ == "CharBigramConfig"
    trainer = Trainer(cfg)
    summary = trainer.train()
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # ln(128) = 4.85 at the start; bigrams are learnable
    model = keel.load(tmp_path / "run")
    assert summary["eval_accuracy"] == pytest.approx(recount_accuracy(model, trainer.data), abs=1e-6)
    assert summary["eval_accuracy"] > 0.2  # far above 1/128


def test_plugin_family_trains_and_resumes_through_keel_train(tmp_path):
    out = tmp_path / "cli"
    path = recipe(tmp_path, out, steps=6, checkpoint={"every": 3})
    proc = subprocess.run([sys.executable, "-m", "keel", "train", str(path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval loss" in proc.stdout
    saved = (out / "config.yaml").read_text()
    assert "char_bigram" in saved and str(TOY) in saved  # the saved config names its plugin
    # Resume from step 3 in a new process gives the uninterrupted run's step 6 exactly.
    first = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    again = tmp_path / "again"
    again.mkdir()
    import shutil
    shutil.copytree(out / "checkpoints" / "step_3", again / "checkpoints" / "step_3")
    proc = subprocess.run([sys.executable, "-m", "keel", "train", str(path), f"run.out_dir={again}"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {r["step"]: r for r in read_metrics(again) if "loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == first[step]["loss"]
        assert resumed[step]["data_fingerprint"] == first[step]["data_fingerprint"]
    torch.testing.assert_close(keel.load(again).logits, keel.load(out).logits, rtol=0, atol=0)


def test_plugin_family_refuses_model_parallelism_and_decoding(tmp_path):
    from keel.errors import ConfigError
    with pytest.raises(ConfigError, match="parallel.tp: the char_bigram family does not support it"):
        keel.load_recipe(recipe(tmp_path, tmp_path / "x"), ["parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"plugins\[0\]: .*nope.py: no such file"):
        keel.load_recipe(recipe(tmp_path, tmp_path / "x"), ["plugins=[nope.py]"])
