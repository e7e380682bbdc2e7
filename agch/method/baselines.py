"""Reference methods scored in the same harness as AGCH: CCA + ITQ (linear, shallow) and random ranking.

`cca_itq(config, data)` returns a `TrainResult` whose metrics carry the trainer's names and protocol (map50_i2t,
mapall_t2i, ..., on the same split and queries as an AGCH run with that config), so a search or an ablation can
show it beside its trials. Only config.bits, config.seed (the ITQ start), config.topk and config.eval_split matter.

CCA: ridge CCA fitted on the training pairs (the ridge chosen without labels, by held-out canonical correlation);
k = min(bits, image dim, text dim) canonical pairs. ITQ (Gong & Lazebnik): an orthogonal rotation of the pooled
image and text projections minimising the quantisation loss; when bits > k (Wiki's 10-d text at 16+ bits) the
rotation is a k x bits matrix with orthonormal rows (the same Procrustes step), so every bit is a direction in the
k-d canonical space.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import TYPE_CHECKING

import numpy as np

from agch.config import Config, apply, preset
from agch.data.dataset import Dataset
from agch.data.splits import evaluation_split

# scipy, torch and the metrics are imported where they are used: a search reads its cached references without them

if TYPE_CHECKING:
    from agch.method.train import TrainResult

METHODS = ("agch", "cca-itq", "plain-s")
"""What agch-train can run: the AGCH trainer, the CCA + ITQ reference, or the plain-S reference (plain_s_config)."""
REFERENCE_FIELDS = ("bits", "seed", "topk", "eval_split", "eval_every", "save_encoders")
"""The only settings of a run's config that a reference method takes: code length, seed and what is scored."""
RIDGES = (1e-3, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0)
"""CCA ridge candidates, times the mean feature variance."""
ITQ_ITERATIONS = 50


