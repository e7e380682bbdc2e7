"""Retrieval metrics of docs/protocol.md: mAP@k, mAP@ALL, precision@k and precision-recall over Hamming radii.

Relevance: a query and a database item share at least one label. Ranking: ascending distance, ties broken by
database index (a stable sort), so every figure is reproducible. AP@k = (1/hits) * sum of precision@i over the
relevant positions i <= k, with hits the relevant items in the top k; a query without hits has AP 0 and still
counts in the mean. mAP@ALL is mAP@k with k = database size.

Hashing metrics (evaluate_hashing) run on the device of the codes, chunked over queries so that a NUS-WIDE-size
database (~190k items) fits in a fixed memory budget. On CPU a compiled kernel (agch.rank_kernel) reads every
metric off a counting pass per query, without sorting; elsewhere each chunk is sorted once by torch and every
metric is read off that order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agch.errors import UserError

DEFAULT_MAX_CHUNK_ELEMS = 2**25
# Peak memory per (query, database item) pair of a chunk, in bytes: int64 sort key, relevance, float32 ranked
# relevance and hit counts, float64 precision terms (not all alive at once).
BYTES_PER_CHUNK_ELEM = 30
# On CPU, chunks of at most this many pairs keep a chunk's distances (uint8) and the kernel's per-query arrays in
# the core's caches. Devices use max_chunk_elems as given.
CPU_CHUNK_ELEMS = 2**17


@dataclass
class RetrievalMetrics:
    """Metrics of one retrieval direction (e.g. image queries against a text database).

    Attributes:
        map: mAP per cut-off, keys "map@50"-style and "map@all".
        precision_at_k: mean fraction of relevant items among the top min(k, database size).
        pr_precision: index r = 0..bits: mean over queries of the precision of the items within Hamming radius r;
            a query with no item within r contributes precision 0. None when the PR curve was not asked for.
        pr_recall: index r: mean recall within radius r; a query with no relevant item contributes recall 0.
        n_queries: number of queries.
        n_db: number of database items each query is ranked against (one less than the database with exclude_self).
        bits: code length.
    """

    map: dict[str, float]
    precision_at_k: dict[int, float]
    pr_precision: np.ndarray | None
    pr_recall: np.ndarray | None
    n_queries: int
    n_db: int
    bits: int


# Multi-hot labels are packed 31 to an int32 word (the sign bit stays unused, so packing is plain integer
# arithmetic): relevance is then one AND per word instead of a float matmul, 2.5x faster on CPU.
_LABELS_PER_WORD = 31


def _pack_labels(labels: torch.Tensor) -> torch.Tensor:
    """Multi-hot (n, L) labels as (n, ceil(L/31)) int32 words; 1-D class indices unchanged."""
    if labels.dim() == 1:
        return labels
    present = labels > 0  # (n, L)
    n_words = max(1, -(-present.shape[1] // _LABELS_PER_WORD))
    padded = torch.zeros(present.shape[0], n_words * _LABELS_PER_WORD, dtype=torch.int32, device=labels.device)
    padded[:, : present.shape[1]] = present
    powers = 2 ** torch.arange(_LABELS_PER_WORD, dtype=torch.int32, device=labels.device)
    return (padded.view(-1, n_words, _LABELS_PER_WORD) * powers).sum(-1, dtype=torch.int32)  # (n, words)


def _pack_label_pair(query_labels: torch.Tensor, db_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated query and database labels, packed by _pack_labels."""
    both_2d = query_labels.dim() == db_labels.dim() == 2
    if not (both_2d or query_labels.dim() == db_labels.dim() == 1):
        raise UserError(
            "labels must both be 2-D multi-hot (items x labels) or both 1-D class indices; "
            f"got query {tuple(query_labels.shape)} and database {tuple(db_labels.shape)}"
        )
    if both_2d and query_labels.shape[1] != db_labels.shape[1]:
        raise UserError(f"query labels have {query_labels.shape[1]} labels, database labels {db_labels.shape[1]}")
    return _pack_labels(query_labels), _pack_labels(db_labels)


