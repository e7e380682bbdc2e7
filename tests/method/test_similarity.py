"""The batch similarity S against the paper's worked example and its own definitions."""

from __future__ import annotations

import math

import pytest
import torch

from agch.config import Config, apply
from agch.method.similarity import batch_similarity, cosine_and_distance, normalized_adjacency

A = [0.5, 0.5, 0.5, 0.5, 0.0]
B = [0.3, 0.5, 0.7, 0.4, 0.1]


def _one_modality(**overrides) -> Config:
    # gamma_t = 0 makes the text modality vanish, leaving the worked example's single-modality setting
    return apply(Config(), {"gamma_v": 1.0, "gamma_t": 0.0, "rho": 4.0, "rescale_s": False, **overrides})


def _pair_s(config: Config) -> tuple[float, float, float]:
    zv = torch.tensor([A, B])
    zt = torch.ones(2, 3)
    c, d = cosine_and_distance(zv, zt, config)
    s, _ = batch_similarity(zv, zt, config)
    return float(c[0, 1]), float(d[0, 1]), float(s[0, 1])


def test_worked_example_euclidean_reading():
    # Paper: cos = 0.95, D = 0.92, S = 0.874 (= 0.95 x 0.92, with D rounded to two places first).
    c, d, s = _pair_s(_one_modality(distance="euclidean"))
    assert c == pytest.approx(0.95, abs=1e-6)
    assert round(d, 2) == 0.92
    assert s == pytest.approx(0.874, abs=0.005)
    assert s == pytest.approx(0.95 * math.exp(-math.sqrt(0.1) / 4), abs=1e-6)


def test_worked_example_sqrt_reading_does_not_match():
    # Eq. 12 as printed: exp(-sqrt(||a-b||)/4) = 0.869, so S would be 0.825, not the paper's 0.874.
    _, d, s = _pair_s(_one_modality(distance="sqrt"))
    assert d == pytest.approx(0.869, abs=0.001)
    assert abs(s - 0.874) > 0.04


def test_gamma_weighting_linear_vs_squared():
    torch.manual_seed(0)
    zv, zt = torch.rand(6, 10), torch.rand(6, 4)
    cos_v = torch.nn.functional.normalize(zv, dim=1) @ torch.nn.functional.normalize(zv, dim=1).T
    cos_t = torch.nn.functional.normalize(zt, dim=1) @ torch.nn.functional.normalize(zt, dim=1).T
    base = {"gamma_v": 2.0, "gamma_t": 0.3}
    c_lin, _ = cosine_and_distance(zv, zt, apply(Config(), {**base, "gamma_weighting": "linear"}))
    c_sq, _ = cosine_and_distance(zv, zt, apply(Config(), {**base, "gamma_weighting": "squared"}))
    torch.testing.assert_close(c_lin, 2.0 * cos_v + 0.3 * cos_t)
    torch.testing.assert_close(c_sq, 4.0 * cos_v + 0.09 * cos_t)
    # squared == the literal product of the weighted concatenation Z~ Z~^T (Eq. 10)
    zz = torch.cat([2.0 * torch.nn.functional.normalize(zv, dim=1), 0.3 * torch.nn.functional.normalize(zt, dim=1)], 1)
    torch.testing.assert_close(c_sq, zz @ zz.T)


def test_gamma_weighting_cosine_is_the_cosine_of_the_concatenation_and_keeps_s_in_range():
    torch.manual_seed(1)
    zv, zt = torch.randn(8, 10), torch.randn(8, 4)  # signed features (e.g. standardised): cosines of both signs
    config = apply(Config(), {"gamma_v": 2.0, "gamma_t": 0.3, "gamma_weighting": "cosine"})
    c, _ = cosine_and_distance(zv, zt, config)
    zz = torch.cat([2.0 * torch.nn.functional.normalize(zv, dim=1), 0.3 * torch.nn.functional.normalize(zt, dim=1)], 1)
    unit = torch.nn.functional.normalize(zz, dim=1)
    torch.testing.assert_close(c, unit @ unit.T)
    s, _ = batch_similarity(zv, zt, config)
    assert float(s.max()) <= 1 + 1e-6 and torch.allclose(s.diagonal(), torch.ones(8))  # S_ii = 1 = B_i . B_i
    linear, _ = batch_similarity(zv, zt, apply(config, {"gamma_weighting": "linear"}))
    assert float(linear.diagonal()[0]) == pytest.approx(2 * (2.0 + 0.3) - 1)  # the out-of-range target: 3.6


def test_similarity_fix_switches_product_and_weighted_sum():
    torch.manual_seed(1)
    zv, zt = torch.rand(5, 8), torch.rand(5, 3)
    on = apply(Config(), {"rescale_s": False})
    off = apply(on, {"fixes.similarity": "off", "sim_mix": 0.3})
    c, d = cosine_and_distance(zv, zt, on)
    torch.testing.assert_close(batch_similarity(zv, zt, on)[0], c * d)
    torch.testing.assert_close(batch_similarity(zv, zt, off)[0], 0.3 * c + 0.7 * d)


def test_rescale_and_gcn_adjacency_choice():
    torch.manual_seed(2)
    zv, zt = torch.rand(4, 8), torch.rand(4, 3)
    before = apply(Config(), {"rescale_s": True, "gcn_adjacency": "before"})
    after = apply(before, {"gcn_adjacency": "after"})
    s, adj_before = batch_similarity(zv, zt, before)
    torch.testing.assert_close(s, 2 * adj_before - 1)
    s_after, adj_after = batch_similarity(zv, zt, after)
    torch.testing.assert_close(adj_after, s_after)


def test_normalized_adjacency_is_symmetric_normalisation():
    a = torch.tensor([[1.0, 0.5], [0.5, 2.0]])
    deg = a.sum(1)
    expected = a / torch.sqrt(deg[:, None] * deg[None, :])
    torch.testing.assert_close(normalized_adjacency(a), expected)
