"""How agch.evaluation.metrics scores a hashing retrieval: Hamming distances, rankings and the sums every metric is
read from.

Two engines give the same figures (tests/evaluation/test_metrics.py runs both against the oracle): on CPU the compiled
counting kernel (agch.evaluation.kernel), without sorting; elsewhere (and on CPU without numba) torch, which sorts each
chunk of queries once by unique integer keys and reads every metric off that order. Both run chunked over queries,
so a NUS-WIDE-size database fits in a fixed memory budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agch.errors import UserError

# On CPU, chunks of at most this many pairs keep a chunk's distances (uint8) and the kernel's per-query arrays in
# the core's caches. Devices use max_chunk_elems as given.
CPU_CHUNK_ELEMS = 2**17


def packed_relevance(query: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """(Q, N) bool relevance of labels packed by _pack_labels."""
    if query.dim() == 1:
        return query[:, None] == db[None, :]
    shared = (query[:, None, 0] & db[None, :, 0]) != 0
    for word in range(1, query.shape[1]):
        shared |= (query[:, None, word] & db[None, :, word]) != 0
    return shared


def pack_codes(codes: torch.Tensor) -> np.ndarray:
    """+-1 codes (n, c) as (n, ceil(c/64)) uint64 words, +1 = set bit, zero padding (equal in every code)."""
    packed = np.packbits((codes > 0).numpy(), axis=1)  # (n, ceil(c/8)) uint8
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
    return np.ascontiguousarray(packed).view(np.uint64)


class HammingDistances:
    """Exact Hamming distances from rows of query codes to a database, as integers of a chosen dtype.

    On CPU with numpy >= 2 both sides are bit-packed once and compared by XOR and popcount, 5x faster than the
    float matmul. Otherwise (c - q.r) / 2 by a float32 matmul, exact: sums of +-1 are exact integers below 2**24.
    """

    def __init__(self, query_codes: torch.Tensor, db_codes: torch.Tensor, bits: int, dtype: torch.dtype,
                 popcount: bool | None = None):
        if popcount is None:
            popcount = db_codes.device.type == "cpu" and hasattr(np, "bitwise_count")
        self.popcount, self.bits, self.dtype = popcount, bits, dtype
        pack = pack_codes if popcount else torch.Tensor.float  # (n, words) uint64 or (n, c) float32
        self.query, self.db = pack(query_codes), pack(db_codes)

    def __call__(self, rows: slice) -> torch.Tensor:
        """(rows, N) distances of the query rows; a fresh tensor the caller may change."""
        if not self.popcount:
            half_bits = torch.tensor(self.bits / 2, device=self.db.device)
            return torch.addmm(half_bits, self.query[rows], self.db.T, alpha=-0.5).to(self.dtype)
        query = self.query[rows]
        dist = torch.empty(query.shape[0], self.db.shape[0], dtype=self.dtype).numpy()
        xor = np.bitwise_xor(query[:, None, 0], self.db[None, :, 0])
        np.bitwise_count(xor, out=dist, casting="unsafe")  # counts <= 64: written straight into the wider dtype
        for word in range(1, query.shape[1]):
            dist += np.bitwise_count(np.bitwise_xor(query[:, None, word], self.db[None, :, word], out=xor))
        return torch.from_numpy(dist)


def sort_key(dist: torch.Tensor) -> torch.Tensor:
    """A tensor that orders exactly like dist: +0.0 for -0.0 in floats, bool as uint8."""
    if dist.is_floating_point():
        if bool(torch.isnan(dist).any()):
            raise UserError("distances contain NaN; a ranking needs every distance to be comparable")
        # + 0.0 turns -0.0 into +0.0: a radix sort (CUDA) would put -0.0 first and break the index tie rule;
        # half precision is widened (exactly) because numpy has no bfloat16
        return (dist.float() if dist.element_size() < 4 else dist) + 0.0
    return dist.to(torch.uint8) if dist.dtype == torch.bool else dist


def stable_order(key: torch.Tensor) -> torch.Tensor:
    """(Q, N) int64 ranking of each row of any comparable key: ascending key, ties by column index."""
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.numpy(), axis=1, kind="stable"))
    return torch.sort(key, dim=1, stable=True).indices


class Ranker:
    """Ranks rows of small non-negative integer distances by one torch sort of unique integer keys.

    The key of item j is (distance << shift) | (j << 1) | relevant: unique per row, so any sort orders it by
    distance with ties by database index (the protocol's rule) and carries each item's relevance along in the low
    bit; no index permutation is built or gathered.
    """

    def __init__(self, n_db: int, max_dist: int, device: torch.device):
        self.shift = (2 * n_db - 1).bit_length()
        self.dtype = torch.int32 if (max_dist + 1) << self.shift <= 2**31 else torch.int64
        self.index_bits = torch.arange(n_db, device=device, dtype=self.dtype) << 1  # (N,)
        # hit counts in float32 are exact integers below 2**24
        self.count_dtype = torch.float32 if n_db < 2**24 else torch.float64

    def __call__(self, dist: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
        """(Qc, N) sorted keys of dist (of self.dtype) and (Qc, N) bool relevance."""
        return torch.sort((dist << self.shift) | self.index_bits | relevant, dim=1).values

    def relevance(self, key: torch.Tensor) -> torch.Tensor:
        """(Qc, N) relevance 0/1 in ranking order, as count_dtype."""
        return (key & 1).to(self.count_dtype)

    def distances(self, key: torch.Tensor) -> torch.Tensor:
        """(Qc, N) distances in ranking order."""
        return key >> self.shift


def query_chunks(n_queries: int, n_db: int, max_chunk_elems: int, device: torch.device) -> Iterator[slice]:
    """Consecutive query slices of at most max_chunk_elems (query, item) pairs (fewer on CPU, see CPU_CHUNK_ELEMS)."""
    if device.type == "cpu":
        max_chunk_elems = min(max_chunk_elems, CPU_CHUNK_ELEMS)
    step = max(1, max_chunk_elems // max(n_db, 1))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


@dataclass
class Totals:
    """Sums over the queries seen so far; the means are taken once at the end."""

    ap: dict[int | None, float]
    precision: dict[int, float]
    pr_precision: torch.Tensor | None = None
    pr_recall: torch.Tensor | None = None


def cut_off(k: int | None, n_ranked: int) -> int:
    """Number of ranked items a cut-off looks at: k, at most the database; None is the whole database."""
    return n_ranked if k is None else min(k, n_ranked)


@functools.lru_cache(maxsize=4)
def inverse_positions(n: int, device: torch.device) -> torch.Tensor:
    """1/i for ranking positions i = 1..n, float64 (made once per database size, not once per chunk)."""
    return 1.0 / torch.arange(1, n + 1, device=device, dtype=torch.float64)


def add_ranked(
    ranked: torch.Tensor,
    n_ranked: int,
    ks: Sequence[int | None],
    precision_ks: Sequence[int],
    totals: Totals,
    full_prefix: bool = False,
) -> torch.Tensor:
    """Add one chunk's AP@k and precision@k to totals; return its hit counts (Qc, prefix).

    ranked: (Qc, >= n_ranked) relevance 0/1 in ranking order, float32 (exact counts below 2**24 items) or float64.
    Only the first n_ranked positions of each ranking count (with exclude_self the query itself is put last).
    The hit counts cover all n_ranked positions when full_prefix, else the longest cut-off.
    """
    cuts = [cut_off(k, n_ranked) for k in list(ks) + list(precision_ks)]
    prefix = n_ranked if full_prefix else max(cuts)
    ranked = ranked[:, :prefix]
    hits = ranked.cumsum(1)  # (Qc, prefix) relevant among the first i
    # hits at relevant positions, 0 elsewhere: times 1/i these are the precision@i terms of AP
    hits_at_relevant = (hits * ranked).double()  # (Qc, prefix)
    inverse_position = inverse_positions(n_ranked, ranked.device)[:prefix]
    for k in ks:
        cut = cut_off(k, n_ranked)
        hits_k = hits[:, cut - 1]
        precision_sum = hits_at_relevant[:, :cut] @ inverse_position[:cut]  # (Qc,)
        totals.ap[k] += float((precision_sum / hits_k.clamp_min(1)).sum())  # no hits: 0 / 1, AP 0 as specified
    for k in precision_ks:
        cut = cut_off(k, n_ranked)
        totals.precision[k] += float(hits[:, cut - 1].sum(dtype=torch.float64)) / cut
    return hits


def add_pr_curve(sorted_dist: torch.Tensor, hits: torch.Tensor, bits: int, totals: Totals) -> None:
    """Add one chunk's precision and recall within each Hamming radius 0..bits, read off the same ranking.

    sorted_dist: (Qc, N) each row's distances in ranking order; hits: its hit counts from add_ranked.
    """
    radii = torch.arange(bits + 1, device=hits.device, dtype=sorted_dist.dtype).expand(hits.shape[0], -1)
    retrieved = torch.searchsorted(sorted_dist, radii.contiguous(), right=True)  # (Qc, bits+1) items within r
    # relevant items within r: hits[:, retrieved - 1], and none when nothing is retrieved
    hits_within = hits.gather(1, (retrieved - 1).clamp_min(0)).double() * (retrieved > 0)
    totals.pr_precision += (hits_within / retrieved.clamp_min(1)).sum(0)  # nothing retrieved: 0 / 1, precision 0
    totals.pr_recall += (hits_within / hits[:, -1:].clamp_min(1)).sum(0)  # nothing relevant: recall 0


@functools.cache
def cpu_kernel() -> Callable | None:
    """agch.evaluation.kernel.score_block, or None where numba cannot be imported (the torch path then runs on CPU)."""
    try:
        from agch.evaluation.kernel import score_block
    except ImportError:
        return None
    return score_block


def score(query_codes: torch.Tensor, db_codes: torch.Tensor, query_words: torch.Tensor, db_words: torch.Tensor,
          exclude_self: bool, ks: Sequence[int | None], precision_ks: Sequence[int], pr_curve: bool,
          max_chunk_elems: int, totals: Totals) -> None:
    """Add every query's AP@k, hits within each precision cut-off and PR sums to totals: on CPU by the compiled
    kernel (score_on_cpu), elsewhere or without numba by torch (score_with_torch). Labels are packed words."""
    engine = score_on_cpu if query_codes.device.type == "cpu" and cpu_kernel() is not None else score_with_torch
    engine(query_codes, db_codes, query_words, db_words, exclude_self, ks, precision_ks, pr_curve, max_chunk_elems,
           totals)


def score_on_cpu(query_codes: torch.Tensor, db_codes: torch.Tensor, query_words: torch.Tensor,
                 db_words: torch.Tensor, exclude_self: bool, ks: Sequence[int | None], precision_ks: Sequence[int],
                 pr_curve: bool, max_chunk_elems: int, totals: Totals) -> None:
    """Add every query's metrics to totals by agch.evaluation.kernel: one counting pass per query, no sort."""
    bits, n_db = query_codes.shape[1], db_codes.shape[0]
    n_ranked = n_db - 1 if exclude_self else n_db
    distances = HammingDistances(query_codes, db_codes, bits, torch.uint8 if bits < 255 else torch.int32)
    by_class = query_words.dim() == 1
    query_labels, db_labels = (w.numpy().reshape(len(w), -1) for w in (query_words, db_words))
    cut_of = {k: cut_off(k, n_ranked) for k in [*ks, *precision_ks]}
    cuts = np.array(sorted(set(cut_of.values())), dtype=np.int64)
    ap_sum, hits_sum = np.zeros(len(cuts)), np.zeros(len(cuts))
    pr_precision_sum, pr_recall_sum = np.zeros(bits + 1), np.zeros(bits + 1)
    inverse_position = inverse_positions(n_db, query_codes.device).numpy()
    for rows in query_chunks(query_codes.shape[0], n_db, max_chunk_elems, query_codes.device):
        cpu_kernel()(distances(rows).numpy(), query_labels[rows], db_labels, by_class, rows.start, exclude_self,
                     cuts, n_ranked, inverse_position, ap_sum, hits_sum, pr_precision_sum, pr_recall_sum)
    column = {cut: i for i, cut in enumerate(cuts.tolist())}
    for k in ks:
        totals.ap[k] = float(ap_sum[column[cut_of[k]]])
    for k in precision_ks:
        totals.precision[k] = float(hits_sum[column[cut_of[k]]]) / cut_of[k]
    if pr_curve:
        totals.pr_precision, totals.pr_recall = torch.from_numpy(pr_precision_sum), torch.from_numpy(pr_recall_sum)


def score_with_torch(query_codes: torch.Tensor, db_codes: torch.Tensor, query_words: torch.Tensor,
                     db_words: torch.Tensor, exclude_self: bool, ks: Sequence[int | None],
                     precision_ks: Sequence[int], pr_curve: bool, max_chunk_elems: int, totals: Totals) -> None:
    """Add every query's metrics to totals by torch on the codes' device: one sort of unique keys per chunk."""
    bits, n_db, device = query_codes.shape[1], db_codes.shape[0], query_codes.device
    n_ranked = n_db - 1 if exclude_self else n_db
    # distances bits + 1 mark a query's own item under exclude_self
    rank = Ranker(n_db, bits + 1, device)
    distances = HammingDistances(query_codes, db_codes, bits, rank.dtype)
    for rows in query_chunks(query_codes.shape[0], n_db, max_chunk_elems, device):
        dist = distances(rows)  # (Qc, N)
        relevant = packed_relevance(query_words[rows], db_words)  # (Qc, N)
        if exclude_self:
            own = torch.arange(rows.start, rows.stop, device=device)[:, None]
            dist.scatter_(1, own, bits + 1)  # ranked after every other item, outside every radius
            relevant.scatter_(1, own, False)
        key = rank(dist, relevant)  # the one ranking every metric of this chunk is read from
        hits = add_ranked(rank.relevance(key), n_ranked, ks, precision_ks, totals, full_prefix=pr_curve)
        if pr_curve:
            add_pr_curve(rank.distances(key), hits, bits, totals)
