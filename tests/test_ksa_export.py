"""`keel export hf` for KSA checkpoints (keel/model/ksa_hf.py): the folder loads with transformers'
AutoModelForCausalLM(trust_remote_code=True) and its logits equal keel's in fp32."""
import ast
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from keel.cli import main as keel_main
from keel.data.assets import corpus_files
from keel.errors import CheckpointError
from keel.model.ksa import KSAConfig, is_summary_param, ksa_from_dense
from keel.checkpoint.hf import save_hf as save_ksa_hf  # the KSA family's adapter, by registration
from keel.model.ksa_hf import REMOTE_DIR
from keel.model.registry import build_model

TOL = 1e-4  # fp32, the same operations in the same order: measured differences are 0 to ~1e-5


def load_export(out):
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def assert_same_logits(keel_logits, hf_logits):
    diff = (keel_logits - hf_logits).abs().max().item()
    print(f"\nmax |logit diff| keel vs transformers export: {diff:.3g}")
    assert diff < TOL
    assert torch.equal(keel_logits.argmax(-1), hf_logits.argmax(-1))


def test_tiny_ksa_with_every_option_exports_exactly(tmp_path):
    """Hybrid KSA/full layers with per-layer windows, GQA, QK-norm, S=2, every private summary copy,
    untied head and a trailing partial chunk: transformers reproduces keel's logits."""
    torch.manual_seed(0)
    cfg = KSAConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, chunk_size=3,
                    summary_tokens=2, qk_norm=True, layer_pattern=["ksa", "full", "ksa", "ksa"],
                    layer_windows=[1, 1, 2, 3], tie_embeddings=False, max_seq_len=256,
                    summary_private=["attention_norm", "q_norm", "k_norm", "wo", "ffn_norm", "feed_forward"])
    cfg.validate()
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():  # summary parameters unlike their base copies, so a mix-up shows
        for name, p in model.named_parameters():
            if is_summary_param(name):
                p.add_(torch.randn_like(p) * 0.1)
    out = save_ksa_hf(cfg, model.eval().state_dict(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["KSAForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ksa.KSAForCausalLM"
    assert config["ksa_layer_kinds"] == ["ksa", "full", "ksa", "ksa"] and config["ksa_layer_windows"] == [1, 1, 2, 3]
    hf = load_export(out)
    ids = torch.randint(0, 97, (2, 41))  # 13 chunks of 3 and 2 trailing text tokens
    with torch.no_grad():
        assert_same_logits(model(ids), hf(ids).logits)


def test_summary_mix_qkv_exports_as_after_its_schedule(tmp_path):
    """summary_mix_qkv: the export carries mix 0 (summaries use the base q/k/v after qk-norm), which is
    keel's model at or after summary_mix_end_step."""
    torch.manual_seed(0)
    cfg = KSAConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, chunk_size=4,
                    summary_tokens=2, qk_norm=True, layer_pattern=["ksa", "full"], window_chunks=1,
                    max_seq_len=256, summary_mix_qkv=True, summary_mix_start_step=0, summary_mix_end_step=10)
    cfg.validate()
    model = build_model(cfg)
    model.init_weights()
    model.set_train_step(10)
    out = save_ksa_hf(cfg, model.eval().state_dict(), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["summary_mix_coeff"] == 0.0
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        assert_same_logits(model(ids), load_export(out)(ids).logits)


def test_remote_code_is_self_contained():
    """The remote-code file must run where keel is not installed: it imports torch and transformers only."""
    tree = ast.parse((REMOTE_DIR / "modeling_ksa.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert roots <= {"torch", "transformers", "math", "typing", "__future__"}, roots


def test_keel_export_hf_cli_on_smollm2_ksa(tmp_path):
    """The real SmolLM2-135M converted to KSA (N=16, W=4, 3:1 hybrid) and saved as a keel checkpoint;
    `keel export hf` writes a folder whose transformers model and tokenizer give keel's logits on KJV
    text at 4x the window, and whose greedy generate() continues the text as keel's KSA cache does."""
    import keel
    from keel.checkpoint.hf import load_hf
    from keel.checkpoint.model_io import write_model_checkpoint

    dense_cfg, dense_sd, tokenizer = load_hf("smollm2")
    cfg = KSAConfig(**{**vars(dense_cfg), "name": "ksa"}, chunk_size=16, summary_tokens=1, window_chunks=4)
    torch.manual_seed(0)
    ksa = ksa_from_dense(dense_sd, cfg).eval()
    ckpt = write_model_checkpoint(tmp_path / "ckpt", cfg, ksa.state_dict(), tokenizer=tokenizer)
    keel_main(["export", "hf", str(ckpt), str(tmp_path / "hf")])
    out = tmp_path / "hf"
    assert (out / "modeling_ksa.py").is_file() and (out / "tokenizer.json").is_file()
    hf = load_export(out)
    hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = corpus_files("kjv")[-1].read_text()[:3000]
    ids = torch.tensor([hf_tok(text)["input_ids"][:272]])  # 17 chunks of 16: 4x the 64-token window
    model = keel.load(ckpt)
    with torch.no_grad():
        assert_same_logits(model(ids), hf(ids).logits)
    prompt = ids[:, :100]
    want = model.generate([prompt[0].tolist()], max_new_tokens=6).tokens[0]
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert got[0, 100:].tolist() == want


def test_export_refuses_a_nonempty_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    cfg = KSAConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, ffn_dim=16, chunk_size=2)
    with pytest.raises(CheckpointError, match="already exists"):
        save_ksa_hf(cfg, build_model(cfg).state_dict(), tmp_path / "out")


def test_vllm_plugin_without_vllm_names_the_extra():
    """vLLM is not installed on CPU machines; the plugin then says which extra installs it."""
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed; this test covers its absence (registration itself is untested)")
    from keel.model.ksa_remote.vllm_plugin import register
    with pytest.raises(ImportError, match=r"keel\[rl\]"):
        register()
