"""The benchmark suite's plugin: ``--bsprof-*`` options, the ``bsprof`` session fixture and the batch-size
parametrization (see :mod:`bsprof.pytest_plugin`). Registered here only, so ``pytest tests/`` never loads it.

Run from the repository root: ``python -m pytest benchmarks/ --benchmark-only``.
"""

pytest_plugins = ["bsprof.pytest_plugin"]
