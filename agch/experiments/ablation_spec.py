"""Ablation files: their schema and validation, the designs and defaults, and the per-trial resources.

An ablation switches factors on a base config and trains every resulting config ("cell") with the same seeds, so
each factor can be judged by a paired comparison (agch.experiments.statistics). A factor is one of the debugging
log's fixes
(agch.config.Fixes, off/on) or any other config key between two values (`toggles`: off value, on value), such as
feature_norm none vs standardize.

Designs (each switches the ablation's factors; the base is a preset plus the file's overrides):
  one-fix        each factor on vs off, the other factors as the base has them (default base: paper)
  add-one-in     the base with every factor off, then each factor switched on alone (default base: paper)
  leave-one-out  the base with every factor on, then each factor switched off alone (default base: debug-log)
  factorial      every on/off combination of the factors; each factor's main effect (default base: paper)

A file may also name two datasets (`datasets: {alexnet: a.h5, vgg16: b.h5}`, off first): every cell then trains on
both, and the dataset is compared like a factor, paired by seed (e.g. AlexNet fc7 vs VGG16 fc7 image features of the
same pairs; agch.experiments.ablation checks that the datasets hold the same pairs, labels and split).

agch.experiments.ablation_plan expands a spec into cells and comparisons; agch.experiments.ablation runs the plan
and agch.experiments.ablation_report reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from agch import config as cfg
from agch.errors import UserError, need, unknown
from agch.experiments.file_schema import Schema, Where, shorthand, validate

DESIGNS: dict[str, str] = {
    "one-fix": "paper",
    "add-one-in": "paper",
    "leave-one-out": "debug-log",
    "factorial": "paper",
}
"""Each design and the preset it starts from unless the file or --preset names another."""

DEFAULT_SEEDS = 5
"""Seeds per cell unless told otherwise: the fewest with which a paired t interval is usefully narrow."""

DEFAULT_BUDGET: dict[str, Any] = {"epochs": 4, "eval_every": 4, "bits": 32, "text_hidden": 256, "gcn_hidden": 128}
"""The budget of `agch-ablate --fix NAME` without a file: 2 cells × 5 seeds finish in a few minutes on a 2-core
CPU on the default synthetic dataset (docs/ablation.md has the measured time). Override with --epochs / --set."""

DEFAULT_RESOURCES: dict[str, float] = {"cpu": 1.0}
"""Per trial. `gpu` unset means AUTO_GPU_FRACTION when this machine has a GPU, else none."""
AUTO_GPU_FRACTION = 0.25
"""Trials are small (architecture.md): four share one GPU unless the file or --gpus-per-trial says otherwise."""
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "ablations"


class DesignEntry(Schema):
    """`design: add-one-in` or, to give that design its own base, `design: {kind: add-one-in, preset: debug-log}`."""

    noun: ClassVar[str] = "design key"
    kind: str
    preset: str | None = None


class TrialResources(Schema):
    """What one trial asks of Ray."""

    noun: ClassVar[str] = "resource"
    cpu: float = Field(DEFAULT_RESOURCES["cpu"], ge=0)
    gpu: float | None = Field(None, ge=0)


class AblationFile(Schema):
    """An ablation file as written (docs/ablation.md)."""

    noun: ClassVar[str] = "ablation key"
    name: str = Field(min_length=1, description="a non-empty string")
    description: str = ""
    design: Annotated[list[Annotated[DesignEntry, shorthand(str, "kind")]], shorthand((str, dict))] = Field(
        min_length=1, description=f"one of {', '.join(DESIGNS)}, a {{kind, preset}} mapping or a list of them")
    preset: str | None = None
    fixes: Annotated[list[str], shorthand(str)] = Field(
        [], description=f"a fix or a list of fixes ({', '.join(cfg.FIX_ALIASES)})")
    toggles: dict[str, Any] = Field({}, description="a mapping of config keys to [off value, on value]")
    overrides: dict[str, Any] = Field({}, description="a mapping of config keys")
    seeds: int | list[int] = Field(DEFAULT_SEEDS, description="a count (e.g. 5) or a list of integers")
    dataset: str | None = None
    datasets: dict[str, str] = Field({}, description="a mapping of two names to dataset files")
    bits: Any = None
    epochs: Any = None
    resources: TrialResources = TrialResources()
    max_concurrent: int | None = Field(None, ge=1, description="an integer >= 1")


@dataclass(frozen=True)
class Design:
    """One design and the preset its base starts from."""

    kind: str
    preset: str


@dataclass(frozen=True)
class Factor:
    """One thing an ablation switches: a config key between an off and an on value (a fix: fixes.NAME False/True)."""

    name: str
    """the fix's name (alignment) or the config key (feature_norm)."""
    key: str
    """the flat config key (fixes.alignment, feature_norm)."""
    off: Any
    on: Any

    @staticmethod
    def fix(name: str) -> Factor:
        return Factor(name, f"fixes.{name}", False, True)

    def state(self, config: cfg.Config) -> str:
        """This factor's setting in `config` for labels: '+alignment' / '-alignment', 'feature_norm=standardize'."""
        value = cfg.to_flat(config)[self.key]
        if self.key.startswith("fixes."):
            return ("+" if value else "-") + self.name.replace("_", "-")
        return f"{self.name}={value}"

    def describe(self) -> str:
        """'alignment' for a fix, 'feature_norm none->standardize' for a toggle."""
        return self.name.replace("_", "-") if self.key.startswith("fixes.") else f"{self.name} {self.off}->{self.on}"


