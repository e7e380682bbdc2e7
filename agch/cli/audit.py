"""agch-audit: one run's codes re-scored under every protocol the project knows (agch.experiments.audit)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from agch.cli.common import add_common_options, run_main

EPILOG = """examples:
  agch-audit 3f2a...c9                       # a run id agch-train printed (its store: --tracking-uri)
  agch-audit path/to/codes.npz --data F.h5   # downloaded artifacts: codes.npz with protocol.json, config.yaml,
                                             # encoders.pt beside it

Rows: mAP@50, mAP@100, mAP@ALL; I->T and T->I; queries ranked against the database (the paper) and against the
other queries, self excluded (the debugging log); the run's own split and, re-encoded with the run's encoders.pt,
the standard, ucch and file-order splits' test queries. A run gets the tables as artifacts audit/audit.md and
audit/audit.csv."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agch-audit", description="Re-score one run's codes under every evaluation protocol.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="an MLflow run id, or a codes.npz (or the folder holding it)")
    add_common_options(parser, settings=False)
    parser.add_argument("--out", type=Path, default=None, help="also write audit.md and audit.csv into this folder")
    return parser


def run(argv: list[str] | None) -> int:
    from agch.experiments.audit import run_audit
    from agch.method.device import resolve_device

    args = build_parser().parse_args(argv)
    resolve_device(args.device)  # a bad --device fails before anything is read
    data = args.data.expanduser().resolve() if args.data is not None else None
    with tempfile.TemporaryDirectory() as folder:
        source, tables = run_audit(args.target, data=data, tracking_uri=args.tracking_uri, device=args.device,
                                   folder=Path(folder))
    print(tables["console"])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("audit.md", "audit.csv"):
            (args.out / name).write_text(tables[name])
        print(f"wrote {args.out / 'audit.md'} and {args.out / 'audit.csv'}")
    if source.run_id is not None:
        print(f"logged to run {source.run_id} as artifacts audit/audit.md and audit/audit.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("agch-audit", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
