"""The CPU kernel of agch.evaluation.metrics: every metric of a block of queries in O(N) per query, without sorting.

Distances are small integers (0..bits, and bits + 1 for a query's own item under exclude_self) and ties are broken
by database index, so a query's ranking is a stable counting sort by distance; the kernel never builds it. It
counts, per distance, the items and the relevant items; their prefix sums say where each distance's run starts in
the ranking, and give precision and recall within every Hamming radius. Then it walks the database in index order
(the tie order) and advances the counters of each item's distance: the item's rank and the hits up to it come out
in O(1), and AP@ALL is summed as it goes. Two counters share one int64 (low and high 32 bits), so an item costs one
read-modify-write per walk. The few items that land within the largest short cut-off (k < N) are kept by rank, and
AP@k and hits@k are summed over that head afterwards, so the walk has no per-cut work.

Each pass is a plain loop over the database (relevance word by word, then counting, then the walk): a loop with an
inner loop or per-cut tests in its body took twice as long (docs/benchmarks.md).

Compiled by numba on first use and cached on disk; agch.evaluation.metrics runs its torch path instead if numba is
missing.
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
    largest_short_cut = 0  # cut-offs below n_ranked are read off the ranking's head; the ALL cut is not
    for c in range(n_cuts):
        if cuts[c] < n_ranked:
            largest_short_cut = cuts[c]
    tally = np.zeros(n_buckets, np.int64)  # items and relevant items at each distance
    cursor = np.zeros(n_buckets, np.int64)  # rank and hits reached so far within each distance's run
    relevant = np.empty(n_db, np.int64)
    head_terms = np.zeros(largest_short_cut)  # per position of the ranking's head: its precision@ term, its hit
    head_hits = np.zeros(largest_short_cut, np.int64)
    for row in range(n_queries):
        # relevance: label words shared with the query (or the same class), word by word so each loop vectorises
        if by_class:
            for j in range(n_db):
                relevant[j] = query_labels[row, 0] == db_labels[j, 0]
        else:
            for j in range(n_db):
                relevant[j] = query_labels[row, 0] & db_labels[j, 0]
            for w in range(1, n_words):
                for j in range(n_db):
                    relevant[j] |= query_labels[row, w] & db_labels[j, w]
        if exclude_self:  # the own item: not relevant, ranked after every other item, outside every radius
            relevant[first_row + row] = 0
            dist[row, first_row + row] = n_buckets - 1
        tally[:] = 0
        for j in range(n_db):  # relevance as a flag in the high counter; items and relevant items per distance
            flag = np.int64(relevant[j] != 0) << 32
            relevant[j] = flag
            tally[np.int64(dist[row, j])] += 1 + flag
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
            if position <= largest_short_cut:  # rare: the head of the ranking, kept by position
                head_terms[position - 1] = term
                head_hits[position - 1] = step >> 32
        hits_so_far, terms_so_far, position = 0, 0.0, 0
        for c in range(n_cuts):  # AP@cut: sums over the ranking's head up to each short cut-off, or over it all
            if cuts[c] >= n_ranked:
                hits_so_far, terms_so_far = total_relevant, all_terms
            while position < min(cuts[c], largest_short_cut):
                terms_so_far += head_terms[position]
                hits_so_far += head_hits[position]
                position += 1
            if hits_so_far:
                ap_sum[c] += terms_so_far / hits_so_far
            hits_sum[c] += hits_so_far
