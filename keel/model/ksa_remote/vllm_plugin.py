"""vLLM plugin: registers the KSA architecture name with vLLM's model registry.

Installed as the `vllm.general_plugins` entry point `keel_ksa` (setup.py); vLLM calls `register()`
in every process it starts. UNTESTED: vLLM is not installed where keel is developed and tested.
The registered class is the transformers model of the export (modeling_ksa.KSAForCausalLM). It
has no paged KV cache and recomputes the dense KSA mask; serving KSA at scale needs a vLLM-native
model with a summary-aware attention backend, which keel does not provide yet.
"""
from __future__ import annotations

ARCHITECTURE = "KSAForCausalLM"
MODEL_CLASS = "keel.model.ksa_remote.modeling_ksa:KSAForCausalLM"


def register() -> None:
    try:
        from vllm import ModelRegistry
    except ImportError:
        raise ImportError("keel's KSA vLLM plugin needs vLLM: pip install 'keel[rl]' (the extra that "
                          "installs vllm)") from None
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
