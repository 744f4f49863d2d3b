"""The noise-scale estimators as pure math: exact recovery, sampling corrections, smoothing, intervals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bsprof.noise_scale import (
    GradientNormSample,
    NoiseScaleEMA,
    StepsPrediction,
    b_simple,
    ema_noise_scale,
    estimate_noise_scale,
    fastest_batch_size,
    noise_components,
    variance_factor,
)


def expected_sample(g2: float, tr: float, b: int, big: int, n: int | None = None) -> GradientNormSample:
    """The sample whose norms equal their expectations |G|² + c·tr(Σ)."""
    return GradientNormSample(
        b, big, g2 + variance_factor(b, n) * tr, g2 + variance_factor(big, n) * tr, population_size=n
    )


@pytest.mark.parametrize("n", [None, 100, 17])
@pytest.mark.parametrize(("b", "big"), [(1, 8), (4, 16), (8, 12)])
def test_components_recover_expectations_exactly(n, b, big):
    comps = noise_components(expected_sample(0.3, 12.0, b, big, n))
    assert comps.grad_sq == pytest.approx(0.3, rel=1e-12)
    assert comps.trace_cov == pytest.approx(12.0, rel=1e-12)


def test_with_replacement_matches_the_papers_formulas():
    s = GradientNormSample(8, 64, small_sq_norm=5.0, big_sq_norm=2.0)
    comps = noise_components(s)
    assert comps.grad_sq == pytest.approx((64 * 2.0 - 8 * 5.0) / (64 - 8))
    assert comps.trace_cov == pytest.approx((5.0 - 2.0) / (1 / 8 - 1 / 64))


@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_finite_population_factor_is_the_exact_variance_of_a_mean_without_replacement(b):
    # Every subset of size b of a 7-example population of 2-d "gradients": E|G_b|² = |G|² + c_b tr(Σ).
    g = np.random.default_rng(0).normal(size=(7, 2)) + np.array([1.0, -0.5])
    mean = g.mean(axis=0)
    trace = float(((g - mean) ** 2).sum(axis=1).mean())  # population covariance (denominator N)
    subsets = list(itertools.combinations(range(7), b))
    e_sq = np.mean([float((g[list(s)].mean(axis=0) ** 2).sum()) for s in subsets])
    assert e_sq == pytest.approx(float(mean @ mean) + variance_factor(b, 7) * trace, rel=1e-12)
    assert variance_factor(7, 7) == 0.0  # the whole population has no sampling noise


def test_bad_arguments():
    with pytest.raises(ValueError):
        GradientNormSample(8, 8, 1.0, 1.0)
    with pytest.raises(ValueError):
        variance_factor(0)
    with pytest.raises(ValueError):
        variance_factor(10, 5)
    with pytest.raises(ValueError):
        estimate_noise_scale([])
    with pytest.raises(ValueError):
        NoiseScaleEMA(1.0)


def test_b_simple_is_none_when_the_gradient_is_not_resolved():
    assert b_simple(2.0, 10.0) == 5.0
    assert b_simple(0.0, 10.0) is None
    assert b_simple(-1.0, 10.0) is None
    assert b_simple(math.nan, 1.0) is None


def test_window_estimate_is_the_ratio_of_means_not_the_mean_of_ratios():
    a = expected_sample(1.0, 10.0, 2, 16)  # B_simple 10
    c = expected_sample(3.0, 90.0, 2, 16)  # B_simple 30
    est = estimate_noise_scale([a, c], n_boot=200)
    assert est.grad_sq == pytest.approx(2.0) and est.trace_cov == pytest.approx(50.0)
    assert est.b_simple == pytest.approx(25.0)  # 50/2, not (10 + 30)/2 = 20
    assert est.n_samples == 2 and est.confidence == 0.9
    assert 10.0 <= est.ci_low <= est.ci_high <= 30.0


def test_bootstrap_interval_shrinks_with_more_samples_and_covers_the_truth():
    rng = np.random.default_rng(1)

    def noisy(k: int) -> list[GradientNormSample]:
        out = []
        for _ in range(k):
            s = expected_sample(1.0, 40.0, 4, 32)
            out.append(GradientNormSample(4, 32, s.small_sq_norm * rng.gamma(20, 1 / 20), s.big_sq_norm))
        return out

    few, many = estimate_noise_scale(noisy(20), seed=3), estimate_noise_scale(noisy(500), seed=3)
    assert many.ci_low <= 40.0 <= many.ci_high
    assert many.rel_halfwidth < few.rel_halfwidth
    single = estimate_noise_scale(noisy(1))
    assert single.ci_low is None and single.rel_halfwidth is None


def test_unresolved_gradient_gives_no_estimate_and_an_unbounded_interval():
    # |G|² estimates straddling zero: the mean is negative, so B_simple is unknown, not a negative number.
    s1 = GradientNormSample(1, 4, small_sq_norm=4.0, big_sq_norm=0.9)  # |G|² estimate (3.6 - 4)/3 < 0
    s2 = GradientNormSample(1, 4, small_sq_norm=4.0, big_sq_norm=1.05)  # (4.2 - 4)/3 > 0
    est = estimate_noise_scale([s1, s1, s2])
    assert est.b_simple is None and est.grad_sq < 0
    assert est.ci_high == math.inf and est.rel_halfwidth is None


def test_ema_is_bias_corrected_and_smooths_components_separately():
    a = expected_sample(1.0, 10.0, 2, 16)
    c = expected_sample(3.0, 90.0, 2, 16)
    values = ema_noise_scale([a, c], decay=0.5)
    assert values[0] == pytest.approx(10.0)  # the first value is the first sample's, not shrunk towards 0
    # After two updates with decay 0.5 the weights are 1/3 and 2/3 on a and c, applied to |G|² and tr(Σ):
    g = (1.0 + 2 * 3.0) / 3
    t = (10.0 + 2 * 90.0) / 3
    assert values[1] == pytest.approx(t / g)  # 27.14, not the weighted mean of ratios (23.3)
    ema = NoiseScaleEMA()
    assert ema.value is None and ema.components is None
    for _ in range(50):
        ema.update(a)
    assert ema.value == pytest.approx(10.0) and ema.updates == 50


def test_steps_prediction_calibrates_s_min_from_one_trial():
    est = estimate_noise_scale([expected_sample(1.0, 100.0, 4, 64)] * 3)  # B_simple 100, zero-width interval
    pred = StepsPrediction.calibrated(est, steps=1100.0, batch_size=10)
    assert pred.b_crit == pytest.approx(100.0) and pred.s_min == pytest.approx(100.0)  # 1100 / (1 + 100/10)
    assert pred.steps(100) == pytest.approx(200.0) and pred.steps(1000) == pytest.approx(110.0)
    assert pred.steps(100, b_noise=300.0) == pytest.approx(400.0)
    relative = StepsPrediction.calibrated(est)
    assert relative.s_min is None and relative.steps(100) == pytest.approx(2.0)  # in units of S_min
    unresolved = estimate_noise_scale([GradientNormSample(1, 4, small_sq_norm=4.0, big_sq_norm=0.9)])
    assert StepsPrediction.calibrated(unresolved) is None


def test_fastest_batch_size_trades_steps_against_step_time():
    sizes = [8, 16, 32, 64, 128]
    times = [1.0, 1.0, 1.0, 2.0, 4.0]  # flat until 32, then linear: the device saturates at 32
    # Relative time (1 + B_noise/B)·t: with B_noise = 64, 8 -> 9, 16 -> 5, 32 -> 3, 64 -> 4, 128 -> 6.
    assert fastest_batch_size(sizes, times, 64.0) == 32
    assert fastest_batch_size(sizes, times, 1e6) == 32  # huge noise scale: the best samples/s wins
    assert fastest_batch_size(sizes, [1.0, 1.0, 1.0, 1.0, 1.0], 1e6) == 128
    assert fastest_batch_size(sizes, [math.nan, math.nan, 5.0, math.nan, 6.0], 0.0) == 32
    with pytest.raises(ValueError):
        fastest_batch_size(sizes, [math.nan] * 5, 1.0)
    with pytest.raises(ValueError):
        fastest_batch_size(sizes, [1.0], 1.0)
