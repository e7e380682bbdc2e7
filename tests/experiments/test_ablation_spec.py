"""Ablation files, designs → cells, identities and the CLI's bad-input errors (no training, no Ray)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from agch import config as cfg
from agch.experiments.ablation_plan import build_plan, cell_identity, trial_identity
from agch.experiments.ablation_spec import (DEFAULT_BUDGET, SHIPPED_DIR, check_resources, load_spec, parse_spec,
                                resolve_spec_path)
from agch.cli.ablate import build_parser, main, spec_from_args
from agch.errors import UserError

DS = "0123456789abcdef"  # a dataset identity; plans only hash it


def spec(**raw):
    return parse_spec({"name": "t", "design": "one-fix", "fixes": ["alignment"], **raw}, "t.yaml")


def labels(plan, ids):
    return [plan.cells[i].label for i in ids]


def test_shipped_files_validate_and_the_story_covers_every_fix_both_ways() -> None:
    files = sorted(SHIPPED_DIR.glob("*.yaml"))
    assert files, "ablations/ ships no file"
    for path in files:
        plan = build_plan(load_spec(path), DS)
        assert plan.comparisons and len(plan.spec.seeds) >= 5
    story = build_plan(load_spec(SHIPPED_DIR / "debug_log_story.yaml"), DS)
    directions = {(c.factor, c.design) for c in story.comparisons}
    assert directions == {(f, d) for f in cfg.FIX_NAMES for d in ("add-one-in", "leave-one-out")}
    assert len(story.cells) == 12


def test_add_one_in_starts_from_the_paper_with_the_fixes_off() -> None:
    plan = build_plan(spec(design="add-one-in", fixes=["similarity", "balance"]), DS)
    by = {c.factor: c for c in plan.comparisons}
    off = plan.cells[by["balance"].off[0]].config
    assert off.fixes.similarity is False and off.fixes.balance is False  # the paper has similarity on: forced off
    on = plan.cells[by["balance"].on[0]].config
    assert on.fixes.balance and not on.fixes.similarity
    assert by["balance"].off == by["similarity"].off  # one shared starting cell
    assert len(plan.cells) == 3 and off.lam == cfg.preset("paper").lam


def test_leave_one_out_starts_from_the_debug_log() -> None:
    plan = build_plan(spec(design="leave-one-out", fixes=["alignment", "balance"]), DS)
    full = plan.cells[plan.comparisons[0].on[0]].config
    log = cfg.preset("debug-log")
    assert (full.distance, full.batch_size, full.lam) == (log.distance, log.batch_size, log.lam)
    assert all(getattr(full.fixes, f) for f in cfg.FIX_NAMES)
    removed = plan.cells[plan.comparisons[1].off[0]].config
    assert removed.fixes.balance is False and removed.fixes.alignment is True


def test_factorial_pairs_every_context() -> None:
    plan = build_plan(spec(design="factorial", fixes=["quantization", "balance", "alignment"]), DS)
    assert len(plan.cells) == 8 and len(plan.trials()) == 8 * 5
    quant = next(c for c in plan.comparisons if c.factor == "quantization")
    assert len(quant.on) == len(quant.off) == 4
    for on, off in zip(quant.on, quant.off):  # each pair differs in the compared fix only
        a, b = plan.cells[on].config, plan.cells[off].config
        assert dataclasses.replace(a, fixes=dataclasses.replace(a.fixes, quantization=False)) == b


def test_identities_ignore_the_seed_for_cells_and_match_run_tags_for_trials() -> None:
    config = cfg.apply(cfg.preset("paper"), {"bits": 16})
    seeded = dataclasses.replace(config, seed=3)
    assert cell_identity(config, DS) == cell_identity(seeded, DS)
    assert cell_identity(config, DS) != cell_identity(config, "another-dataset")
    assert trial_identity(config, 3, DS) == cfg.identity(seeded, dataset=DS)  # agch.runs.record.run_tags' agch.identity
    assert trial_identity(config, 3, DS) != trial_identity(config, 4, DS)
    # eval_every does not change what is computed: the same cell.
    assert cell_identity(dataclasses.replace(config, eval_every=1), DS) == cell_identity(config, DS)


def test_cells_shared_by_two_designs_are_trained_once() -> None:
    plan = build_plan(spec(design=["one-fix", "add-one-in"], fixes=["alignment"]), DS)
    # paper has alignment off: one-fix and add-one-in produce the same two cells.
    assert len(plan.cells) == 2 and len(plan.comparisons) == 2


@pytest.mark.parametrize("raw, message", [
    ({"fixes": ["alignmnt"]}, "unknown fix 'alignmnt' (did you mean 'alignment'?); known: alignment, balance"),
    ({"design": "leave-two-out"}, "unknown design 'leave-two-out'"),
    ({"design": {"kind": "add-one-in", "preset": "paperr"}}, "unknown preset 'paperr' (did you mean 'paper'?)"),
    ({"preset": "final"}, "one-fix needs a base preset"),
    ({"seeds": 0}, "t.yaml: seeds: must be >= 1 (>= 2 for a verdict), got 0"),
    ({"seeds": [1, 1]}, "t.yaml: seeds: lists a seed twice: [1, 1]"),
    ({"overrides": {"fixes.alignment": "on"}}, "fix 'alignment' is both toggled and held fixed (in t.yaml overrides)"),
    ({"overrides": {"fixes": {"alignment": False}}}, "both toggled"),
    ({"overrides": {"seed": 3}}, "'seed' cannot be an override"),
    ({"overrides": {"dleta": 1.0}}, "unknown config key 'dleta' (did you mean 'delta'?)"),
    ({"bits": 16, "overrides": {"bits": 32}}, "'bits' is given both at the top level and in overrides"),
    ({"resources": {"gpus": 1}}, "unknown resource 'gpus' (did you mean 'gpu'?)"),
    ({"fixes": ["balance", "balance"]}, "a fix is listed twice"),
    ({"sedes": 3}, "unknown ablation key 'sedes' (did you mean 'seeds'?)"),
])
def test_bad_files_fail_with_a_clear_message(raw: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        spec(**raw)
    assert message in str(err.value) and "t.yaml" in str(err.value)


HEAD = "name: t\ndesign: one-fix\nfixes: [alignment]\n"


@pytest.mark.parametrize("text, message", [
    (HEAD + "resources:\n  cpu: 1\n  gpus: 1\n",
     "line 6: resources.gpus: unknown resource 'gpus' (did you mean 'gpu'?); known: cpu, gpu"),
    ("name: t\nfixes: [alignment]\ndesign:\n  - one-fix\n  - {knd: add-one-in}\n",
     "line 5: design[1].knd: unknown design key 'knd' (did you mean 'kind'?); known: kind, preset"),
    ("name: t\ndesign: one-fix\nfixes:\n  - balance\n  - alignmnt\n",
     "line 5: fixes[1]: unknown fix 'alignmnt' (did you mean 'alignment'?)"),
    (HEAD + "seeds: true\n", "line 4: seeds: must be a count (e.g. 5) or a list of integers, got True"),
    (HEAD + "seeds: [1, two]\n", "line 4: seeds: must be a count (e.g. 5) or a list of integers, got [1, 'two']"),
    (HEAD + "resources: {cpu: true}\n", "line 4: resources.cpu: must be a number, got True"),
    (HEAD + "max_concurrent: 1.5\n", "line 4: max_concurrent: must be an integer >= 1, got 1.5"),
    (HEAD + "overrides: [bits]\n", "line 4: overrides: must be a mapping of config keys, got ['bits']"),
    (HEAD + "resources: {cpu: 0}\n", "line 4: resources: a trial must ask for some cpu or gpu"),
], ids=["resource key", "design key", "fix", "bool seeds", "string seed", "bool cpu", "float count", "overrides type",
        "no resources"])
def test_file_errors_name_the_line_the_key_path_and_what_is_allowed(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_spec(path)
    assert str(err.value).startswith(f"{path} {message}"), err.value


def test_a_file_may_say_one_design_or_fix_without_a_list_and_null_means_the_default(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\ndesign: {kind: add-one-in, preset: debug-log}\nfixes: balance\nseeds:\nresources:\n")
    loaded = load_spec(path)
    assert [(d.kind, d.preset) for d in loaded.designs] == [("add-one-in", "debug-log")]
    assert loaded.fixes == ("balance",) and len(loaded.seeds) == 5 and loaded.resources == {"cpu": 1.0}
    assert check_resources({"cpu": 2, "gpu": 0.5}, "--gpus-per-trial") == {"cpu": 2.0, "gpu": 0.5}
    with pytest.raises(UserError, match=r"^--gpus-per-trial: gpu: must be >= 0, got -1.0$"):
        check_resources({"cpu": 1, "gpu": -1.0}, "--gpus-per-trial")


def test_shipped_files_resolve_by_name(tmp_path: Path) -> None:
    assert resolve_spec_path("debug_log_story") == SHIPPED_DIR / "debug_log_story.yaml"
    assert resolve_spec_path("ablations/debug_log_story.yaml").name == "debug_log_story.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"name": "m", "design": "one-fix", "fixes": ["balance"], "dataset": "d.h5"}))
    assert load_spec(resolve_spec_path(str(mine))).dataset == tmp_path / "d.h5"
    with pytest.raises(UserError, match="ablation file not found: nope.yaml .shipped: .*debug_log_story"):
        resolve_spec_path("nope.yaml")


def cli_spec(*argv: str):
    return spec_from_args(build_parser().parse_args(list(argv)))


def test_fix_alone_is_the_default_design_on_the_default_base_and_budget() -> None:
    s = cli_spec("--fix", "text-input")
    assert s.fixes == ("text_input",) and [(d.kind, d.preset) for d in s.designs] == [("one-fix", "paper")]
    assert len(s.seeds) >= 5 and s.overrides == DEFAULT_BUDGET
    s = cli_spec("--fix", "alignment", "--seeds", "3", "--seed", "10", "--epochs", "2", "--set", "delta=1",
                 "--fix", "balance=on", "--design", "leave-one-out")
    assert s.seeds == (10, 11, 12) and s.overrides["epochs"] == 2 and s.overrides["delta"] == "1"
    assert s.overrides["fixes.balance"] == "on" and s.designs[0].preset == "debug-log"
    s = cli_spec("debug_log_story", "--fix", "balance", "--preset", "paper", "--seeds", "2")
    assert s.fixes == ("balance",) and {d.preset for d in s.designs} == {"paper"} and s.seeds == (0, 1)


@pytest.mark.parametrize("argv, message", [
    (["--fix", "alignmnt"], "unknown fix 'alignmnt' (did you mean 'alignment'?); known: alignment, balance"),
    ([], "nothing to ablate"),
    (["--fix", "alignment", "--fix", "alignment=on"], "fix 'alignment' is both toggled and held fixed"),
    (["--fix", "alignment", "--set", "fixes.alignment=off"], "both toggled and held fixed (in --set)"),
    (["--fix", "balance", "--preset", "final"], "unknown preset 'final'"),
    (["--fix", "balance", "--seeds", "0"], "--seeds must be >= 1"),
    (["--fix", "balance", "--set", "seed=3"], "seed cannot be set"),
    (["no_such_ablation"], "ablation file not found"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("agch-ablate: error: ") and message in err and "\n" not in err


def test_tune_groups_are_grids_whose_trials_are_exactly_the_plans() -> None:
    from agch.experiments.grid import group_identities, tune_groups
    from agch.runs.context import RunContext, trial_config

    plan = build_plan(load_spec(SHIPPED_DIR / "debug_log_story.yaml"), DS)
    trials = plan.trials()
    recorded = {t.identity for t in trials[:3]}  # the first cell's seeds 0-2 are recorded: only 3, 4 left there
    groups = tune_groups(plan, [t for t in trials if t.identity not in recorded], prefix="g")
    assert len(groups) == 3  # paper base (seeds 0-4), paper base (seeds 3-4), debug-log base
    covered: list[str] = []
    for group in groups:
        ctx = RunContext(dataset="d.h5", tracking_uri="sqlite:///x.db", experiment="e", parent_run_id="p",
                         device="cpu", base=group["base"], group=group["name"])
        # What the runner will train for each grid point carries the identity the driver expects.
        built = {cfg.identity(trial_config(ctx, {"settings": settings, "seed": seed}), dataset=DS)
                 for settings in group["settings"] for seed in group["seeds"]}
        assert built == group_identities(group, plan.dataset_identities)
        covered += built
    assert sorted(covered) == sorted({t.identity for t in trials} - recorded)


def test_toggles_switch_any_config_key_like_a_fix() -> None:
    plan = build_plan(spec(design="factorial", fixes=["alignment"],
                           toggles={"feature_norm": ["none", "standardize"], "batch_size": [32, 128]}), DS)
    assert len(plan.cells) == 8 and len(plan.comparisons) == 3
    by_name = {c.factor: c for c in plan.comparisons}
    assert by_name["feature_norm"].name == "feature_norm none->standardize (factorial, paper)"
    for on, off in zip(by_name["batch_size"].on, by_name["batch_size"].off):
        a, b = plan.cells[on].config, plan.cells[off].config
        assert (a.batch_size, b.batch_size) == (128, 32)
        assert dataclasses.replace(a, batch_size=32) == b
    assert "paper[+alignment feature_norm=standardize batch_size=128]" in {c.label for c in plan.cells.values()}
    assert {c.config.eval_split for c in plan.cells.values()} == {"validation"}  # settings are chosen off the test


def test_tune_groups_of_toggled_keys_rebuild_the_plans_configs() -> None:
    from agch.experiments.grid import group_identities, tune_groups
    from agch.runs.context import RunContext, trial_config

    plan = build_plan(spec(design="one-fix", fixes=[], toggles={"feature_norm": ["none", "standardize"]}), DS)
    (group,) = tune_groups(plan, plan.trials(), prefix="g")
    ctx = RunContext(dataset="d.h5", tracking_uri="sqlite:///x.db", experiment="e", parent_run_id="p",
                     device="cpu", base=group["base"], group=group["name"])
    built = {cfg.identity(trial_config(ctx, {"settings": settings, "seed": seed}), dataset=DS)
             for settings in group["settings"] for seed in group["seeds"]}
    assert built == group_identities(group, plan.dataset_identities) == {t.identity for t in plan.trials()}


@pytest.mark.parametrize("toggles, message", [
    ({"feature_nrm": ["none", "center"]}, "unknown toggled config key (fixes go under 'fixes') 'feature_nrm'"),
    ({"feature_norm": ["none", "none"]}, "feature_norm needs two different values [off, on]"),
    ({"feature_norm": ["none", "zscore"]}, "feature_norm must be one of none, center, standardize"),
    ({"seed": [0, 1]}, "seed cannot be toggled"),
])
def test_bad_toggles_are_explained(toggles, message) -> None:
    with pytest.raises(UserError) as err:
        spec(toggles=toggles)
    assert message in str(err.value)


def test_cli_toggle_builds_a_one_factor_ablation_without_its_default_budget_clash() -> None:
    from agch.cli.ablate import build_parser, spec_from_args

    built = spec_from_args(build_parser().parse_args(["--toggle", "bits=16,64", "--toggle", "optimizer=sgd,adam"]))
    assert built.name == "toggle-bits-optimizer" and "bits" not in built.overrides
    assert [(f.key, f.off, f.on) for f in built.factors] == [("bits", 16, 64), ("optimizer", "sgd", "adam")]
    with pytest.raises(UserError, match=r"config key 'bits' is both toggled and held fixed \(in --set\)"):
        spec_from_args(build_parser().parse_args(["--toggle", "bits=16,64", "--set", "bits=32"]))


def test_a_config_file_is_the_base_whose_switched_keys_take_the_factors_values(tmp_path) -> None:
    from agch.cli.ablate import build_parser, spec_from_args

    base = tmp_path / "base.yaml"
    base.write_text("bits: 32\nfeature_norm: standardize\nfixes.alignment: true\n")
    built = spec_from_args(build_parser().parse_args(["--config", str(base), "--toggle", "bits=16,64",
                                                      "--fix", "alignment"]))
    plan = build_plan(built, DS)
    by_name = {c.factor: c for c in plan.comparisons}
    bits = [(plan.cells[on].config.bits, plan.cells[off].config.bits)
            for on, off in zip(by_name["bits"].on, by_name["bits"].off)]
    assert bits == [(64, 16)]  # one-fix: each factor on vs off, the others as the base (the file) has them
    alignment = [(plan.cells[on].config, plan.cells[off].config)
                 for on, off in zip(by_name["alignment"].on, by_name["alignment"].off)]
    assert [(a.fixes.alignment, b.fixes.alignment, a.bits) for a, b in alignment] == [(True, False, 32)]
    assert {c.config.feature_norm for c in plan.cells.values()} == {"standardize"}


def test_a_new_trainer_version_is_a_new_identity(monkeypatch) -> None:
    """Runs of an older trainer computed something else: their identity differs, so they are never reused."""
    config = cfg.apply(cfg.preset("paper"), {"bits": 16})
    before = trial_identity(config, 0, DS)
    monkeypatch.setattr(cfg, "TRAINER_VERSION", cfg.TRAINER_VERSION + 1)
    assert trial_identity(config, 0, DS) != before


# ---- datasets as an axis (e.g. AlexNet fc7 vs VGG16 fc7 features of the same pairs)

IDS = {"alexnet": "a" * 16, "vgg16": "b" * 16}


def test_datasets_axis_compares_every_cell_on_both_datasets_paired_cell_by_cell(tmp_path) -> None:
    from agch.experiments.grid import group_identities, tune_groups

    path = tmp_path / "extractor.yaml"
    path.write_text(yaml.safe_dump({"name": "extractor", "design": "one-fix", "datasets": {
        "alexnet": "a.h5", "vgg16": "/data/b.h5"}}))
    loaded = load_spec(path)
    assert loaded.datasets == (("alexnet", tmp_path / "a.h5"), ("vgg16", Path("/data/b.h5")))  # relative to the file
    assert loaded.to_dict()["datasets"] == {"alexnet": str(tmp_path / "a.h5"), "vgg16": "/data/b.h5"}
    plan = build_plan(loaded, IDS)  # nothing else switched: the base on each dataset
    (comparison,) = plan.comparisons
    assert comparison.name == "dataset alexnet->vgg16 (one-fix, paper)" and comparison.factor == "dataset"
    (on,), (off,) = comparison.on, comparison.off
    assert (plan.cells[on].dataset, plan.cells[off].dataset) == ("vgg16", "alexnet")
    assert plan.cells[on].config == plan.cells[off].config and on != off
    assert plan.cells[on].label == "paper[] @vgg16"
    assert {t.identity for t in plan.trials()} == {trial_identity(plan.cells[c].config, s, IDS[plan.cells[c].dataset])
                                                   for c in (on, off) for s in range(5)}

    plan = build_plan(dataclasses.replace(loaded, fixes=("alignment",)), IDS)
    assert len(plan.cells) == 4 and [c.name for c in plan.comparisons] == [
        "alignment (one-fix, paper, on alexnet)", "alignment (one-fix, paper, on vgg16)",
        "dataset alexnet->vgg16 (one-fix, paper)"]
    by_dataset = plan.comparisons[2]
    assert len(by_dataset.on) == 2 and [plan.cells[i].config for i in by_dataset.on] == [
        plan.cells[i].config for i in by_dataset.off]
    groups = tune_groups(plan, plan.trials(), prefix="g")
    assert sorted(g["dataset"] for g in groups) == ["alexnet", "vgg16"]  # one dataset per trial context
    assert set().union(*(group_identities(g, plan.dataset_identities) for g in groups)) == {
        t.identity for t in plan.trials()}


@pytest.mark.parametrize("raw, message", [
    ({"datasets": {"a": "a.h5"}}, r"datasets: expected two named dataset files, off first"),
    ({"datasets": {"a": "a.h5", "b": "a.h5"}}, r"both names point at .*a.h5; a comparison needs two different files"),
    ({"datasets": {"a": "a.h5", "b": "b.h5"}, "dataset": "c.h5"}, r"give 'dataset' \(one\) or 'datasets' \(two"),
])
def test_bad_datasets_axis(raw, message) -> None:
    with pytest.raises(UserError, match=message):
        spec(**raw)
