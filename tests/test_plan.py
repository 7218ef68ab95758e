"""`keel plan`: per-rank memory traced on fake tensors, checked against a recount of the config's
parameters and against the memory a real tiny training step allocates."""
import json
import re

import pytest
import torch
from conftest import REPO
from torch.distributed._tools.mem_tracker import MemTracker

import keel
from keel.cli import main
from keel.model.registry import build_model, get_model_spec
from keel.train.optim import build_optimizer
from keel.train.plan import GIB, fake_batch, plan_memory

LLAMA_1B = str(REPO / "recipes/lm/llama-1b-h100.yaml")
TINY = str(REPO / "recipes/lm/tiny.yaml")
# Tracing costs time per op: FP8 off and, for Llama 3 8B's shape, 8 of its 32 layers keep this file under
# a minute on a busy 2-core machine. (The full 8B plans, FP8 on, are in BENCHMARKS.md.)
NO_FP8 = ["precision.fp8='off'"]
LLAMA_8B = ["model.dim=4096", "model.n_layers=8", "model.n_heads=32", "model.n_kv_heads=8",
            "model.ffn_dim=14336", "model.vocab_size=128256", *NO_FP8]
# The tiny recipe's traced prediction must be within this factor of a real step's measured peak.
# Half its batch (still two micro-batches a step) halves the real step's CPU time.
TINY_FACTOR = 1.5
TINY_HALF_BATCH = ["train.micro_batch=4", "train.global_batch=8"]


def table_gib(text: str) -> dict:
    """{row name: GiB} from the printed table."""
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"^ {2,4}(\S[^\d]*?)\s+(\d+\.\d\d)   ", text, re.MULTILINE)}


def plan_table(capsys, recipe, overrides, world, *flags) -> str:
    main(["plan", recipe, *overrides, "--world", str(world), *flags])
    return capsys.readouterr().out


def test_llama_1b_on_8_ranks_shards_every_weight_8_ways(capsys):
    out = plan_table(capsys, LLAMA_1B, NO_FP8, 8)
    rows = table_gib(out)
    n_params = keel.load_recipe(LLAMA_1B).model.num_params()
    assert rows["parameters"] == pytest.approx(n_params * 4 / 8 / GIB, rel=0.03)  # fp32 shards
    assert rows["gradients"] == pytest.approx(rows["parameters"], rel=0.01)
    assert rows["optimizer state"] == pytest.approx(2 * rows["parameters"], rel=0.01)  # AdamW: two moments
    assert 0 < rows["activations (peak)"] < rows["total (peak)"] < 80
    assert "fits" in out and "dp_shard=8" in out


def test_llama_8b_shape_on_8_and_64_ranks(capsys):
    eight, sixty_four = (table_gib(plan_table(capsys, LLAMA_1B, LLAMA_8B, w)) for w in (8, 64))
    n_params = keel.load_recipe(LLAMA_1B, LLAMA_8B).model.num_params()
    assert n_params == pytest.approx(2.80e9, rel=0.01)  # 8B's embeddings, head and 8 of its layers
    for world, rows in ((8, eight), (64, sixty_four)):
        assert rows["parameters"] == pytest.approx(n_params * 4 / world / GIB, rel=0.03)
    # One micro-batch's activations do not depend on how the weights are sharded.
    assert sixty_four["activations (peak)"] == pytest.approx(eight["activations (peak)"], rel=0.01)
    assert sixty_four["total (peak)"] < eight["total (peak)"]


def test_json_and_a_warning_when_it_does_not_fit(capsys):
    out = plan_table(capsys, LLAMA_1B, ["train.micro_batch=16", "train.global_batch=128", "precision.fp8='off'",
                                        "parallel.activation_checkpoint=none"], 8, "--json")
    plan = json.loads(out)
    rank = plan["ranks"][0]
    assert rank["fits"] is False and rank["peak_bytes"] > 80 * GIB
    assert any(n.startswith("warning: every rank needs") for n in plan["notes"])


