"""agch-table: the paper's Table II layout for one preset on one dataset, beside the published numbers.

Rows I->T and T->I, columns 16/32/64/128 bits, each cell mean ± std over seeds. The cells (one config per code
length) run as Ray Tune trials through the ablation driver's grids (agch.experiments.grid.run_plan), so a cell ×
seed already
recorded in the tracking store with the same identity and precision is reused, and an interrupted table resumes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agch import config as cfg
from agch.experiments.ablation import AblationRun
from agch.experiments.grid import RESULT_STATES
from agch.experiments.ablation_plan import Cell, Plan, cell_identity
from agch.experiments.ablation_spec import AblationSpec
from agch.runs.names import Tag

DEFAULT_BITS = (16, 32, 64, 128)


@dataclass(frozen=True)
class PublishedTable:
    """Numbers a paper reports, with where they come from and under which protocol."""

    source: str
    dataset: str
    k: int
    """mAP@k."""
    n_query: int
    n_database: int
    bits: tuple[int, ...]
    values: dict[tuple[str, str], tuple[float, ...]]
    """(method, direction) → one value per entry of bits."""


PUBLISHED = PublishedTable(
    source="AGCH paper (Zhang et al., IEEE TMM 2022), Table II (restated in docs/method.md)",
    dataset="MIRFlickr-25K", k=50, n_query=2000, n_database=18015, bits=(16, 32, 64, 128),
    values={("AGCH", "i2t"): (0.865, 0.887, 0.892, 0.912), ("AGCH", "t2i"): (0.829, 0.849, 0.852, 0.880),
            ("DJSRH", "i2t"): (0.810, 0.843, 0.862, 0.876), ("DJSRH", "t2i"): (0.786, 0.822, 0.835, 0.847)})
"""The published MIRFlickr-25K numbers: mAP@50, relevance = >= 1 shared label, standard split (2,000 queries vs an
18,015-pair database), VGG fc7 image features, 16/32/64/128 bits."""

DIRECTIONS = {"i2t": "I->T", "t2i": "T->I"}


@dataclass
class TableRun(AblationRun):
    """What run_table did: the plan (one cell per code length, no comparisons), where it is recorded, and every
    cell × seed's record. `protocol` is the first cell's; bits vary by column."""

    preset: str = "paper"

    @property
    def bits(self) -> list[int]:
        return [cell.config.bits for cell in self.plan.cells.values()]

    def values(self, bits: int, key: str) -> list[float]:
        """The metric of every finished seed of the cell with this code length."""
        cell = next(c.identity for c in self.plan.cells.values() if c.config.bits == bits)
        return [r.metrics[key] for r in self.records
                if r.trial.cell == cell and r.status in RESULT_STATES and key in r.metrics]


def table_plan(name: str, base: cfg.Config, bits: tuple[int, ...], spec: AblationSpec, dataset_identity: str) -> Plan:
    """One cell per code length (base with that many bits), trained at spec.seeds; bits vary inside one Tune grid."""
    cells = {}
    for b in bits:
        config = dataclasses.replace(cfg.apply(base, {"bits": b}, where="--bits"), seed=0)
        key = cell_identity(config, dataset_identity)
        cells[key] = Cell(key, f"{b} bits", config)
    return Plan(dataclasses.replace(spec, name=name), {"": dataset_identity}, cells, (), grid_keys=("bits",))


def comparability(protocol: dict[str, Any], k: int) -> list[str]:
    """What stands between this table and the published numbers (empty when nothing does)."""
    p, pub = protocol, PUBLISHED
    lines = []
    real = p["synthetic"] == "none"
    if not real or pub.dataset.replace("-25K", "").lower() not in p["dataset"].lower():
        what = "real features" if real else f"synthetic parts: {p['synthetic']}"
        lines.append(f"THE PUBLISHED NUMBERS ARE FOR A DIFFERENT DATASET: {pub.dataset} (real VGG fc7 features); "
                     f"this table is on {p['dataset']} ({what}). They stand beside it for the layout, not as a "
                     "target these numbers can be compared against")
    if k != pub.k:
        lines.append(f"this table is mAP@{k}; the published numbers are mAP@{pub.k}")
    if (p["split"], p["queries"], p["n_query"], p["n_database"]) != ("standard", "test", pub.n_query,
                                                                     pub.n_database):
        lines.append(f"the published numbers are on the standard split's test queries ({pub.n_query} vs "
                     f"{pub.n_database} database); this table: {p['split']} split, {p['queries']} queries "
                     f"({p['n_query']} vs {p['n_database']} database)")
    return lines


def run_table(name: str, preset: str, base: cfg.Config, bits: tuple[int, ...], spec: AblationSpec, dataset: Path,
              *, tracking_uri: str | None = None, experiment: str = "agch", device: str = "auto",
              rerun: bool = False, ray_address: str | None = None, storage_dir: Path | None = None,
              on_result: Any = None, say: Any = print) -> TableRun:
    """Train every cell × seed not yet recorded (one cell per code length) under one MLflow parent run.

    Args:
        name: the table's name (its parent run is table-<name>).
        preset, base: the preset's name and the config every cell starts from (bits replaced per cell).
        bits: the code lengths, one column each.
        spec: seeds, resources and max_concurrent of the trials (designs and factors unused).
        dataset: absolute path of the dataset file.
        Others: as agch.experiments.ablation.run_ablation.
    """
    from agch.experiments.grid import run_plan
    from agch.data.dataset import open_dataset
    from agch.evaluation.protocol import describe_protocol, protocol_of
    from agch.runs.tracking import open_tracker
    from agch.runs.record import run_tags

    tracker = open_tracker(tracking_uri, experiment, wait=False)
    with open_dataset(dataset) as data:
        plan = table_plan(name, base, bits, spec, data.identity)
        first = next(iter(plan.cells.values())).config
        protocol = protocol_of(first, data)
        described = f"mAP@{first.topk} / mAP@ALL, {describe_protocol(dict(protocol, bits=bits_text(bits)))}"
        say(f"every mAP below: {described}")
        dataset_tags = {**{k: v for k, v in run_tags(first, data).items() if k.startswith("dataset.")},
                        Tag.PROTOCOL: described}

    def start() -> str:
        parent = tracker.start_run(f"table-{name}", tags={Tag.KIND: "table", Tag.GROUP: name, Tag.NAME: name,
                                                         Tag.PLAN: plan.identity, **dataset_tags})
        tracker.log_params(parent, {"preset": preset, "bits": bits_text(bits),
                                    "seeds": ", ".join(map(str, spec.seeds)), "n_trials": len(plan.trials()),
                                    **{f"config.{k}": v for k, v in cfg.to_flat(base).items() if k != "bits"}})
        return parent

    parent, records = run_plan(plan, {"": Path(dataset).resolve()}, tracker, start, experiment=experiment,
                               device=device, rerun=rerun, ray_address=ray_address, storage_dir=storage_dir,
                               on_result=on_result, say=say, kind="table")
    return TableRun(plan, parent, tracker.uri, experiment, protocol, records, preset=preset)


def bits_text(bits: tuple[int, ...] | list[int]) -> str:
    return "/".join(map(str, bits))


# ---------------------------------------------------------------- the report


def protocol_line(run: TableRun) -> str:
    from agch.evaluation.protocol import describe_protocol

    return (f"mAP@{run.topk} and mAP@ALL (Hamming ranking, relevance = >=1 shared label), "
            f"{describe_protocol(dict(run.protocol, bits=bits_text(run.bits)))}; mean ± std over "
            f"{len(run.plan.spec.seeds)} seeds ({', '.join(map(str, run.plan.spec.seeds))})")


def table_rows(run: TableRun) -> tuple[list[str], list[list[str]], list[list[Any]]]:
    """(header, display rows, CSV rows): this project's mAP@k then mAP@ALL per direction, then the published."""
    from agch.experiments.statistics import summarize

    k, p, n_seeds = run.topk, run.protocol, len(run.plan.spec.seeds)
    head = ["method", "task", "metric", *(f"{b} bits" for b in run.bits)]
    ours = f"{run.preset} (this project)"
    rows, records = [], []
    for key, metric in ((f"map{k}", f"mAP@{k}"), ("mapall", "mAP@ALL")):
        for direction, task in DIRECTIONS.items():
            cells = []
            for b in run.bits:
                s = summarize(run.values(b, f"{key}_{direction}"))
                cells.append(s.text() + (f" (n={s.n})" if 0 < s.n < n_seeds else ""))
                records.append([ours, "this project", task, metric, b, p["split"], p["queries"], p["n_query"],
                                p["n_database"], p["dataset"], p["synthetic"], s.n, s.mean, s.std])
            rows.append([ours, task, metric, *cells])
    pub = PUBLISHED
    for (method, direction), values in pub.values.items():
        by_bits = dict(zip(pub.bits, values))
        task = DIRECTIONS[direction]
        rows.append([f"{method} (published)", task, f"mAP@{pub.k}",
                     *(f"{by_bits[b]:.3f}" if b in by_bits else "—" for b in run.bits)])
        records += [[method, pub.source, task, f"mAP@{pub.k}", b, "standard", "test", pub.n_query, pub.n_database,
                     pub.dataset, "none", "", by_bits[b], ""] for b in run.bits if b in by_bits]
    return head, rows, records


