"""`keel train`, `keel init`, `keel rl` and `keel generate`: run a recipe, write its initial weights,
sample from a checkpoint."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import keel
from keel.cli.common import OVERRIDES_HELP, recipe_epilog
from keel.errors import ConfigError


def _finished_run(cfg) -> tuple[int, Path] | None:
    """(step, checkpoint) when `checkpoint.resume: auto` would resume a run already at train.steps."""
    from keel.checkpoint.files import committed_checkpoints
    if cfg.checkpoint.resume != "auto":
        return None
    found = committed_checkpoints(Path(cfg.run.out_dir) / "checkpoints")
    if found and found[-1][0] >= cfg.train.steps:
        return found[-1]
    return None


def cmd_train(args) -> None:
    cfg = keel.load_recipe(args.recipe, args.overrides)
    if cfg.rl is not None:
        raise ConfigError(f"rl: {args.recipe} is an RL recipe (it has an rl: section); run it with "
                          f"`keel rl {args.recipe}`")
    if args.dry_run:
        from keel.cli.config import show_config
        return show_config(cfg, args.world)
    done = _finished_run(cfg)
    if done is not None:
        step, ckpt = done
        print(f"keel: {Path(cfg.run.out_dir).absolute()} is already at step {step}/{cfg.train.steps} "
              f"({ckpt.absolute()}); to train further raise train.steps (e.g. train.steps={2 * cfg.train.steps}), "
              f"or start a new run with run.out_dir=NEW_DIR")
        return
    from keel.train.engines import build_trainer
    from keel.train.faults import preempted_exit_code
    from keel.train.launch import shutdown_distributed

    trainer = build_trainer(cfg)
    summary = trainer.train()
    if summary.get("preempted"):  # checkpoint committed: exit so that the job can be requeued
        sys.exit(preempted_exit_code())
    # Leave the process group on every rank first: rank 0's sampling below loads the checkpoint,
    # and under a live process group that load is a collective the other, exited, ranks miss.
    shutdown_distributed()
    if not trainer.dist.is_main:
        return
    _print_sample(summary["checkpoint"], cfg)
    run_dir = os.path.abspath(cfg.run.out_dir)
    shown = " | ".join(f"{k.replace('_', ' ')} {summary[k]:.4f}" for k in ("loss", "eval_loss") if k in summary)
    print(f"\nfinal: {shown}" + (f" (ppl {summary['eval_ppl']:.1f})" if "eval_ppl" in summary else ""))
    print(f"run directory:   {run_dir}")
    print(f"  config:        {run_dir}/config.yaml")
    print(f"  metrics:       {run_dir}/metrics.jsonl   (keel plot {run_dir} --metric loss)")
    print(f"  checkpoint:    {os.path.abspath(summary['checkpoint'])}")
    if summary.get("wandb_dir"):
        print(f"  wandb run:     {os.path.abspath(summary['wandb_dir'])}")
    print(f"next: {trainer.task.next_steps(run_dir)}")


def cmd_rl(args) -> None:
    cfg = keel.load_recipe(args.recipe, args.overrides)
    if cfg.rl is None:
        raise ConfigError(f"rl: {args.recipe} has no rl section; `keel rl` runs RL recipes (recipes/rl/); "
                          f"train it with `keel train {args.recipe}`")
    if args.dry_run:
        from keel.cli.config import show_config
        return show_config(cfg, 1)
    from keel.rl.config import get_rl_trainer
    from keel.train.launch import shutdown_distributed

    from keel.train.faults import preempted_exit_code

    trainer = get_rl_trainer(cfg.rl.trainer)(cfg)
    summary = trainer.train()
    shutdown_distributed()
    if summary.get("preempted"):  # checkpoint committed: exit so that the job can be requeued
        sys.exit(preempted_exit_code())
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 reports
        return
    run_dir = os.path.abspath(cfg.run.out_dir)
    shown = {k: v for k, v in summary.items() if isinstance(v, float) and "/" not in k}
    print("final: " + " | ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    print(f"run directory:   {run_dir}  (metrics.jsonl, config.yaml, checkpoints/)")
    print(f"  checkpoint:    {os.path.abspath(summary['checkpoint'])}")
    print(f"next: {trainer.next_steps(run_dir)}")


def cmd_init(args) -> None:
    cfg = keel.load_recipe(args.recipe, args.overrides)
    if getattr(cfg.model, "init_from", None):
        raise ConfigError(f"model.init_from: {args.recipe} already starts from {cfg.model.init_from}; "
                          f"a seed checkpoint holds fresh weights (model.init_from=null)")
    from keel.train.init import write_seed_checkpoint
    from keel.train.launch import shutdown_distributed

    out = write_seed_checkpoint(cfg, args.out)
    shutdown_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"keel: wrote the initial weights of {args.recipe} (train.seed {cfg.train.seed}) to {out}\n"
              f"next: keel train {args.recipe} model.init_from={out}   (the same weights in every layout)")


def _print_sample(ckpt: str, cfg) -> None:
    from keel.model.registry import get_model_spec
    if not getattr(cfg.train, "sample_tokens", 0) or get_model_spec(cfg.model.name).decode is None:
        return
    text = generate_text(ckpt, cfg.train.sample_prompt, cfg.train.sample_tokens, temperature=0.8, top_p=0.95,
                         top_k=0, seed=cfg.train.seed)
    print(f"\nsample from {os.path.abspath(ckpt)}:\n---\n{cfg.train.sample_prompt}{text}\n---")


def generate_text(ckpt, prompt, max_new_tokens, temperature, top_p, top_k, seed) -> str:
    """Decode with the checkpoint's family (its registered decoding entry)."""
    from keel.checkpoint.files import resolve_checkpoint, tokenizer_dir_of
    from keel.model.registry import get_model_spec

    model = keel.load(ckpt)
    spec = get_model_spec(model.config.name)
    if spec.decode is None:
        raise ConfigError(f"generate: the {spec.name} family has no text decoding")
    return spec.decode(model, tokenizer_dir_of(resolve_checkpoint(ckpt)), prompt, max_new_tokens, temperature,
                       top_p, top_k, seed)


