"""The batch similarity S of AGCH (Eqs. 8–12) and the GCN adjacency built from it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agch.config import Config


def cosine_and_distance(zv: torch.Tensor, zt: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """C and D for a batch of raw features zv (m, d_v), zt (m, d_t).

    Z̃ = [γ_v Z̃^v, γ_t Z̃^t] with per-sample L2-normalised modalities (Eq. 9). C is Σ_k γ_k cos_k ('linear'),
    Z̃Z̃ᵀ = Σ_k γ_k² cos_k ('squared') or the cosine of Z̃'s rows, Σ_k γ_k² cos_k / Σ_k γ_k² ('cosine', in [−1, 1]);
    D = exp(−dist/ρ) with the Euclidean or square-root distance between rows of Z̃.
    """
    nv = F.normalize(zv.float(), dim=1)
    nt = F.normalize(zt.float(), dim=1)
    cos_v = nv @ nv.T  # (m, m)
    cos_t = nt @ nt.T  # (m, m)
    gv, gt = config.gamma_v, config.gamma_t
    # ‖Z̃_i − Z̃_j‖² = Σ_k γ_k² (2 − 2 cos_k) for unit rows; clamp guards rounding below zero
    sq_dist = (gv**2 * (2 - 2 * cos_v) + gt**2 * (2 - 2 * cos_t)).clamp_min(0)
    sq_dist.fill_diagonal_(0)  # an item's distance to itself is 0; rounding (~1e-7) would become ~1e-3 after sqrt
    dist = sq_dist.sqrt()
    if config.distance == "sqrt":
        dist = dist.sqrt()
    if config.gamma_weighting == "linear":
        c = gv * cos_v + gt * cos_t
    else:
        c = gv**2 * cos_v + gt**2 * cos_t
        if config.gamma_weighting == "cosine":
            c = c / (gv**2 + gt**2)
    d = torch.exp(-dist / config.rho)
    return c, d


def batch_similarity(zv: torch.Tensor, zt: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (S for the code losses, adjacency Ã for the GCN), both (m, m).

    S = C ⊙ D (fix `similarity` on) or sim_mix·C + (1 − sim_mix)·D (off, AGCH-3), or C alone (`no_d`, AGCH-1) or
    D alone (`no_c`, AGCH-2); then S ← 2S − 1 when `rescale_s`. The GCN sees S before the rescale unless
    `gcn_adjacency == 'after'`.
    """
    c, d = cosine_and_distance(zv, zt, config)
    if config.no_d or config.no_c:
        raw = c if config.no_d else d
    else:
        raw = c * d if config.fixes.similarity else config.sim_mix * c + (1 - config.sim_mix) * d
    s = 2 * raw - 1 if config.rescale_s else raw
    adjacency = s if config.gcn_adjacency == "after" else raw
    return s, adjacency


def normalized_adjacency(a: torch.Tensor) -> torch.Tensor:
    """D̃^-1/2 Ã D̃^-1/2 with D̃_ii = Σ_j Ã_ij (Eq. 6).

    With an adjacency that has negative row sums (possible for 'after'), D̃^-1/2 does not exist; the row sums are
    clamped to a small positive value so training proceeds, and the diagnostics show what the GCN saw.
    """
    deg = a.sum(dim=1).clamp_min(1e-6)
    inv_sqrt = deg.rsqrt()
    return inv_sqrt[:, None] * a * inv_sqrt[None, :]
