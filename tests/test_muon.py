"""Muon (MuonRec variant): NS5 against a float64 reference, the update rule against a plain
re-implementation, the AdamW groups against torch.optim.AdamW, sharded (DTensor) parameters,
FSDP2 against one process, and exact resume of the optimizer state after SIGKILL."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import keel
from conftest import TINY_RECIPE, read_metrics, run_keel, small_run_overrides
from keel.train.config import OptimConfig
from keel.model.backbone import Transformer, TransformerConfig
from keel.train.muon import Muon, muon_param_groups, newton_schulz5

A, B, C = 3.4445, -4.7750, 2.0315
SHAPES = [(64, 64), (128, 48), (48, 128)]  # square, tall, wide


# ------------------------------------------------------------------ plain references

def reference_ns5(G, steps=5, dtype=torch.float64):
    """The NS5 equations, written out: X = G/||G||_F (wide side), A = X X^T, X <- aX + (bA + cA^2)X."""
    X = G.to(dtype)
    if X.shape[0] > X.shape[1]:
        return reference_ns5(G.T, steps, dtype).T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A_ = X @ X.T
        X = A * X + (B * A_ + C * (A_ @ A_)) @ X
    return X


def reference_muon_update(W, M, G, lr, wd, beta, steps=5):
    """One MuonRec step on plain tensors: returns the new (W, M).

    M and U are formed with lerp, as Muon does: bf16 NS5 turns a one-ulp fp32 difference in U that
    flips one bf16 rounding into ~2% of O (measured), so a bit-exact comparison needs the same U.
    The lerps equal the written formulas to fp32 rounding (asserted here).
    """
    tol = dict(rtol=1e-5, atol=1e-6 * float(G.abs().max() + M.abs().max()))
    M_new = M.lerp(G, 1 - beta)
    torch.testing.assert_close(M_new, beta * M + (1 - beta) * G, **tol)
    U = G.lerp(M_new, beta)
    torch.testing.assert_close(U, (1 - beta) * G + beta * M_new, **tol)
    M = M_new
    O = reference_ns5(U, steps, torch.bfloat16).to(W.dtype)
    rows, cols = W.shape
    return W * (1 - lr * wd) - lr * max(1.0, rows / cols) ** 0.5 * O, M


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96,
                            tie_embeddings=False, max_seq_len=16, loss_chunk=64)
    model = Transformer(cfg)
    model.init_weights()
    return model


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


def hidden_names(model):
    n_layers = len(model.layers)
    return ({f"layers.{i}.attention.{w}.weight" for i in range(n_layers) for w in ("wq", "wk", "wv", "wo")}
            | {f"layers.{i}.feed_forward.{w}.weight" for i in range(n_layers) for w in ("w1", "w2", "w3")})


# ------------------------------------------------------------------ Newton-Schulz

@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz5_matches_float64_reference(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = reference_ns5(G)
    bf16 = newton_schulz5(G)
    assert bf16.dtype == G.dtype and bf16.shape == G.shape
    # bf16 rounding inside 5 amplifying iterations: measured 2.9-3.3% here, 2.7-4.5% over other seeds.
    assert ((bf16.double() - ref).norm() / ref.norm()).item() < 5e-2
    # The same iteration in fp32 shows the algorithm itself is the reference's (measured 1.5e-6).
    fp32 = newton_schulz5(G, dtype=torch.float32)
    assert ((fp32.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz5_is_near_orthogonal(shape):
    g = torch.Generator().manual_seed(1)
    n = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], n, generator=g))
    S = torch.logspace(-2, 0, n)[torch.randperm(n, generator=g)]  # condition number 100
    matrices = [U @ torch.diag(S) @ V.T]
    if shape[0] != shape[1]:
        # A square Gaussian matrix has singular values near 0, which 5 steps leave behind (in
        # float64 too); a rectangular one is well conditioned.
        matrices.append(torch.randn(*shape, generator=g))
    for G in matrices:
        O = newton_schulz5(G).double()
        sv = torch.linalg.svdvals(O)
        assert 0.65 < sv.min() and sv.max() < 1.25, (shape, sv.min(), sv.max())  # measured [0.677, 1.205]
        # O points along G's polar factor U V^T (what NS5 approximates): cosine measured >= 0.983.
        Ug, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        polar = Ug @ Vh
        assert (O * polar).sum() / (O.norm() * polar.norm()) > 0.97


def test_newton_schulz5_of_zero_is_zero():  # DCP initialises optimizer state with zero grads
    assert torch.equal(newton_schulz5(torch.zeros(8, 4)), torch.zeros(8, 4))


# ------------------------------------------------------------------ parameter split

def test_parameter_split_puts_exactly_the_hidden_matrices_in_muon_groups():
    model = tiny_model()
    cfg = OptimConfig(name="muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=1e-5)
    groups = muon_param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    assert muon == hidden_names(model) and len(muon) == 2 * 7
    adam = {names[id(p)]: g["weight_decay"] for g in groups if not g["use_muon"] for p in g["params"]}
    assert set(adam) == set(names.values()) - muon
    assert adam["output.weight"] == 0.1 and adam["tok_embeddings.weight"] == 0.0
    assert all(adam[n] == 0.0 for n in adam if "norm" in n)
    (mg,) = [g for g in groups if g["use_muon"]]
    assert (mg["lr"], mg["weight_decay"], mg["momentum"], mg["ns_steps"]) == (0.02, 1e-5, 0.95, 5)
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) for g in groups if not g["use_muon"])
    assert not groups[0]["use_muon"]  # group 0's lr (the trainer logs it) stays optim.lr


def test_build_optimizer_picks_muon_and_the_schedule_scales_both_kinds_of_group():
    from keel.train.optim import OPTIMIZERS, build_optimizer, lr_multiplier

    assert set(OPTIMIZERS) == {"adamw", "muon"}
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, warmup_steps=2, schedule="cosine")
    opt, sched = build_optimizer(tiny_model(), cfg, total_steps=10)
    assert isinstance(opt, Muon) and {g["use_muon"] for g in opt.param_groups} == {True, False}
    for step in range(4):
        mult = lr_multiplier(step, 10, cfg)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx((0.02 if g["use_muon"] else 1e-3) * mult)
        opt.step()
        sched.step()
    assert isinstance(build_optimizer(tiny_model(), OptimConfig(), 10)[0], torch.optim.AdamW)


# ------------------------------------------------------------------ the update rules

def test_muon_steps_match_a_plain_reference_and_adamw():
    """Several steps with real gradients and a changing lr: hidden matrices follow the MuonRec rule
    written out above, everything else torch.optim.AdamW with the same hyperparameters."""
    model, ref_model = tiny_model(), tiny_model()
    cfg = OptimConfig(name="muon", lr=3e-3, weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.05)
    opt = Muon(muon_param_groups(model, cfg))
    hidden = hidden_names(ref_model)
    ref_params = dict(ref_model.named_parameters())
    adam = torch.optim.AdamW([
        {"params": [ref_params["output.weight"]], "weight_decay": 0.1},
        {"params": [p for n, p in ref_params.items() if n not in hidden and n != "output.weight"],
         "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    momenta = {n: torch.zeros_like(ref_params[n]) for n in hidden}
    for step, x in enumerate(batches(5)):
        mult = [0.5, 1.0, 1.0, 0.7, 0.3][step]
        for g in opt.param_groups:
            g["lr"] = (0.02 if g["use_muon"] else 3e-3) * mult
        for g in adam.param_groups:
            g["lr"] = 3e-3 * mult
        for m in (model, ref_model):
            m(x, labels=x).backward()
        opt.step()
        adam.step()
        with torch.no_grad():
            for n in hidden:
                p = ref_params[n]
                new, momenta[n] = reference_muon_update(p, momenta[n], p.grad, 0.02 * mult, 0.05, 0.95)
                p.copy_(new)
        opt.zero_grad()
        ref_model.zero_grad()
        named = dict(model.named_parameters())
        for n, p in named.items():
            # Measured: AdamW bit-identical; Muon within 7.5e-9 (fp32 rounding of the update).
            torch.testing.assert_close(p, ref_params[n], rtol=1e-6, atol=1e-7,
                                       msg=lambda m, n=n, step=step: f"step {step}: {n}: {m}")
        for n in hidden:
            assert torch.equal(opt.state[named[n]]["momentum_buffer"], momenta[n])
        with torch.no_grad():  # resync the fp32 rounding, or bf16 NS5 amplifies it the next step
            for n, p in named.items():
                ref_params[n].copy_(p)
    moved = [(p - q).abs().max() for p, q in zip(model.parameters(), tiny_model().parameters())]
    assert min(moved) > 0  # every parameter was updated


@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_groups_equal_torch_adamw(foreach):
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (5, 7)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]
    opt = Muon(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, use_muon=False)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=foreach)
    for step in range(6):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), (step, (a - b).abs().max())  # bit-identical
    assert float(opt.state[ours[0]]["step"]) == 6


def test_muon_rejects_non_matrix_parameters():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


# ------------------------------------------------------------------ sharded (DTensor) parameters

@pytest.mark.distributed
def test_muon_on_dtensors_equals_muon_on_full_tensors():
    """4 gloo ranks. Parameters TP-sharded (colwise Shard(0), rowwise Shard(1)) on a 2x2 (dp, tp)
    mesh and then FSDP2-sharded over dp, as keel's parallelize does (FSDP2 makes the colwise ones
    _StridedShard), plus Shard(0) / Shard(1) / Replicate on a flat 4-rank mesh, uneven sizes
    included: 3 steps of Muon (and its AdamW group) leave exactly the weights and optimizer state
    of the same steps on plain full tensors, and every rank holds its own slice of O."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=4", __file__], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0 and proc.stdout.count("dtensor ok") == 4, \
        proc.stdout[-2000:] + proc.stderr[-4000:]


