"""The debugging log's probes, computed at every evaluation (labels are used here for diagnostics only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from agch.evaluation.metrics import relevance
from agch.method.model import AGCH
from agch.method.similarity import batch_similarity
from agch.config import Config

COLLAPSE_UNIQUE_FRACTION = 0.05
"""A run whose codes are less than 5% unique (in either modality) is flagged as collapsed."""


def similarity_vs_labels(zv: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, config: Config) -> dict[str, float]:
    """How well S (as the code losses see it) tracks label similarity on one probe batch."""
    s, _ = batch_similarity(zv, zt, config)
    positive = relevance(labels, labels)
    off_diag = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    sv, pv = s[off_diag], positive[off_diag].float()
    corr = torch.corrcoef(torch.stack([sv, pv]))[0, 1] if pv.std() > 0 else torch.tensor(float("nan"))
    mean = lambda x: float(x.mean()) if x.numel() else float("nan")  # noqa: E731
    return {
        "s_label_corr": float(corr),
        "s_mean_positive": mean(sv[pv > 0]),
        "s_mean_negative": mean(sv[pv == 0]),
    }


S_BATCH = 128
"""Batch size of the S statistics of a dataset: the debugging log measured them on its batches of 128."""
S_BATCHES = 40
"""Batches pooled for them: 40 x 128 x 127 ordered pairs, enough for two decimals."""


def dataset_s_statistics(data: Any, config: Config, *, batches: int = S_BATCHES, seed: int = 0) -> dict[str, float]:
    """similarity_vs_labels pooled over the off-diagonal pairs of `batches` random batches of S_BATCH training
    pairs (seed `seed`): how S under `config`'s reading tracks label similarity on a dataset.

    The debugging log's figures on real MIRFlickr-25K features, debug-log reading: corr 0.29, positive pairs -0.73,
    negative pairs -0.81 (docs/synthetic-data.md).
    """
    rng = np.random.default_rng(seed)
    train = data.split.train
    size = min(S_BATCH, len(train))
    values, positive = [], []
    for _ in range(batches):
        rows = np.sort(rng.choice(train, size=size, replace=False))
        zv, zt = (torch.from_numpy(data.rows(m, rows)) for m in ("image", "text"))
        s, _ = batch_similarity(zv, zt, config)
        off_diag = ~torch.eye(size, dtype=torch.bool)
        labels = torch.from_numpy(data.labels[rows])
        values.append(s[off_diag])
        positive.append(relevance(labels, labels)[off_diag])
    sv, pv = torch.cat(values).double(), torch.cat(positive).double()
    return {"s_label_corr": float(torch.corrcoef(torch.stack([sv, pv]))[0, 1]),
            "s_mean_positive": float(sv[pv > 0].mean()), "s_mean_negative": float(sv[pv == 0].mean())}


def code_statistics(codes_image: torch.Tensor, codes_text: torch.Tensor) -> dict[str, float]:
    """Uniqueness, bit balance and the same pair's cross-modal Hamming distance of sign codes (n, c) in ±1."""
    out: dict[str, float] = {}
    for name, codes in (("image", codes_image), ("text", codes_text)):
        out[f"unique_frac_{name}"] = len(torch.unique(codes, dim=0)) / len(codes)
        bit_means = codes.float().mean(dim=0)  # (c,), 0 when each bit is +1 half the time
        out[f"bit_balance_{name}"] = float(bit_means.abs().mean())
    out["pair_hamming"] = float((codes_image != codes_text).float().sum(dim=1).mean())
    return out


@torch.no_grad()
def model_probes(model: AGCH, zv: torch.Tensor, zt: torch.Tensor, config: Config) -> dict[str, float]:
    """Relaxed code magnitude, GCN weight spread, and sign agreement of B^h with the GCN codes on one probe batch.

    zv, zt are features as the model's forward takes them (normalised). The model runs in eval mode, so a probe
    changes nothing (BatchNorm's running statistics stay as training left them) and how often it runs cannot
    change a result.
    """
    _, adjacency = batch_similarity(zv, zt, config)
    was_training = model.training
    model.eval()
    codes = model(zv, zt, adjacency)
    model.train(was_training)
    out = {
        "code_abs_mean_image": float(codes.v.abs().mean()),
        "code_abs_mean_text": float(codes.t.abs().mean()),
        # what the alignment and balance fixes act on: relaxed codes, before sign()
        "pair_sq_diff": float((codes.v - codes.t).square().mean()),
        "raw_bit_balance": float((codes.v.mean(dim=0).abs().mean() + codes.t.mean(dim=0).abs().mean()) / 2),
    }
    weights = [p for n, p in model.named_parameters() if n.startswith("gcn_") and n.endswith("weight")]
    if weights:  # the GCN and fusion probes only for the modules present (config.no_gcn, no_fusion)
        out["gcn_weight_std"] = float(torch.stack([w.std() for w in weights]).mean())
    if codes.h is not None and codes.gv is not None:
        out["sign_agree_h_gv"] = float(((codes.h >= 0) == (codes.gv >= 0)).float().mean())
        out["sign_agree_h_gt"] = float(((codes.h >= 0) == (codes.gt >= 0)).float().mean())
    return out


def is_collapsed(stats: dict[str, float]) -> bool:
    """True when either modality's codes are less than COLLAPSE_UNIQUE_FRACTION unique."""
    return min(stats["unique_frac_image"], stats["unique_frac_text"]) < COLLAPSE_UNIQUE_FRACTION
