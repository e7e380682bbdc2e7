"""Per-query numpy reference for the retrieval metrics of docs/protocol.md.

Deliberately simple: one query at a time, a stable argsort, the definitions written out. The vectorised
`agch.evaluation.metrics` is tested against this, and bench/bench_map.py times it as the baseline.
"""

from __future__ import annotations

import numpy as np


def oracle_relevance(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """(Q, N) bool: share at least one label (multi-hot rows) or the same class (1-D class indices)."""
    if query_labels.ndim == 1:
        return query_labels[:, None] == db_labels[None, :]
    return (query_labels > 0).astype(np.int64) @ (db_labels > 0).astype(np.int64).T > 0


def oracle_hamming(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """(Q, N) int64 Hamming distances between +-1 codes: the number of differing bits."""
    return (query_codes[:, None, :] != db_codes[None, :, :]).sum(axis=2)


def oracle_average_precision(ranked_relevant: np.ndarray, k: int | None) -> float:
    """AP@k of one query's relevance flags in ranked order: (1/hits) * sum of precision@i at relevant i <= k."""
    top = ranked_relevant if k is None else ranked_relevant[:k]
    hits_at = np.cumsum(top)  # hits among the first i items, i = 1..len(top)
    precision_at = hits_at / np.arange(1, len(top) + 1)
    hits = hits_at[-1] if len(top) else 0
    return float(precision_at[top].sum() / hits) if hits else 0.0


def oracle_ranked_relevance(dist: np.ndarray, relevant: np.ndarray, exclude_self: bool = False) -> list[np.ndarray]:
    """Per query: relevance flags in ranking order (ascending distance, ties by database index)."""
    rows = []
    for i in range(dist.shape[0]):
        keep = np.arange(dist.shape[1]) != i if exclude_self else np.ones(dist.shape[1], dtype=bool)
        row_dist, row_rel = dist[i][keep], relevant[i][keep]
        rows.append(row_rel[np.argsort(row_dist, kind="stable")])
    return rows


def oracle_map(dist: np.ndarray, relevant: np.ndarray, k: int | None, exclude_self: bool = False) -> float:
    """mAP@k (k=None: ALL) over all queries; a query without hits counts as AP 0."""
    rows = oracle_ranked_relevance(dist, relevant, exclude_self)
    return float(np.mean([oracle_average_precision(row, k) for row in rows]))


def oracle_precision_at_k(dist: np.ndarray, relevant: np.ndarray, k: int, exclude_self: bool = False) -> float:
    """Mean over queries of (relevant among the top min(k, N)) / min(k, N)."""
    rows = oracle_ranked_relevance(dist, relevant, exclude_self)
    return float(np.mean([row[:k].sum() / len(row[:k]) for row in rows]))


def oracle_pr_at_radius(
    dist: np.ndarray, relevant: np.ndarray, bits: int, exclude_self: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of the items within Hamming radius r, r = 0..bits, averaged over queries.

    Empty retrieved set: precision 0. Query without any relevant item: recall 0.
    """
    precision = np.zeros(bits + 1)
    recall = np.zeros(bits + 1)
    for i in range(dist.shape[0]):
        keep = np.arange(dist.shape[1]) != i if exclude_self else np.ones(dist.shape[1], dtype=bool)
        row_dist, row_rel = dist[i][keep], relevant[i][keep]
        total_relevant = row_rel.sum()
        for radius in range(bits + 1):
            within = row_dist <= radius
            retrieved, hits = within.sum(), (within & row_rel).sum()
            precision[radius] += hits / retrieved if retrieved else 0.0
            recall[radius] += hits / total_relevant if total_relevant else 0.0
    return precision / dist.shape[0], recall / dist.shape[0]
