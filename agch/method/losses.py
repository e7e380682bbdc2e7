"""AGCH's objective L = αL1 + δL2 + L3 (Eqs. 13–16) plus the debugging log's extra terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agch.config import Config
from agch.method.model import Codes


def _sq(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """‖x‖²_F, summed or averaged over its entries."""
    sq = x.square()
    return sq.mean() if reduction == "mean" else sq.sum()


def agch_loss(codes: Codes, s: torch.Tensor, config: Config) -> dict[str, torch.Tensor]:
    """All loss terms of one batch; key 'total' is what is minimised.

    The five code matrices are L2-normalised per sample before any inner product (after Eq. 16), so B_i·B_j is
    in [−1, 1] and comparable to S. The fixes' terms act on the raw tanh codes, as in the log.
    """
    r = config.loss_reduction
    b = {k: F.normalize(getattr(codes, k).float(), dim=1) for k in ("v", "t", "h", "gv", "gt")}
    l1 = sum(_sq(s - b[k] @ b[k].T, r) for k in ("v", "t", "h"))
    l2 = sum(_sq(s - b[g] @ b[g].T, r) + _sq(b[g] - b[k], r) for k, g in (("v", "gv"), ("t", "gt")))
    l3_sim = sum(_sq(s - b[k] @ b["h"].T, r) for k in ("v", "t"))
    l3_code = sum(_sq(b[k] - b["h"], r) for k in ("v", "t"))
    l3 = config.beta * l3_sim + config.lam * l3_code
    terms = {"l1": l1, "l2": l2, "l3": l3}
    total = config.alpha * l1 + config.delta * l2 + l3

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
