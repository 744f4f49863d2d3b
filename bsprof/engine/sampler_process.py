"""The sampler process: polls a training process's host readings and its own GPU sampler, so that the
training loop pays nothing per poll.

One child process (multiprocessing ``spawn``: no fork of a process with torch's threads) serves the windows
of a :class:`~bsprof.engine.monitors.Monitor` one at a time over a pipe: ``("start", t0, period_s, spec)``
-> ``("started",)``; ``("stop",)`` -> ``("rows", rows, gpu_reason, field_reasons, errors)``; ``("exit",)``
or a closed pipe ends it. The child rebuilds the GPU sampler from a :data:`ChildSpec` (a factory named by
string, since samplers holding library handles do not pickle).

The child is started without re-running the parent's ``__main__`` (:func:`_start_without_main`), by a
temporary patch of :mod:`multiprocessing.spawn` that is not thread-safe: start sampler processes from one
thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from bsprof.engine.samplers import GpuSampler, HostSampler, NullGpu, poll

__all__ = ["ChildSpec", "SamplerProcess", "SamplerUnavailable", "child_spec", "resolve_factory"]


ChildSpec = tuple[str, dict[str, Any]]
"""``("package.module:factory", kwargs)``: how a sampler process rebuilds a GPU sampler (the factory
returns a :class:`GpuSampler`; the kwargs must pickle)."""


def child_spec(gpu: GpuSampler) -> ChildSpec | None:
    """How to rebuild ``gpu`` in a sampler process, or ``None`` when it cannot be (then threads poll it).

    A :class:`NullGpu` needs nothing rebuilt; another sampler says how through a ``child_spec()`` method
    returning a :data:`ChildSpec` (or ``None``).
    """
    if gpu.reason is not None:
        return ("", {})
    method = getattr(gpu, "child_spec", None)
    return method() if callable(method) else None


def resolve_factory(target: str) -> Any:
    """The object a ``"package.module:attr.path"`` string names (a :data:`ChildSpec` factory, or an NVML
    library factory of :func:`bsprof.engine.nvml.open_nvml_gpu`).

    Raises:
        ImportError: The module does not import.
        AttributeError: The module has no such attribute.
    """
    import importlib

    module, _, name = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class SamplerUnavailable(RuntimeError):
    """The sampler process could not start, died, or did not answer."""


def _sampler_main(conn: Any, parent_pid: int) -> None:
    """The sampler process: waits for a window, polls the parent's host readings and its own GPU sampler
    at the window's rate until told to stop, then sends the rows back. Exits when the parent goes.

    Ctrl-C is the parent's to handle: the child ignores SIGINT (the terminal sends it to the whole process
    group), so it neither prints a ``KeyboardInterrupt`` traceback nor dies under the parent; the parent
    ends it (``exit`` message, closed pipe, or as a daemon when the parent exits). The child starts with SIGINT
    blocked (:func:`_sigint_held`): ignoring it first discards one that arrived meanwhile, then it is unblocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    host = HostSampler(pid=parent_pid)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "start":
            return
        _, t0, period_s, spec = msg
        gpu: Any = NullGpu(None)
        gpu_reason: str | None = None
        try:
            gpu = resolve_factory(spec[0])(**spec[1]) if spec[0] else NullGpu("no GPU")
            gpu_reason = gpu.reason
        except Exception as e:  # noqa: BLE001 - reported back, the window still samples the host
            gpu, gpu_reason = NullGpu(None), f"sampler process could not open the GPU sampler: {type(e).__name__}: {e}"
        errors: dict[str, str] = {}
        take = functools.partial(poll, host, None if gpu_reason else gpu, t0, errors)
        host.reset()
        rows = [take()]
        try:
            conn.send(("started",))
            next_at = time.perf_counter() + period_s
            while not conn.poll(max(0.0, next_at - time.perf_counter())):
                rows.append(take())
                next_at = max(next_at + period_s, time.perf_counter())
            stop = conn.recv()
        except (EOFError, OSError):
            return
        finally:
            close = getattr(gpu, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        if stop[0] != "stop":
            return
        rows.append(take())
        field_reasons = dict(getattr(gpu, "field_reasons", None) or {})
        try:
            conn.send(("rows", rows, gpu_reason, field_reasons, errors))
        except (EOFError, OSError):
            return


def _start_without_main(proc: Any) -> None:
    """Start a spawned process without re-running the parent's ``__main__`` in it.

    The sampler needs nothing from ``__main__`` (its code lives here), and a user's script without an
    ``if __name__ == "__main__":`` guard would otherwise run again in the child, sweep and all.

    How: :mod:`multiprocessing.spawn` has no option for this, so the function that builds the child's
    preparation data (``multiprocessing.spawn.get_preparation_data``) is swapped, for the duration of
    ``proc.start()``, for one that drops the ``init_main_from_*`` entries. This patches a module global:
    it is NOT thread-safe. Another thread spawning a process at the same moment would also skip its
    ``__main__``; start sampler processes from one thread (the engine does, from the sweep's thread).
    """
    import multiprocessing.spawn as mp_spawn

    original = mp_spawn.get_preparation_data

    def preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    mp_spawn.get_preparation_data = preparation_data  # type: ignore[assignment]
    try:
        proc.start()
    finally:
        mp_spawn.get_preparation_data = original  # type: ignore[assignment]


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT blocked in this thread while a child is started: the child inherits the block and ignores SIGINT
    before it unblocks it (:func:`_sampler_main`), and a Ctrl-C pressed meanwhile stays pending here and
    reaches this process when the block ends (ignoring SIGINT instead would lose it). A no-op where
    ``signal.pthread_sigmask`` does not exist (Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class SamplerProcess:
    """A sampler process (multiprocessing ``spawn``: no fork of a process with torch's threads), started on
    first use and reused by every window until :meth:`close`.

    Share one across the trials of a sweep (``EngineSettings.sampler_process``) so that the child's start
    (0.1-0.5 s) is paid once. It is a daemon: it dies with this process, and exits by itself when the
    pipe to this process closes.

    Args:
        start_timeout_s: Seconds to wait for the child to start and answer the first window.
        reply_timeout_s: Seconds to wait for the rows when a window closes.
    """

    def __init__(self, *, start_timeout_s: float = 60.0, reply_timeout_s: float = 30.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._proc: Any = None
        self._conn: Any = None
        self._open = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _ensure(self) -> None:
        if self.alive:
            return
        self._discard()
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_sampler_main, args=(child, os.getpid()), name="bsprof-sampler", daemon=True)
        try:
            with _sigint_held():  # inherited by the child from its first instruction (see _sampler_main)
                _start_without_main(proc)
        finally:  # also when a Ctrl-C held during the start arrives here: close() then ends the child
            child.close()
            if proc.pid is not None:
                self._proc, self._conn = proc, parent

    def _wait(self, timeout_s: float) -> Any:
        try:
            if not self._conn.poll(timeout_s):
                raise SamplerUnavailable(f"the sampler process did not answer within {timeout_s:g} s")
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise SamplerUnavailable(self._death()) from e

    def _death(self) -> str:
        if self._proc is not None:
            self._proc.join(timeout=1.0)
        code = self._proc.exitcode if self._proc is not None else None
        return f"the sampler process died (exit code {code})"

    def start_window(self, t0: float, period_s: float, spec: ChildSpec) -> None:
        """Start polling (after the first poll has been taken)."""
        if self._open:
            raise RuntimeError("a sampler process serves one window at a time")
        try:
            self._ensure()
            self._conn.send(("start", t0, period_s, spec))
            reply = self._wait(self.start_timeout_s)
        except (SamplerUnavailable, OSError) as e:
            self._discard()
            raise SamplerUnavailable(str(e)) from e
        if reply[0] != "started":
            self._discard()
            raise SamplerUnavailable(f"unexpected answer from the sampler process: {reply[0]!r}")
        self._open = True

    def stop_window(self) -> tuple[list[dict[str, float | None]], str | None, dict[str, str], dict[str, str]]:
        """Stop polling; (rows, GPU reason, GPU field reasons, sampler errors) of the window."""
        if not self._open:
            raise RuntimeError("no window is open")
        self._open = False
        try:
            self._conn.send(("stop",))
            reply = self._wait(self.reply_timeout_s)
        except (SamplerUnavailable, OSError) as e:
            message = str(e) if isinstance(e, SamplerUnavailable) else self._death()
            self._discard()
            raise SamplerUnavailable(message) from e
        _, rows, gpu_reason, field_reasons, errors = reply
        return rows, gpu_reason, field_reasons, errors

    def _discard(self) -> None:
        self._open = False
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=1.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=1.0)
        self._proc = self._conn = None

    def close(self) -> None:
        """End the child (it exits when its pipe closes)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("exit",))
        self._discard()

    def __enter__(self) -> SamplerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
