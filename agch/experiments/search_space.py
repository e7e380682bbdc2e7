"""Search-space files: their schema, validation with file/line/key errors, and the sampler and scheduler they name.

A space file (docs/search.md, search_spaces/*.yaml) names a preset, fixed overrides, the searched parameters (the
paper's names: delta = δ, gamma_v / gamma_t = γ, lam = λ, alpha = α, beta = β), the sampler, the scheduler and its
budget in epochs, and the objective. `load_space` validates it; agch.experiments.search runs it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from agch import config as cfg
from agch.errors import UserError, need, unknown
from agch.experiments.file_schema import Schema, Where, shorthand, validate

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
"""The search spaces shipped with the source tree; `spaces/NAME.yaml` on the command line means one of them."""
SAMPLERS = {"tpe": "TPESampler", "cmaes": "CmaEsSampler", "gp": "GPSampler", "random": "RandomSampler",
            "qmc": "QMCSampler", "grid": "GridSampler"}
SCHEDULERS = ("asha", "none")
NOT_SEARCHABLE = {"epochs": "the budget: set scheduler.epochs",
                  "seed": "set it with fixed.seed (or --seed) and 'seeds'"}


class ParameterSpec(Schema):
    """A searched parameter as written: a range (low, high, optionally log or step) or `choices` (a list alone)."""

    noun: ClassVar[str] = "parameter key"
    type: Literal["float", "int", "categorical"] | None = None
    """None: categorical with choices, else the config key's own type."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


class SamplerSpec(Schema):
    noun: ClassVar[str] = "key in sampler"
    name: str = "tpe"
    seed: int = 0
    options: dict[str, Any] = Field({}, description="a mapping of sampler arguments")


class SchedulerSpec(Schema):
    noun: ClassVar[str] = "key in scheduler"
    name: str = "none"
    epochs: int | None = Field(None, ge=1)
    """the budget; None: the base config's epochs."""
    grace_period: int = 1
    reduction_factor: float = Field(2.0, gt=1)
    stop_on_collapse: bool = True


class ResourcesSpec(Schema):
    noun: ClassVar[str] = "key in resources"
    cpus: float = Field(1.0, gt=0)
    gpus: float = 0.0


class ObjectiveSpec(Schema):
    noun: ClassVar[str] = "key in objective"
    metric: str | None = None
    metrics: list[str] | None = Field(None, min_length=1, max_length=2, description="a list of one or two metrics")
    mode: Literal["max", "min"] = "max"


class SpaceFile(Schema):
    """A space file as written (docs/search.md)."""

    description: str = ""
    preset: str = "paper"
    fixed: dict[str, Any] = Field({}, description="a mapping of config keys")
    dataset: str | None = None
    parameters: dict[str, Annotated[ParameterSpec, shorthand(list, "choices")]] = Field(
        min_length=1, description="a mapping of at least one config key to a range or a list of choices")
    sampler: Annotated[SamplerSpec, shorthand(str, "name")] = SamplerSpec()
    scheduler: Annotated[SchedulerSpec, shorthand(str, "name")] = SchedulerSpec()
    trials: int = Field(10, ge=1)
    concurrency: int = Field(1, ge=1)
    resources: ResourcesSpec = ResourcesSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    seeds: int = Field(1, ge=1)
    time_budget: Any = None
    """seconds or a duration like '30m' (_duration)."""


