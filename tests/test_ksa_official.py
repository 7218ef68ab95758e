"""KSA checkpoints in the official layout (Kuaishou-OneRec/KSA @ 623c531, keel/model/ksa_hf.py): a keel KSA
model exported with `--format official` and imported back gives the same logits; the official config
fields map to keel's keys, and each field keel cannot represent is refused in one line naming it.

No official model runs here (its modeling_qwen3sa.py needs a CUDA kernel), so the checks are the
round trip and the folder's contents against what the official converter writes."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

import keel
from keel.checkpoint.hf import import_adapter, load_hf, save_hf
from keel.checkpoint.model_io import write_model_checkpoint
from keel.cli import main as keel_main
from keel.errors import CheckpointError
from keel.model.hf import LLAMA_HF_ADAPTER
from keel.model.ksa import KSAConfig, is_summary_param
from keel.model.ksa_hf import KSA_OFFICIAL_HF_ADAPTER, parse_layer_pattern
from keel.model.registry import build_model

keel.register_all()
VOCAB, S = 97, 2


def tiny_cfg(**over) -> KSAConfig:
    """GQA, QK-norm, S=2, per-layer windows (hybrid form 2), the private input norm, untied head."""
    kw = dict(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, chunk_size=3,
              summary_tokens=S, qk_norm=True, layer_pattern=["ksa"], layer_windows=[1, 1, 2, 3],
              tie_embeddings=False, max_seq_len=256, summary_private=["attention_norm"])
    cfg = KSAConfig(**{**kw, **over})
    cfg.validate()
    return cfg


def tiny_model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():  # summary parameters unlike their base copies, so a mix-up shows
        for name, p in model.named_parameters():
            if is_summary_param(name):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def exported(module_tmp):
    """(model, cfg, official folder) of the tiny model, written by `keel export hf --format official`."""
    tmp = module_tmp
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    ckpt = write_model_checkpoint(tmp / "ckpt", cfg, model.state_dict())
    keel_main(["export", "hf", str(ckpt), str(tmp / "official"), "--format", "official"])
    return model, cfg, tmp / "official"


def test_folder_is_the_official_layout(exported):
    """config.json and tensors as remap_muse_to_hf + hf_template/config.json have them."""
    model, cfg, out = exported
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen3ForCausalLM"] and c["model_type"] == "qwen3"
    assert c["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen3sa.Qwen3ForCausalLM"
    assert (c["vocab_size"], c["summary_token_begin"], c["summary_token_num"]) == (VOCAB + S, VOCAB, S)
    assert c["summary_chunk_size"] == 3 and c["summary_sliding_chunk_num"] == [1, 1, 2, 3]
    assert c["use_summary_attention"] and c["summary_independent_parameters"]
    assert c["summary_independent_attention_layernorm"] and c["mix_coeff"] == 1.0
    assert c["truncate_predict_nums"] == VOCAB and c["tie_word_embeddings"] is False
    t = load_file(out / "model.safetensors")
    sd = model.state_dict()
    assert torch.equal(t["model.embed_tokens.weight"], torch.cat([sd["tok_embeddings.weight"],
                                                                   sd["summary_embedding.weight"]]))
    assert torch.equal(t["lm_head.weight"][:VOCAB], sd["output.weight"])
    assert not t["lm_head.weight"][VOCAB:].any()  # the converter's zero padding
    assert torch.equal(t["model.layers.2.self_attn.k_proj_summary.weight"], sd["layers.2.attention.wk_summary.weight"])
    assert torch.equal(t["model.layers.1.input_layernorm_summary.weight"], sd["layers.1.attention_norm_summary.weight"])
    assert not any("summary_embedding" in k for k in t)


def test_import_gives_the_same_model_and_logits(exported, tmp_path):
    """`keel import hf` of the official folder: keel.load gives the original's tensors, keys and logits."""
    model, cfg, out = exported
    keel_main(["import", "hf", str(out), str(tmp_path / "back")])
    back = keel.load(tmp_path / "back")
    got = back.config
    assert got.name == "ksa" and got.vocab_size == VOCAB and got.summary_tokens == S and got.chunk_size == 3
    assert [got.layer_window(i) for i in range(4)] == [1, 1, 2, 3] and got.layer_pattern == ["ksa"]
    assert got.summary_private == ["attention_norm"] and not got.summary_mix_qkv and not got.tie_embeddings
    assert got.decode_large_window_as_full  # the official HF cache's decode
    sd, sd_back = model.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(torch.equal(sd[k], sd_back[k]) for k in sd)
    ids = torch.randint(0, VOCAB, (2, 41))  # 13 chunks of 3 and 2 trailing text tokens
    with torch.no_grad():
        diff = max_diff(model(ids), back(ids))
    print(f"\nmax |logit diff| original vs official round trip (fp32): {diff:.3g}")
    assert diff == 0.0


