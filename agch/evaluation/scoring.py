"""Scoring a model's or a reference method's codes: encoding the evaluation rows, every metric of both directions
(score_codes), and the codes.npz layout a run records and agch-audit reads back (CODE_KEYS, codes_npz)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from agch.config import Config
from agch.data.dataset import Dataset
from agch.data.splits import Split
from agch.evaluation.metrics import evaluate_hashing
from agch.method import diagnostics

if TYPE_CHECKING:
    from agch.method.model import AGCH

EVAL_CHUNK_ROWS = 4096
"""Rows encoded at once at evaluation: bounds memory for a NUS-WIDE-size database."""
CODE_KEYS = ("codes_query_image", "codes_query_text", "codes_retrieval_image", "codes_retrieval_text",
             "labels_query", "labels_retrieval")
"""The arrays every codes.npz holds (codes_npz adds index_query and index_retrieval)."""
CODES_README = """codes.npz: the final sign codes of this run, int8 in {-1,+1}, one row per item.
codes_query_image / codes_query_text: query set codes (image / text modality);
codes_retrieval_image / codes_retrieval_text: retrieval (database) set codes;
labels_query / labels_retrieval: multi-hot labels (uint8); index_query / index_retrieval: rows in the dataset file.
I->T ranks codes_retrieval_text by Hamming distance to each row of codes_query_image; T->I the other way round.
Relevance = at least one shared label. See protocol.json for the split and dataset these come from.
encoders.pt (when logged: config save_encoders): torch state_dict of the model's hash functions (feature norms,
image and text encoders; agch.method.model.AGCH.encoder_state); with config.yaml it re-encodes any rows (agch-audit).
"""


@torch.no_grad()
def encode_split(model: AGCH, cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sign codes of the query and retrieval sets, both modalities, encoded in bounded chunks (fp32 arithmetic on
    the stored values, exactly what training saw)."""
    model.eval()
    codes = {}
    for key, feats in cache.items():
        modality = key.split("_")[1]
        codes[key] = torch.cat([model.encode(modality, feats[i:i + EVAL_CHUNK_ROWS].float())
                                for i in range(0, len(feats), EVAL_CHUNK_ROWS)])
    model.train()
    return codes


def evaluate(model: AGCH, cache: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], config: Config,
             split_protocol: str) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """Encode the query and retrieval sets, then score_codes."""
    codes = encode_split(model, cache)
    return (*score_codes(codes, labels, config.topk, split_protocol), codes)


def score_codes(codes: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], k: int,
                split_protocol: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """mAP@k / mAP@ALL both directions, precision@k and PR curves, and the code statistics of sign codes keyed
    query_image, query_text, retrieval_image, retrieval_text (any method's: AGCH's or a reference's)."""
    metrics: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    directions = {"i2t": ("query_image", "retrieval_text"), "t2i": ("query_text", "retrieval_image")}
    for name, (q, r) in directions.items():
        res = evaluate_hashing(codes[q], codes[r], labels["query"], labels["retrieval"], ks=(k, None))
        metrics[f"map{k}_{name}"] = res.map[f"map@{k}"]
        metrics[f"mapall_{name}"] = res.map["map@all"]
        metrics.update({f"precision_at_{p}_{name}": v for p, v in res.precision_at_k.items()})
        curves[f"pr_precision_{name}"], curves[f"pr_recall_{name}"] = res.pr_precision, res.pr_recall
        if split_protocol == "file-order":
            # The debugging log's protocol: queries ranked against the other queries' other-modality codes.
            qq = evaluate_hashing(codes[q], codes[_other_modality(q)], labels["query"], labels["query"],
                                  ks=(None,), precision_ks=(), pr_curve=False, exclude_self=True)
            metrics[f"mapall_qq_{name}"] = qq.map["map@all"]
    for stat in (f"map{k}", "mapall"):
        metrics[f"{stat}_mean"] = (metrics[f"{stat}_i2t"] + metrics[f"{stat}_t2i"]) / 2
    metrics.update(diagnostics.code_statistics(codes["retrieval_image"], codes["retrieval_text"]))
    return metrics, curves


def _other_modality(key: str) -> str:
    """'query_image' → 'query_text' and back."""
    stem, modality = key.split("_")
    return f"{stem}_{'text' if modality == 'image' else 'image'}"


def evaluation_features(data: Dataset, split: Split, device: torch.device) -> dict[str, torch.Tensor]:
    """The query and retrieval rows of both modalities on the device in their stored dtype, keyed query_image,
    query_text, retrieval_image, retrieval_text: what encode_split encodes."""
    stored = {m: torch.from_numpy(np.zeros(0, data.stored_dtype(m))).dtype for m in ("image", "text")}
    return {f"{stem}_{m}": t for stem, idx in (("query", split.query), ("retrieval", split.retrieval))
            for m, t in rows_on_device(data, idx, device, stored).items()}


def rows_on_device(data: Dataset, idx: np.ndarray, device: torch.device,
               dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Both modalities' rows `idx`, read in bounded chunks and moved to the device once, as dtypes[modality]."""
    out = {}
    for modality, dtype in dtypes.items():
        parts = [torch.from_numpy(block).to(device=device, dtype=dtype) for _, block in data.iter_rows(modality, idx)]
        out[modality] = torch.cat(parts)
    return out



def codes_npz(codes: dict[str, torch.Tensor], data: Dataset, split: Split) -> dict[str, np.ndarray]:
    """Final sign codes (int8 ±1) with their labels and dataset row indices: the arrays of a run's codes.npz
    (CODES_README), which agch-audit re-scores."""
    if not codes:
        return {}
    out = {f"codes_{k}": v.cpu().numpy() for k, v in codes.items()}
    for stem, idx in (("query", split.query), ("retrieval", split.retrieval)):
        out[f"labels_{stem}"] = data.labels[idx]
        out[f"index_{stem}"] = idx
    return out