@dataclass(frozen=True)
class Parameter:
    """One searched config key: a float/int range (optionally log or stepped) or a list of choices."""

    name: str
    kind: str
    """'float', 'int' or 'categorical'."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna import distributions as dist

        if self.kind == "categorical":
            return dist.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return dist.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return dist.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list | None:
        """Every value a grid search visits, or None for a continuous range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.step is None:
            return None if self.kind == "float" else list(range(int(self.low), int(self.high) + 1))
        count = int((self.high - self.low) / self.step + 1e-9) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search-space file plus command-line overrides: everything a search needs except where to log."""

    source: str
    """the space file's path (for messages)."""
    text: str
    """the file as written (logged as an artifact)."""
    preset: str
    base: dict
    """flat config every trial starts from: preset + fixed + command-line overrides, epochs = the budget."""
    parameters: list[Parameter]
    sampler: str
    sampler_seed: int
    sampler_options: dict
    scheduler: str
    epochs: int
    grace_period: int
    reduction_factor: float
    trials: int
    concurrency: int
    cpus: float
    gpus: float
    metrics: list[str]
    mode: str
    seeds: int
    dataset: str | None
    """absolute path, or None for the default synthetic dataset."""
    time_budget_s: float | None
    stop_on_collapse: bool = True
    """scheduler.stop_on_collapse: end a trial at its first evaluation whose codes collapsed and report that value
    (diagnostic-driven stopping; false trains every trial to the budget)."""
    notes: list[str] = field(default_factory=list)
    """adjustments made while loading (e.g. trials capped to the grid size), shown to the user."""


def resolve_space_path(arg: str) -> Path:
    """A user's file when it exists; else `spaces/NAME.yaml` is the shipped search_spaces/NAME.yaml."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = {p.stem: p for p in SHIPPED_DIR.glob("*.yaml")}
    parts = Path(arg).parts
    if len(parts) == 2 and parts[0] == "spaces" and arg.endswith(".yaml"):
        stem = Path(parts[1]).stem
        if stem not in shipped:
            raise unknown("shipped search space", f"spaces/{parts[1]}", [f"spaces/{s}.yaml" for s in shipped])
        return shipped[stem]
    raise UserError(f"search space file not found: {arg} (shipped ones: "
                    f"{', '.join(f'spaces/{s}.yaml' for s in sorted(shipped))})")


def _parameter(name: str, spec: ParameterSpec, base: cfg.Config, where: Where) -> Parameter:
    at = where("parameters", name)
    if name.startswith("fixes."):
        canon = "fixes." + cfg.fix_name(name.split(".", 1)[1], at)
    elif name in cfg.field_names():
        canon = name
    else:
        raise unknown("parameter", name, cfg.field_names(), at)
    need(canon not in NOT_SEARCHABLE, at, f"cannot be searched ({NOT_SEARCHABLE.get(canon)})")
    current = cfg.to_flat(base)[canon]
    numeric = isinstance(current, (int, float)) and not isinstance(current, bool)
    need(numeric or spec.choices is not None, at, f"is {type(current).__name__}-valued: give 'choices' "
         f"(e.g. choices: {[current]})")
    kind = spec.type or ("categorical" if spec.choices is not None or not numeric else type(current).__name__)
    check = lambda value, key: cfg.apply(base, {canon: value}, where=where("parameters", name, key))  # noqa: E731
    if kind == "categorical":
        choices = spec.choices
        need(bool(choices), where("parameters", name, "choices"),
             "a categorical parameter needs a non-empty list of choices")
        need(len({repr(c) for c in choices}) == len(choices), where("parameters", name, "choices"),
             f"has duplicates: {choices}")
        extra = sorted(spec.model_fields_set - {"type", "choices"})
        need(not extra, at, f"a categorical parameter takes only 'choices', not {', '.join(extra)}")
        for choice in choices:
            check(choice, "choices")
        return Parameter(canon, "categorical", choices=tuple(choices))
    need(numeric, at, f"is {type(current).__name__}-valued: give 'choices'")
    need(kind == "int" or isinstance(current, float), at, "is an integer setting: use type: int")
    need(spec.low is not None and spec.high is not None, at, f"a {kind} range needs low and high")
    if kind == "int":
        for key in ("low", "high", "step"):
            value = getattr(spec, key)
            need(value is None or value.is_integer(), where("parameters", name, key),
                 f"must be an integer, got {value}")
    low, high, step = (v if kind == "float" or v is None else int(v) for v in (spec.low, spec.high, spec.step))
    need(low != high, at, f"empty range: low == high == {low} (use fixed: for a constant)")
    need(low < high, at, f"inverted range: low {low} > high {high}")
    need(not spec.log or low > 0, where("parameters", name, "low"), f"a log range needs low > 0, got {low}")
    if step is not None:
        need(not spec.log, where("parameters", name, "step"), "step and log cannot be combined")
        need(0 < step <= high - low, where("parameters", name, "step"), f"must be in (0, high - low], got {step}")
    check(low, "low")
    check(high, "high")
    return Parameter(canon, kind, low=low, high=high, log=spec.log, step=step)


def _duration(value: Any, where: str) -> float | None:
    """Seconds from a number or '90s' / '30m' / '2h'."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    need(match is not None and not isinstance(value, bool), where,
          f"must be seconds or a duration like 90s, 30m, 2h; got {value!r}")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    need(seconds > 0, where, "must be > 0")
    return seconds