def report_tables(run: TableRun) -> dict[str, str]:
    """The table as console text, table.md, table.csv and trials.csv."""
    from agch.experiments.formatting import csv_text, markdown_table, text_table

    head, rows, records = table_rows(run)
    from agch.experiments.ablation_report import provenance_notes

    notes = [*comparability(run.protocol, run.topk), f"published: {PUBLISHED.source}; mAP@{PUBLISHED.k}, "
             f"{PUBLISHED.dataset}, standard split ({PUBLISHED.n_query} queries vs {PUBLISHED.n_database})",
             *provenance_notes(run)]
    if run.interrupted:
        notes.append("interrupted: run the same command again to resume (finished runs are not retrained)")
    title = f"Table II layout: {run.preset} on {run.protocol['dataset']}"
    console = "\n\n".join([title, f"protocol: {protocol_line(run)}", text_table(head, rows),
                           "\n".join(f"- {n}" for n in notes)])
    markdown = "\n\n".join([f"# {title}", f"Protocol: {protocol_line(run)}.", markdown_table(head, rows),
                            "## Notes", "\n".join(f"- {n}" for n in notes)]) + "\n"
    csv_head = ["method", "source", "direction", "metric", "bits", "split", "queries", "n_query", "n_database",
                "dataset", "synthetic", "n_seeds", "mean", "std"]
    trial_head = ["bits", "seed", "status", "source", "run_id", "origin", f"map{run.topk}_i2t",
                  f"map{run.topk}_t2i", "mapall_i2t", "mapall_t2i"]
    trials = [[run.plan.cells[r.trial.cell].config.bits, r.trial.seed, r.status, r.source, r.run_id or "",
               r.origin or "", *(r.metrics.get(key, "") for key in trial_head[6:])] for r in run.records]
    return {"console": console, "table.md": markdown, "table.csv": csv_text(csv_head, records),
            "trials.csv": csv_text(trial_head, trials)}


