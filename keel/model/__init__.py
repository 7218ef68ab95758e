"""Single-device models: the backbone and every family on it. Importing any of keel.model registers
the built-in families (a family is one registration: keel/model/registry.py)."""
from keel.model import kelix_family, ksa, llama, recsys_families  # noqa: F401  (registration on import)
