"""Rollout engines: the native engine against full-sequence forwards and keel's plain generate;
slot refill, weight updates, and the vLLM adapter (run where vLLM is installed)."""
import os

import pytest
import torch

from keel.model.backbone import Transformer, TransformerConfig
from keel.model.generation import generate
from keel.rl.engines import ENGINES, SamplingParams
from keel.rl.engines.native import NativeEngine


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    model = Transformer(cfg)
    model.init_weights()
    return model.eval()


def _prompts(n, seed=1, vocab=64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def _teacher_forced_logprobs(model, prompt, tokens, temperature=1.0):
    seq = torch.tensor([prompt + tokens])
    logits = model(seq)[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_refilled_slots_match_full_forwards():
    """4 slots serve 26 sampled sequences of mixed lengths (stop ids end many early, refills and
    compaction happen): every token's logprob equals a fresh full forward of prompt + response."""
    model = _tiny_model()
    prompts = _prompts(13)
    engine = NativeEngine(model, max_batch=4)
    params = SamplingParams(max_tokens=30, temperature=0.7, stop_ids=(3, 7, 11), n=2, seed=0)
    rollouts = engine.generate(prompts, params)
    assert [r.prompt_index for r in rollouts] == [i for i in range(13) for _ in range(2)]
    lengths = [len(r.tokens) for r in rollouts]
    assert min(lengths) < 10 and max(lengths) == 30  # mixed lengths, so slots were refilled
    for r in rollouts:
        assert (r.finish_reason == "stop") == (r.tokens[-1] in (3, 7, 11))
        assert all(t not in (3, 7, 11) for t in r.tokens[:-1])
        ref = _teacher_forced_logprobs(model, prompts[r.prompt_index], r.tokens, temperature=0.7)
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-4, rtol=1e-4)
    again = engine.generate(prompts, params)  # seeded: the same rollouts again
    assert [r.tokens for r in again] == [r.tokens for r in rollouts]


def test_samples_of_a_prompt_share_one_prefill():
    """n = 4 samples of each of 5 prompts through 3 slots (so a prompt's samples land in different
    refills): 5 prefills, not 20, and every sample's logprobs still equal a full forward."""
    model = _tiny_model(1)
    prompts = _prompts(5, seed=2)
    engine = NativeEngine(model, max_batch=3)
    rollouts = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=1.0, stop_ids=(5,), n=4, seed=1))
    assert engine.prefills == 5
    for r in rollouts:
        ref = _teacher_forced_logprobs(model, prompts[r.prompt_index], r.tokens)
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-4, rtol=1e-4)


def test_prompt_seeded_samples_do_not_depend_on_the_batch_they_share():
    """With one seed per prompt, a prompt's samples are the same generated with 5 other prompts
    through 4 slots, or alone through 2 (what lets RL split prompts over ranks): equal tokens, and
    logprobs equal to rounding; and a different seed gives different samples."""
    model = _tiny_model(2)
    prompts = _prompts(6, seed=3)
    seeds = tuple(range(100, 106))
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9, stop_ids=(5,), n=3)
    together = NativeEngine(model, max_batch=4).generate(prompts, SamplingParams(**params, prompt_seeds=seeds))
    for i in (0, 4):
        alone = NativeEngine(model, max_batch=2).generate([prompts[i]], SamplingParams(**params, prompt_seeds=(seeds[i],)))
        mine = [r for r in together if r.prompt_index == i]
        assert [r.tokens for r in alone] == [r.tokens for r in mine]
        for a, b in zip(alone, mine):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    other = NativeEngine(model, max_batch=4).generate(prompts, SamplingParams(**params, prompt_seeds=tuple(range(6))))
    assert [r.tokens for r in other] != [r.tokens for r in together]


def test_inverse_cdf_sampling_recounts_the_distribution_and_skips_truncated_tokens():
    """Evenly spaced uniforms through inverse_cdf_sample hit each token as often as its probability
    says (to 1/K), never a zero-probability token, even at u = 0 and u just below 1."""
    from keel.model.generation import inverse_cdf_sample

    probs = torch.tensor([0.0, 0.1, 0.0, 0.45, 0.25, 0.2, 0.0])
    k = 10_000
    u = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    tokens = inverse_cdf_sample(probs.expand(k, -1), u)
    counts = torch.bincount(tokens, minlength=7).double() / k
    torch.testing.assert_close(counts, probs.double(), atol=1.5 / k, rtol=0)
    edges = inverse_cdf_sample(probs.expand(2, -1), torch.tensor([0.0, 1 - 1e-12], dtype=torch.float64))
    assert edges.tolist() == [1, 5]


def test_greedy_matches_plain_generate():
    model = _tiny_model(3)
    prompts = _prompts(9, seed=5)
    stop = tuple(range(0, 64, 5))
    rollouts = NativeEngine(model, max_batch=3).generate(prompts, SamplingParams(max_tokens=20, temperature=0,
                                                                                 stop_ids=stop))
    for prompt, r in zip(prompts, rollouts):
        ref = generate(model, [prompt], max_new_tokens=20, temperature=0, stop_ids=stop)
        assert r.tokens == ref.tokens[0]
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(ref.logprobs[0]), atol=1e-4, rtol=1e-4)


