"""Mixture-of-Experts (keel/model/moe.py), expert parallelism (keel/train/expert_parallel.py) and
Qwen3-MoE interop (keel/model/hf_moe.py). CPU, fp32, gloo; small models.

Tolerances: logits vs transformers 1e-4 max abs (fp32; both sum the same experts in a different
order); layouts vs one process: tests/conftest.py's assert_same_training (loss rel 1e-5, weights
atol 5e-5).
"""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import keel
from conftest import TINY_RECIPE, assert_same_training, keel_refusal, read_metrics, run_keel, small_run_overrides
from keel.checkpoint.hf import export_hf, import_hf
from keel.errors import CheckpointError
from keel.model.backbone import Transformer, TransformerConfig
from keel.model.hf_moe import keel_to_hf_config, keel_to_hf_state_dict
from keel.model.moe import MoEConfig, MoEFeedForward, expert_ffn_grouped, expert_ffn_loop, load_imbalance
from keel.model.registry import get_model_spec, hf_named_tensors

LOGIT_TOL = 1e-4
MOE_RECIPE = TINY_RECIPE.parent / "moe-tiny.yaml"


def tiny_moe(**moe) -> Transformer:
    cfg = TransformerConfig(name="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                            moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "expert_dim": 16, **moe}))
    cfg.validate()
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    return model


# ------------------------------------------------------------------ the layer
def reference_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the sorted/grouped path must equal."""
    tokens = x.reshape(-1, x.shape[-1])
    _, _, chosen, weights = layer.route(tokens)
    e = layer.experts
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for slot in range(chosen.shape[1]):
            j = chosen[t, slot]
            h = F.silu(tokens[t] @ e.w1[j].T) * (tokens[t] @ e.w3[j].T)
            out[t] += weights[t, slot] * (h @ e.w2[j].T)
    if layer.shared is not None:
        out += layer.shared(tokens)
    return out.view_as(x)


@pytest.mark.parametrize("compute", ["grouped_mm", "loop"])
def test_dropless_one_expert_takes_every_token(compute):
    model = tiny_moe(top_k=1, n_shared_experts=1, expert_compute=compute)
    layer = model.layers["0"].feed_forward
    with torch.no_grad():  # every token prefers expert 2 by a wide margin
        layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    layer.train()
    x = torch.randn(3, 11, 32)
    out = layer(x)
    assert layer.take_load().tolist() == [0, 0, 33, 0]  # no capacity: all 33 tokens kept
    torch.testing.assert_close(out, reference_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_grouped_gemm_equals_the_loop_forward_and_backward():
    torch.manual_seed(1)
    w1, w3, w2 = (torch.randn(4, 16, 32, requires_grad=True), torch.randn(4, 16, 32, requires_grad=True),
                  torch.randn(4, 32, 16, requires_grad=True))
    x = torch.randn(20, 32, requires_grad=True)
    counts = [5, 0, 12, 3]  # an expert with no token, too
    grads = []
    for fn in (expert_ffn_grouped, expert_ffn_loop):
        y = fn(x, counts, w1, w3, w2)
        grads.append((y, *torch.autograd.grad(y.pow(2).sum(), (x, w1, w3, w2))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_balancing_bias_evens_a_skewed_router_and_takes_no_gradient(router):
    model = tiny_moe(n_experts=8, top_k=2, bias_update_rate=0.005, router=router)
    layer = model.layers["1"].feed_forward
    torch.manual_seed(0)
    with torch.no_grad():  # a router that sends every token to experts 0 and 1
        layer.router.weight.normal_(0, 0.05)
        layer.router.weight[:2] += 0.05
    x = torch.randn(4, 32, 32) + 1
    layer.train()
    imbalance = []
    for _ in range(60):
        layer(x).pow(2).sum().backward()
        assert layer.expert_bias.grad is None and not layer.expert_bias.requires_grad
        assert "feed_forward.expert_bias" not in dict(layer.named_parameters(prefix="feed_forward"))
        load = layer.take_load()
        imbalance.append(load_imbalance(load))
        layer.update_balance(load)
    print(f"\n{router}: max/mean load step 1 {imbalance[0]:.2f} -> steps 51-60 at most {max(imbalance[-10:]):.2f}")
    assert imbalance[0] == 4.0  # 2 of 8 experts take every token
    assert max(imbalance[-10:]) <= 1.5
    assert layer.router.weight.grad is not None  # the router itself still learns


def test_model_hooks_report_per_layer_load_and_aux_losses_add_to_the_loss():
    model = tiny_moe(first_dense_layers=1, aux_loss_coef=0.1, z_loss_coef=0.01, bias_update_rate=0.01)
    ids = torch.randint(0, 64, (2, 16))
    with_aux = model(ids, labels=ids)
    model.layers["1"].feed_forward.cfg.aux_loss_coef = model.layers["1"].feed_forward.cfg.z_loss_coef = 0.0
    without = model(ids, labels=ids)
    assert with_aux > without
    model.update_moe_balance()
    metrics = model.moe_metrics()
    assert set(metrics) == {"moe_load_max_mean/1", "moe_bias_norm/1"}  # layer 0 stays dense
    assert metrics["moe_load_max_mean/1"] >= 1.0 and metrics["moe_bias_norm/1"] == pytest.approx(0.02)


def test_flops_count_active_experts_only():
    cfg = TransformerConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=100,
                            moe=MoEConfig(n_experts=16, top_k=2, expert_dim=32, n_shared_experts=1))
    dense_active = TransformerConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=3 * 32, vocab_size=100)
    router = 2 * 64 * 16
    assert cfg.num_params(active=True) == dense_active.num_params() + router
    assert cfg.num_params() == sum(p.numel() for p in Transformer(cfg).parameters())
    assert cfg.flops_per_token(128) == dense_active.flops_per_token(128) + 6 * router


# ------------------------------------------------------------------ Qwen3-MoE interop
def test_qwen3_moe_import_and_export_match_transformers(tmp_path):
    hf_cfg = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6,
                            num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                            mlp_only_layers=[0], max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # random init leaves the router at zero (ties): give it a real one
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "keel")
    model = keel.load(ckpt)
    assert model.config.name == "qwen3_moe" and model.config.moe.layers == [1, 2]
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        want = hf(ids).logits
        diff = (model(ids) - want).abs().max().item()
        print(f"\nimport: max |logit diff| vs transformers = {diff:.2e}")
        assert diff < LOGIT_TOL
        export_hf(ckpt, tmp_path / "export")
        names = json.loads((tmp_path / "export" / "config.json").read_text())
        assert names["architectures"] == ["Qwen3MoeForCausalLM"] and names["mlp_only_layers"] == [0]
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
        diff = (back(ids).logits - want).abs().max().item()
        print(f"export: max |logit diff| of the re-loaded export = {diff:.2e}")
        assert diff < LOGIT_TOL


def test_weight_stream_for_vllm_equals_the_export():
    """The rollout engine's weight sync streams parameters one by one: stacked experts split into the
    Hub's per-expert tensors, exactly the tensors `keel export hf` writes (views, not copies)."""
    model = tiny_moe(bias_update_rate=0.0)
    model.config.name = "qwen3_moe"
    adapter = get_model_spec("qwen3_moe").hf
    streamed = dict(hf_named_tensors(adapter, model.named_parameters()))
    exported = keel_to_hf_state_dict(model.state_dict(), model.config)
    assert streamed.keys() == exported.keys() and "model.layers.1.mlp.experts.3.down_proj.weight" in streamed
    for name, tensor in exported.items():
        assert torch.equal(streamed[name], tensor), name
    w1 = model.layers["0"].feed_forward.experts.w1
    assert streamed["model.layers.0.mlp.experts.2.gate_proj.weight"].data_ptr() == w1[2].data_ptr()


def test_export_refuses_what_qwen3_moe_cannot_express(tmp_path):
    with pytest.raises(CheckpointError, match="model.moe.n_shared_experts"):
        keel_to_hf_config(TransformerConfig(dim=32, n_heads=4, qk_norm=True, moe=MoEConfig(n_shared_experts=1)))
    model = tiny_moe()
    with torch.no_grad():
        model.layers["0"].feed_forward.expert_bias[0] = 0.1
    with pytest.raises(CheckpointError, match="bias_update_rate=0"):
        keel_to_hf_state_dict(model.state_dict(), model.config)


# ------------------------------------------------------------------ expert parallelism and the recipe
MOE_SMALL = {"model.moe.expert_dim": 32, "model.n_layers": 3, "train.steps": 5, "checkpoint.every": 3}
EP_LAYOUTS = {"single": (1, {}), "ep2": (2, {"parallel.ep": 2}),
              "ep2_fsdp4": (4, {"parallel.ep": 2, "parallel.dp_shard": 4}),  # 2 replica groups of 2
              "tp2_no_sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": False}),
              "ep2_tp2": (4, {"parallel.ep": 2, "parallel.tp": 2, "parallel.dp_shard": 2}),  # sequence-parallel
              # layers 0-1 | 2, each stage with its own ep groups; stage 0 carries layer 1's aux loss
              "pp2_ep2": (4, {"parallel.pp": 2, "parallel.ep": 2, "parallel.dp_shard": 2}),
              "ep2_hsdp": (4, {"parallel.ep": 2, "parallel.dp_replicate": 2, "parallel.dp_shard": 2})}


