"""keel: distributed training for large models.

    import keel
    cfg = keel.load_recipe("recipes/lm/tiny.yaml", ["train.steps=10"])
    model = keel.load("runs/lm-tiny")          # newest committed checkpoint, one process
    logits = model(input_ids)
    out = model.generate([[1, 2, 3]], max_new_tokens=16)

This root module is the public facade above every layer; it imports them only when called, so that
`import keel.errors` (or `keel --version`) does not load torch.
"""
__version__ = "0.1.0"


def register_all() -> None:
    """Import every layer that registers recipe sections, families or trainers on import."""
    import keel.checkpoint.config  # noqa: F401
    import keel.data.config  # noqa: F401
    import keel.data.image_config  # noqa: F401
    import keel.data.rec_config  # noqa: F401
    import keel.model  # noqa: F401
    import keel.rl  # noqa: F401
    import keel.train.config  # noqa: F401


def load_recipe(path, overrides=None):
    """The validated Config of a recipe file with `key.sub=value` overrides applied."""
    register_all()
    from keel.config import load_recipe as _load_recipe
    return _load_recipe(path, overrides)


def load(path, device: str = "cpu"):
    """The model of a keel checkpoint or run directory, on one process, in eval mode, without
    gradient tracking (for inference; call `.requires_grad_(True)` to train it)."""
    register_all()
    from keel.checkpoint.model_io import load_model
    return load_model(path, device).requires_grad_(False)


def load_tokenizer(path):
    """The tokenizer saved with a keel checkpoint or run directory."""
    from keel.checkpoint.files import resolve_checkpoint, tokenizer_dir_of
    from keel.data.tokenizer import Tokenizer
    from keel.errors import CheckpointError

    folder = tokenizer_dir_of(resolve_checkpoint(path))
    if folder is None:
        raise CheckpointError(f"{path}: no tokenizer/ folder saved with this checkpoint")
    return Tokenizer.load(str(folder))
