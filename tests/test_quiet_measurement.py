"""Measurements outside the engine's trials on a busy host (:class:`HostWindow`, :func:`measure_on_quiet_host`),
as the benchmarks that assert a verdict use them: fake host counters and a fake clock, no wall-clock asserts."""

from __future__ import annotations

from collections.abc import Callable

from bsprof.engine.host_load import BUSY_ROUND_SHARE_MAX, HostWindow, measure_on_quiet_host


class FakeHost:
    """A 2-core host whose other processes use ``others[i]`` cores during round ``i`` (1 s each) while this
    process uses one core; the run queue counts them."""

    def __init__(self, others: list[float]) -> None:
        self.others = others
        self.t = 0.0
        self.busy_s = self.own_s = 0.0
        self.reads = 0

    def clock(self) -> float:
        return self.t

    def read(self) -> dict[str, float]:
        return {"sys_busy_s": self.busy_s, "sys_total_s": 2 * self.t, "sys_steal_s": 0.0,
                "procs_running": 1 + round(self.current()), "sampler_cpu_s": self.own_s}  # fmt: skip

    def current(self) -> float:
        return self.others[min(self.reads, len(self.others) - 1)]

    def round(self) -> None:
        """One 1-second round: this process on a core, others on ``current()`` cores."""
        self.t += 1.0
        self.own_s += 1.0
        self.busy_s += 1.0 + self.current()
        self.reads += 1

    def window(self) -> HostWindow:
        return HostWindow(threads=1, cpu_count=2, read=self.read, clock=self.clock)


def _rounds(host: FakeHost, n: int) -> Callable[[HostWindow], int]:
    def measure(w: HostWindow) -> int:
        for _ in range(n):
            host.round()
            w.mark()
        return host.reads

    return measure


def test_a_quiet_measurement_is_kept_at_once() -> None:
    host = FakeHost([0.2] * 10)
    m = measure_on_quiet_host(_rounds(host, 10), attempts=3, threads=1, window=host.window)
    assert (m.busy_reason, m.attempts, m.value) == (None, 1, 10)


def test_a_busy_window_is_measured_again_until_quiet() -> None:
    host = FakeHost([1.9] * 20 + [0.1] * 10)  # busy for the first two attempts of 10 rounds, then quiet
    m = measure_on_quiet_host(_rounds(host, 10), attempts=3, threads=1, window=host.window)
    assert m.busy_reason is None and m.attempts == 3 and len(m.busy_reasons) == 2
    assert "other processes used 1.9 of 2 cores" in m.busy_reasons[0]


def test_still_busy_after_every_attempt_says_why() -> None:
    host = FakeHost([1.9])
    m = measure_on_quiet_host(_rounds(host, 5), attempts=3, threads=1, window=host.window)
    assert m.attempts == 3 and m.busy_reason is not None and "1.9 of 2 cores" in m.busy_reason


def test_a_few_busy_rounds_pass_more_than_a_quarter_do_not() -> None:
    """A burst the whole-window mean dilutes is still caught by the rounds' share."""
    few = FakeHost([1.9] * 2 + [0.0] * 10)  # 2 of 12 rounds busy: the median over rounds survives them
    assert measure_on_quiet_host(_rounds(few, 12), attempts=1, threads=1, window=few.window).busy_reason is None
    n_busy = int(BUSY_ROUND_SHARE_MAX * 12) + 1
    many = FakeHost([1.9] * n_busy + [0.0] * (12 - n_busy))
    why = measure_on_quiet_host(_rounds(many, 12), attempts=1, threads=1, window=many.window).busy_reason
    assert why is not None and why.startswith(f"{n_busy} of 12 rounds on a busy host")


def test_unreadable_counters_judge_nothing() -> None:
    w = HostWindow(threads=1, cpu_count=2, read=lambda: None)
    w.mark()
    w.mark()
    assert w.rows == [] and w.busy_reason() is None


def test_two_spinners_sharing_two_cores_with_the_measurement_make_it_busy() -> None:
    """What a real saturated 2-core host shows: the scheduler shares the cores, so the two spinners get 1.33
    cores and the measurement 0.67 (below the 'other cores' bound), and /proc/stat's procs_running, read by the
    measurement itself, is 3. Session 3 saw the verdict benchmarks fail, not skip, on this host: the run queue
    left the reading process out as if it were a sampler beside the trial."""
    t = [0.0]

    def read() -> dict[str, float]:
        return {"sys_busy_s": 2.0 * t[0], "sys_total_s": 2.0 * t[0], "sys_steal_s": 0.0, "procs_running": 3,
                "sampler_cpu_s": 0.67 * t[0]}  # fmt: skip

    w = HostWindow(threads=1, cpu_count=2, read=read, clock=lambda: t[0])
    for _ in range(5):
        w.mark()
        t[0] += 1.0
    why = w.busy_reason()
    assert why is not None and "3.0 runnable tasks on 2 cores" in why


def test_one_spinner_beside_a_one_thread_measurement_is_not_busy() -> None:
    t = [0.0]

    def read() -> dict[str, float]:
        return {"sys_busy_s": 2.0 * t[0], "sys_total_s": 2.0 * t[0], "sys_steal_s": 0.0, "procs_running": 2,
                "sampler_cpu_s": 1.0 * t[0]}  # fmt: skip

    w = HostWindow(threads=1, cpu_count=2, read=read, clock=lambda: t[0])
    for _ in range(5):
        w.mark()
        t[0] += 1.0
    assert w.busy_reason() is None
