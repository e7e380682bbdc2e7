"""Ablation files, designs → cells, cell identity and reuse, and the driver that runs cells × seeds in Ray Tune.

An ablation toggles some of the debugging log's fixes (agch.config.Fixes) on a base config and trains every
resulting config ("cell") with the same seeds, so each fix can be judged by a paired comparison (agch.stats).

Designs (each toggles the ablation's `fixes`; the base is a preset plus the file's overrides):
  one-fix        each fix on vs off, the other fixes as the base has them (default base: paper)
  add-one-in     the base with every toggled fix off, then each fix added alone (default base: paper)
  leave-one-out  the base with every toggled fix on, then each fix removed alone (default base: debug-log)
  factorial      every on/off combination of the toggled fixes; each fix's main effect (default base: paper)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agch import config as cfg
from agch.errors import UserError, unknown

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
RESOURCE_KEYS = ("cpu", "gpu")
AUTO_GPU_FRACTION = 0.25
"""Trials are small (architecture.md): four share one GPU unless the file or --gpus-per-trial says otherwise."""

SPEC_KEYS = ("name", "description", "design", "preset", "fixes", "overrides", "seeds", "dataset", "bits",
             "epochs", "resources", "max_concurrent")
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "ablations"


@dataclass(frozen=True)
class Design:
    """One design and the preset its base starts from."""

    kind: str
    preset: str


@dataclass(frozen=True)
class AblationSpec:
    """A validated ablation file (or the equivalent built from the command line)."""

    name: str
    designs: tuple[Design, ...]
    fixes: tuple[str, ...]
    """the toggled fixes (canonical names, file order)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """config keys applied to every design's preset (bits and epochs included); never a toggled fix or seed."""
    seeds: tuple[int, ...] = tuple(range(DEFAULT_SEEDS))
    dataset: Path | None = None
    resources: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    max_concurrent: int | None = None
    """trials at once; None: as many as the resources allow."""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The normalised file form (logged as ablation.yaml on the parent run)."""
        return {"name": self.name, "description": self.description,
                "design": [{"kind": d.kind, "preset": d.preset} for d in self.designs],
                "fixes": [f.replace("_", "-") for f in self.fixes], "overrides": dict(self.overrides),
                "seeds": list(self.seeds), "dataset": str(self.dataset) if self.dataset else None,
                "resources": dict(self.resources), "max_concurrent": self.max_concurrent}


# ---------------------------------------------------------------- validation


def seeds_from(value: Any, where: str) -> tuple[int, ...]:
    """`seeds: 5` → (0..4); `seeds: [3, 7]` → (3, 7). At least one, no repeats."""
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise UserError(f"{where}: seeds must be a count (e.g. 5) or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise UserError(f"{where}: seeds must be >= 1 (>= 2 for a verdict), got {value}")
        return tuple(range(value))
    if not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise UserError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: seeds lists a seed twice: {value}")
    return tuple(value)


def fix_list(value: Any, where: str) -> tuple[str, ...]:
    """A list of fix names ('text-input' or 'text_input'), canonical, no repeats."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise UserError(f"{where}: expected a non-empty list of fixes ({', '.join(cfg.FIX_ALIASES)})")
    names = tuple(cfg.fix_name(str(item), where) for item in items)
    if len(set(names)) != len(names):
        raise UserError(f"{where}: a fix is listed twice: {', '.join(map(str, items))}")
    return names


def designs_from(value: Any, preset: str | None, where: str) -> tuple[Design, ...]:
    """`design: add-one-in`, or a list of names / {kind, preset} mappings."""
    items = value if isinstance(value, list) else [value]
    designs = []
    for i, item in enumerate(items):
        at = f"{where}.design" + (f"[{i}]" if isinstance(value, list) else "")
        item_preset = preset
        if isinstance(item, dict):
            extra = set(item) - {"kind", "preset"}
            if extra:
                raise unknown("design key", sorted(extra)[0], ("kind", "preset"), at)
            item_preset = item.get("preset", preset)
            item = item.get("kind")
        if item not in DESIGNS:
            raise unknown("design", str(item), DESIGNS, at)
        chosen = str(item_preset or DESIGNS[item])
        if chosen not in cfg.PRESETS:
            raise unknown("preset", chosen, cfg.PRESETS, f"{at} ({item} needs a base preset)")
        designs.append(Design(item, chosen))
    if not designs:
        raise UserError(f"{where}: design must name at least one of {', '.join(DESIGNS)}")
    return tuple(dict.fromkeys(designs))