def cmd_generate(args) -> None:
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens: must be > 0, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ConfigError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    print(args.prompt + generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                                      args.top_p, args.top_k, args.seed))


def add_parsers(sub, parser_class) -> None:
    t = sub.add_parser("train", help="pretrain or fine-tune from a YAML recipe", epilog=recipe_epilog("train",
                       "recipes/lm/tiny.yaml"), formatter_class=parser_class.formatter)
    t.add_argument("recipe", help="a YAML recipe (recipes/<family>/*.yaml)")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the parallel layout, then exit without training")
    t.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="with --dry-run: the world size to lay out (default: $WORLD_SIZE or 1)")
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("init", help="write a recipe's initial weights as a seed checkpoint (model.init_from)",
                       epilog="examples:\n  keel init recipes/lm/tiny.yaml --out runs/tiny-seed\n"
                              "  torchrun --nproc-per-node 8 -m keel.cli init recipes/lm/llama-1b-h100.yaml --out seed/\n"
                              "  keel train recipes/lm/tiny.yaml model.init_from=runs/tiny-seed",
                       formatter_class=parser_class.formatter)
    i.add_argument("recipe", help="a YAML recipe")
    i.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    i.add_argument("--out", required=True, help="a new or empty folder for the checkpoint")
    i.set_defaults(fn=cmd_init)

    r = sub.add_parser("rl", help="RL post-training (GRPO, DPO, distillation) from a YAML recipe",
                       epilog=recipe_epilog("rl", "recipes/rl/grpo-tiny.yaml"), formatter_class=parser_class.formatter)
    r.add_argument("recipe", help="an RL recipe (recipes/rl/*.yaml)")
    r.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    r.add_argument("--dry-run", action="store_true", help="print the resolved config, then exit")
    r.set_defaults(fn=cmd_rl)

    g = sub.add_parser("generate", help="sample text from a checkpoint or run directory",
                       epilog="examples:\n  keel generate runs/lm-tiny --prompt 'KING HENRY:'\n"
                              "  keel generate runs/lm-tiny --prompt 'ROMEO:' --temperature 0   # greedy",
                       formatter_class=parser_class.formatter)
    g.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoints/step_N folder")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off (default: 0.95)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off (default: 0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.set_defaults(fn=cmd_generate)
