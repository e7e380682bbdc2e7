"""agch.experiments.statistics: the paired statistics match scipy and textbook values; verdicts follow the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from agch.experiments.ablation_report import effect_plot
from agch.experiments.formatting import csv_text, markdown_table, text_table
from agch.experiments.statistics import min_wilcoxon_p, paired_compare, summarize, verdict_of

# Student's "sleep" data (Cushny & Peebles), the classic paired example: extra sleep of 10 patients, two drugs.
SLEEP_DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_t_matches_scipy_and_the_textbook() -> None:
    r = paired_compare(SLEEP_DRUG2, SLEEP_DRUG1)
    ref = sps.ttest_rel(SLEEP_DRUG2, SLEEP_DRUG1)
    ci = ref.confidence_interval(0.95)
    assert r.n == 10
    assert r.diff_mean == pytest.approx(1.58)
    assert r.p_t == pytest.approx(ref.pvalue, rel=1e-10)
    assert (r.ci_low, r.ci_high) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))
    # Published values for this data set: t = 4.062, df = 9, p = 0.002833, CI [0.700, 2.460].
    assert r.p_t == pytest.approx(0.002833, abs=1e-6)
    assert (round(r.ci_low, 3), round(r.ci_high, 3)) == (0.700, 2.460)
    assert r.verdict == "helps"


def test_wilcoxon_matches_scipy_and_the_exact_distribution() -> None:
    on, off = [0.71, 0.74, 0.70, 0.73, 0.69, 0.75, 0.72], [0.70, 0.71, 0.71, 0.69, 0.64, 0.69, 0.65]
    r = paired_compare(on, off)
    assert r.p_wilcoxon == pytest.approx(sps.wilcoxon(np.subtract(on, off)).pvalue, rel=1e-10)
    # Five seeds all in the same direction: the exact two-sided p is 2 / 2^5, the smallest possible.
    five = paired_compare([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5)
    assert five.p_wilcoxon == pytest.approx(0.0625)
    assert min_wilcoxon_p(5) == pytest.approx(0.0625)


def test_arm_summaries_are_mean_and_sample_std() -> None:
    on, off = [0.61, 0.64, 0.66, 0.60], [0.55, 0.58, 0.52, 0.57]
    r = paired_compare(on, off)
    assert r.on.mean == pytest.approx(np.mean(on)) and r.on.std == pytest.approx(np.std(on, ddof=1))
    assert r.off.mean == pytest.approx(np.mean(off)) and r.off.std == pytest.approx(np.std(off, ddof=1))


def test_hurts_and_no_effect() -> None:
    assert paired_compare([0.5, 0.52, 0.49, 0.51], [0.7, 0.71, 0.69, 0.72]).verdict == "hurts"
    noisy = paired_compare([0.70, 0.64, 0.71, 0.66], [0.66, 0.70, 0.65, 0.70])
    assert noisy.ci_low < 0 < noisy.ci_high
    assert noisy.verdict == "no detectable effect at 4 seeds"


def test_identical_arms_have_no_detectable_effect() -> None:
    values = [0.61, 0.64, 0.66, 0.60, 0.62]
    r = paired_compare(values, list(values))
    assert r.diff_mean == 0.0 and math.isnan(r.ci_low) and math.isnan(r.p_t) and r.p_wilcoxon == 1.0
    assert r.verdict == "no effect: identical at all 5 seeds"


def test_the_same_shift_at_every_seed_is_not_significant_at_two_seeds() -> None:
    """Every seed moved by the same amount: the t interval has zero width, so the exact signed-rank test decides,
    and its p cannot go below 2 / 2^n (0.5 at 2 seeds, 0.0625 at 5, 0.031 at 6)."""
    two = paired_compare([0.60, 0.60], [0.50, 0.50])
    assert two.p_wilcoxon == pytest.approx(0.5) and math.isnan(two.p_t) and math.isnan(two.ci_low)
    assert two.verdict == "undecided: the same +0.1000 at every seed; with 2 seeds the exact signed-rank p cannot go " \
                          "below 0.500"
    # rounding makes the 'same' difference differ in the last bits; it is still one shift
    five = paired_compare([0.6, 0.7, 0.8, 0.9, 1.0], [0.5, 0.6, 0.7, 0.8, 0.9])
    assert five.verdict.startswith("undecided") and five.p_wilcoxon == pytest.approx(0.0625)
    six = paired_compare([0.5] * 6, [0.6] * 6)
    assert six.verdict == "hurts (the same -0.1000 at every seed)" and six.p_wilcoxon == pytest.approx(2 / 64)


def test_one_seed_runs_but_gives_no_verdict() -> None:
    r = paired_compare([0.7], [0.6])
    assert r.n == 1 and r.diff_mean == pytest.approx(0.1)
    assert math.isnan(r.ci_low) and math.isnan(r.p_t)
    assert r.verdict.startswith("no verdict possible")


def test_failed_runs_drop_their_pair() -> None:
    r = paired_compare([0.7, None, 0.72, float("nan")], [0.6, 0.61, 0.6, 0.62])
    assert r.n == 2 and r.diff_mean == pytest.approx(0.11)
    assert summarize([None, float("nan")]).n == 0
    with pytest.raises(ValueError):
        paired_compare([0.1, 0.2], [0.1])


def test_verdict_direction_flips_for_lower_is_better() -> None:
    assert verdict_of(5, 0.1, 0.3, higher_is_better=False) == "hurts"
    assert verdict_of(5, -0.3, -0.1, higher_is_better=False) == "helps"


def test_tables_and_plot_render() -> None:
    head, rows = ["a", "b|c"], [[1, "x"], [22, "y|z"]]
    text = text_table(head, rows).splitlines()
    assert len(text) == 4 and text[0].startswith("a ") and set(text[1]) <= {"-", " "}
    assert markdown_table(head, rows).splitlines()[3] == "| 22 | y\\|z |"
    assert csv_text(head, rows).splitlines() == ["a,b|c", "1,x", "22,y|z"]
    png = effect_plot({"mAP@50 I->T": [("alignment", paired_compare([0.7, 0.72], [0.6, 0.65])),
                                       ("balance", paired_compare([0.7], [0.6]))]}, "protocol")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
