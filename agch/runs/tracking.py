"""The MLflow adapter: one run per training, nested runs under a parent, params/metrics/artifacts, experiment tags;
a retrying wrapper for concurrent trials and tracking-server outages. Public APIs only; nothing else in agch calls
MLflow (what a run records: agch.runs.record; the UI's links and pages: agch.runs.ui).

Uses MlflowClient with explicit run ids (no global active run), so Ray trials and threads can log side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agch.errors import UserError
from agch.paths import default_tracking_uri, home
from agch.runs.names import Tag

DEFAULT_EXPERIMENT = "agch"


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use: the given one, else the embedded SQLite store (absolute)."""
    if uri:
        return uri
    home().mkdir(parents=True, exist_ok=True)
    return default_tracking_uri()


def is_server(uri: str) -> bool:
    """A tracking server (http/https), as opposed to a local store."""
    return uri.startswith(("http://", "https://"))


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why a tracking server does not answer its /health now, or None when it does (or `uri` is not a server)."""
    if not is_server(uri):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status} on /health"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


@contextlib.contextmanager
def outage_hint(uri: str, then: str) -> Iterator[None]:
    """Re-raise an error met while the tracking server at `uri` does not answer as a UserError saying so and what
    to run once it answers again (`then`); other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        reason = unreachable(uri)
        if reason is None:
            raise
        raise UserError(f"the tracking server {uri} stopped answering ({reason}); the runs it recorded are kept and "
                        f"each trial keeps its last checkpoint. Once it answers again: {then}") from err


def check_reachable(uri: str) -> None:
    """Fail fast (before any trial starts) when a tracking server does not answer."""
    reason = unreachable(uri)
    if reason is not None:
        raise UserError(f"tracking server {uri} is unreachable ({reason}); start it or pass another --tracking-uri")


def artifact_root(uri: str) -> str | None:
    """Artifacts of an SQLite store go beside its file (MLflow's default is ./mlruns of whatever the cwd is);
    a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""Experiment tag naming the experiment's kind. MLflow 3.17 does not route by it (its GenAI / Model training switch
is per browser; agch.runs.ui_app and UI_WORKFLOW handle that); its kind selector and other versions read it."""