def load_space(arg: str, *, layers: list[cfg.Layer] = (), preset: str | None = None, trials: int | None = None,
               epochs: int | None = None, dataset: Path | None = None) -> SearchSpace:
    """Read and validate a space file; the command line's settings (`layers`, agch.cli.common.config_layers) win over
    the file's `fixed`.

    Example:
        >>> space = load_space("spaces/delta_gamma.yaml", trials=2, epochs=1)  # doctest: +SKIP
        >>> [p.name for p in space.parameters]  # doctest: +SKIP
        ['delta', 'gamma_v', 'gamma_t']
    """
    path = resolve_space_path(arg)
    raw = cfg.load_yaml(path)  # syntax errors name the file and line
    text = path.read_text()
    where = Where(path, text)
    doc = validate(SpaceFile, raw, where)
    preset_name = preset or doc.preset
    need("epochs" not in doc.fixed, where("fixed", "epochs"), "the budget in epochs is scheduler.epochs")
    base = cfg.layered(preset_name, [cfg.Layer({"eval_every": 1, **cfg.SELECTION_DEFAULTS, **doc.fixed},
                                               where("fixed")), *layers], where=where("preset"))

    parameters = [_parameter(name, spec, base, where) for name, spec in doc.parameters.items()]
    names = [p.name for p in parameters]
    need(len(set(names)) == len(names), where("parameters"), f"a parameter is listed twice: {names}")
    for name in set(names) & set(cfg.layered_keys([cfg.Layer(doc.fixed, where("fixed")), *layers])):
        raise UserError(f"{where('parameters', name)}: is searched, so it cannot also be fixed or set")

    sampler, scheduler, objective = doc.sampler, doc.scheduler, doc.objective
    if sampler.name not in SAMPLERS:
        raise unknown("sampler", sampler.name, SAMPLERS, where("sampler", "name"))
    if scheduler.name not in SCHEDULERS:
        raise unknown("scheduler", scheduler.name, SCHEDULERS, where("scheduler", "name"))
    budget, grace = _budget(scheduler, base.epochs, epochs, where)
    base = cfg.apply(base, {"epochs": budget})
    metrics = _objective(objective, base.topk, where)
    gpus = doc.resources.gpus
    need(gpus >= 0 and (gpus <= 1 or gpus.is_integer()), where("resources", "gpus"),
         f"must be a fraction in [0, 1] or a whole number of GPUs, got {gpus}")
    need(trials is None or trials >= 1, "--trials", f"must be >= 1, got {trials}")
    dataset = dataset or (None if doc.dataset in (None, "default") else (path.parent / doc.dataset).resolve())

    space = SearchSpace(source=str(path), text=text, preset=preset_name, base=cfg.to_flat(base),
                        parameters=parameters, sampler=sampler.name, sampler_seed=sampler.seed,
                        sampler_options=sampler.options, scheduler=scheduler.name, epochs=budget,
                        grace_period=grace, reduction_factor=scheduler.reduction_factor,
                        trials=doc.trials if trials is None else trials, concurrency=doc.concurrency,
                        cpus=doc.resources.cpus, gpus=gpus, metrics=metrics, mode=objective.mode, seeds=doc.seeds,
                        dataset=str(dataset) if dataset else None,
                        time_budget_s=_duration(doc.time_budget, where("time_budget")),
                        stop_on_collapse=scheduler.stop_on_collapse)
    return _check_sampler(space, where)


