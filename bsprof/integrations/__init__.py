"""Thin doors from training frameworks to bsprof's tracker (:mod:`bsprof.tracker`).

* :mod:`bsprof.integrations.huggingface`: ``BsprofCallback``, a ``transformers.TrainerCallback``
  (``pip install 'bsprof[hf]'``).
* :mod:`bsprof.integrations.lightning`: ``BsprofCallback``, a ``lightning.pytorch.Callback``
  (``pip install 'bsprof[lightning]'``).

Each module imports its framework itself; importing this package imports none.
"""

from __future__ import annotations

__all__: list[str] = []
