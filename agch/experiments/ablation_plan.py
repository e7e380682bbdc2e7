"""An ablation's plan: its spec's designs expanded into cells (configs) and paired comparisons, and the cell and
trial identities that find recorded runs. The spec itself (file schema, designs, defaults):
agch.experiments.ablation_spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agch import config as cfg
from agch.experiments.ablation_spec import AblationSpec, Design, Factor



@dataclass(frozen=True)
class Cell:
    """One config of the ablation, trained once per seed. `config.seed` is a placeholder (0)."""

    identity: str
    label: str
    config: cfg.Config
    dataset: str = ""
    """its dataset's name in spec.datasets; "" when the ablation has one dataset."""


@dataclass(frozen=True)
class Comparison:
    """Factor on vs off: cell identities on each side, matched position by position (same context)."""

    name: str
    factor: str
    design: str
    on: tuple[str, ...]
    off: tuple[str, ...]


@dataclass(frozen=True)
class Trial:
    """One cell × seed. `identity` is the agch.identity tag its MLflow run carries."""

    cell: str
    seed: int
    identity: str


@dataclass(frozen=True)
class Plan:
    """Everything an ablation will train and compare."""

    spec: AblationSpec
    dataset_identities: dict[str, str]
    """dataset name ("" for the one dataset) -> its content identity."""
    cells: dict[str, Cell]
    comparisons: tuple[Comparison, ...]
    grid_keys: tuple[str, ...] = ()
    """config keys besides the factors whose values differ between cells of one Tune grid (agch-table: bits)."""

    @property
    def dataset_identity(self) -> str:
        """The identity of the (first) dataset."""
        return next(iter(self.dataset_identities.values()))

    def trials(self) -> list[Trial]:
        """Every cell × seed, cells in plan order."""
        return [Trial(c.identity, s, trial_identity(c.config, s, self.dataset_identities[c.dataset]))
                for c in self.cells.values() for s in self.spec.seeds]

    @property
    def identity(self) -> str:
        """Hash of what this ablation computes and compares: finds an interrupted run of the same plan."""
        payload = json.dumps({"trials": sorted(t.identity for t in self.trials()),
                              "comparisons": [dataclasses.astuple(c) for c in self.comparisons]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cell_identity(config: cfg.Config, dataset_identity: str) -> str:
    """The config's identity without its seed (every seed of a cell shares it), on one dataset."""
    return cfg.identity(dataclasses.replace(config, seed=0), dataset=dataset_identity, scope="cell")


def trial_identity(config: cfg.Config, seed: int, dataset_identity: str) -> str:
    """Exactly the agch.identity tag that agch.runs.record.run_tags puts on the run of this cell with this seed."""
    return cfg.identity(dataclasses.replace(config, seed=seed), dataset=dataset_identity)


def with_settings(config: cfg.Config, settings: dict[str, Any]) -> cfg.Config:
    """`config` with the given flat keys (fixes.NAME, feature_norm, ...) set."""
    return cfg.apply(config, settings)


def switched(factors: dict[Factor, bool]) -> dict[str, Any]:
    """{factor: on?} as the flat settings it means."""
    return {f.key: f.on if on else f.off for f, on in factors.items()}


def cell_label(design: Design, config: cfg.Config, factors: tuple[Factor, ...]) -> str:
    """'paper[+alignment -balance feature_norm=standardize]': the base preset and the factors' settings."""
    return f"{design.preset}[{' '.join(f.state(config) for f in factors)}]"


def design_cells(design: Design, base: cfg.Config, factors: tuple[Factor, ...]) -> Iterator[tuple[Factor, cfg.Config,
                                                                                                 cfg.Config]]:
    """(factor, on-config, off-config) for every comparison a design makes; factorial yields one per context."""
    def on_off(config: cfg.Config, factor: Factor) -> tuple[cfg.Config, cfg.Config]:
        return (with_settings(config, switched({factor: True})), with_settings(config, switched({factor: False})))

    if design.kind == "one-fix":
        for factor in factors:
            yield factor, *on_off(base, factor)
    elif design.kind == "add-one-in":
        start = with_settings(base, switched({f: False for f in factors}))
        for factor in factors:
            yield factor, on_off(start, factor)[0], start
    elif design.kind == "leave-one-out":
        start = with_settings(base, switched({f: True for f in factors}))
        for factor in factors:
            yield factor, start, on_off(start, factor)[1]
    else:  # factorial: each factor against every combination of the others
        for factor in factors:
            others = [f for f in factors if f != factor]
            for states in itertools.product((False, True), repeat=len(others)):
                yield factor, *on_off(with_settings(base, switched(dict(zip(others, states)))), factor)


def build_plan(spec: AblationSpec, dataset_identity: str | dict[str, str]) -> Plan:
    """Expand every design into cells (shared cells deduplicated by identity) and comparisons.

    `dataset_identity`: the dataset's identity, or {name: identity} of the two datasets of spec.datasets. With two,
    every cell trains on both, each factor is compared on each dataset, and each design adds the comparison
    'dataset OFF->ON' over its cells (just the base when it switches nothing else), matched cell by cell.
    """
    identities = dataset_identity if isinstance(dataset_identity, dict) else {"": dataset_identity}
    cells: dict[str, Cell] = {}
    comparisons: list[Comparison] = []

    def add(design: Design, config: cfg.Config, dataset: str) -> str:
        key = cell_identity(config, identities[dataset])
        label = cell_label(design, config, spec.factors) + (f" @{dataset}" if dataset else "")
        cells.setdefault(key, Cell(key, label, config, dataset))
        return key

    for design in spec.designs:
        base = cfg.layered(design.preset, [cfg.Layer({**cfg.SELECTION_DEFAULTS, **spec.overrides},
                                                     f"ablation {spec.name}: overrides")])
        configs = {cell_identity(c, ""): c for _, *pair in design_cells(design, base, spec.factors) for c in pair}
        for dataset in identities:
            sides: dict[Factor, tuple[list[str], list[str]]] = {}
            for factor, on, off in design_cells(design, base, spec.factors):
                on_ids, off_ids = sides.setdefault(factor, ([], []))
                on_ids.append(add(design, on, dataset))
                off_ids.append(add(design, off, dataset))
            where = f", on {dataset}" if dataset else ""
            for factor, (on_ids, off_ids) in sides.items():
                comparisons.append(Comparison(f"{factor.describe()} ({design.kind}, {design.preset}{where})",
                                              factor.name, design.kind, tuple(on_ids), tuple(off_ids)))
        if len(identities) == 2:
            off_name, on_name = identities
            matched = list(configs.values()) or [base]
            comparisons.append(Comparison(f"dataset {off_name}->{on_name} ({design.kind}, {design.preset})", "dataset",
                                          design.kind, tuple(add(design, c, on_name) for c in matched),
                                          tuple(add(design, c, off_name) for c in matched)))
    return Plan(spec, identities, cells, tuple(comparisons))
