"""Kelix's unified model (keel/model/kelix.py): blocks, the next-block-prediction head, the stages,
against references written position by position, on real Fashion-MNIST images."""
import pytest
import torch
import torch.nn.functional as F

from conftest import keel_refusal
from keel.data.fashion_mnist import load_fashion_mnist
from keel.data.loader import collate
from keel.model.backbone import Transformer, TransformerConfig
from keel.model.kelix import KelixConfig, KelixModel
from keel.model.kelix_head import NBPConfig, generate_block
from keel.model.kelix_task import CaptionedImages, KelixTask
from keel.model.kelix_tok import KelixTokConfig
from keel.model.kelix_vocab import BOS, PAD, Q_EOS, CaptionVocab

VOCAB = CaptionVocab.from_templates()


def small_config(stage="unified", **extra) -> KelixConfig:
    cfg = KelixConfig(dim=32, n_layers=2, n_heads=4, stage=stage, tie_embeddings=False,
                      tokenizer=KelixTokConfig(out_dim=32, n_q=3, codebook_size=16, vit_dim=32, decoder_dim=32),
                      nbp=NBPConfig(dim=32, heads=4, ffn_dim=64), **extra)
    cfg.validate()
    return cfg


def small_model(stage="unified", seed=0) -> KelixModel:
    torch.manual_seed(seed)
    model = KelixModel(small_config(stage))
    model.init_weights()
    return model


def real_batch(cfg: KelixConfig, rows=4, share=0.5, fixed=False) -> dict:
    images, labels = load_fashion_mnist("train")
    data = CaptionedImages(images[:rows], labels[:rows], VOCAB, cfg.tokenizer.num_patches, cfg.block_width,
                           share, seed=3, fixed_caption=fixed)
    return collate([data[i] for i in range(rows)])


def unified_recipe(model_cfg: KelixConfig):
    import keel

    cfg = keel.load_recipe("recipes/kelix/tiny-2-unified.yaml", ["model.init_from=null", "images.eval_images=8"])
    cfg.model = model_cfg
    return cfg


