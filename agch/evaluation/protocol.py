"""The protocol record every reported mAP carries (docs/protocol.md), and its one-line description. Kept apart from
agch.method.train so that the drivers (agch-search, agch-ablate) describe their runs without importing torch."""

from __future__ import annotations

from typing import Any

from agch.config import Config
from agch.data.dataset import Dataset
from agch.data.splits import evaluation_split


def protocol_of(config: Config, data: Dataset) -> dict[str, Any]:
    """What every reported mAP means (docs/protocol.md): logged beside every figure."""
    split = evaluation_split(data.split, config.eval_split)
    return {
        "metrics": f"mAP@{config.topk} and mAP@ALL, Hamming ranking, relevance = >=1 shared label, ties by index",
        "directions": "i2t = image query -> text database, t2i = text query -> image database",
        "bits": config.bits,
        "split": data.meta.get("split_protocol"),
        "queries": config.eval_split,
        "n_query": len(split.query),
        "n_database": len(split.retrieval),
        "n_train": len(split.train),
        "dataset": data.name,
        "dataset_identity": data.identity,
        "synthetic": ",".join(sorted(data.synthetic)) or "none",
    }


def short_protocol(protocol: dict[str, Any]) -> str:
    """'64 bits, validation queries, synthetic data': what fits an axis label (optuna-dashboard's plots)."""
    data = "real data" if protocol["synthetic"] == "none" else "synthetic data"
    bits = f"{protocol['bits']} bits" if isinstance(protocol["bits"], int) else "bits searched"
    return f"{bits}, {protocol['queries']} queries, {data}"


def describe_protocol(protocol: dict[str, Any]) -> str:
    """'64 bits, standard split, test queries (2000 vs 18015 database), dataset NAME (synthetic parts: ...)'."""
    p = protocol
    return (f"{p['bits']} bits, {p['split']} split, {p['queries']} queries ({p['n_query']} vs {p['n_database']} "
            f"database), dataset {p['dataset']} (synthetic parts: {p['synthetic']})")
