"""Scoring response tokens in chunks: the same log-probs, entropies and gradients as the full-logits
reference, while no tensor larger than one chunk's [chunk x vocab] logits is ever made."""
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from keel.rl.scoring import logprobs_of, response_logprobs, token_scores


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def reference(hidden, weight, targets, temperature):
    log_probs = (F.linear(hidden, weight).float() / temperature).log_softmax(-1)
    return log_probs.gather(-1, targets[:, None]).squeeze(-1), -(log_probs.exp() * log_probs).sum(-1)


def test_chunked_scores_equal_the_full_reference_in_values_and_gradients():
    torch.manual_seed(0)
    n, d, vocab, chunk = 203, 8, 1000, 16
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)
    targets = torch.randint(vocab, (n,))
    ref_lp, ref_ent = reference(hidden, weight, targets, 0.7)
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    ref_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with LargestTensor() as probe:
        lp, ent = token_scores(hidden, weight, targets, 0.7, with_entropy=True, chunk=chunk)
        (lp.sum() + 0.3 * ent.sum()).backward()
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref_grads[1], rtol=1e-4, atol=1e-5)
    # Peak: one chunk's logits (the weight and its gradient are vocab x d = 8000 < 16000), never n x vocab.
    assert probe.largest == chunk * vocab < n * vocab


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, dim=8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Parameter(torch.randn(vocab, dim))

    def hidden_states(self, ids):
        return torch.tanh(self.emb(ids))

    def head_weight(self):
        return self.head


def test_logprobs_of_scores_only_response_tokens_like_the_full_path():
    torch.manual_seed(1)
    model = TinyLM()
    ids = torch.randint(50, (3, 12))
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[0, 4:10], mask[1, 2:12], mask[2, 7:9] = True, True, True
    chunked = logprobs_of(model, ids, mask, chunk=4)
    full, _ = response_logprobs(model, ids, mask, full=True)
    torch.testing.assert_close(chunked, full)
    assert (chunked[~mask] == 0).all() and (chunked[mask] < 0).all()
    # Position t holds log p(token t | tokens < t): an independent recount for one token.
    row, t = 1, 5
    logits = model.hidden_states(ids)[row, t - 1] @ model.head.T
    assert torch.isclose(chunked[row, t], logits.log_softmax(-1)[ids[row, t]])


def test_packed_scores_equal_the_padded_ones_in_values_and_gradients():
    """Three sequences of different lengths packed into one document-masked row (no padding
    computed) give the padded batch's log-probs, entropies and gradients."""
    from keel.model.backbone import Transformer, TransformerConfig
    from keel.rl.scoring import packed_logprobs_of

    torch.manual_seed(2)
    model = Transformer(TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    model.init_weights()
    lengths = [9, 14, 5]
    ids = torch.randint(64, (3, 14))
    mask = torch.zeros(3, 14, dtype=torch.bool)
    mask[0, 3:9], mask[1, 6:14], mask[2, 1:5] = True, True, True
    for i, n in enumerate(lengths):
        ids[i, n:] = 0  # padding

    def scored(fn, *extra):
        model.zero_grad()
        lp, ent = fn(model, ids, mask, *extra, temperature=0.8, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
        return lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    padded, packed = scored(logprobs_of), scored(packed_logprobs_of, lengths)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], padded[1], atol=1e-5, rtol=1e-5)
    assert (packed[0][~mask] == 0).all() and (packed[0][mask] < 0).all()
    for a, b in zip(packed[2], padded[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
