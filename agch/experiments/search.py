"""Hyperparameter search: the Optuna sampler inside Ray Tune, and the driver (`start`, `resume`).

`start` runs a space (agch.experiments.search_space.load_space) as one MLflow parent run, one persistent Optuna study
and Ray Tune trials through agch.runs.driver; `resume` continues one that was interrupted. What a search keeps between
sessions: agch.experiments.search_state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agch import config as cfg
from agch.errors import need
from agch.experiments.search_space import SearchSpace, make_sampler, make_scheduler
from agch.experiments.search_state import (SearchReport, SearchState, default_storage_url, open_storage,
                                           searches_root)
from agch.runs.context import RunContext
from agch.runs.tracking import open_tracker, redact
from agch.runs.ui import describe_experiment, run_page, save_view, set_description, ui_hint, ui_link
from agch.runs.names import Tag, describe_metric

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def __getattr__(name: str) -> Any:
    if name == "StudySearch":  # Tune states of searches from before the class moved to agch.study_search
        from agch.runs import searcher

        return searcher.StudySearch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def start(space: SearchSpace, *, name: str | None = None, tracking_uri: str | None = None,
          experiment: str = "agch-search", storage_url: str | None = None, ray_address: str | None = None,
          device: str = "auto", verbose: bool = False, listener: Any = None) -> SearchReport:
    """Run a new search: check every store first, then one MLflow parent run, one Optuna study, Ray Tune trials.

    `listener` (optional, e.g. agch.cli.search.LiveTable) gets on_step(text) before each step that takes seconds,
    on_start(name, space, protocol, references), on_result(trial_id, params, result) and on_complete(outcome).

    Example:
        >>> report = start(load_space("spaces/delta_gamma.yaml", trials=2, epochs=1))  # doctest: +SKIP
        >>> report.best["params"]  # doctest: +SKIP
    """
    from datetime import datetime

    from agch.paths import default_dataset
    from agch.runs.driver import start_ray

    name = name or f"{Path(space.source).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    need(NAME_PATTERN.fullmatch(name) is not None, "--name", f"use letters, digits, '.', '_', '-'; got {name!r}")
    need(not (searches_root() / name).exists(), "--name", f"a search named {name} exists; continue it with "
         f"`agch-search resume {name}` or choose another name")
    say = _steps(listener)
    say("opening the MLflow tracking store and the Optuna storage")
    tracker = open_tracker(tracking_uri, experiment, wait=False)
    storage_url = storage_url or default_storage_url(tracker.uri)
    storage = open_storage(storage_url)
    need(name not in [s.study_name for s in storage.get_all_studies()], "--name",
         f"the Optuna storage {redact(storage_url)} already holds a study named {name}")
    need(space.gpus > 0 or not device.startswith("cuda"), "--device", "cuda needs resources.gpus > 0")
    dataset = Path(space.dataset) if space.dataset else default_dataset()
    say("checking the dataset; the references on the trials' queries (random ranking, CCA+ITQ) are computed once "
        "per dataset and code length (~30 s on 2 CPU cores), then cached")
    described, short, references = _protocol(dataset, space)
    protocol = f"{' & '.join(describe_metric(m) for m in space.metrics)}, {described}"
    say(f"connecting to the Ray cluster at {ray_address}" if ray_address else "starting a local Ray")
    start_ray(ray_address, {"cpu": space.cpus, "gpu": space.gpus}, verbose=verbose)

    parent = _start_parent(tracker, name, space, protocol, redact(storage_url), references, dataset)
    _create_study(storage, name, space, tracker, parent, protocol, short, verbose)
    ctx = RunContext(dataset=str(dataset), tracking_uri=tracker.uri, experiment=experiment, parent_run_id=parent,
                     device=device, base=space.base, group=name, name=name, kind="search",
                     stop_on_collapse=space.stop_on_collapse)
    state = SearchState(name=name, space=space, context=ctx, storage_url=storage_url, ray_address=ray_address,
                        protocol=protocol, references=references)
    state.folder.mkdir(parents=True)
    state.save()
    tracker.log_files(parent, {Path(space.source).name: space.text, "search.json": state.to_json(redacted=True)})
    return _drive(state, resume=False, verbose=verbose, listener=listener)


def resume(name: str, *, ray_address: str | None = None, verbose: bool = False, listener: Any = None) -> SearchReport:
    """Continue an interrupted search: finished trials are not rerun and no trial gets a second MLflow run."""
    from agch.runs.driver import start_ray

    state = SearchState.load(name)
    if state.finished:
        return _finish(state, None, interrupted=False, notes=[f"search {name} had already finished; nothing was run"])
    state.ray_address = ray_address or state.ray_address
    say = _steps(listener)
    say("opening the MLflow tracking store and the Optuna storage")
    tracker = open_tracker(state.context.tracking_uri, state.context.experiment, wait=False)
    open_storage(state.storage_url)
    say(f"connecting to the Ray cluster at {state.ray_address}" if state.ray_address else "starting a local Ray")
    start_ray(state.ray_address, {"cpu": state.space.cpus, "gpu": state.space.gpus}, verbose=verbose)
    tracker.reopen(state.context.parent_run_id)
    return _drive(state, resume=True, verbose=verbose, listener=listener)


def _protocol(dataset: Path, space: SearchSpace) -> tuple[str, str, dict[str, float]]:
    """Opens (so validates) the dataset; what the objective's numbers will mean (all but the metric's name) in full
    and in short, and the reference scores (random ranking, CCA+ITQ at the base bits) on the same queries."""
    from agch.data.dataset import open_dataset
    from agch.evaluation.protocol import describe_protocol, protocol_of, short_protocol
    from agch.method.baselines import reference_scores

    base = cfg.from_flat(space.base)
    with open_dataset(dataset) as data:
        protocol = protocol_of(base, data)
        references = reference_scores(base, data)
    if "bits" in [p.name for p in space.parameters]:
        protocol["bits"] = f"searched (references at {base.bits})"
    described = describe_protocol(protocol)
    if base.eval_split == "test":
        described += " -- settings chosen on the test queries: the best score is optimistic"
    return described, short_protocol(protocol), references


def _steps(listener: Any) -> Any:
    """The listener's on_step(text), called before each step that takes seconds; a no-op without one."""
    return getattr(listener, "on_step", None) or (lambda text: None)


