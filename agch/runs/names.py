"""The names runs are recorded under in MLflow, in one place: the project's tags (Tag) and its metric names."""

from __future__ import annotations


class Tag:
    """MLflow tag keys the project writes on runs (and, where noted, on experiments)."""

    # what a run is and where it belongs
    KIND = "agch.kind"
    """a parent run's kind: search, ablation, table."""
    NAME = "agch.name"
    """the search's or ablation's name, on its parent and on every child run."""
    GROUP = "agch.group"
    """a Tune experiment's group: the search's name, NAME.test, or one grid of an ablation."""
    ROLE = "agch.role"
    """a child run's role: trial (one of the trials, what the UI link lists) or test (a search's test run)."""
    PLAN = "agch.plan"
    """an ablation's or table's plan identity (finds an interrupted attempt of the same plan)."""
    METHOD = "agch.method"
    """agch-train's method: agch, cca-itq, plain-s."""
    # what a run computed
    PROTOCOL = "agch.protocol"
    """what every mAP of the run means (metric, bits, split, queries, dataset, synthetic)."""
    IDENTITY = "agch.identity"
    """the config's and dataset's identity (agch.config.identity): equal identities computed the same thing."""
    BITS = "agch.bits"
    SEED = "agch.seed"
    ARM = "agch.arm"
    """an ablation cell's label."""
    DATASETS = "agch.datasets"
    PRECISION = "agch.precision"
    DEVICE = "agch.device"
    TRAINER_VERSION = "agch.trainer_version"
    CODE_VERSION = "agch.code_version"
    # a trial of a search or an ablation
    SLOT = "agch.slot"
    """the trial's place (agch.runs.context.trial_slot): finds its run again after a restart."""
    TRIAL_ID = "agch.trial_id"
    """Ray Tune's id of the latest trial in that slot."""
    TRIAL_NUMBER = "agch.trial_number"
    TRIAL_PARAMS = "agch.trial_params"
    ATTEMPTS = "agch.attempts"
    STATUS = "agch.status"
    """finished, stopped, failed, interrupted, lost, running (agch.runs.context.MLFLOW_STATUS)."""
    REASON = "agch.reason"
    FAILED_EPOCH = "agch.failed_epoch"
    COLLAPSED = "agch.collapsed"
    # a search's parent
    SEARCH_STATE = "agch.search_state"
    BEST_TRIAL = "agch.best_trial"
    BEST_RUN = "agch.best_run"
    BEST_TUNE_TRIALS = "agch.best_tune_trials"
    BEST = "agch.best."
    """prefix: agch.best.<param>, the chosen settings."""
    TEST_PROTOCOL = "agch.test_protocol"
    TEST_RUNS = "agch.test_runs"
    # an ablation's or table's parent
    TRAINED = "agch.trained"
    REUSED = "agch.reused"
    RESUMED = "agch.resumed"
    FAILED = "agch.failed"
    NOT_RUN = "agch.not_run"
    VERDICT = "agch.verdict."
    """prefix: agch.verdict.<comparison>.<metric>."""
    # an experiment
    NOTE = "agch.note"
    """the experiment description the project last wrote."""


def metric_name(cutoff: int | None, direction: str) -> str:
    """'map50_i2t', 'mapall_mean': the name a run logs mAP@cutoff (None: ALL) of a direction (i2t, t2i, mean) under."""
    return f"map{'all' if cutoff is None else cutoff}_{direction}"


def describe_metric(metric: str) -> str:
    """'map50_mean' -> 'mAP@50 mean(I->T, T->I)': what an objective's number is (docs/protocol.md)."""
    stem, direction = metric.rsplit("_", 1)
    cutoff = "ALL" if stem == "mapall" else stem[3:]
    return f"mAP@{cutoff} " + {"i2t": "I->T", "t2i": "T->I", "mean": "mean(I->T, T->I)"}[direction]


def cutoff_of(metrics: dict[str, float]) -> int:
    """The k of the mAP@k a run's metrics hold besides mAP@ALL (the config's topk)."""
    return next(int(key[3:-4]) for key in metrics if key.startswith("map") and key.endswith("_i2t")
                and key[3:-4].isdigit())