def fixed_fixes(overrides: dict[str, Any], where: str = "") -> set[str]:
    """Fixes an override mapping sets to a fixed value (`fixes.NAME` keys or a `fixes:` mapping)."""
    out = set()
    for key, value in overrides.items():
        if key == "fixes" and isinstance(value, dict):
            out.update(cfg.fix_name(str(k), where) for k in value)
        elif key.startswith("fixes."):
            out.add(cfg.fix_name(key.split(".", 1)[1], where))
    return out


def check_not_fixed(fixes: tuple[str, ...], overrides: dict[str, Any], where: str) -> None:
    """A toggled fix cannot also be held fixed: the two settings contradict each other."""
    both = [f for f in fixes if f in fixed_fixes(overrides, where)]
    if both:
        raise UserError(f"{where}: fix '{both[0].replace('_', '-')}' is both toggled (fixes) and fixed "
                        f"(overrides fixes.{both[0]}); drop one of the two")
    if "seed" in overrides:
        raise UserError(f"{where}: 'seed' cannot be an override; the ablation sets it from 'seeds'")


def parse_spec(raw: Any, where: str, relative_to: Path | None = None) -> AblationSpec:
    """Validate an ablation file's mapping; every error names the file and key and what is allowed."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(SPEC_KEYS)}")
    for key in raw:
        if key not in SPEC_KEYS:
            raise unknown("ablation key", str(key), SPEC_KEYS, where)
    for key in ("name", "design", "fixes"):
        if raw.get(key) in (None, "", []):
            raise UserError(f"{where}: missing '{key}'")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: overrides must be a mapping of config keys")
    overrides = dict(overrides)
    for key in ("bits", "epochs"):
        if key in raw:
            if key in overrides:
                raise UserError(f"{where}: '{key}' is given both at the top level and in overrides; keep one")
            overrides[key] = raw[key]
    fixes = fix_list(raw["fixes"], f"{where}: fixes")
    check_not_fixed(fixes, overrides, where)
    cfg.apply(cfg.Config(), overrides, where=f"{where}: overrides")  # unknown keys / bad values fail here
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise UserError(f"{where}: resources must be a mapping such as {{cpu: 1, gpu: 0.25}}")
    resources = check_resources(dict(DEFAULT_RESOURCES, **resources), f"{where}: resources")
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise UserError(f"{where}: max_concurrent must be an integer >= 1, got {max_concurrent!r}")
    dataset = raw.get("dataset")
    if dataset is not None:
        dataset = Path(str(dataset)).expanduser()
        if not dataset.is_absolute() and relative_to is not None:
            dataset = relative_to / dataset
    return AblationSpec(
        name=str(raw["name"]), description=str(raw.get("description") or "").strip(),
        designs=designs_from(raw["design"], raw.get("preset"), where), fixes=fixes, overrides=overrides,
        seeds=seeds_from(raw.get("seeds", DEFAULT_SEEDS), f"{where}: seeds"), dataset=dataset,
        resources=resources, max_concurrent=max_concurrent)


def check_resources(resources: dict[str, Any], where: str) -> dict[str, float]:
    """{cpu, gpu} per trial, numbers >= 0, not both 0."""
    for key, value in resources.items():
        if key not in RESOURCE_KEYS:
            raise unknown("resource", key, RESOURCE_KEYS, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"{where}: {key} must be a number >= 0, got {value!r}")
    if not any(resources.values()):
        raise UserError(f"{where}: a trial must ask for some cpu or gpu")
    return {k: float(v) for k, v in resources.items()}


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
    from agch.cli.common import load_yaml

    return parse_spec(load_yaml(path), str(path), relative_to=path.parent)


# ---------------------------------------------------------------- designs → cells


@dataclass(frozen=True)
class Cell:
    """One config of the ablation, trained once per seed. `config.seed` is a placeholder (0)."""

    identity: str
    label: str
    config: cfg.Config


@dataclass(frozen=True)
class Comparison:
    """Fix on vs off: cell identities on each side, matched position by position (same context)."""

    name: str
    fix: str
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
    dataset_identity: str
    cells: dict[str, Cell]
    comparisons: tuple[Comparison, ...]

    def trials(self) -> list[Trial]:
        """Every cell × seed, cells in plan order."""
        return [Trial(c.identity, s, trial_identity(c.config, s, self.dataset_identity))
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
    """Exactly the agch.identity tag that tracking.run_tags puts on the run of this cell with this seed."""
    return cfg.identity(dataclasses.replace(config, seed=seed), dataset=dataset_identity)


def with_fixes(config: cfg.Config, settings: dict[str, bool]) -> cfg.Config:
    """`config` with the given fixes switched."""
    return dataclasses.replace(config, fixes=dataclasses.replace(config.fixes, **settings))


def cell_label(design: Design, config: cfg.Config, toggled: tuple[str, ...]) -> str:
    """'paper[+alignment -balance]': the base preset and the toggled fixes' states."""
    states = " ".join(("+" if getattr(config.fixes, f) else "-") + f.replace("_", "-") for f in toggled)
    return f"{design.preset}[{states}]"


