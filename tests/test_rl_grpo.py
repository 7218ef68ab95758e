"""GRPO: config errors, exact resume, and a real rise in held-out accuracy on SmolLM2-135M."""
import json
import os
import subprocess
import sys

import pytest
import torch

import keel
from keel.errors import ConfigError
from tests.conftest import REPO, assert_weights_agree_to_rounding, read_metrics

RECIPE = REPO / "recipes" / "rl" / "grpo-tiny.yaml"
GOLONGRL = REPO / "recipes" / "rl" / "golongrl-qwen3-4b.yaml"


# ------------------------------------------------------------------ config validation

@pytest.mark.parametrize("override, message", [
    ("rl.group_size=1", "rl.group_size: GRPO needs at least 2 rollouts per prompt"),
    ("rl.engine=vlm", "rl.engine: unknown name 'vlm' (did you mean 'vllm'?)"),
    ("rl.advantage=tmn_reweigh", "rl.advantage: unknown advantage estimator 'tmn_reweigh' (did you mean 'tmn_reweight'?)"),
    ("rl.loss=ppo_clipp", "rl.loss: unknown name 'ppo_clipp' (did you mean 'ppo_clip'?)"),
    ("rl.trainer=grp", "rl.trainer: unknown name 'grp' (did you mean 'grpo'?)"),
    ("rl.loss_cfg.clip_hi=0.3", "rl.loss_cfg.clip_hi: not an option of loss 'ppo_clip'"),
    ("rl.sampling.top_p=0", "rl.sampling.top_p: must be in (0, 1]"),
    ("rl.group_siz=4", "rl.group_siz: unknown key (did you mean 'rl.group_size'?)"),
])
def test_bad_rl_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError) as err:
        keel.load_recipe(RECIPE, [override])
    assert message in str(err.value)


def test_recipes_validate_and_cli_exits_2():
    golong = keel.load_recipe(GOLONGRL)
    rl = golong.rl
    assert (rl.prompts_per_step, rl.group_size, rl.sampling.max_tokens) == (128, 16, 16384)
    assert (rl.loss_cfg["clip_low"], rl.loss_cfg["clip_high"], rl.loss_cfg["dual_clip"]) == (0.2, 0.28, 3.0)
    assert (golong.optim.lr, golong.optim.warmup_steps, golong.optim.weight_decay) == (2e-6, 5, 0.1)
    assert rl.advantage == "tmn_reweight" and rl.advantage_cfg["difficulty_smooth_alpha"] == 0.8
    assert rl.dynamic_sampling and rl.max_gen_batches == 32 and rl.kl_coef == 0 and rl.entropy_coef == 0
    proc = subprocess.run([sys.executable, "-m", "keel", "rl", str(RECIPE), "rl.group_size=1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "keel: error: rl.group_size: GRPO needs at least 2 rollouts per prompt, got 1"]


# ------------------------------------------------------------------ exact resume (tiny model)

@pytest.fixture(scope="module")
def tiny_policy(module_tmp):
    """A small random Llama with SmolLM2's real tokenizer, as a keel checkpoint."""
    from transformers import AutoTokenizer

    from keel.data.assets import asset_path
    from keel.model.backbone import Transformer, TransformerConfig
    from keel.checkpoint.model_io import write_model_checkpoint

    torch.manual_seed(0)
    cfg = TransformerConfig(name="llama", vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    model = Transformer(cfg)
    model.init_weights()
    out = module_tmp
    tokenizer = AutoTokenizer.from_pretrained(asset_path("smollm2"))
    write_model_checkpoint(out, cfg, model.state_dict(), tokenizer=tokenizer)
    return out


def _length_reward():
    # Random tokens earn no arithmetic reward; a graded, deterministic score of the response keeps
    # advantages non-zero so resume is checked on real updates. (Rewards are an open registry.)
    from keel.rl.rewards import REWARDS, register_reward
    if "test_length_mod" not in REWARDS:
        register_reward("test_length_mod")(lambda text, item: (len(text) % 5) / 4)


def _tiny_overrides(out_dir, policy, prompts, **extra):
    settings = {"run.out_dir": str(out_dir), "rl.policy": str(policy), "rl.steps": 4, "rl.prompts_per_step": 3,
                "rl.group_size": 4, "rl.sampling.max_tokens": 6, "rl.engine_batch": 5, "rl.micro_batch": 5,
                "rl.mini_batches": 2, "rl.eval_prompts": "null", "rl.kl_coef": 0.01, "rl.entropy_coef": 0.001,
                "rl.prompts": json.dumps({"source": "jsonl", "path": str(prompts), "reward": "test_length_mod"}),
                "optim.lr": 1e-3, "logging.wandb": "disabled", "logging.progress": False, "checkpoint.every": 0}
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


# Runs one GRPO recipe in a fresh process, with the test's length reward registered (exit 75 when preempted).
_KILLED_RUN = """
import sys
import keel
from keel.rl.grpo import GRPOTrainer
from keel.rl.rewards import register_reward
register_reward("test_length_mod")(lambda text, item: (len(text) % 5) / 4)
summary = GRPOTrainer(keel.load_recipe(sys.argv[1], sys.argv[2:])).train()
sys.exit(75 if summary.get("preempted") else 0)  # as `keel rl` does
"""


def _train(overrides):
    from keel.rl.grpo import GRPOTrainer
    return GRPOTrainer(keel.load_recipe(RECIPE, overrides)).train()


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_policy):
    """SIGKILL midway through step 3 (gradients computed, update not applied), resume from the
    step-2 checkpoint: rewards, losses, grad norms and the final weights equal an uninterrupted run."""
    _length_reward()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "answer": "x"}) + "\n"
                               for w in ("the sea", "bread", "a king", "rain", "gold", "a horse", "wine")))
    _train(_tiny_overrides(tmp_path / "full", tiny_policy, prompts))
    # The killed half runs in its own process (SIGKILL takes the whole process down), checkpointing
    # every step; the resumed half runs here and picks up its newest checkpoint.
    killed = _tiny_overrides(tmp_path / "resumed", tiny_policy, prompts, **{"checkpoint.every": 1})
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(RECIPE), *killed], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "KEEL_FAULT_KILL_AT_STEP": "3"})
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, not a clean stop
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2]
    _train(killed)  # resumes from step_2 (checkpoint.resume: auto)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for key in ("reward/mean", "loss", "grad_norm", "policy/advantage_abs_mean", "loss/kl", "policy/entropy", "rollout/tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert len({r["reward/mean"] for r in full}) > 1 and any(r["policy/advantage_abs_mean"] > 0 for r in full)
    w_full, w_resumed = keel.load(tmp_path / "full").state_dict(), keel.load(tmp_path / "resumed").state_dict()
    start = keel.load(tiny_policy).state_dict()
    assert any(not torch.equal(w_full[k], start[k]) for k in start)  # it trained
    for name in w_full:
        assert torch.equal(w_full[name], w_resumed[name]), name


