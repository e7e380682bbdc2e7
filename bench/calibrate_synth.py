"""Calibrate the synthetic image signal against the debugging log's S statistics (a script, not a test).

    python bench/calibrate_synth.py [--data-dir ../shared/data] [--signals 0.6 0.7 0.8 0.9] [--bits 16]

The anchor (../shared/docs/data.md, "Calibrating the image signal"): AGCH's S under the debug-log reading (square-root
distance, S = C * D, 2S - 1) on real MIRFlickr-25K features, as the debugging log measured it on batches of 128:
correlation with sharing a label 0.29, mean over pairs sharing a label -0.73, over pairs sharing none -0.81. For each
signal level the script builds the real-labels stand-in (real labels and tags, synthetic images) and prints those
statistics (agch.method.diagnostics.dataset_s_statistics: 40 batches of 128 training pairs, seed 0), then reports -- not
targets -- CCA+ITQ (agch.method.baselines.cca_itq, fitted on the 5,000 training pairs of the standard split, seed 0),
image-cosine I->I retrieval, and the anchors of the labels and tags (random ranking; tag-cosine T->T: docs/protocol.md
gives mAP@ALL 0.577, mAP@50 0.774 on the real files). Then the same for the fully synthetic default. Every mAP:
2,000 queries vs the 18,015-item retrieval set, relevance = at least one shared label.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from agch.method.baselines import cca_itq
from agch.config import apply, preset
from agch.data.dataset import Dataset, open_dataset
from agch.method.diagnostics import dataset_s_statistics
from agch.evaluation.metrics import map_at_k, random_ranking_map, relevance
from agch.data.synth import DEFAULT_IMAGE_SIGNAL, ImageModel, build_synthetic_dataset

ANCHOR = {"s_label_corr": 0.29, "s_mean_positive": -0.73, "s_mean_negative": -0.81}
"""The debugging log's S statistics on real MIRFlickr-25K features (debug-log reading, batches of 128)."""


def cca_itq_scores(ds: Dataset, bits: int, seed: int) -> dict[str, float]:
    """agch.method.baselines.cca_itq on the split's train pairs: mAP of query vs retrieval in both directions, the chosen
    ridge and the top canonical correlation."""
    metrics = cca_itq(apply(preset("paper"), {"bits": bits, "seed": seed}), ds).metrics
    return {"ridge": metrics["cca_ridge"], "top canonical corr": metrics["cca_top_corr"],
            **{f"{d} mAP@{k}": metrics[f"map{k.lower() if k == 'ALL' else k}_{key}"]
               for d, key in (("I->T", "i2t"), ("T->I", "t2i")) for k in ("50", "ALL")}}


def cosine_scores(ds: Dataset, modality: str) -> dict[str, float]:
    """mAP@50 and mAP@ALL of cosine ranking within one modality (query vs retrieval): how much signal it has."""
    def unit(rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(ds.rows(modality, rows))
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    split = ds.split
    dist = -(unit(split.query) @ unit(split.retrieval).T)
    relevant = relevance(torch.from_numpy(ds.labels[split.query]), torch.from_numpy(ds.labels[split.retrieval]))
    return {"mAP@50": map_at_k(dist, relevant, 50), "mAP@ALL": map_at_k(dist, relevant, None)}


def similarity_scores(ds: Dataset) -> dict[str, float]:
    """S under the debug-log reading against sharing a label (the anchor's measurement)."""
    return dataset_s_statistics(ds, preset("debug-log"))


def report(title: str, ds: Dataset, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    scores = cca_itq_scores(ds, args.bits, args.seed)
    image, s = cosine_scores(ds, "image"), similarity_scores(ds)
    print(f"{title}: CCA+ITQ {args.bits} bits  I->T mAP@50 {scores['I->T mAP@50']:.3f}  "
          f"T->I mAP@50 {scores['T->I mAP@50']:.3f}  I->T mAP@ALL {scores['I->T mAP@ALL']:.3f}  "
          f"T->I mAP@ALL {scores['T->I mAP@ALL']:.3f}  ridge {scores['ridge']:g}  "
          f"top canonical corr {scores['top canonical corr']:.3f}  "
          f"| image-cosine I->I mAP@50 {image['mAP@50']:.3f} mAP@ALL {image['mAP@ALL']:.3f}  "
          f"| S vs labels corr {s['s_label_corr']:.3f} (S positives {s['s_mean_positive']:.3f}, "
          f"negatives {s['s_mean_negative']:.3f}; anchor {ANCHOR['s_label_corr']}, {ANCHOR['s_mean_positive']}, "
          f"{ANCHOR['s_mean_negative']})  ({time.perf_counter() - t0:.0f} s)", flush=True)


def anchors(title: str, ds: Dataset) -> None:
    """Random ranking and tag-cosine text->text retrieval: properties of the labels and tags, not of images."""
    split = ds.split
    chance = random_ranking_map(torch.from_numpy(ds.labels[split.query]),
                                torch.from_numpy(ds.labels[split.retrieval]), ks=(50, None), seed=0)
    text = cosine_scores(ds, "text")
    print(f"{title}: random ranking mAP@50 {chance['map@50']:.3f} mAP@ALL {chance['map@all']:.3f}  | "
          f"tag-cosine T->T mAP@50 {text['mAP@50']:.3f} mAP@ALL {text['mAP@ALL']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"),
                        help="folder with mirflickr25k-lall.mat and mirflickr25k-yall.mat")
    parser.add_argument("--signals", type=float, nargs="*", default=[0.6, 0.7, 0.8, 0.9],
                        help="image signal levels of the real-labels stand-in (none: only the fully synthetic set)")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="generator seed (split seed is 0) and ITQ init seed")
    parser.add_argument("--skip-fully-synthetic", action="store_true")
    args = parser.parse_args()

    print("protocol: mAP of 2,000 queries vs the 18,015-item retrieval set, standard split (seed 0), relevance = "
          "at least one shared label; CCA+ITQ fitted on the 5,000 train pairs; S statistics pooled over 40 batches "
          "of 128 training pairs")
    with tempfile.TemporaryDirectory() as tmp:
        for signal in args.signals:
            path = build_synthetic_dataset(Path(tmp) / f"standin-{signal:g}.h5", seed=args.seed,
                                           labels_path=args.data_dir / "mirflickr25k-lall.mat",
                                           tags_path=args.data_dir / "mirflickr25k-yall.mat",
                                           image=ImageModel(signal=signal))
            with open_dataset(path) as ds:
                report(f"real labels + real tags + synthetic images, signal {signal:g}", ds, args)
                if signal == args.signals[0]:
                    anchors("real labels + real tags", ds)
            path.unlink()
        if not args.skip_fully_synthetic:
            path = build_synthetic_dataset(Path(tmp) / "synthetic.h5", seed=args.seed)
            with open_dataset(path) as ds:
                report(f"fully synthetic MIRFlickr-like, signal {DEFAULT_IMAGE_SIGNAL:g} (default)", ds, args)
                anchors("fully synthetic labels + tags", ds)


if __name__ == "__main__":
    main()
