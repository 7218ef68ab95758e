"""Semantic IDs by RQ-VAE, plain or CoBa (S²GR's codebook): item embeddings -> a unique code path.

RQ-VAE (recsys.sid.method rq_vae): an MLP encoder maps an item embedding x to a latent z; `levels`
codebooks quantise z residually (level l picks the code c_l nearest to r_l, r_1 = z,
r_(l+1) = r_l - c_l); an MLP decoder rebuilds x from sum_l c_l, the gradient reaching the encoder
through the straight-through estimator. Loss = MSE(decoder, x) + sum_l (||sg(r_l) - c_l||^2 +
commitment * ||r_l - sg(c_l)||^2), every term a mean over elements. Codebooks start from k-means
(faiss) on the residuals of the untrained encoder's outputs, so no code starts dead.

CoBa (method coba) adds, in keel's reading (the paper states these in words, not formulas):
  co-occurrence smoothing  A[i, j] = times items i and j are at most `cooc_window` positions apart
                           in one user's train history (symmetric, no self loops); the encoder
                           reads H_align = sum_k beta_k H^(k), the APPNP propagation
                           H^(k) = (1 - alpha) Â H^(k-1) + alpha X over Â = D^-1/2 A D^-1/2, with
                           beta_k proportional to alpha (1 - alpha)^k (k = 0..appnp_hops);
                           the decoder then rebuilds H_align, not the raw embedding;
  uniformity               per level, over distinct code pairs, the mean of
                           relu(margin * D̄ - ||c_i - c_j||)^2, D̄ the level's mean pairwise code
                           distance (detached): codes closer than a fraction of the typical spacing
                           push apart; weight `uniformity_weight`;
  load balancing           an EMA (decay 0.99, uniform start) of each code's share of training
                           assignments per level; at training time each code's squared distance is
                           scaled by clip(1 + strength * (share / mean share - 1), 1 - clip, 1 + clip),
                           so rarely used codes look nearer and crowded ones farther.
Keel's own choices beyond that: residuals are chained with detached codes (a code learns only from
its own level's term), batches are drawn with replacement, an isolated item (degree 0) keeps a zero
row in Â, so its H_align is its own embedding scaled by beta_0 + alpha (1 - beta_0).
The final table assigns every item by plain nearest code (no balancing), then de-duplicates like
RQ-KMeans (semantic_ids.assemble_table). Everything runs on CPU in float32, seeded.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from keel.data.rec_config import RqVaeConfig
from keel.errors import ConfigError, DataError
from keel.model.semantic_ids import SidTable, kmeans, assemble_table, check_inputs

USAGE_DECAY = 0.99  # EMA decay of the per-code assignment shares (CoBa load balancing)


def cooccurrence_graph(histories, n_items: int, window: int) -> torch.Tensor:
    """Sparse symmetric [n_items + 1, n_items + 1] float32 counts: A[i, j] = number of position
    pairs (p, q), 0 < q - p <= window, in one user's history holding items i != j. Row/col 0
    (padding) has no edges. One vectorised pass per offset, not per user."""
    indptr, items = (np.asarray(a, dtype=np.int64) for a in histories)
    if indptr.ndim != 1 or indptr.size < 1 or indptr[-1] != items.size:
        raise DataError(f"histories: expected CSR (indptr, items) with indptr[-1] == len(items), "
                        f"got indptr {indptr.shape} ending {indptr[-1] if indptr.size else None}, {items.size} items")
    if items.size and (items.min() < 0 or items.max() > n_items):
        raise DataError(f"histories: item indices must lie in 0..{n_items}, got {items.min()}..{items.max()}")
    user = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    rows, cols = [], []
    for offset in range(1, window + 1):
        a, b = items[:-offset], items[offset:]
        keep = (user[:-offset] == user[offset:]) & (a != b) & (a > 0) & (b > 0)
        rows += [a[keep], b[keep]]  # both directions: A is symmetric
        cols += [b[keep], a[keep]]
    index = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
    size = n_items + 1
    # coalesce sums the duplicate (i, j) entries: the counts
    return torch.sparse_coo_tensor(index, torch.ones(index.shape[1]), (size, size), check_invariants=True).coalesce()


def appnp_smooth(x, graph: torch.Tensor, alpha: float, hops: int) -> np.ndarray:
    """H_align = sum_{k=0..hops} beta_k H^(k), H^(0) = X, H^(k) = (1 - alpha) Â H^(k-1) + alpha X,
    Â = D^-1/2 A D^-1/2 (a degree-0 item keeps a zero row), beta_k = alpha (1 - alpha)^k normalised
    to sum to 1. Row 0 (padding) stays zero. float32 [n_items + 1, d]."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    graph = graph.coalesce()
    index, values = graph.indices(), graph.values().float()
    degree = torch.zeros(x.shape[0]).index_add_(0, index[0], values)
    inv_sqrt = torch.where(degree > 0, degree.clamp_min(1e-30).rsqrt(), torch.zeros(()))
    norm = torch.sparse_coo_tensor(index, values * inv_sqrt[index[0]] * inv_sqrt[index[1]], graph.shape,
                                   check_invariants=True)
    beta = alpha * (1 - alpha) ** np.arange(hops + 1, dtype=np.float64)
    beta = beta / beta.sum()
    h = x
    out = float(beta[0]) * x
    for k in range(1, hops + 1):
        h = (1 - alpha) * torch.sparse.mm(norm, h) + alpha * x
        out = out + float(beta[k]) * h
    out[0] = 0
    return out.numpy()


