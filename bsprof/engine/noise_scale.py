"""Taking the gradient norms that the noise-scale estimator (:mod:`bsprof.noise_scale`) needs.

:class:`GradientNoiseProbe` measures, at the model's current parameters, the squared gradient norms at a small
and a big batch size, *beside* training: it draws its own batches with a private seeded generator (the
training batch stream is untouched), computes gradients with :func:`torch.autograd.grad` (``.grad`` and the
optimizer are untouched), runs the model through :func:`torch.func.functional_call` on copies of its buffers
(BatchNorm running statistics are untouched) and inside :func:`torch.random.fork_rng` (dropout draws do not
shift the training's random stream). A trial with a probe therefore trains exactly as one without.

Two paths:

- ``micro`` (default, any model): a batch of B examples drawn *with replacement* is split into B/b micro-batches
  of b; the mean of their squared gradient norms is |G_b|² and the squared norm of the mean of their gradients
  is |G_B|² (exact for a mean-reduced loss over equal micro-batches). Cost: about one forward and backward
  over B examples, in B/b calls.
- ``per_example`` (small models, a cross-check): per-example gradients with ``torch.func`` (``vmap`` over
  ``grad`` of a ``functional_call``); b = 1. Models whose forward couples examples (BatchNorm in training
  mode) cannot be split per example and raise.

Sampling with replacement makes E|G_b|² = |G|² + tr(Σ)/b exact for the training set's population covariance,
so no finite-population correction is needed. Batches taken from training itself (without replacement within
an epoch) carry ``population_size`` instead; so do data-parallel trials, where the per-rank gradients are the
small batches and DDP's all-reduced gradient — the *average* of the ranks' gradients — is the big one
(:func:`data_parallel_sample`).

Caveats: a model whose loss couples examples (BatchNorm) has no per-example gradient; the micro path then
measures the noise of micro-batch-normalised gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import functional_call, grad, vmap

from bsprof.noise_scale import GradientNormSample, NoiseScaleEMA, estimate_noise_scale

__all__ = ["GnsSettings", "GradientNoiseProbe", "NoiseScaleTracker", "data_parallel_sample", "squared_norm"]

Method = Literal["micro", "per_example"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of ``t``, accumulated in at least float32 (float64 stays float64)."""
    t = t.detach()
    return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).pow(2).sum()


