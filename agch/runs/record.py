"""What one training run records in MLflow beside its metrics: the tags naming what it computed on, its final
metrics, status and artifacts (codes, curves, history, the config, the hash functions), and the code version."""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path
from typing import Any

from agch import __version__
from agch import config as cfg
from agch.runs.names import Tag


def code_version() -> str:
    """Package version plus the git commit of the source tree when it is a checkout ('+dirty' if modified)."""
    here = Path(__file__).resolve().parents[1]  # the agch package
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def run_tags(config: cfg.Config, data: Any) -> dict[str, str]:
    """Tags naming what a run computed on: dataset identity, synthetic parts, split, config identity, and what
    every mAP of the run is (agch.protocol)."""
    from agch.evaluation.protocol import describe_protocol, protocol_of

    return {
        Tag.PROTOCOL: describe_protocol(protocol_of(config, data)),
        "dataset.name": data.name,
        "dataset.path": str(data.path),
        "dataset.identity": data.identity,
        "dataset.synthetic": ",".join(sorted(data.synthetic)) or "none",
        "dataset.split": str(data.meta.get("split_protocol")),
        Tag.IDENTITY: cfg.identity(config, dataset=data.identity),
        Tag.BITS: str(config.bits),
    }


def history_csv(history: list[dict[str, Any]]) -> str:
    """Per-epoch rows as CSV (columns: the union of keys, epoch first)."""
    keys = sorted({k for row in history for k in row} - {"epoch"})
    lines = [["epoch", *keys]] + [[row.get("epoch"), *(row.get(k, "") for k in keys)] for row in history]
    out = io.StringIO(newline="")
    csv.writer(out).writerows(lines)
    return out.getvalue()


def log_result(tracker: Any, run_id: str, config: cfg.Config, result: Any) -> None:
    """Final metrics, status, protocol and artifacts (codes, curves, history, a config agch-train accepts)."""
    tracker.log_metrics(run_id, result.metrics, step=result.epochs_run)
    tracker.log_metrics(run_id, {"train_seconds": result.seconds}, step=result.epochs_run)
    tracker.set_tags(run_id, {Tag.STATUS: result.status, Tag.REASON: result.reason or "",
                              Tag.FAILED_EPOCH: result.failed_epoch or "", Tag.COLLAPSED: result.collapsed,
                              Tag.DEVICE: result.device, Tag.PRECISION: result.precision,
                              Tag.TRAINER_VERSION: cfg.TRAINER_VERSION})
    files: dict[str, Any] = {"protocol.json": result.protocol, "config.yaml": {"preset": "paper", **cfg.to_flat(config)},
                             "history.csv": history_csv(result.history)}
    if result.codes:
        from agch.evaluation.scoring import CODES_README

        files["codes.npz"] = result.codes
        files["codes_README.txt"] = CODES_README
    if result.encoders and config.save_encoders:
        files["encoders.pt"] = encoders_bytes(result.encoders)
    if result.curves:
        files["curves.npz"] = result.curves
    tracker.log_files(run_id, files)


def encoders_bytes(state: dict[str, Any]) -> bytes:
    """A state_dict as the bytes of a torch.save file (read back with torch.load(..., weights_only=True))."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()
