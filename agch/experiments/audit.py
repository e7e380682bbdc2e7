"""agch-audit: one set of codes re-scored under every protocol the project knows (docs/protocol.md, "Auditing").

The debugging log's 0.648 and the paper's 0.865 are different measurements: mAP over all ranks of the file-order
split's queries ranked against each other (query vs query, self excluded), against mAP@50 of 2,000 queries ranked
against an 18,015-item database. An audit takes the codes one run recorded (its codes.npz) and scores them at
mAP@50, mAP@100 and mAP@ALL, query vs database and query vs query, I->T and T->I; where the run logged its hash
functions (encoders.pt) and the dataset is at hand, it re-encodes the standard, ucch and file-order splits' test
queries and databases with them and scores those too, saying how many of their queries the model trained on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agch.errors import UserError
from agch.evaluation.scoring import CODE_KEYS

AUDIT_KS: tuple[int | None, ...] = (50, 100, None)
"""mAP cut-offs of every audit row; None is ALL."""
AUDIT_SPLITS = ("standard", "ucch", "file-order")
"""Split protocols an audit re-encodes (agch.data.splits.SPLIT_PROTOCOLS without 'given', which only a file carries)."""
RELEVANCE = ">= 1 shared label"
RANKINGS: dict[str, dict[str, tuple[str, str]]] = {
    "database": {"i2t": ("query_image", "retrieval_text"), "t2i": ("query_text", "retrieval_image")},
    "queries": {"i2t": ("query_image", "query_text"), "t2i": ("query_text", "query_image")},
}
"""What each direction's queries are ranked against: the database (the paper's protocol), or the other queries'
other-modality codes with the query's own pair excluded (the debugging log's)."""
ARTIFACTS = ("codes.npz", "protocol.json", "config.yaml", "encoders.pt")
"""What an audit reads of a run (agch.runs.record.log_result); only codes.npz is required."""
RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Source:
    """What is audited: a run's artifacts (downloaded) or a folder holding codes.npz and maybe the others."""

    label: str
    files: dict[str, Path]
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def protocol(self) -> dict[str, Any]:
        """The run's protocol.json ({} when the codes came without one)."""
        return json.loads(self.files["protocol.json"].read_text()) if "protocol.json" in self.files else {}


@dataclass
class CodeSet:
    """Sign codes of one split's queries and database, and where they came from."""

    split: str
    queries: str
    """'test' or 'validation' queries of that split."""
    origin: str
    codes: dict[str, torch.Tensor]
    """keyed query_image, query_text, retrieval_image, retrieval_text (agch.method.train.encode_split's keys)."""
    labels: dict[str, torch.Tensor]
    """keyed query, retrieval."""


@dataclass
class AuditRow:
    """One protocol's mAP of one code set."""

    codes: CodeSet
    against: str
    """'database' or 'queries' (RANKINGS)."""
    direction: str
    k: int | None
    value: float
    n_ranked: int

    @property
    def metric(self) -> str:
        return "mAP@ALL" if self.k is None else f"mAP@{self.k}"


def open_source(target: str, tracking_uri: str | None, folder: Path) -> Source:
    """A codes.npz path (or a folder holding one), else an MLflow run id whose artifacts are downloaded to folder."""
    path = Path(target).expanduser()
    if path.exists():
        codes = path / "codes.npz" if path.is_dir() else path
        if not codes.is_file():
            raise UserError(f"{path}: no codes.npz there; pass a run's codes.npz, the folder holding it, or a run id")
        found = {name: codes.parent / name for name in ARTIFACTS[1:] if (codes.parent / name).is_file()}
        return Source(str(codes), {"codes.npz": codes, **found})
    if not RUN_ID.fullmatch(target):
        raise UserError(f"'{target}' is neither an existing file nor an MLflow run id (32 hex digits); pass a run "
                        "id that agch-train or an ablation printed, or the path of a codes.npz")
    from agch.runs.tracking import DEFAULT_EXPERIMENT, open_tracker

    tracker = open_tracker(tracking_uri, DEFAULT_EXPERIMENT, wait=False)
    run = tracker.find_run(target)
    if run is None:
        raise UserError(f"unknown run '{target}' in tracking store {tracker.uri}; pass a run id recorded there "
                        "(--tracking-uri names another store) or the path of a codes.npz")
    names = tracker.artifact_names(target)
    if "codes.npz" not in names:
        raise UserError(f"run {target} ('{run.info.run_name}', {run.info.status}) has no codes.npz artifact, so "
                        f"there are no codes to audit (its artifacts: {', '.join(sorted(names)) or 'none'}); audit "
                        "a training run that finished an evaluation (a search's or ablation's parent run has none)")
    files = {name: tracker.download(target, name, str(folder))
             for name in ARTIFACTS if name in names}
    return Source(f"run {target}", files, target, dict(run.data.tags))