@pytest.fixture(scope="module")
def moe_run(module_tmp):
    root, done = module_tmp, {}

    def get(name):
        if name not in done:
            nproc, extra = EP_LAYOUTS[name]
            run_keel(["train", str(MOE_RECIPE), *small_run_overrides(root / name, **{**MOE_SMALL, **extra})],
                     nproc=nproc)
            done[name] = root / name
        return done[name]
    return get


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["ep2", "ep2_fsdp4", "tp2_no_sp", "ep2_tp2", "pp2_ep2", "ep2_hsdp"])
def test_expert_parallel_matches_one_process(moe_run, layout):
    assert_same_training(moe_run("single"), moe_run(layout))
    got, want = read_metrics(moe_run(layout))[-1], read_metrics(moe_run("single"))[-1]
    for layer in ("1", "2"):  # under pp the layers live on different ranks
        assert got[f"moe_load_max_mean/{layer}"] == want[f"moe_load_max_mean/{layer}"]


@pytest.mark.distributed
@pytest.mark.parametrize("saved, resumed", [("ep2", "single"), ("ep2_tp2", "single"), ("single", "ep2")])
def test_expert_parallel_checkpoint_resumes_in_another_layout(moe_run, tmp_path, saved, resumed):
    """Experts are saved whole (DTensors split on dim 0 over ep and on their width over tp), so step 3
    of one layout continues in another exactly as one process would have."""
    shutil.copytree(moe_run(saved) / "checkpoints" / "step_3", tmp_path / "checkpoints" / "step_3")
    nproc, extra = EP_LAYOUTS[resumed]
    run_keel(["train", str(MOE_RECIPE), *small_run_overrides(tmp_path, **{**MOE_SMALL, **extra})], nproc=nproc)
    assert_same_training(moe_run("single"), tmp_path, steps=(4, 5))


