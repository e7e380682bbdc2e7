"""The one config type: the paper's MIRFlickr-25K settings, named presets as deltas, the log's fixes as switches.

Every field has one line of documentation. Search and ablation only ever produce `Config`s; the trainer only
ever reads them. Parameter names follow the paper (docs/method.md): `delta` is the GCN-loss weight δ,
`gamma_v`/`gamma_t` the modality weights γ_v/γ_t of the similarity, `lam` the inter-modal alignment weight λ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from agch.errors import UserError, need, unknown


@dataclass(frozen=True)
class Fixes:
    """The debugging log's five fixes (docs/trainer.md), each one switch the ablation toggles.

    The "off" side of each switch is the log's starting reimplementation; "on" is what the log changed to.
    """

    similarity: bool = True
    """on: S = C ⊙ D (the paper, Eq. 11); off: S = sim_mix·C + (1 − sim_mix)·D (the paper's ablation AGCH-3,
    the log's starting point). The log bundled the square-root distance and S ← 2S − 1 with this fix; here those
    are the separate options `distance` and `rescale_s` so that this switch measures one change.
    Implemented in agch.method.similarity.batch_similarity."""
    text_input: bool = False
    """on: BatchNorm1d on the sparse bag-of-words input, LeakyReLU instead of ReLU in the text encoder, and
    Kaiming init with gain 2.0 on its first layer (the log: text-code mean rose from 0.013 to 0.095).
    Implemented in agch.method.model.TextEncoder.__init__."""
    alignment: bool = False
    """on: adds align_weight · mean((B^v − B^t)²), a direct pull between the same pair's image and text codes
    (the log measured the pair ~32.9 bits apart at 64 bits). Implemented in agch.method.losses.agch_loss."""
    quantization: bool = False
    """on: adds quant_weight · mean((|B| − 1)²) over the encoder codes, pushing them toward ±1. Implemented in
    agch.method.losses.agch_loss."""
    balance: bool = False
    """on: adds balance_weight · Σ_bits mean_batch(B)², pushing each bit to be +1 half the time (the log:
    all 500 codes had collapsed to one before it). Implemented in agch.method.losses.agch_loss."""


FIX_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Fixes))
# The CLI and YAML spell fixes with dashes (text-input); the dataclass with underscores.
FIX_ALIASES = {name.replace("_", "-"): name for name in FIX_NAMES}


@dataclass(frozen=True)
class Config:
    """All settings of one AGCH training run. Defaults: the paper's MIRFlickr-25K setup (Sec. IV-C)."""

    # --- codes and schedule
    bits: int = 64
    """code length c (the paper reports 16/32/64/128)."""
    epochs: int = 40
    """passes over the training set (paper: MIRFlickr 40, NUS-WIDE 80, Wiki 150)."""
    batch_size: int = 32
    """mini-batch size m; the batch similarity S is m × m (paper: 32)."""
    eval_every: int = 5
    """evaluate mAP and diagnostics every this many epochs (and always after the last)."""
    save_encoders: bool = True
    """log the trained hash functions (feature norms, image and text encoders; no GCN or fusion) as encoders.pt
    beside the codes, so that agch-audit can re-encode other splits (agch.runs.record.log_result). About 25 MB at the
    paper's sizes (text_hidden 4096); turn off for large searches. Not part of a run's identity."""
    seed: int = 0
    """seeds python, numpy and torch before anything random happens (weights, batch order)."""

    # --- similarity (Eqs. 8–12)
    rho: float = 4.0
    """ρ, the distance scale of D = exp(−dist/ρ)."""
    gamma_v: float = 2.0
    """γ_v, weight of the L2-normalised image feature in Z̃ = [γ_v Z̃^v, γ_t Z̃^t]."""
    gamma_t: float = 0.3
    """γ_t, weight of the L2-normalised text feature."""
    gamma_weighting: str = "linear"
    """how γ enters C: 'linear' = Σ_k γ_k cos_k (the paper's text), 'squared' = Z̃Z̃ᵀ (Eq. 10 literally, γ_k²),
    'cosine' = the cosine of the concatenation Z̃ = [γ_v Z̃^v, γ_t Z̃^t], i.e. Σ_k γ_k² cos_k / Σ_k γ_k², which keeps
    C in [−1, 1] and S_ii = 1 (function `agch.method.similarity.cosine_and_distance`; docs/trainer.md, "range of S")."""
    feature_norm: str = "none"
    """what both modalities' features go through before S and the encoders: 'none' (the paper), 'center'
    (subtract the training split's mean) or 'standardize' (and divide by its std); statistics of the training rows
    only, carried in the model (`agch.method.model.FeatureNorm`) so test-time encoding applies the same map."""
    distance: str = "euclidean"
    """dist_ij in D: 'euclidean' = ‖Z̃_i − Z̃_j‖ (matches the paper's worked example S = 0.874), 'sqrt' =
    √‖Z̃_i − Z̃_j‖ (Eq. 12 as printed; the log's choice)."""
    sim_mix: float = 0.5
    """with fixes.similarity off: weight of C in S = sim_mix·C + (1 − sim_mix)·D."""
    rescale_s: bool = True
    """S ← 2S − 1 before the code losses (the paper, after Eq. 12)."""
    gcn_adjacency: str = "before"
    """which S the GCN sees: 'before' 2S − 1 (a non-negative adjacency, so D̃^-1/2 exists) or 'after'."""

    # --- the paper's component ablation (its AGCH-1 ... AGCH-5; AGCH-3, the weighted sum, is fixes.similarity off)
    no_d: bool = False
    """S = C alone, no D (the paper's AGCH-1, "C only"). Implemented in agch.method.similarity.batch_similarity."""
    no_c: bool = False
    """S = D alone, no C (AGCH-2, "D only"). Implemented in agch.method.similarity.batch_similarity."""
    no_fusion: bool = False
    """no fusion module (AGCH-4): no B^h, L1 without its h term, and L3 between the encoders' codes directly,
    β‖S − B^v B^tᵀ‖² + λ‖B^v − B^t‖² (once). Implemented in agch.method.model.AGCH and agch.method.losses.agch_loss."""
    no_gcn: bool = False
    """no GCN modules and no L2 (AGCH-5). Implemented in agch.method.model.AGCH and agch.method.losses.agch_loss."""

    # --- losses (Eqs. 13–16)
    alpha: float = 1.0
    """α, weight of the intra-modal loss L1."""
    beta: float = 1.0
    """β, weight of the cross-modal similarity term of L3."""
    lam: float = 10.0
    """λ (lambda), weight of the code-alignment term ‖B^k − B^h‖² of L3."""
    delta: float = 0.01
    """δ, weight of the GCN loss L2."""
    loss_reduction: str = "mean"
    """'mean' averages each ‖·‖²_F over its entries, 'sum' sums them (changes the effective learning rate)."""
    per_sample_codes: bool = False
    """with 'mean': the code-difference terms (λ's ‖B^k − B^h‖², L2's ‖B^g − B^k‖²) are averaged over the m samples,
    each a squared distance of unit codes, not over the m·c entries, so that their weight does not fall as 1/c with
    the code length (docs/findings.md). Implemented in agch.method.losses.agch_loss."""
    align_weight: float = 1.0
    """weight of the alignment fix's term."""
    quant_weight: float = 0.1
    """weight of the quantization fix's term."""
    balance_weight: float = 0.1
    """weight of the balance fix's term."""

    # --- networks (Sec. III-B, IV-C)
    image_hidden: int = 0
    """hidden units above the fixed fc7 features in the image encoder; 0 = fc7 → c directly (the replaced fc8)."""
    text_hidden: int = 4096
    """hidden units of the text MLP K → text_hidden → c; its hidden layer is f^t."""
    gcn_hidden: int = 2048
    """width of the graph-convolution layers (input → gcn_hidden → … → FC → c)."""
    gcn_layers: int = 2
    """graph-convolution layers per GCN module (the paper: 2; the log's open suggestion: vary the depth)."""

    # --- optimisation (Sec. IV-C)
    optimizer: str = "sgd"
    """'sgd' (the paper: SGD with momentum) or 'adam' (Adam; `momentum` unused, weight decay as L2 in the gradient)."""
    lr_image: float = 1e-4
    """learning rate of the image encoder."""
    lr_text: float = 1e-2
    """learning rate of the text encoder."""
    lr_gcn: float = 1e-3
    """learning rate of both GCN modules."""
    lr_fusion: float = 1e-2
    """learning rate of the fusion layer."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """weight decay of every parameter group."""
    bf16: bool = False
    """bf16 autocast for the forward pass on CUDA (ignored on CPU)."""

    # --- evaluation
    topk: int = 50
    """k of mAP@k (the paper's protocol: 50); mAP@ALL is always computed too."""
    eval_split: str = "test"
    """which queries score the run: 'test' (the dataset's queries against its retrieval set) or 'validation'
    (queries carved from the retrieval rows, `agch.data.splits.validation_split`; they leave the training set when they
    come from it). agch-search and agch-ablate use 'validation' unless told otherwise (--eval-split test)."""

    fixes: Fixes = field(default_factory=Fixes)
    """the debugging log's fixes."""


SELECTION_DEFAULTS: dict[str, Any] = {"eval_split": "validation"}
"""What agch-search and agch-ablate runs use unless the space, ablation file or command line says otherwise: they
choose settings, so they score on validation queries, never on the test queries (docs/trainer.md)."""

# Fields that do not change what is computed, only where or how it is observed. Left out of the identity.
NON_SCIENTIFIC = frozenset({"eval_every", "save_encoders"})
# Fields added after runs were recorded, off by default: part of the identity only when on, so that the runs recorded
# before they existed (which computed exactly the default) are still recognised and reused.
ADDED_SWITCHES = frozenset({"no_d", "no_c", "no_fusion", "no_gcn", "per_sample_codes"})

CHOICES: dict[str, tuple[str, ...]] = {
    "gamma_weighting": ("linear", "squared", "cosine"),
    "feature_norm": ("none", "center", "standardize"),
    "optimizer": ("sgd", "adam"),
    "eval_split": ("test", "validation"),
    "distance": ("euclidean", "sqrt"),
    "gcn_adjacency": ("before", "after"),
    "loss_reduction": ("mean", "sum"),
}

REAL_FEATURES: dict[str, Any] = {
    "feature_norm": "standardize",
    "optimizer": "adam",
    "gamma_v": 0.6,
    "gamma_t": 1.0,
    "image_hidden": 256,
    "text_hidden": 1024,
    "gcn_hidden": 512,
    "lr_image": 2e-3,
    "lr_text": 8e-4,
    "lr_gcn": 1e-3,
    "lr_fusion": 5e-3,
    "weight_decay": 5e-3,
    "delta": 3.0,
    "lam": 6.0,
    "beta": 2.0,
    "epochs": 30,
}
"""The `real-features` preset's settings (PRESETS says where they come from), named so that a preset refining them
is written as a delta on them."""

PRESETS: dict[str, dict[str, Any]] = {
    # The paper as written, with the readings documented on each field above.
    "paper": {},
    # AGCH's method with trainer settings that learn on real features (docs/findings.md): both modalities
    # standardised with training statistics (the paper's rates assume fc7-scale inputs; on Wiki's histograms the
    # image codes never left 0 and the text codes saturated into one code), Adam, a hidden layer in the image
    # encoder, weight decay, and loss weights and γ chosen on validation queries of the Wiki development split.
    "real-features": REAL_FEATURES,
    # real-features with the code-difference terms averaged per sample (per_sample_codes): at a fixed λ, the mean over
    # the m·c entries made λ's pull toward B^h fall as 1/c, and T→I fell with the code length (docs/findings.md §7).
    # In per-sample units real-features' λ 6 is 0.375 at 16 bits and 0.047 at 128; λ 1 was chosen over 0.375 on the
    # Wiki development split's validation queries at 16 and 128 bits. δ 0.1875 gives L2's code-difference term
    # real-features' 16-bit weight (and its similarity terms 1/16 of it); δ 0.01 made no detectable difference.
    "real-features-per-sample": {
        **REAL_FEATURES,
        "per_sample_codes": True,
        "lam": 1.0,
        "delta": 0.1875,
    },
    # The plain-S reference (agch-train --method plain-s; docs/trainer.md): AGCH's own S (C ⊙ D, 2S − 1, ρ 4,
    # standardised features, γ 1 and 1) driving two one-hidden-layer MLP encoders of 512 units with Adam 1e-3, batch
    # 128, 60 epochs, L1 + ‖S − B^v B^tᵀ‖² (means) + 0.1 quantisation: no GCN, no fusion, no λ term, no weight decay.
    "plain-s": {
        "feature_norm": "standardize",
        "optimizer": "adam",
        "gamma_v": 1.0,
        "gamma_t": 1.0,
        "image_hidden": 512,
        "text_hidden": 512,
        "lr_image": 1e-3,
        "lr_text": 1e-3,
        "weight_decay": 0.0,
        "batch_size": 128,
        "epochs": 60,
        "no_gcn": True,
        "no_fusion": True,
        "lam": 0.0,
        "fixes": {"quantization": True},
    },
    # The debugging log's final state: every fix on, sqrt distance, lower L3 weights that came with fixes 4 and 5.
    "debug-log": {
        "distance": "sqrt",
        "batch_size": 128,
        "beta": 0.1,
        "lam": 1.0,
        "fixes": {name: True for name in FIX_NAMES},
    },
}


def field_names() -> list[str]:
    """All settable keys: config fields and `fixes.<name>`."""
    return [f.name for f in fields(Config) if f.name != "fixes"] + [f"fixes.{n}" for n in FIX_NAMES]


def fix_name(name: str, where: str = "") -> str:
    """Canonical fix name from 'text-input' / 'text_input'; unknown names raise with the list of known fixes."""
    canon = FIX_ALIASES.get(name, name)
    if canon not in FIX_NAMES:
        raise unknown("fix", name, FIX_ALIASES, where)
    return canon


def _coerce(key: str, value: Any, current: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the type of the field it replaces."""
    loc = f"{where}: " if where else ""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("on", "true", "1", "yes"):
            return True
        if text in ("off", "false", "0", "no"):
            return False
        raise UserError(f"{loc}{key} must be on/off (true/false), got {value!r}")
    try:
        if isinstance(current, int):
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if isinstance(current, float):
            return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if isinstance(current, int) else "a number"
        raise UserError(f"{loc}{key} must be {kind}, got {value!r}") from None
    return str(value)


def apply(config: Config, overrides: dict[str, Any], where: str = "") -> Config:
    """Return `config` with `overrides` applied and validated.

    Keys are field names or `fixes.<name>`; a `fixes` key may also hold a mapping of fix names. Unknown keys raise
    with the closest match.

    Example:
        >>> apply(Config(), {"delta": 1.0, "fixes.alignment": "on"}).fixes.alignment
        True
    """
    changes: dict[str, Any] = {}
    fix_changes: dict[str, bool] = {}
    for key, value in flat_overrides(overrides, where).items():
        if key.startswith("fixes."):
            fix_changes[key.split(".", 1)[1]] = _coerce(key, value, True, where)
        elif key in field_names():
            changes[key] = _coerce(key, value, getattr(config, key), where)
        else:
            raise unknown("config key", key, field_names(), where)
    fixes = dataclasses.replace(config.fixes, **fix_changes)
    result = dataclasses.replace(config, **changes, fixes=fixes)
    validate(result, where)
    return result


def flat_overrides(overrides: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`overrides` with a `fixes` mapping and every `fixes.<alias>` as canonical `fixes.<name>` keys, so that layers
    of overrides merge key by key (a later layer's fix replaces an earlier one's).

    Example:
        >>> flat_overrides({"fixes": {"text-input": "on"}, "delta": 1})
        {'fixes.text_input': 'on', 'delta': 1}
    """
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "fixes" and isinstance(value, dict):
            out.update({f"fixes.{fix_name(str(name), where)}": on for name, on in value.items()})
        elif key.startswith("fixes."):
            out[f"fixes.{fix_name(key.split('.', 1)[1], where)}"] = value
        else:
            out[key] = value
    return out


def preset(name: str, where: str = "") -> Config:
    """The named preset as a Config (a key of PRESETS; an unknown name is a UserError naming `where`)."""
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS, where)
    return apply(Config(), PRESETS[name], where=f"preset {name}")


def validate(config: Config, where: str = "") -> None:
    """Raise UserError for values outside their allowed range."""
    need(4 <= config.bits <= 1024, where, f"bits must be in [4, 1024], got {config.bits}")
    need(config.epochs >= 1, where, f"epochs must be >= 1, got {config.epochs}")
    need(config.batch_size >= 2, where, f"batch_size must be >= 2 (S needs pairs), got {config.batch_size}")
    need(config.eval_every >= 1, where, f"eval_every must be >= 1, got {config.eval_every}")
    need(config.topk >= 1, where, f"topk must be >= 1, got {config.topk}")
    need(config.rho > 0, where, f"rho must be > 0, got {config.rho}")
    need(0.0 <= config.sim_mix <= 1.0, where, f"sim_mix must be in [0, 1], got {config.sim_mix}")
    need(config.image_hidden >= 0, where, f"image_hidden must be >= 0, got {config.image_hidden}")
    need(config.text_hidden >= 1 and config.gcn_hidden >= 1, where, "text_hidden and gcn_hidden must be >= 1")
    need(1 <= config.gcn_layers <= 8, where, f"gcn_layers must be in [1, 8], got {config.gcn_layers}")
    need(0.0 <= config.momentum < 1.0, where, f"momentum must be in [0, 1), got {config.momentum}")
    for name in ("gamma_v", "gamma_t", "alpha", "beta", "lam", "delta", "align_weight", "quant_weight",
                 "balance_weight", "weight_decay"):
        value = getattr(config, name)
        need(math.isfinite(value) and value >= 0, where, f"{name} must be a finite number >= 0, got {value}")
    need(config.gamma_v + config.gamma_t > 0, where, "gamma_v and gamma_t cannot both be 0")
    need(not (config.no_c and config.no_d), where, "no_c and no_d cannot both be on: S needs C or D")
    for name in ("lr_image", "lr_text", "lr_gcn", "lr_fusion"):
        value = getattr(config, name)
        need(math.isfinite(value) and value > 0, where, f"{name} must be a finite number > 0, got {value}")
    for name, allowed in CHOICES.items():
        value = getattr(config, name)
        need(value in allowed, where, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def to_flat(config: Config) -> dict[str, Any]:
    """Flat {key: value} with `fixes.<name>` keys: the form logged as MLflow params and written to YAML."""
    flat = {k: v for k, v in dataclasses.asdict(config).items() if k != "fixes"}
    flat.update({f"fixes.{n}": getattr(config.fixes, n) for n in FIX_NAMES})
    return flat


def from_flat(flat: dict[str, Any], base: str = "paper") -> Config:
    """Inverse of to_flat (values may be strings, as MLflow returns them)."""
    return layered(base, [Layer(flat, "")])


@dataclass(frozen=True)
class Layer:
    """One source of settings: config keys (flat, `fixes.<name>`, or a `fixes` mapping) and where they come from,
    which errors name (a file and its key, `--set`, `trial params`)."""

    values: dict[str, Any]
    where: str


def layered(preset_name: str, layers: Iterable[Layer] = (), where: str = "") -> Config:
    """The one layering of settings: the preset, then each layer in order, a later one winning key by key, each
    validated as it is applied. Every command (preset → file → --set → --fix → --seed, agch.cli.common), every
    search-space and ablation file, every trial and a search's test run build their configs with it. `where` names
    where the preset's name came from, for the error an unknown one raises."""
    config = preset(preset_name, where)
    for layer in layers:
        config = apply(config, layer.values, where=layer.where)
    return config


def layered_keys(layers: Iterable[Layer]) -> dict[str, Any]:
    """The layers' keys merged in order (later wins), `fixes` spelled as `fixes.<name>`: what they set."""
    return {k: v for layer in layers for k, v in flat_overrides(layer.values, layer.where).items()}


TRAINER_VERSION = 2
"""Bumped whenever agch.method.train's results for a given config and dataset change (a fix to the losses, the encoders,
the evaluation, the seeding): part of every run's identity, so runs of an older trainer are never reused."""


def identity(config: Config, **context: Any) -> str:
    """Hash of everything that matters scientifically (not where results go), TRAINER_VERSION, plus context such as
    the dataset.

    Two runs with the same identity computed the same thing (given the same precision: see
    agch.method.train.precision_of); a recorded run with it can be reused.
    """
    flat = {k: v for k, v in to_flat(config).items()
            if k not in NON_SCIENTIFIC and not (k in ADDED_SWITCHES and v is False)}
    payload = json.dumps({"config": flat, "trainer": TRAINER_VERSION, "context": context}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_yaml(path: Path) -> Any:
    """Parse a YAML file; syntax errors name the file and line."""
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: malformed YAML: {getattr(err, 'problem', err)}") from None
