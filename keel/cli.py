"""`keel train|data|import|export|generate|fetch ...` — the command line.

Errors from the user's input (KeelError) print one line and exit with code 2, no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

# transformers imports DeepSpeed when installed, and DeepSpeed probes for CUDA unless told otherwise.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from keel.errors import KeelError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _deepspeed_trainer():
    from keel.train.deepspeed import DeepSpeedTrainer
    return DeepSpeedTrainer


def _torch_trainer():
    from keel.train.trainer import Trainer
    return Trainer


# parallel.engine -> the Trainer class (imported lazily: DeepSpeed is an optional extra)
TRAINERS = {"torch": _torch_trainer, "deepspeed": _deepspeed_trainer}


def cmd_train(args) -> None:
    import keel

    cfg = keel.load_recipe(args.recipe, args.overrides)
    trainer = TRAINERS[cfg.parallel.engine]()(cfg)
    summary = trainer.train()
    if summary.get("preempted"):  # checkpoint committed: exit so that the job can be requeued
        from keel.train.faults import preempted_exit_code
        sys.exit(preempted_exit_code())
    # Leave the process group on every rank first: rank 0's sampling below loads the checkpoint,
    # and under a live process group that load is a collective the other, exited, ranks miss.
    from keel.train.launch import shutdown_distributed
    shutdown_distributed()
    if not trainer.dist.is_main:
        return
    _print_sample(summary["checkpoint"], cfg.train.sample_prompt, cfg.train.sample_tokens, cfg.train.seed)
    run_dir = os.path.abspath(cfg.run.out_dir)
    print(f"\nfinal: loss {summary['loss']:.4f} | eval loss {summary['eval_loss']:.4f} "
          f"(ppl {summary['eval_ppl']:.1f})")
    print(f"run directory:   {run_dir}")
    print(f"  config:        {run_dir}/config.yaml")
    print(f"  metrics:       {run_dir}/metrics.jsonl")
    print(f"  checkpoint:    {os.path.abspath(summary['checkpoint'])}")
    if summary.get("wandb_dir"):
        print(f"  wandb run:     {summary['wandb_dir']}")
    print(f"next: keel generate {run_dir} --prompt \"...\"   |   keel export hf {run_dir} OUT_DIR")


def cmd_rl(args) -> None:
    import keel
    from keel.errors import ConfigError
    from keel.rl.run import get_rl_trainer

    cfg = keel.load_recipe(args.recipe, args.overrides)
    if cfg.rl is None:
        raise ConfigError(f"rl: {args.recipe} has no rl section; `keel rl` runs RL recipes (recipes/rl/)")
    summary = get_rl_trainer(cfg.rl.trainer)(cfg).train()
    run_dir = os.path.abspath(cfg.run.out_dir)
    shown = {k: v for k, v in summary.items() if isinstance(v, float) and "/" not in k}
    print("final: " + " | ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    print(f"run directory:   {run_dir}  (metrics.jsonl, config.yaml, checkpoints/)")
    print(f"  checkpoint:    {os.path.abspath(summary['checkpoint'])}")
    print(f"next: keel generate {run_dir} --prompt \"...\"   |   keel export hf {run_dir} OUT_DIR")


def _print_sample(ckpt: str, prompt: str, tokens: int, seed: int) -> None:
    if not tokens:
        return
    text = generate_text(ckpt, prompt, tokens, temperature=0.8, top_p=0.95, top_k=0, seed=seed)
    print(f"\nsample from {ckpt}:\n---\n{prompt}{text}\n---")


def generate_text(ckpt, prompt, max_new_tokens, temperature, top_p, top_k, seed) -> str:
    import keel

    model = keel.load(ckpt)
    tokenizer = keel.load_tokenizer(ckpt)
    ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None)
    out = model.generate([ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, stop_ids=(tokenizer.eos_id,), seed=seed)
    return tokenizer.decode(out.tokens[0])


def cmd_generate(args) -> None:
    print(args.prompt + generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                                      args.top_p, args.top_k, args.seed))


def cmd_preprocess(args) -> None:
    from keel.data.preprocess import preprocess_main
    preprocess_main(args.inputs, args.out, args.tokenizer, args.text_key)


def cmd_import(args) -> None:
    from keel.model.hf import import_hf
    import_hf(args.src, args.out)


def cmd_export(args) -> None:
    from keel.model.hf import export_hf
    export_hf(args.checkpoint, args.out)


def cmd_fetch(args) -> None:
    from keel.data.assets import fetch
    fetch(args.names, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="keel", description="keel: distributed training for large models")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="pretrain or fine-tune from a YAML recipe")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("rl", help="RL post-training (GRPO, DPO, distillation) from a YAML recipe")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    r.set_defaults(fn=cmd_rl)

    g = sub.add_parser("generate", help="sample text from a checkpoint or run directory")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True,
                                                                parser_class=_Parser)
    pre = d.add_parser("preprocess", help="tokenize .txt/.jsonl into a megatron .bin/.idx dataset")
    pre.add_argument("inputs", nargs="+")
    pre.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    pre.add_argument("--tokenizer", default="smollm2")
    pre.add_argument("--text-key", default="text")
    pre.set_defaults(fn=cmd_preprocess)

    for verb, fn, src_help in (("import", cmd_import, "HF folder, .gguf file, or 'smollm2'"),
                               ("export", cmd_export, "keel checkpoint or run directory")):
        fmt = sub.add_parser(verb, help=f"{verb} Hugging Face checkpoints").add_subparsers(
            dest=f"{verb}_format", required=True, parser_class=_Parser)
        hf = fmt.add_parser("hf", help=f"{verb} a Llama/Qwen3 Hugging Face checkpoint")
        hf.add_argument("src" if verb == "import" else "checkpoint", help=src_help)
        hf.add_argument("out")
        hf.set_defaults(fn=fn)

    f = sub.add_parser("fetch", help="fetch the real corpora and SmolLM2-135M onto this machine")
    f.add_argument("names", nargs="+", help="shakespeare, kjv, smollm2, or all")
    f.add_argument("--force", action="store_true")
    f.set_defaults(fn=cmd_fetch)

    from keel.slurm import add_parser as add_slurm_parser
    add_slurm_parser(sub, _Parser)  # keel slurm submit ...
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeelError as e:
        sys.stderr.write(f"keel: error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("keel: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