def _budget(scheduler: SchedulerSpec, preset_epochs: int, epochs: int | None, where: Where) -> tuple[int, int]:
    """(epochs, grace period): the file's scheduler.epochs (else the preset's), --epochs over it, the grace period
    lowered to fit."""
    budget, grace = scheduler.epochs or preset_epochs, scheduler.grace_period
    need(1 <= grace <= budget, where("scheduler", "grace_period"), f"must be in [1, epochs={budget}], got {grace}")
    if epochs is not None:
        need(epochs >= 1, "--epochs", f"must be >= 1, got {epochs}")
        budget, grace = epochs, min(grace, epochs)
    return budget, grace


def _objective(objective: ObjectiveSpec, topk: int, where: Where) -> list[str]:
    """The objective's metric names (one or two), each one the trainer logs."""
    metrics = objective.metrics or [objective.metric or f"map{topk}_mean"]
    known = [f"map{topk}_{d}" for d in ("i2t", "t2i", "mean")] + [f"mapall_{d}" for d in ("i2t", "t2i", "mean")]
    for metric in metrics:
        if metric not in known:
            raise unknown("objective metric", metric, known, where("objective"))
    return metrics


def _check_sampler(space: SearchSpace, where: Where) -> SearchSpace:
    """Refuse combinations a sampler or scheduler cannot handle; cap a grid search's trials to its grid."""
    name, at = space.sampler, where("sampler", "name")
    kinds = {p.kind for p in space.parameters}
    if name == "cmaes":
        need("categorical" not in kinds, at, "CMA-ES cannot sample categorical parameters "
              f"({', '.join(p.name for p in space.parameters if p.kind == 'categorical')}); use tpe or gp")
        need(len(space.parameters) >= 2, at, "CMA-ES needs at least two parameters; use tpe or gp")
        need(len(space.metrics) == 1, at, "CMA-ES optimises one objective; use tpe for two")
        need(importlib.util.find_spec("cmaes") is not None, at, "CMA-ES needs the 'cmaes' package: pip install cmaes")
    if space.seeds > 1:
        need(space.scheduler == "none", where("seeds"), "several seeds per trial average whole runs; "
              "ASHA would stop some seeds early and bias the mean (use scheduler: none)")
    accepted = [p for p in inspect.signature(_sampler_class(name)).parameters if p not in ("seed", "search_space")]
    for option in space.sampler_options:
        if option not in accepted:
            raise unknown(f"{SAMPLERS[name]} option", str(option), accepted, where("sampler", "options", str(option)))
    if name == "grid":
        grids = {p.name: p.grid() for p in space.parameters}
        missing = [n for n, g in grids.items() if g is None]
        need(not missing, at, f"a grid needs choices or a step for every parameter; missing for {', '.join(missing)}")
        size = int(np.prod([len(values) for values in grids.values()]))
        if space.trials > size:
            note = f"trials capped to the grid size, {size}"
            space = dataclasses.replace(space, trials=size, notes=[*space.notes, note])
    try:
        make_sampler(space)
    except (TypeError, ValueError) as err:  # an option value the sampler refuses
        raise UserError(f"{where('sampler', 'options')}: {SAMPLERS[name]} refused it: {err}") from None
    return space


def _sampler_class(name: str) -> type:
    import optuna

    return getattr(optuna.samplers, SAMPLERS[name])


def make_sampler(space: SearchSpace) -> Any:
    """The seeded Optuna sampler the space names (options passed through to its constructor)."""
    options = dict(space.sampler_options)
    if space.sampler == "grid":
        options["search_space"] = {p.name: p.grid() for p in space.parameters}
    if space.sampler == "qmc":
        options.setdefault("scramble", True)  # an unscrambled Sobol sequence ignores the seed
    return _sampler_class(space.sampler)(seed=space.sampler_seed, **options)


def make_scheduler(space: SearchSpace) -> Any:
    """ASHA over epochs (time_attr 'epoch', reported by every trial), or None."""
    if space.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=space.epochs, grace_period=space.grace_period,
                         reduction_factor=space.reduction_factor)
