"""Out-of-memory failures: recognised by type through wrapping, recorded as ``oom``, larger sizes skipped;
other errors recorded as ``error`` with their message while the sweep goes on (exit code 1)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import FAST, THROUGHPUT, CliResult, ref

from bsprof.engine.oom import free_memory, is_oom
from bsprof.store import Store

# --- is_oom -------------------------------------------------------------------------------------------


def _raise_from(inner: Exception, outer: Exception, *, explicit: bool) -> Exception:
    """``outer`` as raised while handling ``inner`` (``raise outer from inner`` if ``explicit``)."""
    try:
        try:
            raise inner
        except type(inner) as e:
            if explicit:
                raise outer from e
            raise outer  # noqa: B904 - an implicit __context__ is what this case is about
    except type(outer) as caught:
        return caught
    raise AssertionError("unreachable")


def test_out_of_memory_error_can_be_constructed() -> None:
    e = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert isinstance(e, RuntimeError)
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.OutOfMemoryError(""),  # typed: the message does not matter
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"),
        RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
        RuntimeError("CUDA error: out of memory"),
        MemoryError(),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError(
            "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."
        ),
    ],
    ids=[
        "typed",
        "typed-no-message",
        "cpu-allocator",
        "mps",
        "cuda-error",
        "MemoryError",
        "cublas-alloc",
        "cudnn-alloc",
        "cudnn-not-supported",
    ],
)
def test_is_oom_recognises(exc: BaseException) -> None:
    assert is_oom(exc)


def test_is_oom_walks_cause() -> None:
    wrapped = _raise_from(torch.OutOfMemoryError("x"), RuntimeError("compiled graph failed"), explicit=True)
    assert wrapped.__cause__ is not None
    assert is_oom(wrapped)


def test_is_oom_walks_context() -> None:
    wrapped = _raise_from(torch.OutOfMemoryError("x"), RuntimeError("cleanup failed"), explicit=False)
    assert wrapped.__cause__ is None and wrapped.__context__ is not None
    assert is_oom(wrapped)


def test_is_oom_walks_several_levels() -> None:
    inner = _raise_from(torch.OutOfMemoryError("x"), RuntimeError("level 1"), explicit=True)
    outer = _raise_from(inner, ValueError("level 2"), explicit=True)
    assert is_oom(outer)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("shape mismatch"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        KeyError("x"),
        RuntimeError("CUDA error: CUBLAS_STATUS_INVALID_VALUE when calling `cublasSgemm`"),  # not an allocation
        ValueError("CUDNN_STATUS_NOT_SUPPORTED"),  # the fallback only reads RuntimeErrors
    ],
)
def test_is_oom_rejects_other_errors(exc: BaseException) -> None:
    assert not is_oom(exc)


def test_is_oom_survives_a_cycle_in_the_chain() -> None:
    a, b = RuntimeError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert not is_oom(a)
    c = torch.OutOfMemoryError("c")
    b.__cause__ = c
    assert is_oom(a)


def test_free_memory_collects_garbage_and_empties_the_cuda_cache_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    class Node:
        pass

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    gc.disable()  # only free_memory may collect the cycle below
    try:
        node = Node()
        node.self = node  # type: ignore[attr-defined]
        alive = weakref.ref(node)
        del node
        assert alive() is not None
        free_memory(torch.device("cpu"))
        assert alive() is None and calls == []
    finally:
        gc.enable()
    free_memory(torch.device("cuda", 0))
    assert calls == ["synchronize", "empty_cache"]  # queued kernels finish before the cache is emptied


# --- injected OOM through the CLI ---------------------------------------------------------------------


@pytest.fixture
def tried_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[int]]:
    """The batch sizes at which a fixture workload really raised (it appends them to $BSPROF_TEST_LOG)."""
    path = tmp_path / "tried.log"
    monkeypatch.setenv("BSPROF_TEST_LOG", str(path))
    return lambda: [int(x) for x in path.read_text().split()] if path.exists() else []


def _sweep(cli: Callable[..., CliResult], store: Path, workload: str, *extra: str) -> CliResult:
    return cli("sweep", "-w", ref("tiny.py", workload), "-b", "64..1024", "--store", store, *THROUGHPUT, *FAST, *extra)


def _statuses(store: Path) -> dict[int, list[str]]:
    with Store(store) as s:
        rows = s.trial_rows()
    out: dict[int, list[str]] = {}
    for r in rows:
        out.setdefault(r["batch_size"], []).append(r["status"])
    return out


@pytest.mark.usefixtures("fast_timing")
def test_injected_oom_skips_larger_sizes_exit_0(
    cli: Callable[..., CliResult], tmp_path: Path, tried_log: Callable[[], list[int]]
) -> None:
    store = tmp_path / "s.db"
    result = _sweep(cli, store, "oom_at_256")
    assert result.code == 0, result.err
    assert result.err == ""
    assert _statuses(store) == {64: ["ok"], 128: ["ok"], 256: ["oom"], 512: ["oom"], 1024: ["oom"]}
    assert tried_log() == [256]  # 512 and 1024 were recorded without being tried
    with Store(store) as s:
        rows = {r["batch_size"]: r for r in s.trial_rows()}
    assert "CUDA out of memory" in rows[256]["error"]
    assert "OutOfMemoryError" in rows[256]["error"]
    for b in (512, 1024):
        assert "not tried" in rows[b]["error"]
        assert rows[b]["extra"].get("skipped_after_oom") is True
    assert not rows[256]["extra"].get("skipped_after_oom")


@pytest.mark.usefixtures("fast_timing")
def test_injected_oom_no_skip_larger_tries_all(
    cli: Callable[..., CliResult], tmp_path: Path, tried_log: Callable[[], list[int]]
) -> None:
    store = tmp_path / "s.db"
    result = _sweep(cli, store, "oom_at_256", "--no-skip-larger")
    assert result.code == 0, result.err
    assert _statuses(store) == {64: ["ok"], 128: ["ok"], 256: ["oom"], 512: ["oom"], 1024: ["oom"]}
    assert tried_log() == [256, 512, 1024]
    with Store(store) as s:
        assert all("not tried" not in (r["error"] or "") for r in s.trial_rows())


@pytest.mark.usefixtures("fast_timing")
def test_process_keeps_measuring_after_an_oom(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    result = _sweep(cli, store, "oom_at_256", "--repeats", "2")
    assert result.code == 0, result.err
    statuses = _statuses(store)
    assert statuses[64] == statuses[128] == ["ok", "ok"]  # the second round ran after the OOM
    assert statuses[256] == statuses[512] == statuses[1024] == ["oom", "oom"]


@pytest.mark.parametrize("workload", ["wrapped_oom_at_256", "cpu_oom_at_256"])
@pytest.mark.usefixtures("fast_timing")
def test_wrapped_and_cpu_ooms_are_recognised(workload: str, cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    result = _sweep(cli, store, workload)
    assert result.code == 0, result.err
    assert _statuses(store) == {64: ["ok"], 128: ["ok"], 256: ["oom"], 512: ["oom"], 1024: ["oom"]}


@pytest.mark.usefixtures("fast_timing")
def test_unrelated_error_is_stored_sweep_continues_exit_1(
    cli: Callable[..., CliResult], tmp_path: Path, tried_log: Callable[[], list[int]]
) -> None:
    store = tmp_path / "s.db"
    result = _sweep(cli, store, "error_at_128")
    assert result.code == 1
    assert len(result.err_lines) == 1, result.err
    assert "shape mismatch injected at 128" in result.err
    assert _statuses(store) == {64: ["ok"], 128: ["error"], 256: ["ok"], 512: ["ok"], 1024: ["ok"]}
    with Store(store) as s:
        (row,) = [r for r in s.trial_rows() if r["status"] == "error"]
    assert row["error"] == "ValueError: shape mismatch injected at 128"
    assert tried_log() == [128]