def _packed_relevance(query: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """(Q, N) bool relevance of labels packed by _pack_labels."""
    if query.dim() == 1:
        return query[:, None] == db[None, :]
    shared = (query[:, None, 0] & db[None, :, 0]) != 0
    for word in range(1, query.shape[1]):
        shared |= (query[:, None, word] & db[None, :, word]) != 0
    return shared


@torch.no_grad()
def relevance(query_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """(Q, N) bool: query i and database item j share at least one label.

    Labels are multi-hot rows (a value > 0 means the label is present; one-hot rows give single-label relevance)
    or 1-D integer class indices (relevant = same class).

    Example:
        >>> relevance(torch.tensor([[1, 0, 1]]), torch.tensor([[0, 0, 1], [0, 1, 0]]))
        tensor([[ True, False]])
    """
    return _packed_relevance(*_pack_label_pair(query_labels, db_labels))


def _check_codes(query_codes: torch.Tensor, db_codes: torch.Tensor) -> int:
    """Code length; UserError unless both are 2-D +-1 matrices of the same width."""
    for name, codes in (("query", query_codes), ("database", db_codes)):
        if codes.dim() != 2:
            raise UserError(f"{name} codes must be 2-D (items x bits), got shape {tuple(codes.shape)}")
        if codes.numel() and not bool((codes.abs() == 1).all()):
            raise UserError(f"{name} codes must be +-1 (apply sign and map 0 to +1 or -1 first)")
    if query_codes.shape[1] != db_codes.shape[1]:
        raise UserError(f"query codes have {query_codes.shape[1]} bits, database codes {db_codes.shape[1]}")
    if query_codes.device != db_codes.device:
        raise UserError(f"query codes are on {query_codes.device}, database codes on {db_codes.device}")
    return query_codes.shape[1]


def _pack_codes(codes: torch.Tensor) -> np.ndarray:
    """+-1 codes (n, c) as (n, ceil(c/64)) uint64 words, +1 = set bit, zero padding (equal in every code)."""
    packed = np.packbits((codes > 0).numpy(), axis=1)  # (n, ceil(c/8)) uint8
    packed = np.pad(packed, ((0, 0), (0, -packed.shape[1] % 8)))
    return np.ascontiguousarray(packed).view(np.uint64)


class _HammingDistances:
    """Exact Hamming distances from rows of query codes to a database, as integers of a chosen dtype.

    On CPU with numpy >= 2 both sides are bit-packed once and compared by XOR and popcount, 5x faster than the
    float matmul. Otherwise (c - q.r) / 2 by a float32 matmul, exact: sums of +-1 are exact integers below 2**24.
    """

    def __init__(self, query_codes: torch.Tensor, db_codes: torch.Tensor, bits: int, dtype: torch.dtype,
                 popcount: bool | None = None):
        if popcount is None:
            popcount = db_codes.device.type == "cpu" and hasattr(np, "bitwise_count")
        self.popcount, self.bits, self.dtype = popcount, bits, dtype
        pack = _pack_codes if popcount else torch.Tensor.float  # (n, words) uint64 or (n, c) float32
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


@torch.no_grad()
def hamming_distance(query_codes: torch.Tensor, db_codes: torch.Tensor) -> torch.Tensor:
    """(Q, N) int32 Hamming distances (c - q.r) / 2 between +-1 codes of c bits.

    Example:
        >>> hamming_distance(torch.tensor([[1, -1, 1]]), torch.tensor([[1, 1, 1], [-1, 1, -1]]))
        tensor([[1, 3]], dtype=torch.int32)
    """
    bits = _check_codes(query_codes, db_codes)
    return _HammingDistances(query_codes, db_codes, bits, torch.int32)(slice(None))


def _sort_key(dist: torch.Tensor) -> torch.Tensor:
    """A tensor that orders exactly like dist: +0.0 for -0.0 in floats, bool as uint8."""
    if dist.is_floating_point():
        if bool(torch.isnan(dist).any()):
            raise UserError("distances contain NaN; a ranking needs every distance to be comparable")
        # + 0.0 turns -0.0 into +0.0: a radix sort (CUDA) would put -0.0 first and break the index tie rule;
        # half precision is widened (exactly) because numpy has no bfloat16
        return (dist.float() if dist.element_size() < 4 else dist) + 0.0
    return dist.to(torch.uint8) if dist.dtype == torch.bool else dist


def _stable_order(key: torch.Tensor) -> torch.Tensor:
    """(Q, N) int64 ranking of each row of any comparable key: ascending key, ties by column index."""
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.numpy(), axis=1, kind="stable"))
    return torch.sort(key, dim=1, stable=True).indices