def _dtensor_worker():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from keel.train.muon import _local_shard

    dist.init_process_group("gloo")
    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    flat = init_device_mesh("cpu", (4,))
    torch.manual_seed(0)  # the same full tensors on every rank
    full, sharded = [], []
    for shape, tp in [((10, 6), Shard(0)), ((6, 10), Shard(1)), ((7, 5), Shard(1)), ((12, 4), Shard(0))]:
        w = torch.randn(shape)
        lin = torch.nn.Linear(shape[1], shape[0], bias=False)
        lin.weight = torch.nn.Parameter(distribute_tensor(w, mesh2d["tp"], [tp], src_data_rank=None))
        fully_shard(lin, mesh=mesh2d["dp"])
        full.append(torch.nn.Parameter(w.clone()))
        sharded.append(lin.weight)
    assert sum("_StridedShard" in str(q.placements) for q in sharded) == 2
    for shape, pl in [((9, 5), Shard(0)), ((6, 7), Shard(1)), ((6, 6), Replicate()), ((5,), Shard(0))]:
        w = torch.randn(shape)
        full.append(torch.nn.Parameter(w.clone()))
        sharded.append(torch.nn.Parameter(distribute_tensor(w, flat, [pl], src_data_rank=None)))
    for p, q in zip(full, sharded):
        assert torch.equal(_local_shard(p.detach(), q), q.to_local())
    groups = lambda ps: [{"params": ps[:-1], "weight_decay": 0.1},
                         {"params": ps[-1:], "use_muon": False, "weight_decay": 0.1}]
    opt_full, opt_sharded = Muon(groups(full), lr=0.05), Muon(groups(sharded), lr=0.05)
    for step in range(3):
        for p, q in zip(full, sharded):
            p.grad = torch.randn(p.shape)
            q.grad = distribute_tensor(p.grad, q.device_mesh, q.placements, src_data_rank=None)
        opt_full.step()
        opt_sharded.step()
    for p, q in zip(full, sharded):
        assert torch.equal(q.full_tensor(), p.detach()), (q.placements, (q.full_tensor() - p).abs().max())
        for key, value in opt_full.state[p].items():
            state = opt_sharded.state[q][key]
            assert isinstance(state, DTensor) == (key != "step"), key
            assert torch.equal(state.full_tensor() if isinstance(state, DTensor) else state, value), key
    print(f"rank {dist.get_rank()}: dtensor ok", flush=True)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_muon_splits_newton_schulz_work_between_ranks():
    """2 gloo ranks, 7 sharded matrices on a flat mesh and on 2-D (HSDP-like) meshes: each step every
    matrix is orthogonalised exactly once, by one rank (4 on one rank, 3 on the other), and the
    weights still equal the same steps on plain full tensors, bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", __file__, "ns5"], capture_output=True, text=True, env=env,
                          timeout=180, check=False)
    assert proc.returncode == 0 and proc.stdout.count("ns5 split ok") == 2, \
        proc.stdout[-2000:] + proc.stderr[-4000:]
    print(proc.stdout)


def _ns5_split_worker():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from keel.train import muon

    dist.init_process_group("gloo")
    flat = init_device_mesh("cpu", (2,))
    hsdp = init_device_mesh("cpu", (1, 2), mesh_dim_names=("rep", "shard"))
    rows = init_device_mesh("cpu", (2, 1), mesh_dim_names=("a", "b"))
    torch.manual_seed(0)
    full, sharded = [], []
    for shape, mesh, pl in [((10, 6), flat, [Shard(0)]), ((6, 9), flat, [Shard(1)]), ((5, 5), flat, [Replicate()]),
                            ((7, 4), hsdp, [Replicate(), Shard(0)]), ((4, 8), hsdp, [Replicate(), Shard(1)]),
                            ((9, 3), rows, [Shard(0), Replicate()]), ((3, 11), rows, [Shard(1), Replicate()])]:
        w = torch.randn(shape)
        full.append(torch.nn.Parameter(w.clone()))
        sharded.append(torch.nn.Parameter(distribute_tensor(w, mesh, pl, src_data_rank=None)))
    opt_full, opt_sharded = Muon(full, lr=0.05, weight_decay=0.1), Muon(sharded, lr=0.05, weight_decay=0.1)
    calls = [0]
    ns5 = muon.newton_schulz5

    def counting_ns5(*args, **kwargs):
        calls[0] += 1
        return ns5(*args, **kwargs)

    per_step = []
    for step in range(3):
        for p, q in zip(full, sharded):
            p.grad = torch.randn(p.shape)
            q.grad = distribute_tensor(p.grad, q.device_mesh, q.placements, src_data_rank=None)
        opt_full.step()
        calls[0] = 0
        muon.newton_schulz5 = counting_ns5
        try:
            opt_sharded.step()
        finally:
            muon.newton_schulz5 = ns5
        counts = [None, None]
        dist.all_gather_object(counts, calls[0])
        assert sorted(counts) == [3, 4], counts  # 7 matrices, each orthogonalised once
        per_step.append(calls[0])
    for p, q in zip(full, sharded):
        assert torch.equal(q.full_tensor(), p.detach()), (q.placements, (q.full_tensor() - p).abs().max())
        assert torch.equal(opt_sharded.state[q]["momentum_buffer"].full_tensor(),
                           opt_full.state[p]["momentum_buffer"])
    print(f"rank {dist.get_rank()}: NS5 calls per step {per_step} of 7; ns5 split ok", flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------ the trainer

MUON = {"optim.name": "muon", "optim.muon_lr": 0.02, "optim.muon_weight_decay": 0.1, "checkpoint.every": 3}


def final_weights(run_dir):
    return {k: v.clone() for k, v in keel.load(run_dir).state_dict().items()}


@pytest.fixture(scope="module")
def single_run(module_tmp):
    run_dir = module_tmp / "single"
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(run_dir, **MUON)])
    return run_dir


@pytest.mark.distributed
def test_fsdp2_muon_matches_single_process(single_run, tmp_path):
    """keel's trainer with optim.name=muon on 2 FSDP2 ranks tracks one process.

    Not to fp32 rounding, as AdamW does: FSDP2's reduce-scatter sums gradients in another order,
    and bf16 NS5 magnifies the differing last bits when they flip a bf16 rounding of U (directions
    of tiny singular values are scaled up to ~480x in 5 steps). With identical gradients the
    sharded update is bit-identical (test_muon_on_dtensors_equals_muon_on_full_tensors).
    """
    run_keel(["train", str(TINY_RECIPE), *small_run_overrides(tmp_path, **MUON, **{"parallel.dp_shard": 2})],
             nproc=2)
    single, fsdp = read_metrics(single_run), read_metrics(tmp_path)
    assert [r["step"] for r in fsdp] == list(range(1, 7))
    for a, b in zip(single, fsdp):
        assert a["data_fingerprint"] == b["data_fingerprint"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)  # measured: <= 8.2e-6
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=2e-3)  # measured: <= 4.1e-4
    # The same start: the same initial weights give the same first loss up to the order in which
    # ranks' shares are summed (1 ulp apart on an AMD EPYC, bit-equal on the machine that wrote this);
    # different initial weights would be orders of magnitude further apart.
    assert fsdp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-6, abs=0)
    assert single[-1]["loss"] < single[0]["loss"]
    ref, got = final_weights(single_run), final_weights(tmp_path)
    for name in ref:  # measured: <= 0.042 (wo, whose gradient is nearly low-rank), others <= 0.009
        assert ((got[name] - ref[name]).norm() / ref[name].norm()).item() < 0.1, name


def test_muon_state_resumes_bit_identically_after_sigkill(single_run, tmp_path):
    args = ["train", str(TINY_RECIPE), *small_run_overrides(tmp_path, **MUON)]
    crashed = run_keel(args, env={"KEEL_FAULT_KILL_AT_STEP": "5"}, check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3"]
    proc = run_keel(args)
    assert "resumed from" in proc.stdout
    straight = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(single_run)]
    resumed = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path)]
    assert resumed == straight  # exact float equality: momentum buffers and Adam moments restored
    a, b = final_weights(single_run), final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":  # one rank of a multi-process test above
    _ns5_split_worker() if sys.argv[1:] == ["ns5"] else _dtensor_worker()
