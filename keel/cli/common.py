"""What every verb of the command line shares: help texts for overrides, examples."""
from __future__ import annotations

OVERRIDES_HELP = "recipe overrides, each key.sub=value (e.g. train.steps=2 optim.lr=1e-3); see `keel config keys`"


def recipe_epilog(verb: str, example: str) -> str:
    return (f"examples:\n  keel {verb} {example}\n  keel {verb} {example} train.steps=20 run.out_dir=runs/try\n"
            f"  keel {verb} {example} --dry-run          # the resolved config, nothing run\n"
            f"overrides are key.sub=value (values parsed as YAML); `keel config keys` lists every key")