def design_cells(design: Design, base: cfg.Config, fixes: tuple[str, ...]) -> Iterator[tuple[str, cfg.Config,
                                                                                            cfg.Config]]:
    """(fix, on-config, off-config) for every comparison a design makes; factorial yields one per context."""
    if design.kind == "one-fix":
        for fix in fixes:
            yield fix, with_fixes(base, {fix: True}), with_fixes(base, {fix: False})
    elif design.kind == "add-one-in":
        start = with_fixes(base, {f: False for f in fixes})
        for fix in fixes:
            yield fix, with_fixes(start, {fix: True}), start
    elif design.kind == "leave-one-out":
        start = with_fixes(base, {f: True for f in fixes})
        for fix in fixes:
            yield fix, start, with_fixes(start, {fix: False})
    else:  # factorial: each fix against every combination of the others
        for fix in fixes:
            others = [f for f in fixes if f != fix]
            for states in itertools.product((False, True), repeat=len(others)):
                context = with_fixes(base, dict(zip(others, states)))
                yield fix, with_fixes(context, {fix: True}), with_fixes(context, {fix: False})


def build_plan(spec: AblationSpec, dataset_identity: str) -> Plan:
    """Expand every design into cells (shared cells deduplicated by identity) and comparisons."""
    cells: dict[str, Cell] = {}
    comparisons: list[Comparison] = []

    def add(design: Design, config: cfg.Config) -> str:
        key = cell_identity(config, dataset_identity)
        cells.setdefault(key, Cell(key, cell_label(design, config, spec.fixes), config))
        return key

    for design in spec.designs:
        base = cfg.apply(cfg.preset(design.preset), spec.overrides, where=f"ablation {spec.name}: overrides")
        sides: dict[str, tuple[list[str], list[str]]] = {}
        for fix, on, off in design_cells(design, base, spec.fixes):
            on_ids, off_ids = sides.setdefault(fix, ([], []))
            on_ids.append(add(design, on))
            off_ids.append(add(design, off))
        for fix, (on_ids, off_ids) in sides.items():
            comparisons.append(Comparison(f"{fix.replace('_', '-')} ({design.kind}, {design.preset})", fix,
                                          design.kind, tuple(on_ids), tuple(off_ids)))
    return Plan(spec, dataset_identity, cells, tuple(comparisons))


# ---------------------------------------------------------------- tracking: reuse and resume


def completed(run: Any) -> bool:
    """Trained to its last epoch: FINISHED, or FAILED only because its codes collapsed.

    The runner marks collapsed runs failed (a search should not pick them), but for an ablation a collapse is a
    result: the balance fix exists because codes collapsed without it, so those runs' mAP must count.
    """
    tags = run.data.tags
    if run.info.status == "FINISHED":
        return tags.get("agch.status", "finished") == "finished"
    return run.info.status == "FAILED" and tags.get("agch.collapsed") == "True" and not tags.get("agch.failed_epoch")


