"""On-policy distillation and CaMOPD: the signals against hand values and exact expectations, the
gap selection and the n_g : 1 schedule, routing errors, and the real check: a SmolLM2 student pushed
away from SmolLM2 moves back toward it (reverse KL on held-out real prompts falls)."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

import keel
from keel.errors import ConfigError, DataError
from keel.rl.distill import (AlternatingSchedule, build_opd_config, full_vocab_signal, gap_scores,
                             pack_rollouts, reverse_kl_advantages, route_teachers, sampled_signal, select_by_gap)
from keel.rl.opd import OPDTrainer
from keel.rl.scoring import full_vocab_kl

RECIPE = "recipes/rl/opd-tiny.yaml"


# ---------------------------------------------------------------- hand-computed values
def test_reverse_kl_signal_and_gap_by_hand():
    student = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -3.0, -1.0]])
    teacher = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, -1.0, -2.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float)
    adv = reverse_kl_advantages(student, teacher, mask)  # log pT - log ps on response tokens
    assert adv.tolist() == [[0.0, -0.5, 1.0, 0.0], [0.0, 0.0, 2.0, -1.0]]
    # -A_t * log ps_t per response token, row-major: -(-0.5)(-1) = -0.5; -(1)(-2) = 2; 0; -(2)(-3) = 6; -(-1)(-1) = -1
    assert sampled_signal(student, teacher, mask).tolist() == [-0.5, 2.0, 0.0, 6.0, -1.0]
    # CaMOPD gap: mean |log pT - log ps| over each sample's response tokens
    assert gap_scores(student, teacher, mask).tolist() == pytest.approx([(0.5 + 1.0) / 2, (0 + 2 + 1) / 3])


def test_sampled_signal_is_the_reverse_kl_gradient_in_expectation():
    """E_{y~ps}[grad of -A(y) log ps(y)] = grad KL(ps || pT), exactly, by enumerating the vocabulary."""
    torch.manual_seed(0)
    logits = torch.randn(1, 7, requires_grad=True)
    teacher = torch.randn(1, 7).log_softmax(-1)
    log_ps = logits.log_softmax(-1)
    expected = 0.0
    for y in range(7):
        s = log_ps[:, y:y + 1]
        t = teacher[:, y:y + 1]
        expected = expected + log_ps[0, y].exp().detach() * sampled_signal(s, t, torch.ones(1, 1)).sum()
    (grad_pg,) = torch.autograd.grad(expected, logits)
    (grad_kl,) = torch.autograd.grad(full_vocab_kl(logits.log_softmax(-1), teacher).sum(), logits)
    torch.testing.assert_close(grad_pg, grad_kl, rtol=1e-5, atol=1e-6)


def test_full_vocab_signal_matches_torch_kl_div():
    torch.manual_seed(1)
    log_p, log_q = torch.randn(5, 11).log_softmax(-1), torch.randn(5, 11).log_softmax(-1)
    reference = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(p || q)
    torch.testing.assert_close(full_vocab_signal(None, None, None, log_p, log_q), reference)


# ---------------------------------------------------------------- CaMOPD selection and schedule
def test_gap_selection_keeps_the_high_gap_samples():
    # Per-sample gaps by hand: sample 0: 0.1, 1: 0.9, 2: 0.4, 3: 0.9 (tie with 1), 4: 0.05
    student = torch.zeros(5, 3)
    teacher = torch.tensor([[0.1, 0.1, 0.1], [0.9, -0.9, 0.9], [0.4, 0.4, -0.4], [0.9, 0.9, 0.9],
                            [0.05, -0.05, 0.05]])
    scores = gap_scores(student, teacher, torch.ones(5, 3))
    assert scores.tolist() == pytest.approx([0.1, 0.9, 0.4, 0.9, 0.05])
    assert select_by_gap(scores, 0.4).tolist() == [1, 3]  # ceil(0.4 * 5) = 2 highest
    assert select_by_gap(scores, 0.5).tolist() == [1, 2, 3]  # ceil(2.5) = 3
    assert select_by_gap(scores, 0.2).tolist() == [1]  # a tie keeps the earlier sample
    assert select_by_gap(scores, 0.01).tolist() == [1]  # at least one
    assert select_by_gap(scores, 1.0).tolist() == [0, 1, 2, 3, 4]


def test_alternating_schedule_is_exactly_n_general_to_one():
    schedule = AlternatingSchedule(3)
    branches = [schedule.branch(step) for step in range(12)]
    assert branches == ["general"] * 3 + ["domain"] + ["general"] * 3 + ["domain"] + ["general"] * 3 + ["domain"]
    assert [AlternatingSchedule(1).branch(s) for s in range(4)] == ["general", "domain", "general", "domain"]


def test_routing_and_config_errors():
    assert route_teachers(["kjv", "shakespeare", "kjv"], {"kjv": "domain"}, "general") == ["domain", "general", "domain"]
    with pytest.raises(DataError, match="prompt source 'gsm8k' has no teacher"):
        route_teachers(["gsm8k"], {"kjv": "domain"}, None)
    with pytest.raises(ConfigError, match=r"rl\.opd\.routes\.kjv: unknown teacher 'domian'"):
        build_opd_config({"teachers": {"general": "smollm2", "domain": "x"}, "routes": {"kjv": "domian"}})
    with pytest.raises(ConfigError, match=r"rl\.opd\.camopd\.keep_fraction: must be in \(0, 1\]"):
        build_opd_config({"camopd": {"keep_fraction": 0.0, "domain_prompts": {"source": "jsonl"},
                                     "general_teacher": "general", "domain_teacher": "general"}})
    with pytest.raises(ConfigError, match=r"rl\.opd\.signal: expected one of"):
        build_opd_config({"signal": "forward_kl"})
    batch = pack_rollouts([[1, 2], [3]], [[4, 5, 6], [7]], ["a", "b"], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert batch.response_mask.int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


# ---------------------------------------------------------------- the real check
def _real_prompt_file(path, seed: int, n: int, words: int = 10):
    """Prompts that are openings of real KJV / Shakespeare passages, each with its corpus as source."""
    from keel.data.assets import corpus_files

    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            corpus = ("kjv", "shakespeare")[i % 2]
            text = rng.choice(corpus_files(corpus)).read_text().split()
            start = rng.randrange(len(text) - words)
            f.write(json.dumps({"prompt": " ".join(text[start:start + words]), "answer": "", "reward": "em",
                                "source": corpus}) + "\n")
    return path


def test_perturbed_student_moves_back_to_its_teacher(tmp_path):
    """SmolLM2 + LoRA adapters set to noise (reverse KL to SmolLM2 ~0.1 nat/token) is distilled
    from SmolLM2 itself, routed by prompt source, through the real OPD trainer and native engine."""
    from keel.model.lora import lora_modules

    overrides = [f"run.out_dir={tmp_path / 'run'}", "rl.policy=smollm2", "logging.wandb=disabled",
                 "logging.progress=false", "checkpoint.every=0", "rl.steps=4", "rl.eval_every=0",
                 "rl.prompts_per_step=8", "rl.sampling.max_tokens=16", "rl.micro_batch=8",
                 f"rl.prompts={{source: jsonl, path: {_real_prompt_file(tmp_path / 'train.jsonl', 0, 32)}}}",
                 f"rl.eval_prompts={{source: jsonl, path: {_real_prompt_file(tmp_path / 'eval.jsonl', 1, 8)}}}",
                 "rl.opd.routes={kjv: general, shakespeare: general}",
                 "rl.opd.lora.rank=8", r"rl.opd.lora.targets=layers\.(2[0-9])\.attention\.(wq|wv)$"]
    trainer = OPDTrainer(keel.load_recipe(RECIPE, overrides))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # push the student away: noise in every adapter's B
        for _, module in lora_modules(trainer.policy):
            module.lora_b.normal_(0.0, 0.3, generator=g)
    trainer.sync_weights()
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0]["eval_reverse_kl"], rows[-1]["eval_reverse_kl"]
    print(f"held-out reverse KL(student || SmolLM2) per token: {before:.4f} -> {after:.4f}")
    assert before > 0.05  # the perturbation is real
    assert after < 0.6 * before  # and distillation undoes most of it within 4 steps
    assert all(r["reverse_kl_sampled/general"] == r["reverse_kl_sampled"] for r in rows[1:])  # routed


# ---------------------------------------------------------------- CaMOPD through the trainer, resume
def _tiny_checkpoint(out, seed: int):
    """A small random Llama with SmolLM2's real tokenizer, as a keel checkpoint (cheap trainer runs)."""
    from keel.data.tokenizer import Tokenizer
    from keel.model.backbone import TransformerConfig
    from keel.model.registry import build_model
    from keel.checkpoint.model_io import write_model_checkpoint

    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                            max_seq_len=256)
    model = build_model(cfg)
    model.init_weights()
    return write_model_checkpoint(out, cfg, model.state_dict(), tokenizer=Tokenizer.load("smollm2").hf)


