"""The NVML sampler against a fake NVML: units, energy counter deltas and wrap-around, unsupported fields,
errors mid-run, CUDA_VISIBLE_DEVICES mapping, and the null sampler when NVML is missing."""

from __future__ import annotations

import sys

import pytest
import torch
from fake_nvml import (
    GPU_IS_LOST,
    LIBRARY_NOT_FOUND,
    NO_PERMISSION,
    NOT_SUPPORTED,
    FakeDevice,
    FakeNvml,
    fake_gpus,
    uuid,
)

from bsprof.engine.nvml import (
    ENERGY_COUNTER_MODULUS_MJ,
    NvmlError,
    NvmlGpu,
    NvmlGpuLost,
    NvmlLibraryNotFound,
    NvmlNoPermission,
    NvmlNotFound,
    NvmlNotSupported,
    gpu_telemetry_reason,
    nvml_error,
    open_nvml_gpu,
    parse_visible_devices,
    resolve_handle,
    throttle_reason_names,
)
from bsprof.engine.samplers import NullGpu


def open_fake(fake: FakeNvml, index: int = 0, visible: str | None = None) -> NvmlGpu:
    gpu = open_nvml_gpu(index, nvml=fake, visible_devices=visible)
    assert isinstance(gpu, NvmlGpu), gpu.reason
    return gpu


def test_sample_converts_vendor_units_once() -> None:
    fake = fake_gpus(
        gpu_util=87, mem_util=33, mem_used_bytes=5 << 30, power_mw=312_500, sm_clock_mhz=1410, temperature_c=71
    )
    row = open_fake(fake).sample()
    assert row["gpu_util_pct"] == 87.0
    assert row["mem_util_pct"] == 33.0
    assert row["mem_used_bytes"] == float(5 << 30)
    assert row["power_w"] == pytest.approx(312.5)  # mW -> W
    assert row["sm_clock_hz"] == pytest.approx(1.41e9)  # MHz -> Hz
    assert row["temperature_c"] == 71.0
    assert row["throttle_reasons"] == 0.0
    assert row["energy_counter_j"] == 0.0  # energy since the sampler opened


def test_energy_counter_deltas_in_joules() -> None:
    gpu = open_fake(fake_gpus(energy_mj=[10_000_000, 10_000_250, 10_001_250, 10_004_000]))
    assert [gpu.sample()["energy_counter_j"] for _ in range(4)] == pytest.approx([0.0, 0.25, 1.25, 4.0])


def test_energy_counter_wraps_around_without_losing_energy() -> None:
    top = ENERGY_COUNTER_MODULUS_MJ
    gpu = open_fake(fake_gpus(energy_mj=[top - 1_000, top - 200, 300, 1_300]))
    # -1000 -> -200: 0.8 J; -200 -> 300 across the wrap: 0.5 J; 300 -> 1300: 1 J
    assert [gpu.sample()["energy_counter_j"] for _ in range(4)] == pytest.approx([0.0, 0.8, 1.3, 2.3])


def test_missed_energy_reading_keeps_the_total() -> None:
    fake = fake_gpus(energy_mj=[0, 1_000, 2_000, 3_000])
    fake.devices[0].errors["energy"] = lambda n: GPU_IS_LOST if n == 2 else None
    gpu = open_fake(fake)
    values = [gpu.sample().get("energy_counter_j") for _ in range(4)]
    # the third read fails; the fourth sees the counter at 3000 mJ: the missed interval's energy is kept
    assert values == [0.0, 1.0, None, 3.0]
    assert "energy_counter_j" in gpu.field_reasons
    assert gpu.errors == 1


def test_gpu_without_energy_counter_reports_why() -> None:
    gpu = open_fake(fake_gpus(energy_mj=None))
    rows = [gpu.sample() for _ in range(3)]
    assert all("energy_counter_j" not in r for r in rows)
    assert "NvmlNotSupported" in gpu.field_reasons["energy_counter_j"]
    # an unsupported field is asked once, then left alone
    assert fake_calls(gpu, "energy") == 1


def fake_calls(gpu: NvmlGpu, fn: str) -> int:
    return gpu.nvml.devices[gpu.handle].calls.get(fn, 0)


def test_errors_mid_run_leave_holes_not_crashes() -> None:
    fake = fake_gpus(power_mw=[100_000, 200_000, 300_000, 400_000, 500_000])
    fake.devices[0].errors["power"] = lambda n: GPU_IS_LOST if n in (1, 2) else None
    fake.devices[0].errors["temperature"] = lambda n: NO_PERMISSION
    gpu = open_fake(fake)
    rows = [gpu.sample() for _ in range(5)]
    assert [r.get("power_w") for r in rows] == [100.0, None, None, 400.0, 500.0]
    assert "power_w" in gpu.field_reasons and "fake NVML error 15" in gpu.field_reasons["power_w"]
    assert all("temperature_c" not in r for r in rows)
    assert "NvmlNoPermission" in gpu.field_reasons["temperature_c"]
    assert all(r["gpu_util_pct"] == 50.0 for r in rows)


