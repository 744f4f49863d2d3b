"""bsprof: which batch size to train with, and what bigger batches really buy.

Public API:
    * :class:`Workload`, :class:`Split`, :func:`load_workload` — describe a training job.
    * :class:`Store` — the SQLite results store; :func:`trials_frame` — its trials as a pandas DataFrame.
    * :func:`track` — the tracker inside a user's training script swept by ``bsprof sweep --cmd``.
"""

from __future__ import annotations

from bsprof.workload import Split, Workload, load_workload

__version__ = "0.1.0"

__all__ = ["Split", "Store", "Workload", "__version__", "load_workload", "track", "trials_frame"]


def __getattr__(name: str) -> object:
    if name == "Store":
        from bsprof.store import Store

        return Store
    if name == "trials_frame":
        from bsprof.export import trials_frame

        return trials_frame
    if name == "track":
        from bsprof.tracker import track

        return track
    raise AttributeError(name)
