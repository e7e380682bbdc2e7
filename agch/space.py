"""Search-space files: their schema, validation with file/line/key errors, and the sampler and scheduler they name.

A space file (docs/search.md, search_spaces/*.yaml) names a preset, fixed overrides, the searched parameters (the
paper's names: delta = δ, gamma_v / gamma_t = γ, lam = λ, alpha = α, beta = β), the sampler, the scheduler and its
budget in epochs, and the objective. `load_space` validates it; agch.search runs it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agch import config as cfg
from agch.errors import UserError, need, unknown

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
"""The search spaces shipped with the source tree; `spaces/NAME.yaml` on the command line means one of them."""
SAMPLERS = {"tpe": "TPESampler", "cmaes": "CmaEsSampler", "gp": "GPSampler", "random": "RandomSampler",
            "qmc": "QMCSampler", "grid": "GridSampler"}
SCHEDULERS = ("asha", "none")
TOP_KEYS = ("description", "preset", "fixed", "dataset", "parameters", "sampler", "scheduler", "trials",
            "concurrency", "resources", "objective", "seeds", "time_budget")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
SECTION_KEYS = {"sampler": ("name", "seed", "options"),
                "scheduler": ("name", "epochs", "grace_period", "reduction_factor", "stop_on_collapse"),
                "resources": ("cpus", "gpus"), "objective": ("metric", "metrics", "mode")}
NOT_SEARCHABLE = {"epochs": "the budget: set scheduler.epochs",
                  "seed": "set it with fixed.seed (or --seed) and 'seeds'"}


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


class _Where:
    """Names a place in a YAML file as 'FILE line N: key.path', lines taken from the parsed node tree."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, {}

        def walk(node: Any, keys: tuple) -> None:
            if isinstance(node, yaml.MappingNode):
                for key_node, value in node.value:
                    sub = (*keys, str(key_node.value))
                    self.lines[sub] = key_node.start_mark.line + 1
                    walk(value, sub)

        walk(yaml.compose(text), ())

    def __call__(self, *keys: str) -> str:
        for cut in range(len(keys), 0, -1):
            if keys[:cut] in self.lines:
                return f"{self.path} line {self.lines[keys[:cut]]}: {'.'.join(keys)}"
        return f"{self.path}: {'.'.join(keys) or 'top level'}"


