"""Search-space files: the shipped ones validate, `spaces/NAME.yaml` resolves, and every bad input is one clear line.

These tests never start Ray: validation and the store checks all happen before any trial.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import yaml

from agch import config as cfg
from agch.experiments import search_space
from agch.runs import names
from agch.cli.search import main
from agch.errors import UserError

SHIPPED = sorted(p.stem for p in search_space.SHIPPED_DIR.glob("*.yaml"))
GOOD = {
    "preset": "paper",
    "fixed": {"bits": 16, "text_hidden": 64, "gcn_hidden": 64},
    "parameters": {"delta": {"type": "float", "low": 0.001, "high": 10, "log": True},
                   "gamma_v": {"low": 0.5, "high": 4}},
    "sampler": {"name": "tpe", "seed": 0},
    "scheduler": {"name": "asha", "epochs": 3, "grace_period": 1, "reduction_factor": 2},
    "trials": 4,
}


def write_space(tmp_path: Path, doc: dict | str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def changed(**top: object) -> dict:
    """GOOD with top-level keys replaced (None deletes one)."""
    doc = {**GOOD, **top}
    return {k: v for k, v in doc.items() if v is not None}


def test_shipped_files_exist_and_say_the_names_are_the_papers() -> None:
    assert {"delta_gamma", "batch_size", "loss_weights", "broad"} <= set(SHIPPED)
    for stem in SHIPPED:
        text = (search_space.SHIPPED_DIR / f"{stem}.yaml").read_text()
        assert "names are the paper's" in text and "δ" in text and "γ" in text, stem


@pytest.mark.parametrize("stem", SHIPPED)
def test_every_shipped_space_validates(stem: str) -> None:
    space = search_space.load_space(f"spaces/{stem}.yaml")
    assert space.source == str(search_space.SHIPPED_DIR / f"{stem}.yaml")
    assert space.parameters and space.trials >= 1 and space.epochs >= 1
    assert space.base["eval_every"] == 1  # the scheduler and the sampler see every epoch
    for parameter in space.parameters:
        parameter.distribution()  # maps onto an Optuna distribution
    search_space.make_sampler(space)


def test_spaces_prefix_means_shipped_unless_the_user_has_that_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert search_space.resolve_space_path("spaces/delta_gamma.yaml") == search_space.SHIPPED_DIR / "delta_gamma.yaml"
    (tmp_path / "spaces").mkdir()
    mine = write_space(tmp_path / "spaces", GOOD, "delta_gamma.yaml")
    assert search_space.resolve_space_path("spaces/delta_gamma.yaml") == mine.resolve()
    assert [p.name for p in search_space.load_space("spaces/delta_gamma.yaml").parameters] == ["delta", "gamma_v"]
    with pytest.raises(UserError, match=r"unknown shipped search space 'spaces/delta_gama.yaml' \(did you mean"):
        search_space.resolve_space_path("spaces/delta_gama.yaml")
    with pytest.raises(UserError, match="search space file not found: nowhere.yaml"):
        search_space.resolve_space_path("nowhere.yaml")


def test_overrides_win_and_a_grid_is_capped(tmp_path: Path) -> None:
    doc = changed(parameters={"batch_size": [32, 64], "fixes.text-input": [False, True]}, sampler="grid", trials=9)
    space = search_space.load_space(str(write_space(tmp_path, doc)), layers=[cfg.Layer({"lam": "2.5"}, "--set")],
                                    trials=None, epochs=2)
    assert space.base["lam"] == 2.5 and space.base["epochs"] == 2 and space.epochs == 2
    assert [p.name for p in space.parameters] == ["batch_size", "fixes.text_input"]
    assert space.trials == 4 and "grid size, 4" in space.notes[0]
    assert search_space.Parameter("x", "float", low=0.1, high=0.5, step=0.2).grid() == [0.1, 0.3, 0.5]
    assert search_space.Parameter("x", "int", low=16, high=64, step=16).grid() == [16, 32, 48, 64]


def test_metric_names_carry_their_protocol() -> None:
    assert names.describe_metric("map50_mean") == "mAP@50 mean(I->T, T->I)"
    assert names.describe_metric("mapall_t2i") == "mAP@ALL T->I"


BAD = [
    ("malformed", "parameters:\n  delta: {low: 1\n  gamma_v: 2\n", r"space.yaml line \d+: malformed YAML"),
    ("unknown top key", changed(parameter={"delta": {"low": 0.1, "high": 1}}),
     r"line \d+: parameter: unknown key 'parameter' \(did you mean 'parameters'\?\)"),
    ("unknown parameter", changed(parameters={"dleta": {"low": 0.1, "high": 1}}),
     r"parameters.dleta: unknown parameter 'dleta' \(did you mean 'delta'\?\)"),
    ("unknown parameter key", changed(parameters={"delta": {"low": 0.1, "hgh": 1}}),
     r"parameters.delta.hgh: unknown parameter key 'hgh' \(did you mean 'high'\?\)"),
    ("empty range", changed(parameters={"delta": {"low": 1, "high": 1}}), r"parameters.delta: empty range"),
    ("inverted range", changed(parameters={"delta": {"low": 2, "high": 1}}),
     r"parameters.delta: inverted range: low 2.0 > high 1.0"),
    ("no choices", changed(parameters={"distance": {"type": "categorical", "choices": []}}),
     r"parameters.distance.choices: a categorical parameter needs a non-empty list of choices"),
    ("bad choice", changed(parameters={"distance": ["euclidean", "manhattan"]}),
     r"distance must be one of euclidean, sqrt, got 'manhattan'"),
    ("negative weight", changed(parameters={"delta": {"low": -1, "high": 1}}), r"delta must be a finite number >= 0"),
    ("log needs positive low", changed(parameters={"delta": {"low": 0, "high": 1, "log": True}}),
     r"parameters.delta.low: a log range needs low > 0"),
    ("step with log", changed(parameters={"delta": {"low": 0.1, "high": 1, "log": True, "step": 0.1}}),
     r"step and log cannot be combined"),
    ("float on an int", changed(parameters={"bits": {"type": "float", "low": 16, "high": 64}}),
     r"parameters.bits: is an integer setting: use type: int"),
    ("range on a switch", changed(parameters={"fixes.alignment": {"low": 0, "high": 1}}),
     r"parameters.fixes.alignment: is bool-valued: give 'choices'"),
    ("budget searched", changed(parameters={"epochs": {"type": "int", "low": 1, "high": 9}}),
     r"parameters.epochs: cannot be searched \(the budget: set scheduler.epochs\)"),
    ("budget fixed", changed(fixed={"epochs": 3}), r"fixed.epochs: the budget in epochs is scheduler.epochs"),
    ("searched and fixed", changed(fixed={"delta": 1.0}), r"parameters.delta: is searched, so it cannot also be"),
    ("unknown sampler", changed(sampler={"name": "tpee"}), r"unknown sampler 'tpee' \(did you mean 'tpe'\?\)"),
    ("cmaes with categoricals", changed(sampler="cmaes", parameters={"delta": {"low": 0.1, "high": 1},
                                                                     "distance": ["euclidean", "sqrt"]}),
     r"sampler.name: CMA-ES cannot sample categorical parameters \(distance\)"),
    ("grid without steps", changed(sampler="grid"), r"a grid needs choices or a step for every parameter"),
    ("bad sampler option", changed(sampler={"name": "tpe", "options": {"n_startup": 3}}),
     r"sampler.options.n_startup: unknown TPESampler option .n_startup. \(did you mean .n_startup_trials.\?\)"),
    ("unknown scheduler", changed(scheduler={"name": "hyperband"}), r"unknown scheduler 'hyperband'"),
    ("grace beyond budget", changed(scheduler={"name": "asha", "epochs": 2, "grace_period": 3}),
     r"scheduler.grace_period: must be in \[1, epochs=2\], got 3"),
    ("seeds with asha", changed(seeds=3), r"seeds: several seeds per trial average whole runs"),
    ("unknown objective", changed(objective={"metric": "map_mean"}), r"unknown objective metric 'map_mean'"),
    ("fractional gpus above one", changed(resources={"cpus": 1, "gpus": 1.5}), r"resources.gpus: must be a fraction"),
    ("bad time budget", changed(time_budget="soon"), r"time_budget: must be seconds or a duration"),
    ("unknown preset", changed(preset="paper2"), r"unknown preset 'paper2' \(did you mean 'paper'\?\)"),
]


@pytest.mark.parametrize("doc,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_space_is_one_clear_line_and_exit_2(tmp_path: Path, capsys, doc: dict | str, expected: str) -> None:
    path = write_space(tmp_path, doc)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("agch-search: error: "), err
    assert re.search(expected, err), err
    assert not (Path(os.environ["AGCH_HOME"]) / "searches").exists()  # nothing started


def test_line_numbers_point_at_the_offending_key(tmp_path: Path) -> None:
    path = write_space(tmp_path, "preset: paper\nparameters:\n  delta:\n    low: 3\n    high: 1\n")
    with pytest.raises(UserError, match=r"space.yaml line 3: parameters.delta: inverted range"):
        search_space.load_space(str(path))


ONE_PARAMETER = "preset: paper\nparameters:\n  delta: {low: 0.1, high: 1}\n"
"""Lines 1-3 of every file below; what each test adds starts on line 4."""


@pytest.mark.parametrize("text,expected", [
    ("scheduler:\n  name: asha\n  grace: 2\n",
     r"line 6: scheduler.grace: unknown key in scheduler 'grace' \(did you mean 'grace_period'\?\); "
     r"known: epochs, grace_period, name, reduction_factor, stop_on_collapse$"),
    ("resources: {cpus: 1, gpu: 1}\n",
     r"line 4: resources.gpu: unknown key in resources 'gpu' \(did you mean 'gpus'\?\); known: cpus, gpus$"),
    ("sampler:\n  name: tpe\n  options: [1]\n", r"line 6: sampler.options: must be a mapping of sampler arguments, "
                                               r"got \[1\]$"),
    ("trials: '5'\n", r"line 4: trials: must be an integer, got '5'$"),
    ("trials: 2.5\n", r"line 4: trials: must be an integer, got 2.5$"),
    ("concurrency: 0\n", r"line 4: concurrency: must be >= 1, got 0$"),
    ("resources: {cpus: .inf}\n", r"line 4: resources.cpus: must be a finite number, got inf$"),
    ("objective: {mode: best}\n", r"line 4: objective.mode: must be 'max' or 'min', got 'best'$"),
    ("sampler: 3\n", r"line 4: sampler: must be a mapping of name, seed, options, got 3$"),
], ids=["section key", "resources key", "options type", "string for int", "float for int", "bound", "not finite",
        "literal", "section type"])
def test_shape_errors_name_the_line_the_key_path_and_the_value(tmp_path: Path, text: str, expected: str) -> None:
    path = write_space(tmp_path, ONE_PARAMETER + text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} {expected}"):
        search_space.load_space(str(path))


@pytest.mark.parametrize("text,expected", [
    (ONE_PARAMETER + "scheduler: {name: asha, epochs: true}\n",
     r"line 4: scheduler.epochs: must be an integer, got True"),
    (ONE_PARAMETER + "resources: {cpus: true}\n", r"line 4: resources.cpus: must be a number, got True"),
    (ONE_PARAMETER + "seeds: false\n", r"line 4: seeds: must be an integer, got False"),
    ("parameters:\n  lam: {low: true, high: 2}\n", r"line 2: parameters.lam.low: must be a number, got True"),
], ids=["epochs", "cpus", "seeds", "low"])
def test_bools_are_not_numbers(tmp_path: Path, text: str, expected: str) -> None:
    path = write_space(tmp_path, text)
    with pytest.raises(UserError, match=expected):
        search_space.load_space(str(path))


def test_null_means_the_default_and_a_list_is_not_a_space(tmp_path: Path) -> None:
    space = search_space.load_space(str(write_space(tmp_path, ONE_PARAMETER + "sampler:\ntrials:\nfixed:\n")))
    assert (space.sampler, space.trials) == ("tpe", 10)
    with pytest.raises(UserError, match=r"space.yaml: must be a mapping of description, preset, fixed, .*, got \[1\]"):
        search_space.load_space(str(write_space(tmp_path, "- 1\n")))
    with pytest.raises(UserError, match=r"space.yaml: missing 'parameters'$"):
        search_space.load_space(str(write_space(tmp_path, "preset: paper\n")))


@pytest.mark.parametrize("option,expected", [
    (["--tracking-uri", "http://127.0.0.1:9"], r"tracking server http://127.0.0.1:9 is unreachable"),
    (["--storage", "postgresql://agch:secret@127.0.0.1:9/optuna"],
     r"Optuna storage postgresql://agch:\*\*\*@127.0.0.1:9/optuna is unreachable"),
    (["--set", "delta=1"], r"parameters.delta: is searched, so it cannot also be fixed or set"),
    (["--trials", "0"], r"--trials: must be >= 1, got 0"),
    (["--name", "bad name"], r"--name: use letters, digits"),
], ids=["tracking", "storage", "set-searched", "trials", "name"])
def test_bad_command_line_fails_before_any_trial(tmp_path: Path, capsys, tiny_dataset: Path, option: list[str],
                                                 expected: str) -> None:
    path = write_space(tmp_path, GOOD)
    assert main(["run", str(path), "--data", str(tiny_dataset), *option]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(expected, err), err
    assert "secret" not in err
    assert not list((Path(os.environ["AGCH_HOME"]) / "searches").glob("*/search.json"))


def test_resume_of_an_unknown_search_names_the_known_ones(capsys) -> None:
    assert main(["resume", "nosuch"]) == 2
    assert "unknown search 'nosuch'" in capsys.readouterr().err


def test_check_prints_what_would_run(capsys) -> None:
    assert main(["check", "spaces/delta_gamma.yaml"]) == 0
    assert "delta, gamma_v, gamma_t by tpe" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_table_redraws_in_place_on_a_terminal_and_logs_lines_elsewhere() -> None:
    from agch.cli.search import LiveTable
    from agch.runs.driver import TrialOutcome

    space = search_space.load_space("spaces/delta_gamma.yaml")
    for stream in (_Terminal(), io.StringIO()):
        table = LiveTable(stream, refresh_s=0)
        references = {"random_map50": 0.5, "random_mapall": 0.4, **{f"cca_itq_{m}_{d}": 0.6 for m in ("map50", "mapall")
                                                                    for d in ("i2t", "t2i", "mean")}}
        table.on_step("starting a local Ray")
        table.on_start("demo", space, "mAP@50 mean(I->T, T->I), 64 bits", references)
        one, two = {"delta": 0.5, "gamma_v": 2.0, "gamma_t": 0.3, "trial_number": 1}, {"delta": 2.0, "trial_number": 2}
        table.on_result("a1", one, {"epoch": 1, "map50_mean": 0.61})
        table.on_result("a2", two, {"epoch": 1, "map50_mean": 0.55})
        table.on_result("a2", two, {"epoch": 2})  # not evaluated: no line
        table.on_complete(TrialOutcome("a2", two, "stopped", "early-stopped", {"map50_mean": 0.55}, "r2", 1))
        table.on_complete(TrialOutcome("a1", one, "finished", None, {"map50_mean": 0.64}, "r1", 4))
        text = stream.getvalue()
        assert text.startswith("starting a local Ray ...\n")
        assert "objective (max): map50_mean = mAP@50 mean(I->T, T->I), 64 bits" in text
        assert "references on the same queries: random ranking mAP@50 0.5000 / mAP@ALL 0.4000; CCA+ITQ" in text
        assert "trial  state" in text and "delta     gamma_v   gamma_t" in text  # the header, γv before γt
        assert "t2     stopped" in text and "(early-stopped)" in text  # trials by their names, not Ray's ids
        assert table.best()[0] == "a1"
        if stream.isatty():
            assert "\x1b[" in text and text.rstrip().endswith("2/8 trials ended; best so far: t1 map50_mean 0.6400")
        else:  # the step, three header lines and a blank, the table's header, one line per event
            assert "\x1b[" not in text and text.count("\n") == 10
            assert text.rstrip().endswith("[2/8 trials ended]")


def make_searcher(space: search_space.SearchSpace, name: str, sampler: object, folder: Path) -> object:
    """A StudySearch over a new (or the existing) study `name` in folder/optuna.db, as agch.experiments.search builds
    one."""
    import optuna

    from agch.experiments import search
    from agch.runs import searcher

    storage = search.open_storage(f"sqlite:///{folder / 'optuna.db'}")
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                load_if_exists=True)
    return searcher.StudySearch(space={p.name: p.distribution() for p in space.parameters}, metrics=["map50_mean"],
                                    mode="max", study=study, storage=storage)


def test_a_restored_search_hands_out_first_the_trials_a_killed_driver_had_asked_for(tmp_path: Path) -> None:
    """The driver saved the searcher after trial t1; it asked Optuna for t2 and died. The restored searcher gives
    t2's Optuna trial (same params, same number) to the first trial it is asked for, then asks new ones."""
    import optuna

    from agch.runs.context import TRIAL_NUMBER

    space = search_space.load_space("spaces/delta_gamma.yaml")

    def searcher() -> object:
        return make_searcher(space, "s", optuna.samplers.RandomSampler(seed=0), tmp_path)

    before = searcher()
    first = before.suggest("t1")
    before.save(str(tmp_path / "searcher.pkl"))
    lost = before.suggest("t2")
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t3") == lost and lost[TRIAL_NUMBER] == 1 != first[TRIAL_NUMBER]
    assert restored.suggest("t4")[TRIAL_NUMBER] == 2
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 3  # no trial was asked twice or failed for being lost


