"""keel GRPO vs TRL's GRPOTrainer, side by side on CPU: the same model, task, prompts, group, batch,
precision and seed; seconds per step and held-out greedy accuracy after the same number of steps.

    pip install --target /tmp/trl-pkgs/site-packages --no-deps trl==1.16.0 datasets dill multiprocess pandas pyarrow
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/trl-pkgs/site-packages \
        python bench/rl_vs_trl.py --steps 5

TRL is not a keel dependency: `pip install trl==1.16.0` (beside torch/transformers/accelerate it adds
datasets, dill, multiprocess, pandas, pyarrow), or keep it out of the venv as above. The --target
folder's path must contain "site-packages": dill, which `datasets` uses to fingerprint a Dataset,
pickles modules found anywhere else by value and fails on pyarrow ("Can't pickle <class 'MonthDayNano'>").

Setup (from recipes/rl/grpo-tiny.yaml): SmolLM2-135M-Instruct, reasoning-gym basic_arithmetic
(2 one-digit terms), system prompt "Answer with just the number.", chat template, 8 prompts x 8
samples a step, at most 10 response tokens, temperature 1, PPO clip 0.2 / 0.28 (dual clip 3), token-mean
loss, no KL, AdamW lr 1e-5 constant, betas 0.9 / 0.99, grad clip 1.0, micro-batches of 16 sequences,
train.seed (0; the override `train.seed=1` reseeds both). Both run fp32 (an AVX2 CPU has no native bf16: bf16 matmuls there are ~30x slower) on
OMP_NUM_THREADS threads (1 unless set). Both see the same prompts in the same order (keel's
PromptStream order is handed to TRL as an unshuffled dataset) and are scored by keel's own
reasoning_gym reward. Both final policies are scored by the same evaluator: keel's
GRPOTrainer.evaluate() (greedy, 64 held-out prompts); TRL's policy is saved with save_pretrained
and loaded into keel as rl.policy.

Reported: mean seconds per step over the steps after the first (the first warms caches), split into
rollouts (the generate call), training (micro-batch forward + backward, clipping, optimizer step) and
the rest (templating, rewards, advantages, keel's weight push to its engine); the mean training
reward; held-out accuracy before and after. Not aligned: keel's truncated importance weights
(rl.is_cap: 2, trainer vs engine log-probs; ~1.0 in fp32) have no TRL counterpart without vLLM, and
each keeps its own optimizer kernel (keel: foreach AdamW; TRL: transformers' adamw_torch_fused).
"""
import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: it reads this once

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "rl" / "grpo-tiny.yaml"


def require_trl():
    """Fail before keel's half of the bench runs, in one line, when TRL cannot be imported."""
    try:
        import datasets  # TRL's GRPOTrainer takes a datasets.Dataset
        import trl
    except ImportError as exc:
        sys.exit(f"bench/rl_vs_trl.py: TRL is missing ({exc}); `pip install trl==1.16.0` "
                 f"(or `pip install --target DIR/site-packages trl==1.16.0 datasets` and set PYTHONPATH)")
    return trl, datasets


def keel_config(out: Path, steps: int, overrides: list[str]):
    import keel
    return keel.load_recipe(RECIPE, [
        f"run.out_dir={out}", "checkpoint.resume=never", "checkpoint.every=0", "logging.wandb=disabled",
        "logging.progress=false", f"rl.steps={steps}",
        # fp32 everywhere: the recipe's bf16 is for CPUs with AMX/AVX512-BF16; TRL runs fp32 too.
        "precision.dtype=fp32", "rl.engine_dtype=float32", *overrides])


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------ keel

