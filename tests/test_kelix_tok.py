"""Fashion-MNIST reader and captions, Kelix-Tok (SimVQ sub-codebooks, straight-through, fusion, k-means
init, usage) and the pixel detokenizer, on real Fashion-MNIST images. CPU, a few seconds."""
import gzip

import pytest
import torch
import torch.nn.functional as F

from keel.data.fashion_mnist import (CLASS_NAMES, captions_for, class_from_prompt, fashion_mnist_dir,
                                     load_fashion_mnist)
from keel.errors import ConfigError, DataError, MissingAssetError
from keel.model.kelix_tok import KelixDetokenizer, KelixTokConfig, KelixTokenizer, codebook_usage


def images(split: str, start: int, n: int) -> torch.Tensor:
    x, _ = load_fashion_mnist(split)
    return x[start:start + n].float().div(255).unsqueeze(1)


def tokenizer(seed: int = 0) -> KelixTokenizer:
    torch.manual_seed(seed)
    return KelixTokenizer(KelixTokConfig())


# ------------------------------------------------------------------ data
def test_idx_reader_shapes_counts_and_class_balance():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_fashion_mnist(split)
        assert x.shape == (n, 28, 28) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) <= 9
        assert int(x.max()) > 200 and int(x.min()) == 0  # real pixels, not a zero-filled buffer
    _, y = load_fashion_mnist("test")
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10  # the published test split is balanced
    assert load_fashion_mnist("test")[0] is load_fashion_mnist("test")[0]  # decoded once
    with pytest.raises(ConfigError, match=r"^data\.split: 'valid'.*'test'"):
        load_fashion_mnist("valid")


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20)[:-9],
                                     gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")],
                         ids=["garbage", "truncated", "wrong-magic"])
def test_idx_reader_rejects_bad_files(tmp_path, monkeypatch, content):
    src = fashion_mnist_dir()
    for name in ("t10k-labels-idx1-ubyte.gz",):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(content)
    monkeypatch.setenv("KEEL_FASHION_MNIST", str(tmp_path))
    load_fashion_mnist.cache_clear()
    with pytest.raises(DataError) as err:
        load_fashion_mnist("test")
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "\n" not in msg and "expected" in msg


def test_idx_reader_size_mismatch_and_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_FASHION_MNIST", str(tmp_path))
    load_fashion_mnist.cache_clear()
    # A valid header announcing 2 images with the bytes of one.
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        bytes.fromhex("00000803 00000002 0000001c 0000001c") + bytes(784)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: header dims \[2, 28, 28\] with 784"):
        load_fashion_mnist("test")
    monkeypatch.setenv("KEEL_FASHION_MNIST", str(tmp_path / "absent"))
    with pytest.raises(MissingAssetError) as err:
        load_fashion_mnist("train")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "dataset-fashion-mnist" in msg and "\n" not in msg


def test_captions_and_prompts():
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[9] == "ankle boot"
    for label, name in enumerate(CLASS_NAMES):
        caps = captions_for(label)
        assert len(caps) >= 4 and all(name in c for c in caps)
        article = "an" if label == 9 else "a"
        assert caps[0] == f"{article} {name}" and all(f" {article} {name}" in " " + c for c in caps)
        for prompt in (f"{article} {name}", f"  {article.upper()} {name.title()} ", f"{article}  {name.upper()}."):
            assert class_from_prompt(prompt) == label, prompt
        assert class_from_prompt(caps[0]) == label
    assert class_from_prompt("A Sneaker") == 7 and class_from_prompt("an ankle boot") == 9
    assert class_from_prompt("a T-Shirt") == class_from_prompt("a top") == class_from_prompt("a tshirt") == 0
    for bad in ("a boot", "sneaker", "a photo of a dress", "a cat", "", "a sneaker\nan ankle boot"):
        with pytest.raises(ConfigError) as err:
            class_from_prompt(bad)
        msg = str(err.value)
        assert msg.startswith("--prompt: ") and "\n" not in msg and "ankle boot" in msg


# ------------------------------------------------------------------ tokenizer
def test_config_errors_name_the_key():
    cases = {"image_size": dict(image_size=30), "vit_heads": dict(vit_heads=3), "n_q": dict(n_q=0),
             "codebook_size": dict(codebook_size=1), "init_dim": dict(init_dim=16)}
    for key, kw in cases.items():
        with pytest.raises(ConfigError) as err:
            KelixTokConfig(**kw).validate()
        msg = str(err.value)
        assert msg.startswith(f"model.tokenizer.{key}: ") and "\n" not in msg, msg
    assert "patch_size*merge" in str(pytest.raises(ConfigError, KelixTokenizer, KelixTokConfig(image_size=30)).value)
    assert KelixTokConfig().num_patches == 49
    tok = tokenizer()
    for bad in (torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 28, 28), torch.zeros(2, 1, 28, 28, dtype=torch.uint8)):
        with pytest.raises(DataError, match=r"^images: expected \[B, 1, 28, 28\]") as err:
            tok(bad)
        assert "\n" not in str(err.value)


