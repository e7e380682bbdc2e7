"""AGCH hyperparameter search and ablation service.

Public API (imported lazily, so `import agch` is cheap and does nothing):
    Config, preset, apply            — agch.config
    open_dataset                     — agch.data
    train, TrainResult, EpochReport  — agch.train
    evaluate_hashing                 — agch.metrics
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "agch.config", "preset": "agch.config", "apply": "agch.config",
    "open_dataset": "agch.data",
    "train": "agch.train", "TrainResult": "agch.train", "EpochReport": "agch.train",
    "evaluate_hashing": "agch.metrics",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agch' has no attribute {name!r}")