class _Ranker:
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


def _query_chunks(n_queries: int, n_db: int, max_chunk_elems: int, device: torch.device) -> Iterator[slice]:
    """Consecutive query slices of at most max_chunk_elems (query, item) pairs (fewer on CPU, see CPU_CHUNK_ELEMS)."""
    if device.type == "cpu":
        max_chunk_elems = min(max_chunk_elems, CPU_CHUNK_ELEMS)
    step = max(1, max_chunk_elems // max(n_db, 1))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


@dataclass
class _Totals:
    """Sums over the queries seen so far; the means are taken once at the end."""

    ap: dict[int | None, float]
    precision: dict[int, float]
    pr_precision: torch.Tensor | None = None
    pr_recall: torch.Tensor | None = None


def _cut(k: int | None, n_ranked: int) -> int:
    """Number of ranked items a cut-off looks at: k, at most the database; None is the whole database."""
    return n_ranked if k is None else min(k, n_ranked)


@functools.lru_cache(maxsize=4)
def _inverse_positions(n: int, device: torch.device) -> torch.Tensor:
    """1/i for ranking positions i = 1..n, float64 (made once per database size, not once per chunk)."""
    return 1.0 / torch.arange(1, n + 1, device=device, dtype=torch.float64)


def _add_ranked(
    ranked: torch.Tensor,
    n_ranked: int,
    ks: Sequence[int | None],
    precision_ks: Sequence[int],
    totals: _Totals,
    full_prefix: bool = False,
) -> torch.Tensor:
    """Add one chunk's AP@k and precision@k to totals; return its hit counts (Qc, prefix).

    ranked: (Qc, >= n_ranked) relevance 0/1 in ranking order, float32 (exact counts below 2**24 items) or float64.
    Only the first n_ranked positions of each ranking count (with exclude_self the query itself is put last).
    The hit counts cover all n_ranked positions when full_prefix, else the longest cut-off.
    """
    cuts = [_cut(k, n_ranked) for k in list(ks) + list(precision_ks)]
    prefix = n_ranked if full_prefix else max(cuts)
    ranked = ranked[:, :prefix]
    hits = ranked.cumsum(1)  # (Qc, prefix) relevant among the first i
    # hits at relevant positions, 0 elsewhere: times 1/i these are the precision@i terms of AP
    hits_at_relevant = (hits * ranked).double()  # (Qc, prefix)
    inverse_position = _inverse_positions(n_ranked, ranked.device)[:prefix]
    for k in ks:
        cut = _cut(k, n_ranked)
        hits_k = hits[:, cut - 1]
        precision_sum = hits_at_relevant[:, :cut] @ inverse_position[:cut]  # (Qc,)
        totals.ap[k] += float((precision_sum / hits_k.clamp_min(1)).sum())  # no hits: 0 / 1, AP 0 as specified
    for k in precision_ks:
        cut = _cut(k, n_ranked)
        totals.precision[k] += float(hits[:, cut - 1].sum(dtype=torch.float64)) / cut
    return hits


def _add_pr_curve(sorted_dist: torch.Tensor, hits: torch.Tensor, bits: int, totals: _Totals) -> None:
    """Add one chunk's precision and recall within each Hamming radius 0..bits, read off the same ranking.

    sorted_dist: (Qc, N) each row's distances in ranking order; hits: its hit counts from _add_ranked.
    """
    radii = torch.arange(bits + 1, device=hits.device, dtype=sorted_dist.dtype).expand(hits.shape[0], -1)
    retrieved = torch.searchsorted(sorted_dist, radii.contiguous(), right=True)  # (Qc, bits+1) items within r
    # relevant items within r: hits[:, retrieved - 1], and none when nothing is retrieved
    hits_within = hits.gather(1, (retrieved - 1).clamp_min(0)).double() * (retrieved > 0)
    totals.pr_precision += (hits_within / retrieved.clamp_min(1)).sum(0)  # nothing retrieved: 0 / 1, precision 0
    totals.pr_recall += (hits_within / hits[:, -1:].clamp_min(1)).sum(0)  # nothing relevant: recall 0


def _check_ks(ks: Sequence[int | None], precision_ks: Sequence[int]) -> None:
    if not ks and not precision_ks:
        raise UserError("nothing to compute: give at least one mAP cut-off (ks) or precision cut-off")
    for k in ks:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UserError(f"mAP cut-offs (ks) must be positive integers or None for ALL, got {k!r}")
    for k in precision_ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"precision cut-offs must be positive integers, got {k!r}")


