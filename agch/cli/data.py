"""agch-data: build, import and inspect agch dataset files (docs/data-format.md).

    agch-data synth --out data/mirflickr-like.h5
    agch-data synth --out data/mirflickr-real-labels.h5 --labels ../shared/data/mirflickr25k-lall.mat \\
        --tags ../shared/data/mirflickr25k-yall.mat
    agch-data import lall.mat yall.mat xall-vgg.mat --out data/mirflickr.h5 --feature-extractor "VGG-19 fc7"
    agch-data extract mirflickr25k-iall.mat --backbone alexnet --weights alexnet-owt-7be5be79.pth --out xall-alexnet.mat
    agch-data info data/mirflickr.h5 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from agch.errors import UserError
from agch.data.splits import SPLIT_PROTOCOLS


class _Parser(argparse.ArgumentParser):
    """Usage errors print the full help of the (sub)command that was misused, then exit 2."""

    def error(self, message: str) -> NoReturn:
        self.print_help(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _split_options(parser: argparse.ArgumentParser, protocols: tuple[str, ...], default: str | None) -> None:
    parser.add_argument("--split", choices=protocols, default=default,
                        help=f"split protocol (default: {default or 'given with --train-keys, else standard'})")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the standard split (default 0)")
    parser.add_argument("--n-query", type=int, default=2000, help="queries (standard, ucch; default 2000)")
    parser.add_argument("--n-train", type=int, default=5000, help="training items (standard; default 5000)")


def _synth_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="PATH", help="dataset file to write (.h5)")
    parser.add_argument("--labels", type=Path, help="real labels .mat (key LAll); needs --tags")
    parser.add_argument("--tags", type=Path, help="real tags .mat (key YAll); needs --labels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic parts (default 0)")
    parser.add_argument("--n", type=int, help="items (fully synthetic only; default 20015)")
    parser.add_argument("--image-dim", type=int, default=4096, help="image feature dimension (default 4096)")
    parser.add_argument("--image-signal", type=float, default=None,
                        help="label signal in the synthetic image features, 0..1 (default: the calibrated level, "
                             "see docs/synthetic-data.md)")
    _split_options(parser, tuple(p for p in SPLIT_PROTOCOLS if p != "given"), "standard")


def _run_synth(args: argparse.Namespace) -> int:
    if (args.labels is None) != (args.tags is None):
        args.parser.error("--labels and --tags go together (real labels and tags, synthetic image features)")
    from agch.data.synth import ImageModel, build_synthetic_dataset

    image = ImageModel(dim=args.image_dim, **({} if args.image_signal is None else {"signal": args.image_signal}))
    path = build_synthetic_dataset(args.out, seed=args.seed, labels_path=args.labels, tags_path=args.tags, n=args.n,
                                   image=image, split=args.split, split_seed=args.split_seed,
                                   n_query=args.n_query, n_train=args.n_train)
    return _print_info(path, as_json=False)


def _import_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help=".mat files (MATLAB v5 or v7.3) holding the keys")
    parser.add_argument("--out", type=Path, required=True, metavar="PATH", help="dataset file to write (.h5)")
    parser.add_argument("--image-key", help="image features key (default XAll)")
    parser.add_argument("--text-key", help="text features key (default YAll)")
    parser.add_argument("--label-key", help="labels key (default LAll)")
    parser.add_argument("--train-keys", type=_key_list, metavar="IMAGE,TEXT,LABELS", help="image,text,labels keys of the file's train part")
    parser.add_argument("--test-keys", type=_key_list, metavar="IMAGE,TEXT,LABELS", help="image,text,labels keys of the file's test part")
    _split_options(parser, SPLIT_PROTOCOLS, None)
    parser.add_argument("--name", help="dataset name (default: the files' common name stem)")
    parser.add_argument("--feature-extractor", help='what made the image features, e.g. "VGG-19 fc7"')


def _run_import(args: argparse.Namespace) -> int:
    from agch.data.importers import import_mat

    path = import_mat(args.files, args.out, image_key=args.image_key, text_key=args.text_key,
                      label_key=args.label_key, train_keys=args.train_keys, test_keys=args.test_keys,
                      split=args.split, split_seed=args.split_seed, n_query=args.n_query, n_train=args.n_train,
                      name=args.name, feature_extractor=args.feature_extractor)
    return _print_info(path, as_json=False)


def _extract_options(parser: argparse.ArgumentParser) -> None:
    from agch.data.extract_options import BACKBONES, DTYPES, PRECISIONS, RAW_KEY

    parser.add_argument("images", type=Path, help=f"MATLAB v7.3 file of raw images (key {RAW_KEY}), or a folder of "
                                                  "image files (with --list)")
    parser.add_argument("--backbone", choices=BACKBONES, required=True, help="network whose fc7 to extract")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, metavar="FILE",
                         help="torchvision's ImageNet state dict (default: the file in torchvision's cache)")
    weights.add_argument("--random-weights", action="store_true", help="random initialisation (tests, benchmarks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    parser.add_argument("--out", type=Path, required=True, metavar="FEATURES.mat",
                        help="MATLAB v7.3 file to write (key XAll, N x 4096)")
    parser.add_argument("--key", default=RAW_KEY, help=f"raw images key of the .mat file (default {RAW_KEY})")
    parser.add_argument("--list", type=Path, dest="image_list", metavar="FILE",
                        help="with a folder: the image files in item order, one a line (row i of XAll = line i)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=max(0, min(8, (os.cpu_count() or 1) - 1)),
                        help="DataLoader worker processes (default: cores - 1, at most 8)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast (auto: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored dtype of the features")
    parser.add_argument("--max-images", type=int, metavar="N",
                        help="stop after N images (the same command continues from there)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_extract(args: argparse.Namespace) -> int:
    from agch.data.extract import extract_features

    result = extract_features(args.images, args.out, backbone=args.backbone, weights=args.weights,
                              random_weights=args.random_weights, seed=args.seed, key=args.key,
                              image_list=args.image_list, batch_size=args.batch_size, workers=args.workers,
                              device=args.device, precision=args.precision, dtype=args.dtype,
                              max_images=args.max_images, progress=not args.quiet)
    rate = f"{result.images} images in {result.seconds:.1f} s ({result.images_per_s:.1f} images/s)"
    if result.complete:
        print(f"wrote {result.path}: XAll {result.n} x 4096 {result.job['dtype']}, {args.backbone} fc7; {rate}")
    else:
        print(f"stopped after {result.done} of {result.n} images ({rate}); {result.path} holds them: run the same "
              "command again to continue")
    return 0


def _info_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="dataset file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_info(args: argparse.Namespace) -> int:
    return _print_info(args.path, as_json=args.json)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "synth": ("write a synthetic MIRFlickr-like dataset (or real labels and tags with synthetic image features)",
              _synth_options, _run_synth),
    "import": ("import MIRFlickr-25K / NUS-WIDE style .mat files", _import_options, _run_import),
    "extract": ("fc7 features (AlexNet, VGG-16, VGG-19) of raw images, as a v7.3 XAll file for import",
                _extract_options, _run_extract),
    "info": ("sizes, provenance, label and tag statistics, random-ranking mAP", _info_options, _run_info),
}


def build_parser() -> argparse.ArgumentParser:
    """The agch-data parser: one subparser per entry of COMMANDS."""
    parser = _Parser(prog="agch-data", description="Build, import and inspect agch dataset files.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (summary, add_options, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        add_options(sub)
        sub.set_defaults(run=run, parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run agch-data; returns the exit status (2 for usage errors and bad input)."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UserError as err:
        print(f"agch-data: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2


def _key_list(text: str) -> list[str]:
    return [key.strip() for key in text.split(",")]


def _print_info(path: Path, *, as_json: bool) -> int:
    from agch.data.dataset import open_dataset
    from agch.data.summary import summarize

    with open_dataset(path) as ds:
        summary = summarize(ds)
    print(json.dumps(summary, indent=2) if as_json else "\n".join(format_summary(summary)))
    return 0


def format_summary(s: dict[str, Any]) -> list[str]:
    """The human-readable lines of `agch.data.summary.summarize`'s dict."""
    split, tags, shared, chance = s["split"], s["tags"], s["shared_label_rate"], s["random_ranking"]
    seed = f"seed {split['seed']}" if split["seed"] >= 0 else "not seeded"
    synthetic = "; ".join(f"{part}: {how}" for part, how in s["synthetic"].items()) or "none (all parts real)"
    sources = [f"{f['path']} [{f['key']}] sha256 {f['sha256']}" + (f"; {f['transform']}" if "transform" in f else "")
               for f in s["source_files"]] or ["none"]
    lines = [
        f"dataset    {s['name']}  (identity {s['identity']})",
        f"file       {s['path']}",
        f"items      {s['n']:,}   image {s['image']['dim']}-d {s['image']['dtype']}   "
        f"text {s['text']['dim']}-d {s['text']['dtype']}   labels {s['n_labels']}",
        f"split      {split['protocol']} ({seed}): query {split['query']:,}, retrieval {split['retrieval']:,}, "
        f"train {split['train']:,}",
        f"synthetic  {synthetic}",
        f"features   {s['feature_extractor']}",
        *(f"{'sources' if i == 0 else ''}".ljust(11) + line for i, line in enumerate(sources)),
        f"labels     {s['labels']['per_item_mean']:.2f} per item (mean); "
        f"{s['labels']['items_without_label']:,} items without a label",
        f"tags       {tags['nonzeros_per_row_mean']:.2f} nonzeros per row (mean), density {tags['density']:.3%}; "
        f"{tags['empty_rows']:,} empty rows",
        f"shared     {shared['value']:.1%} of item pairs share >= 1 label ({shared['method']})",
    ]
    protocol = chance["protocol"].removeprefix("random ranking, ")
    lines += [f"random ranking, mAP@ALL, {protocol}: {chance['map@all']:.4f}",
              f"random ranking, mAP@50, {protocol}: {chance['map@50']:.4f}"]
    if "cca_itq" in s:
        c = s["cca_itq"]
        lines.append(f"CCA+ITQ, mAP@50 I->T {c['map50_i2t']:.4f} T->I {c['map50_t2i']:.4f}, mAP@ALL I->T "
                     f"{c['mapall_i2t']:.4f} T->I {c['mapall_t2i']:.4f}: {c['protocol'].removeprefix('CCA+ITQ ')}")
    if "s_statistics" in s:
        st = s["s_statistics"]
        lines.append(f"S statistics: {st['protocol']} (the debugging log on real MIRFlickr-25K features, debug-log "
                     "reading: corr 0.29, positive pairs -0.73, negative pairs -0.81)")
        lines += [f"  {name} reading: corr {st[name]['s_label_corr']:.3f}, positive pairs "
                  f"{st[name]['s_mean_positive']:.3f}, negative pairs {st[name]['s_mean_negative']:.3f}"
                  for name in ("debug-log", "paper")]
    return lines
