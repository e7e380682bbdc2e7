"""Optuna inside Ray Tune: StudySearch, Ray's OptunaSearch on a persistent study with seed groups, collapse and
restore handled (see its docstring). Used by agch.search's driver."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np


def __getattr__(name: str) -> Any:
    # Ray Tune takes seconds to import; build the OptunaSearch adapter on first use so that validating a space file
    # stays fast. Pickle finds the class under this module's name, so Tune can save and restore it.
    if name == "StudySearch":
        globals()[name] = _study_search_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _study_search_class() -> type:
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.samplers import GridSampler
    from optuna.trial import Trial, TrialState
    from ray.tune.search.optuna import OptunaSearch

    from agch.trial import FINAL, RUN_ID, SEED_OFFSET, TRIAL_NUMBER

    class StudySearch(OptunaSearch):
        """Ray's OptunaSearch on a persistent study, with results keyed by epoch and repeated seeds.

        - A result without the objective (an epoch that was not evaluated) is skipped; the others are Optuna
          intermediate values at their epoch.
        - With seeds > 1 each suggestion runs as that many Tune trials (SEED_OFFSET 0..seeds-1) and Optuna is told
          the mean once all have ended. The groups are part of this object, which Tune saves and restores.
        - A trial that ended without its final report was early-stopped: Optuna records it as pruned, with the
          result that stopped it as its last intermediate value (Tune hands that result to the scheduler, not to
          the searcher's on_trial_result), so its value is the one MLflow and the console hold. One whose codes
          collapsed reports its measured value like any other (user attr collapsed = True): TPE ignores failed
          trials, so a collapse reported as FAIL would leave it sampling where codes collapse.
        - Each Optuna trial carries the project's name for it (user attr `name`, 't2', as in its MLflow run's
          name) and, once ended, its MLflow run ids and links (`mlflow_run_ids`, `mlflow_runs`; `run_link` is the
          UI's run page with {} for the id).
        - Every suggestion carries its Optuna trial number (TRIAL_NUMBER), so that trials with equal settings are
          distinct places for agch.trial.trial_slot.
        - On restore, Optuna trials asked after Tune last saved its state (trials a killed driver had just started)
          are handed out again, first, to the trials the restored driver starts in their place: those continue the
          lost trials' MLflow runs. A trial that Optuna already closed before the driver died is not told twice.
        """

        run_link = "{}"  # a class default: searcher states saved before it existed restore without it

        def __init__(self, *, seeds: int = 1, run_link: str = "{}", **kwargs: Any):
            super().__init__(**kwargs)
            self.seeds, self.run_link = seeds, run_link
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
                self._ot_trials[trial_id].set_user_attr("name", f"t{params[TRIAL_NUMBER]}")
                group = self.open_group = {"primary": trial_id, "params": params, "members": [], "ended": {},
                                           "runs": {}}
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
            if (result or {}).get(RUN_ID):
                group.setdefault("runs", {})[trial_id] = result[RUN_ID]
            if error or not (result or {}).get(FINAL):
                group["ended"][trial_id] = "failed" if error else "pruned"
                if not error and result:
                    self.on_trial_result(trial_id, result)  # the result that stopped it
            else:
                group["ended"][trial_id] = [float(result[m]) for m in metrics]
                self.on_trial_result(trial_id, result)  # the last epoch's value, reported only at the end
                if result.get("collapsed"):  # a measured value all the same: the sampler learns where codes collapse
                    self._ot_trials[group["primary"]].set_user_attr("collapsed", True)
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
            primary = self._ot_trials[group["primary"]]
            runs = [group.get("runs", {})[t] for t in group["members"] if t in group.get("runs", {})]
            try:
                if runs:
                    primary.set_user_attr("mlflow_run_ids", runs)
                    primary.set_user_attr("mlflow_runs", [self.run_link.format(run) for run in runs])
                self._ot_study.tell(primary, values, state=state)
            except UpdateFinishedTrialError:
                pass
            except RuntimeError as err:
                # Optuna's GridSampler calls study.stop() once its grid is used up, which Optuna allows only inside
                # Study.optimize: Tune drives this study and ends it after its trials. tell() stores the trial first.
                if not (isinstance(self._ot_study.sampler, GridSampler) and "Study.stop" in str(err)):
                    raise

        def restore(self, checkpoint_path: str) -> None:
            super().restore(checkpoint_path)
            known = {trial.number for trial in self._ot_trials.values()}
            self.orphans = [trial._trial_id for trial in self._ot_study.get_trials(
                deepcopy=False, states=(TrialState.RUNNING,)) if trial.number not in known]

    StudySearch.__module__, StudySearch.__qualname__ = __name__, "StudySearch"
    return StudySearch
