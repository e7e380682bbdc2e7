"""Split protocols: sizes, disjointness, determinism, file-order proportions, errors."""

from __future__ import annotations

import numpy as np
import pytest

from agch.errors import UserError
from agch.data.splits import SPLIT_PROTOCOLS, Split, evaluation_split, make_split, recorded_seed, validation_split


def _check_sorted_int64(split: Split) -> None:
    for part in (split.query, split.retrieval, split.train):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


def test_standard_sizes_disjoint_and_train_inside_retrieval():
    split = make_split("standard", 1000, seed=3, n_query=100, n_train=250)
    _check_sorted_int64(split)
    assert split.sizes() == {"query": 100, "retrieval": 900, "train": 250}
    assert len(np.intersect1d(split.query, split.retrieval)) == 0
    assert np.array_equal(np.union1d(split.query, split.retrieval), np.arange(1000))
    assert np.all(np.isin(split.train, split.retrieval))


def test_standard_is_deterministic_per_seed():
    a = make_split("standard", 500, seed=7, n_query=50, n_train=100)
    b = make_split("standard", 500, seed=7, n_query=50, n_train=100)
    c = make_split("standard", 500, seed=8, n_query=50, n_train=100)
    assert a == b
    assert a != c
    assert not np.array_equal(a.query, c.query)


def test_standard_matches_the_documented_generator():
    # query = first n_query of default_rng(seed).permutation(n); train drawn from retrieval with the same generator
    rng = np.random.default_rng(5)
    order = rng.permutation(300)
    retrieval = np.sort(order[30:])
    expected_train = np.sort(rng.choice(retrieval, size=60, replace=False))
    split = make_split("standard", 300, seed=5, n_query=30, n_train=60)
    assert np.array_equal(split.query, np.sort(order[:30]))
    assert np.array_equal(split.train, expected_train)


def test_ucch_queries_are_the_last_rows_and_train_is_retrieval():
    split = make_split("ucch", 400, seed=123, n_query=40)
    _check_sorted_int64(split)
    assert np.array_equal(split.query, np.arange(360, 400))
    assert np.array_equal(split.retrieval, np.arange(360))
    assert np.array_equal(split.train, split.retrieval)


@pytest.mark.parametrize("n", [20015, 1000, 101, 37])
def test_file_order_proportions(n):
    split = make_split("file-order", n)
    _check_sorted_int64(split)
    a, b = 45 * n // 100, 90 * n // 100
    assert np.array_equal(split.train, np.arange(a))
    assert np.array_equal(split.retrieval, np.arange(a, b))
    assert np.array_equal(split.query, np.arange(b, n))
    assert abs(len(split.query) - 0.1 * n) < 2 and abs(len(split.train) - 0.45 * n) < 1


def test_file_order_reproduces_the_debugging_logs_2002_queries():
    assert make_split("file-order", 20015).sizes() == {"query": 2002, "retrieval": 9007, "train": 9006}


def test_given_returns_the_given_split_and_checks_it_fits():
    given = Split(np.array([8, 9]), np.arange(8), np.arange(8))
    assert make_split("given", 10, given=given) == given
    with pytest.raises(UserError, match="row 9 but there are only n = 9"):
        make_split("given", 9, given=given)
    with pytest.raises(UserError, match="--train-keys"):
        make_split("given", 10)


def test_unknown_protocol_suggests_the_closest():
    with pytest.raises(UserError, match=r"unknown split protocol 'standart' \(did you mean 'standard'\?\)"):
        make_split("standart", 100)


@pytest.mark.parametrize("protocol, kwargs, fragment", [
    ("standard", {"n_query": 100}, "n_query = 100 must be at least 1 and below n = 100"),
    ("standard", {"n_query": 0}, "n_query = 0"),
    ("standard", {"n_query": 10, "n_train": 95}, "n_train = 95 must be between 1 and the 90 rows"),
    ("ucch", {"n_query": 150}, "n_query = 150"),
])
def test_sizes_that_do_not_fit_name_the_numbers(protocol, kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        make_split(protocol, 100, **kwargs)


def test_file_order_too_small():
    with pytest.raises(UserError, match="n = 2 is too small"):
        make_split("file-order", 2)


def test_recorded_seed_only_for_seeded_protocols():
    assert [recorded_seed(p, 4) for p in SPLIT_PROTOCOLS] == [4, -1, -1, -1]


@pytest.mark.parametrize("protocol", ["standard", "ucch", "file-order"])
def test_validation_split_never_touches_the_test_queries(protocol):
    split = make_split(protocol, 1000, seed=3, n_query=100, n_train=300)
    val = validation_split(split)
    _check_sorted_int64(val)
    assert len(val.query) == min(len(split.query), len(split.retrieval) // 5)
    assert np.all(np.isin(val.query, split.retrieval)) and not np.isin(val.query, split.query).any()
    assert not np.isin(val.retrieval, split.query).any() and not np.isin(val.train, split.query).any()
    assert not np.isin(val.query, val.retrieval).any() and not np.isin(val.query, val.train).any()
    assert np.array_equal(val.retrieval, np.setdiff1d(split.retrieval, val.query))
    assert val == validation_split(split)  # the same for every run: the seed is fixed
    assert evaluation_split(split, "test") == split and evaluation_split(split, "validation") == val


def test_validation_queries_leave_the_training_set_alone_when_the_database_has_other_rows():
    split = make_split("standard", 1000, seed=3, n_query=100, n_train=300)  # 600 retrieval rows outside training
    val = validation_split(split)
    assert np.array_equal(val.train, split.train) and not np.isin(val.query, split.train).any()
    given = make_split("ucch", 1000, n_query=100)  # train = retrieval: the queries must come out of training
    val = validation_split(given)
    assert len(val.train) == len(given.train) - len(val.query) and np.array_equal(val.train, val.retrieval)


def test_validation_split_of_a_too_small_split_is_a_user_error():
    with pytest.raises(UserError, match="at least 5 retrieval rows"):
        validation_split(Split(np.array([0]), np.array([1, 2, 3]), np.array([1, 2, 3])))
