"""Query / retrieval / train splits, drawn once and stored in the dataset file.

Protocols (see docs/data-format.md):
  standard    n_query queries drawn with `np.random.default_rng(seed)`, retrieval = all other rows,
              train = n_train rows drawn from retrieval with the same generator (DJSRH / AGCH).
  ucch        query = last n_query rows, retrieval = train = all other rows (n_train and seed unused).
  file-order  train = rows [0, a), retrieval = [a, b), query = [b, n) with a = floor(0.45 n),
              b = floor(0.9 n) (the debugging log's split: 9,006 / 9,007 / 2,002 rows for n = 20,015).
  given       the split the source file carries (e.g. Wiki: test = queries, database = train = the train part).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agch.errors import UserError, need, unknown

SPLIT_PROTOCOLS = ("standard", "ucch", "file-order", "given")
SEEDED_PROTOCOLS = ("standard",)
"""Protocols that use the seed; the others record split_seed = -1."""
EVAL_SPLITS = ("test", "validation")
"""Which queries score a run: the dataset's own (test) queries, or validation queries carved from its other rows."""
VALIDATION_SHARE = 0.2
"""At most this share of the retrieval rows become validation queries (and no more than there are test queries)."""
VALIDATION_SEED = 0
"""The validation queries are the same for every run on a dataset: the seed is fixed, not the run's."""


@dataclass(frozen=True)
class Split:
    """Row indices (int64, sorted ascending) of the query, retrieval and train sets."""

    query: np.ndarray
    retrieval: np.ndarray
    train: np.ndarray

    def __eq__(self, other: object) -> bool:
        # The generated tuple comparison would compare arrays elementwise and fail.
        if not isinstance(other, Split):
            return NotImplemented
        parts = ("query", "retrieval", "train")
        return all(np.array_equal(getattr(self, part), getattr(other, part)) for part in parts)

    def sizes(self) -> dict[str, int]:
        """Number of rows in each part."""
        return {"query": len(self.query), "retrieval": len(self.retrieval), "train": len(self.train)}


def recorded_seed(protocol: str, seed: int) -> int:
    """The split_seed to store for `protocol`: the seed if the protocol uses it, else -1."""
    return int(seed) if protocol in SEEDED_PROTOCOLS else -1


def make_split(protocol: str, n: int, *, seed: int = 0, n_query: int = 2000, n_train: int = 5000,
               given: Split | None = None) -> Split:
    """Draw the split of `n` rows under `protocol`.

    Example:
        >>> s = make_split("standard", 100, seed=1, n_query=10, n_train=30)
        >>> len(s.query), len(s.retrieval), len(s.train)
        (10, 90, 30)
    """
    if protocol not in SPLIT_PROTOCOLS:
        raise unknown("split protocol", protocol, SPLIT_PROTOCOLS)
    if protocol == "standard":
        need(1 <= n_query < n, "", f"standard split: n_query = {n_query} must be at least 1 and below n = {n}")
        need(1 <= n_train <= n - n_query, "",
                 f"standard split: n_train = {n_train} must be between 1 and the {n - n_query} rows left after "
                 f"{n_query} queries (n = {n})")
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        query, retrieval = np.sort(order[:n_query]), np.sort(order[n_query:])
        train = np.sort(rng.choice(retrieval, size=n_train, replace=False))
        return _split(query, retrieval, train)
    if protocol == "ucch":
        need(1 <= n_query < n, "", f"ucch split: n_query = {n_query} must be at least 1 and below n = {n}")
        rest = np.arange(n - n_query)
        return _split(np.arange(n - n_query, n), rest, rest)
    if protocol == "file-order":
        a, b = 45 * n // 100, 90 * n // 100
        need(0 < a < b < n, "", f"file-order split: n = {n} is too small for 45% / 45% / 10% parts")
        return _split(np.arange(b, n), np.arange(a, b), np.arange(a))
    if given is None:
        raise UserError("split protocol 'given' needs the split stored in the source file "
                        "(import with --train-keys and --test-keys)")
    top = max((int(part.max()) for part in (given.query, given.retrieval, given.train) if len(part)), default=-1)
    need(top < n, "", f"given split refers to row {top} but there are only n = {n} rows")
    return _split(given.query, given.retrieval, given.train)


def validation_split(split: Split) -> Split:
    """Validation queries carved from `split`, so that settings can be chosen without the test queries.

    n = min(test queries, VALIDATION_SHARE of the retrieval rows) queries are drawn (seed VALIDATION_SEED) from the
    retrieval rows outside the training set when there are that many (the standard split: the training pairs stay
    untouched), else from all retrieval rows (ucch, given: train = retrieval, so those queries leave training).
    Validation database = retrieval minus those queries; training = train minus them. The test queries are used
    nowhere.

    Example:
        >>> s = validation_split(make_split("ucch", 100, n_query=10))
        >>> len(s.query), len(s.retrieval), len(s.train)
        (10, 80, 80)
    """
    n_val = min(len(split.query), int(VALIDATION_SHARE * len(split.retrieval)))
    if n_val < 1:
        raise UserError(f"a validation split needs at least 5 retrieval rows; this split has {len(split.retrieval)}")
    outside = np.setdiff1d(split.retrieval, split.train, assume_unique=True)
    pool = outside if len(outside) >= n_val else split.retrieval
    query = np.sort(np.random.default_rng(VALIDATION_SEED).choice(pool, size=n_val, replace=False))
    train = np.setdiff1d(split.train, query, assume_unique=True)
    if len(train) < 2:
        raise UserError(f"a validation split leaves {len(train)} training rows; need at least 2")
    return _split(query, np.setdiff1d(split.retrieval, query, assume_unique=True), train)


def evaluation_split(split: Split, eval_split: str) -> Split:
    """The split a run trains and is scored on: `split` itself ('test') or its validation_split ('validation')."""
    if eval_split not in EVAL_SPLITS:
        raise unknown("evaluation split", eval_split, EVAL_SPLITS)
    return split if eval_split == "test" else validation_split(split)


def _split(query: np.ndarray, retrieval: np.ndarray, train: np.ndarray) -> Split:
    return Split(*(np.asarray(part, dtype=np.int64) for part in (query, retrieval, train)))
