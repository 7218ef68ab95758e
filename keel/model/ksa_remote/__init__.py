"""Files copied into a KSA Hugging Face export (keel/model/ksa_hf.py): the transformers
remote-code model (modeling_ksa.py, self-contained: torch + transformers only) and the vLLM plugin
registration (vllm_plugin.py). Nothing here imports keel, so an export runs without keel installed."""