@pytest.mark.parametrize("independent", [True, False])
def test_base_summary_projections_round_trip(tmp_path, independent):
    """summary_mix_qkv after its schedule exports as mix_coeff 0; that folder, and one whose summaries use
    the base q/k/v by summary_independent_parameters: false (no *_proj_summary tensors), import to a model
    with the original's logits (tied head)."""
    cfg = tiny_cfg(tie_embeddings=True, summary_private=[], summary_mix_qkv=True, summary_mix_end_step=10)
    model = tiny_model(cfg)
    model.set_train_step(10)
    out = save_hf(cfg, model.state_dict(), tmp_path / "official", fmt="official")
    assert json.loads((out / "config.json").read_text())["mix_coeff"] == 0.0
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    if not independent:
        patch_config(out, summary_independent_parameters=False, mix_coeff=1.0)
        t = load_file(out / "model.safetensors")
        save_file({k: v for k, v in t.items() if "_proj_summary" not in k}, out / "model.safetensors")
    cfg_back, sd_back, _ = load_hf(out)
    back = build_model(cfg_back)
    back.load_state_dict(sd_back)
    back.init_buffers()
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        diff = max_diff(model(ids), back.eval()(ids))
    print(f"\nmax |logit diff| mix 0 round trip (independent={independent}): {diff:.3g}")
    assert diff < 1e-6


def test_official_fields_map_to_keel_keys(exported, tmp_path):
    """The released template's forms: the window pattern as the Python expression, no truncate field."""
    _, _, src = exported
    out = tmp_path / "official"
    shutil.copytree(src, out)
    patch_config(out, summary_sliding_chunk_num="([1]*2+[2,3])*1", truncate_predict_nums=None,
                 summary_layer_freq="[1]*4")
    cfg, _, _ = load_hf(out)
    assert cfg.layer_windows == [1, 1, 2, 3] and cfg.window_chunks == 1
    assert parse_layer_pattern("([128]*3+[1024]*1)*6", 24, "x", "k") == ([128] * 3 + [1024]) * 6
    assert parse_layer_pattern(128, 3, "x", "k") == [128] * 3


