"""The backbone's math: chunked loss, document masking, GQA, RoPE scaling, KV-cache generation."""
import math

import pytest
import torch
import torch.nn.functional as F

from keel.model.backbone import RopeScaling, TransformerConfig, rope_inv_freq
from keel.model.generation import sample_next
from keel.model.loss import chunked_cross_entropy
from keel.model.registry import build_model


def tiny_model(**overrides):
    cfg = TransformerConfig(**{"vocab_size": 97, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                               "max_seq_len": 128, "loss_chunk": 7, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg, "meta")
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def test_meta_build_then_init_gives_finite_weights_and_depth_scaled_outputs():
    model = tiny_model(n_layers=8)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    wo_std = model.layers["0"].attention.wo.weight.std().item()
    wq_std = model.layers["0"].attention.wq.weight.std().item()
    assert wo_std == pytest.approx(wq_std / math.sqrt(16), rel=0.15)


def test_chunked_loss_matches_full_cross_entropy_in_value_and_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16, requires_grad=True)
    labels = torch.randint(0, 300, (50,))
    labels[::5] = -100
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_cross_entropy(hidden, weight, labels, chunk=8)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 20))
    labels = torch.roll(ids, -1, dims=1)
    logits = model(ids)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert model(ids, labels=labels).item() == pytest.approx(ref.item(), rel=1e-5)


def test_packed_documents_with_doc_mask_equal_separate_sequences():
    model = tiny_model()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 14))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(9), torch.arange(14)])[None]
    doc_ids = torch.cat([torch.zeros(9), torch.ones(14)]).long()[None]
    out = model(packed, positions=positions, doc_ids=doc_ids)
    torch.testing.assert_close(out[:, :9], model(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 9:], model(b), rtol=1e-5, atol=1e-5)
    # Without the mask, the second document would see the first: the check above is not vacuous.
    assert not torch.allclose(model(packed)[:, 9:], model(b), atol=1e-4)


def test_gqa_equals_full_attention_with_repeated_kv_heads():
    gqa = tiny_model(n_kv_heads=2)
    mha = tiny_model(n_kv_heads=4)
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"layers.{i}.attention.{name}.weight"].view(2, 16, 64)
            state[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 17))
    torch.testing.assert_close(gqa(ids), mha(ids), rtol=1e-5, atol=1e-5)


def test_qk_norm_and_untied_head_are_used():
    model = tiny_model(qk_norm=True, tie_embeddings=False)
    assert model.output is not None and model.layers["0"].attention.q_norm is not None
    ids = torch.randint(0, 97, (1, 8))
    before = model(ids)
    with torch.no_grad():
        model.layers["0"].attention.q_norm.weight.mul_(3.0)
    assert not torch.allclose(before, model(ids))


def test_rope_scaling_variants():
    base = TransformerConfig(head_dim=64, rope_theta=500000.0)
    linear = TransformerConfig(head_dim=64, rope_theta=500000.0, rope_scaling=RopeScaling("linear", 4.0))
    llama3 = TransformerConfig(head_dim=64, rope_theta=500000.0,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    f0, f1, f3 = rope_inv_freq(base), rope_inv_freq(linear), rope_inv_freq(llama3)
    torch.testing.assert_close(f1, f0 / 4)
    assert f3[0] == f0[0]  # the highest frequency is kept
    assert f3[-1] == pytest.approx(f0[-1].item() / 8)  # the lowest is slowed by the factor


@pytest.mark.parametrize("prompt_lengths", [[5, 9, 1], [12, 12]])
def test_cached_generation_equals_full_forward_and_single_prompt_runs(prompt_lengths):
    model = tiny_model()
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in prompt_lengths]
    out = model.generate(prompts, max_new_tokens=10)
    for prompt, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
        full = torch.tensor([prompt + tokens])
        logp = model(full).log_softmax(-1)[0]
        steps = range(len(tokens))
        assert tokens == [int(logp[len(prompt) - 1 + j].argmax()) for j in steps]
        ref = torch.tensor([logp[len(prompt) - 1 + j, tokens[j]].item() for j in steps])
        torch.testing.assert_close(torch.tensor(logprobs), ref, rtol=1e-4, atol=1e-5)
        assert model.generate([prompt], max_new_tokens=10).tokens[0] == tokens


def test_generation_stops_per_sequence_and_sampling_is_seeded():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = model.generate(prompts, max_new_tokens=6)
    stop = greedy.tokens[0][2]
    stopped = model.generate(prompts, max_new_tokens=6, stop_ids=(stop,))
    assert stopped.tokens[0] == greedy.tokens[0][:greedy.tokens[0].index(stop) + 1]
    a = model.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert a.tokens == b.tokens


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top_k = sample_next(logits, 1.0, 2, 1.0, g)
    assert set(top_k.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # [0.64, 0.24, 0.09, ...]: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(sample_next(logits, 1.0, 0, 0.8, g).tolist()) == {0, 1}
    assert set(sample_next(logits, 0.0, 0, 1.0, g).tolist()) == {0}


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True, "qkv_bias": True, "tie_embeddings": False}])
def test_num_params_counts_every_parameter(extra):
    model = tiny_model(**extra)
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())


def test_chunked_loss_keeps_only_one_chunk_of_logits_for_backward():
    """Saved activations grow with the chunk size, not with the number of tokens."""
    hidden = torch.randn(4096, 32, requires_grad=True)
    weight = torch.randn(5000, 32, requires_grad=True)
    labels = torch.randint(0, 5000, (4096,))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(hidden, weight, labels, chunk=256)
    one_chunk_of_logits = 256 * 5000 * 4
    assert sum(saved.values()) < one_chunk_of_logits  # 16 chunks of logits would be 16x that
