"""The module names of agch before 2026-12-03, when it was one flat package, for what Ray Tune pickled then.

A search or an ablation keeps a Ray Tune experiment whose tuner.pkl holds the searcher, the trainable and the
driver's callback by their module paths (agch.study_search.StudySearch, agch.trial.run_trial,
agch.runner._TrialEvents). `install()` (called before an experiment is restored) makes importing such a name give
the module at its new place, so `agch-search resume` and a rerun `agch-ablate` continue what was started then.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

MOVED = {
    "splits": "data.splits", "synth": "data.synth", "importers": "data.importers",
    "extract": "data.extract", "extract_options": "data.extract_options", "backbones": "data.backbones",
    "data_summary": "data.summary", "metrics": "evaluation.metrics", "ranking": "evaluation.ranking",
    "rank_kernel": "evaluation.kernel", "protocol": "evaluation.protocol", "model": "method.model",
    "similarity": "method.similarity", "losses": "method.losses", "diagnostics": "method.diagnostics",
    "train": "method.train", "baselines": "method.baselines", "tracking": "runs.tracking", "runner": "runs.driver",
    "trial": "runs.trial", "study_search": "runs.searcher", "space": "experiments.search_space",
    "search": "experiments.search", "ablation_spec": "experiments.ablation_spec",
    "ablation_plan": "experiments.ablation_plan", "ablation": "experiments.ablation",
    "ablation_report": "experiments.ablation_report", "stats": "experiments.statistics",
    "table": "experiments.paper_table", "audit": "experiments.audit", "show": "experiments.results",
    "schema": "experiments.file_schema",
}
"""Old module (agch.<key>) -> where it is now (agch.<value>). (agch.data, now a package, held nothing Tune kept.)"""


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds agch.<old> and loads it as the module at its new place (sys.modules then maps the old name to it)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = name.removeprefix("agch.")
        return importlib.machinery.ModuleSpec(name, self) if name.startswith("agch.") and old in MOVED else None

    def exec_module(self, module: object) -> None:
        # the import system returns what sys.modules holds under the name once this returns
        sys.modules[module.__name__] = importlib.import_module("agch." + MOVED[module.__name__.removeprefix("agch.")])


def install() -> None:
    """Let the old module names be imported (once per process)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