# ------------------------------------------------------------------ real learning (SmolLM2-135M)

def test_grpo_raises_heldout_arithmetic_accuracy(tmp_path):
    """Real GRPO on reasoning-gym basic_arithmetic with the real SmolLM2-135M-Instruct, exactly as the
    recipe sets it up (8 prompts x 8 rollouts, <= 10 tokens, lr 1e-5, bf16 autocast and a bf16
    engine): after 20 steps, greedy accuracy on the 64 held-out prompts rises by at least 0.15.
    Measured on a 2-core AMD EPYC (AVX2): 0.125 -> 0.435 with train.seed 0 and 0.125 -> 0.451 with
    seed 1 (0.31 / 0.23 at step 10). Fewer steps are not a reliable check: 6 steps in fp32 gave
    +0.23 with one stream of sampling draws and -0.02 with another, and bf16 trajectories differ
    between CPUs (AMX, AVX512-BF16, AVX2), so the bar is half the smaller measured rise."""
    _train([f"run.out_dir={tmp_path}", "logging.wandb=disabled", "logging.progress=false", "rl.steps=20",
            "rl.eval_every=0", "checkpoint.every=0"])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(21))
    before, after = rows[0]["eval_accuracy"], rows[-1]["eval_accuracy"]
    print(f"held-out greedy accuracy {before:.3f} -> {after:.3f}; train reward by step "
          f"{[round(r['reward/mean'], 3) for r in rows[1:]]}")
    assert after >= before + 0.15


def test_overlong_prompts_are_filtered_before_templating_or_cut_when_asked(tmp_path, tiny_policy):
    """rl.overlong_prompts: filter drops prompts whose templated length exceeds rl.max_prompt_tokens
    (counted here independently with the tokenizer's chat template); truncate_left keeps them all."""
    from keel.errors import ConfigError
    from keel.rl.grpo import GRPOTrainer

    _length_reward()
    words = ["rain", "the old king of the northern hills and all his horses " * 6, "gold"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "answer": "x"}) + "\n" for w in words))
    tokenizer = keel.load_tokenizer(tiny_policy)
    lengths = [len(tokenizer.encode(tokenizer.hf.apply_chat_template(
        [{"role": "user", "content": f"Say something about {w}."}], tokenize=False, add_generation_prompt=True)))
        for w in words]
    limit = (max(lengths) + min(lengths)) // 2  # the long prompt alone is over it
    trainer = GRPOTrainer(keel.load_recipe(RECIPE, _tiny_overrides(tmp_path / "f", tiny_policy, prompts,
                                                                   **{"rl.max_prompt_tokens": limit})))
    assert sorted(it.prompt for it in trainer.prompts.items) == sorted(f"Say something about {w}." for w in (words[0], words[2]))
    kept = GRPOTrainer(keel.load_recipe(RECIPE, _tiny_overrides(tmp_path / "t", tiny_policy, prompts, **{
        "rl.max_prompt_tokens": limit, "rl.overlong_prompts": "truncate_left"})))
    assert len(kept.prompts.items) == 3
    assert max(len(kept.encode_prompt(it.prompt)) for it in kept.prompts.items) == limit
    with pytest.raises(ConfigError, match="rl.prompts: every prompt is longer than rl.max_prompt_tokens = 3"):
        GRPOTrainer(keel.load_recipe(RECIPE, _tiny_overrides(tmp_path / "n", tiny_policy, prompts,
                                                             **{"rl.max_prompt_tokens": 3})))


