"""`keel train|init|rl|generate|config|data|import|export|fetch|plot|plan|env|slurm|sid|recommend ...` — the command line.

Each verb lives in its own module here and adds its parser; keel/cli is the only layer above keel.rl.

Errors from the user's input (KeelError) print one line and exit with code 2, no traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

# transformers imports DeepSpeed when installed, and DeepSpeed probes for CUDA unless told otherwise.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from keel.errors import KeelError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    formatter = argparse.RawDescriptionHelpFormatter  # keeps the examples' line breaks

    def set_defaults(self, **kwargs):
        if "fn" in kwargs:  # a verb's own parser: unknown flags are reported against its help
            kwargs["verb_parser"] = self
        super().set_defaults(**kwargs)

    def error(self, message):  # one line, exit 2, as for every other bad input
        hint = ""
        if "unrecognized arguments" in message or "invalid choice" in message:
            hint = "; recipe overrides look like train.steps=2"
        sys.stderr.write(f"{self.prog}: error: {message}{hint} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from keel import __version__  # keel/__init__.py imports nothing heavy
    from keel.cli import assets, config, env, kelix, plan, plot, recsys, run, slurm

    p = _Parser(prog="keel", description="keel: distributed training for large models",
                epilog="run `keel VERB --help` for a verb's flags and examples; recipe overrides look like "
                       "train.steps=2", formatter_class=_Parser.formatter)
    p.add_argument("--version", action="version", version=f"keel {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="VERB")
    run.add_parsers(sub, _Parser)  # train, rl, generate
    config.add_parsers(sub, _Parser)  # config keys | show
    assets.add_parsers(sub, _Parser)  # data, import, export, fetch
    plot.add_parser(sub, _Parser)  # plot RUN ... --metric NAME
    plan.add_parser(sub, _Parser)  # plan RECIPE --world N [--gpu NAME]
    env.add_parser(sub, _Parser)  # env [--json]
    slurm.add_parser(sub, _Parser)  # slurm submit ...
    recsys.add_parsers(sub, _Parser)  # sid build, recommend
    kelix.add_parsers(sub, _Parser)  # kelix generate, kelix describe
    return p


def _quiet_third_party() -> None:
    """Warnings that are not the user's to act on stay out of keel's output: torchao (imported by
    transformers when installed) logs every CUDA-only library it cannot load, torch's pytree an enum
    torchao registers."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None) -> None:
    _quiet_third_party()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    late = [a for a in unknown if "=" in a and not a.startswith("-")]  # overrides given after a flag
    if late and hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + late
        unknown = [a for a in unknown if a not in late]
    if unknown:
        getattr(args, "verb_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.fn(args)
    except KeelError as e:
        sys.stderr.write(f"keel: error: {e}\n")
        sys.exit(2)
    except BrokenPipeError:  # `keel config keys | head`
        sys.stderr.close()
    except KeyboardInterrupt:
        sys.stderr.write("keel: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
