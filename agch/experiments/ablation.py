"""The ablation driver: an ablation file's plan trained as cells × seeds (agch.experiments.grid) under one MLflow
parent run, with its datasets checked and its references.

The plan (which cells, which comparisons) comes from agch.experiments.ablation_plan; statistics and report from
agch.experiments.ablation_report.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agch import config as cfg
from agch.experiments.ablation_plan import Plan, build_plan
from agch.experiments.ablation_spec import AblationSpec
from agch.errors import UserError
from agch.experiments.grid import RESULT_STATES, TrialRecord, run_plan
from agch.runs.names import Tag


@dataclass
class AblationRun:
    """What run_ablation did: the plan, where it is recorded, and every trial's record."""

    plan: Plan
    parent_run_id: str
    tracking_uri: str
    experiment: str
    protocol: dict[str, Any]
    records: list[TrialRecord]
    references: dict[str, float] = field(default_factory=dict)
    """random ranking and CCA+ITQ on the same queries and bits (agch.method.baselines.reference_scores)."""

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


def run_ablation(spec: AblationSpec, dataset: Path | None, *, tracking_uri: str | None = None, experiment: str = "agch",
                 device: str = "auto", rerun: bool = False, ray_address: str | None = None,
                 storage_dir: Path | None = None, on_result: Any = None, say: Any = print) -> AblationRun:
    """Train every cell × seed of `spec` not yet recorded, as Ray Tune trials under one MLflow parent run.

    Args:
        spec: the validated ablation.
        dataset: absolute path of the dataset file (None when spec.datasets names the two compared ones).
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
    from agch.method.baselines import describe_references, reference_scores
    from agch.data.dataset import open_dataset
    from agch.evaluation.protocol import describe_protocol, protocol_of
    from agch.runs.tracking import open_tracker
    from agch.runs.record import run_tags

    tracker = open_tracker(tracking_uri, experiment, wait=False)
    paths = {name: path.resolve() for name, path in spec.datasets} or {"": Path(dataset).resolve()}
    with contextlib.ExitStack() as stack:
        datas = {name: stack.enter_context(open_dataset(path)) for name, path in paths.items()}
        check_same_items(datas)
        plan = build_plan(spec, {name: data.identity for name, data in datas.items()})
        first, data = next(iter(plan.cells.values())).config, next(iter(datas.values()))
        protocol = protocol_of(first, data)
        if spec.datasets:
            protocol.update(dataset=" vs ".join(f"{name} = {d.name}" for name, d in datas.items()),
                            dataset_identity=", ".join(d.identity for d in datas.values()),
                            synthetic=",".join(sorted({p for d in datas.values() for p in d.synthetic})) or "none")
        described = f"mAP@{first.topk} / mAP@ALL, {describe_protocol(protocol)}"
        say(f"every mAP below: {described}")
        references = {name: reference_scores(first, d) for name, d in datas.items()}
        for name, scores in references.items():
            say(f"references on the same queries{f' ({name})' if name else ''}: "
                f"{describe_references(scores, first.topk)}")
        dataset_tags = {k: v for k, v in run_tags(first, data).items() if k.startswith("dataset.")}
        dataset_tags[Tag.PROTOCOL] = described  # what every mAP of the ablation's report is
        if spec.datasets:
            dataset_tags[Tag.DATASETS] = json.dumps({name: d.identity for name, d in datas.items()})

    def start() -> str:
        parent = start_parent(tracker, plan, dataset_tags)
        tracker.log_metrics(parent, {f"reference_{name + '_' if name else ''}{k}": v
                                     for name, scores in references.items() for k, v in scores.items()}, step=0)
        return parent

    parent, records = run_plan(plan, paths, tracker, start, experiment=experiment, device=device, rerun=rerun,
                               ray_address=ray_address, storage_dir=storage_dir, on_result=on_result, say=say)
    # the report's one references line holds for one dataset; two print theirs above and log them on the parent
    return AblationRun(plan, parent, tracker.uri, experiment, protocol, records,
                       references[""] if "" in references else {})


def check_same_items(datas: dict[str, Any]) -> None:
    """Datasets compared in one ablation must hold the same pairs (text features), labels and split; only the image
    features may differ. UserError naming both files and the first thing that differs."""
    (first, a), *others = datas.items()
    for name, b in others:
        differ = _first_difference(a, b)
        if differ:
            raise UserError(f"datasets {first} ({a.path}, {a.n} items) and {name} ({b.path}, {b.n} items) differ in "
                            f"their {differ}; a dataset comparison needs the same pairs, labels and split with other "
                            "image features (e.g. the same pairs with AlexNet vs VGG16 fc7)")


def _first_difference(a: Any, b: Any) -> str | None:
    if a.n != b.n:
        return "number of items"
    if not np.array_equal(a.labels, b.labels):
        return "labels"
    for part in ("query", "retrieval", "train"):
        if not np.array_equal(getattr(a.split, part), getattr(b.split, part)):
            return f"split ({part} rows)"
    if a.text_dim != b.text_dim:
        return "text features (dimension)"
    for offset, block in a.iter_rows("text", np.arange(a.n)):
        if not np.array_equal(block, b.rows("text", np.arange(offset, offset + len(block)))):
            return f"text features (rows {offset}..{offset + len(block) - 1})"
    return None


def start_parent(tracker: Any, plan: Plan, dataset_tags: dict[str, str]) -> str:
    """The MLflow parent run of one ablation: its spec, cells and comparisons."""
    spec = plan.spec
    parent = tracker.start_run(f"ablation-{spec.name}", tags={
        Tag.KIND: "ablation", Tag.GROUP: spec.name, Tag.NAME: spec.name, Tag.PLAN: plan.identity,
        **dataset_tags})
    tracker.log_params(parent, {
        "designs": ", ".join(f"{d.kind} ({d.preset})" for d in spec.designs),
        "factors": ", ".join(f.describe() for f in spec.factors), "seeds": ", ".join(map(str, spec.seeds)),
        "n_cells": len(plan.cells), "n_trials": len(plan.trials()),
        **{f"override.{k}": v for k, v in spec.overrides.items()}})
    cells = {c.label: {"identity": c.identity, **cfg.to_flat(c.config)} for c in plan.cells.values()}
    comparisons = [{"name": c.name, "on": [plan.cells[i].label for i in c.on],
                    "off": [plan.cells[i].label for i in c.off]} for c in plan.comparisons]
    tracker.log_files(parent, {"ablation.yaml": spec.to_dict(), "cells.yaml": cells,
                               "comparisons.yaml": {"comparisons": comparisons}})
    from agch.runs.ui import save_view

    k = next(iter(plan.cells.values())).config.topk
    save_view(tracker, spec.name, f"map{k}_mean",
              first=[f"metrics.`{m}`" for m in (f"map{k}_i2t", f"map{k}_t2i", "mapall_i2t", "mapall_t2i")],
              then=[f"tags.`{Tag.ARM}`", f"tags.`{Tag.SEED}`", f"tags.`{Tag.STATUS}`"])
    return parent