def _moments(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Covariances x'x, y'y and cross-covariance x'y of centred x (n, dx), y (n, dy), divided by n."""
    n = len(x)
    return x.T @ x / n, y.T @ y / n, x.T @ y / n


def _with_ridge(cov: np.ndarray, ridge: float) -> np.ndarray:
    """A copy of `cov` plus `ridge` times its mean variance on the diagonal."""
    out = cov.copy()
    out[np.diag_indices_from(out)] += ridge * np.trace(cov) / len(cov)
    return out


def cca(x: np.ndarray, y: np.ndarray, dim: int, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge CCA of centred x (n, dx), y (n, dy): projections (dx, dim), (dy, dim) and the canonical correlations."""
    return _cca(*_moments(x, y), dim, ridge)


def _cca(cxx: np.ndarray, cyy: np.ndarray, cxy: np.ndarray, dim: int,
         ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CCA from the moments. Whitening by Cholesky factors (C = L L') gives the same canonical directions as C^-1/2
    at a fraction of the cost of an eigendecomposition of a 4096 x 4096 covariance; the top singular pairs of the
    whitened cross-covariance M come from the eigenvectors of M'M on its smaller side. dim <= min(dx, dy)."""
    if cxy.shape[1] > cxy.shape[0]:  # the eigenproblem on the smaller side
        wy, wx, corr = _cca(cyy, cxx, cxy.T, dim, ridge)
        return wx, wy, corr
    import scipy.linalg

    lx = scipy.linalg.cholesky(_with_ridge(cxx, ridge), lower=True)
    ly = scipy.linalg.cholesky(_with_ridge(cyy, ridge), lower=True)
    whitened = scipy.linalg.solve_triangular(ly, scipy.linalg.solve_triangular(lx, cxy, lower=True).T,
                                             lower=True).T  # Lx^-1 Cxy Ly^-T, (dx, dy)
    squared, v = scipy.linalg.eigh(whitened.T @ whitened,
                                   subset_by_index=[whitened.shape[1] - dim, whitened.shape[1] - 1])
    squared, v = squared[::-1], v[:, ::-1]  # descending
    corr = np.sqrt(np.maximum(squared, 0.0))
    u = whitened @ v / np.maximum(corr, 1e-12)
    wx = scipy.linalg.solve_triangular(lx.T, u, lower=False)
    wy = scipy.linalg.solve_triangular(ly.T, v, lower=False)
    return wx, wy, corr


def choose_ridge(x: np.ndarray, y: np.ndarray, dim: int, candidates: tuple[float, ...] = RIDGES) -> float:
    """The ridge with the highest mean held-out canonical correlation (fit on the first 80% of the pairs,
    correlate the projections of the rest): label-free, as an unsupervised baseline must be."""
    cut = 4 * len(x) // 5
    mean_x, mean_y = x[:cut].mean(axis=0), y[:cut].mean(axis=0)
    moments = _moments(x[:cut] - mean_x, y[:cut] - mean_y)  # once for every candidate
    held_out = {}
    for ridge in candidates:
        wx, wy, _ = _cca(*moments, dim, ridge)
        px, py = (x[cut:] - mean_x) @ wx, (y[cut:] - mean_y) @ wy
        held_out[ridge] = float(np.mean([np.corrcoef(px[:, i], py[:, i])[0, 1] for i in range(dim)]))
    return max(held_out, key=held_out.get)


def itq_rotation(v: np.ndarray, bits: int, iterations: int, seed: int) -> np.ndarray:
    """ITQ: the (k, bits) matrix R with orthonormal rows minimising ||sign(vR) - vR||, for v (n, k), k <= bits."""
    k = v.shape[1]
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((bits, bits)))[0][:k]  # (k, bits), orthonormal rows
    for _ in range(iterations):
        codes = np.where(v @ rotation >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ codes, full_matrices=False)  # Procrustes: (k, k) @ (k, bits)
        rotation = u @ wt
    return rotation


def cca_itq(config: Config, data: Dataset) -> TrainResult:
    """Fit CCA + ITQ on the training pairs of config.eval_split's split; score it like an AGCH run.

    Example:
        >>> with open_dataset(path) as data:  # doctest: +SKIP
        ...     print(cca_itq(preset("paper"), data).metrics["mapall_i2t"])
    """
    import torch

    from agch.evaluation.protocol import protocol_of
    from agch.evaluation.scoring import codes_npz, score_codes
    from agch.method.train import TrainResult

    started = time.perf_counter()
    split = evaluation_split(data.split, config.eval_split)
    x, y = (data.rows(m, split.train).astype(np.float64) for m in ("image", "text"))
    k = min(config.bits, x.shape[1], y.shape[1])
    ridge = choose_ridge(x, y, k)
    mean = {"image": x.mean(axis=0), "text": y.mean(axis=0)}
    wx, wy, corr = cca(x - mean["image"], y - mean["text"], k, ridge)
    w = {"image": wx, "text": wy}
    rotation = itq_rotation(np.vstack([(x - mean["image"]) @ wx, (y - mean["text"]) @ wy]), config.bits,
                            ITQ_ITERATIONS, config.seed)
    codes = {}
    for stem, idx in (("query", split.query), ("retrieval", split.retrieval)):
        for m in ("image", "text"):
            projected = (data.rows(m, idx).astype(np.float64) - mean[m]) @ w[m] @ rotation
            codes[f"{stem}_{m}"] = torch.from_numpy(np.where(projected >= 0, 1, -1).astype(np.int8))
    labels = {stem: torch.from_numpy(data.labels[idx]) for stem, idx in
              (("query", split.query), ("retrieval", split.retrieval))}
    metrics, curves = score_codes(codes, labels, config.topk, data.meta.get("split_protocol"))
    metrics.update(cca_ridge=ridge, cca_top_corr=float(corr[0]), cca_dims=float(k), collapsed=0.0)
    protocol = dict(protocol_of(config, data), method="cca-itq")
    return TrainResult(status="finished", metrics=metrics, protocol=protocol, epochs_run=0,
                       seconds=time.perf_counter() - started, device="cpu", codes=codes_npz(codes, data, split),
                       curves=curves)


def plain_s_config(config: Config) -> Config:
    """The plain-S reference at config's REFERENCE_FIELDS: the `plain-s` preset (agch.config.PRESETS), AGCH's own S
    driving two one-hidden-layer MLP encoders without GCN or fusion. It trains with agch.method.train.train, so its
    results
    carry the trainer's metric names, protocol and logging.

    Example:
        >>> reference = plain_s_config(apply(preset("real-features"), {"bits": 128}))
        >>> reference.bits, reference.no_gcn, reference.batch_size
        (128, True, 128)
    """
    return apply(preset("plain-s"), {key: getattr(config, key) for key in REFERENCE_FIELDS}, where="plain-s")


REFERENCE_VERSION = 1
"""Part of the reference cache's key: bumped whenever cca_itq or random_reference compute something else."""


def reference_scores(config: Config, data: Dataset) -> dict[str, float]:
    """Random ranking and CCA+ITQ on config.eval_split's queries at config.bits: what a search or an ablation shows
    beside its trials. Keys: random_map{k}, random_mapall, cca_itq_map{k}_i2t, ..., cca_itq_mapall_mean.

    Cached under <AGCH home>/references/ by dataset identity and the settings that matter (CCA on 4096-d
    features takes ~30 s on 2 cores; a resumed search or a second ablation on the same data need not pay it again).
    """
    from agch.paths import home

    k = config.topk
    key = json.dumps([REFERENCE_VERSION, data.identity, config.bits, k, config.eval_split, config.seed, RIDGES,
                      ITQ_ITERATIONS])
    path = home() / "references" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    keys = [f"{stat}_{d}" for stat in (f"map{k}", "mapall") for d in ("i2t", "t2i", "mean")]
    cca_metrics = cca_itq(config, data).metrics
    scores = {**random_reference(config, data), **{f"cca_itq_{key}": cca_metrics[key] for key in keys}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores))
    return scores


def describe_references(scores: dict[str, float], k: int) -> str:
    """'random mAP@50 0.169 / mAP@ALL 0.110; CCA+ITQ mAP@50 I->T 0.25 T->I 0.44, mAP@ALL I->T 0.23 T->I 0.22'."""
    s = scores
    return (f"random ranking mAP@{k} {s[f'random_map{k}']:.4f} / mAP@ALL {s['random_mapall']:.4f}; CCA+ITQ "
            f"mAP@{k} I->T {s[f'cca_itq_map{k}_i2t']:.4f} T->I {s[f'cca_itq_map{k}_t2i']:.4f}, mAP@ALL I->T "
            f"{s['cca_itq_mapall_i2t']:.4f} T->I {s['cca_itq_mapall_t2i']:.4f}")


def random_reference(config: Config, data: Dataset) -> dict[str, float]:
    """Random-ranking mAP@k and mAP@ALL of config.eval_split's queries (seed 0): what chance scores there."""
    import torch

    from agch.evaluation.metrics import random_ranking_map

    split = evaluation_split(data.split, config.eval_split)
    chance = random_ranking_map(torch.from_numpy(data.labels[split.query]),
                                torch.from_numpy(data.labels[split.retrieval]), ks=(config.topk, None), seed=0)
    return {f"random_map{config.topk}": chance[f"map@{config.topk}"], "random_mapall": chance["map@all"]}