# ------------------------------------------------------------------ many ranks (FSDP2, gloo)

@pytest.mark.parametrize("layout_name", ["fsdp2", "fsdp2_one_step_off_policy", "tp2"])
def test_two_rank_fsdp_run_equals_one_process_and_resumes_on_one(tmp_path, tiny_policy, layout_name):
    """GRPO under torchrun with FSDP2 over 2 ranks (each generating its share of the prompts, each
    training on its share of every mini-batch in packed token-budget micro-batches) logs the same
    rollouts, rewards, loss and grad norm as one process and ends on the same weights; its 2-step
    run, continued on one process, goes on exactly as the one-process run did. With tp2 both ranks
    hold every sequence and half of each block's weights. Off-policy (rollouts generated in a
    thread, gathered over their own group beside FSDP's collectives) the 2-rank run does all 4
    steps: its last step makes no rollouts ahead, so its 2-step run would not continue as the
    4-step one."""
    off_policy = layout_name.endswith("off_policy")
    _length_reward()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me of {w}.", "answer": "x"}) + "\n"
                               for w in ("the sea", "bread", "a king", "rain", "gold", "a horse", "wine", "salt")))
    # 3 prompts x 3 samples = 9 sequences; mini-batches of 4 and 5 rows; 5 rows over 2 ranks = 3 + 2.
    # top_k 20: the random tiny model's next-token distribution is nearly flat over 49k tokens, where
    # fp32 rounding of the summed gradients (a different order on 2 ranks) can move a sampled token
    # by the following step; over 20 tokens a draw sits far from its neighbours' boundaries.
    layout = {"rl.prompts_per_step": 3, "rl.group_size": 3, "rl.micro_batch": 2, "rl.engine_batch": 4,
              "precision.dtype": "fp32", "rl.engine_dtype": "float32", "rl.sampling.top_k": 20,
              "rl.one_step_off_policy": off_policy}
    _train(_tiny_overrides(tmp_path / "one", tiny_policy, prompts, **layout))
    tokenizer = keel.load_tokenizer(tiny_policy)
    max_length = 6 + max(len(tokenizer.encode(tokenizer.hf.apply_chat_template(
        [{"role": "user", "content": json.loads(line)["prompt"]}], tokenize=False, add_generation_prompt=True)))
        for line in prompts.read_text().splitlines())
    script = tmp_path / "grpo_run.py"
    script.write_text(_KILLED_RUN)
    # The 2-rank half also forms micro-batches by a token budget (about two sequences each, packed
    # into one row): the ranks then differ in micro-batch counts and the short one runs fillers.
    two = _tiny_overrides(tmp_path / "two", tiny_policy, prompts, **layout,
                          **{"rl.steps": 4 if off_policy else 2, "rl.micro_batch_tokens": 2 * max_length})
    if layout_name == "tp2":
        two += ["parallel.tp=2", "parallel.sequence_parallel=false"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(RECIPE), *two], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    if not off_policy:
        _train(_tiny_overrides(tmp_path / "two", tiny_policy, prompts, **layout))  # resumes at step 2 on one process
    one, two_rows = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two_rows] == [1, 2, 3, 4]
    for a, b in zip(one, two_rows):
        for key in ("reward/mean", "rollout/tokens", "rollout/response_len_mean", "policy/advantage_abs_mean"):
            assert b[key] == a[key], (a["step"], key)
        for key in ("loss", "grad_norm", "loss/kl", "policy/entropy", "is/weight_mean", "is/weight_max", "is/logprob_abs_diff"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert len({r["reward/mean"] for r in one}) > 1  # the rewards, hence the updates, vary
    assert_weights_agree_to_rounding(keel.load(tmp_path / "one").state_dict(), keel.load(tmp_path / "two").state_dict())


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=2", "parallel.sequence_parallel: keel rl runs tensor parallelism without sequence parallelism"),
    ("parallel.pp=2", "parallel.pp: keel rl does not run pipeline parallelism yet"),
    ("parallel.cp=2", "parallel.cp: keel rl does not run context parallelism yet"),
])
def test_layouts_rl_cannot_run_are_one_clear_error(tmp_path, tiny_policy, override, message):
    from keel.rl.grpo import GRPOTrainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say something.", "answer": "x"}) + "\n")
    with pytest.raises(ConfigError, match=message):
        GRPOTrainer(keel.load_recipe(RECIPE, _tiny_overrides(tmp_path, tiny_policy, prompts) + [override]))