@pytest.mark.parametrize("args, message", [
    (["--world", "8", "--gpu", "h100-40gb"], "--gpu: unknown GPU 'h100-40gb'"),
    (["parallel.tp=4", "--world", "6"], "parallel: pp*dp_replicate*cp*tp = 4 does not divide the world size 6"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", LLAMA_1B, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def measured_tiny_peak(cfg) -> int:
    """Peak bytes of a real step of the tiny recipe on CPU (two steps, so the optimizer state exists,
    each with the recipe's micro-batches), as torch's MemTracker sees every tensor allocated."""
    spec = get_model_spec(cfg.model.name)
    model = build_model(cfg.model)
    optimizer, _ = build_optimizer(model, cfg.optim, cfg.train.steps)
    task = spec.task(cfg)
    batch = fake_batch(cfg)
    batch["input_ids"] = torch.randint(0, cfg.model.vocab_size, batch["input_ids"].shape)
    batch["labels"] = batch["input_ids"].roll(-1, dims=1)
    tracker = MemTracker()
    tracker.track_external(model, optimizer, *batch.values())
    with tracker:
        for _ in range(2):
            for _ in range(cfg.train.global_batch // cfg.train.micro_batch):
                tracker.reset_mod_stats()  # per-module stats of one call at a time; the peak is kept
                task.loss_sum(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_tiny_prediction_is_close_to_a_real_step(capsys):
    cfg = keel.load_recipe(TINY, TINY_HALF_BATCH)
    predicted = plan_memory(cfg, 1, "cpu").ranks[0].peak_bytes
    measured = measured_tiny_peak(cfg)
    print(f"tiny: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert measured / TINY_FACTOR <= predicted <= measured * TINY_FACTOR


@pytest.mark.parametrize("layout, note", [
    (["parallel.pp=2"], "parallel.pp=2: one stage traced alone (2 layers"),
    (["parallel.tp=2"], "parallel.tp=2 cp=1: "),
    (["parallel.dp_replicate=4", "parallel.dp_shard=1", "train.global_batch=32"], "(DDP): one replica traced"),
])
def test_layouts_that_do_not_trace_whole_say_what_was_estimated(layout, note):
    plan = plan_memory(keel.load_recipe(TINY, layout), 4, "cpu")
    assert any(note in n for n in plan.notes), plan.notes
    assert plan.ranks[0].peak_bytes > 0 and plan.ranks[0].fits


ONEREC_MOE = str(REPO / "recipes/recsys/onerec-v2-4b-a0.5b-moe-h100.yaml")


def test_onerec_moe_cluster_recipe_fits_its_node(capsys):
    """A recommendation family's task gives the traced batch (context items and SID targets) and MoE
    routing is traced as balanced (fake tensors carry no routing to count). Experts shard over dim 0:
    53 experts on 8 ranks pad to 56, so the shares are within 6% of an even split."""
    out = plan_table(capsys, ONEREC_MOE, ["train.micro_batch=8"], 8)
    rows = table_gib(out)
    cfg = keel.load_recipe(ONEREC_MOE)
    assert cfg.model.num_params() == pytest.approx(4.1e9, rel=0.03)  # 4B total ...
    assert cfg.model.num_params(active=True) == pytest.approx(0.57e9, rel=0.03)  # ... ~0.5B active
    assert rows["parameters"] == pytest.approx(cfg.model.num_params() * 4 / 8 / GIB, rel=0.06)
    assert "context 512 items, 5 target(s)" in out and "fits" in out


MOE_TINY = str(REPO / "recipes/lm/moe-tiny.yaml")


def test_expert_parallel_weights_are_counted_like_fsdp_shards():
    """Experts under ep are not FSDP's (its tracker does not see them): on 2 ranks, ep2 holds half the
    experts where FSDP holds half of every weight, so both layouts must show the same bytes."""
    fsdp, ep = ({row.name: row.bytes for row in plan_memory(keel.load_recipe(MOE_TINY, layout), 2, "cpu").ranks[0].rows}
                for layout in ([], ["parallel.ep=2"]))
    n_params = keel.load_recipe(MOE_TINY).model.num_params()
    assert fsdp["parameters"] == pytest.approx(n_params * 4 / 2, rel=0.05)
    for row in ("parameters", "gradients", "optimizer state"):
        assert ep[row] == pytest.approx(fsdp[row], rel=0.05), row


ONEREC_RL = str(REPO / "recipes/recsys/onerec-v2-1b-rl-h100.yaml")


def test_onerec_rl_cluster_recipe_lays_out_its_step(capsys):
    """An RL recipe is planned as its trainer's step (keel/rl/plan.py): each of 8 ranks holds 32 of
    the step's 256 users, 8 per forward (4 accumulated), their beams of 512 items scored with gradient
    and their RSFT loss. The shipped recipe fits its node, its weights sharded as for training, and the
    traced activations hold at least one forward's fp32 code logits (8 users x 512 items x every
    codebook's entries)."""
    out = plan_table(capsys, ONEREC_RL, [], 8)
    rows = table_gib(out)
    assert "micro_batch 8 x" in out and "a beam of 512 items" in out and "4 micro-batches" in out and "fits" in out
    cfg = keel.load_recipe(ONEREC_RL)
    assert rows["parameters"] == pytest.approx(cfg.model.num_params() * 4 / 8 / GIB, rel=0.03)
    beam_logits = 8 * 512 * sum(cfg.model.sid_levels) * 4 / GIB
    assert rows["activations (peak)"] > beam_logits


def test_an_rl_step_keel_plan_cannot_lay_out_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(REPO / "recipes/rl/dpo-tiny.yaml"), "--world", "1"])
    assert exit_info.value.code == 2
    assert "rl.trainer: keel plan lays out ['grpo', 'rec'] RL steps; 'dpo' is not planned yet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(REPO / "recipes/rl/grpo-tiny.yaml"), f"rl.policy={tmp_path / 'nowhere'}", "--world", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("keel: error: rl.policy: keel plan reads the policy's shape from it: ")


GRPO_TINY = str(REPO / "recipes/rl/grpo-tiny.yaml")


def test_grpo_plan_lays_out_the_policys_sequences_scored_in_chunks(capsys, monkeypatch):
    """A GRPO step is planned as one micro-batch of the update (keel/rl/grpo_plan.py): the rows are
    sequences (8 prompts x 8 samples = 64, 32 per rank on 2, 2 per forward: 16 accumulated), the
    shape is the policy's (SmolLM2-135M, read from rl.policy, not the recipe's model: section), the
    native engine's copy and the reference (rl.kl_coef > 0) are counted beside it, and
    the response tokens go through the head in chunks as the trainer scores them: with the chunk
    made as long as the micro-batch's responses, the traced activations grow by at least the fp32
    logits of the tokens the chunk no longer holds back."""
    from keel.rl.grpo_plan import GRPOStepPlan
    from keel.rl.plan import rl_step_plan
    from keel.rl.scoring import SCORE_CHUNK

    long_responses = ["rl.max_prompt_tokens=16", "rl.sampling.max_tokens=2048", "rl.micro_batch=2", "rl.kl_coef=0.01"]
    out = plan_table(capsys, GRPO_TINY, long_responses, 2)
    chunked = table_gib(out)
    assert "micro_batch 2 x (16 prompt + 2048 response tokens" in out and "16 micro-batches" in out
    policy = rl_step_plan(keel.load_recipe(GRPO_TINY), 1)[0].model
    assert policy.dim == 576 and policy.vocab_size == 49152  # SmolLM2-135M's
    assert chunked["parameters"] == pytest.approx(policy.num_params() * 4 / 2 / GIB, rel=0.03)
    # the native engine's whole bf16 copy on every rank, and its KV cache in the rollout note
    assert chunked["rollout engine weights"] == pytest.approx(policy.num_params() * 2 / GIB, abs=0.01)
    assert chunked["reference weights"] == chunked["parameters"]  # rl.kl_coef > 0: sharded like the policy
    cfg = keel.load_recipe(GRPO_TINY)
    kv = cfg.rl.engine_batch * (16 + 2048) * policy.n_layers * 2 * policy.n_kv_heads * policy.head_dim * 2 / GIB
    assert f"rl.engine_batch={cfg.rl.engine_batch} sequences of 2064 tokens is {kv:.1f} GiB" in out

    monkeypatch.setattr(GRPOStepPlan, "chunk", 1 << 30)
    whole = table_gib(plan_table(capsys, GRPO_TINY, long_responses, 2))
    held_back = (2 * 2048 - SCORE_CHUNK) * policy.vocab_size * 4 / GIB
    assert whole["activations (peak)"] - chunked["activations (peak)"] > held_back
