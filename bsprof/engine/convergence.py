"""Convergence trials: train a fresh model until the validation metric reaches the target.

The trial trains with the one :class:`~bsprof.engine.step.TrainingStep` and evaluates on a schedule of
bounded *relative* resolution: after every step while fewer than ``1/resolution`` steps have run, then
at steps growing geometrically by ``1 + resolution`` (default 5%). ``steps_to_target`` is the first
evaluation at or above the target (with ``patience`` K: the first of K consecutive such evaluations), and
the bracket — the evaluation before it — is stored, so ``(steps_to_target - bracket) / steps_to_target``
is at most the resolution. ``--eval-every N`` fixes the period instead.

Clocks: training seconds are measured with the device synchronised before every clock read and exclude
evaluation, whose seconds are stored separately (``eval_time_s``). With ``torch.compile`` the graphs are
compiled before the clock starts (one forward and backward that leave the trial's state untouched), and the
compilation's seconds are stored as ``compile_time_s``.

Divergence: the training loss is checked at every evaluation and at least every ``check_every`` steps;
a non-finite loss, or one above ``explode_factor`` times the first step's loss, ends the trial as
``diverged`` within a few steps.

Host load: the trial runs in the throughput trial's telemetry window (:func:`~bsprof.engine.trial.trial_window`)
and records what else the host did (``host_busy``, ``host_*`` metrics and ``extra.host_load``) the same way.

At every evaluation the learning curve also records the L2 distance of the weights from their
initialisation and the norm of the gradient of the training loss on a fixed probe batch (model in eval
mode, no optimizer step), quantities that differ sharply with batch size (Keskar et al. 2016;
Hoffer et al. 2017).

Size (about 440 lines, above the ~400 guideline): the convergence loop with its evaluation schedule, divergence
checks and noise-scale probes; the target and bracket rule is :class:`~bsprof.engine.target.TargetWatch`, the
one that script trials use.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from bsprof.engine.batches import batch_size_of, concat_batches, slice_batch, to_device
from bsprof.engine.data import eval_batches, is_map_dataset, is_split, make_source
from bsprof.engine.device import synchronizer
from bsprof.engine.noise_scale import GnsSettings, NoiseScaleTracker
from bsprof.engine.step import TrainingStep, flush_denormal
from bsprof.engine.target import TargetWatch
from bsprof.engine.trial import (
    EngineSettings,
    TrialResult,
    TrialSpec,
    begin_trial,
    ended,
    host_load_fields,
    run_guarded,
    trial_window,
)

if TYPE_CHECKING:
    from bsprof.workload import Workload

log = logging.getLogger(__name__)

__all__ = ["ConvergenceSettings", "EvalSchedule", "evaluate", "run_convergence_trial"]


@dataclass(frozen=True)
class ConvergenceSettings:
    """Budgets, evaluation schedule and target of convergence trials.

    Attributes:
        target: Validation metric to reach; ``None`` takes the workload's default.
        patience: Consecutive evaluations at or above target that count as reaching it (1 = first crossing).
        max_steps: Step budget (``None``: no step limit).
        max_epochs: Budget in passes over the training data (``None``: no limit).
        max_time_s: Budget in training seconds (``None``: no limit).
        resolution: Largest relative width of the steps-to-target bracket (0.05 = 5%).
        eval_every: Fixed evaluation period in steps, overriding ``resolution``.
        continue_after_target: Train on to the budget for complete learning curves.
        warmup_steps: Linear LR warm-up length in steps (Goyal et al. 2017).
        warmup_epochs: Linear LR warm-up length in epochs (converted to steps per batch size).
        explode_factor: A loss above this multiple of the first step's loss counts as diverged.
        check_every: Check the loss at least every this many steps.
        probe_size: Training examples in the fixed batch used for the gradient norm.
        gns: Measure the gradient noise scale at evaluations (``--measure-gns``), ``None``: off.
    """

    target: float | None = None
    patience: int = 1
    max_steps: int | None = None
    max_epochs: float | None = 100.0
    max_time_s: float | None = 120.0
    resolution: float = 0.05
    eval_every: int | None = None
    continue_after_target: bool = False
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    explode_factor: float = 10.0
    check_every: int = 10
    probe_size: int = 512
    gns: GnsSettings | None = None

    def config(self) -> dict[str, object]:
        """The settings that change convergence measurements (part of a run's config hash; ``gns`` only when on,
        so runs stored before it existed keep their hash)."""
        out: dict[str, object] = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "gns"}
        if self.gns is not None:
            out["gns"] = self.gns.config()
        return out

    def warmup_for(self, batch_size: int, n_train: int) -> int:
        """Warm-up steps at ``batch_size`` (the larger of the step and epoch settings)."""
        from_epochs = math.ceil(self.warmup_epochs * n_train / batch_size) if self.warmup_epochs else 0
        return max(self.warmup_steps, from_epochs)


class EvalSchedule:
    """Steps after which to evaluate: every step up to ``1/resolution``, then geometric (or fixed period)."""

    def __init__(self, resolution: float = 0.05, every: int | None = None) -> None:
        if every is not None and every < 1:
            raise ValueError("eval_every must be >= 1")
        if not 0 < resolution < 1:
            raise ValueError("resolution must be in (0, 1)")
        self.resolution = resolution
        self.every = every

    def next_after(self, step: int) -> int:
        """The first evaluation step after ``step``."""
        if self.every is not None:
            return step + self.every
        # Largest s' with (s' - step) / s' <= resolution, i.e. s' <= step / (1 - resolution).
        return max(step + 1, math.floor(step / (1 - self.resolution)))


def evaluate(model: torch.nn.Module, workload: Workload, data: Any, device: torch.device | None = None) -> float:
    """The workload's metric over ``data`` in float64 (model left in train mode afterwards).

    ``data`` is a split or a dataset, read in evaluation batches of ``workload.eval_batch_size`` moved to
    ``device``; :meth:`~bsprof.workload.Workload.eval_outputs` gives what the metric needs. A mean metric
    (:attr:`~bsprof.workload.Workload.metric_is_mean`) is computed per evaluation batch and averaged weighted by
    the batch's number of targets; any other gets one call over the concatenated outputs and targets of every
    batch.
    """
    from bsprof.errors import MeasurementFailed

    model.eval()
    weighted: list[float] = []
    count = 0
    outputs: list[Any] = []
    targets: list[Any] = []
    with torch.no_grad():
        for batch in eval_batches(data, workload.eval_batch_size, collate_fn=workload.collate):
            out, tgt = workload.eval_outputs(model, batch if device is None else to_device(batch, device))
            if workload.metric_is_mean:
                n = batch_size_of(tgt)
                weighted.append(float(workload.metric(out, tgt)) * n)
                count += n
            else:
                outputs.append(out)
                targets.append(tgt)
    model.train()
    if not (count if workload.metric_is_mean else outputs):
        raise MeasurementFailed(f"workload {workload.name}: the evaluation split is empty (no example to score)")
    if workload.metric_is_mean:
        value = math.fsum(weighted) / count
    else:
        value = float(workload.metric(concat_batches(outputs), concat_batches(targets)))
    if math.isnan(value):
        raise MeasurementFailed(f"workload {workload.name}: its metric {workload.metric_name} returned NaN")
    return value


def _grad_norm(model: torch.nn.Module, workload: Workload, probe: Any) -> float:
    model.eval()
    model.zero_grad(set_to_none=True)
    workload.compute_loss(model, probe).backward()
    sq = sum(float(p.grad.detach().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    model.train()
    return math.sqrt(sq)


def _eval_data(workload: Workload, step: TrainingStep, device: torch.device) -> tuple[Any, Any]:
    """The validation data (a split on ``device``, or a dataset) and the training data the final train metric
    is computed on: the in-memory split, or the first examples of a map-style dataset, at most four times as
    many as the validation data (``None`` for an iterable-style dataset, which may not end)."""
    val = workload.val_split()
    if is_split(val):
        val = val.to(device)
    if step.train is not None:
        return val, step.train
    train = workload.train_split()
    if is_split(train):
        return val, train
    if not is_map_dataset(train):
        return val, None
    cap = 4 * len(val)
    return val, torch.utils.data.Subset(train, range(cap)) if len(train) > cap else train


def _probe_batch(workload: Workload, step: TrainingStep, size: int, device: torch.device) -> Any:
    """The fixed batch on which the gradient norm is measured: the first ``size`` training examples of an
    in-memory split, else the first batch of a fresh seed-0 source of at most one micro-batch."""
    if step.train is not None:
        n = min(size, len(step.train))
        return slice_batch(step.train.inputs, 0, n), slice_batch(step.train.targets, 0, n)
    source = make_source(workload, min(size, step.plan.micro_batch_size), 0, device)
    try:
        return to_device(source.next(), device)
    finally:
        source.close()


def _distance(model: torch.nn.Module, init: list[torch.Tensor]) -> float:
    with torch.no_grad():
        sq = sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in zip(model.parameters(), init))
    return math.sqrt(sq)


def run_convergence_trial(
    workload: Workload,
    spec: TrialSpec,
    settings: EngineSettings,
    conv: ConvergenceSettings,
) -> TrialResult:
    """Train from a fresh seeded model until the target is reached, the budget runs out, or it diverges.

    Returns:
        A result whose metrics hold ``steps_to_target``, ``samples_to_target``, ``epochs_to_target``,
        ``time_to_target_s`` (training seconds, evaluation excluded), ``bracket_steps``,
        ``reached_target``, ``final_train_metric``, ``final_val_metric``, ``eval_time_s``, ``train_time_s``,
        ``steps_run`` and ``target_fallbacks`` (times the metric fell back below target after reaching it),
        and the learning curve. Status ``ok`` when the target was reached, else ``budget_exhausted``,
        ``diverged``, ``oom`` or ``error``.
    """
    started = time.time()
    target = conv.target if conv.target is not None else workload.target
    if target is None:
        error = f"workload {workload.name} has no target; pass --target"
        return ended(spec, "error", settings.device, started, error=error)

    def train() -> TrialResult:
        with flush_denormal(settings.flush_denormal):
            return _train(workload, spec, settings, conv, target, started)

    return run_guarded(train, spec, settings.device, started)


def _train(
    workload: Workload,
    spec: TrialSpec,
    settings: EngineSettings,
    conv: ConvergenceSettings,
    target: float,
    started: float,
) -> TrialResult:
    begin_trial(settings)
    with trial_window(settings) as (window, _, _):  # the throughput trial's window: host load recorded alike
        step = TrainingStep.for_trial(workload, spec, settings)
        try:
            result = _train_steps(workload, spec, settings, conv, target, started, step)
        finally:
            step.close()
    load, metrics, reasons = host_load_fields(window.telemetry, settings.device)
    return replace(
        result,
        metrics={**result.metrics, **metrics},
        reasons={**result.reasons, **reasons},
        extra=replace(result.extra, host_load=load),
    )


def _train_steps(
    workload: Workload,
    spec: TrialSpec,
    settings: EngineSettings,
    conv: ConvergenceSettings,
    target: float,
    started: float,
    step: TrainingStep,
) -> TrialResult:
    device = settings.device
    sync = synchronizer(device)
    compile_s = _compile_before_the_clock(step, sync) if settings.compile else None
    val, train_eval = _eval_data(workload, step, device)
    probe = _probe_batch(workload, step, conv.probe_size, device)
    init = [p.detach().clone() for p in step.model.parameters()]
    tracker = None
    plain_split = step.train is not None and isinstance(step.train.inputs, torch.Tensor)
    if conv.gns is not None and not plain_split:
        log.warning("--measure-gns needs an in-memory Split of tensors; %s has other data: not measured", workload.name)
    elif conv.gns is not None:  # beside training: its own batches, no .grad, buffers or RNG touched
        tracker = NoiseScaleTracker(step.model, workload.loss, step.train.inputs, step.train.targets,
                                    trial_batch_size=spec.batch_size, seed=spec.seed, settings=conv.gns)  # fmt: skip
    n_train = step.n_train
    warmup = conv.warmup_for(spec.batch_size, n_train or 0)
    max_steps = conv.max_steps if conv.max_steps is not None else math.inf
    if conv.max_epochs is not None and n_train:
        max_steps = min(max_steps, math.ceil(conv.max_epochs * n_train / spec.batch_size))
    if max_steps == math.inf and conv.max_time_s is None:
        raise ValueError("the training data have no length, so --max-epochs cannot bound the trial: give --max-steps")
    schedule = EvalSchedule(conv.resolution, conv.eval_every)

    curve: list[dict[str, Any]] = []
    train_s = eval_s = 0.0
    first_loss: float | None = None
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    watch = TargetWatch(target, conv.patience, workload.higher_is_better, rule=workload.has_reached_target)
    status = "budget_exhausted"
    error = None
    next_eval = schedule.next_after(0)
    next_check = conv.check_every

    sync()
    t = time.perf_counter()
    while True:
        s = step.steps_done
        if warmup and s < warmup:
            step.set_lr(spec.lr * (s + 1) / warmup)
        elif warmup and s == warmup:
            step.set_lr(spec.lr)
        loss = step().detach()
        loss_sum += loss.float()
        loss_count += 1
        s += 1
        if first_loss is None:
            (first_loss,), _ = step.agree((float(loss),), ())
        at_eval = s >= next_eval
        out_of_budget = s >= max_steps
        if not (at_eval or out_of_budget or s >= next_check):
            continue
        sync()
        now = time.perf_counter()
        next_check = s + conv.check_every
        # Data-parallel: the loss over all ranks and the slowest rank's clock, so every rank decides alike.
        (last_loss, mean_loss), (train_s,) = step.agree(
            (float(loss), float(loss_sum) / loss_count), (train_s + now - t,)
        )
        if (
            not math.isfinite(mean_loss)
            or not math.isfinite(last_loss)
            or last_loss > conv.explode_factor * max(first_loss, 1e-12)
        ):
            status, error = "diverged", f"training loss {last_loss:.4g} at step {s} (first step: {first_loss:.4g})"
            curve.append(
                {
                    "step": s,
                    "samples": step.samples_done,
                    "epochs": step.epochs,
                    "train_s": train_s,
                    "train_loss": mean_loss if math.isfinite(mean_loss) else None,
                    "val_metric": None,
                }
            )
            break
        if at_eval or out_of_budget:
            e0 = time.perf_counter()
            (metric,), _ = step.agree((evaluate(step.model, workload, val, device),), ())  # replicas: the same value
            row = {
                "step": s,
                "samples": step.samples_done,
                "epochs": step.epochs,
                "train_s": train_s,
                "train_loss": mean_loss,
                "val_metric": metric,
                "lr": step.optimizer.param_groups[0]["lr"],
                "weight_distance": _distance(step.model, init),
                "grad_norm": _grad_norm(step.model, workload, probe),
            }
            watch.observe(row)  # the one target rule (engine/target.py); sets row["bracket_step"]
            row.update(step.gradient_norms() or {})
            curve.append(row)
            loss_sum.zero_()
            loss_count = 0
            next_eval = schedule.next_after(s)
            eval_s += time.perf_counter() - e0
            if tracker is not None:  # its seconds are its own (gns_time_s), in neither training nor evaluation
                last = (watch.reached is not None and not conv.continue_after_target) or out_of_budget or (
                    conv.max_time_s is not None and train_s >= conv.max_time_s)  # fmt: skip
                row.update(tracker.record(s, force=last))
        if watch.reached is not None and not conv.continue_after_target:
            status = "ok"
            break
        if out_of_budget or (conv.max_time_s is not None and train_s >= conv.max_time_s):
            status = "ok" if watch.reached is not None else "budget_exhausted"
            if status == "budget_exhausted":
                error = f"target {target} not reached within the budget ({s} steps, {train_s:.1f} s)"
            break
        sync()
        t = time.perf_counter()

    e0 = time.perf_counter()
    final_train = None
    if status != "diverged" and train_eval is not None:
        final_train = evaluate(step.model, workload, train_eval, device)
    final_val = curve[-1]["val_metric"] if curve and curve[-1]["val_metric"] is not None else None
    eval_s += time.perf_counter() - e0
    reached = watch.reached
    metrics: dict[str, Any] = {
        **watch.to_target(),
        "target": target,
        "higher_is_better": workload.higher_is_better,
        "epochs_to_target": reached["epochs"] if reached else None,
        "final_train_metric": final_train,
        "final_val_metric": final_val,
        "train_time_s": train_s,
        "eval_time_s": eval_s,
        "steps_run": step.steps_done,
        "warmup_steps": warmup,
        "evaluations": sum(1 for r in curve if r.get("val_metric") is not None),
    }
    if compile_s is not None:
        metrics["compile_time_s"] = compile_s
    reasons = (
        {}
        if reached
        else {
            k: f"target not reached ({status})"
            for k in ("steps_to_target", "samples_to_target", "epochs_to_target", "time_to_target_s")
        }
    )
    if tracker is not None:
        gns_metrics, gns_reasons = tracker.metrics()
        metrics.update(gns_metrics)
        reasons.update(gns_reasons)
    return ended(spec, status, device, started, metrics=metrics, reasons=reasons, error=error, curve=curve)


def _compile_before_the_clock(step: TrainingStep, sync: Callable[[], None]) -> float:
    """Compile the trial's forward and backward graphs before training starts (seconds it took), so that
    compilation never counts as training time; the trial's state is left as it was (see
    :meth:`~bsprof.engine.step.TrainingStep.warm_up_compiled`)."""
    sync()
    t0 = time.perf_counter()
    step.warm_up_compiled()
    sync()
    return time.perf_counter() - t0