@pytest.fixture(scope="module")
def tiny_models(module_tmp):
    """(student init = domain teacher, general teacher): two different small random models."""
    root = module_tmp
    return _tiny_checkpoint(root / "student", 0), _tiny_checkpoint(root / "general", 1)


def _camopd_overrides(tmp_path, models, run: str, steps: int):
    policy, general_teacher = models
    general = _real_prompt_file(tmp_path / "general.jsonl", 2, 24)
    domain = _real_prompt_file(tmp_path / "domain.jsonl", 3, 24)
    return [f"run.out_dir={tmp_path / run}", f"rl.policy={policy}", "logging.wandb=disabled",
            "logging.progress=false", f"rl.steps={steps}", "rl.eval_prompts=null", "rl.prompts_per_step=3",
            "rl.group_size=2", "rl.sampling.max_tokens=6", "rl.micro_batch=4", "rl.sampling.temperature=1.0",
            f"rl.prompts={{source: jsonl, path: {general}}}", "rl.opd.routes={}", "rl.opd.signal=sampled",
            f"rl.opd.teachers={{general: {general_teacher}, domain: {policy}}}", r"rl.opd.lora.targets=wq$",
            f"rl.opd.camopd={{n_general: 2, keep_fraction: 0.5, domain_prompts: {{source: jsonl, path: {domain}}}}}"]