def _start_parent(tracker: Any, name: str, space: SearchSpace, protocol: str, storage: str,
                  references: dict[str, float], dataset: Path) -> str:
    """The search's MLflow parent run (its settings as params, the references as metrics) and the saved view of
    its trials that the printed link opens."""
    parent = tracker.start_run(name, tags={Tag.KIND: "search", Tag.GROUP: name, Tag.NAME: name,
                                           "optuna.study": name, "optuna.storage": storage, Tag.PROTOCOL: protocol})
    tracker.log_params(parent, {
        "space_file": space.source, "preset": space.preset, "searched": ",".join(p.name for p in space.parameters),
        "sampler": space.sampler, "sampler_seed": space.sampler_seed, "sampler_options": space.sampler_options,
        "scheduler": space.scheduler, "epochs": space.epochs, "grace_period": space.grace_period,
        "reduction_factor": space.reduction_factor, "trials": space.trials, "seeds": space.seeds,
        "concurrency": space.concurrency, "cpus": space.cpus, "gpus": space.gpus, "time_budget_s": space.time_budget_s,
        "stop_on_collapse": space.stop_on_collapse, "objective": ",".join(space.metrics), "mode": space.mode,
        "dataset": str(dataset)})
    tracker.log_metrics(parent, {f"reference_{k}": v for k, v in references.items()}, step=0)
    save_view(tracker, name, space.metrics[0],
              first=[f"metrics.`{m}`" for m in space.metrics] + [f"params.`{p.name}`" for p in space.parameters],
              then=["metrics.`epoch`", f"tags.`{Tag.STATUS}`"] + [f"metrics.`{m}`" for m in ("mapall_mean",)
                                                                if m not in space.metrics])
    return parent


