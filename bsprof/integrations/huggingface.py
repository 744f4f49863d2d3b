"""HuggingFace ``Trainer`` callback: ``Trainer(..., callbacks=[BsprofCallback()])`` and nothing else.

The callback feeds bsprof's tracker (:func:`bsprof.track`): one :meth:`~bsprof.tracker.Tracker.step` per
optimizer step (``on_step_end``, which the Trainer calls once per *accumulated* step) with the Trainer's
global batch, per-device batch x gradient-accumulation steps x world size; one
:meth:`~bsprof.tracker.Tracker.evaluate` per evaluation (``on_evaluate``) with the metric named by
``metric`` (default: the Trainer's ``metric_for_best_model``, else ``eval_loss``); and it asks the Trainer
to stop (``control.should_training_stop``) when the tracker has what the trial needs. Outside bsprof the
tracker is a no-op and so is the callback.

Requires ``transformers`` (``pip install 'bsprof[hf]'``).
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("bsprof.integrations.huggingface needs transformers: pip install 'bsprof[hf]'") from e

import bsprof

__all__ = ["BsprofCallback", "global_batch_size"]


def global_batch_size(args: Any) -> int:
    """Samples per optimizer step of a Trainer: per-device batch x accumulation steps x world size."""
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size)


class BsprofCallback(TrainerCallback):
    """Report a Trainer's steps and evaluations to bsprof.

    Args:
        metric: Key of the evaluation metrics to report (``eval_accuracy``; an ``eval_`` prefix is added
            when missing); default: ``metric_for_best_model`` of the training arguments, else ``eval_loss``.
    """

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric
        self.tracker: Any = None
        self._samples = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracker = bsprof.track()
        self._samples = global_batch_size(args)
        self.tracker.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is None:
            return
        self.tracker.step(samples=self._samples)
        if self.tracker.should_stop():
            control.should_training_stop = True

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if self.tracker is None or not metrics:
            return
        key = self.metric or getattr(args, "metric_for_best_model", None) or "eval_loss"
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        if key not in metrics:
            raise KeyError(f"bsprof: evaluation metrics have no {key!r} (have: {', '.join(sorted(metrics))})")
        self.tracker.evaluate(metric=float(metrics[key]), step=int(state.global_step))
        if self.tracker.should_stop():
            control.should_training_stop = True