def _map_key(k: int | None) -> str:
    return "map@all" if k is None else f"map@{k}"


@torch.no_grad()
def map_at_k(dist: torch.Tensor, relevant: torch.Tensor, k: int | None) -> float:
    """mAP@k of a (Q, N) distance matrix (any numeric dtype; smaller = closer) and (Q, N) bool relevance.

    k=None means ALL (k = N). Ties are broken by database index. Float scores work, e.g. negative cosine.

    Example:
        >>> dist = torch.tensor([[0, 1, 1]])  # ranking: item 0, then the tie 1, 2 in index order
        >>> map_at_k(dist, torch.tensor([[False, True, True]]), None)  # (1/2 + 2/3) / 2
        0.5833333333333333
    """
    if dist.dim() != 2 or dist.shape != relevant.shape:
        raise UserError(
            f"dist and relevant must have the same (Q, N) shape, got {tuple(dist.shape)} and {tuple(relevant.shape)}"
        )
    _check_ks([k], [])
    n_queries, n_db = dist.shape
    if n_queries == 0 or n_db == 0:
        raise UserError(f"need at least one query and one database item, got dist of shape {tuple(dist.shape)}")
    totals = _Totals(ap={k: 0.0}, precision={})
    for rows in _query_chunks(n_queries, n_db, DEFAULT_MAX_CHUNK_ELEMS, dist.device):
        order = _stable_order(_sort_key(dist[rows]))
        _add_ranked(relevant[rows].to(dist.device, torch.float64).gather(1, order), n_db, [k], [], totals)
    return totals.ap[k] / n_queries


@functools.cache
def _cpu_kernel() -> Callable | None:
    """agch.rank_kernel.score_block, or None where numba cannot be imported (the torch path then runs on CPU)."""
    try:
        from agch.rank_kernel import score_block
    except ImportError:
        return None
    return score_block


def _score_on_cpu(query_codes: torch.Tensor, db_codes: torch.Tensor, query_words: torch.Tensor,
                  db_words: torch.Tensor, exclude_self: bool, ks: Sequence[int | None], precision_ks: Sequence[int],
                  pr_curve: bool, max_chunk_elems: int, totals: _Totals) -> None:
    """Add every query's metrics to totals by agch.rank_kernel: one counting pass per query, no sort."""
    bits, n_db = query_codes.shape[1], db_codes.shape[0]
    n_ranked = n_db - 1 if exclude_self else n_db
    distances = _HammingDistances(query_codes, db_codes, bits, torch.uint8 if bits < 255 else torch.int32)
    by_class = query_words.dim() == 1
    query_labels, db_labels = (w.numpy().reshape(len(w), -1) for w in (query_words, db_words))
    cut_of = {k: _cut(k, n_ranked) for k in [*ks, *precision_ks]}
    cuts = np.array(sorted(set(cut_of.values())), dtype=np.int64)
    ap_sum, hits_sum = np.zeros(len(cuts)), np.zeros(len(cuts))
    pr_precision_sum, pr_recall_sum = np.zeros(bits + 1), np.zeros(bits + 1)
    inverse_position = _inverse_positions(n_db, query_codes.device).numpy()
    for rows in _query_chunks(query_codes.shape[0], n_db, max_chunk_elems, query_codes.device):
        _cpu_kernel()(distances(rows).numpy(), query_labels[rows], db_labels, by_class, rows.start, exclude_self,
                      cuts, n_ranked, inverse_position, ap_sum, hits_sum, pr_precision_sum, pr_recall_sum)
    column = {cut: i for i, cut in enumerate(cuts.tolist())}
    for k in ks:
        totals.ap[k] = float(ap_sum[column[cut_of[k]]])
    for k in precision_ks:
        totals.precision[k] = float(hits_sum[column[cut_of[k]]]) / cut_of[k]
    if pr_curve:
        totals.pr_precision, totals.pr_recall = torch.from_numpy(pr_precision_sum), torch.from_numpy(pr_recall_sum)


