"""The sections of bench/gpu_suite.py: each a function ctx -> figures (a dict with a one-line `summary`).

Each runs in its own child process (bench/gpu_suite.py), so a crash, a hung compile or a poisoned
CUDA context ends that section only. Every timing is a fixed number of steps after a fixed warm-up.
`ctx.tiny` shrinks every shape so a section can be smoke-run on CPU (numbers then mean nothing).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RECIPE_1B = REPO / "recipes/lm/llama-1b-h100.yaml"
RECIPE_TINY = REPO / "recipes/lm/tiny.yaml"
TINY_MODEL = ["model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=256",
              "model.max_seq_len=256", "model.loss_chunk=256", "data.seq_len=256"]


class Skip(Exception):
    """A section that cannot run here (missing package or verb); recorded as skipped, not failed."""


@dataclass
class Ctx:
    out: Path  # scratch: synthetic data, run folders, seed checkpoints (not the results folder)
    tiny: bool = False
    synthetic: bool = False  # force synthetic data even where the real corpora are fetched
    prior: dict = field(default_factory=dict)  # results of sections already run (for reuse)

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if not self.tiny:
            raise Skip("no CUDA device (these shapes are for one H100/H200; --tiny runs small shapes on CPU)")
        return torch.device("cpu")

    def sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def median_ms(fn, sync, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ training
def _real_data_available() -> bool:
    from keel.data.assets import asset_path
    from keel.errors import MissingAssetError
    try:
        for name in ("smollm2", "shakespeare", "kjv"):
            asset_path(name)
    except MissingAssetError:
        return False
    return (asset_path("smollm2") / "tokenizer.json").is_file()


def synthetic_data(out: Path, vocab: int = 32000, rows: int = 64, seq: int = 4096, seed: int = 0) -> list[str]:
    """A word-level HF tokenizer and an SFT jsonl of random-word rows that fill seq_len: what the GPU
    machine trains on. SFT (data.format=sft) because packed pretraining text is preprocessed into a
    megatron-core indexed dataset, and megatron-core is not installed on the GPU machine."""
    root = out / "synthetic_data"
    tok_dir, jsonl = root / "tokenizer", root / f"sft{seq}.jsonl"
    if not (tok_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit
        from transformers import PreTrainedTokenizerFast
        words = {"<eos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, vocab)}}
        backend = HFTokenizer(WordLevel(words, unk_token="<unk>"))
        backend.pre_tokenizer = WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(tok_dir)
    if not jsonl.is_file():
        gen = torch.Generator().manual_seed(seed)
        with open(jsonl, "w") as f:
            for _ in range(rows):  # a 1-word prompt, then a response longer than seq_len: every label counts
                ids = torch.randint(2, vocab, (seq + 8,), generator=gen).tolist()
                f.write(json.dumps({"prompt": "w2 ", "response": " ".join(f"w{i}" for i in ids)}) + "\n")
    return ["data.format=sft", f"data.tokenizer={tok_dir}", f"data.sources=[{{path: {jsonl}, weight: 1.0}}]",
            "data.eval_fraction=0"]


def train_overrides(ctx: Ctx, run_dir: str, extra=()) -> list[str]:
    data = [] if (_real_data_available() and not ctx.synthetic) else synthetic_data(ctx.out, seq=256 if ctx.tiny else 4096)
    shape = TINY_MODEL if ctx.tiny else []
    # 'off' quoted: overrides are YAML, where a bare off is the boolean False
    return [f"run.out_dir={run_dir}", "logging.wandb=disabled", "logging.progress=false", "checkpoint.resume=never",
            "optim.warmup_steps=0", "optim.schedule=constant", "train.micro_batch=2", "train.global_batch=2",
            "parallel.compile=false", "parallel.activation_checkpoint=none", "precision.dtype=bf16",
            "precision.fp8='off'", "precision.fp8_recipe=null", *shape, *data, *extra]


def build_1b_trainer(ctx: Ctx, run_dir: str, extra=()):
    import keel
    from keel.train.engines import build_trainer
    ctx.device  # noqa: B018  (raises Skip without CUDA outside --tiny)
    cfg = keel.load_recipe(RECIPE_1B, train_overrides(ctx, run_dir, extra))
    torch.manual_seed(0)
    return build_trainer(cfg)


def keel_tokens_per_s(ctx: Ctx, extra=(), warmup: int = 2, steps: int = 5) -> dict:
    """tokens/s (median step) and MFU of keel's train_step on the 1B recipe with `extra` overrides."""
    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import bench_keel
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
        trainer = build_1b_trainer(ctx, tmp, extra)
        tokens = sum(int((mb["labels"] != -100).sum()) for mb in trainer.data.next_step())
        trainer.data.load_state_dict({"consumed_samples": 0, "seed": trainer.cfg.train.seed})
        step = statistics.median(bench_keel(trainer, steps, warmup))
        fig = {"tokens_per_step": tokens, "step_s": round(step, 4), "tokens_per_s": round(tokens / step, 1)}
        if trainer.peak_flops and trainer.flops_per_token:
            fig["mfu"] = round(trainer.flops_per_token * tokens / step / trainer.peak_flops, 4)
        if torch.cuda.is_available():
            fig["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        del trainer
    free_memory()
    return fig


def section_train_bf16(ctx: Ctx) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import bench_keel, bench_transformers
    warmup, steps = 2, 5
    with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
        trainer = build_1b_trainer(ctx, tmp)
        cfg = trainer.cfg
        batches = [trainer.data.next_step() for _ in range(warmup + steps)]
        trainer.data.load_state_dict({"consumed_samples": 0, "seed": cfg.train.seed})
        tokens = sum(int((mb["labels"] != -100).sum()) for mb in batches[0])
        hf_step = statistics.median(bench_transformers(trainer, batches, steps, warmup))
        free_memory()
        keel_step = statistics.median(bench_keel(trainer, steps, warmup))
        peak, fpt = trainer.peak_flops, trainer.flops_per_token
    fig = {"params_m": round(cfg.model.num_params() / 1e6, 1), "seq_len": cfg.data.seq_len,
           "tokens_per_step": tokens, "data": "synthetic" if "synthetic_data" in str(cfg.data.tokenizer) else "real",
           "keel_tokens_per_s": round(tokens / keel_step, 1), "hf_tokens_per_s": round(tokens / hf_step, 1),
           "keel_over_hf": round(hf_step / keel_step, 3)}
    if peak and fpt:
        fig["keel_mfu"] = round(fpt * tokens / keel_step / peak, 4)
        fig["hf_mfu"] = round(fpt * tokens / hf_step / peak, 4)
    mfu = f", MFU {fig['keel_mfu']:.1%} vs {fig['hf_mfu']:.1%}" if "keel_mfu" in fig else ""
    fig["summary"] = (f"keel {fig['keel_tokens_per_s']:,.0f} tok/s vs transformers {fig['hf_tokens_per_s']:,.0f} "
                      f"= {fig['keel_over_hf']:.2f}x{mfu}")
    return fig


def section_compile(ctx: Ctx) -> dict:
    eager = keel_tokens_per_s(ctx, ["parallel.compile=false"])
    compiled = keel_tokens_per_s(ctx, ["parallel.compile=true"])
    ratio = compiled["tokens_per_s"] / eager["tokens_per_s"]
    return {"eager": eager, "compiled": compiled, "compiled_over_eager": round(ratio, 3),
            "summary": f"eager {eager['tokens_per_s']:,.0f} tok/s, compiled {compiled['tokens_per_s']:,.0f} "
                       f"tok/s = {ratio:.2f}x"}


def section_fp8(ctx: Ctx) -> dict:
    """FP8 with compile on (torchao's FP8 is only fast compiled), vs bf16 compiled."""
    if importlib.util.find_spec("torchao") is None:
        raise Skip("torchao is not installed (carry a torchao wheel to measure precision.fp8=torchao)")
    prior = ctx.prior.get("compile", {})
    base = prior.get("compiled") if prior.get("status") == "ok" else None
    fig = {"bf16": base or keel_tokens_per_s(ctx, ["parallel.compile=true"]),
           "bf16_from": "compile section" if base else "measured here", "compile": True}
    parts = []
    for recipe in ("tensorwise", "rowwise"):
        try:
            r = keel_tokens_per_s(ctx, ["parallel.compile=true", "precision.fp8=torchao",
                                        f"precision.fp8_recipe={recipe}"])
            r["over_bf16"] = round(r["tokens_per_s"] / fig["bf16"]["tokens_per_s"], 3)
            parts.append(f"{recipe} {r['over_bf16']:.2f}x")
        except Exception as e:  # noqa: BLE001 - one recipe failing still reports the other
            r = {"status": "failed", "error": one_line(e)}
            parts.append(f"{recipe} failed")
            free_memory()
        fig[recipe] = r
    fig["summary"] = f"bf16 {fig['bf16']['tokens_per_s']:,.0f} tok/s (compiled); fp8 " + ", ".join(parts)
    return fig


def section_seed_init_fsdp(ctx: Ctx) -> dict:
    """`keel init` writes a model-only seed checkpoint; a trainer starts from it (model.init_from)."""
    py = [sys.executable, "-m", "keel"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    probe = subprocess.run([*py, "init", "--help"], check=False, capture_output=True, text=True, env=env, cwd=REPO)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1][:150]
        raise Skip(f"`keel init` is not available in this keel ({last})")
    small = [] if ctx.tiny else ["model.n_layers=4"]
    with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
        seed_dir, overrides = Path(tmp) / "seed", train_overrides(ctx, f"{tmp}/run", small)
        t0 = time.perf_counter()
        done = subprocess.run([*py, "init", str(RECIPE_1B), "--out", str(seed_dir), *overrides],
                              check=False, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"keel init exited {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        init_s = time.perf_counter() - t0
        trainer = build_1b_trainer(ctx, f"{tmp}/run", [*small, f"model.init_from={seed_dir}"])
        t0 = time.perf_counter()
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        steps_s = time.perf_counter() - t0
        from keel.train import parallel
        fsdp = parallel.uses_fsdp(trainer.dims)
        del trainer
        free_memory()
        in_place = build_1b_trainer(ctx, f"{tmp}/run-in-place", small)  # same recipe and train.seed, no init_from
        base = in_place.train_step()["loss"]
        del in_place
        free_memory()
    diff = abs(losses[0] - base)
    fig = {"init_s": round(init_s, 1), "two_steps_s": round(steps_s, 2), "losses": [round(x, 5) for x in losses],
           "first_loss_in_place": round(base, 5), "first_loss_abs_diff": diff,
           "first_loss_equal": diff <= 1e-5 * max(1.0, abs(base)), "fsdp_used": fsdp,
           "note": "one process: world size 1, so parallel.uses_fsdp is False and FSDP2 is not exercised; "
                   "run `torchrun --nproc-per-node 2+` for the sharded load"}
    fig["summary"] = (f"keel init {init_s:.1f} s; 2 steps from init_from {steps_s:.2f} s, losses {fig['losses']}; "
                      f"first loss {'equals' if fig['first_loss_equal'] else 'DIFFERS from'} the in-place init's "
                      f"(|diff| {diff:.1e}); FSDP used: {fsdp}")
    return fig


# ------------------------------------------------------------------ kernels
def section_document_attention(ctx: Ctx) -> dict:
    from keel.model import attention
    AttentionMask, dense_attention = attention.AttentionMask, attention.dense_attention
    flex_document_attention = attention.flex_document_attention  # being written beside this suite
    dev = ctx.device
    B, Hq, Hkv, D, L, docs = (1, 4, 2, 32, 512, 8) if ctx.tiny else (1, 16, 8, 128, 8192, 8)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    cuts = torch.sort(torch.randperm(L - 1, generator=torch.Generator().manual_seed(0))[:docs - 1] + 1).values
    doc_ids = torch.zeros(B, L, dtype=torch.long)
    doc_ids[:, cuts] = 1
    doc_ids = doc_ids.cumsum(-1).to(dev)
    backward = dev.type == "cuda"  # FlexAttention has no CPU backward (and refuses CPU inputs needing grad)
    q, k, v = (torch.randn(B, h, L, D, device=dev, dtype=dtype, generator=gen).requires_grad_(backward)
               for h in (Hq, Hkv, Hkv))
    grad = torch.randn(B, Hq, L, D, device=dev, dtype=dtype, generator=gen)

    def run(fn):
        out = fn(q, k, v, AttentionMask(doc_ids=doc_ids))
        grads = torch.autograd.grad(out, (q, k, v), grad) if backward else ()
        return out, grads

    (out_f, g_f), (out_d, g_d) = run(flex_document_attention), run(dense_attention)
    fig = {"shape": f"B={B} Hq={Hq} Hkv={Hkv} D={D} L={L} docs={docs} {str(dtype).removeprefix('torch.')}",
           "fwd_max_abs_diff": (out_f.float() - out_d.float()).abs().max().item(),
           "grad_max_abs_diff": max(((a.float() - b.float()).abs().max().item() for a, b in zip(g_f, g_d)),
                                    default=None)}
    what = "fwd+bwd" if backward else "fwd"
    for name, fn in (("flex", flex_document_attention), ("dense", dense_attention)):
        with torch.enable_grad() if backward else torch.no_grad():
            fig[f"{name}_ms"] = round(median_ms(lambda fn=fn: run(fn), ctx.sync, 2, 3 if ctx.tiny else 10), 3)
    fig["timed"] = what
    fig["summary"] = (f"{what}: flex {fig['flex_ms']:.2f} ms, dense {fig['dense_ms']:.2f} ms; max abs diff fwd "
                      f"{fig['fwd_max_abs_diff']:.1e}, grad " + (f"{fig['grad_max_abs_diff']:.1e}" if backward else "n/a"))
    return fig


def section_ksa_kernel(ctx: Ctx) -> dict:
    import torch.nn.functional as F

    from keel.kernels.ksa_attention import ksa_attention
    from keel.kernels.ksa_layout import expanded_length
    from keel.kernels.reference import ksa_attention_reference
    dev = ctx.device
    H, Hkv, D, N, S, W = (4, 1, 16, 8, 1, 2) if ctx.tiny else (32, 8, 128, 8, 1, 128)
    sizes = (96,) if ctx.tiny else (8192, 32768)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    reps = 2 if ctx.tiny else 5
    fig, parts = {"shape": f"B=1 H={H}/{Hkv} D={D} N={N} S={S} W={W} {str(dtype).removeprefix('torch.')}"}, []

    def fwd_bwd(fn, inputs, grad_out):
        return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)

    def kernel(a, b, c):
        return ksa_attention(a, b, c, N, S, W)

    def ref(a, b, c):
        return ksa_attention_reference(a, b, c, N, S, W)

    def flash(a, b, c):  # dense causal over the text alone, k/v expanded to all heads (fused kernels apply)
        return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    for n in sizes:
        L = expanded_length(n, N, S)
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, h, L, D, device=dev, dtype=dtype, generator=gen).requires_grad_() for h in (H, Hkv, Hkv))
        dq, dk, dv = (torch.randn(1, H, n, D, device=dev, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
        g, gd = torch.randn_like(q), torch.randn_like(dq)
        row = {"L": L, "triton_ms": round(median_ms(fwd_bwd(kernel, (q, k, v), g), ctx.sync, 1, reps), 3),
               "flash_causal_ms": round(median_ms(fwd_bwd(flash, (dq, dk, dv), gd), ctx.sync, 1, reps), 3)}
        row["speedup_over_flash"] = round(row["flash_causal_ms"] / row["triton_ms"], 3)
        if n <= 8192:  # the reference materialises an [L, L] mask: 8k only
            out_t, out_r = kernel(q, k, v), ref(q, k, v)
            g_t, g_r = torch.autograd.grad(out_t, (q, k, v), g), torch.autograd.grad(out_r, (q, k, v), g)
            row["fwd_max_abs_diff"] = (out_t.float() - out_r.float()).abs().max().item()
            row["grad_max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(g_t, g_r))
            del out_t, out_r, g_t, g_r
            row["reference_ms"] = round(median_ms(fwd_bwd(ref, (q, k, v), g), ctx.sync, 1, reps), 3)
        fig[f"n{n}"] = row
        diff = (f", abs diff vs reference fwd {row['fwd_max_abs_diff']:.1e} grad {row['grad_max_abs_diff']:.1e}"
                if "fwd_max_abs_diff" in row else "")
        label = f"{n // 1024}k" if n >= 1024 else str(n)
        parts.append(f"{label}: triton {row['triton_ms']:.1f} ms vs flash {row['flash_causal_ms']:.1f} ms "
                     f"({row['speedup_over_flash']:.2f}x){diff}")
        del q, k, v, dq, dk, dv
        free_memory()
    fig["summary"] = "; ".join(parts)
    return fig


# ------------------------------------------------------------------ decode
def section_decode(ctx: Ctx) -> dict:
    from transformers import LlamaForCausalLM

    import keel
    from keel.model.hf import keel_to_hf_config, keel_to_hf_state_dict
    from keel.model.registry import build_model
    from keel.rl.engines.base import SamplingParams
    from keel.rl.engines.native import NativeEngine
    dev = ctx.device
    # SmolLM2-135M's shape (recipes/lm/base.yaml), random weights: the GPU machine has no fetched model
    recipe, shape = (RECIPE_TINY, TINY_MODEL) if ctx.tiny else (REPO / "recipes/lm/base.yaml", [])
    mcfg = keel.load_recipe(recipe, shape).model
    n_prompts, batch, new = (8, 4, 16) if ctx.tiny else (64, 32, 128)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = build_model(mcfg, "meta").to_empty(device=dev)
    model.init_buffers()
    model.init_weights()
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, mcfg.vocab_size, (int(torch.randint(16, 65, (1,), generator=gen)),),
                             generator=gen).tolist() for _ in range(n_prompts)]
    engine = NativeEngine(model, batch)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    ctx.sync()
    t0 = time.perf_counter()
    rollouts = engine.generate(prompts, SamplingParams(max_tokens=new, temperature=1.0, seed=0))
    ctx.sync()
    native_tokens, native_s = sum(len(r.tokens) for r in rollouts), time.perf_counter() - t0

    hf_cfg = keel_to_hf_config(mcfg)
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).to(device=dev, dtype=dtype).eval()
    hf.load_state_dict(keel_to_hf_state_dict(model.state_dict(), mcfg), strict=False)
    hf.tie_weights()
    del engine, model

    def hf_batch(chunk, max_new):  # left-padded; no EOS in the config, so every row decodes max_new
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(c)) + c for c in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=dev)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        return out[:, width:].numel()
    hf_batch(prompts[:2], 4)  # warm-up
    ctx.sync()
    t0 = time.perf_counter()
    hf_tokens = sum(hf_batch(prompts[i:i + batch], new) for i in range(0, n_prompts, batch))
    ctx.sync()
    hf_s = time.perf_counter() - t0
    fig = {"model": f"{mcfg.num_params() / 1e6:.0f}M params random init, bf16", "prompts": n_prompts,
           "batch": batch, "max_tokens": new, "native_tokens_per_s": round(native_tokens / native_s, 1),
           "hf_tokens_per_s": round(hf_tokens / hf_s, 1)}
    fig["native_over_hf"] = round(fig["native_tokens_per_s"] / fig["hf_tokens_per_s"], 3)
    fig["summary"] = (f"native {fig['native_tokens_per_s']:,.0f} tok/s vs transformers generate "
                      f"{fig['hf_tokens_per_s']:,.0f} tok/s = {fig['native_over_hf']:.2f}x")
    return fig


