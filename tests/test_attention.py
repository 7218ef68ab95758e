"""Attention kernels agree with the dense-mask reference: FlexAttention for packed documents (forward
on CPU; forward and backward on CUDA) and SDPA's is_causal for plain causal."""
import pytest
import torch

from keel.model.attention import (
    AttentionMask,
    dense_attention,
    flex_document_attention,
    sdpa_attention,
)


def _docs(lengths_per_row):
    return torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row])


def _qkv(B, L, Hq=4, Hkv=2, D=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, L, D, generator=g).to(device, dtype) for h in (Hq, Hkv, Hkv)]


@pytest.mark.parametrize("L, lengths", [(128, [[30, 70, 28], [5, 100, 20, 3]]),
                                        (200, [[50, 100, 50], [7, 120, 60, 13]])])  # 200: not a multiple of 128
def test_flex_documents_match_dense_forward_on_cpu(L, lengths):
    q, k, v = _qkv(2, L)
    mask = AttentionMask(causal=True, doc_ids=_docs(lengths))
    got = flex_document_attention(q, k, v, mask)
    torch.testing.assert_close(got, dense_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert mask.document_block_mask(L, q.device) is mask.document_block_mask(L, q.device)  # built once per forward
    torch.testing.assert_close(sdpa_attention(q, k, v, mask), got, atol=1e-5, rtol=1e-5)  # CPU: dense


def test_plain_causal_sdpa_matches_an_explicit_causal_mask():
    q, k, v = _qkv(2, 64)
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
    torch.testing.assert_close(sdpa_attention(q, k, v, AttentionMask()), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_attention(q, k, v, AttentionMask()), want, atol=1e-5, rtol=1e-5)


def test_decode_and_padding_masks_take_the_dense_path():
    from keel.model.attention import document_attention_backend
    q = _qkv(1, 8)[0]
    assert document_attention_backend(q[:, :, :2], AttentionMask(q_offset=6)) == "dense"
    assert document_attention_backend(q, AttentionMask(key_valid=torch.ones(1, 8, dtype=torch.bool))) == "dense"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: FlexAttention has no CPU backward")
def test_flex_documents_match_dense_forward_and_backward_on_cuda():
    L = 512
    docs = _docs([[100, 300, 112], [17, 250, 200, 45]]).cuda()
    grads = []
    for fn in (flex_document_attention, dense_attention):
        q, k, v = (t.requires_grad_() for t in _qkv(2, L, D=64, dtype=torch.bfloat16, device="cuda"))
        out = fn(q, k, v, AttentionMask(causal=True, doc_ids=docs))
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        grads.append((out.detach(), q.grad, k.grad, v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
