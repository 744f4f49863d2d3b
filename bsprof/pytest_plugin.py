"""The pytest door onto the trial engine: options, hooks and fixtures of the ``benchmarks/`` suite.

``benchmarks/conftest.py`` registers this module with ``pytest_plugins``; it is *not* a global ``pytest11``
entry point, so ``pytest tests/`` and other projects never load it. It only parses, calls the engine and
records: the benchmark files time the engine's one :class:`~bsprof.engine.step.TrainingStep` through
``benchmark.pedantic`` (pytest-benchmark's timer) and run the engine's convergence trials.

Options (command line, else environment variable, else default):

=========================== ======================== ===================================================
option                      environment variable     default
=========================== ======================== ===================================================
``--bsprof-workload``       ``BSPROF_WORKLOAD``      ``digits-mlp`` (or ``module:factory``, ``file.py:factory``)
``--bsprof-batch-sizes``    ``BSPROF_BATCH_SIZES``   ``8..1024`` (as ``bsprof sweep --batch-sizes``)
``--bsprof-device``         ``BSPROF_DEVICE``        ``auto`` (``cpu``, ``cuda``, ``cuda:N``)
``--bsprof-seeds``          ``BSPROF_SEEDS``         ``3`` (convergence rounds: one per seed)
``--bsprof-target``         ``BSPROF_TARGET``        the workload's target
``--bsprof-store``          ``BSPROF_STORE``         none (also write every trial into this bsprof store)
``--bsprof-min-time``       ``BSPROF_MIN_TIME``      ``1.0`` (timed seconds per throughput benchmark, at least)
``--bsprof-min-rounds``     ``BSPROF_MIN_ROUNDS``    ``20`` (timed rounds, one training step each, at least)
``--bsprof-warmup-rounds``  ``BSPROF_WARMUP_ROUNDS`` ``10`` (untimed steps first)
``--bsprof-max-time``       ``BSPROF_MAX_TIME``      ``120`` (training seconds per convergence trial)
``--bsprof-threads``        ``BSPROF_THREADS``       ``auto``: 1 on the CPU, torch's choice on a GPU
=========================== ======================== ===================================================

They are parsed by :func:`bsprof.options.parse_suite_options`; bad values are one :class:`pytest.UsageError`
naming the option. Run state lives in a :class:`~bsprof.pytest_session.BsprofSession` on ``config.stash`` (no
module globals). The suite refuses to run under pytest-xdist (parallel benchmarks measure each other), and a
``cuda`` device on a host without CUDA skips every case with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bsprof.errors import BadInput
from bsprof.options import SUITE_OPTIONS, parse_suite_options
from bsprof.pytest_session import BsprofSession

__all__ = [
    "bsprof",
    "pytest_addoption",
    "pytest_configure",
    "pytest_generate_tests",
    "pytest_unconfigure",
]

_KEY = pytest.StashKey["BsprofSession"]()


# --- hooks ------------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bsprof", "bsprof benchmark suite (each option also from its environment variable)")
    for suffix, (var, default, text) in SUITE_OPTIONS.items():
        shown = f"default: {default}" if default is not None else "no default"
        group.addoption(f"--bsprof-{suffix}", default=None, help=f"{text} [env {var}; {shown}]")


def _under_xdist(config: pytest.Config) -> bool:
    if hasattr(config, "workerinput"):
        return True
    dist = getattr(config.option, "dist", "no")
    return bool(dist and dist != "no") or bool(getattr(config.option, "numprocesses", None))


def pytest_configure(config: pytest.Config) -> None:
    if _under_xdist(config):
        raise pytest.UsageError(
            "bsprof benchmarks must not run under pytest-xdist: parallel workers share the device and measure "
            "each other (drop -n / --dist)"
        )
    try:
        options = parse_suite_options(lambda suffix: config.getoption(f"--bsprof-{suffix}"))
        session = BsprofSession.start(options)
    except BadInput as e:
        raise pytest.UsageError(f"bsprof: {e}") from None
    config.stash[_KEY] = session


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_KEY, None)
    if session is not None:
        session.close()
        del config.stash[_KEY]


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Record what ``bsprof compare`` checks before comparing two results: torch/CUDA versions, threads and
    the configuration hash (``machine_info["bsprof"]``)."""
    session = config.stash.get(_KEY, None)
    if session is None or session.device is None:
        return
    import torch

    from bsprof.store import config_hash

    machine_info["bsprof"] = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "threads": session.torch_threads,
        "config_hash": config_hash(session._run_config()),
    }


def pytest_report_header(config: pytest.Config) -> str | None:
    session = config.stash.get(_KEY, None)
    if session is None:
        return None
    o = session.options
    where = session.device if session.device is not None else f"skipped ({session.skip_reason})"
    return (
        f"bsprof: workload {session.workload.name}, batch sizes {','.join(map(str, o.batch_sizes))}, device {where}, "
        f"seeds {o.seeds}, min time {o.min_time_s:g} s, torch threads {session.torch_threads or 'default'}"
        + (f", store {o.store}" if o.store else "")
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``throughput_batch_size`` (ids ``<workload>-B<b>``) and ``convergence_batch_size``
    (ids ``<workload>-B<b>-convergence``) over the suite's batch sizes."""
    for arg, suffix in (("throughput_batch_size", ""), ("convergence_batch_size", "-convergence")):
        if arg in metafunc.fixturenames:
            session = metafunc.config.stash[_KEY]
            sizes = session.options.batch_sizes
            metafunc.parametrize(arg, sizes, ids=[f"{session.workload.name}-B{b}{suffix}" for b in sizes])


@pytest.fixture
def bsprof(request: pytest.FixtureRequest) -> Iterator[BsprofSession]:
    """The suite's :class:`BsprofSession`, with torch's thread count set for the test (and restored after)."""
    session = request.config.stash[_KEY]
    with session.thread_count():
        session.prime()
        yield session