def recorded_codes(source: Source) -> CodeSet:
    """The codes the run recorded, on the split and queries its protocol.json names."""
    path = source.files["codes.npz"]
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npz file ({err})") from None
    missing = [key for key in CODE_KEYS if key not in arrays]
    if missing:
        raise UserError(f"{path}: not an agch codes.npz (missing {', '.join(missing)}; the layout is in the run's "
                        "codes_README.txt)")
    protocol = source.protocol
    return CodeSet(split=str(protocol.get("split", "unknown (no protocol.json)")),
                   queries=str(protocol.get("queries", "unknown")), origin="the run's codes",
                   codes={key[len("codes_"):]: torch.from_numpy(arrays[key]) for key in CODE_KEYS[:4]},
                   labels={stem: torch.from_numpy(arrays[f"labels_{stem}"]) for stem in ("query", "retrieval")})


def score(codes: CodeSet) -> list[AuditRow]:
    """Every protocol's mAP of one code set: both directions, ranked against the database and the queries."""
    from agch.evaluation.metrics import evaluate_hashing

    rows = []
    for direction in ("i2t", "t2i"):
        results = {}
        for against, pairs in RANKINGS.items():
            query, ranked = pairs[direction]
            self_excluded = against == "queries"
            results[against] = evaluate_hashing(codes.codes[query], codes.codes[ranked], codes.labels["query"],
                                                codes.labels["query" if self_excluded else "retrieval"],
                                                ks=AUDIT_KS, precision_ks=(), pr_curve=False,
                                                exclude_self=self_excluded)
        # each cut-off's query-vs-query row right below its query-vs-database row
        rows += [AuditRow(codes, against, direction, k, result.map["map@all" if k is None else f"map@{k}"],
                          result.n_db) for k in AUDIT_KS for against, result in results.items()]
    return rows


def dataset_of(source: Source, data_arg: Path | None) -> tuple[Path | None, str]:
    """The dataset the codes come from: --data (checked against the run's dataset identity), else the run's
    dataset.path tag. (None, why) when there is none to re-encode from."""
    from agch.data.dataset import open_dataset

    expected = source.tags.get("dataset.identity") or source.protocol.get("dataset_identity")
    path = data_arg or (Path(source.tags["dataset.path"]) if "dataset.path" in source.tags else None)
    if path is None:
        return None, "no dataset to re-encode from: pass --data FILE, the dataset the codes come from"
    if expected is None:
        return None, f"cannot check {path} against these codes (no protocol.json beside codes.npz): not re-encoded"
    if data_arg is None and not path.is_file():
        return None, f"the run's dataset {path} is not there: pass --data FILE to re-encode"
    with open_dataset(path) as data:
        found, name = data.identity, data.name
    if found != expected:
        named = source.tags.get("dataset.name") or source.protocol.get("dataset", "?")
        problem = (f"dataset {path} ({name}, identity {found[:12]}...) is not the dataset {source.label} was "
                   f"computed on ({named}, identity {expected[:12]}...)")
        if data_arg is not None:
            raise UserError(f"--data: {problem}; pass that dataset's file")
        return None, f"{problem}; pass --data with that file to re-encode"
    return path, ""


def split_for(protocol: str, data: Any) -> Any:
    """The dataset's split under `protocol`: its stored one when it is that protocol, else drawn like it (the same
    number of queries; the stored seed for 'standard')."""
    from agch.data.splits import make_split

    if data.meta.get("split_protocol") == protocol:
        return data.split
    n_query = len(data.split.query)
    return make_split(protocol, data.n, seed=max(0, int(data.meta.get("split_seed", 0))), n_query=n_query,
                      n_train=max(1, min(len(data.split.train), data.n - n_query)))


