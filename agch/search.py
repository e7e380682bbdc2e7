"""Hyperparameter search: YAML search-space files, the Optuna sampler inside Ray Tune, and the search driver.

A space file (docs/search.md, search_spaces/*.yaml) names a preset, fixed overrides, the searched parameters (the
paper's names: delta = δ, gamma_v / gamma_t = γ, lam = λ, alpha = α, beta = β), the sampler, the scheduler and its
budget in epochs, and the objective. `load_space` validates it; `start` and `resume` run it through agch.runner.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agch import config as cfg
from agch.errors import UserError, unknown

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
"""The search spaces shipped with the source tree; `spaces/NAME.yaml` on the command line means one of them."""
SAMPLERS = {"tpe": "TPESampler", "cmaes": "CmaEsSampler", "gp": "GPSampler", "random": "RandomSampler",
            "qmc": "QMCSampler", "grid": "GridSampler"}
SCHEDULERS = ("asha", "none")
TOP_KEYS = ("description", "preset", "fixed", "dataset", "parameters", "sampler", "scheduler", "trials",
            "concurrency", "resources", "objective", "seeds", "time_budget")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
SECTION_KEYS = {"sampler": ("name", "seed", "options"),
                "scheduler": ("name", "epochs", "grace_period", "reduction_factor"),
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


def _need(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise UserError(f"{where}: {message}")


def _number(value: Any, where: str, *, integer: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    _need(ok, where, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    return int(value) if integer else float(value)


def _section(doc: dict, name: str, where: _Where, default: Any) -> dict:
    value = doc.get(name, default)
    if isinstance(value, str) and name in ("sampler", "scheduler"):
        value = {"name": value}
    _need(isinstance(value, dict), where(name), f"must be a mapping, got {value!r}")
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
    _need(canon not in NOT_SEARCHABLE, at, f"cannot be searched ({NOT_SEARCHABLE.get(canon)})")
    current = cfg.to_flat(base)[canon]
    if isinstance(spec, list):
        spec = {"choices": spec}
    _need(isinstance(spec, dict), at, "must be a mapping (type, low, high, log, step) or a list of choices")
    for key in spec:
        if key not in PARAM_KEYS:
            raise unknown("parameter key", str(key), PARAM_KEYS, where("parameters", name, str(key)))
    numeric = isinstance(current, (int, float)) and not isinstance(current, bool)
    _need(numeric or "choices" in spec, at, f"is {type(current).__name__}-valued: give 'choices' "
          f"(e.g. choices: {[current]})")
    default_kind = "categorical" if "choices" in spec or not numeric else type(current).__name__
    kind = spec.get("type", default_kind)
    _need(kind in ("float", "int", "categorical"), where("parameters", name, "type"),
          f"must be float, int or categorical, got {kind!r}")
    check = lambda value, key: cfg.apply(base, {canon: value}, where=where("parameters", name, key))  # noqa: E731
    if kind == "categorical":
        choices = spec.get("choices")
        _need(isinstance(choices, list) and choices, where("parameters", name, "choices"),
              "a categorical parameter needs a non-empty list of choices")
        _need(len({repr(c) for c in choices}) == len(choices), where("parameters", name, "choices"),
              f"has duplicates: {choices}")
        extra = sorted(set(spec) - {"type", "choices"})
        _need(not extra, at, f"a categorical parameter takes only 'choices', not {', '.join(extra)}")
        for choice in choices:
            check(choice, "choices")
        return Parameter(canon, "categorical", choices=tuple(choices))
    _need(numeric, at, f"is {type(current).__name__}-valued: give 'choices'")
    _need(kind == "int" or isinstance(current, float), at, "is an integer setting: use type: int")
    integer = kind == "int"
    _need("low" in spec and "high" in spec, at, f"a {kind} range needs low and high")
    low = _number(spec["low"], where("parameters", name, "low"), integer=integer)
    high = _number(spec["high"], where("parameters", name, "high"), integer=integer)
    _need(low != high, at, f"empty range: low == high == {low} (use fixed: for a constant)")
    _need(low < high, at, f"inverted range: low {low} > high {high}")
    log = spec.get("log", False)
    _need(isinstance(log, bool), where("parameters", name, "log"), f"must be true or false, got {log!r}")
    _need(not log or low > 0, where("parameters", name, "low"), f"a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, where("parameters", name, "step"), integer=integer)
        _need(not log, where("parameters", name, "step"), "step and log cannot be combined")
        _need(0 < step <= high - low, where("parameters", name, "step"), f"must be in (0, high - low], got {step}")
    check(low, "low")
    check(high, "high")
    return Parameter(canon, kind, low=low, high=high, log=log, step=step)


def _duration(value: Any, where: str) -> float | None:
    """Seconds from a number or '90s' / '30m' / '2h'."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(value))
    _need(match is not None and not isinstance(value, bool), where,
          f"must be seconds or a duration like 90s, 30m, 2h; got {value!r}")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    _need(seconds > 0, where, "must be > 0")
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
    from agch.cli.common import load_yaml  # errors name the file and line

    doc = load_yaml(path)
    where = _Where(path, text)
    _need(isinstance(doc, dict), where(), f"expected a mapping of {', '.join(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise unknown("key", str(key), TOP_KEYS, where(str(key)))
    preset_name = preset or doc.get("preset", "paper")
    if preset_name not in cfg.PRESETS:
        raise unknown("preset", str(preset_name), cfg.PRESETS, where("preset"))
    fixed = doc.get("fixed") or {}
    _need(isinstance(fixed, dict), where("fixed"), "must be a mapping of config keys")
    _need("epochs" not in fixed, where("fixed", "epochs"), "the budget in epochs is scheduler.epochs")
    base = cfg.apply(cfg.preset(preset_name), {"eval_every": 1, **fixed}, where=where("fixed"))
    base = cfg.apply(base, overrides or {}, where="command line")

    specs = doc.get("parameters")
    _need(isinstance(specs, dict) and specs, where("parameters"), "must map at least one config key to a range")
    parameters = [_parameter(str(name), spec, base, where) for name, spec in specs.items()]
    names = [p.name for p in parameters]
    _need(len(set(names)) == len(names), where("parameters"), f"a parameter is listed twice: {names}")
    for name in set(names) & (set(fixed) | set(overrides or {})):
        raise UserError(f"{where('parameters', name)}: is searched, so it cannot also be fixed or set")

    sampler = _section(doc, "sampler", where, {"name": "tpe"})
    sampler_name = sampler.get("name", "tpe")
    if sampler_name not in SAMPLERS:
        raise unknown("sampler", str(sampler_name), SAMPLERS, where("sampler", "name"))
    options = sampler.get("options") or {}
    _need(isinstance(options, dict), where("sampler", "options"), "must be a mapping of sampler arguments")

    scheduler = _section(doc, "scheduler", where, {"name": "none"})
    if scheduler.get("name", "none") not in SCHEDULERS:
        raise unknown("scheduler", str(scheduler.get("name")), SCHEDULERS, where("scheduler", "name"))
    budget = int(_number(scheduler.get("epochs", base.epochs), where("scheduler", "epochs"), integer=True))
    grace = int(_number(scheduler.get("grace_period", 1), where("scheduler", "grace_period"), integer=True))
    factor = _number(scheduler.get("reduction_factor", 2), where("scheduler", "reduction_factor"))
    _need(budget >= 1, where("scheduler", "epochs"), f"must be >= 1, got {budget}")
    _need(1 <= grace <= budget, where("scheduler", "grace_period"), f"must be in [1, epochs={budget}], got {grace}")
    _need(factor > 1, where("scheduler", "reduction_factor"), f"must be > 1, got {factor}")
    if epochs is not None:
        _need(epochs >= 1, "--epochs", f"must be >= 1, got {epochs}")
        budget, grace = epochs, min(grace, epochs)
    base = cfg.apply(base, {"epochs": budget})

    objective = _section(doc, "objective", where, {"metric": f"map{base.topk}_mean"})
    metrics = objective.get("metrics") or [objective.get("metric", f"map{base.topk}_mean")]
    _need(isinstance(metrics, list) and len(metrics) in (1, 2), where("objective"),
          "give metric: NAME or metrics: [A, B]")
    known = [f"map{base.topk}_{d}" for d in ("i2t", "t2i", "mean")] + [f"mapall_{d}" for d in ("i2t", "t2i", "mean")]
    for metric in metrics:
        if metric not in known:
            raise unknown("objective metric", str(metric), known, where("objective"))
    mode = objective.get("mode", "max")
    _need(mode in ("max", "min"), where("objective", "mode"), f"must be max or min, got {mode!r}")

    resources = _section(doc, "resources", where, {})
    cpus = _number(resources.get("cpus", 1), where("resources", "cpus"))
    gpus = _number(resources.get("gpus", 0), where("resources", "gpus"))
    _need(cpus > 0, where("resources", "cpus"), f"must be > 0, got {cpus}")
    _need(gpus >= 0 and (gpus <= 1 or gpus.is_integer()), where("resources", "gpus"),
          f"must be a fraction in [0, 1] or a whole number of GPUs, got {gpus}")
    seeds = int(_number(doc.get("seeds", 1), where("seeds"), integer=True))
    _need(seeds >= 1, where("seeds"), f"must be >= 1, got {seeds}")
    count = int(_number(trials if trials is not None else doc.get("trials", 10),
                        "--trials" if trials is not None else where("trials"), integer=True))
    _need(count >= 1, "--trials" if trials is not None else where("trials"), f"must be >= 1, got {count}")
    concurrency = int(_number(doc.get("concurrency", 1), where("concurrency"), integer=True))
    _need(concurrency >= 1, where("concurrency"), f"must be >= 1, got {concurrency}")
    data = doc.get("dataset")
    dataset = dataset or (None if data in (None, "default") else (path.parent / str(data)).resolve())

    space = SearchSpace(source=str(path), text=text, preset=preset_name, base=cfg.to_flat(base),
                        parameters=parameters, sampler=sampler_name, sampler_seed=int(_number(
                            sampler.get("seed", 0), where("sampler", "seed"), integer=True)),
                        sampler_options=options, scheduler=scheduler.get("name", "none"), epochs=budget,
                        grace_period=grace, reduction_factor=factor, trials=count, concurrency=concurrency,
                        cpus=cpus, gpus=gpus, metrics=metrics, mode=mode, seeds=seeds,
                        dataset=str(dataset) if dataset else None,
                        time_budget_s=_duration(doc.get("time_budget"), where("time_budget")))
    return _check_sampler(space, where)


def _check_sampler(space: SearchSpace, where: _Where) -> SearchSpace:
    """Refuse combinations a sampler or scheduler cannot handle; cap a grid search's trials to its grid."""
    name, at = space.sampler, where("sampler", "name")
    kinds = {p.kind for p in space.parameters}
    if name == "cmaes":
        _need("categorical" not in kinds, at, "CMA-ES cannot sample categorical parameters "
              f"({', '.join(p.name for p in space.parameters if p.kind == 'categorical')}); use tpe or gp")
        _need(len(space.parameters) >= 2, at, "CMA-ES needs at least two parameters; use tpe or gp")
        _need(len(space.metrics) == 1, at, "CMA-ES optimises one objective; use tpe for two")
        _need(importlib.util.find_spec("cmaes") is not None, at, "CMA-ES needs the 'cmaes' package: pip install cmaes")
    if space.seeds > 1:
        _need(space.scheduler == "none", where("seeds"), "several seeds per trial average whole runs; "
              "ASHA would stop some seeds early and bias the mean (use scheduler: none)")
    accepted = [p for p in inspect.signature(_sampler_class(name)).parameters if p not in ("seed", "search_space")]
    for option in space.sampler_options:
        if option not in accepted:
            raise unknown(f"{SAMPLERS[name]} option", str(option), accepted, where("sampler", "options", str(option)))
    if name == "grid":
        grids = {p.name: p.grid() for p in space.parameters}
        missing = [n for n, g in grids.items() if g is None]
        _need(not missing, at, f"a grid needs choices or a step for every parameter; missing for {', '.join(missing)}")
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
    """'map50_mean' -> 'mAP@50 mean(I->T, T->I)': what an objective's number is (protocol.md)."""
    stem, direction = metric.rsplit("_", 1)
    cutoff = "ALL" if stem == "mapall" else stem[3:]
    return f"mAP@{cutoff} " + {"i2t": "I->T", "t2i": "T->I", "mean": "mean(I->T, T->I)"}[direction]


# --------------------------------------------------------------------------------------------- Optuna inside Tune
def __getattr__(name: str) -> Any:
    # Ray Tune takes seconds to import; build the OptunaSearch adapter on first use so that validating a space file
    # stays fast. Pickle finds the class under this module's name, so Tune can save and restore it.
    if name == "StudySearch":
        globals()[name] = _study_search_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _study_search_class() -> type:
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import Trial, TrialState
    from ray.tune.search.optuna import OptunaSearch

    from agch.runner import FINAL, SEED_OFFSET, TRIAL_NUMBER

    class StudySearch(OptunaSearch):
        """Ray's OptunaSearch on a persistent study, with results keyed by epoch and repeated seeds.

        - A result without the objective (an epoch that was not evaluated) is skipped; the others are Optuna
          intermediate values at their epoch.
        - With seeds > 1 each suggestion runs as that many Tune trials (SEED_OFFSET 0..seeds-1) and Optuna is told
          the mean once all have ended. The groups are part of this object, which Tune saves and restores.
        - A trial that ended without its final report was early-stopped: Optuna records it as pruned.
        - Every suggestion carries its Optuna trial number (TRIAL_NUMBER), so that trials with equal settings are
          distinct places for agch.runner.trial_slot.
        - On restore, Optuna trials asked after Tune last saved its state (trials a killed driver had just started)
          are handed out again, first, to the trials the restored driver starts in their place: those continue the
          lost trials' MLflow runs. A trial that Optuna already closed before the driver died is not told twice.
        """

        def __init__(self, *, seeds: int = 1, **kwargs: Any):
            super().__init__(**kwargs)
            self.seeds = seeds
            self.groups: dict[str, dict] = {}
            self.open_group: dict | None = None
            self.orphans: list[int] = []
            """Optuna trial ids to hand out again before asking new ones (see restore)."""

        def suggest(self, trial_id: str) -> dict | None:
            group = self.open_group
            if group is None or len(group["members"]) == self.seeds:
                if self.orphans:
                    self._ot_trials[trial_id] = Trial(self._ot_study, self.orphans.pop(0))
                params = super().suggest(trial_id)
                if not isinstance(params, dict):
                    return params
                params[TRIAL_NUMBER] = self._ot_trials[trial_id].number
                group = self.open_group = {"primary": trial_id, "params": params, "members": [], "ended": {}}
            group["members"].append(trial_id)
            self.groups[trial_id] = group
            self._ot_trials[group["primary"]].set_user_attr("tune_trial_ids", list(group["members"]))
            offset = {SEED_OFFSET: len(group["members"]) - 1} if self.seeds > 1 else {}
            return {**group["params"], **offset}

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.seeds == 1 and isinstance(self.metric, str) and self.metric in result:
                with warnings.catch_warnings():  # a restored trial reports its checkpoint's epoch again
                    warnings.simplefilter("ignore")
                    try:
                        self._ot_trials[trial_id].report(float(result[self.metric]), int(result["epoch"]))
                    except UpdateFinishedTrialError:
                        pass

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            group = self.groups.get(trial_id)
            if group is None or trial_id in group["ended"]:
                return
            metrics = [self.metric] if isinstance(self.metric, str) else list(self.metric)
            if error or not (result or {}).get(FINAL):
                group["ended"][trial_id] = "failed" if error else "pruned"
            else:
                group["ended"][trial_id] = [float(result[m]) for m in metrics]
                self.on_trial_result(trial_id, result)  # the last epoch's value, reported only at the end
            if len(group["ended"]) < self.seeds:
                return
            ended = list(group["ended"].values())
            values = None
            if "failed" in ended:
                state = TrialState.FAIL
            elif "pruned" in ended:
                state = TrialState.PRUNED
            else:
                state, means = TrialState.COMPLETE, np.mean(ended, axis=0).tolist()
                values = means[0] if isinstance(self.metric, str) else means
            try:
                self._ot_study.tell(self._ot_trials[group["primary"]], values, state=state)
            except UpdateFinishedTrialError:
                pass

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            known = {trial.number for trial in self._ot_trials.values()}
            self.orphans = [trial._trial_id for trial in self._ot_study.get_trials(
                deepcopy=False, states=(TrialState.RUNNING,)) if trial.number not in known]

    StudySearch.__module__, StudySearch.__qualname__ = __name__, "StudySearch"
    return StudySearch


# --------------------------------------------------------------------------------------------------- the driver
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass
class SearchReport:
    """Where a search stands after `start` or `resume` returned."""

    name: str
    interrupted: bool
    outcomes: list
    """agch.runner.TrialOutcome per Tune trial, in start order."""
    best: dict | None
    """the best Optuna trial (params, values, tune_trial_ids, run_ids), or None when none finished."""
    best_config: Path | None
    """a YAML file `agch-train --config` accepts, for the best trial."""
    protocol: str
    """what the objective's numbers are (metric, bits, split, dataset)."""
    tracking_uri: str
    experiment: str
    parent_run_id: str
    storage_url: str
    notes: list[str] = field(default_factory=list)


def searches_root() -> Path:
    """Where each search keeps its state and Ray Tune experiment: <AGCH home>/searches/NAME."""
    from agch.paths import home

    return home() / "searches"


def default_storage_url(tracking_uri: str | None = None) -> str:
    """The embedded Optuna store: an SQLite file beside the MLflow SQLite store (under the AGCH home otherwise)."""
    from agch.paths import home

    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home() / 'optuna.db'}"