def test_camopd_trainer_alternates_selects_and_resumes_exactly(tmp_path, tiny_models):
    straight = tmp_path / "straight"
    OPDTrainer(keel.load_recipe(RECIPE, _camopd_overrides(tmp_path, tiny_models, "straight", 4))).train()
    rows = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["domain_step"] for r in rows] == [0.0, 0.0, 1.0, 0.0]  # n_g = 2 : 1
    assert all(r["kept_fraction"] == 0.5 for r in rows)  # 3 of 6 samples
    assert all(r["gap_kept"] >= r["gap_mean"] for r in rows)

    # 2 steps, stop (checkpoint), then resume to 4: the same rows and the same weights as straight.
    OPDTrainer(keel.load_recipe(RECIPE, _camopd_overrides(tmp_path, tiny_models, "resumed", 2))).train()
    OPDTrainer(keel.load_recipe(RECIPE, _camopd_overrides(tmp_path, tiny_models, "resumed", 4))).train()
    resumed = [r for r in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed):
        for key in ("loss", "reverse_kl_sampled", "gap_mean", "grad_norm", "domain_step"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    w_straight, w_resumed = keel.load(straight).state_dict(), keel.load(tmp_path / "resumed").state_dict()
    for name, value in w_straight.items():
        torch.testing.assert_close(w_resumed[name], value, rtol=0, atol=1e-7, msg=name)
    assert not math.isclose(rows[0]["loss"], rows[-1]["loss"])


@pytest.mark.parametrize("layout", ["fsdp2", "tp2"])
def test_two_rank_fsdp_camopd_equals_one_process_and_resumes_on_one(tmp_path, tiny_models, layout):
    """CaMOPD with the full-vocabulary signal under torchrun, FSDP2 over 2 ranks (student and both
    teachers sharded, each micro-batch calling every teacher on every rank): the same rows as one
    process; stopped after 2 steps and continued on one process, the same weights. With tp2 both
    ranks hold every rollout and half of each block of the student and the teachers."""
    from tests.conftest import assert_weights_agree_to_rounding, run_keel

    def overrides(run, steps):
        return _camopd_overrides(tmp_path, tiny_models, run, steps) + [
            "rl.opd.lora=null", "rl.opd.signal=full_vocab", "rl.micro_batch=2", "precision.dtype=fp32",
            "rl.engine_dtype=float32", "rl.sampling.top_k=20", "optim.lr=1e-3"]

    OPDTrainer(keel.load_recipe(RECIPE, overrides("one", 3))).train()
    tp = ["parallel.tp=2", "parallel.sequence_parallel=false"] if layout == "tp2" else []
    run_keel(["rl", RECIPE, *overrides("two", 2), *tp], nproc=2)
    OPDTrainer(keel.load_recipe(RECIPE, overrides("two", 3))).train()  # resumes at step 2 on one process
    one, two = ([r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
                for run in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3] and [r["domain_step"] for r in two] == [0.0, 0.0, 1.0]
    for a, b in zip(one, two):
        for key in ("response_len_mean", "kept_fraction", "trained_tokens"):
            assert b[key] == a[key], (a["step"], key)
        for key in ("loss", "reverse_kl_sampled", "reverse_kl_full_kept", "gap_mean", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert_weights_agree_to_rounding(keel.load(tmp_path / "one").state_dict(), keel.load(tmp_path / "two").state_dict())


def test_teachers_and_student_score_in_micro_batches_like_all_at_once():
    """Scoring a step's batch `micro_batch` rows at a time (memory bounded by the micro-batch) gives
    the one-forward result, routed rows and full-vocabulary rows included."""
    from keel.model.backbone import Transformer, TransformerConfig
    from keel.rl.distill import pack_rollouts, student_scores, teacher_scores

    def model(seed):
        torch.manual_seed(seed)
        m = Transformer(TransformerConfig(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
        m.init_weights()
        return m.eval()

    teachers = {"a": model(1), "b": model(2)}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 48, (int(n),), generator=g).tolist() for n in torch.randint(2, 7, (7,), generator=g)]
    responses = [torch.randint(0, 48, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (7,), generator=g)]
    batch = pack_rollouts(prompts, responses, ["a", "b", "a", "a", "b", "b", "a"], pad_id=0)
    with torch.no_grad():
        whole, whole_full = teacher_scores(teachers, batch, full=True)
        parts, parts_full = teacher_scores(teachers, batch, full=True, micro_batch=2)
        torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(parts_full, whole_full, atol=1e-5, rtol=1e-5)
        student = model(3)
        from keel.rl.scoring import response_logprobs
        ref = response_logprobs(student, batch.input_ids, batch.response_mask)[0]
        torch.testing.assert_close(student_scores(student, batch, 3), ref.float(), atol=1e-5, rtol=1e-5)
