"""The KSA Triton kernel (keel/kernels/ksa_attention.py) against the dense-mask SDPA reference.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the kernel module is imported, so
the kernel runs in a fresh subprocess with the variable set (this pytest process may have imported
triton already). One subprocess checks every config and reports max errors as JSON; the tests below
assert on them. Shapes are tiny because the interpreter runs every tile op in numpy.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

# (chunk N, summaries S, window W, expanded length L, query heads, kv heads, head_dim, batch, dtype,
#  options: "docs" = per-batch document start positions (packed documents), "skip_old" = SCA baseline).
# Under the interpreter the tiles are 16 x 16, so every L below spans several query and key blocks,
# and W is small enough that the gathered old-summary path runs (except "window_covers_all").
CONFIGS = {
    "n8_s1_w2_L90": (8, 1, 2, 90, 2, 2, 16, 1, "float32"),            # the released N, S; L % 16 != 0
    "n4_s2_w1_gqa_batch2": (4, 2, 1, 96, 4, 2, 16, 2, "float32"),     # S > 1, GQA 2:1, batch strides
    "n5_s1_w3_gqa_d24_L77": (5, 1, 3, 77, 2, 1, 24, 1, "float32"),    # partial last chunk, D not 2^k
    "n3_s1_w0": (3, 1, 0, 64, 2, 1, 16, 1, "float32"),                # W = 0: own chunk + all old summaries
    "window_covers_all": (8, 1, 20, 50, 1, 1, 16, 1, "float32"),      # no chunk older than the window
    "shorter_than_a_tile": (2, 1, 1, 13, 1, 1, 16, 1, "float32"),
    "n4_s1_w2_fp16": (4, 1, 2, 80, 2, 1, 16, 1, "float16"),           # half inputs, fp32 accumulation
    "packed_documents": (4, 1, 1, 88, 2, 1, 16, 2, "float32", {"docs": [[30, 61], [45]]}),
    "sliding_chunk_no_old_summaries": (4, 1, 1, 80, 2, 2, 16, 1, "float32", {"skip_old": True}),
}
# fp32: the kernel and SDPA differ only in summation order; measured max errors ~1e-6 on O(1) values.
# fp16: inputs rounded to fp16 and the probabilities cast to fp16 before P@V, vs an fp32 reference.
TOLERANCE = {"float32": 2e-5, "float16": 2e-2}

KERNEL_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from keel.errors import KeelError
    from keel.kernels.ksa_attention import ksa_attention
    from keel.kernels.reference import ksa_attention_reference

    results = {}
    for name, (N, S, W, L, H, Hkv, D, B, dtype, *options) in json.loads(sys.argv[1]).items():
        options = options[0] if options else {}
        extra = {"skip_old_summary": options.get("skip_old", False)}
        if "docs" in options:  # document id = how many document starts lie at or before the position
            starts = [torch.tensor(s) for s in options["docs"]]
            extra["doc_ids"] = torch.stack([(torch.arange(L)[:, None] >= s[None, :]).sum(1) for s in starts])
        gen = torch.Generator().manual_seed(len(results))
        q, k, v = (torch.randn(B, h, L, D, generator=gen) for h in (H, Hkv, Hkv))
        grad_out = torch.randn(B, H, L, D, generator=gen)
        low = [t.to(getattr(torch, dtype)).requires_grad_() for t in (q, k, v)]
        out = ksa_attention(*low, N, S, W, **extra)
        out.backward(grad_out.to(out.dtype))
        ref_in = [t.detach().float().requires_grad_() for t in low]  # the same rounded inputs, in fp32
        ref = ksa_attention_reference(*ref_in, N, S, W, **extra)
        ref.backward(grad_out)
        err = {"out": (out.float() - ref).abs().max().item()}
        for label, mine, theirs in zip(("dq", "dk", "dv"), low, ref_in):
            assert mine.grad.shape == theirs.grad.shape
            err[label] = (mine.grad.float() - theirs.grad).abs().max().item()
        err["magnitude"] = min(ref.abs().max().item(), *(t.grad.abs().max().item() for t in ref_in))
        results[name] = err
    try:
        ksa_attention(*(torch.randn(1, 1, 16, 16, dtype=torch.bfloat16) for _ in range(3)), 4, 1, 1)
        results["bf16_refusal"] = None
    except KeelError as exc:
        results["bf16_refusal"] = str(exc)
    print(json.dumps(results))
""")


