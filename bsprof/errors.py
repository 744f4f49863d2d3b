"""Exceptions that map onto the CLI's exit codes.

* :class:`BadInput` — the user's input is wrong (exit code 2, one line, no traceback).
* :class:`MeasurementFailed` — the measurement itself failed (exit code 1).
* :class:`BusyHost` — results measured on a busy host cannot be judged (exit code 3, ``bsprof compare``).
"""

from __future__ import annotations

__all__ = ["BadInput", "BsprofError", "BusyHost", "MeasurementFailed"]


class BsprofError(Exception):
    """Base class of bsprof's own errors."""

    exit_code = 1


class BadInput(BsprofError):
    """Bad user input: a missing file, an unknown workload, an invalid option value."""

    exit_code = 2


class MeasurementFailed(BsprofError):
    """The measurement could not be made (every trial errored, the device vanished...)."""

    exit_code = 1


class BusyHost(BsprofError):
    """Results measured on a busy host (other processes took the cores or the GPU): not judged."""

    exit_code = 3