def test_moe_tiny_recipe_learns_real_text(tmp_path):
    run_keel(["train", str(MOE_RECIPE), f"run.out_dir={tmp_path}", "train.steps=20", "train.micro_batch=8",
              "train.global_batch=8", "train.eval_every=0", "train.eval_batches=2", "train.sample_tokens=0",
              "checkpoint.every=0", "logging.wandb=disabled", "logging.progress=false", "optim.warmup_steps=5"])
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    print(f"\nmoe-tiny: loss {first:.3f} -> {last:.3f} (mean of steps 16-20); "
          f"max/mean load layer 3 {rows[-1]['moe_load_max_mean/3']:.2f}")
    assert last < first - 2.0
    assert {"moe_load_max_mean/1", "moe_bias_norm/3"} <= set(rows[-1]) and "moe_load_max_mean/0" not in rows[-1]


@pytest.mark.parametrize("overrides, message", [
    ({"model.moe.top_k": 9}, "model.moe.top_k: 9 exceeds model.moe.n_experts 8"),
    ({"parallel.ep": 3}, "parallel.ep: 3 does not divide model.moe.n_experts 8"),
    ({"parallel.ep": 2, "model.moe": "null"}, "parallel.ep: 2 needs a Mixture-of-Experts model (set model.moe)"),
    ({"parallel.tp": 2, "model.moe.expert_dim": 33}, "parallel.tp: 2 does not divide the experts' width 33"),
    ({"parallel.cp": 2}, "model.moe.aux_loss_coef: the sequence-level balance loss with parallel.cp = 2"),
    ({"parallel.compile": True}, "parallel.compile: not with model.moe yet"),
    ({"parallel.ep": 2, "parallel.dp_replicate": 2, "parallel.dp_shard": 1}, "parallel.ep: 2 does not divide parallel.dp_shard 1"),
    ({"parallel.engine": "deepspeed"}, "model.moe.bias_update_rate: aux-loss-free balancing is not wired"),
])
def test_bad_moe_settings_are_one_line_errors(tmp_path, overrides, message):
    assert message in keel_refusal(["train", MOE_RECIPE, *small_run_overrides(tmp_path, **overrides)])