def redact(url: str) -> str:
    """A URL with its password replaced, fit for logs and tags."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str) -> Any:
    """The Optuna storage at `url` (SQLite, PostgreSQL, MySQL); UserError when it cannot be reached."""
    import optuna

    engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as err:  # SQLAlchemy raises many kinds; all mean the same thing here
        raise UserError(f"Optuna storage {redact(url)} is unreachable: {str(err).splitlines()[0]}") from None


def _open_tracker(uri: str | None, experiment: str) -> Any:
    from agch.runner import RetryingTracker
    from agch.tracking import resolve_uri

    try:
        return RetryingTracker(resolve_uri(uri), experiment)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"tracking store {redact(resolve_uri(uri))} is unreachable: "
                        f"{str(err).splitlines()[0]}") from None


def _protocol(dataset: Path, space: SearchSpace) -> str:
    """Opens (so validates) the dataset and says what the objective's numbers will mean."""
    from agch.data import open_dataset

    with open_dataset(dataset) as data:
        bits = "searched bits" if "bits" in [p.name for p in space.parameters] else f"{space.base['bits']} bits"
        synthetic = ",".join(sorted(data.synthetic)) or "none"
        return (f"{' & '.join(describe_metric(m) for m in space.metrics)}, {bits}, "
                f"{data.meta.get('split_protocol')} split ({len(data.split.query)} queries vs "
                f"{len(data.split.retrieval)} database), dataset {data.name} (synthetic parts: {synthetic})")


