"""The monitor: named measurement windows around a trial (in the manner of Zeus's measurement windows).

A :class:`Monitor` polls its samplers (:mod:`bsprof.engine.samplers`) at ``hz`` while a
:meth:`Monitor.window` is open, from a sampler process (:mod:`bsprof.engine.sampler_process`) or a daemon
thread, and on exit reduces the series into a :class:`~bsprof.engine.telemetry.Telemetry`
(:mod:`bsprof.engine.telemetry`). What a sampler cannot measure stays ``None`` in the telemetry, with a
reason in :attr:`Telemetry.reasons`: missing is never zero.

The names this package's callers import from here (``Telemetry``, ``NullGpu``, ``SamplerProcess`` ...) are
re-exported from the modules that define them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from bsprof.engine.sampler_process import ChildSpec, SamplerProcess, SamplerUnavailable, child_spec
from bsprof.engine.samplers import GpuSampler, HostSampler, NullGpu, poll
from bsprof.engine.telemetry import (
    GPU_FIELDS,
    GPU_SAMPLE_KEYS,
    Telemetry,
    downsample_rows,
    measured_gpu_metrics,
    reduce_gpu,
)

__all__ = [
    "GPU_FIELDS",
    "MODES",
    "ChildSpec",
    "GpuSampler",
    "HostSampler",
    "Monitor",
    "NullGpu",
    "SamplerProcess",
    "SamplerUnavailable",
    "Telemetry",
    "Window",
    "WindowOpen",
    "child_spec",
    "downsample_rows",
    "measured_gpu_metrics",
    "reduce_gpu",
]

log = logging.getLogger(__name__)

MODES = ("auto", "process", "thread")
"""How a :class:`Monitor` polls: in a sampler process, in a thread, or ``auto`` (a process whenever the GPU
sampler can be rebuilt in one, see :func:`~bsprof.engine.sampler_process.child_spec`)."""


class WindowOpen(RuntimeError):
    """A window's telemetry was read before the window closed."""