def _python(script: str, *args: str, interpret: bool, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **(extra_env or {}))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def kernel_errors() -> dict:
    proc = _python(KERNEL_SCRIPT, json.dumps(CONFIGS), interpret=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_dense_reference(kernel_errors, name):
    err, tol = kernel_errors[name], TOLERANCE[CONFIGS[name][8]]
    assert err["magnitude"] > 0.1  # the comparison is of real, non-vanishing values
    for label in ("out", "dq", "dk", "dv"):
        assert err[label] <= tol, f"{name}: {label} max error {err[label]:.3g} > {tol}"


def test_bf16_under_interpreter_is_refused_not_wrong(kernel_errors):
    # Triton 3.9's interpreter returns garbage from tl.dot on bf16; the kernel must say so instead.
    assert kernel_errors["bf16_refusal"] is not None and "bf16" in kernel_errors["bf16_refusal"]


def test_cpu_without_interpreter_raises_one_line_error():
    script = textwrap.dedent("""
        import torch
        from keel.errors import KeelError
        from keel.kernels.ksa_attention import ksa_attention
        try:
            ksa_attention(*(torch.randn(1, 1, 16, 16) for _ in range(3)), 4, 1, 1)
        except KeelError as exc:
            print(str(exc))
    """)
    proc = _python(script, interpret=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    message = proc.stdout.strip()
    assert "\n" not in message and "CUDA GPU" in message and "TRITON_INTERPRET=1" in message


SM90_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, torch, triton
    from triton.backends.compiler import GPUTarget
    from keel.kernels import ksa_attention as kernels

    pointers = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "DOCS"}
    shared = {}
    for fn, backward, extra in ((kernels._ksa_fwd_kernel, False, {}), (kernels._ksa_dq_kernel, True, {}),
                                (kernels._ksa_dkdv_kernel, True, {"OLD_SUMMARIES": False}),
                                (kernels._ksa_dkdv_kernel, True, {"OLD_SUMMARIES": True})):
        launch = kernels._launch_config(torch.device("cuda"), backward)
        consts = dict(N=8, S=1, D=128, BLOCK_D=128, PRECISION="tf32", HAS_DOCS=False, SKIP_OLD=0,
                      BLOCK_M=launch["BLOCK_M"], BLOCK_N=launch["BLOCK_N"], **extra)
        sig = {a: "constexpr" if a in consts else "*fp32" if a in ("LSE", "DELTA") else "*bf16" if a in pointers
               else "fp32" if a.startswith("scale") else "i32" for a in fn.arg_names}
        src = triton.compiler.ASTSource(fn=fn, signature=sig,
                                        constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]})
        assert "cubin" in compiled.asm
        shared[fn.__name__ + str(extra)] = compiled.metadata.shared
    print(json.dumps(shared))
""")


def test_kernels_compile_for_h100_with_gpu_launch_config(tmp_path):
    # The interpreter runs numpy and forgives what the GPU compiler refuses; build the real sm90 cubins
    # (Triton ships ptxas, no GPU needed) at the 4B shape's head_dim 128 in bf16, in a cold cache.
    spec = importlib.util.find_spec("triton")  # located, not imported: this process stays triton-free
    if spec is None or not (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build has no NVIDIA backend (ptxas)")
    env_cache = {"TRITON_CACHE_DIR": str(tmp_path)}
    proc = _python(SM90_COMPILE_SCRIPT, interpret=False, extra_env=env_cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 4 and all(0 < b <= 227 * 1024 for b in shared.values()), shared  # H100: 227 KB/block
