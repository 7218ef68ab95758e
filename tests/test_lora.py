"""LoRA applied from outside the model: exact no-op at init, only adapters train, merge is exact."""
import pytest
import torch

from keel.data.assets import corpus_files
from keel.data.tokenizer import Tokenizer
from keel.errors import ConfigError
from keel.model.backbone import TransformerConfig
from keel.model.lora import (LoRAConfig, LoRALinear, adapters_disabled, apply_lora, lora_parameters,
                             merge_lora, merged_state_dict, unmerge_lora)
from keel.model.registry import build_model


def small_model(seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                            max_seq_len=128)
    model = build_model(cfg)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def kjv_batch():
    tok = Tokenizer.load("smollm2")
    text = corpus_files("kjv")[0].read_text()[:20000]
    ids = torch.tensor(tok.encode(text)[:8 * 33]).view(8, 33)
    return ids[:, :-1], ids[:, 1:]


def test_zero_init_is_identity_and_targets_by_name(kjv_batch):
    x, _ = kjv_batch
    model = small_model()
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=r"attention\.(wq|wv)$"))
    assert names == ["layers.0.attention.wq", "layers.0.attention.wv", "layers.1.attention.wq",
                     "layers.1.attention.wv"]
    assert isinstance(model.layers["0"].attention.wq, LoRALinear)
    assert type(model.layers["0"].attention.wk) is torch.nn.Linear
    # The base keeps its parameter names, so checkpoints / HF export keys do not move.
    assert {"layers.0.attention.wq.weight", "layers.0.attention.wq.base_weight",
            "layers.0.attention.wq.lora_a"} <= set(model.state_dict())
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)  # B = 0: bit-for-bit the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.{w}.lora_{ab}" for i in (0, 1) for w in ("wq", "wv")
                         for ab in ("a", "b")}


def test_training_moves_only_adapters_and_merge_is_exact(kjv_batch):
    x, y = kjv_batch
    model = small_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=r"(attention\.wq|feed_forward\.w2)$"))
    base = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}
    adapters = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(x, labels=y) / y.numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the adapters learn the real text
    state = dict(model.named_parameters())
    for k, v in base.items():
        assert torch.equal(state[k], v), k  # frozen base untouched
    assert all(not torch.equal(state[k], v) for k, v in adapters.items())

    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        with adapters_disabled(model):
            base_logits = model(x)
        merge_lora(model)
        merged = model(x)
        folded = {k: v.clone() for k, v in merged_state_dict(model).items()}  # merged in place
        unmerge_lora(model)
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    params = dict(model.named_parameters())
    for k, v in base.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=1e-6)  # unmerge restores
    # The state dict is the adapted model's under the plain keys: a plain model loads it and
    # computes the adapted logits (what keel.load / HF export of a LoRA run give) ...
    plain = small_model(seed=1)
    sd = merged_state_dict(model)
    assert sd.keys() == plain.state_dict().keys()
    torch.testing.assert_close(sd["layers.0.attention.wq.weight"], folded["layers.0.attention.wq.weight"])
    plain.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)
    # ... and an adapted model loading the full state dict gets the exact base back (exact resume).
    again = small_model(seed=2)
    apply_lora(again, LoRAConfig(rank=4, alpha=8, targets=r"(attention\.wq|feed_forward\.w2)$"))
    again.load_state_dict(model.state_dict())
    for k, v in model.named_parameters():
        assert torch.equal(dict(again.named_parameters())[k], v), k


def test_bad_lora_config_is_a_config_error():
    model = small_model()
    with pytest.raises(ConfigError, match=r"rl\.dpo\.lora\.targets: .* matches no nn\.Linear"):
        apply_lora(model, LoRAConfig(targets="attn_q"), key="rl.dpo.lora")
    with pytest.raises(ConfigError, match=r"lora\.rank: must be > 0"):
        apply_lora(model, LoRAConfig(rank=0))
