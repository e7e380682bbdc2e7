"""The one trainer: `train(config, data, callback) -> TrainResult`. It knows nothing of Ray, Optuna or MLflow."""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agch.method import diagnostics
from agch.config import NON_SCIENTIFIC, Config, to_flat
from agch.data.dataset import Dataset
from agch.errors import UserError
from agch.method.losses import agch_loss
from agch.method.model import AGCH
from agch.evaluation.protocol import protocol_of
from agch.evaluation.scoring import codes_npz, evaluate, evaluation_features, rows_on_device
from agch.method.device import precision_of, resolve_device
from agch.method.similarity import batch_similarity
from agch.data.splits import evaluation_split

PROBE_SIZE = 256
"""Rows of the training set (a fixed sample, the same for every seed) used by the diagnostic probes."""


@dataclass
class EpochReport:
    """What the callback sees after each epoch."""

    epoch: int
    losses: dict[str, float]
    metrics: dict[str, float] | None = None
    """mAP and diagnostics when this epoch was evaluated, else None."""
    seconds: float = 0.0
    state: Callable[[], dict[str, Any]] | None = None
    """returns a checkpoint (model, optimizer, RNG, epoch) that `train(..., resume=...)` continues from."""


@dataclass
class TrainResult:
    """Outcome of one run. `status` is 'finished' or 'failed' (then `reason` and `failed_epoch` say why/when)."""

    status: str
    metrics: dict[str, float]
    protocol: dict[str, Any]
    epochs_run: int
    seconds: float
    device: str
    collapsed: bool = False
    deterministic: bool = True
    """False when CUDA ran without a deterministic cuBLAS workspace (see _deterministic_cuda)."""
    precision: str = "fp32"
    """see precision_of."""
    reason: str | None = None
    failed_epoch: int | None = None
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    encoders: dict[str, torch.Tensor] = field(default_factory=dict)
    """the trained hash functions (AGCH.encoder_state, on the CPU): what re-encodes other rows; {} for references."""
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def make_optimizer(model: AGCH, config: Config) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or Adam over the per-module learning-rate groups."""
    groups = model.parameter_groups(config)
    # fused: one kernel per step for all parameters instead of several memory-bound passes (CPU and CUDA)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr_fusion, weight_decay=config.weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=config.lr_fusion, momentum=config.momentum, weight_decay=config.weight_decay,
                           fused=True)


def _deterministic_cuda() -> bool:
    """Ask for deterministic CUDA kernels; True when same-seed runs will give the same codes.

    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle, at the process's first CUDA matmul. If the
    variable was unset and CUDA was already in use, setting it now is too late: that run is not deterministic
    (the agch commands set it at start-up, before any CUDA work; see agch.cli.common.run_main).
    """
    late = "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.cuda.is_initialized()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return not late


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch before anything random happens; return the batch-order generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _check_checkpoint(checkpoint: dict[str, Any], config: Config, data: Dataset) -> None:
    """A checkpoint must come from the same settings (NON_SCIENTIFIC fields aside) and fit the dataset's feature
    sizes; both are checked before anything is loaded."""
    saved = checkpoint.get("config")
    if saved is None:
        raise UserError("checkpoint has no config; it cannot be checked against this run's settings")
    current = {k: v for k, v in to_flat(config).items() if k not in NON_SCIENTIFIC}
    differing = sorted(k for k in current if str(saved.get(k)) != str(current[k]))
    if differing:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in differing[:6])
        raise UserError(f"checkpoint was made with other settings ({shown}); resume with the same config")
    state = checkpoint["model"]
    for modality, dim in (("image", data.image_dim), ("text", data.text_dim)):
        expected = state[f"norm.{modality}.shift"].shape[0]
        if expected != dim:
            raise UserError(f"checkpoint expects {modality} features of dimension {expected}, "
                            f"but dataset {data.path} has {dim}")


def train(config: Config, data: Dataset, callback: Callable[[EpochReport], None] | None = None, *,
          device: str = "auto", resume: dict[str, Any] | None = None) -> TrainResult:
    """Train AGCH on `data`'s training split and evaluate on its query/retrieval split.

    Args:
        config: every setting (see agch.config); `config.seed` seeds everything.
        data: an open dataset (agch.data.dataset.open_dataset).
        callback: called after every epoch with an EpochReport (per-epoch losses, metrics when evaluated, and a
            checkpoint function). Returning a reason (str) ends the run after that epoch: status 'finished',
            epochs_run < config.epochs, `reason` says why. Exceptions it raises propagate.
        device: 'auto', 'cpu' or 'cuda[:N]'.
        resume: a checkpoint from EpochReport.state(); training continues after its epoch.

    Returns:
        TrainResult: final metrics (names carry the protocol: map50_i2t, mapall_t2i, ...), sign codes, curves.
        A non-finite loss ends the run early with status 'failed' and the epoch; it does not raise.

    Example:
        >>> with open_dataset(path) as data:  # doctest: +SKIP
        ...     result = train(preset("paper"), data, device="cpu")
        ...     print(result.metrics["map50_i2t"])
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    deterministic = _deterministic_cuda() if dev.type == "cuda" else True
    generator = seed_everything(config.seed)
    split = evaluation_split(data.split, config.eval_split)
    if len(split.train) < 2:
        raise UserError(f"dataset {data.path}: the training split has {len(split.train)} rows; need at least 2")

    # ---- data on the device once: training rows in fp32; evaluation rows in their stored dtype (fp16 image and
    # uint8 tag features stay compact at NUS-WIDE size and lose nothing: widening them to fp32 is exact)
    train_x = rows_on_device(data, split.train, dev, {m: torch.float32 for m in ("image", "text")})
    cache = evaluation_features(data, split, dev)
    labels = {stem: torch.from_numpy(data.labels[idx]).to(dev) for stem, idx in
              (("query", split.query), ("retrieval", split.retrieval))}

    # ---- model and optimiser; the features go through the model's normalisation (training statistics) once
    model = AGCH(data.image_dim, data.text_dim, config).to(dev)
    for modality in ("image", "text"):
        model.norm[modality].fit(train_x[modality], config.feature_norm)
        train_x[modality] = model.norm[modality](train_x[modality])
    optimizer = make_optimizer(model, config)
    probe_idx = np.sort(np.random.default_rng(0).permutation(len(split.train))[:PROBE_SIZE])
    probe_t = torch.from_numpy(probe_idx).to(dev)
    probe = {"zv": train_x["image"][probe_t], "zt": train_x["text"][probe_t],
             "labels": torch.from_numpy(data.labels[split.train[probe_idx]]).to(dev)}
    s_stats = diagnostics.similarity_vs_labels(probe["zv"], probe["zt"], probe["labels"], config)
    first_epoch = 1
    if resume is not None:
        _check_checkpoint(resume, config, data)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        first_epoch = resume["epoch"] + 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.bf16 and dev.type == "cuda")

    def state(epoch: int) -> dict[str, Any]:
        # a deep copy: state_dict() shares storage with the live model, which keeps training
        return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
                              "config": to_flat(config)})

    n = len(split.train)
    bs = min(config.batch_size, n)
    history: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    codes: dict[str, torch.Tensor] = {}
    protocol = protocol_of(config, data)

    def finish(status: str, epochs_run: int, **extra: Any) -> TrainResult:
        collapsed = bool(metrics) and diagnostics.is_collapsed(metrics)
        final = dict(metrics, collapsed=float(collapsed))
        return TrainResult(status=status, metrics=final, protocol=protocol, epochs_run=epochs_run,
                           seconds=time.perf_counter() - started, device=str(dev), collapsed=collapsed,
                           deterministic=deterministic, precision=precision_of(config, str(dev)),
                           codes=codes_npz(codes, data, split), encoders=model.encoder_state(),
                           curves=curves, history=history, **extra)

    model.train()
    epoch = first_epoch - 1
    for epoch in range(first_epoch, config.epochs + 1):
        # ---- one epoch: forward, loss, backward, step; losses summed on the device (no per-batch host sync)
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(dev)
        sums: dict[str, torch.Tensor] = {}
        batches = 0
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            if len(idx) < 2:  # S needs pairs; BatchNorm needs more than one row
                continue
            zv, zt = train_x["image"][idx], train_x["text"][idx]
            with torch.no_grad():
                s, adjacency = batch_similarity(zv, zt, config)
            with autocast:
                out = model(zv, zt, adjacency)
            terms = agch_loss(out, s, config)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0) + value.detach()
            batches += 1
        losses = {key: float(v) / batches for key, v in sums.items()}
        row: dict[str, Any] = {"epoch": epoch, **{f"loss_{k}": v for k, v in losses.items()}}
        if not all(math.isfinite(v) for v in losses.values()):
            history.append(row)
            bad = ", ".join(k for k, v in losses.items() if not math.isfinite(v))
            return finish("failed", epoch, reason=f"non-finite loss ({bad}) at epoch {epoch}", failed_epoch=epoch)

        row["seconds"] = time.perf_counter() - t0  # training time of the epoch, evaluation excluded

        # ---- evaluation and diagnostics
        evaluated = None
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            t_eval = time.perf_counter()
            metrics, curves, codes = evaluate(model, cache, labels, config, protocol["split"])
            metrics.update(s_stats)
            metrics.update(diagnostics.model_probes(model, probe["zv"], probe["zt"], config))
            metrics["collapsed"] = float(diagnostics.is_collapsed(metrics))
            evaluated = dict(metrics)
            row.update(evaluated, eval_seconds=time.perf_counter() - t_eval)
        history.append(row)
        stop = callback and callback(EpochReport(epoch=epoch, losses=losses, metrics=evaluated,
                                                 seconds=row["seconds"], state=lambda e=epoch: state(e)))
        if stop and epoch < config.epochs:
            return finish("finished", epoch, reason=stop)
    return finish("finished", epoch)
