"""The gradient noise scale B_simple = tr(Σ)/|G|² from squared gradient norms (McCandlish et al. 2018).

Pure functions on numbers, no torch: the engine (:mod:`bsprof.engine.noise_scale`) takes the gradient norms,
this module turns them into estimates, exactly as timing and statistics are split.

Definitions (McCandlish, Kaplan, Amodei et al. 2018, *An Empirical Model of Large-Batch Training*, §2 and
appendix A.1). Over a training set of N examples with per-example gradients g_i:

- G = (1/N) Σ_i g_i, the true (full-batch) gradient;
- Σ = (1/N) Σ_i (g_i − G)(g_i − G)ᵀ, the per-example gradient covariance (the *population* covariance of the
  finite set, denominator N), so tr(Σ) = mean_i |g_i|² − |G|²;
- B_simple = tr(Σ)/|G|² (examples).

The mean gradient G_b of a batch of b examples satisfies E|G_b|² = |G|² + c_b·tr(Σ), where

- c_b = 1/b when the batch is drawn *with* replacement (or from an infinite stream), and
- c_b = (N − b) / (b (N − 1)) when it is drawn *without* replacement from the N examples (finite-population
  correction of the variance of a sample mean).

Two measurements at batch sizes b < B give two equations in the two unknowns, hence the unbiased estimators

    |G|²   ≈ (c_b |G_B|² − c_B |G_b|²) / (c_b − c_B)
    tr(Σ) ≈ (|G_b|² − |G_B|²) / (c_b − c_B)

which with replacement (c = 1/size) are the paper's (B|G_B|² − b|G_b|²)/(B − b) and
(|G_b|² − |G_B|²)/(1/b − 1/B). When the big batch is split into B/b small batches, |G_b|² is the mean of their
squared norms; in data-parallel training the per-rank gradients are the small batches and the all-reduced
(averaged) gradient is the big one. Per-example gradients are the case b = 1 (c_1 = 1 either way).

Each measurement's two estimates are noisy, |G|² is often negative near the optimum, and their ratio is
biased; as the paper does, the estimates are averaged *separately* (an exponential moving average over steps,
or a plain mean over a window) and only then divided — never an average of ratios. The uncertainty of a
window's B_simple is a percentile bootstrap over its measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GradientNormSample",
    "NoiseComponents",
    "NoiseScaleEMA",
    "NoiseScaleEstimate",
    "StepsPrediction",
    "b_simple",
    "ema_noise_scale",
    "estimate_noise_scale",
    "fastest_batch_size",
    "noise_components",
    "variance_factor",
]


def variance_factor(batch_size: int, population_size: int | None = None) -> float:
    """c_b in E|G_b|² = |G|² + c_b·tr(Σ): the variance of a mean over ``batch_size`` examples, per unit tr(Σ).

    Args:
        batch_size: Examples averaged (b >= 1).
        population_size: N when the examples are drawn without replacement from N; ``None`` for sampling
            with replacement (or an unbounded stream).

    Returns:
        1/b with replacement, (N − b)/(b (N − 1)) without.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if population_size is None:
        return 1.0 / batch_size
    if population_size < 2 or batch_size > population_size:
        raise ValueError(f"need 2 <= population_size >= batch_size, got N={population_size}, b={batch_size}")
    return (population_size - batch_size) / (batch_size * (population_size - 1))


@dataclass(frozen=True)
class GradientNormSample:
    """Squared gradient norms at a small and a big batch size, measured at one training state.

    Attributes:
        small_batch_size: b, examples per small batch (micro-batch, rank or single example).
        big_batch_size: B > b, examples in the big batch (the mean of the small batches' gradients).
        small_sq_norm: |G_b|², the mean over the small batches of their squared gradient norms.
        big_sq_norm: |G_B|², the squared norm of the big batch's gradient.
        population_size: N when the batches were drawn without replacement from N examples, ``None`` when with
            replacement.
        step: Training step at which it was measured (optimizer steps done), if known.
    """

    small_batch_size: int
    big_batch_size: int
    small_sq_norm: float
    big_sq_norm: float
    population_size: int | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.small_batch_size < self.big_batch_size:
            raise ValueError(f"need 1 <= b < B, got b={self.small_batch_size}, B={self.big_batch_size}")