@dataclass(frozen=True)
class AblationSpec:
    """A validated ablation file (or the equivalent built from the command line)."""

    name: str
    designs: tuple[Design, ...]
    fixes: tuple[str, ...]
    """the toggled fixes (canonical names, file order)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """config keys applied to every design's preset (bits and epochs included); never a switched key or seed."""
    toggles: tuple[Factor, ...] = ()
    """the other config keys switched between two values (file order, after the fixes)."""
    seeds: tuple[int, ...] = tuple(range(DEFAULT_SEEDS))
    dataset: Path | None = None
    resources: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    max_concurrent: int | None = None
    """trials at once; None: as many as the resources allow."""
    description: str = ""
    datasets: tuple[tuple[str, Path], ...] = ()
    """(name, path) of the two compared datasets, off first; () for one dataset (`dataset` or --data)."""

    @property
    def factors(self) -> tuple[Factor, ...]:
        """Every switched factor: the fixes, then the toggles."""
        return tuple(Factor.fix(f) for f in self.fixes) + self.toggles

    def to_dict(self) -> dict[str, Any]:
        """The normalised file form (logged as ablation.yaml on the parent run)."""
        return {"name": self.name, "description": self.description,
                "design": [{"kind": d.kind, "preset": d.preset} for d in self.designs],
                "fixes": [f.replace("_", "-") for f in self.fixes],
                "toggles": {t.name: [t.off, t.on] for t in self.toggles}, "overrides": dict(self.overrides),
                "seeds": list(self.seeds), "dataset": str(self.dataset) if self.dataset else None,
                "datasets": {name: str(path) for name, path in self.datasets},
                "resources": dict(self.resources), "max_concurrent": self.max_concurrent}


# ---------------------------------------------------------------- validation


def seeds_from(value: int | list[int], where: str) -> tuple[int, ...]:
    """`seeds: 5` → (0..4); `seeds: [3, 7]` → (3, 7). At least one, no repeats."""
    if isinstance(value, int):
        need(value >= 1, where, f"must be >= 1 (>= 2 for a verdict), got {value}")
        return tuple(range(value))
    need(bool(value), where, "must list at least one seed")
    need(len(set(value)) == len(value), where, f"lists a seed twice: {value}")
    return tuple(value)


def designs_from(entries: list[DesignEntry], preset: str | None, where: Where) -> tuple[Design, ...]:
    """Each design and its base preset: its own, else the file's `preset`, else the design's default."""
    designs = []
    for i, entry in enumerate(entries):
        at = where("design", i)
        if entry.kind not in DESIGNS:
            raise unknown("design", entry.kind, DESIGNS, at)
        chosen = entry.preset or preset or DESIGNS[entry.kind]
        cfg.preset(chosen, f"{at} ({entry.kind} needs a base preset)")  # an unknown one is an error here
        designs.append(Design(entry.kind, chosen))
    return tuple(dict.fromkeys(designs))


def toggle_list(value: dict[str, Any], where: str) -> tuple[Factor, ...]:
    """`{feature_norm: [none, standardize], batch_size: [32, 128]}` (off value, on value) as factors; each value is
    checked as that config key would be."""
    factors = []
    for key, pair in value.items():
        key = str(key)
        if key.startswith("fixes") or key not in cfg.field_names():
            known = [k for k in cfg.field_names() if not k.startswith("fixes.")]
            raise unknown("toggled config key (fixes go under 'fixes')", key, known, where)
        if key == "seed":
            raise UserError(f"{where}: seed cannot be toggled (the ablation sets it from 'seeds')")
        if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1]:
            raise UserError(f"{where}: {key} needs two different values [off, on], got {pair!r}")
        off, on = (cfg.to_flat(cfg.apply(cfg.Config(), {key: v}, where=f"{where}.{key}"))[key] for v in pair)
        factors.append(Factor(key, key, off, on))
    return tuple(factors)


def fixed_fixes(overrides: dict[str, Any], where: str = "") -> set[str]:
    """Fixes an override mapping sets to a fixed value (`fixes.NAME` keys or a `fixes:` mapping)."""
    out = set()
    for key, value in overrides.items():
        if key == "fixes" and isinstance(value, dict):
            out.update(cfg.fix_name(str(k), where) for k in value)
        elif key.startswith("fixes."):
            out.add(cfg.fix_name(key.split(".", 1)[1], where))
    return out