class Window:
    """The handle a :meth:`Monitor.window` yields: its :attr:`telemetry` exists once the ``with`` block ends.

    Example::

        with monitor.window() as window:
            train()
        window.telemetry.duration_s
    """

    def __init__(self) -> None:
        self._telemetry: Telemetry | None = None

    @property
    def closed(self) -> bool:
        """Whether the window has closed and :attr:`telemetry` can be read."""
        return self._telemetry is not None

    @property
    def telemetry(self) -> Telemetry:
        """The window's reduced readings.

        Raises:
            WindowOpen: The ``with`` block has not ended yet.
        """
        if self._telemetry is None:
            raise WindowOpen("a monitor window's telemetry is read after its `with` block has ended")
        return self._telemetry

    def _close(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    def __repr__(self) -> str:
        return f"Window({self._telemetry!r})" if self._telemetry is not None else "Window(open)"


class Monitor:
    """Polls a host sampler and a GPU sampler at ``hz`` while a window is open.

    By default the polls run in a separate sampler process (:class:`SamplerProcess`), which reads this
    process's RSS and CPU through psutil and opens its own GPU sampler (rebuilt from the sampler's
    :func:`child_spec`): the training loop then pays nothing per poll. Polling from a thread instead costs
    the training loop a hand-over of Python's GIL per poll (README, "Telemetry"); that is the fallback for
    samplers that cannot be rebuilt in another process (e.g. tests' in-memory fakes). If the sampler process
    fails, the window still ends: GPU fields are empty with the reason, and the host readings come from the
    window's first and last polls here.

    When there is no GPU to read, the host alone is polled at ``host_only_hz`` (default 2 Hz): the peak RSS
    does not depend on polling where the kernel keeps a high-water mark (Linux ``VmHWM``, reset when a
    window opens).

    Args:
        gpu: The GPU sampler (a :class:`NullGpu` with its reason where there is none).
        hz: Polls per second while a GPU is read.
        host_only_hz: Polls per second when no GPU is read (at most ``hz``).
        mode: ``auto`` (a process when :func:`child_spec` can rebuild ``gpu``, else a thread), ``process``
            or ``thread``.
        process: The sampler process to use (shared, not closed by this monitor); ``None`` starts one on
            the first window and closes it in :meth:`close`.
    """

    def __init__(
        self,
        gpu: GpuSampler | None = None,
        *,
        hz: float = 20.0,
        host_only_hz: float = 2.0,
        mode: str = "auto",
        process: SamplerProcess | None = None,
    ) -> None:
        if hz <= 0 or host_only_hz <= 0:
            raise ValueError("hz and host_only_hz must be > 0")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.gpu: GpuSampler = gpu if gpu is not None else NullGpu()
        self.hz = hz if self.gpu.reason is None else min(hz, host_only_hz)
        self.host = HostSampler()
        self._gpu_errors: dict[str, str] = {}
        self._spec = child_spec(self.gpu) if mode != "thread" else None
        if mode == "process" and self._spec is None:
            raise ValueError(f"{type(self.gpu).__name__} cannot be rebuilt in a sampler process (no child_spec)")
        self.mode = "process" if self._spec is not None else "thread"
        self._process = process
        self._owns_process = process is None

    @property
    def process(self) -> SamplerProcess | None:
        """The sampler process serving this monitor's windows (``None`` in thread mode or before the first
        window of a monitor that starts its own)."""
        return self._process

    def close(self) -> None:
        """Stop this monitor's own sampler process (a shared one is left to its owner)."""
        if self._owns_process and self._process is not None:
            self._process.close()
            self._process = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _poll(self, t0: float) -> dict[str, float | None]:
        return poll(self.host, self.gpu if self.gpu.reason is None else None, t0, self._gpu_errors)

    @contextlib.contextmanager
    def window(self) -> Iterator[Window]:
        """Sample while the ``with`` body runs; the yielded :class:`Window` holds the :class:`Telemetry`
        (``window.telemetry``) once the block has closed.

        The sampling stops and the result is computed even when the body raises.
        """
        if self.mode == "process":
            with self._process_window() as out:
                yield out
            return
        out = Window()
        rows: list[dict[str, float | None]] = []
        self._gpu_errors = {}
        stop = threading.Event()
        t0 = time.perf_counter()
        baseline = self.host.rss_bytes()
        exact_peak = self.host.reset_peak_rss()
        rows.append(self._poll(t0))

        def run() -> None:
            while not stop.wait(1.0 / self.hz):
                rows.append(self._poll(t0))

        thread = threading.Thread(target=run, name="bsprof-monitor", daemon=True)
        thread.start()
        try:
            yield out
        finally:
            stop.set()
            thread.join()
            rows.append(self._poll(t0))
            peak = self.host.peak_rss_bytes() if exact_peak else None
            reasons = dict(getattr(self.gpu, "field_reasons", None) or {})
            duration = time.perf_counter() - t0
            out._close(self._reduce(rows, baseline, duration, peak, gpu_reason=self.gpu.reason, field_reasons=reasons))

    @contextlib.contextmanager
    def _process_window(self) -> Iterator[Window]:
        assert self._spec is not None
        out = Window()
        if self._process is None:
            self._process = SamplerProcess()
        t0 = time.perf_counter()
        baseline = self.host.rss_bytes()
        exact_peak = self.host.reset_peak_rss()
        self.host.reset()
        first = self._host_row(t0)
        failure: str | None = None
        try:
            self._process.start_window(t0, 1.0 / self.hz, self._spec)
        except SamplerUnavailable as e:
            failure = str(e)
            log.warning("telemetry sampler process unavailable: %s", e)
        try:
            yield out
        finally:
            result = None
            if failure is None:
                try:
                    result = self._process.stop_window()
                except SamplerUnavailable as e:
                    failure = str(e)
                    log.warning("telemetry sampler process failed: %s", e)
            duration = time.perf_counter() - t0
            peak = self.host.peak_rss_bytes() if exact_peak else None
            if result is not None:
                rows, gpu_reason, field_reasons, errors = result
                if self.gpu.reason is not None:
                    gpu_reason = self.gpu.reason
            else:
                rows = [first, self._host_row(t0)]
                gpu_reason = self.gpu.reason or f"sampler process failed: {failure}"
                field_reasons, errors = {}, {}
            self._gpu_errors = errors
            out._close(self._reduce(rows, baseline, duration, peak, gpu_reason=gpu_reason, field_reasons=field_reasons))

    def _host_row(self, t0: float) -> dict[str, float | None]:
        return poll(self.host, None, t0, self._gpu_errors)

    def _reduce(
        self,
        rows: list[dict[str, float | None]],
        baseline: int,
        duration_s: float,
        exact_peak: int | None,
        *,
        gpu_reason: str | None,
        field_reasons: dict[str, str],
    ) -> Telemetry:
        """The window's :class:`Telemetry` from its polls (``exact_peak``: the kernel's RSS high-water mark,
        bytes, where it could be reset at the window's start)."""
        rss = [int(r["rss_bytes"]) for r in rows if r.get("rss_bytes") is not None]  # type: ignore[arg-type]
        cpu = [float(r["cpu_pct"]) for r in rows[1:] if r.get("cpu_pct") is not None]  # type: ignore[arg-type]
        if "gpu" in self._gpu_errors:
            field_reasons = {k: self._gpu_errors["gpu"] for k in GPU_SAMPLE_KEYS} | field_reasons
        gpu, reasons = reduce_gpu(rows, reason=gpu_reason, field_reasons=field_reasons)
        return Telemetry(
            duration_s=duration_s,
            samples=len(rows),
            rss_baseline_bytes=baseline,
            rss_peak_bytes=max([*rss, baseline] + ([exact_peak] if exact_peak is not None else [])),
            rss_peak_source="VmHWM" if exact_peak is not None else "sampled",
            cpu_pct_mean=sum(cpu) / len(cpu) if cpu else None,
            gpu=gpu,
            reasons=reasons,
            series=tuple(rows),
            gpu_reason=gpu_reason,
            gpu_field_reasons=field_reasons,
        )
