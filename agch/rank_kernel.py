"""The CPU kernel of agch.metrics: every metric of a block of queries in O(N) per query, without sorting.

Distances are small integers (0..bits, and bits + 1 for a query's own item under exclude_self) and ties are broken
by database index, so a query's ranking is a stable counting sort by distance; the kernel never builds it. It
counts, per distance, the items and the relevant items; their prefix sums say where each distance's run starts in
the ranking, and give precision and recall within every Hamming radius. Then it walks the database in index order
(the tie order) and advances the counters of each item's distance: the item's rank and the hits up to it come out
in O(1), and AP@k is summed as it goes. Two counters share one int64 (low and high 32 bits), so an item costs one
read-modify-write per walk.

Compiled by numba on first use and cached on disk; agch.metrics runs its torch path instead if numba is missing.
"""

from __future__ import annotations

import numba
import numpy as np

LOW = (1 << 32) - 1
"""The low counter of a packed pair."""


@numba.njit(cache=True, nogil=True)
def score_block(dist, query_labels, db_labels, by_class, first_row, exclude_self, cuts, n_ranked, inverse_position,
                ap_sum, hits_sum, pr_precision_sum, pr_recall_sum):  # pragma: no cover - compiled
    """Add one block of queries' metrics to the running sums (all arrays; the sums are updated in place).

    dist: (Qb, N) uint8 or int32 Hamming distances of the block's queries; a query's own item is overwritten with
    bits + 1 under exclude_self (so uint8 needs bits <= 254). query_labels (Qb, W) and db_labels (N, W):
    int32 label words (relevant = a shared bit), or class indices in column 0 when by_class (relevant = equal).
    first_row: the block's first query index (its own item under exclude_self). cuts: ascending cut-offs, each
    <= n_ranked. inverse_position: 1/i for i = 1..N. ap_sum, hits_sum: per cut, the sum over queries of AP@cut and
    of the hits within the cut. pr_precision_sum, pr_recall_sum: per Hamming radius 0..bits.
    """
    n_queries, n_db = dist.shape
    n_words = query_labels.shape[1]
    n_cuts = cuts.shape[0]
    n_radii = pr_precision_sum.shape[0]
    n_buckets = n_radii + 1  # distances 0..bits and bits + 1 (the own item)
    largest_short_cut = 0  # cut-offs below n_ranked need a per-item test; the ALL cut does not
    for c in range(n_cuts):
        if cuts[c] < n_ranked:
            largest_short_cut = cuts[c]
    tally = np.zeros(n_buckets, np.int64)  # pass 1: items and relevant items at each distance
    cursor = np.zeros(n_buckets, np.int64)  # pass 2: rank and hits reached so far within each distance's run
    relevant = np.empty(n_db, np.int64)
    precision_terms = np.zeros(n_cuts)
    hits_in_cut = np.zeros(n_cuts, np.int64)
    for row in range(n_queries):
        own = first_row + row if exclude_self else -1
        tally[:] = 0
        if by_class:  # relevance, shifted to the high counter
            for j in range(n_db):
                relevant[j] = np.int64(query_labels[row, 0] == db_labels[j, 0]) << 32
        else:
            for j in range(n_db):
                words = query_labels[row, 0] & db_labels[j, 0]
                for w in range(1, n_words):
                    words |= query_labels[row, w] & db_labels[j, w]
                relevant[j] = np.int64(words != 0) << 32
        if own >= 0:  # the own item: not relevant, ranked after every other item, outside every radius
            relevant[own] = 0
            dist[row, own] = n_buckets - 1
        for j in range(n_db):  # items and relevant items per distance
            d = np.int64(dist[row, j])
            tally[d] += 1 + relevant[j]
        ranked, found = 0, 0
        for d in range(n_buckets):  # where each distance's run starts; precision within radius d
            cursor[d] = ranked + (found << 32)
            ranked += tally[d] & LOW
            found += tally[d] >> 32
            if d < n_radii and ranked:
                pr_precision_sum[d] += found / ranked
        total_relevant = found
        if total_relevant:  # recall within radius d: relevant within d over all relevant
            within = 0
            for d in range(n_radii):
                within += tally[d] >> 32
                pr_recall_sum[d] += within / total_relevant
        precision_terms[:] = 0.0
        hits_in_cut[:] = 0
        all_terms = 0.0
        for j in range(n_db):  # the walk: index order is the tie order within each distance
            d = np.int64(dist[row, j])
            step = relevant[j]
            at = cursor[d] + 1 + step
            cursor[d] = at
            position = at & LOW
            # precision@position at a relevant position (hits so far over the position), else 0
            term = (step >> 32) * (at >> 32) * inverse_position[position - 1]
            all_terms += term
            if position <= largest_short_cut:
                for c in range(n_cuts):
                    if position <= cuts[c]:
                        precision_terms[c] += term
                        hits_in_cut[c] += step >> 32
        for c in range(n_cuts):
            if cuts[c] >= n_ranked:
                precision_terms[c] = all_terms
                hits_in_cut[c] = total_relevant
            if hits_in_cut[c]:
                ap_sum[c] += precision_terms[c] / hits_in_cut[c]
            hits_sum[c] += hits_in_cut[c]