def test_update_weights_changes_rollouts_and_checks_names():
    policy, other = _tiny_model(0), _tiny_model(7)
    engine = NativeEngine(policy.__class__(policy.config), max_batch=4)
    engine.model.init_buffers()
    prompts = _prompts(4)
    params = SamplingParams(max_tokens=8, temperature=0)
    engine.update_weights(policy.named_parameters(), version=1)
    first = engine.generate(prompts, params)
    engine.update_weights(other.named_parameters(), version=2)
    second = engine.generate(prompts, params)
    assert engine.version == 2
    for prompt, a, b in zip(prompts, first, second):
        ref = generate(other, [prompt], max_new_tokens=8)
        assert b.tokens == ref.tokens[0]
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(ref.logprobs[0]), atol=1e-5, rtol=1e-5)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) > 1e-3  # the new weights are in use
    with pytest.raises(KeyError, match="did not send"):
        engine.update_weights(list(other.named_parameters())[:3], version=3)


def test_cpu_decode_threads_are_set_for_the_decode_only():
    """The engine decodes with its own cpu_threads (1 by default: small decode matmuls stall on
    OpenMP barriers when cores are shared), restores torch's setting afterwards, and its
    rollouts equal those decoded under torch's own thread count."""
    model, prompts = _tiny_model(2), _prompts(6, seed=9)
    params = SamplingParams(max_tokens=10, temperature=1.0, n=2, seed=4)
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pinned = NativeEngine(model, max_batch=4).generate(prompts, params)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        inherited = NativeEngine(model, max_batch=4, cpu_threads=0).generate(prompts, params)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
        hook.remove()
    assert [r.tokens for r in pinned] == [r.tokens for r in inherited]
    for a, b in zip(pinned, inherited):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


def test_missing_vllm_names_the_extra():
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    from keel.errors import MissingExtraError
    with pytest.raises(MissingExtraError, match=r"pip install keel\[rl\]"):
        ENGINES["vllm"](_tiny_model(), None)


@pytest.mark.skipif(os.environ.get("KEEL_TEST_VLLM") != "1", reason="set KEEL_TEST_VLLM=1 where vLLM is installed")
def test_vllm_engine_matches_native_on_smollm2():
    """A live vLLM (CPU or GPU) against the native engine on the real SmolLM2: greedy tokens and
    logprobs agree, and pushed weights change vLLM's output exactly as they change the native one."""
    from keel.rl.config import RLConfig
    from keel.rl.run import load_policy

    policy, tokenizer = load_policy("smollm2")
    rl = RLConfig(max_prompt_tokens=64)
    rl.sampling.max_tokens = 12
    rl.vllm.dtype = "float32"
    rl.vllm.enforce_eager = True
    rl.vllm.gpu_memory_utilization = 0.3  # on CPU: the share of RAM vLLM reserves
    vllm_engine = ENGINES["vllm"](policy, rl)
    native = ENGINES["native"](policy, rl)
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "1 + 1 =", "Once upon a time")]
    params = SamplingParams(max_tokens=12, temperature=0, stop_ids=(tokenizer.eos_id,))
    for a, b in zip(vllm_engine.generate(prompts, params), native.generate(prompts, params)):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-3, rtol=1e-3)
    with torch.no_grad():  # a different policy: every MLP down-projection halved
        for name, p in policy.named_parameters():
            if name.endswith("feed_forward.w2.weight"):
                p.mul_(0.5)
    for engine in (vllm_engine, native):
        engine.update_weights(policy.named_parameters(), version=1)
    for a, b in zip(vllm_engine.generate(prompts, params), native.generate(prompts, params)):
        assert a.tokens == b.tokens


def test_recorded_logprobs_are_those_of_the_truncated_sampling_distribution():
    """With top-p < 1 and top-k, each recorded log-probability equals log of the token's probability
    after truncation and renormalisation, recounted here from a fresh full forward."""
    model = _tiny_model(4)
    prompts = _prompts(5, seed=2)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.6, top_k=20, n=2, seed=1)
    for r in NativeEngine(model, max_batch=3).generate(prompts, params):
        ids = torch.tensor([prompts[r.prompt_index] + r.tokens])
        with torch.no_grad():
            logits = model(ids)[0, len(prompts[r.prompt_index]) - 1:-1].float() / 0.9
        for step, (token, recorded) in enumerate(zip(r.tokens, r.logprobs)):
            probs = logits[step].softmax(-1)
            top = torch.topk(probs, 20)  # top-k first, then the smallest nucleus holding 0.6 of it
            kept_p, kept_i = top.values / top.values.sum(), top.indices
            nucleus = int((kept_p.cumsum(0) - kept_p < 0.6).sum())
            kept_p, kept_i = kept_p[:nucleus] / kept_p[:nucleus].sum(), kept_i[:nucleus]
            assert token in kept_i.tolist()  # never sampled outside the nucleus
            expected = torch.log(kept_p[kept_i.tolist().index(token)])
            assert abs(recorded - float(expected)) < 1e-4, (step, recorded, float(expected))
