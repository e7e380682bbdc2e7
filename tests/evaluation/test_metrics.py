"""agch.evaluation.metrics against the per-query oracle (tests/map_oracle.py), hand-computed cases and the reference
values
of docs/protocol.md on the real MIRFlickr-25K labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agch.evaluation import ranking
from agch.errors import UserError
from agch.evaluation.metrics import (
    RetrievalMetrics,
    evaluate_hashing,
    hamming_distance,
    map_at_k,
    random_ranking_map,
    relevance,
)
from agch.data.splits import make_split
from tests.conftest import SHARED_DATA
from tests.map_oracle import (
    oracle_hamming,
    oracle_map,
    oracle_pr_at_radius,
    oracle_precision_at_k,
    oracle_relevance,
)

DATA_DIR = SHARED_DATA
PRECISION_KS = (1, 5, 50, 10_000)  # 10_000 is above every database here: clamped to the database size
TOL = 1e-6


@pytest.fixture(params=["kernel", "torch"])
def engine(request, monkeypatch) -> str:
    """evaluate_hashing on CPU by the compiled kernel (agch.evaluation.kernel, the default) or by the torch sort path (what
    runs on CUDA, and on CPU where numba is missing)."""
    if request.param == "torch":
        monkeypatch.setattr(ranking, "cpu_kernel", lambda: None)
    else:
        assert ranking.cpu_kernel() is not None, "numba is a dependency: the CPU kernel must load"
    return request.param


def random_codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.choice(np.array([-1, 1], dtype=np.int8), (n, bits))


def random_labels(rng: np.random.Generator, n: int, n_labels: int, density: float, single_label: bool) -> np.ndarray:
    if single_label:
        return np.eye(n_labels, dtype=np.uint8)[rng.integers(0, n_labels, n)]
    labels = (rng.random((n, n_labels)) < density).astype(np.uint8)
    labels[:2] = 0  # items without labels: as queries they have no relevant item at all
    return labels


def assert_matches_oracle(metrics: RetrievalMetrics, dist: np.ndarray, rel: np.ndarray, bits: int, exclude_self: bool):
    n_db = dist.shape[1] - exclude_self
    assert metrics.n_db == n_db and metrics.bits == bits and metrics.n_queries == dist.shape[0]
    for k, key in ((50, "map@50"), (None, "map@all"), (3, "map@3"), (n_db + 7, f"map@{n_db + 7}")):
        assert metrics.map[key] == pytest.approx(oracle_map(dist, rel, k, exclude_self), abs=TOL), key
    for k in PRECISION_KS:
        assert metrics.precision_at_k[k] == pytest.approx(oracle_precision_at_k(dist, rel, k, exclude_self), abs=TOL)
    precision, recall = oracle_pr_at_radius(dist, rel, bits, exclude_self)
    np.testing.assert_allclose(metrics.pr_precision, precision, atol=TOL, rtol=0)
    np.testing.assert_allclose(metrics.pr_recall, recall, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "n_queries, n_db, bits, n_labels, density, single_label, max_chunk_elems",
    [
        (40, 300, 8, 5, 0.2, False, 2**25),  # 8 bits: 9 distances for 300 items, ties everywhere
        (57, 211, 8, 24, 0.1, False, 211 * 5),  # 12 chunks, the last one short
        (33, 120, 16, 6, 0.0, True, 1),  # one query per chunk; single-label one-hot
        (25, 400, 64, 3, 0.05, False, 400 * 4),  # sparse labels: many queries with no relevant item
        (20, 150, 100, 70, 0.03, False, 150 * 7),  # 100 bits (two popcount words), 70 labels (three label words)
        (9, 80, 300, 4, 0.3, False, 2**25),  # 300 bits: distances beyond uint8
    ],
)
def test_evaluate_hashing_matches_oracle(
    engine, n_queries, n_db, bits, n_labels, density, single_label, max_chunk_elems
):
    rng = np.random.default_rng(n_queries)
    query_codes, db_codes = random_codes(rng, n_queries, bits), random_codes(rng, n_db, bits)
    query_labels = random_labels(rng, n_queries, n_labels, density, single_label)
    db_labels = random_labels(rng, n_db, n_labels, density, single_label)
    rel = oracle_relevance(query_labels, db_labels)
    metrics = evaluate_hashing(
        *map(torch.from_numpy, (query_codes, db_codes, query_labels, db_labels)),
        ks=(50, None, 3, n_db + 7),
        precision_ks=PRECISION_KS,
        max_chunk_elems=max_chunk_elems,
    )
    assert_matches_oracle(metrics, oracle_hamming(query_codes, db_codes), rel, bits, exclude_self=False)


@pytest.mark.parametrize("max_chunk_elems", [2**25, 90 * 4])
def test_exclude_self_matches_oracle(engine, max_chunk_elems):
    rng = np.random.default_rng(7)
    codes, labels = random_codes(rng, 90, 8), random_labels(rng, 90, 6, 0.25, False)
    metrics = evaluate_hashing(
        torch.from_numpy(codes), torch.from_numpy(codes), torch.from_numpy(labels), torch.from_numpy(labels),
        ks=(50, None, 3, 89 + 7), precision_ks=PRECISION_KS, exclude_self=True, max_chunk_elems=max_chunk_elems,
    )
    dist = oracle_hamming(codes, codes)
    assert_matches_oracle(metrics, dist, oracle_relevance(labels, labels), 8, exclude_self=True)
    # without the exclusion each query finds itself first at distance 0 and scores higher
    with_self = evaluate_hashing(*map(torch.from_numpy, (codes, codes, labels, labels)), ks=(None,))
    assert with_self.map["map@all"] > metrics.map["map@all"]


def test_class_index_labels_equal_one_hot(engine):
    rng = np.random.default_rng(3)
    query_codes, db_codes = torch.from_numpy(random_codes(rng, 30, 8)), torch.from_numpy(random_codes(rng, 200, 8))
    query_classes, db_classes = torch.from_numpy(rng.integers(0, 4, 30)), torch.from_numpy(rng.integers(0, 4, 200))
    one_hot = evaluate_hashing(query_codes, db_codes, torch.eye(4)[query_classes], torch.eye(4)[db_classes])
    indices = evaluate_hashing(query_codes, db_codes, query_classes, db_classes)
    assert indices.map == one_hot.map and indices.precision_at_k == one_hot.precision_at_k
    np.testing.assert_array_equal(indices.pr_recall, one_hot.pr_recall)


# Hand-computed: 2-bit codes, query q = [+1, +1] with label A.
#   item 0 [+1, -1] distance 1, label A      relevant
#   item 1 [+1, +1] distance 0, label B      not relevant
#   item 2 [-1, -1] distance 2, labels A, B  relevant
#   item 3 [+1, +1] distance 0, label A      relevant
# Ranking by (distance, index): 1, 3, 0, 2 -> relevance 0, 1, 1, 1.
#   AP@ALL = (1/3) (1/2 + 2/3 + 3/4) = 23/36
#   AP@2: one hit in the top 2 -> (1/1) (1/2) = 1/2  (the DJSRH normalisation: divided by hits in the top k)
#   AP@1: no hit -> 0
#   precision@1..4 = 0, 1/2, 2/3, 3/4
#   radius 0: items {1, 3}, 1 of the 3 relevant -> P 1/2, R 1/3
#   radius 1: items {1, 3, 0} -> P 2/3, R 2/3;  radius 2: all -> P 3/4, R 1
HAND_QUERY = torch.tensor([[1, 1]])
HAND_DB = torch.tensor([[1, -1], [1, 1], [-1, -1], [1, 1]])
HAND_QUERY_LABELS = torch.tensor([[1, 0]])
HAND_DB_LABELS = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0]])


def test_hand_computed_example(engine):
    metrics = evaluate_hashing(
        HAND_QUERY, HAND_DB, HAND_QUERY_LABELS, HAND_DB_LABELS, ks=(None, 2, 1), precision_ks=(1, 2, 3, 4)
    )
    assert metrics.map == pytest.approx({"map@all": 23 / 36, "map@2": 1 / 2, "map@1": 0.0}, abs=1e-12)
    assert metrics.precision_at_k == pytest.approx({1: 0.0, 2: 1 / 2, 3: 2 / 3, 4: 3 / 4}, abs=1e-12)
    np.testing.assert_allclose(metrics.pr_precision, [1 / 2, 2 / 3, 3 / 4], atol=1e-12)
    np.testing.assert_allclose(metrics.pr_recall, [1 / 3, 2 / 3, 1], atol=1e-12)


def test_query_without_relevant_items_counts_as_zero(engine):
    # second query has no label: AP 0, and it still counts -> mAP@ALL = (23/36 + 0) / 2 = 23/72
    queries, labels = torch.cat([HAND_QUERY, HAND_QUERY]), torch.cat([HAND_QUERY_LABELS, torch.tensor([[0, 0]])])
    metrics = evaluate_hashing(queries, HAND_DB, labels, HAND_DB_LABELS, ks=(None,))
    assert metrics.map["map@all"] == pytest.approx(23 / 72, abs=1e-12)
    # its recall is 0 at every radius (no relevant item), its precision 0 as well
    np.testing.assert_allclose(metrics.pr_recall, [1 / 6, 1 / 3, 1 / 2], atol=1e-12)


def test_exclude_self_hand_computed(engine):
    # codes a=[+1,+1], b=[+1,-1], c=[-1,-1]; labels a, b: A; c: B.
    # a ranks b (d 1, relevant), c (d 2): AP 1.  b ranks a, c (both d 1; index order a, c): relevant first, AP 1.
    # c ranks b (d 1), a (d 2): nothing relevant, AP 0.  mAP@ALL = 2/3.
    codes = torch.tensor([[1, 1], [1, -1], [-1, -1]])
    labels = torch.tensor([[1, 0], [1, 0], [0, 1]])
    metrics = evaluate_hashing(codes, codes, labels, labels, ks=(None,), exclude_self=True)
    assert metrics.map["map@all"] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics.n_db == 2


def test_ties_are_broken_by_database_index(engine):
    # one relevant item tied with an irrelevant one: index order decides, in both directions
    assert map_at_k(torch.tensor([[0.0, 0.0]]), torch.tensor([[False, True]]), None) == 0.5
    assert map_at_k(torch.tensor([[0.0, 0.0]]), torch.tensor([[True, False]]), None) == 1.0
    # -0.0 and +0.0 are the same distance (negative cosine of orthogonal vectors gives -0.0)
    assert map_at_k(torch.tensor([[0.0, -0.0]]), torch.tensor([[False, True]]), None) == 0.5
    assert map_at_k(torch.tensor([[5, 5, 5]], dtype=torch.int64), torch.tensor([[False, False, True]]), 2) == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64])
def test_map_at_k_generic_distances_match_oracle(dtype):
    rng = np.random.default_rng(11)
    # few distinct values (many ties), negative ones too, as for negative cosine scores
    dist = torch.from_numpy(rng.integers(-6, 6, (45, 260)) / 4).to(dtype)
    rel = torch.from_numpy(rng.random((45, 260)) < 0.3)
    rel[0] = False  # a query without relevant items
    for k in (1, 10, 50, None, 1000):
        expected = oracle_map(dist.double().numpy(), rel.numpy(), k)
        assert map_at_k(dist, rel, k) == pytest.approx(expected, abs=TOL)


def test_map_at_k_on_hamming_equals_evaluate_hashing(engine):
    rng = np.random.default_rng(5)
    query_codes, db_codes = torch.from_numpy(random_codes(rng, 20, 12)), torch.from_numpy(random_codes(rng, 99, 12))
    query_labels = torch.from_numpy(random_labels(rng, 20, 5, 0.3, False))
    db_labels = torch.from_numpy(random_labels(rng, 99, 5, 0.3, False))
    metrics = evaluate_hashing(query_codes, db_codes, query_labels, db_labels)
    dist, rel = hamming_distance(query_codes, db_codes), relevance(query_labels, db_labels)
    assert map_at_k(dist, rel, 50) == pytest.approx(metrics.map["map@50"], abs=1e-12)
    assert map_at_k(dist.float(), rel, None) == pytest.approx(metrics.map["map@all"], abs=1e-12)


@pytest.mark.parametrize("bits", [1, 8, 63, 64, 100, 130])
@pytest.mark.parametrize("popcount", [True, False])
def test_hamming_distance_paths_match_oracle(bits, popcount):
    rng = np.random.default_rng(bits)
    query_codes, db_codes = random_codes(rng, 13, bits), random_codes(rng, 29, bits)
    expected = oracle_hamming(query_codes, db_codes)
    codes = torch.from_numpy(query_codes).float(), torch.from_numpy(db_codes).float()
    dist = ranking.HammingDistances(*codes, bits, torch.int32, popcount=popcount)(slice(None))
    np.testing.assert_array_equal(dist.numpy(), expected)
    public = hamming_distance(torch.from_numpy(query_codes), torch.from_numpy(db_codes))
    assert public.dtype == torch.int32
    np.testing.assert_array_equal(public.numpy(), expected)


def test_codes_of_any_dtype_and_with_autograd_history(engine):
    rng = np.random.default_rng(4)
    query_codes, db_codes = random_codes(rng, 9, 24), random_codes(rng, 31, 24)
    expected = oracle_hamming(query_codes, db_codes)
    graph_codes = torch.sign(torch.from_numpy(query_codes).float().requires_grad_())  # sign keeps requires_grad
    for query in (graph_codes, torch.from_numpy(query_codes).to(torch.bfloat16), torch.from_numpy(query_codes)):
        db = torch.from_numpy(db_codes).to(query.dtype)
        np.testing.assert_array_equal(hamming_distance(query, db).numpy(), expected)


@pytest.mark.parametrize("n_labels", [1, 24, 31, 32, 70])
def test_relevance_matches_oracle(n_labels):
    rng = np.random.default_rng(n_labels)
    query_labels, db_labels = rng.random((17, n_labels)) < 0.1, rng.random((40, n_labels)) < 0.1
    rel = relevance(torch.from_numpy(query_labels).to(torch.uint8), torch.from_numpy(db_labels).float())
    np.testing.assert_array_equal(rel.numpy(), oracle_relevance(query_labels, db_labels))
    classes = torch.from_numpy(rng.integers(0, 3, 40))
    np.testing.assert_array_equal(relevance(classes[:17], classes).numpy(), oracle_relevance(classes[:17].numpy(),
                                                                                              classes.numpy()))


def test_random_ranking_map_is_seeded():
    rng = np.random.default_rng(0)
    query_labels = torch.from_numpy(random_labels(rng, 50, 5, 0.3, False))
    db_labels = torch.from_numpy(random_labels(rng, 400, 5, 0.3, False))
    first = random_ranking_map(query_labels, db_labels, seed=1)
    assert first == random_ranking_map(query_labels, db_labels, seed=1)
    assert first != random_ranking_map(query_labels, db_labels, seed=2)
    assert set(first) == {"map@50", "map@all"}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: hamming_distance(torch.tensor([[1, 0]]), torch.tensor([[1, 1]])), "must be \\+-1"),
        (lambda: hamming_distance(torch.ones(2, 3), torch.ones(2, 4)), "bits"),
        (lambda: evaluate_hashing(torch.ones(2, 4), torch.ones(3, 4), torch.ones(2, 2), torch.ones(3, 2),
                                  exclude_self=True), "exclude_self"),
        (lambda: evaluate_hashing(torch.ones(2, 4), torch.ones(3, 4), torch.ones(2, 2), torch.ones(3, 3)), "labels"),
        (lambda: evaluate_hashing(torch.ones(2, 4), torch.ones(3, 4), torch.ones(2, 2), torch.ones(4, 2)),
         "label rows"),
        (lambda: evaluate_hashing(torch.ones(2, 4), torch.ones(3, 4), torch.ones(2, 2), torch.ones(3, 2), ks=(0,)),
         "positive"),
        (lambda: map_at_k(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[True, False]]), None), "NaN"),
        (lambda: map_at_k(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool), None), "same"),
        (lambda: relevance(torch.ones(2, 3), torch.ones(4)), "both"),
    ],
)
def test_user_errors(call, message):
    with pytest.raises(UserError, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is not exercised here")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(2)
    arrays = (random_codes(rng, 70, 16), random_codes(rng, 500, 16), random_labels(rng, 70, 8, 0.2, False),
              random_labels(rng, 500, 8, 0.2, False))
    cpu = evaluate_hashing(*map(torch.from_numpy, arrays), max_chunk_elems=500 * 9)
    cuda = evaluate_hashing(*(torch.from_numpy(a).cuda() for a in arrays), max_chunk_elems=500 * 9)
    assert cuda.map == pytest.approx(cpu.map, abs=TOL)
    assert cuda.precision_at_k == pytest.approx(cpu.precision_at_k, abs=TOL)
    np.testing.assert_allclose(cuda.pr_precision, cpu.pr_precision, atol=TOL)
    dist = torch.from_numpy(rng.integers(-4, 4, (70, 500)) / 2)
    rel = torch.from_numpy(rng.random((70, 500)) < 0.3)
    assert map_at_k(dist.cuda(), rel.cuda(), None) == pytest.approx(map_at_k(dist, rel, None), abs=TOL)
    labels = [torch.from_numpy(a) for a in arrays[2:]]
    assert random_ranking_map(*(x.cuda() for x in labels)) == pytest.approx(random_ranking_map(*labels), abs=TOL)


# --- the reference values of docs/protocol.md on the real MIRFlickr-25K labels and tags ------------------------


@pytest.fixture(scope="module")
def mirflickr_standard_split():
    """Real labels and tags under the project's "standard" split: 2,000 seeded queries, database = the 18,015 others."""
    if not (DATA_DIR / "mirflickr25k-lall.mat").exists() or not (DATA_DIR / "mirflickr25k-yall.mat").exists():
        pytest.skip(f"real MIRFlickr-25K labels/tags not found in {DATA_DIR}")
    import scipy.io

    labels = scipy.io.loadmat(DATA_DIR / "mirflickr25k-lall.mat")["LAll"]
    tags = scipy.io.loadmat(DATA_DIR / "mirflickr25k-yall.mat")["YAll"]
    split = make_split("standard", len(labels), seed=0, n_query=2000)
    query, db = split.query, split.retrieval
    return torch.from_numpy(labels[query]), torch.from_numpy(labels[db]), tags[query], tags[db]


