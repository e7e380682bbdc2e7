"""agch-table: the paper's Table II layout for a preset on a dataset, beside the published numbers
(agch.experiments.paper_table)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from agch import config as cfg
from agch.cli.common import add_common_options, add_grid_options, config_layers, dataset_path, run_main
from agch.errors import UserError

EPILOG = """examples:
  agch-table --preset paper                                  # 16/32/64/128 bits, 5 seeds, the preset's epochs
  agch-table --preset real-features --data wiki.h5 --seeds 3
  agch-table --bits 16,32 --seeds 2 --epochs 2 --set text_hidden=256 --set gcn_hidden=128

Cells are scored on the dataset's test queries (the published protocol) unless --eval-split validation.
A cell × seed already recorded in the tracking store (same config identity, seed, dataset, precision) is reused."""


def build_parser() -> argparse.ArgumentParser:
    from agch.experiments.ablation_spec import DEFAULT_SEEDS
    from agch.experiments.paper_table import DEFAULT_BITS

    parser = argparse.ArgumentParser(
        prog="agch-table", description="The paper's Table II for a preset: I->T and T->I by code length, mean ± std "
        "over seeds, beside the published AGCH and DJSRH numbers.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--bits", default=",".join(map(str, DEFAULT_BITS)),
                        help="code lengths, one column each (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                        help="seeds per cell, numbered from --seed (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: the preset's)")
    add_grid_options(parser, name_help="table name (default: the preset's); parent run table-NAME")
    return parser


def parse_bits(text: str) -> tuple[int, ...]:
    """'16,32,64' → (16, 32, 64): integers, no repeats, each a valid code length."""
    try:
        bits = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--bits expects comma-separated integers such as 16,32,64,128, got '{text}'") from None
    if len(set(bits)) != len(bits):
        raise UserError(f"--bits lists a code length twice: {text}")
    for b in bits:
        cfg.apply(cfg.Config(), {"bits": b}, where="--bits")
    return bits


def settings_from_args(args: argparse.Namespace) -> tuple[str, cfg.Config, tuple[int, ...], Any]:
    """(preset, base config, bits, trial spec) from the command line; every bad input is a UserError here."""
    from agch.experiments.ablation_spec import DEFAULT_RESOURCES, AblationSpec, check_resources

    preset, layers = config_layers(args, seed=False)
    preset = preset or "paper"
    for layer in layers:
        for key, option in (("bits", "--bits"), ("seed", "--seed and --seeds")):
            if key in cfg.layered_keys([layer]):
                raise UserError(f"{layer.where}: {key} is set by {option} in agch-table, not as a config key")
    epochs = [cfg.Layer({"epochs": args.epochs}, "--epochs")] if args.epochs is not None else []
    base = cfg.layered(preset, [*layers, *epochs])
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    first = args.seed or 0
    resources = dict(DEFAULT_RESOURCES, **({} if args.gpus_per_trial is None else {"gpu": args.gpus_per_trial}))
    spec = AblationSpec(name=args.name or preset, designs=(), fixes=(), seeds=tuple(range(first, first + args.seeds)),
                        resources=check_resources(resources, "--gpus-per-trial"), max_concurrent=args.max_concurrent)
    return preset, base, parse_bits(args.bits), spec


def run(argv: list[str] | None) -> int:
    from agch.cli.ablate import live_printer, report_and_exit
    from agch.experiments.paper_table import publish, report_tables, run_table
    from agch.runs.tracking import outage_hint, resolve_uri

    args = build_parser().parse_args(argv)
    preset, base, bits, spec = settings_from_args(args)
    data = dataset_path(args)
    say = lambda text: print(text, flush=True)  # noqa: E731
    say(f"agch-table {spec.name}: preset {preset}; {'/'.join(map(str, bits))} bits; seeds "
        f"{', '.join(map(str, spec.seeds))}; {base.epochs} epochs; dataset {data}")
    with outage_hint(resolve_uri(args.tracking_uri), "run the same agch-table command (it reuses every recorded "
                     "cell)"):
        result = run_table(spec.name, preset, base, bits, spec, data, tracking_uri=args.tracking_uri,
                           experiment=args.experiment, device=args.device, rerun=args.rerun,
                           ray_address=args.ray_address, on_result=live_printer(base.topk, say), say=say)
        tables = report_tables(result)
        publish(result, tables)
    return report_and_exit("agch-table", result, tables["console"], "table.md, table.csv, trials.csv, table.png", say)


def main(argv: list[str] | None = None) -> int:
    return run_main("agch-table", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