def start(space: SearchSpace, *, name: str | None = None, tracking_uri: str | None = None,
          experiment: str = "agch-search", storage_url: str | None = None, ray_address: str | None = None,
          device: str = "auto", verbose: bool = False, listener: Any = None) -> SearchReport:
    """Run a new search: check every store first, then one MLflow parent run, one Optuna study, Ray Tune trials.

    `listener` (optional, e.g. agch.cli.search.LiveTable) gets on_start(name, space, protocol), on_result(trial_id,
    params, result) and on_complete(outcome) on the driver.

    Example:
        >>> report = start(load_space("spaces/delta_gamma.yaml", trials=2, epochs=1))  # doctest: +SKIP
        >>> report.best["params"]  # doctest: +SKIP
    """
    from datetime import datetime

    from agch.paths import default_dataset
    from agch.runner import RunContext, start_ray

    name = name or f"{Path(space.source).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    _need(NAME_PATTERN.fullmatch(name) is not None, "--name", f"use letters, digits, '.', '_', '-'; got {name!r}")
    folder = searches_root() / name
    _need(not folder.exists(), "--name", f"a search named {name} exists; continue it with "
          f"`agch-search resume {name}` or choose another name")
    tracker = _open_tracker(tracking_uri, experiment)
    storage_url = storage_url or default_storage_url(tracker.uri)
    storage = open_storage(storage_url)
    _need(name not in [s.study_name for s in storage.get_all_studies()], "--name",
          f"the Optuna storage {redact(storage_url)} already holds a study named {name}")
    _need(space.gpus > 0 or not device.startswith("cuda"), "--device", "cuda needs resources.gpus > 0")
    dataset = Path(space.dataset) if space.dataset else default_dataset()
    protocol = _protocol(dataset, space)
    start_ray(ray_address, {"cpu": space.cpus, "gpu": space.gpus}, verbose=verbose)

    parent = tracker.start_run(name, tags={"agch.kind": "search", "agch.group": name, "optuna.study": name,
                                           "optuna.storage": redact(storage_url), "agch.protocol": protocol})
    tracker.log_params(parent, {
        "space_file": space.source, "preset": space.preset, "searched": ",".join(p.name for p in space.parameters),
        "sampler": space.sampler, "sampler_seed": space.sampler_seed, "sampler_options": space.sampler_options,
        "scheduler": space.scheduler, "epochs": space.epochs, "grace_period": space.grace_period,
        "reduction_factor": space.reduction_factor, "trials": space.trials, "seeds": space.seeds,
        "concurrency": space.concurrency, "cpus": space.cpus, "gpus": space.gpus, "time_budget_s": space.time_budget_s,
        "objective": ",".join(space.metrics), "mode": space.mode, "dataset": str(dataset)})
    ctx = RunContext(dataset=str(dataset), tracking_uri=tracker.uri, experiment=experiment, parent_run_id=parent,
                     device=device, base=space.base, group=name)
    state = {"name": name, "space": dataclasses.asdict(space), "context": dataclasses.asdict(ctx),
             "storage_url": storage_url, "ray_address": ray_address, "protocol": protocol, "finished": False}
    folder.mkdir(parents=True)
    _save_state(state)
    tracker.log_files(parent, {Path(space.source).name: space.text,
                               "search.json": {**state, "storage_url": redact(storage_url)}})
    return _drive(state, resume=False, verbose=verbose, listener=listener)