def run_keel(out: Path, steps: int, overrides: list[str]) -> dict:
    from keel.rl.grpo import GRPOTrainer

    t_setup = time.perf_counter()
    trainer = GRPOTrainer(keel_config(out / "keel", steps, overrides))
    setup_s = time.perf_counter() - t_setup
    before = trainer.evaluate()["eval_accuracy"]
    step_s, rollout_s, train_s, reward, grad_norm = [], [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()  # the same span `keel rl` logs as step_time_s (keel/rl/run.py)
        row = trainer.train_step()
        trainer.step += 1
        step_s.append(time.perf_counter() - t0)
        rollout_s.append(row["rollout/time_s"])
        train_s.append(row["train_time_s"])  # micro-batch forward + backward and the optimizer step
        reward.append(row["reward/mean"])
        grad_norm.append(row["grad_norm"])
        print(f"keel step {trainer.step}: {step_s[-1]:.1f} s (rollout {rollout_s[-1]:.1f} s), "
              f"train reward {reward[-1]:.3f}, grad norm {grad_norm[-1]:.2f}", flush=True)
    after = trainer.evaluate()["eval_accuracy"]
    # What TRL gets: keel's prompts in keel's order, and the exact templated prompt ids to check against.
    items = [trainer.prompts.item_at(i) for i in range(steps * trainer.rl.prompts_per_step)]
    ids = [trainer.encode_prompt(it.prompt) for it in items]
    system = trainer.rl.system_prompt
    del trainer
    gc.collect()
    return {"setup_s": setup_s, "step_s": step_s, "rollout_s": rollout_s, "train_s": train_s, "reward": reward,
            "before": before, "after": after, "items": items, "ids": ids, "system": system}


def keel_accuracy_of(folder: Path, out: Path, overrides: list[str]) -> float:
    """Held-out greedy accuracy of an HF model folder, by keel's evaluator (the same as for keel's run)."""
    from keel.rl.grpo import GRPOTrainer

    trainer = GRPOTrainer(keel_config(out, 1, [*overrides, f"rl.policy={folder}"]))
    accuracy = trainer.evaluate()["eval_accuracy"]
    del trainer
    gc.collect()
    return accuracy


# ------------------------------------------------------------------------------------------- TRL

def run_trl(out: Path, steps: int, k: dict, cfg) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from keel.data.assets import asset_path
    from keel.rl.rewards import get_reward

    rl, items = cfg.rl, k["items"]
    folder = asset_path("smollm2")
    t_setup = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # fp32 explicitly: the checkpoint's config says bfloat16, which from_pretrained would otherwise keep.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    turns = [[{"role": "system", "content": k["system"]}, {"role": "user", "content": it.prompt}] for it in items]
    # TRL templates the conversation itself; check it yields the token ids keel generates from.
    trl_ids = [tokenizer.apply_chat_template(t, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for t in turns]
    same_ids = sum(list(a) == list(b) for a, b in zip(trl_ids, k["ids"]))
    dataset = Dataset.from_list([{"prompt": t, "item_index": i} for i, t in enumerate(turns)])

    def keel_reward(prompts, completions, item_index, **_):
        """keel's own reasoning_gym reward, on the same PromptItem keel scored."""
        return [float(get_reward(items[i].reward)(c[0]["content"], items[i])) for c, i in zip(completions, item_index)]

    micro = rl.micro_batch
    group_batch = rl.prompts_per_step * rl.group_size
    args = GRPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, bf16=False, fp16=False, seed=cfg.train.seed,
        max_steps=steps, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        # One optimizer step = 8 prompts x 8 samples, generated at once, trained in micro-batches of 16
        # (keel's rl.micro_batch), one update per generation batch (keel's mini_batches: 1).
        num_generations=rl.group_size, per_device_train_batch_size=micro,
        gradient_accumulation_steps=group_batch // micro, num_iterations=1,
        shuffle_dataset=False,  # the dataset is already in keel's prompt order
        max_completion_length=rl.sampling.max_tokens, temperature=rl.sampling.temperature,
        top_p=rl.sampling.top_p, top_k=rl.sampling.top_k,
        beta=0.0, loss_type="dapo",  # no KL; token mean over the whole batch = keel's loss_agg token_mean
        epsilon=rl.loss_cfg["clip_low"], epsilon_high=rl.loss_cfg["clip_high"],
        delta=rl.loss_cfg.get("dual_clip", 3.0),  # TRL's two-sided clip caps A<0 losses like keel's dual clip
        scale_rewards="group",  # (r - mean) / (std + eps) per prompt, unbiased std: keel's `grpo` estimator
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.train.grad_clip,
        use_vllm=False,  # no vLLM on CPU: TRL generates with transformers' generate()
        # keel keeps every activation; TRL's default (True) recomputes them in backward, slower.
        gradient_checkpointing=False,
        dataloader_num_workers=0, log_completions=False)

    marks = []

    class StepClock(TrainerCallback):
        """Wall time between consecutive optimizer steps (the first from the start of training)."""
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=keel_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepClock()])
    # TRL logs its profiling timers only to wandb/mlflow/trackio: time its generate call (the rollouts)
    # and the whole generate-and-score pass (templating, rollouts, rewards, advantages) here.
    gen_s, prep_s = [], []

    def timed(fn, into):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            result = fn(*a, **kw)
            into.append(time.perf_counter() - t0)
            return result
        return wrapper

    trainer._generate_single_turn = timed(trainer._generate_single_turn, gen_s)
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, prep_s)
    setup_s = time.perf_counter() - t_setup
    trainer.train()
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    logged = [row for row in trainer.state.log_history if "reward" in row]  # logging_steps=1: one per step
    reward = [row["reward"] for row in logged]
    for i, (s, g, row) in enumerate(zip(step_s, gen_s, logged), 1):
        print(f"TRL step {i}: {s:.1f} s (rollout {g:.1f} s), train reward {row['reward']:.3f}, "
              f"grad norm {row['grad_norm']:.2f}", flush=True)
    saved = out / "trl-final"
    trainer.model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    del trainer, model
    gc.collect()
    # The rest of each step is the micro-batches' forward + backward, clipping and the optimizer step.
    train_s = [s - p for s, p in zip(step_s, prep_s)]
    return {"setup_s": setup_s, "step_s": step_s, "rollout_s": gen_s, "train_s": train_s, "reward": reward,
            "folder": saved,
            "same_ids": same_ids}


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="/tmp/keel-bench-rl-vs-trl")
    p.add_argument("overrides", nargs="*", help="extra keel recipe overrides (applied to both where they map)")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2: the first step is left out of the means")
    trl, datasets = require_trl()
    import torch
    import transformers

    out = Path(args.out)
    load = [os.getloadavg()[0]]  # the machine may be shared: the 1-minute load before and after each run
    t_all = time.perf_counter()
    cfg = keel_config(out / "keel", args.steps, args.overrides)
    k = run_keel(out, args.steps, args.overrides)
    keel_wall = time.perf_counter() - t_all
    load.append(os.getloadavg()[0])
    t0 = time.perf_counter()
    t = run_trl(out, args.steps, k, cfg)
    t["after"] = keel_accuracy_of(t["folder"], out / "eval-trl", args.overrides)
    trl_wall = time.perf_counter() - t0
    load.append(os.getloadavg()[0])

    n = args.steps
    print(f"\nkeel GRPO vs TRL {trl.__version__} GRPOTrainer: SmolLM2-135M-Instruct, basic_arithmetic, "
          f"{cfg.rl.prompts_per_step} prompts x {cfg.rl.group_size}, <= {cfg.rl.sampling.max_tokens} tokens, fp32, "
          f"{n} steps, {torch.get_num_threads()} thread(s); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, datasets {datasets.__version__}")
    print(f"templated prompt ids identical for TRL and keel: {t['same_ids']} of {len(k['ids'])}")
    rows = [(f"s / step (mean of steps 2..{n})", mean(k["step_s"][1:]), mean(t["step_s"][1:])),
            ("  of which rollout s", mean(k["rollout_s"][1:]), mean(t["rollout_s"][1:])),
            ("  of which training s", mean(k["train_s"][1:]), mean(t["train_s"][1:])),
            ("  of which the rest s", *(mean(r["step_s"][1:]) - mean(r["rollout_s"][1:]) - mean(r["train_s"][1:])
                                        for r in (k, t))),
            ("s step 1 (cold)", k["step_s"][0], t["step_s"][0]),
            (f"train reward (mean of steps 1..{n})", mean(k["reward"]), mean(t["reward"])),
            ("held-out accuracy, start (same weights)", k["before"], k["before"]),
            (f"held-out accuracy, after {n} steps", k["after"], t["after"])]
    print(f"{'':40}{'keel':>10}{'TRL':>10}{'keel/TRL':>10}")
    for name, a, b in rows:
        ratio = f"{a / b:10.2f}" if name.startswith(("s ", "  ")) and b else ""
        print(f"{name:40}{a:10.3f}{b:10.3f}{ratio}")
    speedup = mean(t["step_s"][1:]) / mean(k["step_s"][1:])
    print(f"keel is {speedup:.2f}x {'faster' if speedup >= 1 else 'slower'} per step than TRL "
          f"(goal: >= 2x at equal accuracy)")
    print(f"wall: keel {keel_wall:.0f} s (setup {k['setup_s']:.0f} s, 2 evals), TRL {trl_wall:.0f} s "
          f"(setup {t['setup_s']:.0f} s, save + keel eval), total {time.perf_counter() - t_all:.0f} s; "
          f"1-min load {load[0]:.2f} at start, {load[1]:.2f} after keel, {load[2]:.2f} after TRL")


if __name__ == "__main__":
    main()