def _create_study(storage: Any, name: str, space: SearchSpace, tracker: Any, parent: str, protocol: str,
                  short: str, verbose: bool) -> None:
    """The search's Optuna study: its objectives named with their protocol, short enough for optuna-dashboard's axis
    labels; the whole protocol and the MLflow parent run as study user attributes. The searcher loads it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    direction = {"max": "maximize", "min": "minimize"}[space.mode]
    study = optuna.create_study(study_name=name, storage=storage, directions=[direction] * len(space.metrics))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([f"{describe_metric(m)}, {short}" for m in space.metrics])
    study.set_user_attr("protocol", protocol)
    study.set_user_attr("mlflow_parent_run", run_page(tracker, parent))


def _drive(state: SearchState, *, resume: bool, verbose: bool, listener: Any) -> SearchReport:
    """Run or continue the Tune trials, then write the search's summary artifacts whatever happened."""
    import optuna

    from agch.runs.driver import run_trials
    from agch.runs.searcher import StudySearch
    from agch.runs.tracking import outage_hint

    space, ctx = state.space, state.context
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    tracker, storage = open_tracker(ctx.tracking_uri, ctx.experiment), open_storage(state.storage_url)
    search_alg = StudySearch(
        space={p.name: p.distribution() for p in space.parameters}, metrics=space.metrics, mode=space.mode,
        study=optuna.load_study(study_name=state.name, storage=storage, sampler=make_sampler(space)),
        storage=storage, seeds=space.seeds, run_link=run_page(tracker, "{}"))
    if listener is not None:
        listener.on_start(state.name, space, state.protocol, state.references)
    interrupted, found = False, None
    with outage_hint(ctx.tracking_uri, f"agch-search resume {state.name}"):
        try:
            found = run_trials(
                ctx, param_space={}, num_samples=space.trials * space.seeds, search_alg=search_alg,
                scheduler=make_scheduler(space), metric=space.metrics[0], mode=space.mode,
                resources={"cpu": space.cpus, "gpu": space.gpus}, max_concurrent=space.concurrency,
                storage_dir=searches_root(), name=state.name, ray_address=state.ray_address, resume=resume,
                time_budget_s=space.time_budget_s, verbose=verbose, on_result=getattr(listener, "on_result", None),
                on_complete=getattr(listener, "on_complete", None))
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            with contextlib.suppress(Exception):  # the error in flight matters more than closing the parent
                open_tracker(ctx.tracking_uri, ctx.experiment, wait=False).end_run(ctx.parent_run_id, "FAILED")
            raise
        return _finish(state, found, interrupted=interrupted, notes=list(space.notes), say=_steps(listener))


def _finish(state: SearchState, found: list | None, *, interrupted: bool, notes: list[str],
            say: Any = lambda text: None) -> SearchReport:
    """The chosen trial and its test run, then (unless `found` is None: a search that had already finished, whose
    report records nothing) everything onto the parent run, which is closed."""
    import optuna

    from agch.experiments.search_plots import draw_plots
    from agch.runs.driver import outcomes

    space, ctx, name = state.space, state.context, state.name
    tracker = open_tracker(ctx.tracking_uri, ctx.experiment)
    trials = outcomes(ctx) if found is None else found
    interrupted = interrupted or len(trials) < space.trials * space.seeds or any(
        o.status == "interrupted" for o in trials)
    study = optuna.load_study(study_name=name, storage=open_storage(state.storage_url))
    chosen = _chosen(study, space)
    best = None if chosen is None else _best(chosen, study, state, trials, tracker)
    with ThreadPoolExecutor(max_workers=1) as background:
        # the plots need only the finished study: drawn while the test run starts and trains (its new process
        # imports on one core while the driver waits)
        plotted = background.submit(draw_plots, study, space, state.protocol) if found is not None else None
        if found is not None and best is not None and not interrupted and space.base["eval_split"] == "validation":
            say(f"training the chosen settings {best['name']} once more on the whole training split "
                f"({space.seeds} seed(s)) and scoring them once on the test queries")
            state.test, state.test_protocol = _test_best(state, chosen.params, f"chosen settings {best['name']}")
            interrupted = state.test is None and state.test_protocol is None
    report = SearchReport(name=name, interrupted=interrupted, outcomes=trials, best=best,
                          best_config=state.folder / "best_config.yaml" if best else None, protocol=state.protocol,
                          references=state.references, test=state.test, test_protocol=state.test_protocol,
                          tracking_uri=ctx.tracking_uri, experiment=ctx.experiment, parent_run_id=ctx.parent_run_id,
                          storage_url=redact(state.storage_url), notes=notes,
                          ui=ui_hint(tracker, name, space.metrics[0], ctx.parent_run_id))
    if found is not None:
        say("writing the plots, trials.csv and the summary onto the search's parent run")
        plots, skipped = plotted.result()
        notes += skipped
        _record_end(state, tracker, study, trials, chosen, best, plots, interrupted)
    return report