def resume(name: str, *, ray_address: str | None = None, verbose: bool = False, listener: Any = None) -> SearchReport:
    """Continue an interrupted search: finished trials are not rerun and no trial gets a second MLflow run."""
    from agch.runner import start_ray

    path = searches_root() / name / "search.json"
    if not path.is_file():
        known = [p.parent.name for p in searches_root().glob("*/search.json")]
        raise unknown("search", name, known, f"under {searches_root()}")
    state = json.loads(path.read_text())
    if state["finished"]:
        return _finish(state, None, interrupted=False, notes=[f"search {name} had already finished; nothing was run"])
    if ray_address:
        state["ray_address"] = ray_address
    tracker = _open_tracker(state["context"]["tracking_uri"], state["context"]["experiment"])
    open_storage(state["storage_url"])
    space = _space_from_state(state)
    start_ray(state["ray_address"], {"cpu": space.cpus, "gpu": space.gpus}, verbose=verbose)
    tracker.reopen(state["context"]["parent_run_id"])
    return _drive(state, resume=True, verbose=verbose, listener=listener)


def _save_state(state: dict) -> None:
    (searches_root() / state["name"] / "search.json").write_text(json.dumps(state, indent=2, default=str))


def _space_from_state(state: dict) -> SearchSpace:
    fields_ = dict(state["space"])
    fields_["parameters"] = [Parameter(**{**p, "choices": tuple(p["choices"])}) for p in fields_["parameters"]]
    return SearchSpace(**fields_)


