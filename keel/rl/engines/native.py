"""keel's own rollout engine: batched KV-cache decoding on the backbone, with slot refill.

A fixed number of slots decode one token per forward. When a sequence stops (a stop id or its
max_tokens), its slot takes the next waiting prompt at once, so the batch never idles behind its
longest sequence; when no prompt waits, finished slots leave the batch and it shrinks.

How a slot is refilled inside one shared KV cache (keel/model/generation.py): the cache has one
write position for all rows, and each row's real tokens are marked in `cache.valid`. A new
prompt's first p-1 tokens are prefilled in a small side batch of prompts of the same length (no
padding, so attention is plain causal with no mask built), and their keys/values (already
rotated for positions 0..p-2) are copied into the row just before the write position, with the
row's older entries marked invalid; its last prompt token is then fed by the next decode step.
A prompt is prefilled once for all its n samples: its keys/values are kept until its last sample
has a row (samples of a prompt are queued together, so few prompts are ever kept at once).
RoPE positions come from counting valid entries, so the new sequence sees exactly itself. When
the write position reaches the end of the cache, rows are shifted left together (compaction).
Works on CPU and GPU; results are deterministic for a given seed and prompt list.

On CPU the decode runs with `cpu_threads` intra-op threads (default 1), whatever the trainer
uses. One decode step is ~200 small matmuls ([batch, 576] x [576, 1536] for SmolLM2-135M, well under
a millisecond each); with 2 OpenMP threads every one of them ends in a barrier, and when the other
core is busy (a shared box, the trainer's own threads) the barrier waits a whole scheduler slice:
measured on the 2-core dev box under load ~3, one such matmul took 7.6 ms with 2 threads and 0.45 ms
with 1, and SmolLM2 batch-8 float32 decode (32 tokens) went from 5.3 to 50 tok/s.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Iterable, Optional

import torch

from keel.model.generation import KVCache, sample_with_logprobs
from keel.model.registry import build_model
from keel.rl.engines.base import Rollout, SamplingParams, sample_seed
from keel.rl.sharding import whole_parameters

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Slots:
    """Per-row bookkeeping of the decode batch."""

    def __init__(self):
        self.owner: list[int] = []  # index into the flat list of requests
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[float]] = []
        self.uniforms: Optional[torch.Tensor] = None  # [rows, max_tokens]: each row's own draws (prompt_seeds)


class NativeEngine:
    def __init__(self, model: torch.nn.Module, max_batch: int = 32, cpu_threads: int = 1):
        self.model = model.eval().requires_grad_(False)
        self.max_batch = max_batch
        self.cpu_threads = cpu_threads  # 0: leave torch's setting alone
        self.version = 0
        self.device = model.tok_embeddings.weight.device
        self.prefills = 0  # prompts prefilled so far: once per prompt, whatever its number of samples

    @classmethod
    def from_policy(cls, policy: torch.nn.Module, rl_cfg, device=None):
        """The engine's own whole copy of the policy, built from its config (the trainer's weights
        stay fp32 and trainable, and may be FSDP-sharded: gathered here one parameter at a time)."""
        device = torch.device(device or next(policy.parameters()).device)
        model = build_model(policy.config, "meta")
        model.to_empty(device=device)
        model.init_buffers()
        model.to(dtype=_DTYPES[rl_cfg.engine_dtype])
        engine = cls(model, rl_cfg.engine_batch, rl_cfg.engine_cpu_threads)
        engine.update_weights(whole_parameters(policy), 0)
        return engine

    @contextlib.contextmanager
    def _decode_threads(self):
        """Run the decode with `cpu_threads` intra-op threads on CPU (see the module docstring)."""
        before = torch.get_num_threads()
        change = self.device.type == "cpu" and self.cpu_threads > 0 and self.cpu_threads != before
        if change:
            torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            if change:
                torch.set_num_threads(before)

    # ------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        seen = set()
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"native engine: no parameter named {name!r} in the rollout model")
            params[name].copy_(tensor.detach())
            seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise KeyError(f"native engine: update_weights did not send {missing[:3]} ({len(missing)} missing)")
        self.version = version

    def sleep(self) -> None:
        """A no-op: update_weights copies into the engine's weights in place, so they stay allocated,
        and its KV cache exists only inside generate."""

    # ------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        with self._decode_threads():
            return self._generate(prompts, sampling)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("native engine: every prompt needs at least one token")
        requests = [(i, list(p)) for i, p in enumerate(prompts) for _ in range(sampling.n)]
        results: list[Optional[Rollout]] = [None] * len(requests)
        waiting = deque(range(len(requests)))
        longest_prefill = max(len(p) for _, p in requests) - 1  # p-1 tokens are prefilled
        width = min(self.max_batch, len(requests))
        # Room for the longest live sequence plus slack, so compaction happens at most every
        # max_tokens steps.
        cache = KVCache.for_model(self.model, width, longest_prefill + 2 * sampling.max_tokens + 1)
        cache.length = longest_prefill  # everything before is invalid until a prompt is placed
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        draws = self._draws(len(prompts), sampling)
        stop = torch.tensor(list(sampling.stop_ids) or [-1], device=self.device)
        slots = _Slots()
        inputs = torch.zeros(width, dtype=torch.long, device=self.device)
        rows = list(range(width))
        for row in rows:
            slots.owner.append(-1)
            slots.tokens.append([])
            slots.logprobs.append([])
        if draws is not None:
            slots.uniforms = torch.zeros(width, sampling.max_tokens, dtype=torch.float64, device=self.device)
        prefilled: dict = {}
        self._refill(cache, rows, [waiting.popleft() for _ in rows], requests, slots, inputs, prefilled, sampling.n,
                     draws)

        while slots.owner:
            if cache.length + 1 > cache.max_len:
                self._compact(cache, longest_prefill)
            cache.append_valid(torch.ones(len(slots.owner), 1, dtype=torch.bool, device=self.device))
            logits = self.model(inputs[:, None], cache=cache)[:, -1].float()
            # The log-probability of the distribution actually sampled (top-k/top-p truncated): the
            # behaviour policy that truncated importance sampling corrects for.
            uniforms = None
            if slots.uniforms is not None:  # each row's next own draw
                made = torch.tensor([len(t) for t in slots.tokens], device=self.device)
                uniforms = slots.uniforms.gather(1, made[:, None]).squeeze(1)
            nxt, logprobs = sample_with_logprobs(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                                 generator, uniforms)
            # One device -> host transfer per decoded token (float64 holds token ids exactly).
            host = torch.stack([nxt.double(), torch.isin(nxt, stop).double(), logprobs.double()]).tolist()
            nxt_list, stopped, lp_list = [int(t) for t in host[0]], [bool(x) for x in host[1]], host[2]
            finished = []
            for row, (tok, lp) in enumerate(zip(nxt_list, lp_list)):
                slots.tokens[row].append(tok)
                slots.logprobs[row].append(lp)
                if stopped[row] or len(slots.tokens[row]) >= sampling.max_tokens:
                    finished.append(row)
                    req = slots.owner[row]
                    results[req] = Rollout(slots.tokens[row], slots.logprobs[row],
                                           "stop" if stopped[row] else "length", requests[req][0])
            inputs = nxt
            if not finished:
                continue
            refill = finished[:len(waiting)]
            if refill:
                self._refill(cache, refill, [waiting.popleft() for _ in refill], requests, slots, inputs,
                             prefilled, sampling.n, draws)
            gone = finished[len(refill):]
            if gone:
                inputs = self._drop_rows(cache, gone, slots, inputs)
        return results  # type: ignore[return-value]

    def _draws(self, n_prompts: int, sampling: SamplingParams):
        """Per request (prompt-major, n samples each) its own max_tokens uniforms, from its prompt's
        seed and sample number (SamplingParams.prompt_seeds), or None without prompt seeds."""
        if sampling.prompt_seeds is None or sampling.temperature <= 0:
            return None
        if len(sampling.prompt_seeds) != n_prompts:
            raise ValueError(f"native engine: {len(sampling.prompt_seeds)} prompt seeds for {n_prompts} prompts")
        out = []
        for seed in sampling.prompt_seeds:
            for sample in range(sampling.n):
                g = torch.Generator().manual_seed(sample_seed(seed, sample))
                out.append(torch.rand(sampling.max_tokens, generator=g, dtype=torch.float64))
        return torch.stack(out).to(self.device)

    def _refill(self, cache: KVCache, rows: list[int], reqs: list[int], requests, slots: _Slots,
                inputs: torch.Tensor, prefilled: dict, n_samples: int, draws: Optional[torch.Tensor]) -> None:
        """Place requests `reqs` into `rows`: all but their last prompt token come from the cache's
        keys/values of that prompt, prefilled once for all n samples of it (`prefilled`: prompt index
        -> [keys, values, samples not yet placed], kept only while some sample still waits)."""
        row_index = torch.tensor(rows, device=self.device)
        cache.valid[row_index] = False
        new = {requests[r][0]: requests[r][1] for r in reqs if requests[r][0] not in prefilled}
        self._prefill(new, n_samples, prefilled)
        for row, req in zip(rows, reqs):
            prompt_index, prompt = requests[req]
            entry = prefilled[prompt_index]
            keys, values = entry[0], entry[1]
            length = keys[0].shape[2] if keys else 0
            if length:
                start = cache.length - length
                for layer in range(len(cache.k)):
                    cache.k[layer][row, :, start:cache.length] = keys[layer][0]
                    cache.v[layer][row, :, start:cache.length] = values[layer][0]
                cache.valid[row, start:cache.length] = True
            entry[2] -= 1
            if entry[2] == 0:  # the prompt's last sample is placed: its prefill is no longer needed
                del prefilled[prompt_index]
            slots.owner[row], slots.tokens[row], slots.logprobs[row] = req, [], []
            if draws is not None:
                slots.uniforms[row] = draws[req]
            inputs[row] = prompt[-1]

    def _prefill(self, new: dict, n_samples: int, prefilled: dict) -> None:
        """Prefill the heads (all tokens but the last) of `new` prompts (index -> ids): one side batch
        per head length, so no row is padded and attention runs plain causal, without a mask (the
        fast SDPA path; a long prompt's dense mask would not even fit)."""
        by_length: dict = {}
        for i, ids in new.items():
            by_length.setdefault(len(ids) - 1, {})[i] = ids
        for same_length in by_length.values():
            self._prefill_batch(same_length, n_samples, prefilled)

    def _prefill_batch(self, new: dict, n_samples: int, prefilled: dict) -> None:
        """One side batch over the heads of `new` prompts (index -> ids)."""
        prompt_indices = list(new)
        heads = [new[i][:-1] for i in prompt_indices]
        width = max(len(h) for h in heads)
        self.prefills += len(prompt_indices)
        if not width:
            for i in prompt_indices:
                prefilled[i] = [[], [], n_samples]
            return
        side = KVCache.for_model(self.model, len(heads), width)
        ids = torch.zeros(len(heads), width, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(heads), width, dtype=torch.bool, device=self.device)
        for i, h in enumerate(heads):
            if h:
                ids[i, width - len(h):] = torch.tensor(h, device=self.device)
                valid[i, width - len(h):] = True
        side.append_valid(valid)
        self.model.hidden_states(ids, cache=side)  # fills side's keys/values; logits not needed
        for i, (prompt_index, h) in enumerate(zip(prompt_indices, heads)):
            cut = slice(width - len(h), width)  # right-aligned: this prompt's own entries
            prefilled[prompt_index] = [[k[i:i + 1, :, cut].clone() for k in side.k],
                                       [v[i:i + 1, :, cut].clone() for v in side.v], n_samples]

    def _drop_rows(self, cache: KVCache, gone: list[int], slots: _Slots, inputs: torch.Tensor) -> torch.Tensor:
        keep = [r for r in range(len(slots.owner)) if r not in set(gone)]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        cache.k = [k.index_select(0, index) for k in cache.k]
        cache.v = [v.index_select(0, index) for v in cache.v]
        cache.valid = cache.valid.index_select(0, index)
        slots.owner = [slots.owner[r] for r in keep]
        slots.tokens = [slots.tokens[r] for r in keep]
        slots.logprobs = [slots.logprobs[r] for r in keep]
        if slots.uniforms is not None:
            slots.uniforms = slots.uniforms.index_select(0, index)
        return inputs.index_select(0, index)

    @staticmethod
    def _compact(cache: KVCache, keep_room: int) -> None:
        """Shift every row left by the longest all-invalid prefix, keeping room to place a prompt."""
        used = cache.valid[:, :cache.length]
        first_valid = torch.where(used.any(1), used.float().argmax(1), torch.full_like(used[:, 0], cache.length,
                                                                                       dtype=torch.long))
        shift = min(int(first_valid.min()), cache.length - keep_room)
        if shift <= 0:
            raise RuntimeError("native engine: KV cache full and nothing to compact")
        end = cache.length
        for layer in range(len(cache.k)):
            cache.k[layer][:, :, :end - shift] = cache.k[layer][:, :, shift:end].clone()
            cache.v[layer][:, :, :end - shift] = cache.v[layer][:, :, shift:end].clone()
        cache.valid[:, :end - shift] = cache.valid[:, shift:end].clone()
        cache.valid[:, end - shift:] = False
        cache.length = end - shift