def _chosen(study: Any, space: SearchSpace) -> Any | None:
    """The finished Optuna trial the search chooses (the best; with two objectives, the Pareto front's best sum)."""
    import optuna

    if not [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
        return None
    front = [study.best_trial] if len(space.metrics) == 1 else study.best_trials
    return max(front, key=lambda t: (1 if space.mode == "max" else -1) * sum(t.values))


def _best(chosen: Any, study: Any, state: SearchState, trials: list, tracker: Any) -> dict[str, Any]:
    """The chosen trial as best_trial.json holds it: its name, Optuna number, params, values, MLflow runs."""
    ids = chosen.user_attrs.get("tune_trial_ids", [])
    runs = [o for o in trials if o.trial_id in ids]
    front = [study.best_trial] if len(state.space.metrics) == 1 else study.best_trials
    return {"name": chosen.user_attrs.get("name", f"t{chosen.number}"), "optuna_trial": chosen.number,
            "params": chosen.params, "values": dict(zip(state.space.metrics, chosen.values, strict=True)),
            "run_ids": [o.run_id for o in runs], "run_names": [o.name for o in runs],
            "run_links": [run_page(tracker, o.run_id) for o in runs], "tune_trial_ids": ids,
            "pareto_front": [t.number for t in front], "protocol": state.protocol}


def _record_end(state: SearchState, tracker: Any, study: Any, trials: list, chosen: Any | None,
                best: dict | None, plots: dict[str, bytes], interrupted: bool) -> None:
    """The search's end onto its parent run (best settings, trial table, plots, counts, descriptions), the
    experiment's description, and its state; the parent closed (KILLED when interrupted: a resume continues it)."""
    from agch.experiments.results import experiment_note, search_table
    from agch.runs.context import trial_config
    from agch.runs.driver import STATES

    ctx, parent = state.context, state.context.parent_run_id
    files: dict[str, Any] = dict(plots)
    if best is not None:
        # the chosen settings, trained and scored as the final test run is: on the test queries
        config = {"preset": state.space.preset, **cfg.to_flat(trial_config(ctx, chosen.params)), "eval_split": "test"}
        (state.folder / "best_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        files.update({"best_trial.json": json.dumps(best, indent=2, default=str), "best_config.yaml": config})
        done = sum(t.state.name == "COMPLETE" for t in study.trials)
        tracker.log_metrics(parent, {f"best_{m}": v for m, v in best["values"].items()}, step=done)
        # tags, not params: an interrupted search records its best so far, and a resume may change it
        tracker.set_tags(parent, {Tag.BEST_TRIAL: best["name"], Tag.BEST_TUNE_TRIALS: ",".join(
            best["tune_trial_ids"]), Tag.BEST_RUN: ",".join(best["run_ids"]),
                                  **{f"{Tag.BEST}{k}": v for k, v in chosen.params.items()}})
    if study.trials:
        files["trials.csv"] = _trials_csv(study, state.space, trials)
    tracker.log_metrics(parent, {f"trials_{s}": sum(o.status == s for o in trials) for s in STATES},
                        step=len(trials))
    tracker.log_files(parent, files)
    tracker.set_tags(parent, {Tag.SEARCH_STATE: "interrupted" if interrupted else "finished"})
    run = tracker.run(parent)
    set_description(tracker, parent, search_table(tracker, state.name, markdown=True, parent=run))
    describe_experiment(tracker, experiment_note(tracker, state.name, run,
                                                 ui_link(tracker, state.name, state.space.metrics[0])))
    tracker.end_run(parent, "KILLED" if interrupted else "FINISHED")
    state.finished = not interrupted
    state.save()


def _trials_csv(study: Any, space: SearchSpace, trials: list) -> str:
    """One row per Optuna trial: its name (t2), state, objective columns named by their protocol, params, how its
    MLflow run ended (status, epochs) and the run ids; Optuna's internal columns left out."""
    multi = len(space.metrics) > 1
    frame = study.trials_dataframe(attrs=("number", "values" if multi else "value", "params", "state", "duration",
                                          "datetime_start", "user_attrs"))
    names = [describe_metric(m) for m in space.metrics]
    # Optuna names the objective columns value/values_0... or, when the study names its metrics, by those names
    objective = [c for c in frame.columns if c.startswith("value")]
    frame = frame.rename(columns={**dict(zip(objective, names, strict=True)), "number": "optuna_trial",
                                  "state": "optuna_state"})
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("user_attrs_")])
    outcome = {o.trial_id: o for o in trials}
    ended = [[outcome[i] for i in t.user_attrs.get("tune_trial_ids", []) if i in outcome] for t in study.trials]
    frame["trial"] = [t.user_attrs.get("name", f"t{t.number}") for t in study.trials]
    frame["status"] = [";".join(o.status for o in runs) for runs in ended]
    frame["epochs"] = [";".join(str(o.epochs) for o in runs) for runs in ended]
    frame["run_ids"] = [";".join(o.run_id or "" for o in runs) for runs in ended]
    first = ["trial", "status", "epochs", *names, *(f"params_{p.name}" for p in space.parameters)]
    return frame[first + [c for c in frame.columns if c not in first]].to_csv(index=False)


