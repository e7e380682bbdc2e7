"""Paired statistics for the ablation: one fix on vs off, matched by seed, with a plain verdict.

The seed is the pairing unit: both arms of a comparison are trained with the same seeds, so the per-seed
difference removes the seed's own effect (weight init, batch order) and the test sees only the fix's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
"""Level of the paired-difference confidence interval; the verdict uses the same level (α = 1 − CONFIDENCE)."""


@dataclass(frozen=True)
class ArmSummary:
    """Mean and sample standard deviation (ddof = 1; NaN for one value) of one arm over its seeds."""

    n: int
    mean: float
    std: float

    def text(self, digits: int = 4) -> str:
        """'0.7123 ± 0.0041' (the ± part is left out when there is one value)."""
        if self.n == 0:
            return "n/a"
        if math.isnan(self.std):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class PairedResult:
    """The comparison of one metric between the 'on' and 'off' arms over the seeds both arms have."""

    n: int
    on: ArmSummary
    off: ArmSummary
    diff_mean: float
    """mean over seeds of (on − off)."""
    ci_low: float
    ci_high: float
    """t-based CONFIDENCE interval of the mean paired difference (NaN with fewer than 2 seeds)."""
    p_t: float
    """two-sided paired t-test p-value."""
    p_wilcoxon: float
    """two-sided Wilcoxon signed-rank p-value (exact for small n; zero differences dropped)."""
    verdict: str


def summarize(values: Sequence[float]) -> ArmSummary:
    """Mean ± sample std of finite values (NaNs, e.g. from failed runs, are left out)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return ArmSummary(0, math.nan, math.nan)
    return ArmSummary(len(x), float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan)


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p the exact signed-rank test can give with n non-zero differences: 2 / 2^n."""
    return min(1.0, 2.0 / 2.0 ** n) if n > 0 else 1.0


SAME_SHIFT_TOLERANCE = 1e-9
"""Paired differences that all lie within this of each other are one shift repeated at every seed."""


def verdict_of(n: int, ci_low: float, ci_high: float, higher_is_better: bool = True) -> str:
    """'helps' / 'hurts' when the t interval excludes 0, else 'no detectable effect at n seeds'."""
    if n < 2:
        return f"no verdict possible ({n} seed{'s' if n != 1 else ''}; need >= 2)"
    if ci_low > 0 or ci_high < 0:
        better = (ci_low > 0) == higher_is_better
        return "helps" if better else "hurts"
    return f"no detectable effect at {n} seeds"


def paired_compare(on: Sequence[float], off: Sequence[float], *, higher_is_better: bool = True,
                   confidence: float = CONFIDENCE) -> PairedResult:
    """Compare two arms measured on the same seeds (on[i] and off[i] share seed i).

    Pairs where either value is missing or not finite (a failed run) are dropped before testing. The interval and
    the t p-value are scipy's `ttest_rel`; the signed-rank p is scipy's exact `wilcoxon` (zero differences dropped).

    The degenerate case: when every seed moved by the same amount (collapsed codes make identical differences
    likely), the t interval has zero width and says nothing about the seed-to-seed spread, so it is not used (NaN).
    The verdict then rests on the exact signed-rank test, whose p cannot go below 2 / 2^n: a shift repeated at
    n >= 6 seeds is a verdict; at fewer seeds it is reported as 'undecided', never as 'helps' with p = 0.

    Args:
        on: the metric with the fix on, one value per seed.
        off: the metric with the fix off, same seed order.
        higher_is_better: True for mAP (a positive difference 'helps').
        confidence: level of the interval of the mean difference.

    Returns:
        PairedResult with the per-arm summaries, the mean difference, its t-based interval, the paired t and
        Wilcoxon p-values and the verdict.

    Example:
        >>> r = paired_compare([0.71, 0.72, 0.70, 0.73, 0.72], [0.65, 0.66, 0.66, 0.67, 0.65])
        >>> r.verdict, round(r.diff_mean, 3)
        ('helps', 0.058)
    """
    if len(on) != len(off):
        raise ValueError(f"paired arms need the same number of seeds, got {len(on)} and {len(off)}")
    pairs = [(a, b) for a, b in zip(on, off) if _finite(a) and _finite(b)]
    a = np.asarray([p[0] for p in pairs], dtype=float)
    b = np.asarray([p[1] for p in pairs], dtype=float)
    n = len(pairs)
    d = a - b
    diff_mean = float(d.mean()) if n else math.nan
    ci_low = ci_high = p_t = p_w = math.nan
    verdict = verdict_of(n, ci_low, ci_high, higher_is_better)
    if n >= 2 and float(np.ptp(d)) <= SAME_SHIFT_TOLERANCE:
        p_w = 1.0 if diff_mean == 0.0 else min_wilcoxon_p(n)  # every difference has the same sign and rank
        verdict = _same_shift_verdict(n, diff_mean, p_w, 1 - confidence, higher_is_better)
    elif n >= 2:
        # scipy.stats takes a second to import; the table helpers of this module are used without it
        from scipy import stats as sps

        test = sps.ttest_rel(a, b)
        ci = test.confidence_interval(confidence)
        ci_low, ci_high, p_t = float(ci.low), float(ci.high), float(test.pvalue)
        p_w = _wilcoxon(d)
        verdict = verdict_of(n, ci_low, ci_high, higher_is_better)
    return PairedResult(n=n, on=summarize(a), off=summarize(b), diff_mean=diff_mean, ci_low=ci_low,
                        ci_high=ci_high, p_t=p_t, p_wilcoxon=p_w, verdict=verdict)


def _same_shift_verdict(n: int, shift: float, p: float, alpha: float, higher_is_better: bool) -> str:
    """The verdict of a difference repeated at every seed, decided by the exact signed-rank test."""
    if shift == 0.0:
        return f"no effect: identical at all {n} seeds"
    if p < alpha:
        return ("helps" if (shift > 0) == higher_is_better else "hurts") + f" (the same {shift:+.4f} at every seed)"
    return (f"undecided: the same {shift:+.4f} at every seed; with {n} seeds the exact signed-rank p cannot go below "
            f"{min_wilcoxon_p(n):.3f}")


def _wilcoxon(d: np.ndarray) -> float:
    """Two-sided exact signed-rank p (zero differences dropped); 1.0 when every difference is zero."""
    nonzero = d[d != 0]
    if len(nonzero) == 0:
        return 1.0
    from scipy import stats as sps

    return float(sps.wilcoxon(nonzero, alternative="two-sided", method="exact").pvalue)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# ---------------------------------------------------------------- results as text


def signed(value: float, digits: int = 4) -> str:
    """'+0.0123', '-0.0040', 'n/a' for NaN."""
    return "n/a" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def interval(result: PairedResult, digits: int = 4) -> str:
    """'+0.0120 [+0.0050, +0.0190]' (no bracket part when there is no interval)."""
    if math.isnan(result.ci_low):
        return signed(result.diff_mean, digits)
    return f"{signed(result.diff_mean, digits)} [{signed(result.ci_low, digits)}, {signed(result.ci_high, digits)}]"


def p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")
