"""AGCH's objective L = αL1 + δL2 + L3 (Eqs. 13–16) plus the debugging log's extra terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agch.config import Config
from agch.method.model import Codes


def _sq(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """‖x‖²_F, summed or averaged over its entries ('mean') or over its rows ('per-sample')."""
    sq = x.square()
    if reduction == "per-sample":
        return sq.sum(dim=1).mean()
    return sq.mean() if reduction == "mean" else sq.sum()


def agch_loss(codes: Codes, s: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    """All loss terms of one batch; key 'total' is what is minimised.

    The code matrices (five; fewer with no_fusion or no_gcn) are L2-normalised per sample before any inner product
    (after Eq. 16), so B_i·B_j is in [−1, 1] and comparable to S. The fixes' terms act on the raw tanh codes, as in
    the log.
    """
    r = config.loss_reduction
    rc = "per-sample" if r == "mean" and config.per_sample_codes else r  # the code-difference terms' reduction
    b = {k: F.normalize(getattr(codes, k).float(), dim=1) for k in ("v", "t", "h", "gv", "gt")
         if getattr(codes, k) is not None}
    l1 = sum(_sq(s - b[k] @ b[k].T, r) for k in ("v", "t", "h") if k in b)
    terms = {"l1": l1}
    total = config.alpha * l1
    if "gv" in b:  # L2 only with the GCN modules (no_gcn: AGCH-5)
        terms["l2"] = sum(_sq(s - b[g] @ b[g].T, r) + _sq(b[g] - b[k], rc) for k, g in (("v", "gv"), ("t", "gt")))
        total = total + config.delta * terms["l2"]
    # L3 pulls each encoder's codes toward the fusion code B^h; without fusion (no_fusion: AGCH-4) the two encoders'
    # codes meet directly, once
    pairs = (("v", "h"), ("t", "h")) if "h" in b else (("v", "t"),)
    l3_sim = sum(_sq(s - b[k] @ b[p].T, r) for k, p in pairs)
    l3_code = sum(_sq(b[k] - b[p], rc) for k, p in pairs)
    terms["l3"] = config.beta * l3_sim + config.lam * l3_code
    total = total + terms["l3"]

    fixes = config.fixes
    raw = {"v": codes.v.float(), "t": codes.t.float()}
    if fixes.alignment:
        terms["align"] = (raw["v"] - raw["t"]).square().mean()
        total = total + config.align_weight * terms["align"]
    if fixes.quantization:
        terms["quant"] = sum((x.abs() - 1).square().mean() for x in raw.values())
        total = total + config.quant_weight * terms["quant"]
    if fixes.balance:
        terms["balance"] = sum(x.mean(dim=0).square().sum() for x in raw.values())
        total = total + config.balance_weight * terms["balance"]
    terms["total"] = total
    return terms
