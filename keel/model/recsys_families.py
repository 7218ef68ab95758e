"""The recommendation families on the backbone: OneRec-V2 and S²GR (generative, semantic IDs), SASRec
(the item-id baseline every number stands beside) and the multi-task ranker (the reward model of
recommender RL). Neither has a text decoder or an HF layout;
OneRec-V2's blocks have no Megatron split yet, so both train data-parallel only (DDP/FSDP2/ZeRO)."""
from keel.model.onerec import build_onerec
from keel.model.onerec_config import OneRecConfig
from keel.model.ranker import RankerConfig, build_ranker
from keel.model.ranker_task import RankerTask
from keel.model.rec_task import GenerativeRecTask, SASRecTask
from keel.model.registry import ModelSpec, register_model
from keel.model.s2gr import S2GRConfig, build_s2gr
from keel.model.s2gr_task import S2GRTask
from keel.model.sasrec import SASRecConfig, build_sasrec

register_model(ModelSpec("onerec", OneRecConfig, build_onerec, GenerativeRecTask, model_parallel=(),
                         description="OneRec-V2: lazy decoder-only generative recommender over semantic IDs"))
register_model(ModelSpec("s2gr", S2GRConfig, build_s2gr, S2GRTask, model_parallel=(),
                         description="S²GR: encoder-decoder over semantic IDs with a latent thought before each code"))
register_model(ModelSpec("sasrec", SASRecConfig, build_sasrec, SASRecTask, model_parallel=(),
                         description="SASRec: causal self-attention over item ids, full-softmax next item"))
register_model(ModelSpec("ranker", RankerConfig, build_ranker, RankerTask, model_parallel=(),
                         description="multi-task ranker: P(engage), P(like) of an item for a user (reward model)"))
