"""The CCA + ITQ reference: CCA against a planted correlation, ITQ's rotation, and scoring in the trainer's terms."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from agch import config as cfg
from agch.method.baselines import cca, cca_itq, itq_rotation, random_reference, reference_scores
from agch.data.dataset import open_dataset
from agch.evaluation.metrics import random_ranking_map


def test_cca_recovers_a_planted_canonical_correlation():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(5000)
    x = np.column_stack([shared + 0.5 * rng.standard_normal(5000), rng.standard_normal((5000, 3))])
    y = np.column_stack([rng.standard_normal((5000, 2)), shared + 0.5 * rng.standard_normal(5000)])
    x, y = x - x.mean(0), y - y.mean(0)
    wx, wy, corr = cca(x, y, 1, ridge=1e-6)
    assert corr[0] == pytest.approx(0.8, abs=0.02)  # corr of two copies of shared + N(0, 0.25): 1 / 1.25
    assert abs(np.corrcoef(x @ wx[:, 0], y @ wy[:, 0])[0, 1]) == pytest.approx(corr[0], abs=1e-3)
    assert np.argmax(np.abs(wx[:, 0])) == 0 and np.argmax(np.abs(wy[:, 0])) == 2


@pytest.mark.parametrize("k, bits", [(8, 8), (3, 16)])
def test_itq_rotation_has_orthonormal_rows_and_lowers_the_quantisation_loss(k, bits):
    v = np.random.default_rng(1).standard_normal((500, k)) * np.linspace(3, 1, k)
    start = itq_rotation(v, bits, 0, seed=0)
    rotation = itq_rotation(v, bits, 50, seed=0)
    assert rotation.shape == (k, bits)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(k), atol=1e-10)
    loss = lambda r: float(np.square(np.where(v @ r >= 0, 1, -1) - v @ r).sum())  # noqa: E731
    assert loss(rotation) < loss(start)


def test_cca_itq_scores_like_a_trainer_run_and_beats_chance(tiny_dataset, tiny_config):
    with open_dataset(tiny_dataset) as data:
        result = cca_itq(tiny_config, data)
        chance = random_ranking_map(torch.from_numpy(data.labels[data.split.query]),
                                    torch.from_numpy(data.labels[data.split.retrieval]), ks=(50, None), seed=0)
        val = cca_itq(cfg.apply(tiny_config, {"eval_split": "validation"}), data)
        references = random_reference(tiny_config, data)
    assert result.status == "finished" and result.protocol["method"] == "cca-itq"
    assert {"map50_i2t", "map50_t2i", "mapall_i2t", "mapall_t2i", "unique_frac_image"} <= set(result.metrics)
    assert result.metrics["mapall_i2t"] > chance["map@all"] + 0.03 and result.metrics["mapall_t2i"] > chance["map@all"]
    assert result.codes["codes_query_image"].shape == (100, tiny_config.bits)
    assert val.protocol["queries"] == "validation" and val.protocol["n_database"] == result.protocol["n_database"] - val.protocol["n_query"]
    assert references == {"random_map50": chance["map@50"], "random_mapall": chance["map@all"]}


def test_drivers_read_cached_references_and_the_protocol_without_torch_or_scipy(tiny_dataset, tiny_config,
                                                                                private_home):
    """agch-search and agch-ablate do both before their first trial, and make tables at the end: importing torch took
    2 s of a search's start-up, scipy.stats 1 s of its finish (docs/search.md, "Overhead of the service")."""
    with open_dataset(tiny_dataset) as data:
        expected = reference_scores(tiny_config, data)
    code = """import json, sys
import agch.experiments.ablation, agch.runs.driver, agch.experiments.search, agch.experiments.results
import agch.experiments.statistics
from agch import config as cfg
from agch.method.baselines import reference_scores
from agch.data.dataset import open_dataset
from agch.evaluation.protocol import describe_protocol, protocol_of
config = cfg.from_flat(json.loads(sys.argv[2]))
with open_dataset(sys.argv[1]) as data:
    scores, line = reference_scores(config, data), describe_protocol(protocol_of(config, data))
print(json.dumps([scores, line, sorted(m for m in ("torch", "scipy.linalg", "scipy.stats") if m in sys.modules)]))
"""
    done = subprocess.run([sys.executable, "-c", code, str(tiny_dataset), json.dumps(cfg.to_flat(tiny_config))],
                          check=True, capture_output=True, text=True)
    scores, line, imported = json.loads(done.stdout.splitlines()[-1])
    assert scores == expected and line.startswith(f"{tiny_config.bits} bits") and imported == []


def test_reference_scores_are_cached_by_dataset_and_settings(tiny_dataset, tiny_config, private_home):
    with open_dataset(tiny_dataset) as data:
        first = reference_scores(tiny_config, data)
        cached = list((private_home / "references").glob("*.json"))
        assert len(cached) == 1 and reference_scores(tiny_config, data) == first
        reference_scores(cfg.apply(tiny_config, {"bits": 32}), data)
    assert len(list((private_home / "references").glob("*.json"))) == 2
