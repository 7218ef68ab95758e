"""keel: distributed training for large models.

    import keel
    cfg = keel.load_recipe("recipes/lm/tiny.yaml", ["train.steps=10"])
    model = keel.load("runs/lm-tiny")          # newest committed checkpoint, one process
    logits = model(input_ids)
    out = model.generate([[1, 2, 3]], max_new_tokens=16)
"""
__version__ = "0.1.0"


def load_recipe(path, overrides=None):
    """The validated Config of a recipe file with `key.sub=value` overrides applied."""
    from keel.config import load_recipe as _load_recipe
    return _load_recipe(path, overrides)


def load(path, device: str = "cpu"):
    """The model of a keel checkpoint or run directory, on one process, in eval mode."""
    from keel.train.checkpoint import load_model
    return load_model(path, device)


def load_tokenizer(path):
    """The tokenizer saved with a keel checkpoint or run directory."""
    from keel.data.tokenizer import Tokenizer
    from keel.errors import CheckpointError
    from keel.train.checkpoint import resolve_checkpoint, tokenizer_dir_of

    folder = tokenizer_dir_of(resolve_checkpoint(path))
    if folder is None:
        raise CheckpointError(f"{path}: no tokenizer/ folder saved with this checkpoint")
    return Tokenizer.load(str(folder))
