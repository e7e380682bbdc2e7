"""AGCH's objective (Eqs. 13-16) and the log's extra terms against a case worked out by hand."""

from __future__ import annotations

import pytest
import torch

from agch import config as cfg
from agch.method.losses import agch_loss
from agch.method.model import Codes

# Two pairs, two bits, codes already of unit norm (so the per-sample L2 normalisation leaves them as they are).
V = [[1.0, 0.0], [0.0, 1.0]]
T = [[1.0, 0.0], [1.0, 0.0]]
H = [[1.0, 0.0], [0.0, 1.0]]
GV = V
GT = [[0.0, 1.0], [0.0, 1.0]]
S = [[1.0, -0.5], [-0.5, 1.0]]
# By hand, as sums of squared entries (each matrix has 4 entries, so reduction 'mean' divides every term by 4):
#   L1 = |S - VV'|^2 + |S - TT'|^2 + |S - HH'|^2 = 0.5 + 4.5 + 0.5                         = 5.5
#   L2 = |S - GvGv'|^2 + |Gv - V|^2 + |S - GtGt'|^2 + |Gt - T|^2 = 0.5 + 0 + 4.5 + 4         = 9.0
#   L3 = beta (|S - VH'|^2 + |S - TH'|^2) + lam (|V - H|^2 + |T - H|^2) = beta (0.5 + 3.5) + lam (0 + 2)
# The fixes act on the raw codes, as means: align mean((V - T)^2) = 0.5; quant sum over V, T of
# mean((|x| - 1)^2) = 0.5 + 0.5; balance sum over V, T of sum_bits mean_batch(x)^2 = 0.5 + 1.0.
BY_HAND = {"sum": {"l1": 5.5, "l2": 9.0, "l3_sim": 4.0, "l3_code": 2.0},
           "mean": {"l1": 5.5 / 4, "l2": 9.0 / 4, "l3_sim": 1.0, "l3_code": 0.5}}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_terms_match_the_equations_on_a_hand_computed_case(reduction: str) -> None:
    weights = {"alpha": 0.7, "delta": 0.5, "beta": 2.0, "lam": 3.0, "align_weight": 5.0, "quant_weight": 7.0,
               "balance_weight": 11.0}
    config = cfg.apply(cfg.preset("paper"), {**weights, "loss_reduction": reduction, "fixes.alignment": True,
                                             "fixes.quantization": True, "fixes.balance": True})
    codes = Codes(*(torch.tensor(x) for x in (V, T, H, GV, GT)))
    terms = {k: float(v) for k, v in agch_loss(codes, torch.tensor(S), config).items()}
    hand = BY_HAND[reduction]
    l3 = 2.0 * hand["l3_sim"] + 3.0 * hand["l3_code"]
    assert terms["l1"] == pytest.approx(hand["l1"]) and terms["l2"] == pytest.approx(hand["l2"])
    assert terms["l3"] == pytest.approx(l3)
    assert (terms["align"], terms["quant"], terms["balance"]) == pytest.approx((0.5, 1.0, 1.5))
    total = 0.7 * hand["l1"] + 0.5 * hand["l2"] + l3 + 5.0 * 0.5 + 7.0 * 1.0 + 11.0 * 1.5
    assert terms["total"] == pytest.approx(total)


def test_fixes_off_add_no_terms_and_normalisation_is_per_sample() -> None:
    config = cfg.apply(cfg.preset("paper"), {"loss_reduction": "sum"})
    codes = Codes(*(3.0 * torch.tensor(x) for x in (V, T, H, GV, GT)))  # scaled codes: the same after L2 norm
    terms = agch_loss(codes, torch.tensor(S), config)
    assert set(terms) == {"l1", "l2", "l3", "total"}
    assert float(terms["l1"]) == pytest.approx(5.5)


def test_per_sample_code_terms_do_not_depend_on_the_code_length() -> None:
    """Repeating every bit doubles the code length and leaves every inner product and squared distance of the
    normalised codes as it was: with per_sample_codes every term stays, without it the code-difference terms halve."""
    codes = Codes(*(torch.tensor(x) for x in (V, T, H, GV, GT)))
    doubled = Codes(*(torch.cat([x, x], dim=1) for x in (codes.v, codes.t, codes.h, codes.gv, codes.gt)))
    for per_sample in (False, True):
        config = cfg.apply(cfg.preset("paper"), {"beta": 0, "lam": 1.0, "per_sample_codes": per_sample})
        short, long = (agch_loss(c, torch.tensor(S), config) for c in (codes, doubled))
        assert float(long["l1"]) == pytest.approx(float(short["l1"]))
        ratio = float(long["l3"]) / float(short["l3"])
        assert ratio == pytest.approx(1.0 if per_sample else 0.5)
    # by hand, per sample: |V - H|^2 + |T - H|^2 = 0 + 2 over 2 rows; L2's similarity terms stay means over the 4
    # entries, its code terms |Gv - V|^2 + |Gt - T|^2 = 0 + 4 are over 2 rows
    config = cfg.apply(cfg.preset("paper"), {"beta": 0, "lam": 1.0, "per_sample_codes": True})
    terms = agch_loss(codes, torch.tensor(S), config)
    assert float(terms["l3"]) == pytest.approx((0.0 + 2.0) / 2)
    assert float(terms["l2"]) == pytest.approx((0.5 + 4.5) / 4 + (0.0 + 4.0) / 2)


def test_per_sample_code_terms_are_the_entrywise_means_times_the_code_length() -> None:
    """So real-features' λ 6 at 16 bits is λ 6 / 16 = 0.375 in per-sample units (the real-features-per-sample
    preset's comment): without GCN, where δ weighs nothing else, the two losses are then the same."""
    generator = torch.Generator().manual_seed(0)
    codes = Codes(*(torch.randn(8, 16, generator=generator) for _ in range(3)), None, None)
    s = 2 * torch.rand(8, 8, generator=generator) - 1
    entrywise = cfg.apply(cfg.preset("real-features"), {"bits": 16, "no_gcn": True})
    per_sample = cfg.apply(entrywise, {"per_sample_codes": True, "lam": entrywise.lam / 16})
    expected = float(agch_loss(codes, s, entrywise)["total"])
    assert float(agch_loss(codes, s, per_sample)["total"]) == pytest.approx(expected)
    assert float(agch_loss(codes, s, cfg.apply(per_sample, {"lam": entrywise.lam}))["total"]) > expected
