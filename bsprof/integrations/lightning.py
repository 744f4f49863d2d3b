"""Lightning callback: ``Trainer(..., callbacks=[BsprofCallback(metric="val_acc")])`` and nothing else.

The callback feeds bsprof's tracker (:func:`bsprof.track`): one :meth:`~bsprof.tracker.Tracker.step` per
optimizer step (``trainer.global_step`` advanced; with ``accumulate_grad_batches`` the micro-batches of one
step are summed) with the global samples of that step (micro-batch size x accumulated batches x world
size); one :meth:`~bsprof.tracker.Tracker.evaluate` per validation run (``on_validation_end``, not the
sanity check) with ``trainer.callback_metrics[metric]``; and ``trainer.should_stop`` when the tracker has
what the trial needs. Outside bsprof the tracker is a no-op and so is the callback.

Requires ``lightning`` (``pip install 'bsprof[lightning]'``).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("bsprof.integrations.lightning needs lightning: pip install 'bsprof[lightning]'") from e

import bsprof

__all__ = ["BsprofCallback", "batch_samples"]


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (tensors, tuples, lists, dicts)."""
    if hasattr(batch, "shape"):
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        try:
            return batch_samples(item)
        except TypeError:
            continue
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


class BsprofCallback(Callback):
    """Report a Lightning Trainer's optimizer steps and validation metric to bsprof.

    Args:
        metric: Key of ``trainer.callback_metrics`` to report after each validation (e.g. ``val_acc``, as
            logged with ``self.log``).
    """

    def __init__(self, metric: str = "val_acc") -> None:
        self.metric = metric
        self.tracker: Any = None
        self._last_step = 0
        self._pending = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.tracker = bsprof.track()
        self._last_step = trainer.global_step
        self._pending = 0
        self.tracker.start()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tracker is None:
            return
        self._pending += batch_samples(batch) * int(trainer.world_size)
        if trainer.global_step == self._last_step:
            return  # a micro-batch of an accumulated step
        self._last_step = trainer.global_step
        samples, self._pending = self._pending, 0
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.tracker.step(samples=samples, loss=loss.detach() if hasattr(loss, "detach") else loss)
        if self.tracker.should_stop():
            trainer.should_stop = True

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker is None or trainer.sanity_checking:
            return
        if self.metric not in trainer.callback_metrics:
            have = ", ".join(sorted(trainer.callback_metrics))
            raise KeyError(
                f"bsprof: no {self.metric!r} in trainer.callback_metrics (have: {have}); log it with self.log"
            )
        self.tracker.evaluate(metric=float(trainer.callback_metrics[self.metric]), step=trainer.global_step)
        if self.tracker.should_stop():
            trainer.should_stop = True