def _test_best(state: SearchState, params: dict, label: str) -> tuple[dict | None, str | None]:
    """Train the chosen settings once more on the whole training split (every seed of the search) and score them
    on the test queries: the search's one look at them. Logged on the parent run as test_* metrics; the run is
    tagged agch.role=test and named 'test: ' + `label` + the settings.

    Returns (mean test metrics, their protocol); (None, None) when interrupted (a resume runs it again; a finished
    test run is not retrained), (None, reason) when it failed.
    """
    from ray import tune

    from agch.runs.context import SEED_OFFSET, trial_config
    from agch.runs.driver import run_trials

    space, ctx = state.space, state.context
    test_ctx = dataclasses.replace(ctx, base={**ctx.base, "eval_split": "test"}, group=f"{ctx.group}.test",
                                   stop_on_collapse=False, role="test", label=label)
    seeds = {SEED_OFFSET: tune.grid_search(list(range(space.seeds)))} if space.seeds > 1 else {}
    found = run_trials(test_ctx, param_space={**params, **seeds}, metric="epoch", mode="max",
                       resources={"cpu": space.cpus, "gpu": space.gpus}, max_concurrent=space.concurrency,
                       storage_dir=state.folder, name="test", ray_address=state.ray_address,
                       resume=(state.folder / "test").is_dir())
    if any(o.status == "interrupted" for o in found) or len(found) < space.seeds:
        return None, None
    if any(o.status != "finished" for o in found):
        return None, "; ".join(f"test run failed: {o.reason}" for o in found if o.status != "finished")
    keys = sorted(set.intersection(*(set(o.metrics) for o in found)))
    means = {key: float(np.mean([o.metrics[key] for o in found])) for key in keys}
    tracker = open_tracker(ctx.tracking_uri, ctx.experiment)
    tracker.log_metrics(ctx.parent_run_id, {f"test_{k}": v for k, v in means.items() if k.startswith("map")},
                        step=0)
    from agch.data.dataset import open_dataset
    from agch.evaluation.protocol import describe_protocol, protocol_of

    with open_dataset(ctx.dataset) as data:
        config = trial_config(test_ctx, params)
        protocol = (f"{describe_protocol(protocol_of(config, data))}, mean of {len(found)} seed(s), trained on "
                    "the whole training split")
    tracker.set_tags(ctx.parent_run_id, {Tag.TEST_PROTOCOL: protocol,
                                         Tag.TEST_RUNS: ",".join(o.run_id for o in found)})
    return means, protocol