def check_not_fixed(factors: tuple[Factor, ...], overrides: dict[str, Any], source: str) -> None:
    """A switched factor cannot also be held fixed (in `source`): the two settings contradict each other."""
    held = {f"fixes.{f}" for f in fixed_fixes(overrides, source)} | {k for k in overrides if not k.startswith("fixes")}
    both = [f for f in factors if f.key in held]
    if both:
        kind = "fix" if both[0].key.startswith("fixes.") else "config key"
        raise UserError(f"{kind} '{both[0].name.replace('_', '-')}' is both toggled and held fixed (in {source}); "
                        "drop one: an ablation cannot switch what it also fixes")


def parse_spec(raw: Any, where: str | Where, relative_to: Path | None = None) -> AblationSpec:
    """Validate an ablation file's mapping; every error names the file (and line, given a Where with the file's
    text) and key and what is allowed."""
    where = where if isinstance(where, Where) else Where(where)
    doc = validate(AblationFile, raw, where)
    need(bool(doc.fixes or doc.toggles or doc.datasets), where(), "missing 'fixes' (or 'toggles' or 'datasets'): "
         "nothing to switch")
    overrides = dict(doc.overrides)
    for key in ("bits", "epochs"):
        if getattr(doc, key) is not None:
            need(key not in overrides, where(key), f"'{key}' is given both at the top level and in overrides; keep one")
            overrides[key] = getattr(doc, key)
    fixes = tuple(cfg.fix_name(name, where("fixes", i)) for i, name in enumerate(doc.fixes))
    need(len(set(fixes)) == len(fixes), where("fixes"), f"a fix is listed twice: {', '.join(doc.fixes)}")
    toggles = toggle_list(doc.toggles, where("toggles"))
    check_not_fixed(tuple(Factor.fix(f) for f in fixes) + toggles, overrides, f"{where.source} overrides")
    need("seed" not in overrides, where("overrides", "seed"), "'seed' cannot be an override; the ablation sets it "
         "from 'seeds'")
    cfg.apply(cfg.Config(), overrides, where=where("overrides"))  # unknown keys / bad values fail here
    dataset = None if doc.dataset is None else _path(doc.dataset, relative_to)
    datasets = dataset_list(doc.datasets, where("datasets"), relative_to)
    need(not (datasets and dataset is not None), where(), "give 'dataset' (one) or 'datasets' (two to compare), "
         "not both")
    return AblationSpec(
        name=doc.name, description=doc.description.strip(), designs=designs_from(doc.design, doc.preset, where),
        fixes=fixes, toggles=toggles, overrides=overrides, seeds=seeds_from(doc.seeds, where("seeds")),
        dataset=dataset, resources=_asked(doc.resources, where("resources")), max_concurrent=doc.max_concurrent,
        datasets=datasets)


def _path(value: str, relative_to: Path | None) -> Path:
    path = Path(value).expanduser()
    return relative_to / path if not path.is_absolute() and relative_to is not None else path


def dataset_list(value: dict[str, str], where: str, relative_to: Path | None = None) -> tuple[tuple[str, Path], ...]:
    """`{alexnet: a.h5, vgg16: b.h5}`: two named dataset files, the first the 'off' side of the comparison."""
    if not value:
        return ()
    need(len(value) == 2 and all(value.values()), where, "expected two named dataset files, off first, e.g. "
         f"{{alexnet: data/mirflickr-alexnet.h5, vgg16: data/mirflickr-vgg16.h5}}; got {value!r}")
    paths = tuple((str(name), _path(path, relative_to)) for name, path in value.items())
    need(paths[0][1].resolve() != paths[1][1].resolve(), where,
         f"both names point at {paths[0][1]}; a comparison needs two different files")
    return paths


def check_resources(resources: dict[str, Any], where: str) -> dict[str, float]:
    """{cpu, gpu} per trial (cpu 1 unless given; gpu left out unless given), numbers >= 0, not both 0."""
    return _asked(validate(TrialResources, resources, Where(where)), where)


def _asked(resources: TrialResources, where: str) -> dict[str, float]:
    """What a trial asks for: cpu, and gpu when given; not nothing."""
    asked = resources.model_dump(exclude_none=True)
    need(any(asked.values()), where, "a trial must ask for some cpu or gpu")
    return asked


def trial_resources(resources: dict[str, float], device: str) -> dict[str, float]:
    """The spec's resources with `gpu` filled in when unset: a fraction of a GPU when one is here and allowed."""
    if "gpu" in resources:
        return dict(resources)
    import torch

    gpu = AUTO_GPU_FRACTION if device != "cpu" and torch.cuda.is_available() else 0.0
    return dict(resources, gpu=gpu)


def resolve_spec_path(arg: str) -> Path:
    """A user's path, or a shipped file named as `ablations/NAME.yaml`, `NAME.yaml` or `NAME`."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = SHIPPED_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")) if SHIPPED_DIR.is_dir() else []
    raise UserError(f"ablation file not found: {arg} (shipped: {', '.join(known) or 'none'})")


def load_spec(path: Path) -> AblationSpec:
    """Read and validate an ablation YAML file."""
    raw = cfg.load_yaml(path)  # syntax errors name the file and line
    return parse_spec(raw, Where(path, path.read_text()), relative_to=path.parent)