def reference_nbp_loss(model: KelixModel, blocks: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    """Block t+1 from the LLM run over blocks[:t+1] alone, sub-token j from the head run over the
    block's first j sub-tokens alone: one position at a time, no shifting or masking tricks."""
    total = torch.zeros(())
    weight = model.head_weight()
    for b in range(blocks.shape[0]):
        for t in range(blocks.shape[1] - 1):
            if not predict[b, t + 1]:
                continue
            h = model.hidden_states(model.embed_blocks(blocks[b:b + 1, :t + 1]))[0, -1]
            target = blocks[b, t + 1]
            for j in range(blocks.shape[2]):
                if target[j] == PAD:
                    break
                prev = model.tok_embeddings(target[:j])[None]
                logits = F.linear(model.head(h[None], prev)[0, -1], weight)
                total = total + F.cross_entropy(logits[None], target[j:j + 1], reduction="sum")
    return total


def test_teacher_forced_loss_equals_a_position_by_position_reference():
    model = small_model()
    batch = real_batch(model.config, rows=2)
    loss = model(batch)
    _, blocks, _ = model.inputs(batch)
    with torch.no_grad():
        expected = reference_nbp_loss(model, blocks, batch["loss_blocks"])
    assert torch.allclose(loss.detach(), expected, rtol=1e-4), (loss.item(), expected.item())
    # and the task's unit count is the number of target sub-tokens the reference summed over
    task = KelixTask(unified_recipe(model.config))
    recount = ((blocks[:, 1:] != PAD) & batch["loss_blocks"][:, 1:, None]).sum()
    assert task.units(batch) == recount


def test_image_loss_weight_scales_only_the_image_blocks():
    model = small_model()
    batch = real_batch(model.config, rows=2)
    with torch.no_grad():
        _, blocks, _ = model.inputs(batch)
        on_image = model.image_positions(blocks, batch["image_start"])
        image = reference_nbp_loss(model, blocks, batch["loss_blocks"] & on_image)
        text = reference_nbp_loss(model, blocks, batch["loss_blocks"] & ~on_image)
        model.config.image_loss_weight = 0.25
        weighted = model(batch)
    assert torch.allclose(weighted, text + 0.25 * image, rtol=1e-4), (weighted.item(), text.item(), image.item())


def test_image_blocks_hold_each_sub_codebook_in_its_own_id_range():
    model = small_model()
    batch = real_batch(model.config, rows=3)
    codes = model.tokenizer.encode(batch["images"])
    blocks = model.visual_blocks(codes)
    tok, text_vocab = model.config.tokenizer, model.config.text_vocab
    for i in range(tok.n_q):
        ids = blocks[..., i]
        assert ((ids >= text_vocab + i * tok.codebook_size) & (ids < text_vocab + (i + 1) * tok.codebook_size)).all()
        assert torch.equal(ids - text_vocab - i * tok.codebook_size, codes[..., i])
    assert (blocks[..., -1] == Q_EOS).all()
    filled = model.with_image(batch["blocks"], batch["image_start"], blocks)
    for b in range(3):  # the P patch blocks sit where image_start says, everything else is untouched
        s = int(batch["image_start"][b])
        assert torch.equal(filled[b, s:s + tok.num_patches], blocks[b])
        assert torch.equal(filled[b, :s], batch["blocks"][b, :s])
    # a patch's LLM input is the sum of its sub-codes' embedding rows (not q_eos)
    x = model.embed_blocks(filled)
    s = int(batch["image_start"][0])
    assert torch.allclose(x[0, s], model.tok_embeddings.weight[blocks[0, 0, :-1]].sum(0), atol=1e-6)


def test_block_generation_stops_at_the_marker_and_equals_an_unstopped_reference():
    model = small_model()
    h = torch.randn(3, model.config.dim)
    V, W = model.config.vocab_size, model.config.block_width
    allowed = torch.ones(W, V, dtype=torch.bool)
    allowed[0, Q_EOS] = False  # sub-token 0 is never the marker, so draw 0 does not depend on its row
    weight = model.head_weight().detach().clone()
    first = F.linear(model.head(h, h.new_zeros(3, 0, h.shape[1]))[:, -1], weight).masked_fill(~allowed[0], -1e9).argmax(-1)
    out1 = model.head(h, model.tok_embeddings(first)[:, None])[:, -1]
    weight[Q_EOS] = 50 * out1[0] / out1[0].norm()  # row 0 now ends its block at sub-token 1
    calls = []
    head = model.head
    counting = lambda hh, prev: calls.append(prev.shape[1]) or head(hh, prev)  # noqa: E731
    with torch.no_grad():
        got = generate_block(counting, model.tok_embeddings, weight, h, allowed, Q_EOS)
        # reference: W greedy steps without stopping, then everything after the first marker is the marker
        prev, ref = h.new_zeros(3, 0, h.shape[1]), []
        for j in range(W):
            draw = F.linear(head(h, prev)[:, -1], weight).masked_fill(~allowed[j], float("-inf")).argmax(-1)
            ref.append(draw)
            prev = torch.cat([prev, model.tok_embeddings(draw)[:, None]], 1)
        ref = torch.stack(ref, 1)
    stopped = (ref == Q_EOS).long().cumsum(1) > 0
    ref = torch.where(stopped, torch.full_like(ref, Q_EOS), ref)
    assert got[0, 1] == Q_EOS and torch.equal(got, ref)
    if bool(((got == Q_EOS).any(1)).all()):  # every row stopped: the loop ended before W sub-tokens
        assert len(calls) == int((got != Q_EOS).sum(1).max()) + 1


def test_constrained_blocks_are_legal_and_text_only_generation_is_the_lm_path():
    model = small_model()
    with torch.no_grad():
        prompt = torch.full((2, 3, model.config.block_width), PAD)
        words = torch.tensor([[BOS, 6, 7], [BOS, 9, 12]])
        prompt[..., 0], prompt[..., 1] = words, Q_EOS
        out = model.continue_blocks(prompt, ["image"] * 2 + ["text"] * 3)
        tok, text_vocab = model.config.tokenizer, model.config.text_vocab
        for i in range(tok.n_q):  # image blocks: sub-token i from sub-codebook i, then the marker
            ids = out[:, 3:5, i] - text_vocab - i * tok.codebook_size
            assert ((ids >= 0) & (ids < tok.codebook_size)).all()
        assert (out[:, 3:5, tok.n_q] == Q_EOS).all()
        assert (out[:, 5:, 1] == Q_EOS).all() and (out[:, 5:, 0] < text_vocab).all() and (out[:, 5:, 2:] == PAD).all()

        # text-only: the LLM states are the plain backbone's over the token ids, on the same weights
        text = model.continue_blocks(prompt, ["text"] * 4)
        plain = Transformer(TransformerConfig(**{k: getattr(model.config, k) for k in (
            "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta",
            "tie_embeddings", "max_seq_len")}))
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in
                               ("tok_embeddings", "layers", "norm", "output")})
        plain.init_buffers()
        ids = prompt[..., 0]
        allowed = model.allowed_subtokens("text")
        for _ in range(4):  # the LM path: hidden states of the token ids, then the head's block
            h = plain.hidden_states(ids)[:, -1]
            block = generate_block(model.head, model.tok_embeddings, plain.head_weight(), h, allowed, Q_EOS)
            ids = torch.cat([ids, block[:, :1]], 1)
        assert torch.equal(text[..., 0], ids)