def _linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear with torch's default U(-1/sqrt(n_in), 1/sqrt(n_in)) init, but drawn from `generator`
    so the model does not depend on (or disturb) the global RNG."""
    layer = nn.Linear(n_in, n_out)
    bound = n_in ** -0.5
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
    return layer


class RqVae(nn.Module):
    """Encoder d -> hidden -> latent, `levels` residual codebooks [codebook, latent], decoder back."""

    def __init__(self, dim: int, hidden: int, latent: int, levels: int, codebook: int, generator: torch.Generator):
        super().__init__()
        self.encoder = nn.Sequential(_linear(dim, hidden, generator), nn.ReLU(), _linear(hidden, latent, generator))
        self.decoder = nn.Sequential(_linear(latent, hidden, generator), nn.ReLU(), _linear(hidden, dim, generator))
        self.codebooks = nn.ParameterList([nn.Parameter(torch.zeros(codebook, latent)) for _ in range(levels)])

    def quantise(self, z: torch.Tensor, scales: Optional[torch.Tensor] = None):
        """Residual nearest-code quantisation of z [n, latent]; `scales` [levels, codebook]
        multiplies each code's squared distance (CoBa balancing; None = plain nearest).
        Returns codes [n, levels], the chosen code vectors and the residuals r_l per level, and
        the residual left after the last level."""
        residual, codes, chosen, residuals = z, [], [], []
        for level, book in enumerate(self.codebooks):
            with torch.no_grad():
                r = residual.detach()
                dist = ((r * r).sum(1, keepdim=True) - 2 * r @ book.T + (book * book).sum(1)).clamp_min(0)
                code = (dist if scales is None else dist * scales[level]).argmin(1)
            vector = book[code]
            codes.append(code)
            chosen.append(vector)
            residuals.append(residual)
            residual = residual - vector.detach()  # detached chain: c_l learns only from level l's term
        return torch.stack(codes, 1), chosen, residuals, residual

    def forward(self, x: torch.Tensor, commitment: float, scales: Optional[torch.Tensor] = None):
        """(reconstruction, codebook + commitment loss, codes) of a batch x [n, d]."""
        z = self.encoder(x)
        codes, chosen, residuals, _ = self.quantise(z, scales)
        quantised = torch.stack(chosen).sum(0)
        z_q = z + (quantised - z).detach()  # straight-through: the decoder's gradient reaches z
        vq = sum(F.mse_loss(c, r.detach()) + commitment * F.mse_loss(r, c.detach())
                 for r, c in zip(residuals, chosen))
        return self.decoder(z_q), vq, codes


def uniformity_loss(codebooks, margin: float) -> torch.Tensor:
    """CoBa uniformity (keel's form): per level, mean over code pairs i < j of
    relu(margin * mean pair distance (detached) - ||c_i - c_j||)^2, summed over levels. O(K^2)."""
    total = torch.zeros(())
    for book in codebooks:
        if book.shape[0] < 2:
            continue
        dist = torch.pdist(book)
        total = total + F.relu(margin * dist.mean().detach() - dist).pow(2).mean()
    return total


def _init_codebooks(model: RqVae, x: torch.Tensor, iters: int, seed: int) -> None:
    """k-means (seed + level) on each level's residuals of the untrained encoder's outputs."""
    with torch.no_grad():
        residual = np.ascontiguousarray(model.encoder(x).numpy())
        for level, book in enumerate(model.codebooks):
            km = kmeans(residual, book.shape[0], iters, seed + level)
            centroids = km.centroids.astype(np.float32)
            book.copy_(torch.from_numpy(centroids))
            residual = np.ascontiguousarray(residual - centroids[km.index.search(residual, 1)[1][:, 0]])


def rq_vae(embeddings: np.ndarray, levels: int, codebook: int, vae: RqVaeConfig, *, coba: bool,
           histories=None, iters: int = 20, seed: int = 0, dedup: bool = True,
           item_ids: Optional[Sequence[str]] = None, key: str = "recsys.sid") -> SidTable:
    """RQ-VAE (coba=False) or CoBa RQ-VAE (coba=True; needs the train `histories` CSR) semantic
    IDs for embeddings [n_items + 1, d] (row 0 = padding). Report: RQ-KMeans's keys (recon_error
    being the latent's quantisation residual relative to the latent's norm) plus `method`,
    `final_loss` (the last step's training loss) and `decoder_recon_error` =
    sum ||decoder(sum_l c_l) - x||^2 / sum ||x||^2 over all items (x = H_align under coba)."""
    x = check_inputs(embeddings, levels, codebook, key)
    vae.validate(f"{key}.vae")
    n = x.shape[0]
    if coba:
        if histories is None:
            raise ConfigError(f"{key}.method: coba smooths item embeddings over the users' train histories, "
                              f"but none were given; use method rq_vae or pass histories")
        graph = cooccurrence_graph(histories, n, vae.cooc_window)
        x = np.ascontiguousarray(appnp_smooth(np.asarray(embeddings, np.float32), graph,
                                              vae.appnp_alpha, vae.appnp_hops)[1:])
    data = torch.from_numpy(x)
    generator = torch.Generator().manual_seed(seed)
    model = RqVae(x.shape[1], vae.hidden, vae.latent_dim, levels, codebook, generator)
    _init_codebooks(model, data, iters, seed)
    opt = torch.optim.Adam(model.parameters(), lr=vae.lr)
    usage = torch.full((levels, codebook), 1.0 / codebook)  # EMA share of assignments per code
    balance = coba and vae.balance_strength > 0
    for _ in range(vae.steps):
        batch = data[torch.randint(n, (vae.batch,), generator=generator)]
        scales = None
        if balance:  # share * codebook = share / mean share
            scales = (1 + vae.balance_strength * (usage * codebook - 1)).clamp(
                max(1 - vae.balance_clip, 0.0), 1 + vae.balance_clip)
        recon, vq, codes = model(batch, vae.commitment, scales)
        loss = F.mse_loss(recon, batch) + vq
        if coba and vae.uniformity_weight > 0:
            loss = loss + vae.uniformity_weight * uniformity_loss(model.codebooks, vae.uniformity_margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if balance:
            share = torch.stack([torch.bincount(codes[:, lv], minlength=codebook) for lv in range(levels)])
            usage = USAGE_DECAY * usage + (1 - USAGE_DECAY) * share.float() / vae.batch
    # the table: every item by plain nearest code, no balancing
    with torch.no_grad():
        z = model.encoder(data)
        codes, chosen, _, residual = model.quantise(z)
        decoded = model.decoder(torch.stack(chosen).sum(0))
        decoder_err = float(((decoded - data) ** 2).sum() / (data * data).sum().clamp_min(1e-30))
    config = {"method": "coba" if coba else "rq_vae", "levels": levels, "codebook": codebook, "iters": iters,
              "seed": seed, "dedup": dedup, "dim": int(x.shape[1]), "coba": coba, "vae": asdict(vae)}
    table = assemble_table(z.numpy(), residual.numpy(), list(codes.numpy().T),
                           [book.detach().numpy().copy() for book in model.codebooks], codebook,
                           dedup=dedup, item_ids=item_ids, config=config, key=key)
    table.report.update({"method": config["method"], "final_loss": float(loss.detach()),
                         "decoder_recon_error": decoder_err})
    return table