def _drive(state: dict, *, resume: bool, verbose: bool, listener: Any) -> SearchReport:
    """Run or continue the Tune trials, then write the search's summary artifacts whatever happened."""
    import optuna

    from agch.runner import RunContext, run_trials

    space, ctx = _space_from_state(state), RunContext(**state["context"])
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    search_alg = __getattr__("StudySearch")(
        space={p.name: p.distribution() for p in space.parameters}, metric=space.metrics[0] if len(
            space.metrics) == 1 else space.metrics, mode=space.mode if len(space.metrics) == 1 else [space.mode] * 2,
        sampler=make_sampler(space), study_name=state["name"], storage=open_storage(state["storage_url"]),
        seeds=space.seeds)
    if listener is not None:
        listener.on_start(state["name"], space, state["protocol"])
    interrupted, found = False, None
    try:
        found = run_trials(ctx, param_space={}, num_samples=space.trials * space.seeds, search_alg=search_alg,
                   scheduler=make_scheduler(space), metric=space.metrics[0], mode=space.mode,
                   resources={"cpu": space.cpus, "gpu": space.gpus}, max_concurrent=space.concurrency,
                   storage_dir=searches_root(), name=state["name"], ray_address=state["ray_address"], resume=resume,
                   time_budget_s=space.time_budget_s, verbose=verbose,
                   on_result=getattr(listener, "on_result", None), on_complete=getattr(listener, "on_complete", None))
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        _open_tracker(ctx.tracking_uri, ctx.experiment).end_run(ctx.parent_run_id, "FAILED")
        raise
    return _finish(state, found, interrupted=interrupted, notes=list(space.notes))