@pytest.mark.parametrize("stage,trained,frozen", [
    ("tokenizer", ("tokenizer.", "layers.", "head.", "detokenizer."), ()),
    ("unified", ("layers.", "head.", "tok_embeddings."), ("tokenizer.", "detokenizer.")),
    ("detokenizer", ("detokenizer.",), ("tokenizer.", "layers.", "head.")),
])
def test_each_stage_trains_only_its_parts(stage, trained, frozen):
    model = small_model(stage)
    batch = real_batch(model.config, rows=2, share=0.0 if stage == "tokenizer" else 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(batch).backward()
    optimizer.step()
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    for prefix in trained:
        assert any(k.startswith(prefix) for k in moved), (stage, prefix)
    for prefix in frozen:
        assert not any(k.startswith(prefix) for k in moved), (stage, prefix, sorted(moved)[:5])
    assert not any(k.endswith("codebook") for k in moved)  # SimVQ's rows never train


def test_class_scores_rank_the_true_caption_by_likelihood():
    """eval's class score is log p(caption | image): recount one entry by summing the block log-probs."""
    model = small_model("unified")
    batch = real_batch(model.config, rows=2, fixed=True)
    with torch.no_grad():
        scores = model(batch, what="eval")["class_scores"]
        label = int(batch["labels"][0])
        _, blocks, _ = model.inputs(batch)  # the fixed caption is the true class's "a <name>"
        h = model.hidden_states(model.embed_blocks(blocks))
        start = int(batch["image_start"][0]) + model.config.tokenizer.num_patches + 1
        total = 0.0
        for t in range(start, blocks.shape[1]):
            if blocks[0, t, 0] == PAD:
                break
            logp = F.log_softmax(F.linear(model.head(h[0, t - 1][None], model.tok_embeddings(blocks[0, t, :1])[None]),
                                          model.head_weight()), -1)[0]
            total += float(logp[0, blocks[0, t, 0]] + logp[1, Q_EOS])
    assert scores.shape == (2, 10)
    assert abs(float(scores[0, label]) - total) < 1e-3


@pytest.mark.parametrize("override,message", [
    ("model.tokenizer.out_dim=64", "model.tokenizer.out_dim: 64 must equal model.dim"),
    ("model.stage=decoder", "model.stage"),
    ("images.generation_share=0.5", "images.generation_share: the tokenizer stage"),
    ("model.text_vocab=100", "model.text_vocab: 100 is not the caption vocabulary"),
    ("images.eval_images=0", "images.eval_images: must be in 1..10000"),
])
def test_bad_kelix_settings_are_one_line_errors(tmp_path, override, message):
    line = keel_refusal(["train", "recipes/kelix/tiny-1-tokenizer.yaml", f"run.out_dir={tmp_path / 'r'}",
                         "logging.wandb=disabled", override])
    assert message in line


def test_eval_usage_is_over_every_eval_image_not_per_batch():
    """The trainer sums eval scalars over batches: the code histogram travels as one scalar per code,
    so usage and perplexity are those of all eval images' codes together."""
    from keel.model.kelix_tok import codebook_usage

    model = small_model()
    task = KelixTask(unified_recipe(model.config))
    task.prepare()
    batches = task.build_data(dp_rank=0, dp_size=1).eval_batches(2, 4, 0, 1)
    sums = {}
    for batch in batches:
        for key, value in task.eval_sums(model, batch).items():
            sums[key] = sums.get(key, 0) + float(value)
    metrics = task.eval_metrics(sums)
    codes = torch.cat([model.tokenizer.encode(b["images"]) for b in batches])
    expected = codebook_usage(codes, model.config.tokenizer.codebook_size)
    assert metrics["eval_usage_min"] == pytest.approx(float(expected["usage"].min()))
    assert metrics["eval_perplexity_mean"] == pytest.approx(float(expected["perplexity"].mean()))
    per_batch = [float(codebook_usage(model.tokenizer.encode(b["images"]), 16)["usage"].min()) for b in batches]
    assert metrics["eval_usage_min"] >= max(per_batch)  # pooled usage is at least any one batch's
    hits = sum(int((model(b, what="eval")["class_scores"].argmax(-1) == b["labels"]).sum()) for b in batches)
    assert metrics["eval_class_acc"] == pytest.approx(hits / 8)
