"""FP8 training: torchao on CPU (numerics) alone and composed with FSDP2 and TP; Transformer
Engine refuses clearly where it cannot run, and runs only on a Hopper GPU."""
import pytest
import torch

from conftest import TINY_RECIPE, keel_refusal, read_metrics, run_keel, small_run_overrides

FP8_LOSS_RTOL = 0.005  # FP8 matmuls in every block's linears move the loss by < 0.5% over 6 steps
COMPOSED_RTOL = 1e-4  # FP8 under FSDP2/TP vs FP8 on one process: same casts, other sum order


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def runs(module_tmp):
    root = module_tmp
    # The tiny model's linears are below the default size filter: convert them all here.
    tw = {"precision.fp8": "torchao", "precision.fp8_recipe": "tensorwise", "precision.fp8_min_features": 16}
    layouts = {"fp32": (1, {}), "tensorwise": (1, tw),
               "rowwise": (1, {**tw, "precision.fp8_recipe": "rowwise"}),
               "tensorwise_fsdp2": (2, {**tw, "parallel.dp_shard": 2}),  # FP8 all-gather, precomputed scales
               "tensorwise_tp2": (2, {**tw, "parallel.tp": 2})}
    for name, (nproc, extra) in layouts.items():
        run_keel(["train", str(TINY_RECIPE), *small_run_overrides(root / name, **extra)], nproc=nproc)
    return root


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_fp8_tracks_fp32(runs, recipe):
    fp32, fp8 = losses(runs / "fp32"), losses(runs / recipe)
    assert fp8 != fp32  # the FP8 casts really happened
    assert fp8 == pytest.approx(fp32, rel=FP8_LOSS_RTOL)
    assert fp8[-1] < fp8[0]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tensorwise_fsdp2", "tensorwise_tp2"])
def test_torchao_fp8_composes_with_fsdp2_and_tp(runs, layout):
    assert losses(runs / layout) == pytest.approx(losses(runs / "tensorwise"), rel=COMPOSED_RTOL)


def test_fp8_modules_are_float8_linears_in_blocks_only():
    from keel.train.config import PrecisionConfig
    from keel.model.backbone import TransformerConfig
    from keel.model.registry import build_model
    from keel.train.precision import apply_fp8

    model = build_model(TransformerConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4), "cpu")
    apply_fp8(model, PrecisionConfig(fp8="torchao", fp8_min_features=16), fsdp=False)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if "Linear" in type(m).__name__}
    assert set(kinds.values()) == {"Float8Linear"} and len(kinds) == 2 * 7


def test_fp8_leaves_small_linears_in_high_precision():
    """The size filter (precision.fp8_min_features): a linear is converted only when both of its
    dims reach the minimum."""
    from keel.model.backbone import TransformerConfig
    from keel.model.registry import build_model
    from keel.train.config import PrecisionConfig
    from keel.train.precision import apply_fp8

    model = build_model(TransformerConfig(vocab_size=128, dim=128, n_layers=1, n_heads=4, n_kv_heads=1,
                                          ffn_dim=256), "cpu")
    apply_fp8(model, PrecisionConfig(fp8="torchao", fp8_min_features=128), fsdp=False)
    converted = sorted(name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear")
    # wq, wo: 128 x 128; w1, w2, w3: 128 x 256; wk, wv: 128 x 32 stay in high precision
    assert converted == sorted(f"layers.0.{n}" for n in ("attention.wq", "attention.wo", "feed_forward.w1",
                                                          "feed_forward.w2", "feed_forward.w3"))


def test_te_with_tp_or_activation_checkpointing_is_refused():
    import keel
    from keel.errors import ConfigError

    with pytest.raises(ConfigError, match="precision.fp8: te with parallel.tp = 2"):
        keel.load_recipe(TINY_RECIPE, ["precision.fp8=te", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="precision.fp8: te with parallel.activation_checkpoint = selective"):
        keel.load_recipe(TINY_RECIPE, ["precision.fp8=te", "parallel.activation_checkpoint=selective"])


def test_te_without_transformer_engine_is_a_clear_error(tmp_path):
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine is installed here; the GPU test below covers it")
    except ImportError:
        pass
    error = keel_refusal(["train", TINY_RECIPE, *small_run_overrides(tmp_path, **{"precision.fp8": "te"})])
    assert "precision.fp8: te needs Transformer Engine" in error and "keel[gpu]" in error


def test_bad_fp8_recipe_names_the_key():
    import keel
    from keel.errors import ConfigError
    with pytest.raises(ConfigError, match="precision.fp8_recipe: 'delayed' is not a torchao recipe"):
        keel.load_recipe(TINY_RECIPE, ["precision.fp8=torchao", "precision.fp8_recipe=delayed"])
    with pytest.raises(ConfigError, match="precision.fp8_recipe: set precision.fp8"):
        keel.load_recipe(TINY_RECIPE, ["precision.fp8_recipe=rowwise"])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="Transformer Engine FP8 needs an NVIDIA Hopper GPU; CI has none")
def test_te_fp8_tracks_bf16_on_hopper(tmp_path):
    pytest.importorskip("transformer_engine")
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "bf16", **{"precision.dtype": "bf16"})])
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path / "te", **{
        "precision.dtype": "bf16", "precision.fp8": "te"})])
    assert losses(tmp_path / "te") == pytest.approx(losses(tmp_path / "bf16"), rel=0.01)


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about():
    """The warning appears exactly where torch's oneDNN takes no bf16 matmul (this machine's CPU
    decides which way), names the key, and never concerns a GPU."""
    import time

    from keel.train.precision import slow_bf16_warning

    warning = slow_bf16_warning("precision.dtype", torch.device("cpu"))
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert (warning is None) == native
    assert slow_bf16_warning("precision.dtype", torch.device("cuda")) is None
    if warning is not None:
        assert warning.startswith("keel: warning: precision.dtype asks for bf16")
        a, b = torch.randn(256, 512), torch.randn(512, 1024)
        timed = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            x @ y  # warm-up
            t0 = time.perf_counter()
            for _ in range(2):
                x @ y
            timed[dtype] = time.perf_counter() - t0
        assert timed[torch.bfloat16] > 3 * timed[torch.float32]  # what the warning says, measured here
