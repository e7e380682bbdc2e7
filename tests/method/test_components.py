"""The paper's component ablation as switches (no_d, no_c, no_fusion, no_gcn) and the plain-S reference built from
them: what each switch removes, the loss it leaves, the identity it changes, and that the reference learns."""

from __future__ import annotations

import pytest
import torch

from agch import config as cfg
from agch.method.baselines import plain_s_config
from agch.data.dataset import open_dataset
from agch.errors import UserError
from agch.method.losses import agch_loss
from agch.evaluation.metrics import random_ranking_map
from agch.method.model import AGCH, Codes
from agch.method.similarity import batch_similarity, cosine_and_distance
from agch.method.train import train
from tests.method.test_losses import S, T, V


def _model(tiny_config, **switches) -> AGCH:
    return AGCH(20, 30, cfg.apply(tiny_config, switches))


@pytest.mark.parametrize("switch, gone", [("no_gcn", ("gcn_image", "gcn_text")), ("no_fusion", ("fusion",))])
def test_a_dropped_module_has_no_parameters_no_output_and_no_optimizer_group(tiny_config, switch, gone):
    full, dropped = _model(tiny_config), _model(tiny_config, **{switch: True})
    names = {name.split(".")[0] for name, _ in dropped.named_parameters()}
    assert not names & set(gone) and set(gone) <= {name.split(".")[0] for name, _ in full.named_parameters()}
    zv, zt = torch.randn(8, 20), torch.randn(8, 30)
    _, adjacency = batch_similarity(zv, zt, tiny_config)
    codes = dropped(zv, zt, adjacency)
    outputs = {"no_gcn": (codes.gv, codes.gt), "no_fusion": (codes.h,)}[switch]
    assert all(out is None for out in outputs) and codes.v.shape == (8, tiny_config.bits)
    groups = dropped.parameter_groups(tiny_config)
    assert len(groups) == len(full.parameter_groups(tiny_config)) - 1
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in dropped.parameters())


def test_without_gcn_the_loss_has_no_l2_and_the_rest_is_unchanged():
    # the hand-computed case of tests/method/test_losses.py: L1 = 5.5, L3 = beta * 4.0 + lam * 2.0 (reduction 'sum')
    config = cfg.apply(cfg.preset("paper"), {"loss_reduction": "sum", "beta": 2.0, "lam": 3.0, "no_gcn": True})
    h = [[1.0, 0.0], [0.0, 1.0]]
    terms = agch_loss(Codes(torch.tensor(V), torch.tensor(T), torch.tensor(h), None, None), torch.tensor(S), config)
    assert set(terms) == {"l1", "l3", "total"}
    assert float(terms["l1"]) == pytest.approx(5.5) and float(terms["l3"]) == pytest.approx(2.0 * 4.0 + 3.0 * 2.0)
    assert float(terms["total"]) == pytest.approx(5.5 + 14.0)


def test_without_fusion_l3_compares_the_encoders_codes_directly():
    # By hand (sums): L1 = |S - VV'|^2 + |S - TT'|^2 = 0.5 + 4.5; VT' = [[1, 1], [0, 0]], so
    # |S - VT'|^2 = 0 + 2.25 + 0.25 + 1 = 3.5; |V - T|^2 = 2; L2 as with fusion (9.0).
    config = cfg.apply(cfg.preset("paper"), {"loss_reduction": "sum", "beta": 2.0, "lam": 3.0, "delta": 0.5,
                                             "no_fusion": True})
    gt = [[0.0, 1.0], [0.0, 1.0]]
    codes = Codes(torch.tensor(V), torch.tensor(T), None, torch.tensor(V), torch.tensor(gt))
    terms = {k: float(v) for k, v in agch_loss(codes, torch.tensor(S), config).items()}
    assert terms["l1"] == pytest.approx(5.0) and terms["l2"] == pytest.approx(9.0)
    assert terms["l3"] == pytest.approx(2.0 * 3.5 + 3.0 * 2.0)
    assert terms["total"] == pytest.approx(5.0 + 0.5 * 9.0 + 13.0)


def test_c_only_and_d_only_build_s_from_one_term(tiny_config):
    zv, zt = torch.rand(6, 20), torch.rand(6, 30)
    c, d = cosine_and_distance(zv, zt, tiny_config)
    for switch, expected in (("no_d", c), ("no_c", d)):
        s, adjacency = batch_similarity(zv, zt, cfg.apply(tiny_config, {switch: True}))
        torch.testing.assert_close(adjacency, expected)
        torch.testing.assert_close(s, 2 * expected - 1)
    product, _ = batch_similarity(zv, zt, tiny_config)
    torch.testing.assert_close(product, 2 * c * d - 1)
    with pytest.raises(UserError, match="no_c and no_d cannot both be on"):
        cfg.apply(tiny_config, {"no_c": True, "no_d": True})


def test_each_switch_is_part_of_the_identity_and_logged(tiny_config):
    base = cfg.identity(tiny_config)
    identities = {cfg.identity(cfg.apply(tiny_config, {name: True})) for name in cfg.ADDED_SWITCHES}
    assert base not in identities and len(identities) == len(cfg.ADDED_SWITCHES)
    flat = {k: str(v) for k, v in cfg.to_flat(cfg.apply(tiny_config, {"no_gcn": True})).items()}
    assert flat["no_gcn"] == "True" and cfg.from_flat(flat).no_gcn


def test_training_without_gcn_and_fusion_logs_no_l2_and_no_gcn_probes(tiny_dataset, tiny_config):
    config = cfg.apply(tiny_config, {"epochs": 2, "eval_every": 2, "no_gcn": True, "no_fusion": True})
    with open_dataset(tiny_dataset) as data:
        result = train(config, data, device="cpu")
    assert result.status == "finished" and "loss_l2" not in result.history[-1]
    assert "gcn_weight_std" not in result.metrics and "sign_agree_h_gv" not in result.metrics
    assert "code_abs_mean_image" in result.metrics


def test_plain_s_reference_takes_only_bits_seed_and_queries_and_beats_chance(tiny_dataset):
    asked = cfg.apply(cfg.preset("real-features"), {"bits": 16, "seed": 2, "eval_split": "validation",
                                                    "gamma_v": 0.3})
    reference = plain_s_config(asked)
    assert (reference.bits, reference.seed, reference.eval_split) == (16, 2, "validation")
    assert reference == cfg.apply(cfg.preset("plain-s"), {"bits": 16, "seed": 2, "eval_split": "validation"})
    assert reference.no_gcn and reference.no_fusion and reference.lam == 0 and reference.fixes.quantization
    with open_dataset(tiny_dataset) as data:
        result = train(plain_s_config(cfg.apply(cfg.Config(), {"bits": 16})), data, device="cpu")
        chance = random_ranking_map(torch.from_numpy(data.labels[data.split.query]),
                                    torch.from_numpy(data.labels[data.split.retrieval]), ks=(50, None), seed=0)
    assert result.epochs_run == 60
    for direction in ("i2t", "t2i"):
        assert result.metrics[f"mapall_{direction}"] > chance["map@all"] + 0.03, direction
