"""The CLI surface every command shares: data, preset, overrides, fixes, seed, device, tracking."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


from agch import config as cfg
from agch.config import load_yaml
from agch.errors import UserError


def add_common_options(parser: argparse.ArgumentParser, preset_default: str = "paper", *,
                       settings: bool = True) -> None:
    """--data --preset --config --set --fix --eval-split --seed --device --tracking-uri.

    `preset_default` is shown in --preset's help; a command whose input file names the preset passes that wording.
    settings=False: only --data --device --tracking-uri (agch-audit trains nothing; the settings are the run's).
    """
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset file (agch-data format); default: the bundled synthetic MIRFlickr-like set")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add_tracking_option(parser)
    if not settings:
        return
    parser.add_argument("--preset", default=None,
                        help=f"base settings: {', '.join(cfg.PRESETS)} (default {preset_default})")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML of config keys (optionally 'preset: NAME', which --preset overrides); "
                             "--set, --fix and --seed override its keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set delta=1.0 (repeatable)")
    parser.add_argument("--fix", dest="fixes", action="append", default=[], metavar="NAME=on|off",
                        help=f"switch a debugging-log fix: {', '.join(cfg.FIX_ALIASES)} (repeatable)")
    parser.add_argument("--eval-split", dest="overrides", action="append", type=_eval_split, metavar="test|validation",
                        help="which queries score runs: the dataset's test queries (agch-train's default) or "
                             "validation queries carved from its other rows (agch-search's and agch-ablate's "
                             "default); the same as --set eval_split=...")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")


def add_tracking_option(parser: argparse.ArgumentParser, experiment: str | None = None) -> None:
    """--tracking-uri, and --experiment with its default when `experiment` is given (the `show` subcommands)."""
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else an SQLite file under "
                             "$AGCH_HOME, default ./.agch)")
    if experiment is not None:
        parser.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment})")


def add_grid_options(parser: argparse.ArgumentParser, *, name_help: str, defaults_from: str = "") -> None:
    """--rerun --name --experiment --ray-address --max-concurrent --gpus-per-trial: the options of the commands that
    train cells × seeds as Ray Tune grids (agch-ablate, agch-table). `defaults_from` prefixes the GPU default."""
    parser.add_argument("--rerun", action="store_true",
                        help="train every cell × seed again even when recorded; never resume an interrupted run")
    parser.add_argument("--name", default=None, help=name_help)
    parser.add_argument("--experiment", default="agch", help="MLflow experiment name (default agch)")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what fits)")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help=f"GPU fraction per trial (default: {defaults_from}0.25 when a GPU is present)")


def _eval_split(value: str) -> str:
    """--eval-split X as the --set item it stands for."""
    if value not in cfg.CHOICES["eval_split"]:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(cfg.CHOICES['eval_split'])}, got {value!r}")
    return f"eval_split={value}"


def parse_pairs(items: Sequence[str], option: str) -> dict[str, str]:
    """['a=1', 'b=2'] → {'a': '1', 'b': '2'}, with an error naming the option for anything else."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option} expects KEY=VALUE, got '{item}'")
        out[key.strip()] = value.strip()
    return out


def config_layers(args: argparse.Namespace, *, held_fixes_only: bool = False,
                  seed: bool = True) -> tuple[str | None, list[cfg.Layer]]:
    """The command line's settings as layers for agch.config.layered, the same for every command.

    Returns (preset, layers). preset: --preset, else the --config file's `preset:`, else None (the command's own
    default: paper, the space file's, the design's). layers, applied in order (later wins): the --config file's keys,
    --set, --fix NAME=on|off, then --seed (unless seed=False: agch-ablate and agch-table number seeds from it).
    held_fixes_only: a bare --fix NAME is the ablation's subject, not a layer (agch-ablate).
    """
    file_preset, from_file = None, {}
    if args.config is not None:
        loaded = load_yaml(args.config) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{args.config}: expected a mapping of config keys, got {type(loaded).__name__}")
        from_file = cfg.flat_overrides(loaded, str(args.config))
        file_preset = from_file.pop("preset", None)
    held = [f for f in args.fixes if "=" in f] if held_fixes_only else args.fixes
    fixes = {f"fixes.{cfg.fix_name(k, '--fix')}": v for k, v in parse_pairs(held, "--fix").items()}
    layers = [cfg.Layer(from_file, str(args.config)), cfg.Layer(parse_pairs(args.overrides, "--set"), "--set"),
              cfg.Layer(fixes, "--fix")]
    if seed and args.seed is not None:
        layers.append(cfg.Layer({"seed": args.seed}, "--seed"))
    return args.preset or file_preset, layers


def config_from_args(args: argparse.Namespace, default_preset: str = "paper") -> tuple[str, cfg.Config]:
    """(preset name, config): the preset, then each of config_layers in order."""
    preset, layers = config_layers(args)
    preset = preset or default_preset
    return preset, cfg.layered(preset, layers)


def dataset_path(args: argparse.Namespace) -> Path:
    """--data as an absolute path, or the default synthetic dataset (generated on first use)."""
    if args.data is None:
        from agch.paths import default_dataset

        return default_dataset()
    return args.data.expanduser().resolve()


def run_main(prog: str, handler: Callable[[], int | None]) -> int:
    """Run a CLI body: user errors become one line on stderr and exit 2; Ctrl-C exits 130."""
    # no "creating tables" chatter on a store's first use: MLflow sets its loggers' level from this when imported
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # deterministic cuBLAS reductions: read when cuBLAS starts, so set before any CUDA work (agch.method.train explains)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        return handler() or 0
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; everything finished so far is recorded", file=sys.stderr)
        return 130