def _score_with_torch(query_codes: torch.Tensor, db_codes: torch.Tensor, query_words: torch.Tensor,
                      db_words: torch.Tensor, exclude_self: bool, ks: Sequence[int | None],
                      precision_ks: Sequence[int], pr_curve: bool, max_chunk_elems: int, totals: _Totals) -> None:
    """Add every query's metrics to totals by torch on the codes' device: one sort of unique keys per chunk."""
    bits, n_db, device = query_codes.shape[1], db_codes.shape[0], query_codes.device
    n_ranked = n_db - 1 if exclude_self else n_db
    # distances bits + 1 mark a query's own item under exclude_self
    rank = _Ranker(n_db, bits + 1, device)
    distances = _HammingDistances(query_codes, db_codes, bits, rank.dtype)
    for rows in _query_chunks(query_codes.shape[0], n_db, max_chunk_elems, device):
        dist = distances(rows)  # (Qc, N)
        relevant = _packed_relevance(query_words[rows], db_words)  # (Qc, N)
        if exclude_self:
            own = torch.arange(rows.start, rows.stop, device=device)[:, None]
            dist.scatter_(1, own, bits + 1)  # ranked after every other item, outside every radius
            relevant.scatter_(1, own, False)
        key = rank(dist, relevant)  # the one ranking every metric of this chunk is read from
        hits = _add_ranked(rank.relevance(key), n_ranked, ks, precision_ks, totals, full_prefix=pr_curve)
        if pr_curve:
            _add_pr_curve(rank.distances(key), hits, bits, totals)