@dataclass(frozen=True)
class NoiseComponents:
    """Unbiased estimates from one sample (or averages of several).

    Attributes:
        grad_sq: Estimate of |G|² (may be negative when the gradient is buried in noise).
        trace_cov: Estimate of tr(Σ).
    """

    grad_sq: float
    trace_cov: float


def noise_components(sample: GradientNormSample) -> NoiseComponents:
    """The unbiased |G|² and tr(Σ) estimates of one two-batch-size sample (see the module docstring)."""
    c_small = variance_factor(sample.small_batch_size, sample.population_size)
    c_big = variance_factor(sample.big_batch_size, sample.population_size)
    dc = c_small - c_big
    grad_sq = (c_small * sample.big_sq_norm - c_big * sample.small_sq_norm) / dc
    trace_cov = (sample.small_sq_norm - sample.big_sq_norm) / dc
    return NoiseComponents(grad_sq, trace_cov)


def b_simple(grad_sq: float, trace_cov: float) -> float | None:
    """B_simple = tr(Σ)/|G|² (examples), or ``None`` when |G|² <= 0 (the signal is not resolved)."""
    if not (math.isfinite(grad_sq) and math.isfinite(trace_cov)) or grad_sq <= 0:
        return None
    return trace_cov / grad_sq


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """B_simple over a window of samples: ratio of the mean estimates, with a bootstrap interval.

    Attributes:
        b_simple: tr(Σ)/|G|² (examples), ``None`` when the mean |G|² estimate is not positive.
        grad_sq: Mean |G|² estimate.
        trace_cov: Mean tr(Σ) estimate.
        ci_low: Lower end of the interval (examples), ``None`` with fewer than two samples.
        ci_high: Upper end (examples); ``math.inf`` when |G|² is not resolved in that share of resamples.
        n_samples: Samples in the window.
        confidence: Coverage of the interval (e.g. 0.9).
    """

    b_simple: float | None
    grad_sq: float
    trace_cov: float
    ci_low: float | None
    ci_high: float | None
    n_samples: int
    confidence: float

    @property
    def rel_halfwidth(self) -> float | None:
        """Half the interval's width relative to B_simple (``inf`` when unbounded), ``None`` if unknown."""
        if self.b_simple is None or self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / (2 * self.b_simple)


def _ratio_or_inf(trace: np.ndarray, grad: np.ndarray) -> np.ndarray:
    out = np.full(trace.shape, np.inf)
    ok = grad > 0
    out[ok] = trace[ok] / grad[ok]
    return out


def estimate_noise_scale(
    samples: Sequence[GradientNormSample], *, n_boot: int = 1000, confidence: float = 0.9, seed: int = 0
) -> NoiseScaleEstimate:
    """B_simple over ``samples``: mean |G|² and mean tr(Σ) estimates, then their ratio.

    The interval is a percentile bootstrap over samples (resampled with replacement, ratio of the resampled
    means); resamples whose mean |G|² is not positive count as an unbounded B_simple.

    Args:
        samples: Two-batch-size samples (at least one).
        n_boot: Bootstrap resamples.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the bootstrap.

    Returns:
        The window's :class:`NoiseScaleEstimate`.
    """
    if not samples:
        raise ValueError("no gradient-norm samples")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    comps = [noise_components(s) for s in samples]
    grad = np.array([c.grad_sq for c in comps], dtype=float)
    trace = np.array([c.trace_cov for c in comps], dtype=float)
    g_mean, t_mean = float(grad.mean()), float(trace.mean())
    lo = hi = None
    if len(samples) >= 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(samples), size=(n_boot, len(samples)))
        ratios = _ratio_or_inf(trace[idx].mean(axis=1), grad[idx].mean(axis=1))
        alpha = (1 - confidence) / 2
        # Order statistics, not interpolation: an unbounded resample must not turn into NaN (inf - inf).
        lo = float(np.quantile(ratios, alpha, method="lower"))
        hi = float(np.quantile(ratios, 1 - alpha, method="higher"))
    return NoiseScaleEstimate(b_simple(g_mean, t_mean), g_mean, t_mean, lo, hi, len(samples), confidence)


