"""Rollout engines: the native engine against full-sequence forwards and keel's plain generate;
slot refill, weight updates; the vLLM adapter's calls against a fake vLLM, and against a live one
where vLLM is installed (KEEL_TEST_VLLM=1)."""
import dataclasses
import importlib.util
import os
from types import SimpleNamespace

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


def test_prefills_build_no_attention_mask(monkeypatch):
    """Prompts of mixed lengths are prefilled in unpadded side batches (one per length), so no dense
    [L, L] mask is ever built for a prefill: SDPA runs its plain causal kernel (a long prompt's mask
    would not fit). Decode steps (one query) still mask the cache's invalid slots."""
    from keel.model.attention import AttentionMask

    built = []
    original = AttentionMask._build_dense
    monkeypatch.setattr(AttentionMask, "_build_dense",
                        lambda self, q_len, k_len, device: built.append(q_len) or original(self, q_len, k_len, device))
    model = _tiny_model(2)
    prompts = _prompts(6, seed=3)
    assert len({len(p) for p in prompts if len(p) > 2}) > 2  # several head lengths share no batch
    rollouts = NativeEngine(model, max_batch=4).generate(prompts, SamplingParams(max_tokens=6, temperature=1.0,
                                                                                 n=2, seed=0))
    assert built and max(built) == 1  # only decode steps built masks
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
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from keel.errors import MissingExtraError
    with pytest.raises(MissingExtraError, match=r"pip install keel\[rl\]"):
        ENGINES["vllm"](_tiny_model(), None)


