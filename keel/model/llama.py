"""The Llama / Qwen3 LM families: the backbone as is, trained on next-token prediction, with HF interop.

qwen3_moe is the same backbone with `model.moe` set (any family may set it); it is a family of its
own only because its Hugging Face adapter (Qwen3MoeForCausalLM, stacked experts) differs.
"""
from keel.model.backbone import Transformer, TransformerConfig
from keel.model.hf import LLAMA_HF_ADAPTER
from keel.model.hf_moe import QWEN3_MOE_HF_ADAPTER
from keel.model.registry import ModelSpec, register_model
from keel.model.task import LanguageModelTask, decode_text

register_model(ModelSpec("llama", TransformerConfig, Transformer, LanguageModelTask,
                         "Llama-shaped decoder (SmolLM2, Llama 2/3)", decode=decode_text, hf=LLAMA_HF_ADAPTER))
register_model(ModelSpec("qwen3", TransformerConfig, Transformer, LanguageModelTask,
                         "Qwen3-shaped decoder (QK-norm)", decode=decode_text, hf=LLAMA_HF_ADAPTER))
register_model(ModelSpec("qwen3_moe", TransformerConfig, Transformer, LanguageModelTask,
                         "Qwen3-MoE-shaped decoder (QK-norm, routed experts in model.moe)", decode=decode_text,
                         hf=QWEN3_MOE_HF_ADAPTER))