def patch_config(folder, **fields):
    c = json.loads((folder / "config.json").read_text())
    for k, v in fields.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (folder / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("field,value", [
    ("summary_layer_freq", "([1]*3+[0])*1"),
    ("summary_chunk_position_ids_type", "inner_chunk"),
    ("summary_token_position_ids_type", "zeros"),
    ("mix_coeff", 0.5),
    ("summary_independent_qk_norm", True),
    ("vocab_size", 150),
    ("truncate_predict_nums", 50),
    ("summary_sliding_chunk_num", "__import__('os').getcwd()"),
    ("summary_sliding_chunk_num", [1, 2]),
    ("summary_token_begin", None),
])
def test_unrepresentable_fields_are_refused_by_name(exported, tmp_path, field, value):
    _, _, src = exported
    out = tmp_path / "official"
    shutil.copytree(src, out)
    patch_config(out, **{field: value})
    with pytest.raises(CheckpointError) as e:
        load_hf(out)
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg


@pytest.mark.parametrize("over,key", [
    (dict(qk_norm=False), "model.qk_norm"),
    (dict(layer_pattern=["ksa", "full"]), "model.layer_pattern"),
    (dict(skip_old_summary=True), "model.skip_old_summary"),
    (dict(summary_private=["wo"]), "model.summary_private"),
])
def test_export_refuses_what_the_official_layout_cannot_hold(tmp_path, over, key):
    cfg = tiny_cfg(**over)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        save_hf(cfg, build_model(cfg).state_dict(), tmp_path / "out", fmt="official")


def test_unknown_format_and_the_default_export(tmp_path):
    cfg = tiny_cfg()
    sd = build_model(cfg).state_dict()
    with pytest.raises(CheckpointError, match="--format.*'default', 'official'"):
        save_hf(cfg, sd, tmp_path / "a", fmt="nope")
    out = save_hf(cfg, sd, tmp_path / "b")  # the remote-code export stays the default
    assert json.loads((out / "config.json").read_text())["architectures"] == ["KSAForCausalLM"]


def test_only_summary_configs_are_claimed():
    """A plain Qwen3 config still imports as the LM family; the summary fields make it KSA's."""
    plain = Qwen3Config(vocab_size=99, hidden_size=32, architectures=["Qwen3ForCausalLM"])
    ksa = Qwen3Config(vocab_size=99, hidden_size=32, architectures=["Qwen3ForCausalLM"], use_summary_attention=True)
    assert import_adapter(plain, "x") is LLAMA_HF_ADAPTER
    assert import_adapter(ksa, "x") is KSA_OFFICIAL_HF_ADAPTER


# examples/pretrain/hf_template/config.json @ 623c531, verbatim except the sizes (marked) and bos/eos ids.
TEMPLATE = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 1, "head_dim": 8, "hidden_act": "silu", "hidden_size": 32,  # sizes
    "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 256,  # sizes
    "max_window_layers": 4, "mix_coeff": 1.0, "model_type": "qwen3", "num_attention_heads": 4,  # sizes
    "num_hidden_layers": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,  # sizes
    "rope_theta": 10000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": VOCAB + 1, "summary_token_begin": VOCAB, "summary_chunk_size": 8,  # sizes
    "summary_token_num": 1, "use_summary_attention": True,
    "summary_sliding_chunk_num": "([2]*3+[4]*1)*1",  # sizes (released: "([128]*3+[1024]*1)*6")
    "summary_chunk_position_ids_type": "origin", "summary_token_position_ids_type": "last_chunk_slice_right",
    "summary_independent_parameters": True, "summary_independent_attention_layernorm": False,
    "summary_attention_mode": "kernel",
    "auto_map": {"AutoModel": "modeling_qwen3sa.Qwen3Model", "AutoModelForCausalLM": "modeling_qwen3sa.Qwen3ForCausalLM"},
}


def test_the_released_template_config_imports(tmp_path):
    """keel's official-layout weights under the released template's config.json (tiny sizes): the
    template's key set maps to keel's config and gives the original model's logits."""
    cfg = tiny_cfg(chunk_size=8, summary_tokens=1, layer_windows=[2, 2, 2, 4], tie_embeddings=True,
                   summary_private=[], head_dim=8, norm_eps=1e-6)
    model = tiny_model(cfg)
    out = save_hf(cfg, model.state_dict(), tmp_path / "official", fmt="official")
    (out / "config.json").write_text(json.dumps(TEMPLATE))
    cfg_back, sd_back, _ = load_hf(out)
    assert (cfg_back.chunk_size, cfg_back.summary_tokens, cfg_back.layer_windows) == (8, 1, [2, 2, 2, 4])
    assert cfg_back.tie_embeddings and cfg_back.qk_norm and cfg_back.norm_eps == 1e-6
    back = build_model(cfg_back)
    back.load_state_dict(sd_back)
    back.init_buffers()
    ids = torch.randint(0, VOCAB, (1, 60))  # 7 chunks of 8 and 4 trailing text tokens
    with torch.no_grad():
        diff = max_diff(model(ids), back.eval()(ids))
    print(f"\nmax |logit diff| template config round trip: {diff:.3g}")
    assert diff == 0.0