def squared_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Sum of squares over all elements of ``tensors`` (one device sync)."""
    if not tensors:
        return 0.0
    return float(torch.stack([_sq(t).double() for t in tensors]).sum())


def data_parallel_sample(
    rank_sq_norms: Sequence[float],
    reduced_sq_norm: float,
    *,
    per_rank_batch_size: int,
    population_size: int | None = None,
    step: int | None = None,
) -> GradientNormSample:
    """The sample of one data-parallel step: per-rank gradients are the small batches, the all-reduced one the big.

    DDP averages the ranks' gradients, so with a mean-reduced loss over equal per-rank batches the all-reduced
    gradient is the mean gradient over world_size × per-rank batch examples. Each rank's squared norm must be
    taken *before* the all-reduce (e.g. in a DDP communication hook) and gathered (one scalar all-reduce).

    Args:
        rank_sq_norms: |g_r|² of every rank's local gradient (world size = its length, at least 2).
        reduced_sq_norm: |mean_r g_r|², the squared norm of the all-reduced gradient.
        per_rank_batch_size: Examples per rank per step.
        population_size: Training-set size when the ranks' batches are drawn without replacement from it.
        step: Training step of the sample.

    Returns:
        A :class:`~bsprof.noise_scale.GradientNormSample` with b = per-rank batch and B = global batch.
    """
    world_size = len(rank_sq_norms)
    if world_size < 2:
        raise ValueError("a data-parallel sample needs at least two ranks")
    return GradientNormSample(
        small_batch_size=per_rank_batch_size,
        big_batch_size=per_rank_batch_size * world_size,
        small_sq_norm=sum(rank_sq_norms) / world_size,
        big_sq_norm=reduced_sq_norm,
        population_size=population_size,
        step=step,
    )


class GradientNoiseProbe:
    """Measures |G_b|² and |G_B|² beside training, leaving the training step's result unchanged.

    Args:
        model: The trained model (not a ``torch.compile`` wrapper); its parameters are read, never written.
        loss: The workload's loss ``loss(outputs, targets)``, reduced by the mean over the batch.
        inputs: Training inputs (first dimension indexes examples), on the model's device.
        targets: Training targets, on the same device.
        batch_size: B, examples per measurement (at least 2).
        micro_batch_size: b for the ``micro`` path (divides B, smaller than B); ignored by ``per_example``.
        seed: Seed of the probe's private batch generator.
        method: ``micro`` or ``per_example``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        batch_size: int,
        micro_batch_size: int | None = None,
        seed: int = 0,
        method: Method = "micro",
    ) -> None:
        if method not in ("micro", "per_example"):
            raise ValueError(f"method must be 'micro' or 'per_example', got {method!r}")
        if batch_size < 2:
            raise ValueError(f"the probe's batch size must be >= 2, got {batch_size}")
        b = 1 if method == "per_example" else (micro_batch_size or max(1, batch_size // 8))
        if method == "micro" and (b >= batch_size or batch_size % b):
            raise ValueError(f"micro_batch_size must divide batch_size and be smaller: b={b}, B={batch_size}")
        self.model = model
        self.loss = loss
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.micro_batch_size = b
        self.method = method
        self._generator = torch.Generator().manual_seed(seed)
        self.measurements = 0

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.inputs.shape[0], (self.batch_size,), generator=self._generator)
        idx = idx.to(self.inputs.device)
        return self.inputs[idx], self.targets[idx]

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # BatchNorm updates these copies
        return params, buffers

    def _micro(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        params, buffers = self._state()
        leaves = list(params.values())
        total: torch.Tensor | None = None
        small_sq: list[torch.Tensor] = []
        b = self.micro_batch_size
        for start in range(0, self.batch_size, b):
            out = functional_call(self.model, (params, buffers), (x[start : start + b],))
            grads = torch.autograd.grad(self.loss(out, y[start : start + b]), leaves)
            # One flat vector per micro-batch (float32 at least): its squared norm, and the running sum.
            flat = torch.cat([g.reshape(-1) for g in grads])
            if flat.dtype in (torch.float16, torch.bfloat16):
                flat = flat.float()
            small_sq.append(flat.dot(flat))
            total = flat if total is None else total + flat
        assert total is not None
        mean = total / (self.batch_size // b)
        return float(torch.stack(small_sq).double().mean()), float(mean.dot(mean))

    def _per_example(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        params, buffers = self._state()
        detached = {n: p.detach() for n, p in params.items()}

        def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, (p, buffers), (xi.unsqueeze(0),))
            return self.loss(out, yi.unsqueeze(0))

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(detached, x, y).values()
        # Per tensor, no concatenated copy: sum of the per-example squared norms, and |mean gradient|².
        small = squared_norm(list(per_example)) / self.batch_size
        big = squared_norm([g.mean(dim=0) for g in per_example])
        return small, big

    def measure(self, step: int | None = None) -> GradientNormSample:
        """One sample at the model's current parameters, from a freshly drawn batch.

        Args:
            step: Training step to record with the sample.

        Returns:
            The :class:`~bsprof.noise_scale.GradientNormSample` (sampling with replacement: no population).
        """
        devices = [self.inputs.device] if self.inputs.device.type == "cuda" else []
        x, y = self._draw()
        with torch.random.fork_rng(devices=devices):
            small, big = self._per_example(x, y) if self.method == "per_example" else self._micro(x, y)
        self.measurements += 1
        return GradientNormSample(self.micro_batch_size, self.batch_size, small, big, None, step)


@dataclass(frozen=True)
class GnsSettings:
    """How a convergence trial measures the gradient noise scale (``bsprof sweep --measure-gns``).

    Attributes:
        probes: Probe measurements per measured evaluation (their mean estimates, then the ratio).
        final_probes: Probes at the last evaluation (the target's, whose value predicts B_crit), at least ``probes``.
        batch_size: Examples per probe (B); ``None``: the trial's batch size, at least ``min_batch_size``.
        min_batch_size: Floor of the default probe batch (a small B resolves |G|² poorly once B_simple >> B).
        micro_batches: B/b, micro-batches per probe.
        spacing: Measure at an evaluation once the step count grew by this factor since the last measurement
            (evaluations are dense early; the noise scale changes on a log-step scale), and at the last one.
        ema_decay: Decay of the moving averages (per probe) kept beside the per-evaluation estimates.
        method: ``micro`` or ``per_example`` (see :class:`GradientNoiseProbe`).
    """

    probes: int = 4
    final_probes: int = 16
    batch_size: int | None = None
    min_batch_size: int = 256
    micro_batches: int = 8
    spacing: float = 1.25
    ema_decay: float = 0.9
    method: Method = "micro"

    def __post_init__(self) -> None:
        if self.probes < 1 or self.micro_batches < 2 or self.spacing < 1:
            raise ValueError(f"need probes >= 1, micro_batches >= 2 and spacing >= 1: {self}")

    def probe_batch_size(self, trial_batch_size: int) -> int:
        """B of the probes for a trial at ``trial_batch_size``: a multiple of :attr:`micro_batches`."""
        b = self.batch_size or max(trial_batch_size, self.min_batch_size)
        return max(self.micro_batches, b - b % self.micro_batches)

    def config(self) -> dict[str, object]:
        """The settings that change noise-scale measurements (part of a run's config hash)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class NoiseScaleTracker:
    """The noise scale over one training run, measured at (some of) its evaluations.

    At each measured evaluation it takes :attr:`GnsSettings.probes` probes (:attr:`GnsSettings.final_probes` at
    the last one) and returns learning-curve fields:
    ``b_simple`` (examples; the ratio of the probes' mean |G|² and tr(Σ) estimates), ``b_simple_low`` and
    ``b_simple_high`` (a bootstrap interval over the probes), ``grad_sq`` and ``trace_cov`` (the mean
    estimates), ``b_simple_ema`` (the paper's moving averages over all probes so far; it lags where |G|² falls
    fast, because the averaged |G|² is dominated by earlier, larger values) and ``gns_s`` (seconds spent).

    Args:
        model: The trained model (not a compiled wrapper).
        loss: The workload's mean-reduced loss.
        inputs: Training inputs on the model's device.
        targets: Training targets.
        trial_batch_size: The trial's batch size (sets the default probe batch).
        seed: Seed of the probes' batches (the training stream is untouched).
        settings: Probe count, sizes and spacing.
        clock: Seconds clock (injectable); the caller synchronises the device around :meth:`record`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        trial_batch_size: int,
        seed: int,
        settings: GnsSettings,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        big = settings.probe_batch_size(trial_batch_size)
        self.settings = settings
        self.probe = GradientNoiseProbe(
            model, loss, inputs, targets, batch_size=big, micro_batch_size=big // settings.micro_batches,
            seed=seed, method=settings.method,
        )  # fmt: skip
        self._ema = NoiseScaleEMA(settings.ema_decay)
        self._clock = clock
        self._last_step: int | None = None
        self._last_row: dict[str, Any] = {}
        self.measurements = 0
        self.samples: list[GradientNormSample] = []
        self.time_s = 0.0

    def due(self, step: int) -> bool:
        """Whether the evaluation at ``step`` should be measured (first, then geometric spacing)."""
        last = self._last_step
        return last is None or (step > last and step >= last * self.settings.spacing)

    def record(self, step: int, *, force: bool = False) -> dict[str, Any]:
        """Measure at ``step`` if due (or ``force``); the learning-curve fields, empty when not measured."""
        if not (force or self.due(step)) or step == self._last_step:
            return {}
        start = self._clock()
        n = max(self.settings.probes, self.settings.final_probes) if force else self.settings.probes
        window = [self.probe.measure(step=step) for _ in range(n)]
        for sample in window:
            self._ema.update(sample)
        self.samples.extend(window)
        self._last_step = step
        est = estimate_noise_scale(window, seed=step)
        spent = self._clock() - start
        self.time_s += spent
        self.measurements += 1
        self._last_row = {
            "b_simple": est.b_simple,
            "b_simple_low": est.ci_low,
            "b_simple_high": est.ci_high,
            "grad_sq": est.grad_sq,
            "trace_cov": est.trace_cov,
            "b_simple_ema": self._ema.value,
            "gns_s": spent,
        }
        return dict(self._last_row)

    def metrics(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Trial metrics: the last measurement's B_simple, interval and mean |G|² and tr(Σ) estimates (the target's
        evaluation when the trial reached it), the probe sizes and the seconds spent; and the reasons of the empty
        ones."""
        last = self._last_row
        metrics: dict[str, Any] = {
            "gns_b_simple": last.get("b_simple"),
            "gns_b_simple_low": last.get("b_simple_low"),
            "gns_b_simple_high": last.get("b_simple_high"),
            "gns_grad_sq": last.get("grad_sq"),
            "gns_trace_cov": last.get("trace_cov"),
            "gns_step": self._last_step,
            "gns_measurements": self.measurements,
            "gns_probe_batch_size": self.probe.batch_size,
            "gns_micro_batch_size": self.probe.micro_batch_size,
            "gns_time_s": self.time_s,
        }
        reasons = {}
        if metrics["gns_b_simple"] is None:
            why = "no measurement" if not last else "|G|² not resolved (estimate <= 0) at the last measurement"
            reasons = {k: why for k in ("gns_b_simple", "gns_b_simple_low", "gns_b_simple_high")}
        return metrics, reasons
