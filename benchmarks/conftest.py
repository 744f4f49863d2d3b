"""The benchmark suite's plugin: ``--bsprof-*`` options, the ``bsprof`` session fixture and the batch-size
parametrization (see :mod:`bsprof.pytest_plugin`). Registered here only, so ``pytest tests/`` never loads it.

Run from the repository root: ``python -m pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest_plugins = ["bsprof.pytest_plugin"]


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """torch on one thread for the test, restored afterwards: on a small shared host, OpenMP workers that spin
    while another process holds a core swing step times by far more than the few percent compared here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(before)
