"""Optuna inside Ray Tune: StudySearch maps Tune's searcher hooks onto an Optuna study's public ask / report / tell.
Used by agch.experiments.search's driver; the study itself (directions, metric names) is created there."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from agch.runs.context import FINAL, RUN_ID, SEED_OFFSET, TRIAL_NUMBER

class StudySearch(Searcher):
    """A Ray Tune searcher over a persistent Optuna study, with results keyed by epoch and repeated seeds.

    - Each suggestion is one `study.ask` over the space's distributions; with seeds > 1 it runs as that many Tune
      trials (SEED_OFFSET 0..seeds-1) and Optuna is told the mean once all have ended.
    - A result carrying the objective is an Optuna intermediate value at its epoch (single objective); one without
      (an epoch that was not evaluated) is skipped.
    - A trial that ended without its final report was early-stopped: Optuna records it PRUNED, with the result that
      stopped it as its last intermediate value (Tune hands that result to the scheduler, not to on_trial_result),
      so its value is the one MLflow and the console hold. Collapsed codes are a measured value like any other
      (user attr collapsed = True): TPE ignores failed trials, so a collapse told as FAIL would leave it sampling
      where codes collapse.
    - Every suggestion carries its Optuna trial number (TRIAL_NUMBER), so trials with equal settings are distinct
      places for agch.runs.trial.trial_slot; each Optuna trial carries the project's name for it (user attr `name`,
      't2') and, once ended, its MLflow runs (`mlflow_run_ids`, `mlflow_runs`: `run_link` with {} for the id).
    - Tune saves this object with its experiment, at most a second apart. A driver killed in between loses the
      trials it had just asked for (RUNNING in the study, unknown to the restored searcher); the restored
      experiment replaces them with new trials. The searcher hands the lost Optuna trials out again, first, so the
      replacements continue the lost trials' MLflow runs and no Optuna trial is asked twice. It continues each with
      `optuna.trial.Trial(study, trial_id)`, the trial id from the storage's public
      get_trial_id_from_study_id_trial_number: Optuna documents that constructor as public but not recommended (ask
      and optimize build trials); a trial asked by another process has no other way back.

    Everything here is public API of Ray Tune (Searcher) and Optuna (Study, Trial, BaseStorage).
    """

    def __init__(self, *, space: dict[str, Any], metrics: list[str], mode: str, study: Any, storage: Any,
                 seeds: int = 1, run_link: str = "{}"):
        super().__init__(metric=metrics[0], mode=mode)
        self.space, self.metrics, self.study, self.storage = space, metrics, study, storage
        self.seeds, self.run_link = seeds, run_link
        self.trials: dict[str, Any] = {}
        """Tune trial id -> the Optuna trial (optuna.trial.Trial) of its suggestion."""
        self.groups: dict[str, dict] = {}
        """Tune trial id -> its suggestion: primary (Tune id), params, members, ended (per member), runs."""
        self.open_group: dict | None = None
        self.lost: list[Any] = []
        """Optuna trials to hand out again before asking new ones (see restore)."""

    # --------------------------------------------------------------------------------------------- Tune's hooks
    def suggest(self, trial_id: str) -> dict | None:
        group = self.open_group
        if group is None or len(group["members"]) == self.seeds:
            trial = self.lost.pop(0) if self.lost else self._ask()
            params = {**trial.params, TRIAL_NUMBER: trial.number}
            trial.set_user_attr("name", f"t{trial.number}")
            group = self.open_group = {"primary": trial_id, "params": params, "members": [], "ended": {}, "runs": {}}
            self.trials[trial_id] = trial
        group["members"].append(trial_id)
        self.groups[trial_id] = group
        self.trials[group["primary"]].set_user_attr("tune_trial_ids", list(group["members"]))
        offset = {SEED_OFFSET: len(group["members"]) - 1} if self.seeds > 1 else {}
        return {**group["params"], **offset}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.seeds == 1 and len(self.metrics) == 1 and self.metric in result and trial_id in self.trials:
            self._report(self.trials[trial_id], float(result[self.metric]), int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        group = self.groups.get(trial_id)
        if group is None or trial_id in group["ended"]:
            return
        result = result or {}
        if result.get(RUN_ID):
            group["runs"][trial_id] = result[RUN_ID]
        if error or not result.get(FINAL):
            group["ended"][trial_id] = "failed" if error else "pruned"
        else:
            group["ended"][trial_id] = [float(result[m]) for m in self.metrics]
            if result.get("collapsed"):  # a measured value all the same: the sampler learns where codes collapse
                self.trials[group["primary"]].set_user_attr("collapsed", True)
        if not error:
            self.on_trial_result(trial_id, result)  # the last value: the final epoch's, or the one that stopped it
        if len(group["ended"]) == self.seeds:
            self._tell(group)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(_upgrade(pickle.load(file)))
        from optuna.trial import Trial

        known = {trial.number for trial in self.trials.values()}
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        self.lost = [Trial(self.study, self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number))
                     for t in self.study.get_trials(deepcopy=False, states=(_state("RUNNING"),))
                     if t.number not in known]

    def __setstate__(self, state: dict) -> None:  # Tune's tuner.pkl holds the searcher as the search started
        self.__dict__.update(_upgrade(state))

    # ----------------------------------------------------------------------------------------------- Optuna
    def _ask(self) -> Any:
        """A new Optuna trial over the space."""
        return self.study.ask(fixed_distributions=self.space)

    @staticmethod
    def _report(trial: Any, value: float, step: int) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        with warnings.catch_warnings():  # a restored trial reports its checkpoint's epoch again
            warnings.simplefilter("ignore")
            try:
                trial.report(value, step)
            except UpdateFinishedTrialError:
                pass  # told already (before a driver restart)

    def _tell(self, group: dict) -> None:
        """Tell Optuna how the suggestion ended: FAIL if a member failed, else PRUNED if one was stopped, else the
        mean over its seeds; with its MLflow runs as user attributes."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.samplers import GridSampler

        ended = list(group["ended"].values())
        values, state = None, "COMPLETE"
        if "failed" in ended:
            state = "FAIL"
        elif "pruned" in ended:
            state = "PRUNED"
        else:
            means = np.mean(ended, axis=0).tolist()
            values = means[0] if len(self.metrics) == 1 else means
        trial = self.trials[group["primary"]]
        runs = [group["runs"][t] for t in group["members"] if t in group["runs"]]
        try:
            if runs:
                trial.set_user_attr("mlflow_run_ids", runs)
                trial.set_user_attr("mlflow_runs", [self.run_link.format(run) for run in runs])
            self.study.tell(trial, values, state=_state(state))
        except UpdateFinishedTrialError:
            pass  # told already (before a driver restart)
        except RuntimeError as err:
            # Optuna's GridSampler calls study.stop() once its grid is used up, which Optuna allows only inside
            # Study.optimize: Tune drives this study and ends it after its trials. tell() stores the trial first.
            if not (isinstance(self.study.sampler, GridSampler) and "Study.stop" in str(err)):
                raise


def _upgrade(state: dict) -> dict:
    """The state of a searcher saved before 2026-12-03, when StudySearch subclassed Ray's OptunaSearch (its study
    in _ot_study, its Optuna trials in _ot_trials), in this class's fields; any other state as it is. Trials such a
    driver lost when it was killed are found as any are (restore)."""
    if "_ot_study" not in state:
        return state
    metric = state["_metric"]
    groups = state.get("groups", {})
    for group in groups.values():
        group.setdefault("runs", {})
    mode = state["_mode"]
    return {"_metric": metric if isinstance(metric, str) else metric[0],
            "_mode": mode if isinstance(mode, str) else mode[0],
            "space": state["_space"], "metrics": [metric] if isinstance(metric, str) else list(metric),
            "study": state["_ot_study"], "storage": state["_storage"], "seeds": state.get("seeds", 1),
            "run_link": state.get("run_link", "{}"), "trials": state["_ot_trials"], "groups": groups,
            "open_group": state.get("open_group"), "lost": []}


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]