def _number(value: Any, where: str, *, integer: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    need(ok, where, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    return int(value) if integer else float(value)


def _section(doc: dict, name: str, where: _Where, default: Any) -> dict:
    value = doc.get(name, default)
    if isinstance(value, str) and name in ("sampler", "scheduler"):
        value = {"name": value}
    need(isinstance(value, dict), where(name), f"must be a mapping, got {value!r}")
    for key in value:
        if key not in SECTION_KEYS.get(name, value):
            raise unknown(f"key in {name}", str(key), SECTION_KEYS[name], where(name, str(key)))
    return value


def _parameter(name: str, spec: Any, base: cfg.Config, where: _Where) -> Parameter:
    at = where("parameters", name)
    if name.startswith("fixes."):
        canon = "fixes." + cfg.fix_name(name.split(".", 1)[1], at)
    elif name in cfg.field_names():
        canon = name
    else:
        raise unknown("parameter", name, cfg.field_names(), at)
    need(canon not in NOT_SEARCHABLE, at, f"cannot be searched ({NOT_SEARCHABLE.get(canon)})")
    current = cfg.to_flat(base)[canon]
    if isinstance(spec, list):
        spec = {"choices": spec}
    need(isinstance(spec, dict), at, "must be a mapping (type, low, high, log, step) or a list of choices")
    for key in spec:
        if key not in PARAM_KEYS:
            raise unknown("parameter key", str(key), PARAM_KEYS, where("parameters", name, str(key)))
    numeric = isinstance(current, (int, float)) and not isinstance(current, bool)
    need(numeric or "choices" in spec, at, f"is {type(current).__name__}-valued: give 'choices' "
          f"(e.g. choices: {[current]})")
    default_kind = "categorical" if "choices" in spec or not numeric else type(current).__name__
    kind = spec.get("type", default_kind)
    need(kind in ("float", "int", "categorical"), where("parameters", name, "type"),
          f"must be float, int or categorical, got {kind!r}")
    check = lambda value, key: cfg.apply(base, {canon: value}, where=where("parameters", name, key))  # noqa: E731
    if kind == "categorical":
        choices = spec.get("choices")
        need(isinstance(choices, list) and choices, where("parameters", name, "choices"),
              "a categorical parameter needs a non-empty list of choices")
        need(len({repr(c) for c in choices}) == len(choices), where("parameters", name, "choices"),
              f"has duplicates: {choices}")
        extra = sorted(set(spec) - {"type", "choices"})
        need(not extra, at, f"a categorical parameter takes only 'choices', not {', '.join(extra)}")
        for choice in choices:
            check(choice, "choices")
        return Parameter(canon, "categorical", choices=tuple(choices))
    need(numeric, at, f"is {type(current).__name__}-valued: give 'choices'")
    need(kind == "int" or isinstance(current, float), at, "is an integer setting: use type: int")
    integer = kind == "int"
    need("low" in spec and "high" in spec, at, f"a {kind} range needs low and high")
    low = _number(spec["low"], where("parameters", name, "low"), integer=integer)
    high = _number(spec["high"], where("parameters", name, "high"), integer=integer)
    need(low != high, at, f"empty range: low == high == {low} (use fixed: for a constant)")
    need(low < high, at, f"inverted range: low {low} > high {high}")
    log = spec.get("log", False)
    need(isinstance(log, bool), where("parameters", name, "log"), f"must be true or false, got {log!r}")
    need(not log or low > 0, where("parameters", name, "low"), f"a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, where("parameters", name, "step"), integer=integer)
        need(not log, where("parameters", name, "step"), "step and log cannot be combined")
        need(0 < step <= high - low, where("parameters", name, "step"), f"must be in (0, high - low], got {step}")
    check(low, "low")
    check(high, "high")
    return Parameter(canon, kind, low=low, high=high, log=log, step=step)


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


def load_space(arg: str, *, overrides: dict[str, Any] | None = None, preset: str | None = None,
               trials: int | None = None, epochs: int | None = None, dataset: Path | None = None) -> SearchSpace:
    """Read and validate a space file; command-line values (overrides = config keys) win over the file's.

    Example:
        >>> space = load_space("spaces/delta_gamma.yaml", trials=2, epochs=1)  # doctest: +SKIP
        >>> [p.name for p in space.parameters]  # doctest: +SKIP
        ['delta', 'gamma_v', 'gamma_t']
    """
    path = resolve_space_path(arg)
    text = path.read_text()
    from agch.config import load_yaml  # errors name the file and line

    doc = load_yaml(path)
    where = _Where(path, text)
    need(isinstance(doc, dict), where(), f"expected a mapping of {', '.join(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise unknown("key", str(key), TOP_KEYS, where(str(key)))
    preset_name = preset or doc.get("preset", "paper")
    if preset_name not in cfg.PRESETS:
        raise unknown("preset", str(preset_name), cfg.PRESETS, where("preset"))
    fixed = doc.get("fixed") or {}
    need(isinstance(fixed, dict), where("fixed"), "must be a mapping of config keys")
    need("epochs" not in fixed, where("fixed", "epochs"), "the budget in epochs is scheduler.epochs")
    base = cfg.apply(cfg.preset(preset_name), {"eval_every": 1, **cfg.SELECTION_DEFAULTS, **fixed},
                     where=where("fixed"))
    base = cfg.apply(base, overrides or {}, where="command line")

    specs = doc.get("parameters")
    need(isinstance(specs, dict) and specs, where("parameters"), "must map at least one config key to a range")
    parameters = [_parameter(str(name), spec, base, where) for name, spec in specs.items()]
    names = [p.name for p in parameters]
    need(len(set(names)) == len(names), where("parameters"), f"a parameter is listed twice: {names}")
    for name in set(names) & (set(fixed) | set(overrides or {})):
        raise UserError(f"{where('parameters', name)}: is searched, so it cannot also be fixed or set")

    sampler = _section(doc, "sampler", where, {"name": "tpe"})
    sampler_name = sampler.get("name", "tpe")
    if sampler_name not in SAMPLERS:
        raise unknown("sampler", str(sampler_name), SAMPLERS, where("sampler", "name"))
    options = sampler.get("options") or {}
    need(isinstance(options, dict), where("sampler", "options"), "must be a mapping of sampler arguments")

    scheduler = _section(doc, "scheduler", where, {"name": "none"})
    if scheduler.get("name", "none") not in SCHEDULERS:
        raise unknown("scheduler", str(scheduler.get("name")), SCHEDULERS, where("scheduler", "name"))
    budget = int(_number(scheduler.get("epochs", base.epochs), where("scheduler", "epochs"), integer=True))
    grace = int(_number(scheduler.get("grace_period", 1), where("scheduler", "grace_period"), integer=True))
    factor = _number(scheduler.get("reduction_factor", 2), where("scheduler", "reduction_factor"))
    need(budget >= 1, where("scheduler", "epochs"), f"must be >= 1, got {budget}")
    need(1 <= grace <= budget, where("scheduler", "grace_period"), f"must be in [1, epochs={budget}], got {grace}")
    need(factor > 1, where("scheduler", "reduction_factor"), f"must be > 1, got {factor}")
    stop_on_collapse = scheduler.get("stop_on_collapse", True)
    need(isinstance(stop_on_collapse, bool), where("scheduler", "stop_on_collapse"),
         f"must be true or false, got {stop_on_collapse!r}")
    if epochs is not None:
        need(epochs >= 1, "--epochs", f"must be >= 1, got {epochs}")
        budget, grace = epochs, min(grace, epochs)
    base = cfg.apply(base, {"epochs": budget})

    objective = _section(doc, "objective", where, {"metric": f"map{base.topk}_mean"})
    metrics = objective.get("metrics") or [objective.get("metric", f"map{base.topk}_mean")]
    need(isinstance(metrics, list) and len(metrics) in (1, 2), where("objective"),
          "give metric: NAME or metrics: [A, B]")
    known = [f"map{base.topk}_{d}" for d in ("i2t", "t2i", "mean")] + [f"mapall_{d}" for d in ("i2t", "t2i", "mean")]
    for metric in metrics:
        if metric not in known:
            raise unknown("objective metric", str(metric), known, where("objective"))
    mode = objective.get("mode", "max")
    need(mode in ("max", "min"), where("objective", "mode"), f"must be max or min, got {mode!r}")

    resources = _section(doc, "resources", where, {})
    cpus = _number(resources.get("cpus", 1), where("resources", "cpus"))
    gpus = _number(resources.get("gpus", 0), where("resources", "gpus"))
    need(cpus > 0, where("resources", "cpus"), f"must be > 0, got {cpus}")
    need(gpus >= 0 and (gpus <= 1 or gpus.is_integer()), where("resources", "gpus"),
          f"must be a fraction in [0, 1] or a whole number of GPUs, got {gpus}")
    seeds = int(_number(doc.get("seeds", 1), where("seeds"), integer=True))
    need(seeds >= 1, where("seeds"), f"must be >= 1, got {seeds}")
    count = int(_number(trials if trials is not None else doc.get("trials", 10),
                        "--trials" if trials is not None else where("trials"), integer=True))
    need(count >= 1, "--trials" if trials is not None else where("trials"), f"must be >= 1, got {count}")
    concurrency = int(_number(doc.get("concurrency", 1), where("concurrency"), integer=True))
    need(concurrency >= 1, where("concurrency"), f"must be >= 1, got {concurrency}")
    data = doc.get("dataset")
    dataset = dataset or (None if data in (None, "default") else (path.parent / str(data)).resolve())

    space = SearchSpace(source=str(path), text=text, preset=preset_name, base=cfg.to_flat(base),
                        parameters=parameters, sampler=sampler_name, sampler_seed=int(_number(
                            sampler.get("seed", 0), where("sampler", "seed"), integer=True)),
                        sampler_options=options, scheduler=scheduler.get("name", "none"), epochs=budget,
                        grace_period=grace, reduction_factor=factor, trials=count, concurrency=concurrency,
                        cpus=cpus, gpus=gpus, metrics=metrics, mode=mode, seeds=seeds,
                        dataset=str(dataset) if dataset else None,
                        time_budget_s=_duration(doc.get("time_budget"), where("time_budget")),
                        stop_on_collapse=stop_on_collapse)
    return _check_sampler(space, where)


def _check_sampler(space: SearchSpace, where: _Where) -> SearchSpace:
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


def describe_metric(metric: str) -> str:
    """'map50_mean' -> 'mAP@50 mean(I->T, T->I)': what an objective's number is (docs/protocol.md)."""
    stem, direction = metric.rsplit("_", 1)
    cutoff = "ALL" if stem == "mapall" else stem[3:]
    return f"mAP@{cutoff} " + {"i2t": "I->T", "t2i": "T->I", "mean": "mean(I->T, T->I)"}[direction]
