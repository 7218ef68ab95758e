"""The Kelix family: a discrete image tokenizer, the backbone as a unified next-block-prediction
model over text and image codes, and a pixel de-tokenizer (keel/model/kelix.py). Its blocks are the
backbone's; the tokenizer, head and de-tokenizer are small and replicated, so it trains
data-parallel only (DDP / FSDP2 / ZeRO) for now."""
from keel.model.kelix import KelixConfig, build_kelix
from keel.model.kelix_task import KelixTask
from keel.model.registry import ModelSpec, register_model

register_model(ModelSpec("kelix", KelixConfig, build_kelix, KelixTask, model_parallel=(),
                         description="Kelix: discrete image tokens + next-block prediction on the backbone"))
