"""agch-search: hyperparameter search over a YAML space with an Optuna sampler inside Ray Tune, tracked in MLflow."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, TextIO

from agch.cli.common import add_common_options, add_tracking_option, config_layers, run_main
from agch.runs.names import cutoff_of

STATE_ORDER = ("running", "finished", "stopped", "failed", "interrupted")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agch-search", description="Search AGCH hyperparameters (Optuna sampler inside Ray Tune, MLflow).",
        epilog="example: agch-search run spaces/delta_gamma.yaml --trials 20 --epochs 10")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,resume,check,show}")
    run = commands.add_parser("run", help="start a search from a space file",
                              description="Start a search. SPACE: a YAML file, or spaces/NAME.yaml (shipped).")
    run.add_argument("space", help="search-space YAML (spaces/NAME.yaml = shipped search_spaces/NAME.yaml)")
    add_common_options(run, preset_default="the space file's 'preset'")
    run.add_argument("--trials", type=int, default=None, help="number of trials (overrides the file)")
    run.add_argument("--epochs", type=int, default=None, help="epochs per trial, the budget (overrides the file)")
    run.add_argument("--storage", default=os.environ.get("AGCH_STORAGE") or None,
                     help="Optuna storage URL, e.g. postgresql://user:pw@host/db (default: $AGCH_STORAGE, else "
                          "SQLite beside MLflow's)")
    run.add_argument("--name", default=None, help="search name: MLflow parent run, Optuna study (default: FILE-time)")
    run.add_argument("--experiment", default="agch-search", help="MLflow experiment (default agch-search)")
    resume = commands.add_parser("resume", help="continue an interrupted search",
                                 description="Continue a search: finished trials are kept, unfinished ones continue.")
    resume.add_argument("name", help="the search's name (printed when it started)")
    check = commands.add_parser("check", help="validate a space file and print what it would run")
    check.add_argument("space", help="search-space YAML (spaces/NAME.yaml = shipped)")
    show = commands.add_parser("show", help="print a search's trials, best first, from the tracking store")
    show.add_argument("name", help="the search's name")
    add_tracking_option(show, experiment="agch-search")
    for sub in (run, resume):
        sub.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                         help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray)")
        sub.add_argument("--verbose", action="store_true", help="show Ray's and Optuna's own logging")
    return parser


class LiveTable:
    """The console view of a running search: a header, one row per trial (its name t0, t1, ...; state; epoch of the
    budget; the objective; the params), and how many trials have ended of how many; redrawn in place on a
    terminal, one line per evaluation and per ended trial otherwise. A line announces each step that takes seconds
    (on_step)."""

    def __init__(self, out: TextIO | None = None, refresh_s: float = 1.0):
        self.out = out or sys.stdout
        self.refresh_s, self.tty = refresh_s, self.out.isatty()
        self.rows: dict[str, dict[str, Any]] = {}
        self.drawn, self.last_draw = 0, 0.0

    def on_step(self, text: str) -> None:
        print(f"{text} ...", file=self.out, flush=True)
        self.drawn = 0  # a table drawn before stays above this line

    def on_start(self, name: str, space: Any, protocol: str, references: dict[str, float]) -> None:
        from agch.method.baselines import describe_references

        self.metric, self.mode, self.names = space.metrics[0], space.mode, [p.name for p in space.parameters]
        self.total, self.epochs = space.trials * space.seeds, space.epochs
        print(f"search {name}: {space.trials} trials x {space.seeds} seed(s), sampler {space.sampler} "
              f"(seed {space.sampler_seed}), scheduler {space.scheduler}, up to {space.epochs} epochs each, "
              f"{space.concurrency} at a time", file=self.out)
        print(f"objective ({space.mode}): {space.metrics[0]} = {protocol}", file=self.out)
        if references:
            k = space.base["topk"]
            print(f"references on the same queries: {describe_references(references, k)}", file=self.out)
        print(file=self.out)
        if not self.tty:
            print(self._header(), file=self.out)
        self.out.flush()

    def on_result(self, trial_id: str, params: dict, result: dict) -> None:
        row = self.rows.setdefault(trial_id, {"state": "running", "params": params, "epoch": 0, "value": None})
        row["epoch"] = result.get("epoch", row["epoch"])
        evaluated = self.metric in result
        if evaluated:
            row["value"] = float(result[self.metric])
        self._show(trial_id, force=False, changed=evaluated)

    def on_complete(self, outcome: Any) -> None:
        row = self.rows.setdefault(outcome.trial_id, {"params": outcome.params, "epoch": 0, "value": None})
        row.update(state=outcome.status, reason=outcome.reason, epoch=outcome.epochs or row["epoch"])
        if self.metric in outcome.metrics:
            row["value"] = outcome.metrics[self.metric]
        self._show(outcome.trial_id, force=True)

    def best(self) -> tuple[str, dict] | None:
        scored = [(t, r) for t, r in self.rows.items() if r["value"] is not None and r["state"] == "finished"]
        if not scored:
            return None
        return (max if self.mode == "max" else min)(scored, key=lambda item: item[1]["value"])

    def _name(self, trial_id: str) -> str:
        """The trial's name, t<Optuna trial number>, as in its MLflow run's name (Ray's id when it has none)."""
        from agch.runs.context import TRIAL_NUMBER

        number = self.rows[trial_id]["params"].get(TRIAL_NUMBER)
        return trial_id if number is None else f"t{number}"

    def _header(self) -> str:
        return (f"{'trial':<6} {'state':<11} {'epoch':>7}  {self.metric:<11} " + " ".join(f"{n:<9}" for n in self.names)
                ).rstrip()

    def _line(self, trial_id: str, row: dict) -> str:
        params = " ".join(f"{_short(row['params'].get(n)):<9}" for n in self.names)
        value = "-" if row["value"] is None else f"{row['value']:.4f}"
        extra = f"  ({row['reason']})" if row.get("reason") and row["state"] != "finished" else ""
        epoch = f"{row['epoch']}/{self.epochs}"
        return f"{self._name(trial_id):<6} {row['state']:<11} {epoch:>7}  {value:<11} {params}".rstrip() + extra

    def _progress(self) -> str:
        ended = sum(r["state"] not in ("running", "interrupted") for r in self.rows.values())
        best = self.best()
        return (f"{ended}/{self.total} trials ended; best so far: " +
                (f"{self._name(best[0])} {self.metric} {best[1]['value']:.4f}" if best else "-"))

    def _show(self, trial_id: str, force: bool, changed: bool = True) -> None:
        if not self.tty:  # a log: one line per evaluation and per ended trial, not per epoch
            if force or changed:
                ended = f"  [{self._progress().split(';')[0]}]" if force else ""
                print(self._line(trial_id, self.rows[trial_id]) + ended, file=self.out, flush=True)
            return
        if not force and time.monotonic() - self.last_draw < self.refresh_s:
            return
        lines = [self._header(), *(self._line(t, r) for t, r in self.rows.items()), self._progress()]
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")  # back to the table's first line, clear below
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.drawn, self.last_draw = len(lines), time.monotonic()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarize(report: Any, out: TextIO | None = None) -> None:
    """The final summary: trials by state, the best trial by its name with its MLflow run's link, its config and
    test-query figures, where to look in MLflow and Optuna."""
    out = out or sys.stdout
    counts = {s: sum(o.status == s for o in report.outcomes) for s in STATE_ORDER[1:]}
    state = "interrupted" if report.interrupted else "finished"
    print(f"\nsearch {report.name} {state}: " + ", ".join(f"{n} {s}" for s, n in counts.items()), file=out)
    for note in report.notes:
        print(f"  note: {note}", file=out)
    if report.best:
        best = report.best
        values = ", ".join(f"{m} {v:.4f}" for m, v in best["values"].items())
        name = (best.get("run_names") or [best.get("name", "")])[0]
        print(f"best trial: {name} ({values}; {report.protocol})", file=out)
        for link in best.get("run_links", []):
            print(f"  its MLflow run: {link}", file=out)
        print(f"  Optuna trial {best['optuna_trial']} of study '{report.name}'; Ray Tune trial(s) "
              f"{', '.join(best['tune_trial_ids'])}", file=out)
        print("  params: " + ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items()), file=out)
        print(f"  config for agch-train: agch-train --config {report.best_config}", file=out)
        if report.test is not None:
            t = report.test
            k = cutoff_of(t)
            print(f"  test queries, scored once for these settings: mAP@{k} I->T {t[f'map{k}_i2t']:.4f} "
                  f"T->I {t[f'map{k}_t2i']:.4f} | mAP@ALL I->T {t['mapall_i2t']:.4f} T->I {t['mapall_t2i']:.4f} "
                  f"({report.test_protocol})", file=out)
        elif report.test_protocol:
            print(f"  test queries: {report.test_protocol}", file=out)
    else:
        print("no trial finished yet", file=out)
    print(f"MLflow: parent run {report.parent_run_id} in experiment '{report.experiment}' at {report.tracking_uri}",
          file=out)
    print(report.ui, file=out)
    print(f"Optuna: study '{report.name}' in {report.storage_url} (optuna-dashboard {report.storage_url})", file=out)
    if report.interrupted:
        print(f"continue it with: agch-search resume {report.name}", file=out)