def test_real_labels_relevance_rate(mirflickr_standard_split):
    query_labels, db_labels, _, _ = mirflickr_standard_split
    assert db_labels.shape[0] == 18015
    # docs/data.md: 55.5% of all pairs share at least one label
    assert relevance(query_labels, db_labels).float().mean().item() == pytest.approx(0.555, abs=0.01)


def test_real_labels_random_ranking_reference(mirflickr_standard_split):
    query_labels, db_labels, _, _ = mirflickr_standard_split
    result = random_ranking_map(query_labels, db_labels, seed=0)
    # docs/protocol.md: mAP@ALL ~0.554, mAP@50 ~0.587; other splits and seeds move these by up to ~0.01
    assert result["map@all"] == pytest.approx(0.554, abs=0.01)
    assert result["map@50"] == pytest.approx(0.587, abs=0.01)


def test_real_tags_cosine_text_to_text_reference(mirflickr_standard_split):
    import scipy.sparse

    query_labels, db_labels, query_tags, db_tags = mirflickr_standard_split
    # rank the database by the cosine of binary tag vectors. Key: cos^2 = shared^2 / (|q| |r|), a ratio of integers
    # rounded once, so equal cosines tie exactly (and go to the lower database index); its distinct values are
    # replaced by their rank, which orders identically and sorts as small integers
    shared = (scipy.sparse.csr_matrix(query_tags) @ scipy.sparse.csr_matrix(db_tags).T).tocoo()  # nonzero only
    cos_squared = shared.data.astype(np.float64) ** 2 / (
        query_tags.sum(1)[shared.row].astype(np.float64) * db_tags.sum(1)[shared.col]
    )
    distinct, rank = np.unique(-cos_squared, return_inverse=True)  # rank 0: the highest cosine
    assert len(distinct) < 2**15
    dist = np.full(shared.shape, len(distinct), dtype=np.int16)  # no shared tag: cosine 0, ranked after the rest
    dist[shared.row, shared.col] = rank
    rel = relevance(query_labels, db_labels)
    # docs/protocol.md: tag cosine text->text mAP@ALL 0.577, mAP@50 0.774. ~96% of the database shares no tag with
    # a query and ties at cosine 0, so the tie order moves mAP@ALL: this split lists the database in file order
    # (measured 0.573 / 0.773); listed in the order of the seeded permutation instead it gives 0.577 / 0.774
    assert map_at_k(torch.from_numpy(dist), rel, None) == pytest.approx(0.577, abs=0.01)
    assert map_at_k(torch.from_numpy(dist), rel, 50) == pytest.approx(0.774, abs=0.01)
