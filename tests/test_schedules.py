"""LR schedules in samples: same LR at the same sample count whatever the batch size (issue 13, must show 4)."""

from __future__ import annotations

import math

import pytest

from bsprof.engine.schedules import LRSchedule


def _lr_by_samples(schedule: LRSchedule, batch_size: int, steps: int, peak: float) -> dict[int, float]:
    # The engine's rule: the step that brings consumption to c samples runs at peak * factor(c).
    return {(s + 1) * batch_size: peak * schedule.factor((s + 1) * batch_size) for s in range(steps)}


def test_cosine_with_warmup_in_samples_same_lr_at_same_samples_for_b32_and_b256() -> None:
    schedule = LRSchedule("cosine", warmup=2048, total=16384)
    small = _lr_by_samples(schedule, 32, 16384 // 32, peak=0.1)
    large = _lr_by_samples(schedule, 256, 16384 // 256, peak=0.1)
    assert set(large) <= set(small)
    for samples, lr in large.items():
        assert small[samples] == pytest.approx(lr, rel=0, abs=1e-15), samples
    # The shape, not only the agreement: warm-up is linear, the peak is reached at W, the end at T is 0.
    assert large[256] == pytest.approx(0.1 * 256 / 2048)
    assert large[2048] == pytest.approx(0.1)
    assert large[2048 + (16384 - 2048) // 2] == pytest.approx(0.05)
    assert large[16384] == pytest.approx(0.0, abs=1e-15)
    assert small[32] == pytest.approx(0.1 * 32 / 2048)


@pytest.mark.parametrize(
    ("kind", "samples", "expected"),
    [
        ("constant", 50, 0.5),
        ("constant", 1000, 1.0),
        ("linear", 100, 1.0),
        ("linear", 550, 0.5 * (1 - 0.1) + 0.1),
        ("linear", 5000, 0.1),
        ("cosine", 550, 0.1 + 0.9 * 0.5),
        ("cosine", 325, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),
    ],
)
def test_factor_values(kind: str, samples: int, expected: float) -> None:
    schedule = LRSchedule(kind, warmup=100, total=None if kind == "constant" else 1000, final_ratio=0.1)
    assert schedule.factor(samples) == pytest.approx(expected)


def test_epochs_convert_with_the_training_set_size() -> None:
    schedule = LRSchedule("cosine", warmup=0.5, total=10, unit="epochs").in_samples(1000)
    assert (schedule.warmup, schedule.total, schedule.unit) == (500, 10000, "samples")
    with pytest.raises(ValueError, match="in_samples"):
        LRSchedule("constant", warmup=1, unit="epochs").factor(3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "step"},
        {"kind": "cosine"},
        {"kind": "linear", "warmup": 10, "total": 5},
        {"warmup": -1},
        {"unit": "steps"},
        {"final_ratio": 2.0},
    ],
)
def test_invalid_schedules(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LRSchedule(**kwargs)  # type: ignore[arg-type]


def test_identity() -> None:
    assert LRSchedule().is_identity
    assert not LRSchedule(warmup=10).is_identity
    assert LRSchedule("cosine", warmup=64, total=1024).describe() == "cosine, warm-up 64 samples, total 1024 samples"