def table_plot(run: TableRun) -> bytes:
    """PNG: one panel per direction, mAP@k against bits, this project (mean ± std) beside the published lines."""
    import io
    import textwrap

    from matplotlib.figure import Figure
    from agch.experiments.statistics import summarize

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    for ax, (direction, task) in zip(fig.subplots(1, 2, sharey=True), DIRECTIONS.items()):
        stats = [summarize(run.values(b, f"map{run.topk}_{direction}")) for b in run.bits]
        ax.errorbar(run.bits, [s.mean for s in stats], yerr=[0 if s.n < 2 else s.std for s in stats], fmt="o-",
                    capsize=3, label=f"{run.preset} (this project), mAP@{run.topk}")
        for (method, d), values in PUBLISHED.values.items():
            if d == direction:
                ax.plot(PUBLISHED.bits, values, "s--", alpha=0.7, label=f"{method} (published, {PUBLISHED.dataset})")
        ticks = sorted(set(run.bits) | set(PUBLISHED.bits))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("bits")
        ax.set_ylabel(f"mAP@{run.topk} {task}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = "\n".join([protocol_line(run), *comparability(run.protocol, run.topk)])
    fig.suptitle("\n".join(textwrap.fill(line, 150) for line in title.splitlines()), fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def publish(run: TableRun, tables: dict[str, str]) -> None:
    """Log the table (markdown, CSV, plot) on the parent run and close it (KILLED when a cell was not run)."""
    from agch.runs.tracking import open_tracker

    tracker = open_tracker(run.tracking_uri, run.experiment)
    tracker.log_files(run.parent_run_id, {name: text for name, text in tables.items() if name != "console"})
    tracker.log_files(run.parent_run_id, {"table.png": table_plot(run)})
    tracker.set_tags(run.parent_run_id, {Tag.TRAINED: run.count(source="trained"),
                                         Tag.REUSED: run.count(source="reused"),
                                         Tag.FAILED: run.count(status="failed")})
    tracker.end_run(run.parent_run_id, "KILLED" if run.interrupted else "FINISHED")