class _FakeLLM:
    """Stands in for vllm.LLM: records each call the adapter makes, answers generate with one token."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, args=(), kwargs=None):
        if isinstance(method, str):  # reload_weights: the names its lazy iterator yields
            self.calls.append((method, [name for name, _ in kwargs["weights_iterator"]]))
        else:  # a bucket session's step, run on each worker: its function and the bucket's names
            self.calls.append((method.__name__, [(name, t.device.type) for name, t in args[0]] if args else None))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        sample = SimpleNamespace(token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-0.25)}], finish_reason="length")
        return [SimpleNamespace(outputs=[sample]) for _ in prompts]


def _fake_vllm_engine(monkeypatch, **cfg):
    import keel.rl.engines.vllm as adapter

    fake = SimpleNamespace(LLM=_FakeLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setattr(adapter, "import_vllm", lambda: fake)
    cfg = SimpleNamespace(**{**dict(sleep=True, dtype="float32", tensor_parallel_size=1, gpu_memory_utilization=0.3,
                                    enforce_eager=True, bucket_mb=1), **cfg})
    engine = adapter.VLLMEngine("unused", cfg, max_model_len=64)
    engine.hf_adapter = SimpleNamespace(tensor_split=None, tensor_name=lambda name: "model." + name)
    engine.sleeps = True  # as on a GPU (this CPU has none, so the engine turned sleep off)
    return engine


def test_vllm_sleep_and_wake_calls_over_two_training_steps(monkeypatch):
    """The vLLM adapter against a fake vLLM: level-2 sleep once the rollouts are in; the update wakes
    the weights only and stays awake; the step's first generate wakes the KV cache, the second
    wakes nothing; generate between sleep and update refuses (its weights are gone)."""
    engine = _fake_vllm_engine(monkeypatch)
    assert engine.llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert engine.llm.kwargs["enable_sleep_mode"] is False  # no GPU here: vLLM would refuse it
    weights = [("w1", torch.ones(2)), ("w2", torch.zeros(3))]
    prompts, params = [[1, 2], [3]], SamplingParams(max_tokens=4, temperature=0.7, top_k=20)
    reload = ("reload_weights", ["model.w1", "model.w2"])
    engine.sleep()  # step 0's rollouts are in: train
    assert engine.llm.calls == [("sleep", 2)]
    for step in (1, 2):
        engine.llm.calls.clear()
        with pytest.raises(RuntimeError, match="needs update_weights"):
            engine.generate(prompts, params)
        engine.update_weights(weights, version=step)
        first = engine.generate(prompts, params)
        engine.generate(prompts, params)
        engine.sleep()
        engine.sleep()  # already asleep: nothing more
        assert engine.llm.calls == [("wake_up", ["weights"]), reload, ("reset_prefix_cache",),
                                    ("wake_up", ["kv_cache"]), ("generate", 2), ("generate", 2), ("sleep", 2)]
        assert engine.version == step
        assert [(r.tokens, r.logprobs, r.finish_reason, r.prompt_index) for r in first] == [([5], [-0.25], "length", 0),
                                                                                          ([5], [-0.25], "length", 1)]
    engine.llm.calls.clear()  # an update and no rollout before the next sleep: vLLM sleeps from fully awake
    engine.update_weights(weights, version=3)
    engine.sleep()
    assert engine.llm.calls == [("wake_up", ["weights"]), reload, ("reset_prefix_cache",), ("wake_up", ["kv_cache"]),
                                ("sleep", 2)]
    engine.sleeps = False  # CPU: vLLM is never put to sleep, and the contract is the same
    engine.update_weights(weights, version=4)
    engine.llm.calls.clear()
    engine.sleep()
    assert engine.llm.calls == []
    with pytest.raises(RuntimeError, match="needs update_weights"):
        engine.generate(prompts, params)


def test_vllm_multi_process_update_is_one_session_of_cpu_buckets(monkeypatch):
    """tensor_parallel_size > 1: one update is one start / buckets / finish session on the workers,
    every tensor in exactly one bucket of about rl.vllm.bucket_mb MiB, sent as CPU tensors."""
    engine = _fake_vllm_engine(monkeypatch, tensor_parallel_size=2, bucket_mb=1)
    weights = [(f"w{i}", torch.zeros(160_000)) for i in range(5)]  # 640 KB each: 2 fill a 1 MiB bucket
    engine.update_weights(weights, version=1)
    cpu = "cpu"
    assert engine.llm.calls == [("_worker_start_update", None),
                                ("_worker_load_bucket", [("model.w0", cpu), ("model.w1", cpu)]),
                                ("_worker_load_bucket", [("model.w2", cpu), ("model.w3", cpu)]),
                                ("_worker_load_bucket", [("model.w4", cpu)]),
                                ("_worker_finish_update", None), ("reset_prefix_cache",)]


@pytest.fixture(scope="module")
def smollm2_engines():
    """(fp32 SmolLM2 policy, tokenizer, live vLLM engine, native engine, prompts), once per module."""
    if os.environ.get("KEEL_TEST_VLLM") != "1":
        pytest.skip("set KEEL_TEST_VLLM=1 where vLLM is installed")
    from keel.rl.config import RLConfig
    from keel.rl.run import load_policy

    policy, tokenizer = load_policy("smollm2")
    policy.eval()
    rl = RLConfig(max_prompt_tokens=64)
    rl.sampling.max_tokens = 12
    rl.vllm.dtype = "float32"
    rl.vllm.enforce_eager = True
    rl.vllm.gpu_memory_utilization = 0.3  # on CPU: the share of RAM vLLM reserves
    vllm_engine, native = ENGINES["vllm"](policy, rl), ENGINES["native"](policy, rl)
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "1 + 1 =", "Once upon a time")]
    return policy, tokenizer, vllm_engine, native, prompts


def test_vllm_logprobs_are_those_of_the_processed_distribution(smollm2_engines):
    """Seeded sampling at temperature 0.7 with top-k 20 (and 0.9 with top-p 0.8): each logprob vLLM
    records is log p(token) under the distribution it was drawn from, recounted from a full fp32
    forward of keel's model (processed_logits), not the raw model's."""
    from keel.model.generation import processed_logits

    policy, tokenizer, vllm_engine, _, prompts = smollm2_engines
    raw_gap, stop = 0.0, (tokenizer.eos_id,)
    for params in (SamplingParams(max_tokens=12, temperature=0.7, top_k=20, n=2, seed=3, stop_ids=stop),
                   SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, n=2, seed=4, stop_ids=stop)):
        rollouts = vllm_engine.generate(prompts, params)
        assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
        for r in rollouts:
            prompt, tokens = prompts[r.prompt_index], torch.tensor(r.tokens)
            with torch.no_grad():
                logits = policy(torch.tensor([prompt + r.tokens]))[0, len(prompt) - 1:-1].float()
            logp = processed_logits(logits, params.temperature, params.top_k, params.top_p).log_softmax(-1)
            expected = logp.gather(-1, tokens[:, None]).squeeze(-1)
            assert torch.isfinite(expected).all()  # never a token outside the top-k / nucleus
            torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=2e-3, rtol=0)
            raw = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
            raw_gap = max(raw_gap, float((raw - expected).abs().max()))
    assert raw_gap > 0.1  # the raw model's logprobs would not have passed


def test_vllm_engine_matches_native_on_smollm2_across_sleeps_and_updates(smollm2_engines):
    """Greedy tokens and logprobs equal the native engine's at the start and after each of two
    updates with different weights, each step going through sleep and wake (on CPU vLLM's engine
    pauses and resumes its scheduler by the tags; its CPU worker frees nothing); generate between
    sleep and update refuses. Then one more update through the multi-process path's bucket session,
    run in-process with 1 MiB buckets (which split layers): still the native engine's tokens."""
    policy, tokenizer, vllm_engine, native, prompts = smollm2_engines
    original = {k: v.clone() for k, v in policy.state_dict().items()}
    greedy = SamplingParams(max_tokens=12, temperature=0, stop_ids=(tokenizer.eos_id,))
    vllm_engine.sleeps = True  # the GPU call sequence, whatever this machine is

    def same_as_native():
        ours = vllm_engine.generate(prompts, greedy)
        for a, b in zip(ours, native.generate(prompts, greedy)):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-3, rtol=1e-3)
        assert [r.tokens for r in vllm_engine.generate(prompts, greedy)] == [r.tokens for r in ours]  # awake still
        return [r.tokens for r in ours]

    def push(version):
        vllm_engine.sleep()
        with pytest.raises(RuntimeError, match="needs update_weights"):
            vllm_engine.generate(prompts, greedy)
        for engine in (vllm_engine, native):
            engine.update_weights(policy.named_parameters(), version=version)

    seen = [same_as_native()]
    with torch.no_grad():
        for version, (suffix, scale) in enumerate((("feed_forward.w2.weight", 0.5), ("attention.wo.weight", 0.7)), 1):
            for name, p in policy.named_parameters():
                if name.endswith(suffix):
                    p.mul_(scale)
            push(version)
            seen.append(same_as_native())
            assert seen[-1] != seen[-2]  # the new weights are in use
        policy.load_state_dict(original)
    cfg = vllm_engine.cfg
    vllm_engine.cfg = dataclasses.replace(cfg, tensor_parallel_size=2, bucket_mb=1)  # the vLLM built stays tp 1
    try:
        push(3)
    finally:
        vllm_engine.cfg = cfg
    assert same_as_native() == seen[0]


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
