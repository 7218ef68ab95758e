"""`keel plan RECIPE [overrides] --world N [--gpu h100-80gb] [--json]`: per-rank memory, no GPU needed.

One training step of the recipe is traced on fake tensors with a fake process group of N ranks
(keel/train/plan.py), and the memory each rank would hold is printed against the GPU's.
"""
from __future__ import annotations

import json
import os

import keel
from keel.cli.common import OVERRIDES_HELP

EPILOG = """examples:
  keel plan recipes/lm/llama-1b-h100.yaml --world 8
  keel plan recipes/lm/llama-1b-h100.yaml train.micro_batch=4 --world 16 --gpu h200-141gb
  keel plan recipes/lm/tiny.yaml --world 1 --gpu cpu --json
rows marked traced come from running one step on fake tensors (no memory is used); analytic rows
are computed from the config and say so"""


def cmd_plan(args) -> None:
    from keel.train.plan import format_plan, gpu_capacity, plan_memory

    gpu_capacity(args.gpu)  # an unknown --gpu fails before the recipe is even read
    cfg = keel.load_recipe(args.recipe, args.overrides)
    task = None
    if cfg.rl is not None:  # an RL recipe: its trainer's step, one rank's share of the prompts
        from keel.rl.plan import rl_step_plan

        cfg, task = rl_step_plan(cfg, args.world)
    plan = plan_memory(cfg, args.world, args.gpu, recipe=args.recipe, task=task)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))


def add_parser(sub, parser_class) -> None:
    p = sub.add_parser("plan", help="predict per-rank GPU memory of a recipe on N ranks (no GPU needed)",
                       epilog=EPILOG, formatter_class=parser_class.formatter)
    p.add_argument("recipe", help="a YAML recipe (recipes/<family>/*.yaml)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="the number of ranks to lay the recipe out on (default: $WORLD_SIZE or 1)")
    p.add_argument("--gpu", default="h100-80gb",
                   help="the GPU to compare against: h100-80gb, h200-141gb, a100-80gb or cpu (default: h100-80gb)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(fn=cmd_plan)
