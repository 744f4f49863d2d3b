"""The Workload contract: what bsprof needs to know about a training job.

A workload provides a fresh seeded model, training and validation data, the loss, the validation metric
(higher is better unless :attr:`Workload.higher_is_better` is ``False``), a default target, an optimizer
factory taking the learning rate, and a base learning rate at a base batch size. The trial engine owns
the training step, the timing and the evaluation schedule; the workload only describes the job.

Workloads are loaded by built-in name (``digits-mlp``), by ``package.module:factory`` or by
``path/to/file.py:factory``; the factory is called with no arguments and must return a :class:`Workload`.
See :func:`load_workload`.

The metric is computed in one of two ways. A metric that is a mean over examples (accuracy, a mean loss)
declares :attr:`Workload.metric_is_mean` (the default): it is computed per evaluation batch and averaged,
weighted by batch size. Any other metric (R², AUC, F1, perplexity = exp of a mean) sets it to ``False`` and
gets one call over the whole split's concatenated outputs and targets. Whether a value reached the target
is decided in float64 with a relative tolerance of :data:`TARGET_RTOL` (1e-6), enough for float32 rounding
of a metric (342/360 in float32 is 0.949999988) and far below any real difference.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsprof.engine.target import TARGET_RTOL, meets_target
from bsprof.errors import BadInput

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from torch import nn

__all__ = ["TARGET_RTOL", "Split", "Workload", "load_workload"]


@dataclass(frozen=True)
class Split:
    """One in-memory split of a dataset: example ``i`` is ``inputs[i]`` with ``targets[i]``.

    ``inputs`` and ``targets`` are tensors, or any nesting of tensors (dict, tuple, list, dataclass; see
    :mod:`bsprof.engine.batches`) whose first dimension indexes examples.

    Attributes:
        inputs: Tensor (or nesting of tensors) whose first dimension indexes examples.
        targets: Tensor (or nesting of tensors) whose first dimension indexes examples.
    """

    inputs: Any
    targets: Any

    def __post_init__(self) -> None:
        from bsprof.engine.batches import batch_size_of

        n_in, n_out = batch_size_of(self.inputs), batch_size_of(self.targets)
        if n_in != n_out:
            raise ValueError(f"inputs and targets differ in length: {n_in} != {n_out}")

    def __len__(self) -> int:
        from bsprof.engine.batches import batch_size_of

        return batch_size_of(self.inputs)

    def to(self, device: torch.device | str) -> Split:
        """The same split on ``device`` (no copy when it is already there)."""
        from bsprof.engine.batches import to_device

        return Split(to_device(self.inputs, device), to_device(self.targets, device))


class Workload(ABC):
    """A PyTorch training job that bsprof can sweep over batch sizes.

    Subclasses set the class attributes and implement the abstract methods. Data live in memory
    (:class:`Split`: the engine moves them to the trial's device once and batches by index, the fast path), or
    come from a ``torch.utils.data.Dataset`` returned by :meth:`train_split`, or from the workload's own loader
    (:meth:`make_loader`). Batches may be any nesting of tensors; :meth:`compute_loss` and
    :meth:`eval_outputs` say how the model consumes them. The engine owns the step (including gradient
    accumulation and the LR schedule), the timer and the evaluation schedule.

    Attributes:
        name: Short identifier, e.g. ``"digits-mlp"``.
        description: One line for ``bsprof workloads``.
        metric_name: Name of the validation metric, e.g. ``"accuracy"``.
        higher_is_better: Direction of the metric.
        target: Default validation target, or ``None`` for throughput-only workloads.
        base_lr: Learning rate tuned at ``base_batch_size``; LR rules scale from here.
        base_batch_size: Batch size (samples) at which ``base_lr`` was tuned.
        max_lr: Cap applied by LR scaling rules, or ``None`` for no cap.
        eval_batch_size: Batch size (samples) used for evaluation; independent of the swept size.
        metric_range: The metric's possible values ``(low, high)`` (``(0, 1)`` for an accuracy; ``(0, inf)``
            for a mean squared error), or ``None`` when unknown; a ``--target`` outside it is refused.
        metric_is_mean: ``True`` when :meth:`metric` is a mean over examples, so it may be computed per
            evaluation batch and averaged weighted by batch size; ``False`` to have it computed once over the
            whole split (R², AUC, F1, perplexity).
        loss_reduction: How :meth:`loss` / :meth:`compute_loss` reduce over the examples of a batch: ``mean``
            or ``sum``; gradient accumulation scales micro-batch losses accordingly.
        num_workers: DataLoader worker processes for a Dataset returned by :meth:`train_split` /
            :meth:`val_split` (0: load in the training process).
        pin_memory: Page-locked host batches from such a Dataset when training on a GPU.
    """

    name: str = "workload"
    description: str = ""
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    target: float | None = None
    base_lr: float = 0.1
    base_batch_size: int = 32
    max_lr: float | None = None
    eval_batch_size: int = 1024
    metric_is_mean: bool = True
    metric_range: tuple[float, float] | None = None
    loss_reduction: str = "mean"
    num_workers: int = 0
    pin_memory: bool = True

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; the same ``seed`` gives the same weights."""

    @abstractmethod
    def train_split(self) -> Split | torch.utils.data.Dataset:
        """The training data, on the CPU: a :class:`Split` (the engine moves it to the trial's device once), a
        map-style ``Dataset`` (sampled with a seeded sampler, collated by :meth:`collate`) or an iterable-style
        one (batched in its own order). Not used for training when :meth:`make_loader` returns a loader."""

    @abstractmethod
    def val_split(self) -> Split | torch.utils.data.Dataset:
        """The validation data, on the CPU: a :class:`Split` or a ``Dataset`` (evaluated in order)."""

    def loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The scalar training loss of one batch (used by the default :meth:`compute_loss`)."""
        raise NotImplementedError(
            f"workload {self.name}: implement loss(outputs, targets) or compute_loss(model, batch)"
        )

    def compute_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of one batch (or micro-batch), reduced as :attr:`loss_reduction` says.

        ``batch`` is what the data yield, already on the trial's device: ``(inputs, targets)`` for a
        :class:`Split`, the collated batch of a Dataset or loader. ``model`` is the (possibly compiled) model.
        Default: ``inputs, targets = batch; loss(model(inputs), targets)``. Override it for models that compute
        their own loss, e.g. ``return model(**batch).loss`` for HuggingFace models.
        """
        inputs, targets = batch
        return self.loss(model(inputs), targets)

    def eval_outputs(self, model: nn.Module, batch: Any) -> tuple[Any, Any]:
        """What :meth:`metric` needs from one evaluation batch: ``(outputs, targets)``. Runs under
        ``torch.no_grad()`` with the model in eval mode. Default: ``inputs, targets = batch; (model(inputs),
        targets)``."""
        inputs, targets = batch
        return model(inputs), targets

    def make_loader(self, batch_size: int, seed: int) -> Iterable[Any] | None:
        """Optional: the training loader of one trial, e.g. a ``DataLoader`` with the user's sampler, workers
        and collate function, yielding batches of ``batch_size`` examples in an order seeded by ``seed``.
        A short last batch of a pass is completed from the next pass (see :mod:`bsprof.engine.data`).
        Default ``None``: train on :meth:`train_split`."""
        return None

    def collate(self, items: list[Any]) -> Any:
        """A batch from a list of examples of a Dataset returned by :meth:`train_split` / :meth:`val_split`.
        Default: ``torch.utils.data.default_collate``."""
        from torch.utils.data import default_collate

        return default_collate(items)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, batch_size: int) -> Any:
        """Optional: a ``torch.optim.lr_scheduler`` for ``optimizer``, stepped after every optimizer step of a
        trial at ``batch_size``. Default ``None`` (the engine applies ``--lr-schedule``, if any)."""
        return None

    def make_optimizer(self, params: object, lr: float) -> torch.optim.Optimizer:
        """The optimizer for ``params`` at learning rate ``lr``. Default: SGD with Nesterov momentum 0.9."""
        import torch

        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)  # type: ignore[arg-type]

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        """The metric over a batch of outputs (or, when :attr:`metric_is_mean` is ``False``, over the whole
        split); default top-1 accuracy, a fraction in [0, 1], exact: integer counts divided in float64."""
        return int((outputs.argmax(dim=-1) == targets).sum()) / targets.numel()

    def has_reached_target(self, value: float, target: float) -> bool:
        """Whether a metric value meets the target, respecting :attr:`higher_is_better`, in float64 and within
        a relative :data:`TARGET_RTOL` of it (so a float32 metric of exactly the target counts)."""
        return meets_target(value, target, self.higher_is_better)

    def config(self) -> dict[str, object]:
        """Parameters that identify this workload's variant; part of a run's config hash."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _raised(e: BaseException) -> str:
    """``SystemExit: sys.exit(3) called`` / ``ValueError: msg``: what a plug-in raised, in one line."""
    if isinstance(e, SystemExit):
        return f"SystemExit: the plug-in called sys.exit({e.code!r})"
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _from_module(module_name: str, attr: str) -> Callable[[], object]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"cannot import workload module {module_name!r}: {e}") from e
    except (Exception, SystemExit) as e:  # the plug-in's own code raised (or called sys.exit) while importing
        raise BadInput(f"importing workload module {module_name!r} failed: {_raised(e)}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BadInput(f"workload module {module_name!r} has no attribute {attr!r}") from None


def _from_file(path: Path, attr: str) -> Callable[[], object]:
    if not path.is_file():
        raise BadInput(f"workload file not found: {path}")
    module_name = f"_bsprof_plugin_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise BadInput(f"cannot load workload file {path} (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a plug-in calling sys.exit() at import is a bad workload too
        sys.modules.pop(module_name, None)
        raise BadInput(f"importing workload file {path} failed: {_raised(e)}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BadInput(f"workload file {path} has no attribute {attr!r}") from None


def load_workload(spec: str | Workload) -> Workload:
    """Resolve a workload by built-in name, ``package.module:factory`` or ``path/to/file.py:factory``.

    Args:
        spec: The workload reference, or a :class:`Workload` (returned as is).

    Returns:
        A :class:`Workload` instance.

    Raises:
        BadInput: Unknown name, missing file or attribute, a factory that raises or returns something
            other than a Workload. The message is one line.
    """
    if isinstance(spec, Workload):
        return spec
    from bsprof.workloads import BUILTINS

    spec = spec.strip()
    if spec in BUILTINS:
        factory: Callable[[], object] = BUILTINS[spec].factory
    elif ":" in spec:
        target, _, attr = spec.rpartition(":")
        if not target or not attr:
            raise BadInput(f"workload {spec!r}: expected 'package.module:factory' or 'file.py:factory'")
        if target.endswith(".py") or "/" in target or "\\" in target:
            factory = _from_file(Path(target), attr)
        else:
            factory = _from_module(target, attr)
    else:
        names = ", ".join(sorted(BUILTINS))
        raise BadInput(f"unknown workload {spec!r}; built-ins are {names}, or give 'module:factory'")
    if isinstance(factory, Workload):
        workload: object = factory
    elif (isinstance(factory, type) and issubclass(factory, Workload)) or callable(factory):
        try:
            workload = factory()
        except BadInput:
            raise
        except (Exception, SystemExit) as e:
            raise BadInput(f"workload factory {spec!r} raised {_raised(e)}") from e
    else:
        raise BadInput(f"workload {spec!r} is neither a Workload nor a callable returning one")
    if not isinstance(workload, Workload):
        raise BadInput(f"workload factory {spec!r} returned {type(workload).__name__}, not a bsprof.Workload")
    return workload
