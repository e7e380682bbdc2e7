"""What a search keeps between its sessions (SearchState, <home>/searches/NAME/search.json), where it keeps it, its
Optuna storage, and what `start` and `resume` report (SearchReport)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agch.errors import UserError
from agch.experiments.search_space import Parameter, SearchSpace
from agch.runs.context import RunContext
from agch.runs.tracking import redact


def searches_root() -> Path:
    """Where each search keeps its state and Ray Tune experiment: <AGCH home>/searches/NAME."""
    from agch.paths import home

    return home() / "searches"


@dataclass
class SearchState:
    """Everything `agch-search resume NAME` needs, written when the search starts and updated as it ends."""

    name: str
    space: SearchSpace
    context: RunContext
    """what every trial shares (dataset, stores, the parent run, the base settings)."""
    storage_url: str
    """the Optuna storage (with its password: the file stays in the AGCH home)."""
    ray_address: str | None
    protocol: str
    """what the objective's numbers are (metric, bits, split, queries, dataset)."""
    references: dict[str, float]
    """random ranking and CCA+ITQ on the trials' queries (agch.method.baselines.reference_scores)."""
    finished: bool = False
    test: dict[str, float] | None = None
    """the chosen settings' test-query metrics, once scored."""
    test_protocol: str | None = None

    @property
    def folder(self) -> Path:
        return searches_root() / self.name

    def save(self) -> None:
        (self.folder / "search.json").write_text(json.dumps(self.to_json(), indent=2, default=str))

    def to_json(self, *, redacted: bool = False) -> dict[str, Any]:
        """As search.json holds it (`redacted`: the storage password masked, for logging)."""
        state = dataclasses.asdict(self)
        return {**state, "storage_url": redact(self.storage_url)} if redacted else state

    @classmethod
    def load(cls, name: str) -> SearchState:
        """The state of search `name`; UserError naming the known searches when there is none."""
        path = searches_root() / name / "search.json"
        if not path.is_file():
            from agch.errors import unknown

            known = [p.parent.name for p in searches_root().glob("*/search.json")]
            raise unknown("search", name, known, f"under {searches_root()}")
        raw = json.loads(path.read_text())
        space = dict(raw["space"])
        space["parameters"] = [Parameter(**{**p, "choices": tuple(p["choices"])}) for p in space["parameters"]]
        fields_ = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in raw.items() if k in fields_}, "space": SearchSpace(**space),
                      "context": RunContext(**raw["context"])})


@dataclass
class SearchReport:
    """Where a search stands after `start` or `resume` returned."""

    name: str
    interrupted: bool
    outcomes: list
    """agch.runs.driver.TrialOutcome per Tune trial, in start order."""
    best: dict | None
    """the chosen trial: name, Optuna number, params, values, MLflow run ids, names and links; None when no trial
    finished."""
    best_config: Path | None
    """a YAML file `agch-train --config` accepts, for the best trial."""
    protocol: str
    references: dict
    test: dict | None
    """the best settings' test-query metrics (trained once more, scored once), or None."""
    test_protocol: str | None
    tracking_uri: str
    experiment: str
    parent_run_id: str
    storage_url: str
    notes: list[str] = field(default_factory=list)
    ui: str = ""
    """how to open the MLflow UI on this search's runs (agch.runs.ui.ui_hint)."""


def default_storage_url(tracking_uri: str | None = None) -> str:
    """The embedded Optuna store: an SQLite file beside the MLflow SQLite store (under the AGCH home otherwise)."""
    from agch.paths import home

    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home() / 'optuna.db'}"


def open_storage(url: str) -> Any:
    """The Optuna storage at `url` (SQLite, PostgreSQL, MySQL); UserError when it cannot be reached."""
    import optuna

    engine = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as err:  # SQLAlchemy raises many kinds; all mean the same thing here
        raise UserError(f"Optuna storage {redact(url)} is unreachable: {str(err).splitlines()[0]}") from None