def test_a_collapsed_trial_is_a_measured_result_for_optuna_and_a_failed_one_is_not(tmp_path: Path) -> None:
    """TPE ignores FAIL trials: a collapse reported as FAIL would leave it sampling where codes collapse."""
    import optuna

    from agch.runs.context import FINAL

    space = search_space.load_space("spaces/delta_gamma.yaml")
    searcher = make_searcher(space, "c", optuna.samplers.RandomSampler(seed=0), tmp_path)
    for trial_id in ("collapsed", "failed", "fine"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("collapsed", {"map50_mean": 0.31, "epoch": 2, "collapsed": 1.0, FINAL: 1})
    searcher.on_trial_complete("failed", None, error=True)
    searcher.on_trial_complete("fine", {"map50_mean": 0.62, "epoch": 5, "collapsed": 0.0, FINAL: 1})
    collapsed, failed, fine = optuna.load_study(study_name="c", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert (collapsed.state, collapsed.value, collapsed.user_attrs.get("collapsed")) == (
        optuna.trial.TrialState.COMPLETE, 0.31, True)
    assert failed.state == optuna.trial.TrialState.FAIL
    assert (fine.state, fine.value, "collapsed" in fine.user_attrs) == (optuna.trial.TrialState.COMPLETE, 0.62, False)


def test_a_used_up_grid_ends_its_last_trials_like_the_others(tmp_path: Path) -> None:
    """Optuna's GridSampler calls study.stop() once every grid point is out, which Optuna refuses outside
    Study.optimize: the error reached Tune, which then recorded the search's last trials as failed."""
    import optuna

    from agch.runs.context import FINAL

    space = search_space.load_space(str(write_space(tmp_path, "preset: paper\nsampler: {name: grid}\nparameters:\n"
                                                              "  delta: {choices: [0.1, 1.0]}\n")))
    searcher = make_searcher(space, "g", search_space.make_sampler(space), tmp_path)
    deltas = {searcher.suggest(trial_id)["delta"] for trial_id in ("t1", "t2")}  # two at a time: the grid is out
    searcher.on_trial_complete("t1", {"map50_mean": 0.5, "epoch": 1, FINAL: 1})
    searcher.on_trial_complete("t2", {"map50_mean": 0.6, "epoch": 1, FINAL: 1})
    trials = optuna.load_study(study_name="g", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert deltas == {0.1, 1.0}
    assert [(t.state, t.value) for t in trials] == [(optuna.trial.TrialState.COMPLETE, 0.5),
                                                   (optuna.trial.TrialState.COMPLETE, 0.6)]


def test_stop_on_collapse_is_a_scheduler_switch_on_by_default(tmp_path: Path) -> None:
    assert search_space.load_space("spaces/delta_gamma.yaml").stop_on_collapse is True
    off = search_space.load_space(str(write_space(tmp_path, "preset: paper\nparameters:\n  delta: {low: 0.1, high: 1}\n"
                                                            "scheduler: {name: none, stop_on_collapse: false}\n")))
    assert off.stop_on_collapse is False
    with pytest.raises(UserError, match=r"line 4: scheduler.stop_on_collapse: must be true or false, got 'no'"):
        search_space.load_space(str(write_space(tmp_path, "preset: paper\nparameters:\n  delta: {low: 0.1, high: 1}\n"
                                                          "scheduler: {name: none, stop_on_collapse: 'no'}\n")))
