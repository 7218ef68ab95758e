"""The three Kelix stages as plain `keel train` runs on real Fashion-MNIST, each from the previous one,
then `keel kelix generate` / `describe` on the result, and fsdp2 against one process."""
import json

import pytest
import torch

import keel
from conftest import assert_same_training, keel_refusal, read_metrics, run_keel
from keel.data.fashion_mnist import load_fashion_mnist

RECIPES = "recipes/kelix"
SMALL = {  # the tiny recipes at a size that trains in seconds on one thread
    "model.dim": 64, "model.n_layers": 2, "model.tokenizer.out_dim": 64, "model.tokenizer.vit_dim": 32,
    "model.tokenizer.vit_layers": 1, "model.tokenizer.decoder_dim": 32, "model.tokenizer.decoder_layers": 1,
    "model.nbp.dim": 32, "model.codebook_init_images": 512, "images.train_images": 2048, "images.eval_images": 64,
    "train.micro_batch": 16, "train.global_batch": 16, "train.eval_batches": 4, "train.log_every": 1,
    "logging.progress": False, "logging.wandb": "disabled",
}


def overrides(out_dir, steps, **extra):
    settings = {**SMALL, "run.out_dir": str(out_dir), "train.steps": steps, "train.eval_every": steps,
                "checkpoint.every": steps, **extra}
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def stages(module_tmp):
    runs = {name: module_tmp / name for name in ("tokenizer", "unified", "detokenizer")}
    run_keel(["train", f"{RECIPES}/tiny-1-tokenizer.yaml", *overrides(runs["tokenizer"], 20)])
    run_keel(["train", f"{RECIPES}/tiny-2-unified.yaml",
              *overrides(runs["unified"], 20, **{"model.init_from": runs["tokenizer"]})])
    run_keel(["train", f"{RECIPES}/tiny-3-detokenizer.yaml",
              *overrides(runs["detokenizer"], 30, **{"model.init_from": runs["unified"], "optim.lr": 1e-2})])
    return runs


def keel_in_process(args) -> str:
    """stdout of `keel ARGS` run by keel's CLI entry point in this process (a fresh interpreter per
    call would cost ~5 s of imports each); fails on a non-zero exit."""
    import contextlib
    import io

    from keel.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(args)
        except SystemExit as e:
            assert not e.code, f"keel {' '.join(args)} exited {e.code}"
    return out.getvalue()


def losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_each_stage_learns_on_real_images(stages):
    for name in ("tokenizer", "unified"):
        curve = losses(stages[name])
        assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3, (name, curve)
    # the de-tokenizer beats the best image that ignores its input: the training images' mean
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    mean = train[:2048].float().mean(0) / 255.0
    chosen = torch.arange(64) * len(test) // 64  # the eval images (images.eval_images, spread)
    baseline = float(((test[chosen].float() / 255.0 - mean) ** 2).mean())
    final = [r for r in read_metrics(stages["detokenizer"]) if "eval_recon_mse" in r][-1]
    assert final["eval_recon_mse"] < 0.8 * baseline, (final["eval_recon_mse"], baseline)


def test_later_stages_keep_what_they_froze(stages):
    tok, uni, det = (keel.load(stages[n]).state_dict() for n in ("tokenizer", "unified", "detokenizer"))
    for name, value in tok.items():
        if name.startswith("tokenizer."):  # frozen from stage 2 on
            assert torch.equal(uni[name], value) and torch.equal(det[name], value), name
    for name, value in uni.items():
        if not name.startswith("detokenizer."):  # stage 3 trains only the de-tokenizer
            assert torch.equal(det[name], value), name
    assert any(not torch.equal(det[n], uni[n]) for n in det if n.startswith("detokenizer."))


def test_a_loaded_run_evaluates_as_it_did_in_training(stages):
    """keel.load rebuilds the unified model (buffers included) and its eval loss equals the logged one."""
    from keel.model.kelix_task import KelixTask

    cfg = keel.load_recipe(stages["unified"] / "config.yaml")
    task = KelixTask(cfg)
    task.prepare()
    data = task.build_data(dp_rank=0, dp_size=1)
    model = keel.load(stages["unified"])
    total = units = 0.0
    for batch in data.eval_batches(cfg.train.eval_batches, cfg.train.micro_batch, 0, 1):
        total += float(model(batch))
        units += float(task.units(batch))
    logged = [r for r in read_metrics(stages["unified"]) if "eval_loss" in r][-1]["eval_loss"]
    assert total / units == pytest.approx(logged, rel=1e-4)


def test_generate_writes_seeded_pngs_and_describe_captions_them(stages, tmp_path):
    from PIL import Image

    run = stages["detokenizer"]
    args = ["kelix", "generate", str(run), "--prompt", "An Ankle Boot", "--n", "3"]
    for out, seed in (("a", 1), ("b", 1), ("c", 2)):
        keel_in_process([*args, "--out", str(tmp_path / out), "--seed", str(seed)])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["000.png", "001.png", "002.png", "contact_sheet.png", "prompt.json"]
    assert Image.open(tmp_path / "a" / "000.png").size == (28, 28)
    assert Image.open(tmp_path / "a" / "contact_sheet.png").size == (60, 60)  # 2 x 2 grid of 28 + 2 px
    assert json.loads((tmp_path / "a" / "prompt.json").read_text())["class"] == "ankle boot"
    same = all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files[:3])
    other = any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files[:3])
    assert same and other
    out = keel_in_process(["kelix", "describe", str(run), str(tmp_path / "a" / "000.png")])
    assert "likeliest class:" in out and out.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a spaceship"], "--prompt: 'a spaceship' is not a Fashion-MNIST class prompt"),
    (["--prompt", "a coat", "--n", "0"], "--n: must be > 0"),
])
def test_bad_generate_arguments_are_one_line_errors(stages, tmp_path, args, message):
    assert message in keel_refusal(["kelix", "generate", str(stages["detokenizer"]), "--out", str(tmp_path), *args])


def test_describe_refuses_an_image_of_the_wrong_size(stages, tmp_path):
    from PIL import Image

    Image.new("L", (32, 32)).save(tmp_path / "big.png")
    line = keel_refusal(["kelix", "describe", str(stages["detokenizer"]), str(tmp_path / "big.png")])
    assert "big.png: expected a 28x28 image" in line


@pytest.mark.distributed
def test_unified_stage_under_fsdp2_equals_one_process(stages, module_tmp):
    common = {"model.init_from": stages["tokenizer"], "train.micro_batch": 4, "train.global_batch": 8,
              "checkpoint.every": 0}
    single, fsdp = module_tmp / "fsdp_ref", module_tmp / "fsdp2"
    run_keel(["train", f"{RECIPES}/tiny-2-unified.yaml", *overrides(single, 3, **common)])
    run_keel(["train", f"{RECIPES}/tiny-2-unified.yaml", *overrides(fsdp, 3, **common, **{"parallel.dp_shard": 2})],
             nproc=2)
    assert_same_training(single, fsdp, steps=(1, 2, 3))
