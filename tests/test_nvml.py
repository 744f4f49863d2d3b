"""The NVML sampler against a fake NVML: units, energy counter deltas and wrap-around, unsupported fields,
errors mid-run, CUDA_VISIBLE_DEVICES mapping, and the null sampler when NVML is missing."""

from __future__ import annotations

import sys

import pytest
import torch
from fake_nvml import (
    FUNCTION_NOT_FOUND,
    GPU_IS_LOST,
    LIBRARY_NOT_FOUND,
    NO_PERMISSION,
    NOT_SUPPORTED,
    FakeDevice,
    FakeNvml,
    fake_gpus,
    mig_uuid,
    uuid,
)

from bsprof.engine.nvml import (
    ENERGY_COUNTER_MODULUS_MJ,
    THROTTLE_CALLS,
    NvmlError,
    NvmlGpu,
    NvmlGpuLost,
    NvmlLibraryNotFound,
    NvmlNoPermission,
    NvmlNotFound,
    NvmlNotSupported,
    driver_version,
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


def test_throttle_reasons_fall_back_to_the_older_call_on_an_older_driver() -> None:
    # pynvml defines nvmlDeviceGetCurrentClocksEventReasons; a pre-R535 driver lacks the symbol, and the
    # call raises NVMLError_FunctionNotFound (code 13) on every poll.
    fake = fake_gpus(throttle=[0x4, 0x40, 0x4])
    fake.driver_lacks = frozenset({"nvmlDeviceGetCurrentClocksEventReasons"})
    gpu = open_fake(fake)
    masks = [gpu.sample()["throttle_reasons"] for _ in range(3)]
    assert masks == [0x4, 0x40, 0x4] and "throttle_reasons" not in gpu.field_reasons
    assert fake.missing_calls == ["nvmlDeviceGetCurrentClocksEventReasons"]  # tried once, then the older call
    assert fake.devices[0].calls["throttle"] == 3


def test_no_throttle_call_at_all_leaves_a_reason() -> None:
    fake = fake_gpus()
    fake.driver_lacks = frozenset(THROTTLE_CALLS)
    gpu = open_fake(fake)
    assert "throttle_reasons" not in gpu.sample() and "throttle_reasons" not in gpu.sample()
    assert "Function Not Found" in gpu.field_reasons["throttle_reasons"]


def test_function_not_found_is_typed_as_not_supported() -> None:
    error = nvml_error(FakeNvml.NVMLError(FUNCTION_NOT_FOUND))
    assert isinstance(error, NvmlNotSupported) and error.code == FUNCTION_NOT_FOUND


def test_the_real_pynvml_raises_function_not_found_for_a_missing_symbol() -> None:
    """What the fake models: pynvml's lookup of a C symbol the loaded library lacks."""
    import pynvml

    assert issubclass(pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError)
    assert pynvml.NVMLError_FunctionNotFound(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND).value == FUNCTION_NOT_FOUND
    assert callable(pynvml.nvmlDeviceGetCurrentClocksEventReasons)
    assert callable(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)


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


def _mig_host() -> FakeNvml:
    slices = [
        FakeDevice(uuid=mig_uuid(0, j), name="NVIDIA A100-SXM4-80GB MIG 1g.10gb", gpu_util=None, power_mw=None,
                   energy_mj=None, mem_used_bytes=(j + 1) << 30)
        for j in range(2)
    ]  # fmt: skip
    return FakeNvml([FakeDevice(uuid=uuid(0), mig=slices), FakeDevice(uuid=uuid(1))])


def test_a_mig_slice_is_found_by_its_uuid_not_as_the_whole_gpu() -> None:
    fake = _mig_host()
    bare = mig_uuid(0, 1).removeprefix("MIG-")  # torch reports the slice's UUID without a prefix
    gpu = open_nvml_gpu(0, nvml=fake, uuid=bare, visible_devices=None)
    assert isinstance(gpu, NvmlGpu) and gpu.handle == (0, 1)
    assert gpu.name.endswith("MIG 1g.10gb")
    row = gpu.sample()
    assert row["mem_used_bytes"] == float(2 << 30)  # the slice's memory, not the GPU's
    assert "power_w" not in row and "NotSupported" in gpu.field_reasons["power_w"]
    visible = open_nvml_gpu(0, nvml=fake, visible_devices=mig_uuid(0, 0))  # CUDA_VISIBLE_DEVICES=MIG-...
    assert isinstance(visible, NvmlGpu) and visible.handle == (0, 0)


def test_a_gpu_in_mig_mode_is_never_read_as_a_torch_device_by_index() -> None:
    fake = _mig_host()
    gpu = open_nvml_gpu(0, nvml=fake, visible_devices=None)  # no UUID from torch: index 0 is the MIG parent
    assert isinstance(gpu, NullGpu) and "MIG" in (gpu.reason or "") and "CUDA_VISIBLE_DEVICES" in (gpu.reason or "")
    assert resolve_handle(fake, 1, visible_devices=None) == 1  # the GPU out of MIG mode maps as before


def test_a_pynvml_without_mig_mode_reads_the_gpu_by_index() -> None:
    """pynvml before 11.0 has no ``nvmlDeviceGetMigMode`` (nor any GPU in MIG mode): not an error."""

    class OldNvml(FakeNvml):
        def __getattribute__(self, name: str) -> object:
            if name == "nvmlDeviceGetMigMode":
                raise AttributeError(name)
            return super().__getattribute__(name)

    fake = OldNvml([FakeDevice(uuid=uuid(0))])
    assert resolve_handle(fake, 0, visible_devices=None) == 0
    assert isinstance(open_nvml_gpu(0, nvml=fake, visible_devices=None), NvmlGpu)


def test_driver_version_through_the_nvml_layer() -> None:
    fake = fake_gpus(driver_version="535.104.05")
    assert driver_version(nvml=fake) == ("535.104.05", None)
    assert (fake.inits, fake.shutdowns) == (1, 1)
    version, why = driver_version(nvml=FakeNvml([], init_error=LIBRARY_NOT_FOUND))
    assert version is None and why == "NVML unavailable: NvmlLibraryNotFound: NVML Shared Library Not Found"


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