def reencoded(source: Source, recorded: CodeSet, dataset: Path, device: str) -> tuple[list[CodeSet], list[str]]:
    """The other splits' test queries and databases encoded with the run's encoders.pt, and notes on each."""
    from agch import config as cfg
    from agch.config import load_yaml
    from agch.data.dataset import open_dataset
    from agch.method.model import AGCH
    from agch.data.splits import Split, evaluation_split
    from agch.evaluation.scoring import encode_split, evaluation_features
    from agch.method.device import resolve_device

    for needed in ("encoders.pt", "config.yaml"):
        if needed not in source.files:
            return [], [f"other splits not scored: {source.label} has no {needed}, so its model cannot re-encode "
                        "them (a CCA+ITQ reference, a run with save_encoders off, or one recorded before encoders "
                        "were logged)"]
    flat = dict(load_yaml(source.files["config.yaml"]) or {})
    config = cfg.layered(str(flat.pop("preset", "paper")), [cfg.Layer(flat, str(source.files["config.yaml"]))])
    dev = resolve_device(device)
    out, notes = [], []
    with open_dataset(dataset) as data:
        model = AGCH(data.image_dim, data.text_dim, config).to(dev)
        state = torch.load(source.files["encoders.pt"], map_location="cpu", weights_only=True)
        model.load_encoder_state(state, where=str(source.files["encoders.pt"]))
        trained_on = evaluation_split(data.split, config.eval_split).train
        with np.load(source.files["codes.npz"]) as npz:
            own = Split(npz["index_query"], npz["index_retrieval"], np.zeros(0, dtype=np.int64))
        again = encode_split(model, evaluation_features(data, own, dev))
        same = sum(int((again[k].cpu() == recorded.codes[k]).all(1).sum()) for k in again)
        total = sum(len(v) for v in again.values())
        notes.append(f"encoders.pt re-encodes the run's own rows to {same} of {total} identical codes"
                     + ("" if same == total else " (a different device or library version?)"))
        for protocol in AUDIT_SPLITS:
            if protocol == recorded.split and recorded.queries == "test":
                continue
            try:
                split = split_for(protocol, data)
            except UserError as err:
                notes.append(f"{protocol} split not scored: {err}")
                continue
            seen = int(np.isin(split.query, trained_on).sum())
            origin = "re-encoded" + (f" ({seen}/{len(split.query)} queries seen in training)" if seen else "")
            labels = {stem: torch.from_numpy(data.labels[idx]) for stem, idx in
                      (("query", split.query), ("retrieval", split.retrieval))}
            codes = {k: v.cpu() for k, v in encode_split(model, evaluation_features(data, split, dev)).items()}
            out.append(CodeSet(protocol, "test", origin, codes, labels))
            if seen:
                notes.append(f"{protocol} split: {seen} of its {len(split.query)} test queries were training pairs "
                             f"of this run's model (trained on the {recorded.split} split's training rows): its "
                             "scores there are optimistic")
    return out, notes


# ---------------------------------------------------------------- the report


def _describe_dataset(source: Source, bits: int) -> str:
    p, tags = source.protocol, source.tags
    name = tags.get("dataset.name") or p.get("dataset", "unknown (no protocol.json)")
    synthetic = tags.get("dataset.synthetic") or p.get("synthetic", "unknown")
    return f"{bits} bits, dataset {name} (synthetic parts: {synthetic})"


def headline(rows: list[AuditRow]) -> list[str]:
    """The debugging log's protocol beside the paper's: on the same codes, and across splits where both exist."""
    def pick(split: str | None, against: str, k: int | None) -> dict[str, float]:
        """None: the run's own codes; else that split's test queries."""
        def wanted(c: CodeSet) -> bool:
            return c is rows[0].codes if split is None else (c.split, c.queries) == (split, "test")

        return {r.direction: r.value for r in rows if r.against == against and r.k == k and wanted(r.codes)}

    def both(values: dict[str, float]) -> str:
        return f"I->T {values['i2t']:.4f}, T->I {values['t2i']:.4f}"

    own = rows[0].codes
    qq, qd = pick(None, "queries", None), pick(None, "database", 50)
    lines = [f"on the run's own codes ({own.split} split, {own.queries} queries): query-vs-query mAP@ALL (the "
             f"debugging log's protocol) {both(qq)}; query-vs-database mAP@50 (the paper's) {both(qd)}; "
             f"difference {qq['i2t'] - qd['i2t']:+.4f} / {qq['t2i'] - qd['t2i']:+.4f}"]
    log, paper = pick("file-order", "queries", None), pick("standard", "database", 50)
    if log and paper:
        lines.append(f"the same model under the log's whole protocol (file-order split, query vs query, mAP@ALL) "
                     f"{both(log)}; under the paper's (standard split, query vs database, mAP@50) {both(paper)}")
    return lines


