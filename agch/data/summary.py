"""What `agch-data info` reports about a dataset: sizes, provenance, label and tag statistics, the random-ranking mAP
of its split, and the references (S statistics, CCA+ITQ)."""

from __future__ import annotations

from typing import Any

import numpy as np

from agch.data.dataset import Dataset


REFERENCE_BITS = 16
"""Code length of the CCA+ITQ reference that `summarize` reports (the paper's shortest codes)."""


def summarize(ds: Dataset, *, exact_patterns: int = 20_000, sample_pairs: int = 1_000_000,
              references: bool = True) -> dict[str, Any]:
    """Sizes, provenance and label/tag statistics of a dataset, the random-ranking mAP of its split, and (with
    `references`) the S statistics under the debug-log and paper readings and the CCA+ITQ reference mAP.

    The shared-label rate (fraction of item pairs sharing >= 1 label) is exact when the labels have at most
    `exact_patterns` distinct rows (pairs are counted between distinct label rows), else estimated on
    `sample_pairs` pairs drawn with seed 0; `shared_label_rate["method"]` says which.
    """
    import torch  # only the statistics need torch (agch.evaluation.metrics takes tensors)

    from agch.evaluation.metrics import random_ranking_map

    labels = ds.labels
    nonzeros = np.concatenate([np.count_nonzero(block, axis=1) for _, block in ds.iter_rows("text", np.arange(ds.n))])
    query, retrieval = (torch.from_numpy(labels[getattr(ds.split, part)]) for part in ("query", "retrieval"))
    chance = random_ranking_map(query, retrieval, ks=(50, None), seed=0)
    labels_kind = "synthetic" if "labels" in ds.synthetic else "real"
    protocol = f"query vs retrieval, {ds.meta['split_protocol']} split, {ds.name}, labels {labels_kind}"
    summary = {
        "path": str(ds.path), "name": ds.name, "identity": ds.identity, "n": ds.n,
        "image": {"dim": ds.image_dim, "dtype": ds.stored_dtype("image").name},
        "text": {"dim": ds.text_dim, "dtype": ds.stored_dtype("text").name},
        "n_labels": ds.n_labels,
        "split": {"protocol": ds.meta["split_protocol"], "seed": ds.meta["split_seed"], **ds.split.sizes()},
        "synthetic": ds.synthetic, "feature_extractor": ds.meta["feature_extractor"],
        "source_files": ds.meta["source_files"], "created_by": ds.meta["created_by"],
        "labels": {"per_item_mean": float(labels.sum(axis=1).mean()),
                   "items_without_label": int((labels.sum(axis=1) == 0).sum()),
                   "per_label_count": labels.sum(axis=0).astype(int).tolist()},
        "tags": {"nonzeros_per_row_mean": float(nonzeros.mean()), "density": float(nonzeros.mean() / ds.text_dim),
                 "empty_rows": int((nonzeros == 0).sum())},
        "shared_label_rate": shared_label_rate(labels, exact_patterns=exact_patterns, sample_pairs=sample_pairs),
        "random_ranking": {"map@50": chance["map@50"], "map@all": chance["map@all"], "seed": 0,
                           "protocol": f"random ranking, {protocol}"},
    }
    if references:
        summary.update(_references(ds, protocol))
    return summary


def _references(ds: Dataset, protocol: str) -> dict[str, Any]:
    """S statistics (debug-log and paper readings) and the CCA+ITQ reference at REFERENCE_BITS, test queries."""
    from agch.method.baselines import cca_itq
    from agch.config import apply, preset
    from agch.method.diagnostics import S_BATCH, S_BATCHES, dataset_s_statistics

    s_stats = {name: dataset_s_statistics(ds, preset(name)) for name in ("debug-log", "paper")}
    metrics = cca_itq(apply(preset("paper"), {"bits": REFERENCE_BITS}), ds).metrics
    return {
        "s_statistics": {**s_stats, "protocol": f"S (after 2S - 1) vs sharing >= 1 label, pooled over {S_BATCHES} "
                                                f"batches of {S_BATCH} training pairs (seed 0)"},
        "cca_itq": {**{key: metrics[key] for key in ("map50_i2t", "map50_t2i", "mapall_i2t", "mapall_t2i")},
                    "protocol": f"CCA+ITQ fitted on the training pairs, {REFERENCE_BITS} bits, {protocol}"},
    }


def shared_label_rate(labels: np.ndarray, *, exact_patterns: int = 20_000,
                      sample_pairs: int = 1_000_000) -> dict[str, Any]:
    """Fraction of unordered pairs of distinct items whose label rows share at least one label."""
    n = labels.shape[0]
    patterns, counts = np.unique(labels.astype(bool), axis=0, return_counts=True)
    if len(patterns) <= exact_patterns:
        # Pairs between label patterns p, q count counts[p] * counts[q]; an item is not paired with itself.
        weights, ordered = counts.astype(np.float64), 0.0
        step = max(1, (4 << 20) // len(patterns))  # pattern rows per block: ~4M pattern pairs in memory at once
        for start in range(0, len(patterns), step):
            shares = (patterns[start:start + step].astype(np.float32) @ patterns.T.astype(np.float32)) > 0
            ordered += float(weights[start:start + step] @ shares @ weights)
        ordered -= float(counts[patterns.any(axis=1)].sum())
        return {"value": ordered / (n * (n - 1)), "method": f"exact over all {n * (n - 1) // 2:,} pairs"}
    rng = np.random.default_rng(0)
    first = rng.integers(0, n, sample_pairs)
    second = (first + rng.integers(1, n, sample_pairs)) % n  # uniform over the other n - 1 items
    value = float((labels[first].astype(bool) & labels[second].astype(bool)).any(axis=1).mean())
    return {"value": value, "method": f"estimate from {sample_pairs:,} random pairs (seed 0)"}
