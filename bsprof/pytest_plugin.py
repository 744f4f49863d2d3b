"""The pytest door onto the trial engine: options, session state and fixtures of the ``benchmarks/`` suite.

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

Bad values are one :class:`pytest.UsageError` naming the option. Run state lives in a :class:`BsprofSession`
on ``config.stash`` (no module globals). The suite refuses to run under pytest-xdist (parallel benchmarks
measure each other), and a ``cuda`` device on a host without CUDA skips every case with the reason.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from bsprof.errors import BadInput

if TYPE_CHECKING:
    import torch

    from bsprof.engine.convergence import ConvergenceSettings
    from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
    from bsprof.store import Store
    from bsprof.workload import Workload

__all__ = [
    "MAX_ROUNDS",
    "OPTIONS",
    "PROBE_S",
    "BsprofOptions",
    "BsprofSession",
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

PROBE_S = 0.1
"""Seconds of blocks the engine's timer runs to estimate a step before the rounds are sized."""

MAX_ROUNDS = 20_000
"""Most timed rounds per throughput benchmark (keeps the JSON small: pytest-benchmark stores every round)."""


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
            timer's estimate of a step (:meth:`BsprofSession.size_rounds`).
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


@dataclass
class BsprofSession:
    """The suite's state for one pytest session (on ``config.stash``, like pytest-benchmark's session).

    Attributes:
        options: The validated options.
        workload: The loaded workload.
        device: The trials' device, or ``None`` when it is not available here (see ``skip_reason``).
        skip_reason: Why every case is skipped (e.g. ``cuda`` asked for on a host without CUDA).
        oom_floor: Smallest batch size that ran out of memory; larger ones are skipped without trying.
        run_id: The store run of this session, opened at its first trial.
    """

    options: BsprofOptions
    workload: Workload
    device: torch.device | None
    skip_reason: str | None = None
    oom_floor: int | None = None
    run_id: str | None = None
    _store: Store | None = field(default=None, repr=False)
    _primed: bool = field(default=False, repr=False)
    _sampler: Any = field(default=None, repr=False)

    @classmethod
    def start(cls, options: BsprofOptions) -> BsprofSession:
        """Load the workload and resolve the device.

        Raises:
            BadInput: Unknown workload, or a device that cannot exist here (``cuda:3`` on a 1-GPU host).
        """
        import torch

        from bsprof.engine.device import resolve_device
        from bsprof.workload import load_workload

        workload = load_workload(options.workload_ref)
        device, skip = None, None
        if options.device_spec.startswith("cuda") and not torch.cuda.is_available():
            skip = f"--bsprof-device {options.device_spec}: CUDA is not available on this host"
        else:
            device = resolve_device(options.device_spec)
        return cls(options, workload, device, skip)

    @property
    def torch_threads(self) -> int | None:
        """torch intra-op threads while a benchmark runs (``None``: left at torch's choice)."""
        if self.options.threads is not None:
            return self.options.threads
        return 1 if self.device is not None and self.device.type == "cpu" else None

    @contextlib.contextmanager
    def thread_count(self) -> Iterator[None]:
        """Set :attr:`torch_threads` for the ``with`` body and restore the previous count afterwards."""
        import torch

        threads, before = self.torch_threads, torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @property
    def settings(self) -> EngineSettings:
        """Engine settings of the trials (device; eager, full precision)."""
        from bsprof.engine.sampler_process import SamplerProcess
        from bsprof.engine.trial import EngineSettings

        if self.device is None:
            raise RuntimeError(self.skip_reason or "no device")
        if self._sampler is None:
            self._sampler = SamplerProcess()  # one telemetry sampler process for the session's trials
        return EngineSettings(device=self.device, sampler_process=self._sampler)

    @property
    def convergence(self) -> ConvergenceSettings:
        """Budgets and target of the convergence benchmarks (the engine's defaults otherwise)."""
        from bsprof.engine.convergence import ConvergenceSettings

        return ConvergenceSettings(target=self.options.target, max_time_s=self.options.max_time_s)

    @property
    def target(self) -> float | None:
        """The target metric of convergence benchmarks (``None``: the workload has none and none was given)."""
        return self.options.target if self.options.target is not None else self.workload.target

    def spec(self, kind: str, batch_size: int, seed: int = 0) -> TrialSpec:
        """The trial identity at ``batch_size``, with the linear LR rule's learning rate."""
        from bsprof.engine.lr import scaled_lr
        from bsprof.engine.trial import TrialSpec

        return TrialSpec(self.workload.name, kind, batch_size, seed, scaled_lr(self.workload, batch_size, "linear"))

    def check_runnable(self, batch_size: int) -> None:
        """Skip the calling test when the device is missing, or a smaller batch size already ran out of memory."""
        if self.skip_reason:
            pytest.skip(self.skip_reason)
        if self.oom_floor is not None and batch_size >= self.oom_floor:
            pytest.skip(f"not tried: batch size {self.oom_floor} already ran out of memory on {self.device}")

    def prime(self) -> None:
        """Once per session, a few untimed steps at the smallest batch size (as ``bsprof sweep`` does), so that
        one-time process costs (lazy initialisation, data loading, first allocations) do not land on the
        first benchmark's time and memory."""
        if self._primed or self.device is None:
            return
        from bsprof.engine.sweep import prime_process

        self._primed = True
        prime_process(self.workload, self.settings, self.options.batch_sizes[0])

    def size_rounds(self, step: Callable[[], object], *, batch_size: int, sync: Callable[[], None]) -> tuple[int, int]:
        """Warm ``step`` up and size the timed rounds: (rounds, steps run here).

        The engine's one timer (:func:`~bsprof.engine.timing.time_steps`) runs ``--bsprof-warmup-rounds``
        steps, then blocks for about :data:`PROBE_S` seconds; its median step time sizes the rounds so that
        they last ``--bsprof-min-time`` seconds: at least ``--bsprof-min-rounds``, at most :data:`MAX_ROUNDS`.
        Its timings only size the rounds: the figures come from pytest-benchmark's rounds.
        """
        from bsprof.engine.timing import TimingSettings, time_steps

        o = self.options
        probe = TimingSettings(
            warmup_steps=o.warmup_rounds, warmup_s=0.0, min_time_s=PROBE_S, min_steps=1, block_min_s=PROBE_S / 5,
            min_blocks=3,
        )  # fmt: skip
        times = time_steps(step, batch_size=batch_size, settings=probe, sync=sync)
        wanted = math.ceil(o.min_time_s / times.median_s) if times.median_s > 0 else o.min_rounds
        return max(o.min_rounds, min(MAX_ROUNDS, wanted)), times.warmup_steps + times.measured_steps

    def note_oom(self, batch_size: int) -> None:
        self.oom_floor = batch_size if self.oom_floor is None else min(self.oom_floor, batch_size)

    def record(self, result: TrialResult) -> None:
        """Write ``result`` into the store given by ``--bsprof-store`` (nothing without one).

        The session's run is opened at its first trial, always a new run (``fresh``): a benchmark session is
        a measurement at one point in time, and ``bsprof report`` shows the latest run per workload.
        """
        if self.options.store is None:
            return
        if self._store is None:
            from bsprof.environment import collect_environment
            from bsprof.store import Store

            self._store = Store(self.options.store, create=True)
            run = self._store.open_run(
                self.workload.name, self._run_config(), collect_environment(self.settings.device),
                fresh=True,
            )  # fmt: skip
            self.run_id = run.run_id
        assert self.run_id is not None
        self._store.add_trial(self.run_id, result)

    def _run_config(self) -> dict[str, Any]:
        o = self.options
        engine = self.settings.config()
        engine["timing"] = {"pytest_benchmark": [o.min_time_s, o.min_rounds, o.warmup_rounds]}
        return {
            "source": "pytest-benchmark",
            "workload": self.workload.config(),
            "workload_ref": o.workload_ref,
            "kinds": ["convergence", "throughput"],
            "lr_rule": "linear",
            "tune_lr": 0,
            "convergence": self.convergence.config(),
            "engine": engine,
        }

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None


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