TRAIN = ["keel:load_recipe", "keel.train.engines:build_trainer", "keel.model.hf:keel_to_hf_config",
         "transformers:LlamaForCausalLM", "tokenizers.models:WordLevel", "train_throughput:bench_keel,bench_transformers"]
# name -> (function, what it runs, modules "module:attr,attr" the dry run imports, time cap in s)
SECTIONS = {
    "train_bf16": (section_train_bf16, ("1B Llama (recipes/lm/llama-1b-h100.yaml, eager, no AC, micro 2 x 4096) "
                   "keel Trainer.train_step vs transformers LlamaForCausalLM + AdamW loop: 2 warm-up + 5 steps each"),
                   TRAIN, 110),
    "document_attention": (section_document_attention, ("flex_document_attention vs dense_attention, bf16, B=1 "
                           "Hq=16 Hkv=8 D=128 L=8192, 8 docs: max |diff| fwd and grads, ms fwd+bwd (2 warm-up + 10)"),
                           ["keel.model.attention:AttentionMask,dense_attention,flex_document_attention",
                            "torch.nn.attention.flex_attention:flex_attention"], 70),
    "fp8": (section_fp8, ("1B train step, compiled, precision.fp8=torchao tensorwise and rowwise vs bf16 "
            "(bf16 reused from the compile section when it ran): 2 warm-up + 5 steps each"),
            [*TRAIN, "keel.train.precision:convert_torchao"], 150),
    "compile": (section_compile, "1B train step parallel.compile=false vs true: 2 warm-up + 5 steps each",
                [*TRAIN, "keel.train.parallel:uses_fsdp"], 150),
    "seed_init_fsdp": (section_seed_init_fsdp, ("`keel init` (1B recipe, 4 layers) -> model.init_from -> 2 train "
                       "steps (one process: FSDP is not used at world size 1)"),
                       [*TRAIN, "keel.cli:build_parser", "keel.train.parallel:uses_fsdp"], 75),
    "ksa_kernel": (section_ksa_kernel, ("KSA Triton kernel vs its dense reference (8k: max |diff|, ms) and vs flash "
                   "SDPA causal over the text, fwd+bwd at 8k and 32k, 32/8 heads D=128 N=8 S=1 W=128"),
                   ["keel.kernels.ksa_attention:ksa_attention", "keel.kernels.reference:ksa_attention_reference",
                    "keel.kernels.ksa_layout:expanded_length"], 90),
    "decode": (section_decode, ("native engine vs transformers generate, SmolLM2-135M shape (random init, bf16), "
               "64 prompts of 16-64 tokens, batch 32, 128 new tokens each"),
               ["keel.rl.engines.native:NativeEngine", "keel.rl.engines.base:SamplingParams",
                "keel.model.registry:build_model", "transformers:LlamaForCausalLM"], 70),
}