def _finish(state: dict, found: list | None, *, interrupted: bool, notes: list[str]) -> SearchReport:
    """Best trial, its config, the trial table and Optuna's plots onto the parent run; close the parent.

    `found` is what run_trials returned; None reports a search that had already finished, recording nothing.
    """
    import optuna

    from agch.runner import STATES, RunContext, outcomes, trial_config

    space, ctx, name = _space_from_state(state), RunContext(**state["context"]), state["name"]
    tracker = _open_tracker(ctx.tracking_uri, ctx.experiment)
    trials = outcomes(ctx) if found is None else found
    interrupted = interrupted or len(trials) < space.trials * space.seeds or any(
        o.status == "interrupted" for o in trials)
    study = optuna.load_study(study_name=name, storage=open_storage(state["storage_url"]))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best, best_config, files = None, None, {}
    if done:
        front = [study.best_trial] if len(space.metrics) == 1 else study.best_trials
        sign = 1 if space.mode == "max" else -1
        chosen = max(front, key=lambda t: sign * sum(t.values))
        ids = chosen.user_attrs.get("tune_trial_ids", [])
        best = {"optuna_trial": chosen.number, "params": chosen.params,
                "values": dict(zip(space.metrics, chosen.values, strict=True)),
                "tune_trial_ids": ids, "run_ids": [o.run_id for o in trials if o.trial_id in ids],
                "pareto_front": [t.number for t in front], "protocol": state["protocol"]}
        best_config = searches_root() / name / "best_config.yaml"
        config_yaml = {"preset": space.preset, **cfg.to_flat(trial_config(ctx, chosen.params))}
        files.update({"best_trial.json": json.dumps(best, indent=2, default=str), "best_config.yaml": config_yaml})
    report = SearchReport(name=name, interrupted=interrupted, outcomes=trials, best=best, best_config=best_config,
                          protocol=state["protocol"], tracking_uri=ctx.tracking_uri, experiment=ctx.experiment,
                          parent_run_id=ctx.parent_run_id, storage_url=redact(state["storage_url"]), notes=notes)
    if found is None:
        return report
    if best is not None:
        best_config.write_text(yaml.safe_dump(files["best_config.yaml"], sort_keys=False))
        tracker.log_metrics(ctx.parent_run_id, {f"best_{m}": v for m, v in best["values"].items()}, step=len(done))
        tracker.set_tags(ctx.parent_run_id, {"agch.best_trial": ",".join(ids),
                                             "agch.best_run": ",".join(best["run_ids"])})
    if study.trials:
        files["trials.csv"] = study.trials_dataframe().to_csv(index=False)
    plots, skipped = _plots(study, space, [p.name for p in space.parameters])
    files.update(plots)
    notes += skipped
    counts = {f"trials_{s}": sum(o.status == s for o in trials) for s in STATES}
    tracker.log_metrics(ctx.parent_run_id, counts, step=len(trials))
    tracker.log_files(ctx.parent_run_id, files)
    tracker.set_tags(ctx.parent_run_id, {"agch.search_state": "interrupted" if interrupted else "finished"})
    tracker.end_run(ctx.parent_run_id, "KILLED" if interrupted else "FINISHED")
    state["finished"] = not interrupted
    _save_state(state)
    return report