class NoiseScaleEMA:
    """Exponential moving averages of the |G|² and tr(Σ) estimates, and their ratio (the paper's smoothing).

    The averages are bias-corrected for their zero start (as in Adam), so the first value is the first sample's.

    Args:
        decay: Weight of the past per update, in [0, 1) (0.95 averages over about 20 samples).
    """

    def __init__(self, decay: float = 0.95) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._grad = 0.0
        self._trace = 0.0
        self._weight = 0.0
        self.updates = 0

    def update(self, sample: GradientNormSample) -> float | None:
        """Fold in one sample; returns the current B_simple (``None`` while |G|² is not positive)."""
        comps = noise_components(sample)
        self._grad = self.decay * self._grad + (1 - self.decay) * comps.grad_sq
        self._trace = self.decay * self._trace + (1 - self.decay) * comps.trace_cov
        self._weight = self.decay * self._weight + (1 - self.decay)
        self.updates += 1
        return self.value

    @property
    def components(self) -> NoiseComponents | None:
        """The bias-corrected averages, ``None`` before the first update."""
        if self.updates == 0:
            return None
        return NoiseComponents(self._grad / self._weight, self._trace / self._weight)

    @property
    def value(self) -> float | None:
        """The current smoothed B_simple (examples), ``None`` before any update or while |G|² <= 0."""
        comps = self.components
        return None if comps is None else b_simple(comps.grad_sq, comps.trace_cov)


def ema_noise_scale(samples: Sequence[GradientNormSample], *, decay: float = 0.95) -> list[float | None]:
    """The smoothed B_simple after each of ``samples`` in order (see :class:`NoiseScaleEMA`)."""
    ema = NoiseScaleEMA(decay)
    return [ema.update(s) for s in samples]


@dataclass(frozen=True)
class StepsPrediction:
    """The steps-to-target model S(B) = S_min (1 + B_noise / B) with B_noise taken from a noise-scale estimate.

    McCandlish et al. (2018) §2.2: B_simple approximates B_noise when the Hessian is well conditioned (a multiple
    of the identity); the critical batch size B_crit = E_min/S_min equals B_noise in this model.

    Attributes:
        b_noise: B_noise (examples), from B_simple.
        b_noise_low: Lower end of its interval (examples), ``None`` if unknown.
        b_noise_high: Upper end (examples; may be ``math.inf``), ``None`` if unknown.
        s_min: S_min (steps), ``None`` when no trial calibrated it: :meth:`steps` is then relative to S_min.
    """

    b_noise: float
    b_noise_low: float | None = None
    b_noise_high: float | None = None
    s_min: float | None = None

    @property
    def b_crit(self) -> float:
        """Predicted critical batch size (examples): B_noise."""
        return self.b_noise

    def steps(self, batch_size: float, b_noise: float | None = None) -> float:
        """S(B) in steps, or in units of S_min when :attr:`s_min` is ``None`` (``b_noise`` overrides)."""
        bn = self.b_noise if b_noise is None else b_noise
        return (1.0 if self.s_min is None else self.s_min) * (1 + bn / batch_size)

    @classmethod
    def calibrated(
        cls, estimate: NoiseScaleEstimate, *, steps: float | None = None, batch_size: int | None = None
    ) -> StepsPrediction | None:
        """The prediction from a noise-scale estimate, S_min calibrated by one trial's ``steps`` at ``batch_size``.

        S_min = steps / (1 + B_noise / batch_size). Returns ``None`` when the estimate has no B_simple.
        """
        if estimate.b_simple is None:
            return None
        s_min = None
        if steps is not None and batch_size is not None and math.isfinite(steps) and steps > 0:
            s_min = steps / (1 + estimate.b_simple / batch_size)
        return cls(estimate.b_simple, estimate.ci_low, estimate.ci_high, s_min)


def fastest_batch_size(batch_sizes: Sequence[int], step_time_s: Sequence[float], b_noise: float) -> int:
    """The batch size with the least predicted time to target, S(B)·step_time(B); S_min cancels out.

    Args:
        batch_sizes: Candidate batch sizes (examples).
        step_time_s: Measured seconds per training step at each batch size (NaN: not measured, skipped).
        b_noise: B_noise (examples); ``math.inf`` makes the smallest per-example time win.

    Returns:
        The fastest batch size.
    """
    if len(batch_sizes) != len(step_time_s) or not batch_sizes:
        raise ValueError("need one step time per batch size, and at least one")
    best: tuple[float, int] | None = None
    for b, t in zip(batch_sizes, step_time_s):
        if not (math.isfinite(t) and t > 0):
            continue
        rel = (t / b) if math.isinf(b_noise) else (1 + b_noise / b) * t
        if best is None or rel < best[0]:
            best = (rel, b)
    if best is None:
        raise ValueError("no batch size has a measured step time")
    return best[1]
