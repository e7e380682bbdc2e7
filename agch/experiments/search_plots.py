"""A search's plots, as PNG bytes for its parent run: the history of every trial (stopped ones included), and
Optuna's parameter importances and contour of the finished trials. Each names its metric and protocol and is drawn
at the size the MLflow UI's artifact view shows it (about 900 pixels wide)."""

from __future__ import annotations

import io
import textwrap
import warnings
from typing import Any

from agch.experiments.search_space import SearchSpace
from agch.runs.names import describe_metric

DPI = 110
WIDTH_IN = 8.2
"""Figure width in inches: at DPI, the width of the MLflow UI's artifact preview, so text is drawn at its size."""


def draw_plots(study: Any, space: SearchSpace, protocol: str) -> tuple[dict[str, bytes], list[str]]:
    """{file name: PNG bytes} per objective, and notes on the plots not drawn (e.g. too few finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plot

    names = [p.name for p in space.parameters]
    finished = sum(t.state.name == "COMPLETE" for t in study.trials)
    pngs, skipped = {}, []
    for index, metric in enumerate(space.metrics):
        suffix = "" if len(space.metrics) == 1 else f"_{metric}"
        title = _title(describe_metric(metric), protocol)
        pngs[f"optimization_history{suffix}.png"] = _history(study, index, space.mode, title)
        if finished < 2:
            skipped.append(f"importance and contour plots need two finished trials; {finished} finished")
            continue
        target = None if len(space.metrics) == 1 else (lambda t, i=index: t.values[i])
        try:
            pngs[f"param_importances{suffix}.png"] = _importances(study, target, title)
            if len(names) >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                    axes = plot.plot_contour(study, params=names, target=target, target_name=describe_metric(metric))
                figure = _flat(axes)[0].figure
                figure.set_size_inches(WIDTH_IN, WIDTH_IN * 0.9)
                figure.suptitle(f"{title}\n(finished trials)", fontsize=9)
                for ax in _flat(axes):
                    ax.tick_params(labelsize=7)
                    ax.xaxis.label.set_size(8)
                    ax.yaxis.label.set_size(8)
                    ax.set_title("")
                pngs[f"contour{suffix}.png"] = _png(figure)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # e.g. too few distinct values
            skipped.append(f"importance or contour plot{suffix} not drawn: {err}")
    return pngs, skipped


def _importances(study: Any, target: Any, title: str) -> bytes:
    """Optuna's fANOVA importance of each searched parameter for the objective, over the finished trials."""
    import matplotlib.pyplot as plt
    import optuna

    importances = optuna.importance.get_param_importances(study, target=target)
    figure, ax = plt.subplots(figsize=(WIDTH_IN, 1.2 + 0.45 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    ax.set_xlabel("importance (fANOVA, share of the objective's variance over the finished trials)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_xlim(0, 1.1 * max(importances.values(), default=1))
    ax.set_title(title, fontsize=9)
    return _png(figure)


def _history(study: Any, index: int, mode: str, title: str) -> bytes:
    """Every trial's value by trial number: finished filled, stopped by the scheduler hollow (their value at the
    epoch they stopped), failed as marks on the axis; the best finished value so far as a step line."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(WIDTH_IN, 4.2))
    kinds = {"COMPLETE": [], "PRUNED": [], "FAIL": []}
    for trial in study.trials:
        value = (trial.values or [None] * (index + 1))[index] if trial.state.name != "FAIL" else None
        if trial.state.name in kinds:
            kinds[trial.state.name].append((trial.number, value))
    finished = kinds["COMPLETE"]
    if finished:
        ax.scatter(*zip(*finished), color="tab:blue", zorder=3, label=f"finished ({len(finished)})")
        best, running = [], None
        for number, value in sorted(finished):
            running = value if running is None else (max if mode == "max" else min)(running, value)
            best.append((number, running))
        best.append((max(t.number for t in study.trials), running))  # on to the last trial
        ax.step(*zip(*best), where="post", color="tab:red", linewidth=1.2, label="best finished so far")
    stopped = [(n, v) for n, v in kinds["PRUNED"] if v is not None]
    if stopped:
        ax.scatter(*zip(*stopped), facecolors="none", edgecolors="tab:blue", zorder=3,
                   label=f"stopped early by the scheduler ({len(stopped)}): value at its last epoch")
    if kinds["FAIL"]:
        low = min((v for _, v in finished + stopped), default=0.0)
        ax.scatter([n for n, _ in kinds["FAIL"]], [low] * len(kinds["FAIL"]), marker="x", color="tab:gray",
                   label=f"failed ({len(kinds['FAIL'])}): no value")
    ax.set_xlabel("trial (t0, t1, ...)", fontsize=8)
    ax.set_ylabel(title.splitlines()[0], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.set_title(title, fontsize=9)
    return _png(figure)


def _title(metric: str, protocol: str) -> str:
    """The metric on the first line, the rest of the protocol wrapped below it."""
    rest = protocol[len(metric):].lstrip(", ") if protocol.startswith(metric) else protocol
    return metric + "\n" + "\n".join(textwrap.wrap(rest, 110))


def _flat(axes: Any) -> list:
    import numpy as np

    return list(np.atleast_1d(axes).flat)


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