def _check(args: argparse.Namespace) -> int:
    from agch.experiments.search_space import load_space

    space = load_space(args.space)
    print(f"{space.source}: ok: {', '.join(p.name for p in space.parameters)} by {space.sampler}, "
          f"{space.trials} trials x {space.epochs} epochs, scheduler {space.scheduler}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from agch.experiments import search
    from agch.experiments.search_space import load_space

    data = args.data.expanduser().resolve() if args.data else None
    preset, layers = config_layers(args)
    space = load_space(args.space, layers=layers, preset=preset, trials=args.trials,
                       epochs=args.epochs, dataset=data)
    return _report(lambda table: search.start(
        space, name=args.name, tracking_uri=args.tracking_uri, experiment=args.experiment, storage_url=args.storage,
        ray_address=args.ray_address, device=args.device, verbose=args.verbose, listener=table))


def _resume(args: argparse.Namespace) -> int:
    from agch.experiments import search

    return _report(lambda table: search.resume(args.name, ray_address=args.ray_address, verbose=args.verbose,
                                               listener=table))


def _report(drive: Any) -> int:
    """Run a search with the live table, shut down the Ray this command started, print the summary."""
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # a caller's Ray is left running
    try:
        report = drive(LiveTable())
    finally:
        if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    summarize(report)
    return 130 if report.interrupted else 0


def _show(args: argparse.Namespace) -> int:
    from agch.experiments.results import search_table
    from agch.runs.tracking import open_tracker
    from agch.runs.ui import ui_hint

    tracker = open_tracker(args.tracking_uri, args.experiment, wait=False)
    print(search_table(tracker, args.name))
    print(ui_hint(tracker, args.name, "map50_mean"))
    return 0


HANDLERS = {"run": _run, "resume": _resume, "check": _check, "show": _show}


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return HANDLERS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    return run_main("agch-search", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