def test_straight_through_reaches_vit_and_codebook_stays_frozen():
    tok = tokenizer()
    x = images("train", 0, 16)
    out = tok(x)
    first = tok.patch_embed.weight
    (g,) = torch.autograd.grad(out.fused.square().mean(), first, retain_graph=True)
    assert g.abs().sum() > 0  # through the argmin, by the straight-through estimator
    q = tok.quantizers[0]
    assert not q.codebook.requires_grad and "quantizers.0.codebook" in tok.state_dict()
    book, proj = q.codebook.clone(), q.proj.weight.detach().clone()
    opt = torch.optim.SGD([p for p in tok.parameters() if p.requires_grad], lr=0.1)
    (out.fused.square().mean() + out.loss).backward()
    assert first.grad.abs().sum() > 0 and q.codebook.grad is None and q.proj.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(q.codebook, book) and not torch.equal(q.proj.weight, proj)


def test_quantisation_losses_and_fusion_recount():
    tok = tokenizer()
    x = images("test", 0, 12)
    with torch.no_grad():
        out, raw = tok(x), tok.features(x)
        for i, q in enumerate(tok.quantizers):
            z = F.layer_norm(raw[..., i, :], (32,), q.z_norm.weight, q.z_norm.bias, q.z_norm.eps)
            table = F.layer_norm(q.codebook @ q.proj.weight.T + q.proj.bias, (32,), q.q_norm.weight,
                                 q.q_norm.bias, q.q_norm.eps)
            assert torch.allclose(out.z_e[..., i, :], z, atol=1e-5)
            d = torch.cdist(z.reshape(-1, 32).double(), table.double()).square()
            chosen = d.gather(1, out.codes[..., i].reshape(-1, 1)).squeeze(1)
            assert torch.all(chosen <= d.min(1).values + 1e-4)  # argmin up to float ties
            assert (out.codes[..., i].reshape(-1) == d.argmin(1)).float().mean() > 0.99
        e = torch.stack([q.table()[out.codes[..., i]] for i, q in enumerate(tok.quantizers)], -2)
        mse = (e - out.z_e).square().mean()
        assert torch.allclose(out.codebook_loss, mse, rtol=1e-5) and torch.allclose(out.commitment_loss, mse, rtol=1e-5)
        assert torch.allclose(out.loss, 1.0 * mse + 0.25 * mse, rtol=1e-5)
        fused = sum(e[..., i, :] @ up.weight.T + up.bias for i, up in enumerate(tok.up_projs))
        assert torch.allclose(out.fused, fused, atol=1e-5)
    codes = tok.encode(x)
    assert codes.dtype == torch.int64 and codes.shape == (12, 49, 4) and torch.equal(codes, out.codes)
    assert torch.allclose(tok.fuse_codes(codes), out.fused, atol=1e-5)


def test_kmeans_init_raises_usage_on_held_out_images():
    tok = tokenizer()
    held_out = images("test", 0, 40)  # 40 x 49 = 1960 vectors per sub-codebook for 64 codes
    before = codebook_usage(tok.encode(held_out), 64)
    tok.init_codebooks(images("train", 0, 200), iters=10, seed=0)
    after = codebook_usage(tok.encode(held_out), 64)
    msg = f"usage random {before['usage'].tolist()} k-means {after['usage'].tolist()}; perplexity " \
          f"random {before['perplexity'].tolist()} k-means {after['perplexity'].tolist()}"
    assert torch.all(after["usage"] >= before["usage"]), msg
    assert torch.all(after["perplexity"] > before["perplexity"]), msg
    out = tok(held_out)  # the lifted codebook reproduces the centroids: quantisation error drops
    assert out.codebook_loss < 0.5, msg + f"; codebook loss {out.codebook_loss.item()}"


def test_codebook_usage_recount():
    codes = torch.tensor([[[0, 3], [0, 3]], [[1, 3], [7, 3]]])  # [2, 2, n_q=2], K = 8
    got = codebook_usage(codes, 8)
    for i in range(2):
        counts = torch.bincount(codes[..., i].flatten(), minlength=8).double()
        p = counts[counts > 0] / counts.sum()
        assert got["usage"][i] == (counts > 0).sum() / 8
        assert torch.allclose(got["perplexity"][i], torch.exp(-(p * p.log()).sum()))
    assert got["usage"].tolist() == [3 / 8, 1 / 8] and got["perplexity"][1] == 1.0


def test_meta_build_and_detokenizer():
    cfg = KelixTokConfig()
    with torch.device("meta"):
        tok, det = KelixTokenizer(cfg), KelixDetokenizer(cfg)
    tok.to_empty(device="cpu")  # garbage memory until init_weights
    det.to_empty(device="cpu")
    ref = KelixTokenizer(cfg)
    torch.manual_seed(0)
    tok.init_weights()
    torch.manual_seed(0)
    ref.init_weights()  # same seed, same draws: every parameter and buffer is set by init_weights
    det.init_weights()
    for (name, a), b in zip(tok.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    x = images("train", 0, 32)
    out = tok(x)
    y = det(out.fused)
    assert y.shape == x.shape and 0 < y.min() and y.max() < 1
    # The detokenizer learns from the (frozen) codes: its pixel MSE falls well below that of the best
    # code-blind answer, the mean image (tokenizer gradients are test_straight_through's subject).
    fused = out.fused.detach()
    mean_image_mse = (x - x.mean(0)).square().mean().item()
    opt = torch.optim.Adam(det.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = det.reconstruction_loss(fused, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * mean_image_mse, (mean_image_mse, losses)
    with pytest.raises(DataError, match=r"^fused: expected \[B, 49, 128\]"):
        det(out.fused[:, :10])