def recorded_runs(tracker: Any, dataset_identity: str) -> dict[str, list[Any]]:
    """Completed runs on this dataset in every experiment of the store, by their agch.identity tag."""
    client = tracker.client
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`dataset.identity` = '{dataset_identity}'"
    found: dict[str, list[Any]] = {}
    token = None
    while True:
        page = client.search_runs(experiments, filter_string=query, max_results=1000, page_token=token)
        for run in page:
            if "agch.identity" in run.data.tags and completed(run):
                found.setdefault(run.data.tags["agch.identity"], []).append(run)
        token = page.token
        if not token:
            return found


def pick_run(runs: list[Any], parent_run_id: str) -> Any:
    """The run of this ablation when there is one, else the most recent."""
    return max(runs, key=lambda r: (r.data.tags.get("mlflow.parentRunId") == parent_run_id, r.info.start_time))


def interrupted_parent(tracker: Any, plan_identity: str) -> str | None:
    """The parent run of the latest attempt at this plan, when that attempt did not finish."""
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`agch.plan` = '{plan_identity}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


def tune_groups(plan: Plan, pending: list[Trial], prefix: str) -> list[dict[str, Any]]:
    """Pending trials as Ray Tune grids: one per distinct (base without fixes, seeds), grid = fix settings × seeds.

    A grid is a cross product, so cells whose non-fix settings differ (e.g. the paper and debug-log bases) or that
    miss different seeds go to separate groups. Each group's name is its Tune experiment and its agch.group tag.
    """
    seeds_of: dict[str, list[int]] = {}
    for trial in pending:
        seeds_of.setdefault(trial.cell, []).append(trial.seed)
    groups: dict[str, dict[str, Any]] = {}
    for cell, seeds in seeds_of.items():
        flat = cfg.to_flat(plan.cells[cell].config)
        rest = {k: v for k, v in flat.items() if not k.startswith("fixes.")}
        key = json.dumps([rest, sorted(seeds)], sort_keys=True, default=str)
        group = groups.setdefault(key, {"base": flat, "fixes": [], "seeds": sorted(seeds)})
        group["fixes"].append({f: flat[f"fixes.{f}"] for f in cfg.FIX_NAMES})
    return [dict(g, name=f"{prefix}-{i}") for i, g in enumerate(groups.values())]


def group_identities(group: dict[str, Any], dataset_identity: str) -> set[str]:
    """The trial identities a Tune group trains (as its trials will build their configs)."""
    base = cfg.from_flat(group["base"])
    return {trial_identity(with_fixes(base, fixes), seed, dataset_identity)
            for fixes in group["fixes"] for seed in group["seeds"]}


# ---------------------------------------------------------------- the driver

RESULT_STATES = ("finished", "collapsed")
"""Trial states whose final metrics enter the statistics."""


@dataclass
class TrialRecord:
    """How one cell × seed ended up, and where its run is."""

    trial: Trial
    status: str
    """'finished' | 'collapsed' (trained to the end; codes collapsed) | 'failed' | 'not run' (interrupted)."""
    source: str = ""
    """'trained' (by this invocation), 'resumed' (by an interrupted attempt of this ablation), 'reused' (other)."""
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


@dataclass
class AblationRun:
    """What run_ablation did: the plan, where it is recorded, and every trial's record."""

    plan: Plan
    parent_run_id: str
    tracking_uri: str
    experiment: str
    protocol: dict[str, Any]
    records: list[TrialRecord]

    @property
    def interrupted(self) -> bool:
        return any(r.status == "not run" for r in self.records)

    @property
    def topk(self) -> int:
        return next(iter(self.plan.cells.values())).config.topk

    def count(self, *, status: str | None = None, source: str | None = None) -> int:
        """Records with this status (any result state when None) and source."""
        return sum((r.status == status if status else r.status in RESULT_STATES)
                   and (source is None or r.source == source) for r in self.records)