@torch.no_grad()
def evaluate_hashing(
    query_codes: torch.Tensor,
    db_codes: torch.Tensor,
    query_labels: torch.Tensor,
    db_labels: torch.Tensor,
    *,
    ks: Sequence[int | None] = (50, None),
    precision_ks: Sequence[int] = (1, 10, 50, 100, 500, 1000),
    pr_curve: bool = True,
    exclude_self: bool = False,
    max_chunk_elems: int = DEFAULT_MAX_CHUNK_ELEMS,
) -> RetrievalMetrics:
    """Rank the database by Hamming distance to each query code and score the ranking against the labels.

    Args:
        query_codes: (Q, c) +-1 codes, any dtype.
        db_codes: (N, c) +-1 codes.
        query_labels: (Q, L) multi-hot labels, or (Q,) class indices; moved to the codes' device if elsewhere.
        db_labels: (N, L) or (N,), as query_labels.
        ks: mAP cut-offs; None is ALL. A cut-off above the database size looks at the whole database.
        precision_ks: precision@k cut-offs, clamped to the database size like ks.
        pr_curve: also compute precision and recall within each Hamming radius 0..c.
        exclude_self: the query set is the database (Q == N) and query i is not ranked against item i (the
            debugging log's query-vs-query protocol); each query is then ranked against N - 1 items.
        max_chunk_elems: at most this many (query, item) pairs are processed at once; peak memory is about
            BYTES_PER_CHUNK_ELEM bytes per pair (2**25 pairs: ~1 GB).

    Example:
        >>> codes = torch.tensor([[1, 1], [1, -1], [-1, -1]])
        >>> labels = torch.tensor([[1, 0], [1, 0], [0, 1]])
        >>> evaluate_hashing(codes, codes, labels, labels, ks=(None,), precision_ks=(), exclude_self=True).map
        {'map@all': 0.6666666666666666}
    """
    bits = _check_codes(query_codes, db_codes)
    ks, precision_ks = list(dict.fromkeys(ks)), list(dict.fromkeys(precision_ks))
    _check_ks(ks, precision_ks)
    n_queries, n_db = query_codes.shape[0], db_codes.shape[0]
    if query_labels.shape[0] != n_queries or db_labels.shape[0] != n_db:
        raise UserError(
            f"{n_queries} query codes but {query_labels.shape[0]} query label rows; "
            f"{n_db} database codes but {db_labels.shape[0]} database label rows"
        )
    if exclude_self and n_queries != n_db:
        raise UserError(
            f"exclude_self needs the query set to be the database, got {n_queries} queries and {n_db} database items"
        )
    n_ranked = n_db - 1 if exclude_self else n_db
    if n_queries == 0 or n_ranked < 1:
        raise UserError(f"need at least one query and one database item to rank, got {n_queries} and {n_ranked}")
    device = query_codes.device
    totals = _Totals(ap={k: 0.0 for k in ks}, precision={k: 0.0 for k in precision_ks})
    if pr_curve:
        totals.pr_precision = torch.zeros(bits + 1, dtype=torch.float64, device=device)
        totals.pr_recall = torch.zeros(bits + 1, dtype=torch.float64, device=device)
    query_words, db_words = (words.to(device) for words in _pack_label_pair(query_labels, db_labels))
    score = _score_on_cpu if device.type == "cpu" and _cpu_kernel() is not None else _score_with_torch
    score(query_codes, db_codes, query_words, db_words, exclude_self, ks, precision_ks, pr_curve, max_chunk_elems,
          totals)
    return RetrievalMetrics(
        map={_map_key(k): totals.ap[k] / n_queries for k in ks},
        precision_at_k={k: totals.precision[k] / n_queries for k in precision_ks},
        pr_precision=None if totals.pr_precision is None else (totals.pr_precision / n_queries).cpu().numpy(),
        pr_recall=None if totals.pr_recall is None else (totals.pr_recall / n_queries).cpu().numpy(),
        n_queries=n_queries,
        n_db=n_ranked,
        bits=bits,
    )


@torch.no_grad()
def random_ranking_map(
    query_labels: torch.Tensor, db_labels: torch.Tensor, ks: Sequence[int | None] = (50, None), seed: int = 0
) -> dict[str, float]:
    """mAP of a seeded, uniformly random ranking of the database for every query: the chance baseline.

    The permutations are drawn on the CPU from `seed`, so the figure is the same on every device. On MIRFlickr-25K
    real labels (2,000 queries vs 18,015 items) it is mAP@ALL ~0.554, mAP@50 ~0.587 (docs/protocol.md).
    """
    ks = list(dict.fromkeys(ks))
    _check_ks(ks, [])
    n_queries, n_db = query_labels.shape[0], db_labels.shape[0]
    if n_queries == 0 or n_db == 0:
        raise UserError(f"need at least one query and one database item, got {n_queries} and {n_db}")
    device = query_labels.device
    generator = torch.Generator().manual_seed(seed)
    query_words, db_words = _pack_label_pair(query_labels, db_labels)
    totals = _Totals(ap={k: 0.0 for k in ks}, precision={})
    for rows in _query_chunks(n_queries, n_db, DEFAULT_MAX_CHUNK_ELEMS, device):
        order = torch.stack([torch.randperm(n_db, generator=generator) for _ in range(rows.start, rows.stop)])
        relevant = _packed_relevance(query_words[rows], db_words).to(torch.float64)
        _add_ranked(relevant.gather(1, order.to(device)), n_db, ks, [], totals)
    return {_map_key(k): totals.ap[k] / n_queries for k in ks}
