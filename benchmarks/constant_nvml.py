"""A constant fake NVML for the benchmarks, importable by name (``"constant_nvml:constant_nvml"``) so that
the monitor's sampler process can rebuild it (pytest puts ``benchmarks/`` on ``sys.path``)."""

from __future__ import annotations

from types import SimpleNamespace


class ConstantNvml:
    """Just enough of pynvml for :class:`~bsprof.engine.nvml.NvmlGpu`: constant readings, a growing energy
    counter."""

    def __init__(self) -> None:
        self.energy_mj = 0

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        return [0, 0]  # [current, pending]: an Ampere-or-newer GPU with MIG off (pre-Ampere raise NOT_SUPPORTED)

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "fake"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=90, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=1 << 30, total=16 << 30)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 250_000

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        return 1410

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 60

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return 0

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        self.energy_mj += 12_500
        return self.energy_mj


def constant_nvml() -> ConstantNvml:
    return ConstantNvml()
