"""The Llama / Qwen3 LM families: the backbone as is, trained on next-token prediction, with HF interop."""
from keel.model.backbone import Transformer, TransformerConfig
from keel.model.hf import LLAMA_HF_ADAPTER
from keel.model.registry import ModelSpec, register_model
from keel.model.task import LanguageModelTask, decode_text

register_model(ModelSpec("llama", TransformerConfig, Transformer, LanguageModelTask,
                         "Llama-shaped decoder (SmolLM2, Llama 2/3)", decode=decode_text, hf=LLAMA_HF_ADAPTER))
register_model(ModelSpec("qwen3", TransformerConfig, Transformer, LanguageModelTask,
                         "Qwen3-shaped decoder (QK-norm)", decode=decode_text, hf=LLAMA_HF_ADAPTER))
