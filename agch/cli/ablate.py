"""agch-ablate: does each debugging-log fix help, beyond seed noise? Cells × seeds in Ray Tune, paired statistics."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from agch import config as cfg
from agch.cli.common import (add_common_options, add_grid_options, add_tracking_option, config_layers, dataset_path,
                             parse_pairs, run_main)
from agch.errors import UserError

EPILOG = """examples:
  agch-ablate --fix alignment                      # alignment on vs off on the paper preset, 5 seeds
  agch-ablate --fix balance --fix quantization --design leave-one-out
  agch-ablate ablations/debug_log_story.yaml       # every fix, added to the paper and removed from the log's final
  agch-ablate debug_log_story --seeds 3 --epochs 2 # a quicker look at the same
  agch-ablate --toggle feature_norm=none,standardize --data wiki.h5   # any config key between two values

--fix NAME toggles a fix (the ablation's subject); --fix NAME=on|off holds one fixed in every cell.
--toggle KEY=OFF,ON switches any other config key between two values, like a fix. A --config file is the
base: a key it sets that is also switched takes the factor's values in every cell.
A cell × seed already recorded in the tracking store (same config identity, seed and dataset) is reused."""


def build_parser() -> argparse.ArgumentParser:
    from agch.experiments.ablation_spec import DEFAULT_BUDGET, DEFAULT_SEEDS, DESIGNS

    parser = argparse.ArgumentParser(
        prog="agch-ablate", description="Ablate the debugging log's fixes: each on vs off, same seeds, paired tests.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", default=None,
                        help="ablation YAML (a path, or a shipped one by name: ablations/NAME.yaml, NAME)")
    add_common_options(parser, preset_default="the file's, else the design's: paper, debug-log for leave-one-out")
    parser.add_argument("--toggle", dest="toggles", action="append", default=[], metavar="KEY=OFF,ON",
                        help="switch a config key between two values (off first), e.g. "
                             "--toggle feature_norm=none,standardize (repeatable)")
    parser.add_argument("--design", choices=list(DESIGNS), default=None,
                        help="design without a file (default one-fix); with a file, replaces the file's designs")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per cell (default: the file's, else {DEFAULT_SEEDS}); numbered from --seed (0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs per run (default: the file's, else {DEFAULT_BUDGET['epochs']})")
    add_grid_options(parser, name_help="ablation name (default: the file's, else fix-NAME...)",
                     defaults_from="the file's, else ")
    return parser


def spec_from_args(args: argparse.Namespace) -> Any:
    """The ablation file (or the default design) with the command line's options layered on top."""
    from agch.experiments.ablation_spec import (DEFAULT_BUDGET, DESIGNS, AblationSpec, Design, check_not_fixed,
                                                check_resources,
                                    load_spec, resolve_spec_path, toggle_list)

    toggled = tuple(cfg.fix_name(f, "--fix") for f in args.fixes if "=" not in f)
    if len(set(toggled)) != len(toggled):
        raise UserError("--fix: a fix is toggled twice")
    switched = toggle_list({k: v.split(",") for k, v in parse_pairs(args.toggles, "--toggle").items()}, "--toggle")
    preset, layers = config_layers(args, held_fixes_only=True, seed=False)
    if args.file is not None:
        spec = load_spec(resolve_spec_path(args.file))
        where = f"{args.file} overrides"
    elif toggled or switched:
        names = [f.replace("_", "-") for f in toggled] + [t.name for t in switched]
        budget = {k: v for k, v in DEFAULT_BUDGET.items() if k not in {t.key for t in switched}}
        spec = AblationSpec(name=("fix-" if toggled else "toggle-") + "-".join(names),
                            designs=(Design("one-fix", "paper"),), fixes=toggled, toggles=switched, overrides=budget)
        where = "the default budget"
    else:
        raise UserError(f"nothing to ablate: name a fix (--fix NAME, one of {', '.join(cfg.FIX_ALIASES)}), "
                        "a config key (--toggle KEY=OFF,ON) or an ablation file")
    if toggled or switched:
        spec = dataclasses.replace(spec, fixes=toggled, toggles=switched)
    sources = [cfg.Layer(spec.overrides, where), *layers]
    for layer in sources:
        if layer.where != str(args.config):  # a --config file is a base: the factors' own values replace its keys
            check_not_fixed(spec.factors, layer.values, layer.where)
    overrides = cfg.layered_keys(sources)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if "seed" in overrides:
        raise UserError("seed cannot be set with --set/--config here: use --seed (first seed) and --seeds (count)")
    kinds = [args.design] if args.design else [d.kind for d in spec.designs]
    designs = tuple(dict.fromkeys(Design(k, preset or _file_preset(spec, k) or DESIGNS[k]) for k in kinds))
    for design in designs:
        cfg.layered(design.preset, [cfg.Layer(overrides, "ablation settings")],
                    where=f"--preset ({design.kind} needs a base preset)")
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds must be >= 1 (>= 2 for a verdict), got {args.seeds}")
    seeds = spec.seeds
    if args.seeds is not None or args.seed is not None:
        first = args.seed if args.seed is not None else 0
        seeds = tuple(range(first, first + (args.seeds if args.seeds is not None else len(spec.seeds))))
    resources = dict(spec.resources)
    if args.gpus_per_trial is not None:
        resources["gpu"] = args.gpus_per_trial
    return dataclasses.replace(
        spec, name=args.name or spec.name, designs=designs, overrides=overrides, seeds=seeds,
        resources=check_resources(resources, "--gpus-per-trial"),
        max_concurrent=args.max_concurrent or spec.max_concurrent)


def _file_preset(spec: Any, kind: str) -> str | None:
    """The preset the file gave this design kind, if it has that kind."""
    return next((d.preset for d in spec.designs if d.kind == kind), None)


def live_line(label: str, seed: int, metrics: dict[str, Any], topk: int) -> str | None:
    """One console line per evaluated epoch of a trial (None for epochs without mAP)."""
    key = f"map{topk}_mean"
    if metrics.get(key) is None:
        return None
    epoch = metrics.get("epoch", metrics.get("training_iteration", "?"))
    return (f"  {label} seed {seed} epoch {epoch}: mAP@{topk} (mean of I->T, T->I) {metrics[key]:.4f}  "
            f"mAP@ALL (mean) {metrics.get('mapall_mean', float('nan')):.4f}")


def run(argv: list[str] | None) -> int:
    from agch.experiments.ablation import run_ablation
    from agch.experiments.ablation_report import analyse, publish, report_tables
    from agch.runs.tracking import outage_hint, resolve_uri

    args = build_parser().parse_args(argv)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    spec = spec_from_args(args)
    if len(spec.seeds) < 2:
        print(f"agch-ablate: warning: {len(spec.seeds)} seed: the runs go ahead, but no verdict is possible "
              "(a paired test needs >= 2 seeds)", file=sys.stderr)
    if spec.datasets and args.data is not None:
        raise UserError(f"--data: this ablation compares the datasets its file names "
                        f"({', '.join(name for name, _ in spec.datasets)}); drop --data")
    data = (None if spec.datasets else
            dataset_path(args) if spec.dataset is None or args.data is not None else spec.dataset.resolve())
    topk = cfg.layered(spec.designs[0].preset, [cfg.Layer(spec.overrides, "ablation settings")]).topk
    say = lambda text: print(text, flush=True)  # noqa: E731
    switched = [f.describe() for f in spec.factors]
    if spec.datasets:
        switched.append(f"dataset {spec.datasets[0][0]}->{spec.datasets[1][0]}")
    say(f"agch-ablate {spec.name}: {', '.join(d.kind + ' (' + d.preset + ')' for d in spec.designs)} over "
        f"{', '.join(switched)}; seeds {', '.join(map(str, spec.seeds))}; "
        f"dataset {data or ' vs '.join(f'{name} {path}' for name, path in spec.datasets)}")
    with outage_hint(resolve_uri(args.tracking_uri), "run the same agch-ablate command (it resumes this ablation "
                     "and retrains nothing recorded)"):
        result = run_ablation(spec, data, tracking_uri=args.tracking_uri, experiment=args.experiment,
                              device=args.device, rerun=args.rerun, ray_address=args.ray_address,
                              on_result=live_printer(topk, say), say=say)
        results = analyse(result)
        tables = report_tables(result, results)
        publish(result, results, tables)
    return report_and_exit("agch-ablate", result, tables["console"],
                           "results.md, comparisons.csv, trials.csv, effects.png; effects as metrics effect.*, "
                           "verdicts as tags agch.verdict.*", say)


def live_printer(topk: int, say: Callable[[str], None]) -> Callable[[str, int, dict[str, Any]], None]:
    """The on_result of run_ablation / run_table: one console line per evaluated epoch of a trial."""
    def on_result(label: str, seed: int, metrics: dict[str, Any]) -> None:
        line = live_line(label, seed, metrics, topk)
        if line:
            say(line)

    return on_result


def report_and_exit(prog: str, result: Any, console: str, artifacts: str, say: Callable[[str], None]) -> int:
    """Print the report and where it is recorded (agch-ablate, agch-table); the exit status: 130 interrupted, 1 when
    a run failed, else 0."""
    from agch.runs.tracking import open_tracker
    from agch.runs.ui import ui_hint

    say("\n" + console)
    say(f"\nMLflow: parent run {result.parent_run_id} (experiment {result.experiment}) at {result.tracking_uri}; "
        f"artifacts {artifacts}.\n" + ui_hint(open_tracker(result.tracking_uri, result.experiment),
                                               result.plan.spec.name, f"map{result.topk}_mean",
                                               result.parent_run_id))
    if result.interrupted:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 1 if result.count(status="failed") else 0


def show(argv: list[str]) -> int:
    """agch-ablate show NAME [--tracking-uri URI] [--experiment E]: the newest report of ablation NAME."""
    from agch.experiments.results import ablation_report
    from agch.runs.tracking import open_tracker
    from agch.runs.ui import ui_hint

    parser = argparse.ArgumentParser(prog="agch-ablate show", description=show.__doc__)
    parser.add_argument("name", help="the ablation's name (its file's name:, or fix-NAME / toggle-KEY)")
    add_tracking_option(parser, experiment="agch")
    args = parser.parse_args(argv)
    tracker = open_tracker(args.tracking_uri, args.experiment, wait=False)
    print(ablation_report(tracker, args.name))
    print(ui_hint(tracker, args.name, "map50_mean"))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["show"]:
        return run_main("agch-ablate", lambda: show(argv[1:]))
    return run_main("agch-ablate", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