def _plots(study: Any, space: SearchSpace, names: list[str]) -> tuple[dict[str, bytes], list[str]]:
    """Optuna's optimisation history, parameter importances and contour plots as PNG bytes, per objective."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plot

    kinds = {"optimization_history": lambda **kw: plot.plot_optimization_history(study, **kw),
             "param_importances": lambda **kw: plot.plot_param_importances(study, **kw),
             "contour": lambda **kw: plot.plot_contour(study, params=names, **kw)}
    finished = sum(t.state.name == "COMPLETE" for t in study.trials)
    pngs, skipped = {}, []
    if finished < 2:
        kinds.pop("param_importances")
        kinds.pop("contour")
        skipped.append(f"importance and contour plots need two finished trials; {finished} finished")
    for index, metric in enumerate(space.metrics):
        suffix = "" if len(space.metrics) == 1 else f"_{metric}"
        target = None if len(space.metrics) == 1 else (lambda t, i=index: t.values[i])
        for kind, draw in kinds.items():
            if kind == "contour" and len(names) < 2:
                continue  # a contour needs two parameters
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                    axes = draw(target=target, target_name=describe_metric(metric))
                figure = np.atleast_1d(axes).flat[0].figure
                buffer = io.BytesIO()
                figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
                plt.close(figure)
                pngs[f"{kind}{suffix}.png"] = buffer.getvalue()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. too few finished trials
                skipped.append(f"{kind}{suffix}.png not drawn: {err}")
    return pngs, skipped