def test_preemption_signal_stops_on_a_checkpoint_and_marks_the_run(tmp_path, tiny_policy):
    """SIGUSR1 (SLURM's warning before preemption) mid-run: the run finishes its step, commits a
    checkpoint there, leaves PREEMPTED for the job script, exits 75; run again, it resumes there."""
    import signal
    import time

    _length_reward()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "answer": "x"}) + "\n"
                               for w in ("the sea", "bread", "a king")))
    overrides = _tiny_overrides(tmp_path / "run", tiny_policy, prompts, **{"rl.steps": 200})
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(RECIPE), *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    step = read_metrics(tmp_path / "run")[-1]["step"]
    assert 1 <= step < 200
    marker = json.loads((tmp_path / "run" / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGUSR1" and marker["step"] == step
    assert (tmp_path / "run" / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()
    assert "checkpointing after this step" in err


# ------------------------------------------------------------------ one-step off-policy rollouts

def _collect_with(tmp_path, name, checkpoint, prompts, extra, position=None):
    """The rollout metrics an on-policy trainer collects from `checkpoint`'s weights, at its prompt
    position (or `position`)."""
    from keel.rl.grpo import GRPOTrainer

    extra = {**extra, "rl.one_step_off_policy": False, "checkpoint.resume": str(checkpoint)}
    trainer = GRPOTrainer(keel.load_recipe(RECIPE, _tiny_overrides(tmp_path / name, checkpoint.parent.parent,
                                                                   prompts, **extra)))
    if position is not None:
        trainer.prompts.position = position
    return trainer.collect()[1]


def test_one_step_off_policy_trains_on_the_last_weights_rollouts_and_resumes_exactly(tmp_path, tiny_policy):
    """rl.one_step_off_policy: step k trains on rollouts made by the weights step k-1 started from
    (recounted: an on-policy collect from step k-2's checkpoint gives the same rollouts, and one from
    step k-1's does not); a resume from a mid-run checkpoint (which holds the ready rollouts)
    continues exactly."""
    with pytest.raises(ConfigError, match=r"rl.one_step_off_policy: .* set rl.is_cap > 0"):
        keel.load_recipe(RECIPE, ["rl.one_step_off_policy=true", "rl.is_cap=0"])
    _length_reward()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "answer": "x"}) + "\n"
                               for w in ("the sea", "bread", "a king", "rain", "gold", "a horse", "wine", "salt",
                                         "iron", "a ship", "snow", "fire", "a bell")))
    off = {"rl.one_step_off_policy": True, "checkpoint.every": 1, "checkpoint.keep_last": 10,
           "precision.dtype": "fp32", "rl.sampling.top_k": 20}
    _train(_tiny_overrides(tmp_path / "full", tiny_policy, prompts, **off))
    full = read_metrics(tmp_path / "full")
    assert [r["rollout/policy_lag"] for r in full] == [0, 1, 1, 1]
    # Step 3 trains on prompts 6..8 (3 per step, one step ahead), generated by the weights after step 1.
    step_1, step_2 = (tmp_path / "full" / "checkpoints" / f"step_{k}" for k in (1, 2))
    made_by_step_1 = _collect_with(tmp_path, "recount1", step_1, prompts, off)
    made_by_step_2 = _collect_with(tmp_path, "recount2", step_2, prompts, off, position=6)
    for key in ("reward/mean", "rollout/tokens", "rollout/logprob_mean"):
        assert made_by_step_1[key] == full[2][key], key
    assert made_by_step_2["rollout/logprob_mean"] != full[2]["rollout/logprob_mean"]  # the check can tell

    _train(_tiny_overrides(tmp_path / "resumed", tiny_policy, prompts, **off, **{"checkpoint.resume": str(step_2)}))
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("reward/mean", "rollout/logprob_mean", "loss", "grad_norm", "is/weight_mean", "loss/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    w_full, w_resumed = keel.load(tmp_path / "full").state_dict(), keel.load(tmp_path / "resumed").state_dict()
    for name in w_full:
        assert torch.equal(w_full[name], w_resumed[name]), name
