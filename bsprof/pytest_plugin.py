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

Bad values are one :class:`pytest.UsageError` naming the option. Run state lives in a
:class:`~bsprof.pytest_session.BsprofSession` on ``config.stash`` (no module globals). The suite refuses to
run under pytest-xdist (parallel benchmarks measure each other), and a ``cuda`` device on a host without CUDA
skips every case with the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bsprof.errors import BadInput
from bsprof.pytest_session import BsprofSession

__all__ = [
    "OPTIONS",
    "BsprofOptions",
    "bsprof",
    "parse_options",
    "pytest_addoption",
    "pytest_configure",
    "pytest_generate_tests",
    "pytest_unconfigure",
]

OPTIONS: dict[str, tuple[str, str | None, str]] = {
    # option suffix: (environment variable, default, help)
    "workload": ("BSPROF_WORKLOAD", "digits-mlp", "built-in name, package.module:factory or file.py:factory"),
    "batch-sizes": ("BSPROF_BATCH_SIZES", "8..1024", "8,16,32 or 8..1024 (powers of two), or a mix"),
    "device": ("BSPROF_DEVICE", "auto", "auto, cpu, cuda or cuda:N (cuda without CUDA: skipped)"),
    "seeds": ("BSPROF_SEEDS", "3", "seeds per convergence benchmark (one round each)"),
    "target": ("BSPROF_TARGET", None, "validation metric to reach (default: the workload's)"),
    "store": ("BSPROF_STORE", None, "also write every trial into this bsprof SQLite store (a new run per session)"),
    "min-time": ("BSPROF_MIN_TIME", "1.0", "timed seconds per throughput benchmark, at least (sizes the rounds)"),
    "min-rounds": (
        "BSPROF_MIN_ROUNDS",
        "20",
        "timed rounds (one training step each) per throughput benchmark, at least",
    ),
    "warmup-rounds": ("BSPROF_WARMUP_ROUNDS", "10", "untimed training steps before the timed rounds"),
    "max-time": ("BSPROF_MAX_TIME", "120", "training seconds per convergence trial, at most"),
    "threads": ("BSPROF_THREADS", "auto", "torch CPU intra-op threads; auto: 1 on the CPU, torch's choice on a GPU"),
}
"""``--bsprof-<suffix>``: (environment variable, default, help)."""

_KEY = pytest.StashKey["BsprofSession"]()


@dataclass(frozen=True)
class BsprofOptions:
    """The suite's settings, validated.

    Attributes:
        workload_ref: How the workload is named.
        batch_sizes: Batch sizes, ascending (samples).
        device_spec: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seeds: Convergence seeds 0 .. seeds-1 (one benchmark round each).
        target: Target metric, or ``None`` for the workload's.
        store: bsprof store to write the trials into, or ``None``.
        min_time_s: Timed seconds of a throughput benchmark, at least: the rounds are sized from the engine
            timer's estimate of a step (:class:`~bsprof.pytest_session.PedanticTimer`).
        min_rounds: Timed rounds of a throughput benchmark (one training step each), at least.
        warmup_rounds: Untimed steps before them.
        max_time_s: Training seconds per convergence trial, at most.
        threads: torch CPU intra-op threads; ``None`` (``auto``): 1 when the trials run on the CPU (steady
            figures on a shared host, where an OpenMP worker waiting for a busy core stalls small steps by
            tens of milliseconds), torch's choice on a GPU.
    """

    workload_ref: str = "digits-mlp"
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    device_spec: str = "auto"
    seeds: int = 3
    target: float | None = None
    store: Path | None = None
    min_time_s: float = 1.0
    min_rounds: int = 20
    warmup_rounds: int = 10
    max_time_s: float = 120.0
    threads: int | None = None


def _int(name: str, text: str, *, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise BadInput(f"--bsprof-{name} {text!r}: not an integer") from None
    if value < minimum:
        raise BadInput(f"--bsprof-{name} {text!r}: must be >= {minimum}")
    return value


def _float(name: str, text: str, *, lowest: float | None = None, positive: bool = False) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise BadInput(f"--bsprof-{name} {text!r}: not a number") from None
    if not math.isfinite(value):
        raise BadInput(f"--bsprof-{name} {text!r}: must be a finite number")
    if positive and value <= 0:
        raise BadInput(f"--bsprof-{name} {text!r}: must be a finite number > 0")
    if lowest is not None and value < lowest:
        raise BadInput(f"--bsprof-{name} {text!r}: must be >= {lowest:g}")
    return value


def parse_options(get: Callable[[str], str | None], environ: Mapping[str, str] | None = None) -> BsprofOptions:
    """Resolve every option: ``get(suffix)`` (the command line), else the environment variable, else the default.

    Args:
        get: The command-line value of ``--bsprof-<suffix>``, or ``None`` when not given.
        environ: The environment (default: ``os.environ``); empty variables count as unset.

    Raises:
        BadInput: A value that does not parse (the message names the option).
    """
    from bsprof.cli import parse_batch_sizes

    env = os.environ if environ is None else environ
    raw: dict[str, str | None] = {}
    for suffix, (var, default, _help) in OPTIONS.items():
        value = get(suffix)
        raw[suffix] = value if value is not None else (env.get(var) or default)
    workload_ref = (raw["workload"] or "").strip()
    if not workload_ref:
        raise BadInput("--bsprof-workload: empty")
    try:
        sizes = parse_batch_sizes(raw["batch-sizes"] or "")
    except BadInput as e:
        raise BadInput(str(e).replace("--batch-sizes", "--bsprof-batch-sizes")) from None
    device = (raw["device"] or "").strip().lower()
    if not (device in ("auto", "cpu", "mps", "cuda") or device.startswith("cuda:")):
        raise BadInput(f"--bsprof-device {raw['device']!r}: expected auto, cpu, cuda or cuda:N")
    store = raw["store"]
    threads = (raw["threads"] or "auto").strip().lower()
    return BsprofOptions(
        workload_ref=workload_ref,
        batch_sizes=sizes,
        device_spec=device,
        seeds=_int("seeds", raw["seeds"] or "", minimum=1),
        target=_float("target", raw["target"]) if raw["target"] else None,
        store=Path(store) if store else None,
        min_time_s=_float("min-time", raw["min-time"] or "", lowest=0.0),
        min_rounds=_int("min-rounds", raw["min-rounds"] or "", minimum=1),
        warmup_rounds=_int("warmup-rounds", raw["warmup-rounds"] or "", minimum=0),
        max_time_s=_float("max-time", raw["max-time"] or "", positive=True),
        threads=None if threads == "auto" else _int("threads", threads, minimum=1),
    )


# --- hooks ------------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bsprof", "bsprof benchmark suite (each option also from its environment variable)")
    for suffix, (var, default, text) in OPTIONS.items():
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
        options = parse_options(lambda suffix: config.getoption(f"--bsprof-{suffix}"))
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