def test_unsupported_utilization_drops_both_util_fields() -> None:
    gpu = open_fake(fake_gpus(gpu_util=None))  # e.g. a MIG slice
    row = gpu.sample()
    assert "gpu_util_pct" not in row and "mem_util_pct" not in row
    assert gpu.field_reasons["mem_util_pct"] == gpu.field_reasons["gpu_util_pct"]


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (NOT_SUPPORTED, NvmlNotSupported),
        (NO_PERMISSION, NvmlNoPermission),
        (6, NvmlNotFound),
        (GPU_IS_LOST, NvmlGpuLost),
        (LIBRARY_NOT_FOUND, NvmlLibraryNotFound),
        (999, NvmlError),
    ],
)
def test_nvml_errors_are_typed(code: int, kind: type[NvmlError]) -> None:
    import pynvml

    for raw in (pynvml.NVMLError(code), FakeNvml.NVMLError(code)):
        err = nvml_error(raw)
        assert type(err) is kind
        assert err.code == code
    assert isinstance(nvml_error(AttributeError("nvmlDeviceGetFoo")), NvmlNotSupported)


def test_throttle_reason_names() -> None:
    assert throttle_reason_names(0) == []
    assert throttle_reason_names(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert throttle_reason_names(0x10000) == ["other(0x10000)"]


# CUDA_VISIBLE_DEVICES -------------------------------------------------------------------------------


def test_parse_visible_devices_stops_at_the_first_invalid_entry() -> None:
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("") == []
    assert parse_visible_devices("2, 0") == ["2", "0"]
    assert parse_visible_devices("0,2,-1,3") == ["0", "2"]
    assert parse_visible_devices("GPU-ab12,MIG-cd34,x,1") == ["GPU-ab12", "MIG-cd34"]


@pytest.mark.parametrize(
    ("visible", "torch_index", "nvml_index"),
    [
        (None, 0, 0),
        (None, 3, 3),
        ("2,3", 0, 2),
        ("2,3", 1, 3),
        ("3,0", 1, 0),
        (f"{uuid(2)[:10]}", 0, 2),  # a unique prefix of a UUID, as CUDA accepts
        (f"1,{uuid(3)}", 1, 3),
    ],
)
def test_torch_index_maps_through_cuda_visible_devices(visible: str | None, torch_index: int, nvml_index: int) -> None:
    fake = fake_gpus(4)
    assert resolve_handle(fake, torch_index, visible_devices=visible) == nvml_index
    gpu = open_fake(fake, torch_index, visible)
    assert gpu.handle == nvml_index


def test_uuid_from_torch_wins_over_the_index() -> None:
    fake = fake_gpus(4)
    bare = uuid(1).removeprefix("GPU-")  # torch reports the UUID without the prefix
    assert resolve_handle(fake, 0, uuid=bare, visible_devices="3") == 1
    assert resolve_handle(fake, 0, uuid="0123-unknown", visible_devices="3") == 3  # falls back to the mapping


@pytest.mark.parametrize("visible", ["", "1,x,2", "GPU-", "GPU-ffff"])
def test_unmappable_device_gives_a_null_sampler_with_a_reason(visible: str) -> None:
    fake = fake_gpus(4)
    gpu = open_nvml_gpu(1, nvml=fake, visible_devices=visible)
    assert isinstance(gpu, NullGpu)
    assert "no NVML device for cuda:1" in (gpu.reason or "")
    assert fake.shutdowns == fake.inits == 1  # the failed open released NVML


# missing NVML ---------------------------------------------------------------------------------------


def test_missing_pynvml_gives_a_null_sampler_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    gpu = open_nvml_gpu(0)
    assert isinstance(gpu, NullGpu)
    assert "pynvml is not installed" in (gpu.reason or "") and "bsprof[gpu]" in (gpu.reason or "")
    reason = gpu_telemetry_reason(torch.device("cpu"))
    assert reason is not None and reason.startswith("trials run on cpu; pynvml is not installed")


def test_failed_init_gives_a_null_sampler_with_nvmls_message() -> None:
    fake = FakeNvml([FakeDevice(uuid=uuid(0))], init_error=LIBRARY_NOT_FOUND)
    gpu = open_nvml_gpu(0, nvml=fake)
    assert isinstance(gpu, NullGpu)
    assert gpu.reason == "pynvml: NVML Shared Library Not Found"


def test_real_pynvml_here_has_no_driver() -> None:
    """This machine (and CI) has pynvml but no NVIDIA driver: a reason, never an exception."""
    gpu = open_nvml_gpu(0)
    if isinstance(gpu, NvmlGpu):  # pragma: no cover - only on a GPU host
        gpu.close()
        pytest.skip("an NVIDIA driver is present here")
    assert gpu.reason and gpu.reason.startswith("pynvml")


def test_close_releases_nvml_once() -> None:
    fake = fake_gpus()
    gpu = open_fake(fake)
    gpu.close()
    gpu.close()
    assert (fake.inits, fake.shutdowns) == (1, 1)


def test_telemetry_reason_for_cpu_and_cuda_with_a_fake() -> None:
    fake = fake_gpus()
    assert gpu_telemetry_reason(torch.device("cpu"), nvml=fake) == (
        "trials run on cpu; NVML could read a GPU, but trials do not use one"
    )
    assert gpu_telemetry_reason(torch.device("cuda", 0), nvml=fake) is None
