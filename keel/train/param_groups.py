"""Which parameters get weight decay: shared by AdamW (keel/train/optim.py) and Muon's AdamW groups."""
from __future__ import annotations

import torch


def no_decay_ids(model: torch.nn.Module) -> set[int]:
    """ids of the parameters weight decay leaves alone: norms, biases (1-D) and every embedding
    table (the vocabulary's, KSA's summary table)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return tables | {id(p) for p in model.parameters() if p.ndim < 2}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and embedding tables.

    The same groups whatever the parallel layout (every pipeline stage has both kinds), so
    optimizer and scheduler state resume in any other layout. A group with nothing to train (all
    adapters are matrices under LoRA) is left out: torch's flattened optimizer state cannot
    reload an empty group.
    """
    exempt = no_decay_ids(model)
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