class Tracker:
    """Thin wrapper over MlflowClient for one tracking store and experiment."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT):
        from mlflow.tracking import MlflowClient  # heavy: import on use

        self.uri = resolve_uri(uri)
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND[0] not in found.tags:
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        else:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root(self.uri),
                                                               tags=dict([EXPERIMENT_KIND]))

    def start_run(self, name: str, tags: dict[str, str] | None = None, parent: str | None = None) -> str:
        """Create a run (nested under `parent` when given) and return its id."""
        from agch.runs.record import code_version

        tags = dict(tags or {}, **{Tag.CODE_VERSION: code_version()})
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_files(self, run_id: str, files: dict[str, Any], artifact_path: str | None = None) -> None:
        """Write each {name: content} (str, bytes, dict → YAML, ndarray dict → .npz) and upload them."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                if isinstance(content, dict) and name.endswith(".npz"):
                    np.savez_compressed(path, **content)
                elif isinstance(content, (dict, list)):
                    path.write_text(yaml.safe_dump(content, sort_keys=False) if name.endswith(".yaml")
                                    else json.dumps(content, indent=2, default=str))
                elif isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(str(content))
            self.client.log_artifacts(run_id, tmp, artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        """Set a run that an earlier session left KILLED (or RUNNING) back to RUNNING."""
        self.client.update_run(run_id, status="RUNNING")

    def runs(self, filter_string: str, *, max_results: int = 50000, order_by: list[str] | None = None) -> list[Any]:
        """The experiment's runs matching an MLflow filter string."""
        return self.client.search_runs([self.experiment_id], filter_string, max_results=max_results,
                                       order_by=order_by)

    def runs_everywhere(self, filter_string: str) -> list[Any]:
        """The runs of every experiment of the store matching the filter, page by page."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        found, token = [], None
        while True:
            page = self.client.search_runs(experiments, filter_string=filter_string, max_results=1000,
                                           page_token=token)
            found += page
            token = page.token
            if not token:
                return found

    def run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def find_run(self, run_id: str) -> Any | None:
        """The run with this id, or None when the store has none."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None

    def find_trial_run(self, group: str, slot: str) -> Any | None:
        """The MLflow run of the trial at `slot` (see agch.runs.trial.trial_slot) in `group`, if one was started."""
        runs = self.runs(f"tags.`{Tag.GROUP}` = '{group}' and tags.`{Tag.SLOT}` = '{slot}'", max_results=1)
        return runs[0] if runs else None

    def group_runs(self, group: str) -> list[Any]:
        """Every trial run of `group`, oldest first."""
        return self.runs(f"tags.`{Tag.GROUP}` = '{group}' and tags.`{Tag.TRIAL_ID}` != ''",
                         order_by=["attributes.start_time ASC"])

    def artifact_names(self, run_id: str) -> set[str]:
        """The paths of a run's top-level artifacts."""
        return {a.path for a in self.client.list_artifacts(run_id)}

    def download(self, run_id: str, name: str, folder: str) -> Path:
        """One artifact of a run, downloaded into `folder`."""
        return Path(self.client.download_artifacts(run_id, name, folder))

    def set_experiment_tag(self, key: str, value: str) -> None:
        self.client.set_experiment_tag(self.experiment_id, key, value)

    def experiment_tags(self) -> dict[str, str]:
        return dict(self.client.get_experiment(self.experiment_id).tags)


TRACKING_WAIT_S = "AGCH_TRACKING_WAIT_S"
"""Environment variable: how long (seconds, default 600) a trial or the driver waits for a tracking server that
stopped answering, beyond MLflow's own client retries, before its call fails. Trials get the driver's value."""


def tracking_wait_s() -> float:
    value = os.environ.get(TRACKING_WAIT_S, "600")
    try:
        return max(0.0, float(value))
    except ValueError:
        raise UserError(f"{TRACKING_WAIT_S} must be a number of seconds, got {value!r}") from None


class RetryingTracker:
    """agch.runs.tracking.Tracker whose calls retry with backoff while an SQLite store is locked by another trial, and
    wait (up to tracking_wait_s) while a tracking server does not answer."""

    ATTEMPTS = 10
    """tries while SQLite says the database is locked."""

    def __init__(self, uri: str, experiment: str, *, wait: bool = True):
        """wait=False: fail at once when the server does not answer (a check before anything starts)."""
        self.uri, self.wait = resolve_uri(uri), wait
        self._tracker = self._call(Tracker, self.uri, experiment)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tracker, name)
        if name == "client":  # the raw MlflowClient (tests, debugging): its calls retry too
            return _Retried(value, self._call)
        if not callable(value):
            return value
        return lambda *args, **kwargs: self._call(value, *args, **kwargs)

    def _call(self, call: Callable, *args: Any, **kwargs: Any) -> Any:
        locked, deadline = 0, None
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as err:  # MLflow wraps SQLAlchemy's OperationalError in several exception types
                if "locked" in str(err) and locked < self.ATTEMPTS - 1:
                    time.sleep(min(0.05 * 2 ** locked, 2.0) * (1 + random.random()))
                    locked += 1
                    continue
                if not self.wait or unreachable(self.uri) is None:
                    raise
                deadline = deadline or time.monotonic() + tracking_wait_s()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(2.0)


class _Retried:
    """An object whose method calls go through RetryingTracker._call."""

    def __init__(self, target: Any, call: Callable):
        self._target, self._retry = target, call

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        return (lambda *args, **kwargs: self._retry(value, *args, **kwargs)) if callable(value) else value


def redact(url: str) -> str:
    """A URL with its password replaced, fit for logs and tags."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_tracker(uri: str | None, experiment: str, *, wait: bool = True) -> Any:
    """A RetryingTracker (what searches and ablations record through); wait=False (the checks before anything starts)
    fails at once on an unreachable server."""
    try:
        return RetryingTracker(resolve_uri(uri), experiment, wait=wait)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"tracking store {redact(resolve_uri(uri))} is unreachable: "
                        f"{str(err).splitlines()[0]}") from None