def run_ablation(spec: AblationSpec, dataset: Path, *, tracking_uri: str | None = None, experiment: str = "agch",
                 device: str = "auto", rerun: bool = False, ray_address: str | None = None,
                 storage_dir: Path | None = None, on_result: Any = None, say: Any = print) -> AblationRun:
    """Train every cell × seed of `spec` not yet recorded, as Ray Tune trials under one MLflow parent run.

    Args:
        spec: the validated ablation.
        dataset: absolute path of the dataset file.
        tracking_uri: MLflow store (None: the embedded SQLite store).
        experiment: MLflow experiment of the parent and trial runs.
        device: 'auto', 'cpu' or 'cuda[:N]' for every trial.
        rerun: train everything again even when recorded (and never resume an interrupted attempt).
        ray_address: a Ray cluster; None starts a local Ray (or uses the one this process already started).
        storage_dir: Ray Tune's experiment folder (default: $AGCH_HOME/ray).
        on_result: called as on_result(cell_label, seed, metrics) as trial results arrive.
        say: where progress lines go.

    Returns:
        AblationRun; `analyse` turns it into the paired comparisons, `publish` records the report.
    """
    from agch.data import open_dataset
    from agch.paths import home
    from agch.tracking import Tracker, run_tags
    from agch.train import protocol_of

    tracker = Tracker(tracking_uri, experiment)
    with open_dataset(dataset) as data:
        plan = build_plan(spec, data.identity)
        first = next(iter(plan.cells.values())).config
        protocol = protocol_of(first, data)
        dataset_tags = {k: v for k, v in run_tags(first, data).items() if k.startswith("dataset.")}
    storage = (storage_dir or home() / "ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    parent = None if rerun else interrupted_parent(tracker, plan.identity)
    if parent is not None:
        say(f"resuming the interrupted run of this ablation (MLflow run {parent})")
        tracker.client.update_run(parent, status="RUNNING")
    else:
        parent = start_parent(tracker, plan, dataset_tags)
    groups_file = storage / f"ablation-{parent}.json"
    groups: list[dict[str, Any]] = json.loads(groups_file.read_text()) if groups_file.exists() else []
    runner = GroupRunner(plan, dataset, tracker.uri, experiment, parent, device, storage,
                         trial_resources(spec.resources, device), ray_address, on_result, say)
    try:
        before = {} if rerun else recorded_runs(tracker, plan.dataset_identity)
        pending = [t for t in plan.trials() if t.identity not in before]
        if len(pending) < len(plan.trials()):
            say(f"{len(plan.trials()) - len(pending)} of {len(plan.trials())} cell × seed runs are already "
                f"recorded in {tracker.uri}: reused, not retrained (--rerun forces them)")
        attempted: set[str] = set()
        complete = True
        for group in groups:  # an interrupted attempt's Tune experiments: continue them from their checkpoints
            members = group_identities(group, plan.dataset_identity)
            if complete and members & {t.identity for t in pending} and (storage / group["name"]).is_dir():
                say(f"resuming Ray Tune experiment {storage / group['name']}")
                complete = runner.run(group, resume=True)
                attempted |= members
        fresh = tune_groups(plan, [t for t in pending if t.identity not in attempted],
                            prefix=f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', spec.name)}-{parent[:8]}-{len(groups)}")
        if fresh:
            groups_file.write_text(json.dumps(groups + fresh, indent=1, default=str))
        for group in fresh:
            complete = complete and runner.run(group, resume=False)  # after an interruption, start nothing new
    except BaseException:
        tracker.end_run(parent, "KILLED")
        raise
    final = recorded_runs(tracker, plan.dataset_identity)
    records = [record_of(t, final.get(t.identity, []), runner.outcomes.get(t.identity), parent,
                         t.identity in before, rerun) for t in plan.trials()]
    return AblationRun(plan, parent, tracker.uri, experiment, protocol, records)


@dataclass
class GroupRunner:
    """Runs one Tune grid of an ablation through agch.runner and keeps each trial's outcome by identity."""

    plan: Plan
    dataset: Path
    tracking_uri: str
    experiment: str
    parent: str
    device: str
    storage: Path
    resources: dict[str, float]
    ray_address: str | None
    on_result: Any
    say: Any
    outcomes: dict[str, Any] = field(default_factory=dict)

    def run(self, group: dict[str, Any], resume: bool) -> bool:
        """Run (or restore) one grid; False when it ended early (interrupted)."""
        from ray import tune

        from agch.runner import RunContext, run_trials

        ctx = RunContext(dataset=str(self.dataset), tracking_uri=self.tracking_uri, experiment=self.experiment,
                         parent_run_id=self.parent, device=self.device, base=group["base"], group=group["name"])
        base = cfg.from_flat(group["base"])
        identity_of = lambda params: trial_identity(  # noqa: E731
            with_fixes(base, params["fixes"]), params["seed"], self.plan.dataset_identity)
        by_identity = {t.identity: t for t in self.plan.trials()}

        def name(params: dict[str, Any]) -> tuple[str, int] | None:
            trial = by_identity.get(identity_of(params))
            return (self.plan.cells[trial.cell].label, trial.seed) if trial is not None else None

        def relay(trial_id: str, params: dict[str, Any], metrics: dict[str, Any]) -> None:
            if self.on_result is not None and name(params) is not None:
                self.on_result(*name(params), metrics)

        def ended(outcome: Any) -> None:
            if outcome.status != "finished" and name(outcome.params) is not None:
                label, seed = name(outcome.params)
                self.say(f"  {label} seed {seed}: {outcome.status}: {outcome.reason}")

        size = len(group["fixes"]) * len(group["seeds"])
        found = run_trials(ctx, param_space={"fixes": tune.grid_search(group["fixes"]),
                                             "seed": tune.grid_search(group["seeds"])},
                           # Nothing is ranked (a grid, no scheduler); 'epoch' is the one key every report has.
                           metric="epoch", mode="max", resources=self.resources,
                           max_concurrent=self.plan.spec.max_concurrent or size, storage_dir=self.storage,
                           name=group["name"], ray_address=self.ray_address, resume=resume, on_result=relay,
                           on_complete=ended)
        self.outcomes.update({identity_of(o.params): o for o in found})
        return len(found) == size and all(o.status in ("finished", "failed") for o in found)


def record_of(trial: Trial, runs: list[Any], outcome: Any, parent: str, recorded_before: bool,
              rerun: bool) -> TrialRecord:
    """One trial's record from its completed runs and this invocation's Tune outcome."""
    if rerun:
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    if runs:
        run = pick_run(runs, parent)
        mine = run.data.tags.get("mlflow.parentRunId") == parent
        source = "reused" if not mine else ("resumed" if recorded_before else "trained")
        status = "finished" if run.info.status == "FINISHED" else "collapsed"
        return TrialRecord(trial, status, source, run.info.run_id, dict(run.data.metrics),
                           run.data.tags.get("agch.reason") or None)
    if outcome is not None and outcome.status == "failed":
        return TrialRecord(trial, "failed", "trained", outcome.run_id, dict(outcome.metrics), outcome.reason)
    return TrialRecord(trial, "not run", reason=getattr(outcome, "reason", None) or "interrupted")


def start_parent(tracker: Any, plan: Plan, dataset_tags: dict[str, str]) -> str:
    """The MLflow parent run of one ablation: its spec, cells and comparisons."""
    spec = plan.spec
    parent = tracker.start_run(f"ablation-{spec.name}", tags={
        "agch.kind": "ablation", "agch.group": spec.name, "agch.plan": plan.identity, **dataset_tags})
    tracker.log_params(parent, {
        "designs": ", ".join(f"{d.kind} ({d.preset})" for d in spec.designs),
        "fixes": ", ".join(spec.fixes), "seeds": ", ".join(map(str, spec.seeds)),
        "n_cells": len(plan.cells), "n_trials": len(plan.trials()),
        **{f"override.{k}": v for k, v in spec.overrides.items()}})
    cells = {c.label: {"identity": c.identity, **cfg.to_flat(c.config)} for c in plan.cells.values()}
    comparisons = [{"name": c.name, "on": [plan.cells[i].label for i in c.on],
                    "off": [plan.cells[i].label for i in c.off]} for c in plan.comparisons]
    tracker.log_files(parent, {"ablation.yaml": spec.to_dict(), "cells.yaml": cells,
                               "comparisons.yaml": {"comparisons": comparisons}})
    return parent


# ---------------------------------------------------------------- analysis and report

DIAGNOSTICS: dict[str, str] = {
    "unique_frac_image": "unique codes img", "unique_frac_text": "unique codes txt",
    "bit_balance_image": "bit balance img", "bit_balance_text": "bit balance txt",
    "pair_hamming": "pair Hamming",
}
"""Per-arm code statistics shown beside mAP (the log's fixes targeted them): fraction of distinct codes, mean
|bit mean| (0 = every bit +1 half the time), mean Hamming distance between the same pair's image and text codes."""


def map_metrics(topk: int) -> dict[str, str]:
    """Metric key → column label naming the protocol's metric and direction."""
    return {f"map{topk}_i2t": f"mAP@{topk} I->T", f"map{topk}_t2i": f"mAP@{topk} T->I",
            "mapall_i2t": "mAP@ALL I->T", "mapall_t2i": "mAP@ALL T->I"}


@dataclass(frozen=True)
class ComparisonResult:
    """One comparison's paired statistics per mAP metric and its arms' diagnostics (on, off)."""

    comparison: Comparison
    maps: dict[str, Any]
    diagnostics: dict[str, tuple[Any, Any]]


def arm_values(run: AblationRun, cells: tuple[str, ...], key: str) -> list[float | None]:
    """Per seed, the metric averaged over the arm's cells (a factorial arm has several); None if any is missing."""
    by = {(r.trial.cell, r.trial.seed): r.metrics.get(key) for r in run.records if r.status in RESULT_STATES}
    out = []
    for seed in run.plan.spec.seeds:
        values = [by.get((cell, seed)) for cell in cells]
        out.append(None if any(v is None for v in values) else sum(values) / len(values))
    return out


def analyse(run: AblationRun) -> list[ComparisonResult]:
    """Paired statistics (agch.stats) for every comparison of the plan."""
    from agch.stats import paired_compare, summarize

    results = []
    for comp in run.plan.comparisons:
        maps = {key: paired_compare(arm_values(run, comp.on, key), arm_values(run, comp.off, key))
                for key in map_metrics(run.topk)}
        diags = {key: (summarize(arm_values(run, comp.on, key)), summarize(arm_values(run, comp.off, key)))
                 for key in DIAGNOSTICS}
        results.append(ComparisonResult(comp, maps, diags))
    return results


def protocol_line(run: AblationRun) -> str:
    """What every mAP in the report means (protocol.md)."""
    p = run.protocol
    return (f"mAP@{run.topk} and mAP@ALL (Hamming ranking, relevance = >=1 shared label), {p['bits']} bits, "
            f"{p['split']} split ({p['n_query']} queries vs {p['n_database']} database), dataset {p['dataset']} "
            f"(synthetic parts: {p['synthetic']})")


def report_tables(run: AblationRun, results: list[ComparisonResult]) -> dict[str, str]:
    """The report as console text, markdown and CSV (comparisons and trials)."""
    from agch.stats import CONFIDENCE, csv_text, interval, markdown_table, p_text, text_table

    labels = map_metrics(run.topk)
    ci = f"{CONFIDENCE:.0%} CI"
    head = ["comparison", "metric", "n", "on (mean ± std)", "off (mean ± std)", f"Δ on−off [{ci}]", "p (t)",
            "p (Wilcoxon)", "verdict"]
    rows = [[r.comparison.name, labels[k], m.n, m.on.text(), m.off.text(), interval(m), p_text(m.p_t),
             p_text(m.p_wilcoxon), m.verdict] for r in results for k, m in r.maps.items()]
    diag_head = ["comparison", "arm", *DIAGNOSTICS.values()]
    diag_rows = [[r.comparison.name, arm, *(r.diagnostics[k][i].text(3) for k in DIAGNOSTICS)]
                 for r in results for i, arm in enumerate(("on", "off"))]
    p = run.protocol
    csv_head = ["comparison", "fix", "design", "metric", "bits", "split", "dataset", "synthetic", "n", "on_mean",
                "on_std", "off_mean", "off_std", "diff_mean", "ci_low", "ci_high", "p_t", "p_wilcoxon", "verdict"]
    csv_rows = [[r.comparison.name, r.comparison.fix, r.comparison.design, labels[k], p["bits"], p["split"],
                 p["dataset"], p["synthetic"], m.n, m.on.mean, m.on.std, m.off.mean, m.off.std, m.diff_mean,
                 m.ci_low, m.ci_high, m.p_t, m.p_wilcoxon, m.verdict] for r in results for k, m in r.maps.items()]
    keys = [*labels, *DIAGNOSTICS]
    trial_head = ["cell", "seed", "status", "source", "run_id", "reason",
                  *(f"{labels[k]} ({p['bits']} bits, {p['split']} split)" if k in labels else k for k in keys)]
    cell_label = {c.identity: c.label for c in run.plan.cells.values()}
    trial_rows = [[cell_label[r.trial.cell], r.trial.seed, r.status, r.source, r.run_id or "", r.reason or "",
                   *(r.metrics.get(k, "") for k in keys)] for r in run.records]
    short = lambda v: f"{v:.4f}" if isinstance(v, float) else v  # noqa: E731
    trial_md = [[short(v) for v in row] for row in trial_rows]
    notes = report_notes(run)
    console = "\n\n".join([f"protocol: {protocol_line(run)}", text_table(head, rows),
                           "code diagnostics per arm (mean ± std over seeds):\n" + text_table(diag_head, diag_rows),
                           "\n".join(notes)])
    markdown = "\n\n".join([f"# Ablation {run.plan.spec.name}", f"Protocol: {protocol_line(run)}.",
                            markdown_table(head, rows), "## Code diagnostics per arm",
                            markdown_table(diag_head, diag_rows), "## Notes", "\n".join(f"- {n}" for n in notes),
                            "## Trials", markdown_table(trial_head, trial_md)])
    return {"console": console, "results.md": markdown + "\n", "comparisons.csv": csv_text(csv_head, csv_rows),
            "trials.csv": csv_text(trial_head, trial_rows)}


def report_notes(run: AblationRun) -> list[str]:
    """How to read the verdicts, and what was reused, failed or not run."""
    from agch.stats import CONFIDENCE, min_wilcoxon_p

    n = len(run.plan.spec.seeds)
    notes = [f"verdict: the {CONFIDENCE:.0%} t interval of the paired difference excludes 0 ('helps' above, 'hurts' "
             f"below); one verdict per row, not corrected for the {len(run.plan.comparisons) * 4} rows of this table"]
    if n < 2:
        notes.append(f"{n} seed: no verdict is possible; pass --seeds 2 or more ({DEFAULT_SEEDS} recommended)")
    else:
        notes.append(f"with {n} seeds the exact Wilcoxon p cannot go below {min_wilcoxon_p(n):.3f}")
    notes.append(f"{len(run.records)} cell × seed runs: {run.count(source='trained')} trained now, "
                 f"{run.count(source='reused')} reused from earlier runs, {run.count(source='resumed')} finished "
                 f"before an interruption, {run.count(status='failed')} failed, {run.count(status='not run')} not run")
    collapsed = run.count(status="collapsed")
    if collapsed:
        notes.append(f"{collapsed} run(s) ended with collapsed codes (< 5% unique): their mAP counts (a collapse is "
                     "what some fixes prevent), though MLflow shows them FAILED")
    for r in run.records:
        if r.status == "failed":
            notes.append(f"failed: {run.plan.cells[r.trial.cell].label} seed {r.trial.seed}: {r.reason}")
    if run.interrupted:
        notes.append("interrupted: run the same command again to resume (finished runs are not retrained)")
    return notes


def publish(run: AblationRun, results: list[ComparisonResult], tables: dict[str, str]) -> None:
    """Log the report and the effect plot on the parent run and close it (KILLED when interrupted)."""
    from agch.stats import effect_plot
    from agch.tracking import Tracker

    tracker = Tracker(run.tracking_uri, run.experiment)
    labels = map_metrics(run.topk)
    panels = {f"{label}": [(r.comparison.name, r.maps[key]) for r in results] for key, label in labels.items()}
    plot = effect_plot(panels, f"ablation {run.plan.spec.name}, {len(run.plan.spec.seeds)} seeds, mean paired "
                               f"difference with its 95% t interval\n{protocol_line(run)}")
    tracker.log_files(run.parent_run_id, {name: text for name, text in tables.items() if name != "console"})
    tracker.log_files(run.parent_run_id, {"effects.png": plot})
    tracker.set_tags(run.parent_run_id, {
        "agch.trained": run.count(source="trained"), "agch.reused": run.count(source="reused"),
        "agch.resumed": run.count(source="resumed"), "agch.collapsed": run.count(status="collapsed"),
        "agch.failed": run.count(status="failed"), "agch.not_run": run.count(status="not run")})
    tracker.end_run(run.parent_run_id, "KILLED" if run.interrupted else "FINISHED")