def report(source: Source, rows: list[AuditRow], notes: list[str]) -> dict[str, str]:
    """The audit as console text, audit.md and audit.csv; every row names its protocol."""
    from agch.experiments.formatting import csv_text, markdown_table, text_table

    bits = int(rows[0].codes.codes["query_image"].shape[1])
    reference = {(id(r.codes), r.direction): r.value for r in rows if r.against == "database" and r.k == 50}
    head = ["split", "queries", "ranked against", "direction", "metric", "mAP", "Δ vs mAP@50 q-vs-db", "codes"]
    table, records = [], []
    for r in rows:
        n_query = len(r.codes.labels["query"])
        against = (f"database ({r.n_ranked})" if r.against == "database"
                   else f"other queries ({r.n_ranked}, self excluded)")
        delta = r.value - reference[(id(r.codes), r.direction)]
        shown = "" if (r.against, r.k) == ("database", 50) else f"{delta:+.4f}"
        direction = "I->T" if r.direction == "i2t" else "T->I"
        table.append([r.codes.split, f"{r.codes.queries} ({n_query})", against, direction, r.metric,
                      f"{r.value:.4f}", shown, r.codes.origin])
        records.append([r.codes.split, r.codes.queries, n_query, "query vs database" if r.against == "database"
                        else "query vs query (self excluded)", r.n_ranked, direction, r.metric, bits, RELEVANCE,
                        r.value, delta, r.codes.origin])
    protocol = (f"every row: {_describe_dataset(source, bits)}, Hamming ranking (ties by index), relevance = "
                f"{RELEVANCE}; split, queries, ranking set and cut-off per row")
    lines = headline(rows) + notes
    console = "\n\n".join([f"agch-audit {source.label}", protocol, text_table(head, table),
                           "\n".join(f"- {line}" for line in lines)])
    markdown = "\n\n".join([f"# Protocol audit of {source.label}", protocol + ".", markdown_table(head, table),
                            "## Notes", "\n".join(f"- {line}" for line in lines)]) + "\n"
    p, tags = source.protocol, source.tags
    dataset = [tags.get("dataset.name") or p.get("dataset", "unknown"),
               tags.get("dataset.synthetic") or p.get("synthetic", "unknown")]
    csv_head = ["split", "queries", "n_query", "ranking", "n_ranked", "direction", "metric", "bits", "relevance",
                "map", "delta_vs_map50_query_vs_database", "codes", "dataset", "synthetic"]
    return {"console": console, "audit.md": markdown,
            "audit.csv": csv_text(csv_head, [row + dataset for row in records])}


def run_audit(target: str, *, data: Path | None = None, tracking_uri: str | None = None, device: str = "auto",
              folder: Path) -> tuple[Source, dict[str, str]]:
    """Score `target`'s codes (a run id or a codes.npz path) under every protocol; (source, report tables).

    folder: where a run's artifacts are downloaded. A run gets the report as artifacts audit/audit.md and
    audit/audit.csv.
    """
    source = open_source(target, tracking_uri, folder)
    recorded = recorded_codes(source)
    dataset, why = dataset_of(source, data)
    sets, notes = ([], [why]) if dataset is None else reencoded(source, recorded, dataset, device)
    rows = [row for codes in [recorded, *sets] for row in score(codes)]
    tables = report(source, rows, notes)
    if source.run_id is not None:
        from agch.runs.tracking import DEFAULT_EXPERIMENT, open_tracker

        tracker = open_tracker(tracking_uri, DEFAULT_EXPERIMENT)
        tracker.log_files(source.run_id, {k: v for k, v in tables.items() if k != "console"}, "audit")
    return source, tables
